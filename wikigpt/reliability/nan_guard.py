"""NaN guard: stop at the first NaN/inf loss or weight, before a checkpoint of a broken model is
saved.

The Trainer's default `logging_nan_inf_filter` hides a NaN loss from the logs (it logs the running
average instead) and keeps training and saving NaN weights. `NonFiniteGuard` checks every optimizer
step: the training loss of each micro-batch (a forward hook, no extra sync) and, before anything
reads the weights (a checkpoint save, an evaluation, the end of training), every weight. Non-finite
weights between those moments show up in the next step's loss, so the weights are not read on every
step (~150 kernels and 0.5 GB of reads per step for GPT-2 124M). On the first non-finite value it
cancels that step's save and evaluation and stops; `raise_if_diverged` then ends the run with one
line.

fp16 loss scaling: with --fp16 on a GPU, accelerate wraps the optimizer step in a
torch.amp.GradScaler (dynamic scale, starting at 2**16; a step whose gradients overflow is skipped
and the scale halved). That is normal and is not stopped here: only a non-finite *loss* or *weight*
is. On CPU accelerate applies neither fp16 autocast nor a scaler, so --fp16 there is refused rather
than silently training in fp32.
"""

import logging
import math

import torch
from transformers import TrainerCallback

from wikigpt.reliability.checkpoints import RESUME_FLAG, last_good_checkpoint
from wikigpt.errors import UsageError
from wikigpt.reliability.preemption import any_rank

logger = logging.getLogger(__name__)

EXIT_DIVERGED = 3


class TrainingDiverged(UsageError):
    """Training produced NaN/inf; the fix is a flag (precision, learning rate), so it reads like a
    usage error."""

    exit_code = EXIT_DIVERGED


def check_nan_guard_args(args) -> None:
    """Precision and learning-rate values that cannot train, before anything is built."""
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UsageError(
            f"--learning_rate must be a positive number; got {args.learning_rate}. "
            f"Pass e.g. --learning_rate 6e-4 (from scratch) or 5e-5 (fine-tuning)"
        )
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UsageError(
            f"--max_grad_norm must be >= 0 (0 turns clipping off); got {args.max_grad_norm}"
        )
    if args.fp16 and args.bf16:
        raise UsageError(
            "--fp16 and --bf16 are both set; pass only one (--bf16 where the GPU supports it)"
        )
    if args.fp16 and args.device.type == "cpu":
        raise UsageError(
            "--fp16 needs a GPU: on CPU accelerate applies neither fp16 autocast nor loss scaling, "
            "so the run would silently train in fp32; drop --fp16 (or pass --bf16)"
        )


def _likely_cause(args) -> str:
    if args.fp16:
        return (
            f"fp16 overflow (fp16 tops out at 65504): use --bf16 instead of --fp16, "
            f"or lower --learning_rate (now {args.learning_rate:g})"
        )
    return (
        f"a too high --learning_rate (now {args.learning_rate:g}): lower it, or raise "
        f"--warmup_steps; keep --max_grad_norm at 1.0 (now {args.max_grad_norm})"
    )


class NonFiniteGuard(TrainerCallback):
    def __init__(self):
        self.bad_step: int | None = None
        self.what: str = ""
        self._nonfinite_loss: torch.Tensor | None = (
            None  # accumulated on the model's device, read at step end
        )
        self._hook = None

    def _watch_loss(self, module, inputs, output):
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._nonfinite_loss = (
                bad if self._nonfinite_loss is None else self._nonfinite_loss | bad
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._hook = model.register_forward_hook(self._watch_loss)

    @staticmethod
    def _weights_bad(model) -> bool:
        finite = [torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()]
        return bool(finite) and not bool(torch.stack(finite).all().item())

    @staticmethod
    def _weights_about_to_be_used(state, control) -> bool:
        # DefaultFlowCallback runs first and has already set this step's flags; every rank sees the
        # same ones.
        return (
            control.should_save
            or control.should_evaluate
            or control.should_training_stop
            or state.global_step >= state.max_steps
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.bad_step is None:
            loss_bad = (
                bool(self._nonfinite_loss.item()) if self._nonfinite_loss is not None else False
            )
            self._nonfinite_loss = None
            weights_bad = (
                not loss_bad
                and model is not None
                and self._weights_about_to_be_used(state, control)
                and self._weights_bad(model)
            )
            self._record(loss_bad, weights_bad, state, args)
        self._cancel(control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # An epoch-end save/evaluation is decided here, after this step's on_step_end.
        if (
            self.bad_step is None
            and model is not None
            and (control.should_save or control.should_evaluate)
        ):
            self._record(False, self._weights_bad(model), state, args)
        self._cancel(control)

    def _record(self, loss_bad: bool, weights_bad: bool, state, args) -> None:
        if any_rank(loss_bad or weights_bad, args.device):
            self.bad_step = state.global_step
            self.what = "the training loss" if loss_bad else "the weights"

    def _cancel(self, control) -> None:
        if self.bad_step is not None:
            control.should_save = False  # never save a checkpoint of non-finite weights
            control.should_evaluate = False
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def raise_if_diverged(self, args) -> None:
        if self.bad_step is None:
            return
        good = last_good_checkpoint(args.output_dir, before_step=self.bad_step)
        kept = (
            f"The last good checkpoint, {good}, is kept (resume with {RESUME_FLAG} {good} after "
            "the fix)"
            if good
            else "No checkpoint had been saved before it."
        )
        raise TrainingDiverged(
            f"{self.what} became NaN/inf at step {self.bad_step}; training stopped and nothing "
            f"from that step was saved. Likely cause: {_likely_cause(args)}. {kept}"
        )
