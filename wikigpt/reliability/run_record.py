"""wikigpt_run.json: the data split and lever settings a run trained with, saved beside its weights.

Written into every checkpoint-N folder and the final output folder, so that what a folder's
weights mean travels with them: `--resume_from_checkpoint` refuses a checkpoint trained with other
settings (a resumed run must be the run it continues), and `--distill_from` refuses a teacher
whose training text may hold the student's held-out articles (every held-out number of the
student would be biased). Folders of older runs have no record: both go on, with one line saying
what could not be checked.
"""

import json
import logging
import os

from transformers import TrainerCallback

from wikigpt.atomic_json import write_json_atomic
from wikigpt.errors import UsageError
from wikigpt.reliability.checkpoints import CHECKPOINT_NAME, RESUME_FLAG, WritesIntoCheckpoints

logger = logging.getLogger(__name__)

RECORD_FILE = "wikigpt_run.json"
LOCAL_FILES = ("train_file", "validation_file", "dataset_dir")
# The record's groups, each compared flag by flag on resume (the split first: it matters most).
LEVER_FLAGS = (
    "rare_tokens_below",
    "rare_token_groups",
    "rare_input_dropout",
    "distill_from",
    "distill_share",
    "chunked_loss_size",
)
TRAINING_FLAGS = ("optim_matrices", "muon_learning_rate")  # levers that live in training args
CALIBRATION_FLAGS = ("calibrate_temperature", "calibrate_token_offsets")
MODEL_FLAGS = ("preset", "config_overrides")


def _plain(value):
    """A JSON value that compares equal after a round trip (enums by value, others as text)."""
    value = getattr(value, "value", value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def split_record(data_args, training_args) -> dict:
    """Which text was trained on and which held out: the data source as given (local paths made
    absolute, so a run resumed from another directory compares equal), the seed that picks the
    held-out articles, and --data_seed (the order of the training blocks)."""
    split = {
        "seed": training_args.seed,
        "data_seed": _plain(getattr(training_args, "data_seed", None)),
        "validation_split_percentage": data_args.validation_split_percentage,
    }
    for name in LOCAL_FILES:
        path = getattr(data_args, name)
        split[name] = os.path.abspath(path) if path else None
    local = any(split[name] for name in LOCAL_FILES)  # then the Hub dataset flags are ignored
    split["dataset_name"] = None if local else data_args.dataset_name
    split["dataset_config_name"] = None if local else data_args.dataset_config_name
    return split


def run_record(model_args, data_args, lever_args, calibration_args, training_args) -> dict:
    """The record of a run, from train.py's argument objects (wikigpt.train.run.RUN_ARGUMENTS)."""
    levers = {flag: getattr(lever_args, flag) for flag in LEVER_FLAGS}
    levers.update({flag: getattr(training_args, flag) for flag in TRAINING_FLAGS})
    levers.update({flag: getattr(calibration_args, flag) for flag in CALIBRATION_FLAGS})
    return {
        "split": split_record(data_args, training_args),
        "levers": {flag: _plain(value) for flag, value in levers.items()},
        "model": {flag: _plain(getattr(model_args, flag)) for flag in MODEL_FLAGS},
    }


def write_run_record(folder: str, record: dict) -> None:
    write_json_atomic(os.path.join(folder, RECORD_FILE), record)


def read_run_record(folder: str) -> dict | None:
    """The record in `folder`, or None where there is none (older runs, folders from elsewhere)."""
    try:
        with open(os.path.join(folder, RECORD_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_folder_of(folder: str) -> str:
    """The run folder of a checkpoint-N folder (where results.json lives), else `folder` itself."""
    folder = os.path.normpath(folder)
    return os.path.dirname(folder) if CHECKPOINT_NAME.match(os.path.basename(folder)) else folder


class RunRecordCallback(WritesIntoCheckpoints, TrainerCallback):
    """Writes the run's record into each checkpoint-N folder the Trainer saves."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            write_run_record(self.checkpoint_folder(args, state), self.record)


def may_hold_out(split: dict) -> bool:
    """Whether the validation articles may be held out of the training text (then --seed and
    --validation_split_percentage choose them): no validation file and no --dataset_dir with
    wiki.valid.raw. A Hub dataset counts as may: its splits are not known before it loads."""
    if split.get("validation_file"):
        return False
    folder = split.get("dataset_dir")
    return not (folder and os.path.isfile(os.path.join(folder, "wiki.valid.raw")))


def shown(value) -> str:
    """A recorded value as on a command line: true/false, none."""
    return "none" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def trained_with(flag: str, value) -> str:
    return f"with --{flag} {shown(value)}" if value is not None else f"without --{flag}"


def check_resume_record(path: str | None, record: dict) -> None:
    """Refuse to resume checkpoint `path` with a split, lever or model setting other than its own.

    A resumed run that changed one would be neither the run it continues nor a new one: its
    numbers would describe no recipe. A checkpoint without a record resumes with a warning."""
    if path is None:
        return
    saved = read_run_record(path)
    if saved is None:
        logger.warning(
            "%s %r has no %s (saved by an older wikigpt): its data split and levers are "
            "not checked against this run's",
            RESUME_FLAG,
            path,
            RECORD_FILE,
        )
        return
    for group in ("split", "levers", "model"):
        there, here = saved.get(group) or {}, record[group]
        for flag, value in here.items():
            if flag in there and there[flag] != value:
                trained = trained_with(flag, there[flag])
                raise UsageError(
                    f"{RESUME_FLAG} {path!r} was trained {trained}; this run has "
                    f"{shown(value)}: resume with the checkpoint's settings or start "
                    f"a new --output_dir"
                )
