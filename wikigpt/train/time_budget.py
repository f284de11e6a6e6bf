"""--max_train_minutes M: plan the learning-rate schedule for the steps that fit in M minutes, then
stop there.

The Trainer builds its schedule (cosine, linear, warmup_stable_decay, ...) for its own horizon
H = the steps of --num_train_epochs / --max_steps. This callback measures the wall time per
optimizer step (after WARM_STEPS, which pay for compilation and allocator warm-up) and after every
step re-plans the run's total T = the steps done + the steps the remaining minutes hold at the
average pace so far (never more than H). The schedule is run on a stretched clock: the learning rate
at step s is the Trainer's schedule at step s * H // T, so warmup, stable phase and decay keep their
shares of the run, and the decay reaches its end exactly at step T. At step T training stops through
the Trainer's own flow (state.max_steps = T): the final checkpoint is saved and evaluated as at the
end of any run, and results.json says "stopped by --max_train_minutes after N steps".

What counts against the budget: the wall time inside trainer.train() — optimizer steps, data
loading, the evaluations and checkpoints during training (their cost is part of the measured pace).
Not counted: loading and tokenizing the data before training, and the final save and validation/test
evaluation after it.

Resuming: each checkpoint gets BUDGET_FILE with the minutes spent and H; a resumed run continues the
same budget. The planned total depends on the measured speed, so two runs need not stop at the same
step; results.json records the step, and `--max_steps N` without a budget replays the same schedule.
"""

import json
import logging
import os
import time

from transformers import TrainerCallback

from wikigpt.reliability.checkpoints import WritesIntoCheckpoints
from wikigpt.errors import UsageError

logger = logging.getLogger(__name__)

BUDGET_FILE = "time_budget.json"  # in each checkpoint-N
UNPLANNED_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # driven by metrics, not by the step
WARM_STEPS = 3  # steps not timed: the first ones pay for compilation and warm-up
clock = time.monotonic  # seconds; read once per callback event (tests replace it with a step clock)


def check_time_budget_args(args) -> None:
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        raise UsageError(
            "--max_train_minutes must be a positive number of minutes; got "
            f"{args.max_train_minutes}"
        )
    schedule = str(args.lr_scheduler_type).split(".")[-1].lower()
    if args.max_train_minutes is not None and schedule in UNPLANNED_SCHEDULES:
        raise UsageError(
            f"--max_train_minutes plans a step schedule for the budget, which --lr_scheduler_type "
            f"{schedule} is not; pass e.g. --lr_scheduler_type cosine or warmup_stable_decay"
        )


class TimeBudgetCallback(WritesIntoCheckpoints, TrainerCallback):
    def __init__(self, minutes: float, resume_from_checkpoint: str | None = None):
        self.budget_s = minutes * 60
        self.minutes, self.resume_from = minutes, resume_from_checkpoint
        self.spent_before_s = 0.0  # minutes already spent by the run this one resumes
        self.horizon = self.planned = None
        self.stopped_by_budget = False

    def spent_s(self, now: float) -> float:
        return self.spent_before_s + now - self.start

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        self.start = clock()
        self.horizon = self.planned = state.max_steps
        if self.resume_from:
            path = os.path.join(self.resume_from, BUDGET_FILE)
            if not os.path.isfile(path):
                raise UsageError(
                    f"--resume_from_checkpoint {self.resume_from!r} has no {BUDGET_FILE} (it was "
                    "saved without --max_train_minutes); resume it without --max_train_minutes"
                )
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            self.spent_before_s, self.horizon = saved["spent_s"], saved["horizon_steps"]
        self.first_step = state.global_step
        self.mark = None  # (time, step) where timing starts
        self.scheduler, self.optimizer = lr_scheduler, optimizer
        # The schedule's clock: step s of the planned run is step s * H // T of the schedule the
        # Trainer built. Plain functions: LambdaLR's state_dict saves no state for them (the plan
        # lives in BUDGET_FILE).
        for i, schedule in enumerate(lr_scheduler.lr_lambdas):
            lr_scheduler.lr_lambdas[i] = self._stretched(schedule)
        logger.info(
            "time budget: %.1f minutes for at most %d steps%s",
            self.minutes,
            self.horizon,
            f" ({self.spent_before_s / 60:.1f} already spent)" if self.spent_before_s else "",
        )

    def _stretched(self, schedule):
        def stretched(step):
            return schedule(step * self.horizon // self.planned)

        return stretched

    def on_step_end(self, args, state, control, **kwargs):
        now = clock()
        now_spent = self.spent_s(now)
        step = state.global_step
        if step - self.first_step == WARM_STEPS:
            self.mark = (now, step)
        planned = self.planned
        if now_spent >= self.budget_s or step >= self.planned < self.horizon:
            # Out of time, or at the end of the last plan: the Trainer stops there
            # (state.max_steps), and a faster last step must not move the plan on by a step the run
            # will not take.
            planned = step
        elif self.mark is not None and step > self.mark[1]:
            pace = (now - self.mark[0]) / (step - self.mark[1])
            planned = min(self.horizon, step + int((self.budget_s - now_spent) / pace))
        if planned != self.planned:
            self.planned = state.max_steps = max(planned, step)
            # The learning rate of the next step was computed on the old plan: recompute it on the
            # new one.
            for group, schedule in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                group["lr"] = group["initial_lr"] * schedule(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if step >= self.planned and self.planned < self.horizon:
            self.stopped_by_budget = True
            control.should_training_stop = True
            # End as a finished run ends: evaluated (early stopping compares it too) and saved.
            control.should_evaluate = control.should_evaluate or args.eval_strategy != "no"
            control.should_save = control.should_save or args.save_strategy != "no"
            self.spent_at_stop_s = now_spent
            logger.info(
                "stopped by --max_train_minutes %g after %d steps (%.2f minutes of training)",
                self.minutes,
                step,
                now_spent / 60,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if not self.stopped_by_budget:
            self.spent_at_stop_s = self.spent_s(clock())

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            with open(
                os.path.join(self.checkpoint_folder(args, state), BUDGET_FILE),
                "w",
                encoding="utf-8",
            ) as f:
                json.dump({"spent_s": self.spent_s(clock()), "horizon_steps": self.horizon}, f)

    def summary(self, global_step: int) -> dict:
        """What results.json records."""
        return {
            "time_budget": {
                "max_train_minutes": self.minutes,
                "planned_steps": self.planned,
                "schedule_horizon_steps": self.horizon,
                "stopped_by_budget": self.stopped_by_budget,
                "minutes_spent": round(self.spent_at_stop_s / 60, 3),
                "final_learning_rate": self.optimizer.param_groups[0]["lr"],
                "message": self.message(global_step),
            }
        }

    def message(self, global_step: int) -> str:
        if self.stopped_by_budget:
            return f"stopped by --max_train_minutes {self.minutes:g} after {global_step} steps"
        if (
            global_step < self.planned
        ):  # early stopping (or another callback) ended it before the plan did
            return (
                f"ended after {global_step} of the {self.planned} steps planned for "
                f"--max_train_minutes {self.minutes:g}, stopped before the budget (e.g. by early "
                "stopping)"
            )
        return f"finished its {global_step} steps within --max_train_minutes {self.minutes:g}"


def time_budget_callbacks(args, resume_from_checkpoint: str | None) -> list:
    """[TimeBudgetCallback] when --max_train_minutes is given, else []."""
    if args.max_train_minutes is None:
        return []
    return [TimeBudgetCallback(args.max_train_minutes, resume_from_checkpoint)]
