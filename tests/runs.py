"""Helpers for tests that run train.py for a few steps: micro data, micro model, in-process or
paused runs.

Sizes keep each run to seconds on a shared 2-core CPU: a 16-wide 2-layer GPT-2 (the 50257-token LM
head dominates the cost), blocks of 32 tokens, 2 blocks per step, ~1.2k validation tokens. Runs use
one torch thread: on a loaded 2-core machine two threads spin against each other and every step is
~5x slower, and runs that are compared bit for bit must use the same thread count.
"""

THREADS = 1

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TOKENIZER_DIR, WT2, write_lines

import train
from wikigpt.errors import run_main


@pytest.fixture(scope="session")
def micro_files(tmp_path_factory):
    """Real WikiText-2 slices: ~10k train tokens (validation lines 0-150), ~1.2k eval tokens (test
    lines 0-20)."""
    d = tmp_path_factory.mktemp("wt2-micro")
    return {
        "train": write_lines(d / "train.raw", WT2 / "wiki.valid.raw", 0, 150),
        "validation": write_lines(d / "valid.raw", WT2 / "wiki.test.raw", 0, 20),
    }


def micro_args(files, out, *extra, max_steps=10, save_steps=4) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--config_overrides",
        "n_embd=16",
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        files["train"],
        "--validation_file",
        files["validation"],
        "--block_size",
        32,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        16,
        "--max_steps",
        max_steps,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        save_steps,
        "--logging_steps",
        1,
        "--output_dir",
        out,
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        *extra,
    ]


def train_in_process(argv, monkeypatch):
    """train.py's main as the command line would run it; returns the exit code (0 if it returns)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        run_main(train.main)
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        torch.set_num_threads(threads)
    return 0


def start_paused(argv, markers, pause_at_step) -> subprocess.Popen:
    """train.py in a subprocess (tests/pause_train.py) that waits before step pause_at_step+1;
    returns once there."""
    markers.mkdir()
    cmd = [
        sys.executable,
        str(REPO / "tests" / "pause_train.py"),
        str(pause_at_step),
        str(markers),
        *map(str, argv),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    deadline = time.time() + 300
    while not (markers / "paused").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"run never reached step {pause_at_step}:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return proc


def make_checkpoint(path, step: int, n_embd: int = 8):
    """A complete checkpoint-N folder with every file the Trainer writes, built without training
    (milliseconds)."""
    import json

    from safetensors.torch import save_file
    from transformers import GPT2Config

    path.mkdir(parents=True)
    GPT2Config(n_layer=1, n_head=1, n_embd=n_embd, vocab_size=100, n_positions=32).save_pretrained(
        path
    )
    save_file(
        {"wte": torch.zeros(100, n_embd), "wpe": torch.ones(32, n_embd)}, path / "model.safetensors"
    )
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.arange(64)}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path
