"""app.py, the web demo: its handlers (wikigpt/reporting/demo.py) on bad input, the same text as
generate.py for a seed, the facts of a train.py run; and the page itself in a headless chromium
(skipped where none is installed)."""

import io
import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from conftest import REPO
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from transformers import GPT2Config, GPT2LMHeadModel

import generate as generate_script
from scripts.demo_page import (
    facts_text,
    find_chromium,
    free_port,
    generate_on_page,
    open_page,
    start_app,
)
from wikigpt.reporting.demo import Request, generate, load_demo_model, model_facts
from wikigpt.errors import run_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, micro_files):
    """A finished train.py run folder (results.json with test perplexity, model card, training
    curves)."""
    out = tmp_path_factory.mktemp("app-run") / "run"
    monkeypatch = pytest.MonkeyPatch()
    try:
        code = train_in_process(
            micro_args(
                micro_files,
                out,
                "--save_strategy",
                "no",
                "--test_file",
                micro_files["validation"],
                max_steps=4,
            ),
            monkeypatch,
        )
    finally:
        monkeypatch.undo()
    assert code == 0
    return out


@pytest.fixture(scope="module")
def demo(run_dir):
    loaded = load_demo_model(str(run_dir), device="cpu")
    assert loaded.error is None
    return loaded


def final(demo, **request):
    """The last (text, status) the page would show for this request."""
    *_, last = generate(demo, Request(**request))
    return last


def generate_cli(monkeypatch, capsys, model, prompt, *flags):
    """What `python generate.py --model M --prompt P FLAGS` prints (run in-process: no interpreter
    start-up)."""
    capsys.readouterr()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "generate.py",
            "--model",
            str(model),
            "--prompt",
            prompt,
            "--device",
            "cpu",
            *map(str, flags),
        ],
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    run_main(generate_script.main)
    return capsys.readouterr().out.removesuffix("\n")  # generate.py ends the streamed line


# --- handlers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("greedy, stop", [(True, ""), (False, r"\n")])
def test_same_text_as_generate_py(monkeypatch, capsys, demo, run_dir, greedy, stop):
    prompt = "The history of the city"
    text, status = final(
        demo,
        prompt=prompt,
        greedy=greedy,
        max_new_tokens=12,
        temperature=0.9,
        top_k=40,
        top_p=0.95,
        repetition_penalty=1.1,
        seed=5,
        stop=stop,
    )
    flags = ["--max_new_tokens", 12, "--seed", 5, "--repetition_penalty", 1.1, "--top_k", 40]
    flags += ["--greedy"] if greedy else ["--temperature", 0.9, "--top_p", 0.95]
    assert text == generate_cli(
        monkeypatch, capsys, run_dir, prompt, *flags, *(["--stop", stop] if stop else [])
    )
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert (
        "tokens/s" in status
        and "seed 5" in status
        and ("greedy" if greedy else "sampling") in status
    )


def test_streams_piece_by_piece(demo):
    shown = [
        text
        for text, _ in generate(demo, Request(prompt="The", greedy=True, max_new_tokens=10, seed=0))
    ]
    assert len(shown) >= 3 and all(
        later.startswith(earlier) for earlier, later in zip(shown, shown[1:])
    )


def test_empty_prompt_is_an_unconditional_sample(demo):
    text, status = final(demo, prompt="", greedy=True, max_new_tokens=5, seed=0)
    assert status.startswith(
        "Empty prompt: an unconditional sample, started from <|endoftext|>. 5 new tokens"
    )
    assert text


def test_long_prompt_keeps_its_end_and_says_so(demo, tokenizer):
    prompt = " ".join(f"w{i}" for i in range(40))
    tokens = len(tokenizer(prompt)["input_ids"])
    context = demo.context
    max_new = context - tokens + 7  # 7 tokens too many
    text, status = final(demo, prompt=prompt, greedy=True, max_new_tokens=max_new, seed=0)
    assert status.startswith(
        f"The prompt has {tokens} tokens; the model saw only its last {tokens - 7}, so that "
        f"prompt + {max_new} new tokens fit its context of {context} tokens."
    )
    assert text.startswith(prompt)


@pytest.mark.parametrize(
    "request_values, message",
    [
        (
            dict(temperature=0),
            "error: Temperature 0.0 must be > 0 when sampling; for greedy decoding choose greedy "
            "decoding",
        ),
        (dict(top_p=1.5), "error: Top-p 1.5 must be in (0, 1] (1 turns nucleus sampling off)"),
        (dict(top_k=-1), "error: Top-k -1 must be >= 0 (0 turns top-k filtering off)"),
        (dict(top_k=2.5), "error: Top-k 2.5 must be a whole number"),
        (
            dict(repetition_penalty=0),
            "error: Repetition penalty 0.0 must be > 0 (1.0 means no penalty)",
        ),
        (dict(max_new_tokens=0), "error: Max new tokens 0 must be >= 1"),
        (
            dict(max_new_tokens=10_000),
            "error: Max new tokens 10000 leaves no room for a prompt in the model's context "
            "of 256 tokens; use at most 255",
        ),
        (dict(max_new_tokens=None), None),  # empty box: generate.py's default for this checkpoint
        (dict(seed=-1), "error: Seed -1 must be in [0, 4294967295] (leave it out for a fresh one)"),
        (dict(seed="1.5"), "error: Seed '1.5' must be a whole number, or empty for a fresh one"),
        (dict(seed=" "), None),  # empty box: a fresh seed
        (dict(stop=""), None),
    ],
)
def test_out_of_range_settings(demo, request_values, message):
    values = {"prompt": "Hi", "max_new_tokens": 3, "seed": 0, "temperature": 1.0, **request_values}
    shown = list(generate(demo, Request(**values)))
    if message is None:
        assert "tokens/s" in shown[-1][1]
    else:
        assert shown == [("", message)]


def test_greedy_ignores_temperature(demo):
    assert (
        "tokens/s"
        in final(demo, prompt="Hi", greedy=True, temperature=0, max_new_tokens=2, seed=0)[1]
    )


def test_stop_ends_a_long_generation(demo):
    cancel = threading.Event()
    shown = generate(demo, Request(prompt="The", greedy=True, max_new_tokens=200, seed=0), cancel)
    next(shown)
    cancel.set()
    *_, (text, status) = shown
    new_tokens = int(status.split(" new tokens")[0])
    assert new_tokens < 200 and "ended by stopped" in status


def pickle_only_folder(path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=64))
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "no-model", "does not exist; pass a checkpoint folder"),
        (
            lambda tmp: pickle_only_folder(tmp / "pickled"),
            "holds only pickle weights (pytorch_model.bin)",
        ),
    ],
)
def test_unloadable_model_is_a_message_on_the_page(tmp_path, make, message):
    folder = make(tmp_path)
    demo = load_demo_model(str(folder), device="cpu")
    assert message in demo.error and demo.model is None
    ((text, status),) = generate(demo, Request(prompt="Hi"))
    assert text == "" and status.startswith(f"error: --model '{folder}' ") and message in status
    facts, curves, card = model_facts(demo)
    assert (
        f"**error:** --model '{folder}'" in facts
        and message in facts
        and curves is None
        and card == ""
    )


# --- facts ----------------------------------------------------------------------------------------


def test_facts_of_a_train_py_run(demo, run_dir, tmp_path):
    results = json.loads((run_dir / "results.json").read_text())
    facts, curves, card = model_facts(demo)
    test_ppl, valid_ppl = (
        results["test"]["test_perplexity"],
        results["validation"]["eval_perplexity"],
    )
    assert f"| test | perplexity (token-level, 32-token blocks) | {test_ppl:,.2f} |" in facts
    assert f"| validation | perplexity (token-level, 32-token blocks) | {valid_ppl:,.2f} |" in facts
    assert f"**parameters:** {results['model']['parameters']:,}" in facts
    assert "| learning_rate | " in facts and "| test | " in facts
    assert curves == str(run_dir / "training_curves.png") and card.startswith("# run")

    # eval.py's results (word perplexity, bits per byte) appear when it has written them into the
    # folder.
    with_eval = tmp_path / "with-eval"
    shutil.copytree(run_dir, with_eval)
    report = {
        "split": "test",
        "metrics": {
            "word_perplexity": {"value": 2345.6789, "method": "lm-eval"},
            "bits_per_byte": {"value": 2.25, "method": "lm-eval"},
        },
    }
    (with_eval / "eval_test.json").write_text(json.dumps(report))
    facts, _, _ = model_facts(load_demo_model(str(with_eval), device="cpu"))
    assert (
        "| test | word perplexity | 2,345.6789 | eval.py |" in facts
        and "| test | bits per byte | 2.2500 |" in facts
    )


def test_plain_checkpoint_has_config_facts_only(tiny_checkpoint):
    facts, curves, card = model_facts(load_demo_model(str(tiny_checkpoint), device="cpu"))
    assert (
        "No results.json in this checkpoint" in facts
        and "2 layers, 2 heads, width 32, context 128" in facts
    )
    assert curves is None and card == ""


def test_without_gradio_says_how_to_install():
    blocked = (
        "import sys, runpy; sys.modules['gradio'] = None; sys.argv = ['app.py', '--model', 'x']; "
        "runpy.run_path('app.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == "error: the web demo needs gradio; install it with: pip install -r "
        "requirements-app.txt\n"
    )


# --- the page in a browser ------------------------------------------------------------------------


def test_page_in_a_browser(monkeypatch, capsys, run_dir, tmp_path):
    if find_chromium() is None:
        pytest.skip("no chromium installed (apt-get install -y chromium); .ci/run installs it")
    pytest.importorskip(
        "gradio", reason="gradio is not installed (pip install -r requirements-app.txt)"
    )
    playwright_api = pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is not installed (pip install -r requirements-app.txt)",
    )
    port = free_port()
    app = start_app(run_dir, port)
    try:
        with playwright_api.sync_playwright() as playwright:
            browser, page = open_page(playwright, f"http://127.0.0.1:{port}/")
            prompt = "The history of the city"
            for greedy in (True, False):
                flags = ["--greedy"] if greedy else []
                expected = generate_cli(
                    monkeypatch,
                    capsys,
                    run_dir,
                    prompt,
                    "--max_new_tokens",
                    10,
                    "--seed",
                    3,
                    *flags,
                )
                assert expected.startswith(prompt) and len(expected) > len(prompt)
                # Fails (playwright's AssertionError shows the page's text) unless the page shows
                # generate.py's text.
                text, status = generate_on_page(
                    page,
                    prompt,
                    greedy=greedy,
                    max_new_tokens=10,
                    seed=3,
                    expected_text=expected,
                    timeout_ms=120_000,
                )
                assert "tokens/s" in status and "seed 3" in status
            text, status = generate_on_page(page, "x", greedy=True, max_new_tokens=0, seed=3)
            assert status == "error: Max new tokens 0 must be >= 1"
            results = json.loads((run_dir / "results.json").read_text())
            assert f"{results['test']['test_perplexity']:,.2f}" in facts_text(page)
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
            assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=60)
