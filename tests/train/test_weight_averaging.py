"""--ema_decay / --swa_start (wikigpt/train/weight_averaging.py): the saved model is the average of
the raw weights, the raw weights train exactly as without averaging, and a resumed run ends with the
same average.

The reference average is computed here by hand from the raw weights a run WITHOUT averaging saved at
every step (its checkpoint-k/model.safetensors), not with torch.optim.swa_utils.
"""

import json
import shutil

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file

DECAY = 0.5  # far from 1 so that every step visibly moves the average
STEPS = 3


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory, micro_files):
    """Three steps without averaging, a checkpoint (the raw weights) after each."""
    out = tmp_path_factory.mktemp("raw") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        argv = micro_args(micro_files, out, "--save_total_limit", 10, max_steps=STEPS, save_steps=1)
        assert train_in_process(argv, monkeypatch) == 0
    return out


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_ema_model_is_the_average_of_the_raw_steps(tmp_path, micro_files, raw_run, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(
        micro_files,
        out,
        "--save_total_limit",
        10,
        "--ema_decay",
        DECAY,
        max_steps=STEPS,
        save_steps=1,
    )
    assert train_in_process(argv, monkeypatch) == 0

    raw = [weights(raw_run / f"checkpoint-{k}") for k in range(1, STEPS + 1)]
    expected = dict(
        raw[0]
    )  # W_1 starts the average, then W_k: ema = decay * ema + (1 - decay) * W_k
    for step in raw[1:]:
        expected = {name: DECAY * expected[name] + (1 - DECAY) * step[name] for name in expected}
    assert not close(expected, raw[-1])  # the average is not the last step's weights
    assert close(weights(out), expected)  # the final model
    assert close(
        weights(out / f"checkpoint-{STEPS}"), expected
    )  # the checkpoint holds the average too
    # Training went on from the raw weights: the run's raw weights are the run-without-averaging's.
    saved_raw = load_file(out / f"checkpoint-{STEPS}" / "raw_weights.safetensors")
    assert all(torch.equal(saved_raw[name], raw[-1][name]) for name in saved_raw if name in raw[-1])


def test_resumed_ema_run_ends_with_the_same_average(tmp_path, micro_files, monkeypatch):
    extra = (
        "--save_total_limit",
        10,
        "--ema_decay",
        DECAY,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        2,
    )
    full = tmp_path / "full"
    assert (
        train_in_process(
            micro_args(micro_files, full, *extra, max_steps=6, save_steps=2), monkeypatch
        )
        == 0
    )
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    argv = micro_args(
        micro_files,
        resumed,
        *extra,
        "--resume_from_checkpoint",
        "latest",
        max_steps=6,
        save_steps=2,
    )
    assert train_in_process(argv, monkeypatch) == 0
    assert close(weights(resumed), weights(full))
    # Evaluations during training (of the average) agree too, and the last one is the final model's.
    evals = [
        json.loads((out / "trainer_state.json").read_text())["log_history"]
        for out in (full, resumed)
    ]
    losses = [{e["step"]: e["eval_loss"] for e in log if "eval_loss" in e} for log in evals]
    assert losses[0][6] == pytest.approx(losses[1][6], abs=1e-6)
    results = json.loads((full / "results.json").read_text())
    assert results["validation"]["eval_loss"] == pytest.approx(losses[0][6], abs=1e-6)


def test_swa_averages_only_the_last_steps(tmp_path, micro_files, raw_run, monkeypatch):
    out = tmp_path / "run"
    # --swa_start 0.5 of 3 steps: steps 2 and 3 are averaged uniformly.
    argv = micro_args(micro_files, out, "--swa_start", 0.5, max_steps=STEPS, save_steps=STEPS)
    assert train_in_process(argv, monkeypatch) == 0
    raw = [weights(raw_run / f"checkpoint-{k}") for k in (2, 3)]
    assert close(weights(out), {name: (raw[0][name] + raw[1][name]) / 2 for name in raw[0]})


def test_the_average_leaves_a_teacher_out_of_its_copy():
    """A --distill_from teacher rides on the model; the averaged copy holds the student alone,
    once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from wikigpt.train.weight_averaging import WeightAveragingCallback

    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=16, vocab_size=32)
    student, teacher = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    object.__setattr__(student, "_teacher", teacher)
    callback = WeightAveragingCallback(ema_decay=0.9)
    callback.on_train_begin(None, None, None, model=student)
    assert student._teacher is teacher  # the student still trains against it
    assert "_teacher" not in callback.averaged.module.__dict__
    assert sum(p.numel() for p in callback.averaged.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
