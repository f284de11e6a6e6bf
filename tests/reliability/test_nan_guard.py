"""wikigpt/reliability/nan_guard.py: the first NaN/inf stops training with one line; no checkpoint
of broken weights is saved."""

import functools
import math
import os
from types import SimpleNamespace

import pytest
import torch

# micro_files is a fixture
from runs import make_checkpoint, micro_args, micro_files, train_in_process  # noqa: F401
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from wikigpt.errors import UsageError
from wikigpt.reliability.nan_guard import (
    EXIT_DIVERGED,
    NonFiniteGuard,
    TrainingDiverged,
    check_nan_guard_args,
)


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def all_finite(checkpoint) -> bool:
    return all(
        torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values()
    )


def test_huge_learning_rate_stops_before_saving_nan_weights(
    tmp_path, micro_files, monkeypatch, capsys
):
    out = tmp_path / "run"
    code = train_in_process(
        micro_args(micro_files, out, "--learning_rate", 1e38, max_steps=6, save_steps=1),
        monkeypatch,
    )
    errors = error_lines(capsys)
    assert code == EXIT_DIVERGED and len(errors) == 1, errors
    # Step 1 is warmup (lr 0); step 2's update at lr 1e38 overflows the weights.
    assert errors[0] == (
        "error: the weights became NaN/inf at step 2; training stopped and nothing from that step "
        "was saved. Likely cause: a too high --learning_rate (now 1e+38): lower it, or raise "
        "--warmup_steps; keep --max_grad_norm at 1.0 (now 1.0). The last good checkpoint, "
        f"{out / 'checkpoint-1'}, is kept (resume with --resume_from_checkpoint "
        f"{out / 'checkpoint-1'} after the fix)"
    )
    assert sorted(os.listdir(out)) == ["checkpoint-1"] and all_finite(out / "checkpoint-1")
    # Nothing after the last good step: no final model or results that would pass for a trained one.
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_weights_between_saves_are_caught_by_the_next_loss(
    tmp_path, micro_files, monkeypatch, capsys
):
    """The weights are read only before a save/evaluation/the end; in between, the next step's loss
    shows the NaN."""
    out = tmp_path / "run"
    code = train_in_process(
        micro_args(micro_files, out, "--learning_rate", 1e38, max_steps=6, save_steps=4),
        monkeypatch,
    )
    errors = error_lines(capsys)
    assert code == EXIT_DIVERGED and len(errors) == 1, errors
    # Step 2 overflows the weights (not a save step: not read); step 3's forward on them gives a NaN
    # loss.
    assert errors[0].startswith(
        "error: the training loss became NaN/inf at step 3; training stopped"
    ), errors[0]
    assert errors[0].endswith("No checkpoint had been saved before it.")
    assert not out.exists() or os.listdir(out) == []


def test_weights_broken_by_the_last_step_are_not_saved(tmp_path, micro_files, monkeypatch, capsys):
    out = tmp_path / "run"
    code = train_in_process(
        micro_args(micro_files, out, "--learning_rate", 1e38, "--save_strategy", "no", max_steps=2),
        monkeypatch,
    )
    errors = error_lines(capsys)
    assert code == EXIT_DIVERGED and len(errors) == 1, errors
    assert errors[0].startswith("error: the weights became NaN/inf at step 2; training stopped"), (
        errors[0]
    )
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_nan_loss_at_a_known_step(tmp_path, micro_files, monkeypatch, capsys):
    """A NaN training loss at step 3 (injected into the model's forward): checkpoints 1-2 stay, all
    finite."""
    forward = GPT2LMHeadModel.forward
    calls = {"train": 0}

    @functools.wraps(forward)  # the Trainer reads forward's signature to pick dataset columns
    def forward_with_nan_at_step_3(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 3:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(GPT2LMHeadModel, "forward", forward_with_nan_at_step_3)
    out = tmp_path / "run"
    code = train_in_process(micro_args(micro_files, out, max_steps=6, save_steps=1), monkeypatch)
    errors = error_lines(capsys)
    assert code == EXIT_DIVERGED and len(errors) == 1
    assert errors[0].startswith(
        "error: the training loss became NaN/inf at step 3; training stopped"
    )
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
    assert all_finite(out / "checkpoint-1") and all_finite(out / "checkpoint-2")


def test_fp16_message_points_to_bf16(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-40", 40)
    guard = NonFiniteGuard()
    guard.bad_step, guard.what = 41, "the training loss"
    args = SimpleNamespace(
        fp16=True, learning_rate=6e-4, max_grad_norm=1.0, output_dir=str(tmp_path)
    )
    with pytest.raises(TrainingDiverged) as err:
        guard.raise_if_diverged(args)
    assert str(err.value) == (
        "the training loss became NaN/inf at step 41; training stopped and nothing from that step "
        "was saved. Likely cause: fp16 overflow (fp16 tops out at 65504): use --bf16 instead of "
        "--fp16, or lower --learning_rate (now 0.0006). The last good checkpoint, "
        f"{tmp_path / 'checkpoint-40'}, is kept (resume with --resume_from_checkpoint "
        f"{tmp_path / 'checkpoint-40'} after the fix)"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(learning_rate=-1.0), "--learning_rate must be a positive number; got -1.0"),
        (dict(learning_rate=math.nan), "--learning_rate must be a positive number; got nan"),
        (dict(max_grad_norm=-1.0), "--max_grad_norm must be >= 0"),
    ],
)
def test_numeric_flags_out_of_range(change, message):
    args = SimpleNamespace(
        **{**dict(learning_rate=6e-4, max_grad_norm=1.0, fp16=False, bf16=False), **change}
    )
    with pytest.raises(UsageError, match=message):
        check_nan_guard_args(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_on_cpu_is_refused():
    args = SimpleNamespace(
        learning_rate=6e-4, max_grad_norm=1.0, fp16=True, bf16=False, device=torch.device("cpu")
    )
    with pytest.raises(UsageError, match=r"--fp16 needs a GPU: on CPU accelerate applies neither"):
        check_nan_guard_args(args)
