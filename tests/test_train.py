"""train.py end to end on CPU: a tiny run that saves a reloadable model, checkpoints, config files,
bad input."""

import json
import logging
import math
import sys

import pytest
from conftest import TOKENIZER_DIR, WT2, run_script, tiny_train_args
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from wikigpt.errors import run_main


def test_tiny_run_writes_a_reloadable_model_and_results(tmp_path, small_files):
    out = tmp_path / "run"
    proc = run_script(
        "train.py", *tiny_train_args(small_files, out, "--test_file", small_files["test"])
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["kind"] == "from_scratch" and "base_model" not in results["model"]
    assert results["block_size"] == 64 and results["train"]["global_step"] == 6
    assert results["train"]["tokens_seen"] == 6 * 4 * 64
    for split in ("train", "validation", "test"):
        c = results["data"][split]
        assert c["tokens_in_blocks"] == c["blocks"] * 64 and 0 <= c["tokens_dropped"] < 64
    # Perplexity comes from the corpus_perplexity module: exp(sum NLL / tokens), every block counted
    # once; the Trainer's eval_loss (mean of batch means) agrees to float rounding on equal-length
    # blocks.
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = results[split]
        assert math.isclose(
            metrics[f"{prefix}_perplexity"], math.exp(metrics[f"{prefix}_loss"]), rel_tol=1e-4
        )
    assert results["test"]["test_tokens"] == results["data"]["test"]["blocks"] * 63
    assert "validation perplexity = " in proc.stderr
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.n_layer == 2 and len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_from_checkpoint_and_yaml_config(tmp_path, small_files, tiny_checkpoint):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_checkpoint}\nlearning_rate: 1.0e-4\nblock_size: 32\n"
    )
    out = tmp_path / "ft"
    args = [a for a in tiny_train_args(small_files, out) if a not in ("--preset", "tiny")]
    args = args[: args.index("--block_size")] + args[args.index("--block_size") + 2 :]
    proc = run_script("train.py", config, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["kind"] == "pretrained" and results["model"]["base_model"] == str(
        tiny_checkpoint
    )
    assert results["block_size"] == 32
    assert ModelCard.load(out / "README.md").data.base_model == str(
        tiny_checkpoint
    )  # fine-tuned: names its base
    state = json.loads((out / "trainer_state.json").read_text())
    assert (
        state["log_history"][0]["learning_rate"] < 1e-4 + 1e-12
    )  # the file's learning rate, warmed up


def call_train(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main)
    return exit_info.value.code


def _case(name, tmp_path, small_files, tiny_checkpoint):
    t = str(small_files["train"])
    empty = tmp_path / "empty.raw"
    empty.write_text("")
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    return {
        "missing_file": (["--train_file", tmp_path / "nope.raw"], "--train_file"),
        "unsupported_extension": (["--train_file", tmp_path / "notes.docx"], "--train_file"),
        "empty_file": (["--train_file", t, "--validation_file", empty], "--validation_file"),
        "block_size_zero": (["--train_file", t, "--block_size", 0], "--block_size"),
        "block_size_too_big": (["--train_file", t, "--block_size", 257], "--block_size"),
        "unknown_preset": (["--train_file", t, "--preset", "gpt5"], "--preset"),
        "unknown_override": (
            ["--train_file", t, "--config_overrides", "n_layers=2"],
            "--config_overrides",
        ),
        "ill_typed_override": (
            ["--train_file", t, "--config_overrides", "n_layer=two"],
            "--config_overrides",
        ),
        "overrides_with_checkpoint": (
            [
                "--train_file",
                t,
                "--model_name_or_path",
                tiny_checkpoint,
                "--config_overrides",
                "n_layer=2",
            ],
            "--config_overrides",
        ),
        "dataset_dir_lacking_train": (["--dataset_dir", WT2], "--dataset_dir"),
        "offline_hub_dataset": ([], "--dataset_name"),
        "unknown_config_key": (["--train_file", t], "learning_rat"),
    }[name]


CASES = [
    "missing_file",
    "unsupported_extension",
    "empty_file",
    "block_size_zero",
    "block_size_too_big",
    "unknown_preset",
    "unknown_override",
    "ill_typed_override",
    "overrides_with_checkpoint",
    "dataset_dir_lacking_train",
    "offline_hub_dataset",
    "unknown_config_key",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_one_error_line_exit_2_nothing_written(
    name, tmp_path, small_files, tiny_checkpoint, monkeypatch, capsys
):
    argv, flag = _case(name, tmp_path, small_files, tiny_checkpoint)
    out = tmp_path / "out"
    base = ["--tokenizer_name", TOKENIZER_DIR, "--output_dir", out]
    if "--model_name_or_path" not in argv and "--preset" not in argv:
        base += ["--preset", "tiny"]
    prefix = [tmp_path / "bad.yaml"] if name == "unknown_config_key" else []
    code = call_train([*prefix, *argv, *base], monkeypatch)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and flag in errors[0], errors
    assert not out.exists()


def test_offline_default_tokenizer_names_the_local_flag(tmp_path, monkeypatch, capsys):
    code = call_train(["--preset", "tiny", "--output_dir", tmp_path / "o"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "error: --tokenizer_name 'gpt2' is not a local path and could not be fetched "
        "(HF_HUB_OFFLINE=1 is set" in err
    )
    assert "pass --tokenizer_name DIR" in err and "Traceback" not in err


def test_non_empty_output_dir_is_not_overwritten(tmp_path, small_files, monkeypatch, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    code = call_train(tiny_train_args(small_files, out), monkeypatch)
    assert code == 2
    assert "error: --output_dir" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "precious"


def test_validation_that_is_test_is_reported_as_such(micro_files, tmp_path, monkeypatch, caplog):
    """Nothing chooses with it (no early stopping, no calibration): the run goes on and says so
    once."""
    argv = micro_args(
        micro_files, tmp_path / "out", "--test_file", micro_files["validation"], max_steps=2
    )
    with caplog.at_level(logging.WARNING, logger="wikigpt.train"):
        assert train_in_process(argv, monkeypatch) == 0
    lines = [r.getMessage() for r in caplog.records if "is the test split" in r.getMessage()]
    assert lines == [
        "--validation_file is the test split (it is --test_file's text): its perplexity is test "
        "perplexity, and it chose nothing in this run"
    ]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rare_tokens_below", "2"], "--rare_tokens_below"),
        (
            ["--optim_matrices", "muon", "--calibrate_temperature", "true"],
            "--optim_matrices muon, --calibrate_temperature",
        ),
    ],
)
def test_levers_are_refused_under_fsdp_before_anything_is_built(
    flags, named, micro_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(
        "ACCELERATE_USE_FSDP", "true"
    )  # what `accelerate launch` with an FSDP config sets
    out = tmp_path / "out"
    assert train_in_process(micro_args(micro_files, out, *flags), monkeypatch) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {named} cannot train under FSDP (it reads or rewrites whole weights); use DDP "
        f"(accelerate_config.yaml) or one process, or drop {named}"
    ]
    assert not out.exists()
