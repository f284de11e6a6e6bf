"""train.py --hp_search: a 2-trial search on the tiny preset with micro data (tests/runs.py), its
trials table, progress lines and best recipe. Bad search spaces are rows of
tests/test_bad_input.py."""

import contextlib
import csv
import io
import json
import math
import sys

import pytest
import torch
import yaml
from conftest import REPO, TOKENIZER_DIR

# micro_files is a fixture
from runs import THREADS, micro_args, micro_files, train_in_process  # noqa: F401

import eval as eval_script
from wikigpt.cli import parse_args
from wikigpt.errors import run_main
from wikigpt.train.run import RUN_ARGUMENTS
from wikigpt.train.time_budget import BUDGET_FILE
from wikigpt.train.hp_search import SearchArguments, given_settings, load_search_space
from wikigpt.train.weight_averaging import RAW_WEIGHTS_FILE

SPACE = """\
learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
lr_scheduler_type: {type: categorical, choices: [cosine, linear]}
dropout: {type: float, low: 0.0, high: 0.2}
n_layer: {type: int, low: 1, high: 2}
block_size: {type: categorical, choices: [16, 32]}
train_tokens: {type: int, low: 200, high: 400}
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory, micro_files):
    """One 2-trial search: (output dir, trials table rows, stdout)."""
    tmp = tmp_path_factory.mktemp("search")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    out = tmp / "out"
    # Early stopping on: each trial then ends with its best checkpoint, and needs fresh callbacks.
    argv = micro_args(
        micro_files,
        out,
        "--hp_search",
        2,
        "--hp_space",
        space,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        3,
        "--save_steps",
        3,
        "--early_stopping_patience",
        1,
        "--bf16",
        "false",
    )  # fp32, as eval.py scores: the objectives are compared with its numbers
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        assert train_in_process(argv, monkeypatch) == 0
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, stdout.getvalue()


def validation_perplexity(model_dir, files, block_size, tmp_path, monkeypatch) -> float:
    """eval.py's own `blocks` perplexity of a saved model on the validation file (not the Trainer's
    loop)."""
    report = tmp_path / f"eval-{model_dir.name}.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "eval.py",
            "--model",
            str(model_dir),
            "--split",
            "validation",
            "--validation_file",
            str(files["validation"]),
            "--methods",
            "blocks",
            "--block_size",
            str(block_size),
            "--output_file",
            str(report),
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        run_main(eval_script.main)
    finally:
        torch.set_num_threads(threads)
    return json.loads(report.read_text())["metrics"]["perplexity"]["value"]


def test_every_trial_is_scored_by_the_held_out_perplexity_of_its_own_model(
    search, micro_files, tmp_path, monkeypatch
):
    out, rows, _ = search
    assert [(r["trial"], r["state"], r["run_dir"]) for r in rows] == [
        ("0", "COMPLETE", "run-0"),
        ("1", "COMPLETE", "run-1"),
    ]
    for row in rows:
        objective = float(row["held_out_perplexity"])
        assert math.isfinite(objective)
        measured = validation_perplexity(
            out / row["run_dir"], micro_files, int(row["block_size"]), tmp_path, monkeypatch
        )
        assert measured == pytest.approx(objective, rel=1e-5)


def test_token_budget_sets_the_steps_of_each_trial(search):
    _, rows, _ = search
    for row in rows:
        tokens_per_step = 2 * int(row["block_size"])  # micro_args: 2 blocks per step
        assert int(row["train_steps"]) == math.ceil(int(row["train_tokens"]) / tokens_per_step)
        assert int(row["tokens_trained"]) == int(row["train_steps"]) * tokens_per_step


def test_one_progress_line_per_trial(search):
    _, rows, stdout = search
    lines = [line for line in stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 2
    best = min(float(r["held_out_perplexity"]) for r in rows)
    for line, row in zip(lines, rows):
        assert line.startswith(f"trial {row['trial']} ({int(row['trial']) + 1}/2): learning_rate=")
        assert f"-> held-out perplexity {float(row['held_out_perplexity']):.2f}" in line
        assert f"block_size={row['block_size']}" in line
    assert f"(best {best:.2f}, trial " in lines[-1]


def test_best_recipe_trains_the_best_trial_again(search, tmp_path, monkeypatch):
    out, rows, _ = search
    best = min(rows, key=lambda r: float(r["held_out_perplexity"]))
    recipe = out / "best_recipe.yaml"
    values = yaml.safe_load(recipe.read_text())
    assert "hp_search" not in values and "hp_space" not in values
    model_args, data_args, _, _, training_args, search_args = parse_args(
        (*RUN_ARGUMENTS, SearchArguments), [str(recipe)]
    )
    assert search_args.hp_search is None
    assert training_args.learning_rate == float(best["learning_rate"])
    assert training_args.lr_scheduler_type.value == best["lr_scheduler_type"]
    assert data_args.block_size == int(best["block_size"])
    assert training_args.max_steps == int(best["train_steps"])
    dropout = best["dropout"]
    assert model_args.config_overrides == (
        f"n_embd=16,n_layer={best['n_layer']},resid_pdrop={dropout},"
        f"embd_pdrop={dropout},attn_pdrop={dropout}"
    )
    assert model_args.tokenizer_name == str(TOKENIZER_DIR)
    # The recipe is a ready run: training it gives the best trial's held-out perplexity again.
    again = tmp_path / "again"
    assert train_in_process([recipe, "--output_dir", again], monkeypatch) == 0
    results = json.loads((again / "results.json").read_text())
    assert results["validation"]["eval_perplexity"] == pytest.approx(
        float(best["held_out_perplexity"]), rel=1e-6
    )


def test_trials_save_their_checkpoints_with_a_time_budget_and_weight_averaging(
    micro_files, tmp_path, monkeypatch
):
    # Both callbacks add a file to each checkpoint-N the Trainer saves; in a search that folder is
    # in run-N/.
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    out = tmp_path / "out"
    argv = micro_args(
        micro_files,
        out,
        "--hp_search",
        1,
        "--hp_space",
        space,
        "--max_train_minutes",
        60,
        "--ema_decay",
        0.9,
        max_steps=4,
        save_steps=2,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_in_process(argv, monkeypatch) == 0
    for step in (2, 4):
        checkpoint = out / "run-0" / f"checkpoint-{step}"
        assert json.loads((checkpoint / BUDGET_FILE).read_text())["horizon_steps"] == 4
        assert (checkpoint / RAW_WEIGHTS_FILE).is_file()
    assert not list(out.glob("checkpoint-*"))
    with open(out / "trials.csv", newline="") as f:
        assert [row["state"] for row in csv.DictReader(f)] == ["COMPLETE"]


def test_the_shipped_search_space_fits_the_cpu_recipe():
    recipe, space = (
        REPO / "configs" / "cpu" / "recipe.yaml",
        REPO / "configs" / "search_spaces" / "cpu.yaml",
    )
    model_args, data_args, _, _, training_args, search_args = parse_args(
        (*RUN_ARGUMENTS, SearchArguments),
        [str(recipe), "--hp_search", "8", "--hp_space", str(space)],
    )
    searched = load_search_space(search_args, model_args, data_args, training_args)
    assert searched.params["n_embd"].values() == [
        96,
        128,
        192,
    ]  # each a multiple of the recipe's 4 heads
    assert searched.model_overrides({"dropout": 0.2, "n_layer": 6}) == {
        "n_layer": 6,
        "resid_pdrop": 0.2,
        "embd_pdrop": 0.2,
        "attn_pdrop": 0.2,
    }


def test_a_recipe_records_old_flag_names_under_the_new_ones(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("tie_tokens_below: 5\nlearning_rate: 1.0e-3\n")
    argv = [
        str(config),
        "--tied_input_dropout",
        "0.1",
        "--hp_search",
        "2",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    settings = given_settings(argv, parse_args((*RUN_ARGUMENTS, SearchArguments), argv))
    assert settings == {
        "rare_tokens_below": 5,
        "learning_rate": 1.0e-3,
        "rare_input_dropout": 0.1,
        "output_dir": str(tmp_path / "o"),
    }
