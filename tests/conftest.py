"""Shared fixtures: offline Hub, a private datasets cache, the real WikiText-2 splits and GPT-2
tokenizer."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before datasets/transformers are imported anywhere: no network, a datasets cache of this run only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="wikigpt-test-cache-"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_DISABLED"] = "true"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = (
    REPO / "data"
)  # bundled: WikiText-2 raw validation/test and the GPT-2 tokenizer (data/README.md)
WT2 = DATA / "wikitext-2-raw"
TOKENIZER_DIR = DATA / "gpt2-tokenizer"


def write_lines(path: Path, source: Path, start: int, stop: int) -> Path:
    """A slice of a real WikiText-2 file, lines [start, stop), byte-exact."""
    with open(source, encoding="utf-8") as f:
        lines = f.read().split("\n")
    path.write_text("\n".join(lines[start:stop]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def small_files(tmp_path_factory):
    """Real WT2 slices: ~25k train tokens from validation, ~6k eval tokens from test (CPU-sized)."""
    d = tmp_path_factory.mktemp("wt2-slices")
    return {
        "train": write_lines(d / "train.raw", WT2 / "wiki.valid.raw", 0, 400),
        "validation": write_lines(d / "valid.raw", WT2 / "wiki.test.raw", 0, 100),
        "test": write_lines(d / "test.raw", WT2 / "wiki.test.raw", 100, 200),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A tiny GPT-2 saved with save_pretrained (safetensors) + tokenizer: stands in for a Hub
    checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def run_script(
    script: str, *args, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts as a user would, offline."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_train_args(small_files, output_dir, *extra) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        small_files["train"],
        "--validation_file",
        small_files["validation"],
        "--block_size",
        64,
        "--per_device_train_batch_size",
        4,
        "--per_device_eval_batch_size",
        8,
        "--max_steps",
        6,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        2,
        "--output_dir",
        output_dir,
        "--disable_tqdm",
        "true",
        *extra,
    ]
