"""Preemption: SIGTERM/SIGINT during training save a checkpoint at the end of the current step, then
stop.

Clusters send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT. The first signal is
only noted (a handler must not save from inside a step); the next step end asks the Trainer to save
and stop. A second signal restores the default action, so a stuck job can still be interrupted.
"""

import logging
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

from wikigpt.reliability.checkpoints import LATEST, RESUME_FLAG, last_good_checkpoint

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def any_rank(flag: bool, device) -> bool:
    """True if `flag` is true on any process: every rank must stop (and save) at the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class PreemptionCallback(TrainerCallback):
    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.saved_step: int | None = None  # the step whose checkpoint was saved because of it
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop waiting for the step to end
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning(
            "received %s: saving a checkpoint at the end of this step, then stopping "
            "(send it again to stop at once, without a checkpoint)",
            signal.Signals(signum).name,
        )

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "training outside the main thread: SIGTERM/SIGINT will not save a checkpoint"
            )
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _stop_and_save(self, args, state, control):
        if self.saved_step is None and any_rank(self.signum is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is for saving, not evaluating
            self.saved_step = state.global_step
        elif self.saved_step is not None:
            control.should_save = False  # the epoch end after the stop: already saved at this step
            control.should_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        self._stop_and_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._stop_and_save(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT

    def exit_if_interrupted(self, output_dir: str, is_main_process: bool) -> None:
        """After trainer.train(): if a signal stopped training, say how to resume and exit
        128+signal."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        if is_main_process:
            checkpoint = last_good_checkpoint(output_dir)
            where = (
                f"at step {self.saved_step}"
                if self.saved_step is not None
                else "after its last step"
            )
            if checkpoint:
                print(
                    f"wikigpt: training stopped by {name} {where}; checkpoint saved in "
                    f"{checkpoint}. To continue, rerun the same command with {RESUME_FLAG} "
                    f"{LATEST} (or {RESUME_FLAG} {checkpoint})",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"wikigpt: training stopped by {name} {where}; no checkpoint was saved, "
                    "rerun the command",
                    file=sys.stderr,
                    flush=True,
                )
        sys.exit(self.exit_code)
