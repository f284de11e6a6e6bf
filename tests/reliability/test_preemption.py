"""wikigpt/reliability/preemption.py: a signal is noted, the next step end saves and stops, the exit
says how to resume.

The end-to-end SIGTERM run (checkpoint, exit 143, exact resume) is in
tests/reliability/test_resume.py.
"""

import os
import signal
from types import SimpleNamespace

import pytest
from runs import make_checkpoint
from transformers import TrainerControl, TrainerState

from wikigpt.reliability.preemption import PreemptionCallback

ARGS = SimpleNamespace(device="cpu")


@pytest.fixture
def callback():
    # Python's own SIGINT handler before training, whatever the test runner installed (an xdist
    # worker may ignore it)
    runner_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    cb = PreemptionCallback()
    cb.on_train_begin(ARGS, TrainerState(), TrainerControl())
    yield cb
    cb.on_train_end(ARGS, TrainerState(), TrainerControl())
    signal.signal(signal.SIGINT, runner_handler)


def test_no_signal_changes_nothing(callback):
    control = TrainerControl()
    callback.on_step_end(ARGS, TrainerState(global_step=3), control)
    assert not (control.should_save or control.should_training_stop)


def test_sigint_saves_and_stops_at_the_next_step_end(callback):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: noted, no KeyboardInterrupt mid-step
    assert callback.signum == signal.SIGINT
    control = TrainerControl(should_evaluate=True)
    callback.on_step_end(ARGS, TrainerState(global_step=3), control)
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    # The epoch end that follows the stop must not save (or evaluate) a second time.
    epoch_end = TrainerControl(should_save=True, should_evaluate=True)
    callback.on_epoch_end(ARGS, TrainerState(global_step=3), epoch_end)
    assert not (epoch_end.should_save or epoch_end.should_evaluate)
    assert callback.saved_step == 3 and callback.exit_code == 130


def test_second_signal_interrupts_at_once(callback):
    # raise_signal runs the handler before it returns; two os.kill calls can merge into one signal
    signal.raise_signal(signal.SIGINT)
    assert callback.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_are_restored_after_training():
    before = signal.getsignal(signal.SIGTERM)
    cb = PreemptionCallback()
    cb.on_train_begin(ARGS, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == cb._handle
    cb.on_train_end(ARGS, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_names_the_checkpoint_and_the_resume_flag(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint-7", 7)
    cb = PreemptionCallback()
    cb.signum, cb.saved_step = signal.SIGTERM, 7
    with pytest.raises(SystemExit) as exit_info:
        cb.exit_if_interrupted(str(tmp_path), is_main_process=True)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == (
        "wikigpt: training stopped by SIGTERM at step 7; checkpoint saved in "
        f"{tmp_path / 'checkpoint-7'}. To continue, rerun the same command with "
        "--resume_from_checkpoint latest (or --resume_from_checkpoint "
        f"{tmp_path / 'checkpoint-7'})\n"
    )


def test_no_signal_no_exit(tmp_path):
    PreemptionCallback().exit_if_interrupted(str(tmp_path), is_main_process=True)
