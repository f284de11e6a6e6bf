"""Drive app.py's page in a headless browser (Playwright on the system's chromium): generate, read
the facts tab, save a screenshot. Used by tests/test_app.py, and to make docs/demo.png:

    apt-get install -y chromium && pip install -r requirements-app.txt playwright
    python scripts/demo_page.py --model out/quickstart --screenshot docs/demo.png
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, port: int, timeout: float = 600) -> subprocess.Popen:
    """app.py in a subprocess on 127.0.0.1:port; returns once the page answers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--model", str(model), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(
        f"app.py did not answer on port {port} within {timeout:.0f} "
        f"s:\n{proc.communicate()[0][-3000:]}"
    )


def open_page(playwright, url: str):
    browser = playwright.chromium.launch(
        executable_path=find_chromium(), args=["--no-sandbox"]
    )  # CI runs as root
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(120_000)  # a loaded machine can take that long to answer a click
    page.goto(url, wait_until="domcontentloaded", timeout=300_000)
    page.wait_for_selector("#prompt textarea", timeout=300_000)
    return browser, page


def generate_on_page(
    page,
    prompt: str,
    *,
    greedy: bool,
    max_new_tokens: int,
    seed: int,
    stop: str = "",
    expected_text: str | None = None,
    timeout_ms: int = 300_000,
) -> tuple[str, str]:
    """Fill the Generate tab, press Generate, wait for the end; returns (output text, status line).

    With expected_text, also wait (up to timeout_ms) until the output box shows exactly that: the
    page updates the status line and the output box separately, so one can lag the other on a loaded
    machine.
    """
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Generate").click()
    page.fill("#prompt textarea", prompt)
    page.get_by_label("greedy" if greedy else "sampling", exact=True).check()
    # gradio takes a typed number or text when the field loses focus: press Tab after each, or
    # Generate may run with the previous values.
    for selector, value in (
        ("#max_new_tokens input", max_new_tokens),
        ("#seed textarea, #seed input", seed),
        ("#stop_string input, #stop_string textarea", stop),
    ):
        page.fill(selector, str(value))
        page.press(selector, "Tab")
    # The status line still shows the last result while the request runs, under gradio's progress
    # timer ("0.1s", "processing | 0.1/0.7s", "queue: 1/2 | 0.1s"): wait for a new final line
    # (tokens/s or an error) with no timer.
    old_status = page.inner_text("#status")
    page.click("#generate")
    page.wait_for_function(
        """old => { const t = document.querySelector('#status').innerText;
        const timer = /(^|\\|)\\s*\\d+(\\.\\d+)?(\\/\\d+(\\.\\d+)?)?s\\s*$/m;
        return t !== old && /tokens\\/s|error:/.test(t) """
        """&& !timer.test(t) && !/processing|queue/.test(t); }""",
        arg=old_status,
        timeout=timeout_ms,
    )
    output = page.locator("#output textarea")
    if expected_text is not None:
        expect(output).to_have_value(expected_text, timeout=timeout_ms)
    return output.input_value(), page.inner_text("#status")


def facts_text(page) -> str:
    page.get_by_role("tab", name="How it was trained").click()
    page.wait_for_selector("#facts", state="visible")
    return page.inner_text("#facts")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--screenshot", default="docs/demo.png")
    parser.add_argument("--prompt", default="The history of the city began in")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=60)
    args = parser.parse_args()
    if find_chromium() is None:
        sys.exit("error: no chromium found; install it with: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    port = free_port()
    app = start_app(args.model, port)
    try:
        with sync_playwright() as playwright:
            browser, page = open_page(playwright, f"http://127.0.0.1:{port}/")
            text, status = generate_on_page(
                page, args.prompt, greedy=False, max_new_tokens=args.max_new_tokens, seed=args.seed
            )
            print(text, "\n", status, sep="")
            page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"wrote {args.screenshot}")


if __name__ == "__main__":
    main()
