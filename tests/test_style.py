"""The code style CI holds the repository to: `ruff check` (pyproject.toml's rules, lines of at most
100 characters) and `ruff format --check` report nothing."""

import subprocess
import sys

from conftest import REPO


def ruff(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True
    )


def test_ruff_check_is_clean():
    proc = ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_ruff_format_leaves_every_file_as_it_is():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
