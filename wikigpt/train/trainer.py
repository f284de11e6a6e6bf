"""Learning-rate schedules given by a share of the run: `warmup_stable_decay` with `num_decay_steps`
as a fraction.

transformers' `warmup_stable_decay` (get_wsd_schedule) wants `num_decay_steps` as a step count, but
the number of steps is only known once the Trainer has the data (epochs x batches).
`lr_scheduler_kwargs: {num_decay_steps: 0.2}` here means the last 20% of the steps, as
`--warmup_steps 0.05` means the first 5%: WikiTrainer.create_scheduler turns the fraction into steps
of the run it plans, then builds the Trainer's own scheduler.
"""

from transformers import Trainer

from wikigpt.errors import UsageError

WSD = "warmup_stable_decay"


def check_schedule_args(args) -> None:
    if str(args.lr_scheduler_type).split(".")[-1].lower() != WSD:
        return
    kwargs = args.lr_scheduler_kwargs or {}
    decay = kwargs.get("num_decay_steps") if isinstance(kwargs, dict) else None
    if decay is None:
        raise UsageError(
            "--lr_scheduler_type warmup_stable_decay needs the length of its decay: pass "
            "--lr_scheduler_kwargs '{\"num_decay_steps\": 0.2}' (a fraction of all steps, or a "
            "step count)"
        )
    if (
        isinstance(decay, bool)
        or not isinstance(decay, (int, float))
        or decay <= 0
        or (isinstance(decay, float) and decay > 1)
    ):
        raise UsageError(
            f"--lr_scheduler_kwargs num_decay_steps must be a fraction of the steps in (0, 1] or a "
            f"whole number of steps; got {decay!r}"
        )


def resolve_decay_steps(kwargs: dict | None, num_training_steps: int) -> dict | None:
    """lr_scheduler_kwargs with a fractional num_decay_steps turned into steps (at least 1) of
    num_training_steps."""
    decay = (kwargs or {}).get("num_decay_steps")
    if isinstance(decay, float) and decay <= 1:
        return {**kwargs, "num_decay_steps": max(1, round(decay * num_training_steps))}
    return kwargs


class WikiTrainer(Trainer):
    """The Trainer, with fraction-of-the-run decay lengths in lr_scheduler_kwargs (see the module
    docstring)."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        resolved = resolve_decay_steps(self.args.lr_scheduler_kwargs, num_training_steps)
        if resolved is self.args.lr_scheduler_kwargs or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        given, self.args.lr_scheduler_kwargs = self.args.lr_scheduler_kwargs, resolved
        try:
            return super().create_scheduler(num_training_steps, optimizer)
        finally:
            self.args.lr_scheduler_kwargs = (
                given  # the saved arguments keep the fraction the user gave
            )
