"""Early stopping and best-checkpoint selection from the command line
(wikigpt/train/early_stopping.py)."""

import json
import logging

import pytest
import torch
from conftest import WT2, write_lines
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from wikigpt.cli import parse_args
from wikigpt.errors import UsageError
from wikigpt.train.arguments import WikiTrainingArguments


def _every_2_steps(*extra):
    return [
        "--eval_strategy",
        "steps",
        "--eval_steps",
        2,
        "--save_strategy",
        "steps",
        "--save_steps",
        2,
        *extra,
    ]


def test_stops_after_patience_evaluations_and_ends_with_the_best_checkpoint(
    micro_files, tmp_path, monkeypatch
):
    # Validation perplexity falls every evaluation on this run, so to get a best checkpoint that is
    # not the last one the test ranks by *higher* perplexity: step 2 is the best, steps 4 and 6 fail
    # to improve -> stop at 6.
    out = tmp_path / "run"
    argv = micro_args(micro_files, out, max_steps=20) + _every_2_steps(
        "--early_stopping_patience",
        2,
        "--metric_for_best_model",
        "perplexity",
        "--greater_is_better",
        "true",
        "--save_total_limit",
        1,
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    best = results["best_model"]
    assert best["stopped_at_step"] == 6 and best["stopped_early"] and best["max_steps"] == 20
    assert best["best_global_step"] == 2 and best["best_checkpoint"].endswith("checkpoint-2")
    assert results["train"]["global_step"] == 6
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e["eval_perplexity"] for e in log if "eval_perplexity" in e]
    assert (
        len(evals) == 3 and evals[0] > evals[1] > evals[2]
    )  # the premise: perplexity kept falling
    assert best["best_metric"] == pytest.approx(evals[0])
    # The saved model is the best checkpoint's weights, and the final validation numbers are its
    # numbers.
    final, kept = (
        load_file(out / "model.safetensors"),
        load_file(out / "checkpoint-2" / "model.safetensors"),
    )
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert results["validation"]["eval_perplexity"] == pytest.approx(evals[0], rel=1e-6)


def test_threshold_counts_only_large_improvements(micro_files, tmp_path, monkeypatch):
    # No improvement is larger than 1e9 perplexity: the first evaluation sets the best, two more end
    # the run. The run also reports a test split: its evaluation must not reach
    # EarlyStoppingCallback, which would warn that it "did not find eval_perplexity" (and count the
    # final validation evaluation as one more patience step).
    out = tmp_path / "run"
    test = write_lines(
        tmp_path / "test.raw", WT2 / "wiki.test.raw", 40, 60
    )  # apart from validation
    argv = micro_args(micro_files, out, max_steps=20) + _every_2_steps(
        "--early_stopping_patience", 2, "--early_stopping_threshold", 1e9, "--test_file", test
    )
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert train_in_process(argv, monkeypatch) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    results = json.loads((out / "results.json").read_text())
    best = results["best_model"]
    assert (
        best["stopped_at_step"] == 6
        and best["metric"] == "perplexity"
        and best["greater_is_better"] is False
    )
    assert best["best_global_step"] == 6  # lower perplexity is still the better checkpoint
    assert (
        results["test"]["test_blocks"] == results["data"]["test"]["blocks"] > 0
    )  # the test split was scored
    assert [w for w in warnings if "early stopping" in w] == []


@pytest.mark.parametrize(
    "argv, greater_is_better",
    [
        (["--load_best_model_at_end", "--metric_for_best_model", "perplexity"], False),
        (["--early_stopping_patience", "2", "--metric_for_best_model", "perplexity"], False),
        (["--early_stopping_patience", "2", "--metric_for_best_model", "eval_perplexity"], False),
        (["--early_stopping_patience", "2", "--metric_for_best_model", "token_loss"], False),
        (
            [
                "--early_stopping_patience",
                "2",
                "--metric_for_best_model",
                "perplexity",
                "--greater_is_better",
                "true",
            ],
            True,
        ),
    ],
)
def test_a_named_perplexity_or_loss_keeps_the_lowest(argv, greater_is_better, tmp_path):
    (args,) = parse_args(
        (WikiTrainingArguments,), ["--output_dir", str(tmp_path), "--report_to", "none", *argv]
    )
    assert args.greater_is_better is greater_is_better
    # The Trainer's own choice of the best checkpoint over three validation perplexities.
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=16)
    )
    trainer = Trainer(
        model=model, args=args, eval_dataset=[{"input_ids": torch.zeros(4, dtype=torch.long)}]
    )
    for step, perplexity in ((2, 30.0), (4, 20.0), (6, 25.0)):
        trainer.state.global_step = step
        trainer._determine_best_metric(
            {"eval_perplexity": perplexity, "eval_token_loss": perplexity / 10}, None
        )
    assert trainer.state.best_global_step == (2 if greater_is_better else 4)


def test_flags_turn_on_the_trainers_best_model_machinery():
    (args,) = parse_args((WikiTrainingArguments,), ["--early_stopping_patience", "3"])
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (
        True,
        "perplexity",
        False,
    )
    assert (
        args.restore_callback_states_from_checkpoint
    )  # the patience counter survives --resume_from_checkpoint
    (args,) = parse_args(
        (WikiTrainingArguments,),
        ["--early_stopping_patience", "3", "--metric_for_best_model", "loss"],
    )
    assert (args.metric_for_best_model, args.greater_is_better) == ("loss", False)
    (args,) = parse_args((WikiTrainingArguments,), [])
    assert not args.load_best_model_at_end and args.early_stopping_patience is None


BAD_FLAGS = [
    (
        ["--early_stopping_threshold", "0.5"],
        "--early_stopping_threshold 0.5 has no effect without --early_stopping_patience; pass "
        "--early_stopping_patience N, or drop --early_stopping_threshold",
    ),
    (
        ["--early_stopping_patience", "0"],
        "--early_stopping_patience must be at least 1 (evaluations without improvement before "
        "stopping); got 0",
    ),
    (
        ["--early_stopping_patience", "2", "--early_stopping_threshold", "-1"],
        "--early_stopping_threshold must be 0 or more (the smallest improvement that counts); got "
        "-1.0",
    ),
    (
        ["--early_stopping_patience", "2", "--eval_strategy", "no"],
        "--early_stopping_patience needs validation evaluations to compare: pass --eval_strategy "
        "epoch (or --eval_strategy steps --eval_steps N), or drop --early_stopping_patience",
    ),
    (
        ["--early_stopping_patience", "2", "--save_strategy", "no"],
        "--early_stopping_patience keeps the best checkpoint, so it needs checkpoints: pass "
        "--save_strategy epoch (as --eval_strategy), or drop --early_stopping_patience",
    ),
    (
        ["--early_stopping_patience", "2", "--eval_strategy", "steps", "--eval_steps", "50"],
        "--early_stopping_patience needs --save_strategy equal to --eval_strategy (now epoch and "
        "steps) so every evaluation has a checkpoint to return to: pass --save_strategy steps",
    ),
    (
        [
            "--early_stopping_patience",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "50",
            "--save_strategy",
            "steps",
            "--save_steps",
            "100",
        ],
        "--early_stopping_patience with --eval_strategy steps needs --save_steps equal to "
        "--eval_steps (now 100 and 50): pass --save_steps 50",
    ),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_inconsistent_flags_are_refused_before_training(argv, message):
    with pytest.raises(UsageError) as err:
        parse_args((WikiTrainingArguments,), argv)
    assert str(err.value) == message


def test_refused_by_train_py_with_nothing_written(micro_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = micro_args(micro_files, out) + [
        "--early_stopping_patience",
        2,
    ]  # micro_args evaluates never
    assert train_in_process(argv, monkeypatch) == 2
    assert (
        "error: --early_stopping_patience needs validation evaluations to compare"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_resume_keeps_counting_patience(micro_files, tmp_path, monkeypatch):
    # As in the first test, higher perplexity ranks best, so every evaluation after step 2 counts
    # against patience. Run 1 stops at max_steps 4 with one miss counted; resumed with room for 20
    # steps, the second miss (step 6) ends it. Counting from 0 again would run to step 8.
    out = tmp_path / "run"
    flags = _every_2_steps(
        "--early_stopping_patience",
        2,
        "--metric_for_best_model",
        "perplexity",
        "--greater_is_better",
        "true",
    )
    assert train_in_process(micro_args(micro_files, out, max_steps=4) + flags, monkeypatch) == 0
    argv = (
        micro_args(micro_files, out, max_steps=20)
        + flags
        + ["--resume_from_checkpoint", out / "checkpoint-4"]
    )
    assert train_in_process(argv, monkeypatch) == 0
    best = json.loads((out / "results.json").read_text())["best_model"]
    assert (best["stopped_at_step"], best["best_global_step"]) == (6, 2)
