"""Schedules that end where training ends: warmup_stable_decay with a fractional decay, and
--max_train_minutes."""

import json

import pytest
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

from wikigpt.train import time_budget

PEAK = 1e-3


def logged_learning_rates(out) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}


def test_warmup_stable_decay_with_a_fraction_of_the_steps(tmp_path, micro_files, monkeypatch):
    out = tmp_path / "run"
    kwargs = json.dumps(
        {"num_decay_steps": 0.4, "decay_type": "linear"}
    )  # 0.4 of 10 steps: the last 4
    argv = micro_args(
        micro_files,
        out,
        "--learning_rate",
        PEAK,
        "--warmup_steps",
        2,
        "--lr_scheduler_type",
        "warmup_stable_decay",
        "--lr_scheduler_kwargs",
        kwargs,
        max_steps=10,
        save_steps=10,
    )
    assert train_in_process(argv, monkeypatch) == 0
    # The learning rate each step used: 2 warmup steps from 0, 4 stable, then linear decay over 4
    # towards 0.
    expected = [0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    lrs = logged_learning_rates(out)
    assert [lrs[step] / PEAK for step in range(1, 11)] == pytest.approx(expected, abs=1e-9)


def step_clock():
    """A clock that advances one second each time the budget reads it (once per step): timing-free
    tests."""
    ticks = iter(range(1_000_000))
    return lambda: float(next(ticks))


def test_time_budget_stops_saves_evaluates_and_ends_the_schedule(
    tmp_path, micro_files, monkeypatch, caplog
):
    out = tmp_path / "run"
    minutes = 0.5  # 30 ticks of the step clock: 30 steps
    monkeypatch.setattr(time_budget, "clock", step_clock())
    # Planned for 100,000 steps (a cosine with 5% warmup); the budget fits a few dozen.
    argv = micro_args(
        micro_files,
        out,
        "--learning_rate",
        PEAK,
        "--max_train_minutes",
        minutes,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        100_000,
        max_steps=100_000,
        save_steps=100_000,
    )
    with caplog.at_level("INFO"):
        assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    steps = results["train"]["global_step"]
    budget = results["time_budget"]
    assert steps == 30
    assert (
        budget["stopped_by_budget"]
        and budget["message"] == "stopped by --max_train_minutes 0.5 after 30 steps"
    )
    assert "stopped by --max_train_minutes 0.5 after 30 steps" in caplog.text
    assert budget["minutes_spent"] == minutes
    assert (out / f"checkpoint-{steps}" / "model.safetensors").exists() and (
        out / "model.safetensors"
    ).exists()
    assert results["validation"]["eval_perplexity"] > 1  # the final model was evaluated
    state = json.loads((out / "trainer_state.json").read_text())
    assert any(
        e.get("step") == steps and "eval_loss" in e for e in state["log_history"]
    )  # evaluated at the stop
    # The schedule was planned for the budget: the warmup (5% of the run) reached the peak and the
    # cosine reached its end at the last step (a 100,000-step cosine would still be warming up, at
    # ~0.0003 of the peak).
    lrs = logged_learning_rates(out)
    assert max(lrs.values()) > 0.95 * PEAK
    assert all(lrs[s + 1] < lrs[s] for s in range(6, 30))  # decaying from the peak to the end
    assert lrs[30] < 0.01 * PEAK
    assert budget["final_learning_rate"] == 0.0


def test_budget_longer_than_the_run_changes_nothing(tmp_path, micro_files, monkeypatch):
    reference, budgeted = tmp_path / "reference", tmp_path / "budgeted"
    assert (
        train_in_process(micro_args(micro_files, reference, max_steps=4, save_steps=4), monkeypatch)
        == 0
    )
    argv = micro_args(micro_files, budgeted, "--max_train_minutes", 60, max_steps=4, save_steps=4)
    assert train_in_process(argv, monkeypatch) == 0
    assert logged_learning_rates(budgeted) == logged_learning_rates(reference)
    budget = json.loads((budgeted / "results.json").read_text())["time_budget"]
    assert not budget["stopped_by_budget"] and budget["message"].startswith(
        "finished its 4 steps within"
    )


def test_reaching_the_plan_ends_the_run_by_the_budget(monkeypatch):
    """A fast last step must not re-plan one more step after the Trainer stopped at the planned
    one."""
    import torch
    from transformers import TrainerControl, TrainerState

    times = iter([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9.2])  # start, then steps 1-10; step 10 is fast
    monkeypatch.setattr(time_budget, "clock", lambda: next(times))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 100)
    callback, state = (
        time_budget.TimeBudgetCallback(10.5 / 60),
        TrainerState(max_steps=100, global_step=0),
    )
    args = type("Args", (), {"eval_strategy": "no", "save_strategy": "no"})()
    callback.on_train_begin(
        args, state, TrainerControl(), lr_scheduler=scheduler, optimizer=optimizer
    )
    for step in range(1, 11):
        state.global_step, control = step, TrainerControl()
        control.should_training_stop = (
            step >= state.max_steps
        )  # as the Trainer's DefaultFlowCallback does first
        callback.on_step_end(args, state, control)
        if control.should_training_stop:
            break
    assert (state.global_step, state.max_steps, callback.stopped_by_budget) == (10, 10, True)


def test_a_run_stopped_before_its_plan_says_so(monkeypatch):
    """Early stopping ending a budgeted run is not "finished within" the budget."""
    import torch
    from transformers import TrainerControl, TrainerState

    times = iter([0.0, 1, 2, 3, 4, 5, 5.5])  # start, steps 1-5, the end of training
    monkeypatch.setattr(time_budget, "clock", lambda: next(times))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 100)
    callback, state = (
        time_budget.TimeBudgetCallback(10.5 / 60),
        TrainerState(max_steps=100, global_step=0),
    )
    args = type("Args", (), {"eval_strategy": "no", "save_strategy": "no"})()
    callback.on_train_begin(
        args, state, TrainerControl(), lr_scheduler=scheduler, optimizer=optimizer
    )
    for step in range(1, 6):
        state.global_step = step
        callback.on_step_end(args, state, TrainerControl())
    callback.on_train_end(args, state, TrainerControl())  # early stopping ended training at step 5
    summary = callback.summary(5)["time_budget"]
    assert not summary["stopped_by_budget"] and summary["planned_steps"] == 10
    assert summary["message"] == (
        "ended after 5 of the 10 steps planned for --max_train_minutes 0.175, stopped "
        "before the budget (e.g. by early stopping)"
    )
