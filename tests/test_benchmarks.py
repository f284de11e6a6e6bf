"""benchmarks/train_throughput.py runs a few tiny CPU steps of every kind of row and writes its
JSON."""

import json

import pytest
from conftest import TOKENIZER_DIR, WT2, run_script, write_lines

RUN_KEYS = {
    "name",
    "lever",
    "ms_per_step",
    "tokens_per_second",
    "mfu",
    "peak_memory_mib",
    "peak_memory_kind",
    "timed_steps",
    "last_logged_loss",
    "vocab_size",
    "optim",
    "bf16",
    "torch_compile",
    "peak_flops",
}


def test_benchmark_writes_the_documented_json(tmp_path):
    train = write_lines(tmp_path / "train.raw", WT2 / "wiki.valid.raw", 0, 120)
    test = write_lines(tmp_path / "test.raw", WT2 / "wiki.test.raw", 0, 40)
    out = tmp_path / "bench.json"
    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = run_script(
        "benchmarks/train_throughput.py",
        "--preset",
        "tiny",
        "--block_size",
        32,
        "--batch_size",
        2,
        "--steps",
        3,
        "--warmup_steps",
        1,
        "--logging_steps",
        1,
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        train,
        "--test_file",
        test,
        "--levers",
        "true",
        "--wikigpt_levers",
        "true",
        "--lever_names",
        "pad_vocab_64,chunked_loss,wikigpt+chunked_loss,wikigpt-fused_gelu,hand_loop,nanogpt_eager",
        "--chunked_loss_size",
        24,
        "--output_json",
        out,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["runs"]] == ["plain", "wikigpt"]
    assert [r["name"] for r in report["levers"]] == ["pad_vocab_64", "chunked_loss"]
    assert [r["name"] for r in report["wikigpt_levers"]] == [
        "wikigpt+chunked_loss",
        "wikigpt-fused_gelu",
    ]
    assert [r["name"] for r in report["references"]] == ["hand_loop", "nanogpt_eager"]
    rows = report["runs"] + report["levers"] + report["wikigpt_levers"] + report["references"]
    # CPU, no --peak_flops: MFU against the best matmul of the row's precision this run measured
    # (the probe's).
    fp32_probe = [r["gflops"] for r in report["matmul_probe"] if r["dtype"] == "fp32"]
    assert len(fp32_probe) == 3 and all(g > 0 for g in fp32_probe)
    assert report["measured_peak_flops"]["fp32"] == pytest.approx(max(fp32_probe) * 1e9)
    assert report["peak_flops_source"] == "best matmul of the row's precision measured in this run"
    for run in rows:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert run["timed_steps"] == 2 and run["ms_per_step"] > 0 and run["peak_memory_mib"] > 0
        # each row against its own precision's peak (wikigpt's rows are bf16 where the CPU has
        # native bf16)
        peak = report["measured_peak_flops"]["bf16" if run["bf16"] else "fp32"]
        assert run["peak_flops"] == peak and 0 < run["mfu"] < 1
        assert run["peak_memory_kind"].startswith("process peak RSS")  # CPU: labelled as such
        assert (
            9 < run["last_logged_loss"] < 12
        )  # a real loss of an untrained model: ln(50257) = 10.8
    wiki = report["runs"][1]
    assert wiki["vocab_size"] == report["levers"][0]["vocab_size"] == 50304  # CPU wikigpt: padded
    assert report["runs"][0]["vocab_size"] == 50257
    # Same seed, same dropout masks: the chunked loss trains to the plain loss
    # (tests/objectives/test_chunked_loss.py).
    assert report["levers"][1]["last_logged_loss"] == pytest.approx(
        report["runs"][0]["last_logged_loss"], rel=1e-5
    )
    # wikigpt's rows run bf16 autocast where the CPU has it: logits rounded to bf16 in chunks of
    # another shape round differently by host (AMX vs AVX512 kernels), ~1e-5 of the loss; a wrong
    # loss is off by far more than 1e-4.
    bf16_rel = 1e-4 if wiki["bf16"] else 1e-5
    assert report["wikigpt_levers"][0]["last_logged_loss"] == pytest.approx(
        wiki["last_logged_loss"], rel=bf16_rel
    )
    # transformers' Python GELU: the formula of the fused default, so the same losses to rounding
    python_gelu = report["wikigpt_levers"][1]
    assert "activation_function=gelu_new" in python_gelu["train_py_args"]
    assert python_gelu["last_logged_loss"] == pytest.approx(wiki["last_logged_loss"], rel=bf16_rel)
    assert report["wikigpt_vs_nanogpt"] > 0 and "vs_nanogpt_eager" in wiki
    # The wikigpt row is train.py's path: train.py with the row's flags logs the same loss at the
    # same step.
    argv = wiki["train_py_args"]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "train_py")
    proc = run_script("train.py", *argv, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "train_py" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in history if "loss" in e][-1] == wiki["last_logged_loss"]
    pre = report["preprocessing"]
    assert pre["num_proc"] == 2 and pre["cold_cache_seconds"] > 0 and pre["cached_seconds"] > 0
    assert pre["tokens"] > 0 and pre["blocks"] > 0
    assert report["environment"]["device_name"] == "cpu"


@pytest.mark.parametrize(
    "orthogonalize, switch, dtype",
    [
        ("bf16", "0", "bfloat16"),
        ("host", "1", "bfloat16"),
        ("host", "0", "float32"),
        ("fp32", "1", "float32"),
    ],
)
def test_optimizer_step_benchmark_compares_like_with_like_and_writes_json(
    tmp_path, orthogonalize, switch, dtype
):
    """bf16 on both sides agrees to the bit on any host; the fp32 path (hosts without native bf16)
    differs by bf16's rounding of torch's side, and the JSON says which path ran."""
    out = tmp_path / "optimizer.json"
    proc = run_script(
        "benchmarks/optimizer_step.py",
        "--n_layer",
        2,
        "--n_embd",
        32,
        "--vocab_size",
        300,
        "--steps",
        2,
        "--orthogonalize",
        orthogonalize,
        "--output_json",
        out,
        env={"OMP_NUM_THREADS": "1", "WIKIGPT_CPU_BF16": switch},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (
        report["shape"] == {"n_layer": 2, "n_embd": 32, "vocab_size": 300} and report["steps"] == 2
    )
    assert report["orthogonalize_dtype"] == dtype
    assert all(report["ms_per_step"][name]["median"] > 0 for name in ("torch", "wikigpt"))
    difference = report["max_abs_parameter_difference"]
    if (
        dtype == "bfloat16"
    ):  # torch's Muon to the bit; fused AdamW differs from the single-tensor one by rounding
        assert difference < 1e-6
    else:  # the same steps without bf16 rounding: apart, but by far less than one step (lr 0.02)
        assert 1e-6 < difference < 0.02
    assert f"wikigpt orthogonalises in {dtype}, torch in bfloat16" in proc.stdout
