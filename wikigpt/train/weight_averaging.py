"""--ema_decay / --swa_start: evaluate and save an average of the weights, keep training the raw
weights.

torch.optim.swa_utils.AveragedModel keeps the average (EMA through get_ema_multi_avg_fn, one
torch._foreach_lerp_ per step; SWA through its default uniform running mean), updated after every
optimizer step.

Whenever the Trainer is about to evaluate or save a checkpoint (its DefaultFlowCallback has set
should_evaluate or should_save in on_step_end / on_epoch_end), the averaged weights are copied into
the model and the raw ones set aside; they come back at the next on_step_begin. So every evaluation
during training, early stopping's metric, the best checkpoint it reloads, each checkpoint's
model.safetensors, and (from on_train_end on) the final save and the final validation/test
evaluation all see the averaged weights, while the optimizer keeps stepping the raw ones.

Each checkpoint gets RAW_WEIGHTS_FILE: the raw weights and the count of averaged steps. Resuming
loads the checkpoint's model.safetensors (the average) as the average, and RAW_WEIGHTS_FILE into the
model, so a resumed run continues exactly where the uninterrupted one would be.
"""

import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import TrainerCallback

from wikigpt.reliability.checkpoints import WritesIntoCheckpoints
from wikigpt.errors import UsageError

TEACHER_ATTRIBUTE = "_teacher"  # wikigpt.objectives.distillation.attach_teacher

logger = logging.getLogger(__name__)

RAW_WEIGHTS_FILE = (
    "raw_weights.safetensors"  # in each checkpoint-N: the weights training continues from
)
N_AVERAGED = "__n_averaged__"


def check_weight_averaging_args(args) -> None:
    decay, start = args.ema_decay, args.swa_start
    if decay is not None and start is not None:
        raise UsageError(
            f"--ema_decay {decay} and --swa_start {start} are two ways to average the weights; "
            f"pass only one of them"
        )
    if decay is not None and not 0 < decay < 1:
        raise UsageError(
            f"--ema_decay must be between 0 and 1 (e.g. 0.999: an average over ~1,000 steps); "
            f"got {decay}"
        )
    if start is not None and not 0 <= start < 1:
        raise UsageError(
            f"--swa_start is the fraction of the training steps after which weights are averaged, "
            f"in [0, 1) (e.g. 0.75); got {start}"
        )


class WeightAveragingCallback(WritesIntoCheckpoints, TrainerCallback):
    """Keeps an AveragedModel of `model`; swaps it in for evaluations, checkpoints and the end of
    training."""

    def __init__(
        self,
        ema_decay: float | None = None,
        swa_start: float | None = None,
        resume_from_checkpoint: str | None = None,
    ):
        self.ema_decay, self.swa_start, self.resume_from = (
            ema_decay,
            swa_start,
            resume_from_checkpoint,
        )
        self.averaged: AveragedModel | None = (
            None  # built at on_train_begin, on the model's final device
        )
        self.raw: list[torch.Tensor] | None = None  # set aside while the average sits in the model

    @property
    def kind(self) -> str:
        return (
            f"EMA (decay {self.ema_decay})"
            if self.ema_decay is not None
            else f"SWA (from {self.swa_start:.0%} of steps)"
        )

    def _params(self, model) -> list[torch.Tensor]:
        return [p.detach() for p in model.parameters()]

    def _swap_in(self, model) -> None:
        if (
            self.raw is None and int(self.averaged.n_averaged) > 0
        ):  # SWA before its start: nothing averaged yet
            self.raw = [p.clone() for p in self._params(model)]
            torch._foreach_copy_(self._params(model), self._params(self.averaged))

    def _swap_out(self, model) -> None:
        if self.raw is not None:
            torch._foreach_copy_(self._params(model), self.raw)
            self.raw = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        multi_avg_fn = get_ema_multi_avg_fn(self.ema_decay) if self.ema_decay is not None else None
        # A copy that shares nothing with the model; tied weights (wte = lm_head) stay one tensor in
        # it too. A --distill_from teacher rides on the model as a plain attribute: set aside, so it
        # is not copied too.
        teacher = model.__dict__.pop(TEACHER_ATTRIBUTE, None)
        try:
            self.averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        finally:
            if teacher is not None:
                object.__setattr__(model, TEACHER_ATTRIBUTE, teacher)
        if not self.resume_from:
            return
        path = os.path.join(self.resume_from, RAW_WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise UsageError(
                f"--resume_from_checkpoint {self.resume_from!r} has no {RAW_WEIGHTS_FILE} (it was "
                "saved without weight averaging, or its save was cut short); resume it without "
                "--ema_decay/--swa_start, or pass an earlier checkpoint"
            )
        saved = load_file(path)
        n_averaged = saved.pop(N_AVERAGED)
        # The Trainer loaded the checkpoint's model.safetensors (the average) into the model: that
        # is the average.
        torch._foreach_copy_(self._params(self.averaged), self._params(model))
        self.averaged.n_averaged.copy_(n_averaged)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                named[name].copy_(tensor)
        logger.info(
            "weight averaging: resumed %s from %s (%d steps averaged)",
            self.kind,
            path,
            int(n_averaged),
        )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._swap_out(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.ema_decay is not None or state.global_step > self.swa_start * state.max_steps:
            self.averaged.update_parameters(model)
        if control.should_evaluate or control.should_save:
            self._swap_in(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate or control.should_save:
            self._swap_in(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        folder = self.checkpoint_folder(args, state)
        raw = self.raw if self.raw is not None else self._params(model)
        tensors = {name: t.contiguous() for (name, _), t in zip(model.named_parameters(), raw)}
        save_file(
            {**tensors, N_AVERAGED: self.averaged.n_averaged.detach().cpu()},
            os.path.join(folder, RAW_WEIGHTS_FILE),
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # the Trainer loaded the best checkpoint: its model.safetensors is already an average
            self.raw = None
            return
        self._swap_in(model)
        self.raw = None
        logger.info(
            "weight averaging: the model now holds the %s weights (%d steps averaged)",
            self.kind,
            int(self.averaged.n_averaged),
        )


def weight_averaging_callbacks(args, resume_from_checkpoint: str | None) -> list:
    """[WeightAveragingCallback] when --ema_decay or --swa_start is given, else []."""
    if args.ema_decay is None and args.swa_start is None:
        return []
    return [WeightAveragingCallback(args.ema_decay, args.swa_start, resume_from_checkpoint)]
