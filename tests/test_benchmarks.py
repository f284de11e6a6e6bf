"""benchmarks/train_throughput.py runs a few tiny CPU steps of both setups and two levers, and writes its JSON."""

import json

import pytest
from conftest import TOKENIZER_DIR, WT2, run_script, write_lines

RUN_KEYS = {"name", "lever", "ms_per_step", "tokens_per_second", "mfu", "peak_memory_mib", "peak_memory_kind",
            "timed_steps", "last_logged_loss", "vocab_size", "attn_implementation", "optim", "bf16", "torch_compile"}


def test_benchmark_writes_the_documented_json(tmp_path):
    train = write_lines(tmp_path / "train.raw", WT2 / "wiki.valid.raw", 0, 120)
    test = write_lines(tmp_path / "test.raw", WT2 / "wiki.test.raw", 0, 40)
    out = tmp_path / "bench.json"
    proc = run_script("benchmarks/train_throughput.py", "--preset", "tiny", "--block_size", 32, "--batch_size", 2,
                      "--steps", 3, "--warmup_steps", 1, "--logging_steps", 1, "--tokenizer_name", TOKENIZER_DIR,
                      "--train_file", train, "--test_file", test, "--levers", "true", "--lever_names",
                      "pad_vocab_64,chunked_loss", "--chunked_loss_size", 24, "--peak_flops", 1e12, "--output_json", out,
                      env={"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["runs"]] == ["plain", "wikigpt"]
    assert [r["name"] for r in report["levers"]] == ["pad_vocab_64", "chunked_loss"]
    for run in report["runs"] + report["levers"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert run["timed_steps"] == 2 and run["ms_per_step"] > 0 and run["peak_memory_mib"] > 0
        assert run["tokens_per_second"] == pytest.approx(2 * 32 * 1000 / run["ms_per_step"], rel=1e-3)
        # MFU with --peak_flops: tokens/s x FLOPs per token (unpadded model) / peak
        assert run["mfu"] == pytest.approx(run["tokens_per_second"] * report["flops_per_token"] / 1e12, rel=1e-3)
        assert run["peak_memory_kind"].startswith("process peak RSS")  # CPU: labelled as such
    assert report["runs"][1]["vocab_size"] == report["levers"][0]["vocab_size"] == 50304  # CPU wikigpt: padded
    assert report["runs"][0]["vocab_size"] == 50257
    # Same seed, same dropout masks: the chunked loss trains to the plain loss (tests/test_chunked_loss.py).
    assert report["levers"][1]["last_logged_loss"] == pytest.approx(report["runs"][0]["last_logged_loss"], rel=1e-5)
    assert report["wikigpt_vs_plain"] == pytest.approx(
        report["runs"][1]["tokens_per_second"] / report["runs"][0]["tokens_per_second"], rel=1e-2)
    assert report["peak_flops_source"] == "--peak_flops" and report["tokens_per_step"] == 64
    pre = report["preprocessing"]
    assert pre["num_proc"] == 2 and pre["cold_cache_seconds"] > 0 and pre["cached_seconds"] > 0
    assert pre["tokens"] > 0 and pre["blocks"] > 0
    assert report["environment"]["device_name"] == "cpu"
    assert "wikigpt / plain tokens/s" in proc.stdout and "preprocessing (tokenize + group" in proc.stdout
