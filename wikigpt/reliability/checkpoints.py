"""Trainer checkpoints: is a checkpoint-N folder complete, which one to resume from, does it fit the
model.

The Trainer saves a checkpoint in this order: the model, the optimizer and scheduler,
rng_state*.pth, and trainer_state.json last, each file written in place. A save killed half-way
therefore lacks trainer_state.json or has a truncated file; `checkpoint_problem` finds both without
loading anything (safetensors: header vs file size; torch files: the zip directory at their end;
torch.distributed.checkpoint folders: their .metadata, written after every shard), so a half-written
checkpoint never passes for a complete one.

Three layouts, as Trainer._save_checkpoint writes them (transformers 5.24, accelerate's FSDP
savers):
- plain (one device, DDP): model.safetensors (or shards, or pytorch_model.bin), optimizer.pt,
  scheduler.pt;
- FSDP: pytorch_model_fsdp*.bin or pytorch_model_fsdp_N/ (sharded: no model.safetensors),
  optimizer*.bin or optimizer_N/, scheduler.pt;
- DeepSpeed: a global_stepN/ folder holding the model, optimizer and scheduler states
  (scheduler.pt only with a scheduler DeepSpeed does not manage).
All of them: rng_state.pth (rng_state_R.pth per process), then trainer_state.json.
"""

import json
import logging
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field

from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.trainer_utils import _re_checkpoint, get_last_checkpoint

from wikigpt.errors import UsageError

logger = logging.getLogger(__name__)

# checkpoint-N: the name the Trainer writes, as transformers' get_last_checkpoint matches it.
CHECKPOINT_NAME = _re_checkpoint
# Set-aside names: the Trainer's rotation, `latest` and the Hub upload all skip them
# (wikigpt.reporting.hub).
CORRUPT_PREFIX = "corrupt-"  # an incomplete checkpoint skipped by `latest`, kept for inspection
PREVIOUS_RUN_PREFIX = (
    "previous-run-"  # a checkpoint of the run an --overwrite_output_dir run replaced
)
SET_ASIDE_PREFIXES = (CORRUPT_PREFIX, PREVIOUS_RUN_PREFIX)
FSDP_OPTIMIZER = re.compile(
    r"^optimizer(_\d+)?(_rank\d+)?\.bin$"
)  # accelerate's save_fsdp_optimizer files
FSDP_OPTIMIZER_DIR = re.compile(
    r"^optimizer_\d+$"
)  # ... and its torch.distributed.checkpoint folders
LATEST = "latest"
# Values of --resume_from_checkpoint that mean "the newest complete checkpoint in --output_dir".
LATEST_WORDS = {LATEST, "last", "true", "yes"}
NO_RESUME_WORDS = {"", "false", "no", "none"}
# Config fields that decide parameter shapes; a checkpoint must agree on all of them to be resumed.
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "n_inner",
    "n_positions",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
)
RESUME_FLAG = "--resume_from_checkpoint"


def _safetensors_problem(path: str) -> str | None:
    name = os.path.basename(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{name} is truncated ({size} bytes, header alone says {header_len + 8})"
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{name} is truncated or not a safetensors file"
    data_end = max(
        (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
    )
    if size != 8 + header_len + data_end:
        return f"{name} is truncated ({size} of {8 + header_len + data_end} bytes)"
    return None


def _torch_file_problem(path: str) -> str | None:
    # torch.save writes a zip archive whose directory sits at the very end: a truncated file has
    # none.
    if not zipfile.is_zipfile(path):
        return f"{os.path.basename(path)} is truncated or not a torch.save file"
    return None


def weights_present(path: str) -> bool:
    """Whether model folder `path` holds weights from_pretrained can load (complete or not)."""
    return any(
        os.path.isfile(os.path.join(path, name))
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
    )


def weights_problem(path: str) -> str | None:
    """Why the weights in model folder `path` are missing or truncated, or None (also usable for a
    final model)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return "model.safetensors.index.json is unreadable"
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                return f"{shard} is missing"
            if problem := _safetensors_problem(shard_path):
                return problem
        return None
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return _safetensors_problem(single)
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return _torch_file_problem(legacy)
    return "model.safetensors is missing"


def _dcp_problem(path: str) -> str | None:
    # torch.distributed.checkpoint writes every shard, then .metadata: without it the save did not
    # finish.
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return f"{os.path.basename(path)}/.metadata is missing (the sharded save did not finish)"
    return None


def _torch_files_problem(path: str, names: list[str]) -> str | None:
    for name in names:
        if problem := _torch_file_problem(os.path.join(path, name)):
            return problem
    return None


def _deepspeed_problem(path: str, folders: list[str]) -> str | None:
    """DeepSpeed's engine.save_checkpoint: global_stepN/ with *model_states.pt and
    *optim_states.pt."""
    for folder in folders:
        names = sorted(os.listdir(os.path.join(path, folder)))
        for kind in ("model_states.pt", "optim_states.pt"):
            if not any(n.endswith(kind) for n in names):
                return f"{folder} has no *{kind} (the DeepSpeed save did not finish)"
        if problem := _torch_files_problem(
            os.path.join(path, folder), [n for n in names if n.endswith(".pt")]
        ):
            return f"{folder}/{problem}"
    return None


def _fsdp_problem(path: str, names: list[str]) -> str | None:
    """accelerate's save_fsdp_model/save_fsdp_optimizer: .bin files (full or per-rank) or DCP
    folders (sharded)."""
    is_dir = {n: os.path.isdir(os.path.join(path, n)) for n in names}
    model_files = [
        n for n in names if n.startswith(FSDP_MODEL_NAME) and n.endswith(".bin") and not is_dir[n]
    ]
    model_dirs = [n for n in names if n.startswith(FSDP_MODEL_NAME) and is_dir[n]]
    optimizer_files = [n for n in names if FSDP_OPTIMIZER.match(n) and not is_dir[n]]
    optimizer_dirs = [n for n in names if FSDP_OPTIMIZER_DIR.match(n) and is_dir[n]]
    if not (optimizer_files or optimizer_dirs):
        return "optimizer.bin is missing (FSDP optimizer state)"
    for name in model_dirs + optimizer_dirs:
        if problem := _dcp_problem(os.path.join(path, name)):
            return problem
    return _torch_files_problem(path, model_files + optimizer_files)


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete Trainer checkpoint to resume from (any layout above), or None
    when it is."""
    if not os.path.isdir(path):
        return "not a directory"
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        return "trainer_state.json is missing (the save was interrupted)"
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is truncated or unreadable"
    match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != step:
        return f"trainer_state.json says step {step}, the folder name says {match.group(1)}"
    names = sorted(os.listdir(path))
    deepspeed = [
        n for n in names if n.startswith("global_step") and os.path.isdir(os.path.join(path, n))
    ]
    fsdp = any(n.startswith(FSDP_MODEL_NAME) for n in names)
    # FSDP (sharded) and DeepSpeed ZeRO-3 keep the weights in their own files; model.safetensors is
    # then absent.
    if (not (fsdp or deepspeed) or weights_present(path)) and (problem := weights_problem(path)):
        return problem
    if deepspeed:
        problem = _deepspeed_problem(path, deepspeed)
    elif fsdp:
        problem = _fsdp_problem(path, names)
    else:
        problem = (
            None
            if os.path.isfile(os.path.join(path, "optimizer.pt"))
            else "optimizer.pt is missing"
        )
        problem = problem or _torch_file_problem(os.path.join(path, "optimizer.pt"))
    if problem:
        return problem
    if (
        not deepspeed and "scheduler.pt" not in names
    ):  # DeepSpeed keeps the scheduler in global_stepN/
        return "scheduler.pt is missing"
    rng_files = [n for n in names if n.startswith("rng_state") and n.endswith(".pth")]
    if not rng_files:
        return "rng_state.pth is missing (resuming would change dropout and data order)"
    return _torch_files_problem(
        path, [n for n in names if n in ("scheduler.pt", "scaler.pt")] + rng_files
    )


class WritesIntoCheckpoints:
    """For callbacks that add a file to the checkpoint-N folder the Trainer has just saved (at
    `on_save`).

    The Trainer saves into --output_dir, but into --output_dir/run-N/ for trial N of a
    hyper-parameter search, and callbacks are not told which: wikigpt.train.hp_search sets `run_dir`
    on them for each trial."""

    run_dir: str | None = None

    def checkpoint_folder(self, args, state) -> str:
        return os.path.join(self.run_dir or args.output_dir, f"checkpoint-{state.global_step}")


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of `output_dir`, newest (highest N) first.

    All of them, not only transformers' get_last_checkpoint: `latest` falls back past incomplete
    ones."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def last_good_checkpoint(output_dir: str, before_step: int | None = None) -> str | None:
    """Newest complete checkpoint, optionally only those saved before `before_step`."""
    for path in list_checkpoints(output_dir):
        step = int(CHECKPOINT_NAME.match(os.path.basename(path)).group(1))
        if (before_step is None or step < before_step) and checkpoint_problem(path) is None:
            return path
    return None


def set_aside(path: str, prefix: str = CORRUPT_PREFIX) -> str:
    """Rename a folder (or file) to PREFIX+NAME (PREFIX2-NAME, ... if taken); returns the new
    path."""
    parent, name = os.path.split(os.path.normpath(path))
    target = os.path.join(parent, prefix + name)
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(parent, f"{prefix}{suffix}-{name}")
    os.rename(path, target)
    return target


def in_output_dir(checkpoint: str, output_dir: str) -> bool:
    """Whether `checkpoint` is one of `output_dir`'s own checkpoint folders."""
    return os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) == os.path.realpath(
        output_dir
    )


@dataclass
class ResumePlan:
    """Where training resumes from (None: a fresh run), the incomplete checkpoints skipped to get
    there, and the checkpoints of an earlier run in --output_dir that this run replaces
    (--overwrite_output_dir)."""

    path: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    previous_run: list[str] = field(default_factory=list)

    def check_model(self, config) -> None:
        """The checkpoint's weights must fit `config`; otherwise loading them fails with a shape
        error."""
        if self.path is None:
            return
        config_file = os.path.join(self.path, "config.json")
        if not os.path.exists(config_file) and not weights_present(self.path):
            # FSDP sharded state (pytorch_model_fsdp_0/): the Trainer saves no config.json beside it
            return
        try:
            with open(config_file, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise UsageError(
                f"{RESUME_FLAG} {self.path!r} has no readable config.json ({err}); "
                f"pass a checkpoint folder saved by train.py"
            ) from err
        current = config.to_dict()
        differences = [
            f"{key} {saved.get(key)} there, {current.get(key)} here"
            for key in SHAPE_KEYS
            if (key in saved or key in current) and saved.get(key) != current.get(key)
        ]
        if differences:
            raise UsageError(
                f"{RESUME_FLAG} {self.path!r} holds a different model ({'; '.join(differences)}); "
                "resume with the original run's --preset/--config_overrides/--pad_vocab_multiple/"
                "--model_name_or_path/--tokenizer_name, or start a new run in a new --output_dir"
            )

    def set_aside(self, is_main_process: bool) -> None:
        """Rename skipped checkpoints to corrupt-checkpoint-N and an earlier run's to
        previous-run-checkpoint-N: kept for inspection, but out of the Trainer's rotation (they
        would count against --save_total_limit), out of `latest` and of the preemption and NaN
        messages, and out of the way of this run's own saves."""
        if not is_main_process:
            return
        for path, _ in self.skipped:
            logger.warning("moved incomplete %s to %s", path, set_aside(path, CORRUPT_PREFIX))
        for path in self.previous_run:
            logger.warning(
                "--overwrite_output_dir: moved %s of the earlier run to %s",
                path,
                set_aside(path, PREVIOUS_RUN_PREFIX),
            )


def normalize_resume_value(value) -> str | None:
    """--resume_from_checkpoint as given (bare flag, true/false from a config file, path) -> None,
    LATEST or a path."""
    if value is None or value is False:
        return None
    if value is True:
        return LATEST
    text = str(value).strip()
    if text.lower() in NO_RESUME_WORDS:
        return None
    if text.lower() in LATEST_WORDS:
        return LATEST
    return text


def plan_resume(value, output_dir: str, overwrite_output_dir: bool = False) -> ResumePlan:
    """Pick the checkpoint to resume from; incomplete ones are skipped for the previous good one
    (one log line each).

    A run that does not continue one of --output_dir's own checkpoints (a fresh start, or a
    checkpoint from elsewhere) with --overwrite_output_dir replaces the earlier run there: its
    checkpoints are set aside, so that this run never resumes from, rotates or names them.
    """
    plan = _choose_checkpoint(normalize_resume_value(value), output_dir)
    if overwrite_output_dir and not (plan.path and in_output_dir(plan.path, output_dir)):
        plan.previous_run = list_checkpoints(output_dir)
    return plan


def _choose_checkpoint(choice: str | None, output_dir: str) -> ResumePlan:
    if choice is None:
        return ResumePlan()
    if choice != LATEST:
        if not os.path.exists(choice):
            raise UsageError(
                f"{RESUME_FLAG} {choice!r} does not exist; pass a checkpoint-N folder, "
                f"or '{LATEST}' for the newest complete one in --output_dir"
            )
        if not os.path.isdir(choice):
            raise UsageError(
                f"{RESUME_FLAG} {choice!r} is a file; pass a checkpoint-N folder, "
                f"or '{LATEST}' for the newest complete one in --output_dir"
            )
        if not os.path.exists(os.path.join(choice, "trainer_state.json")) and get_last_checkpoint(
            choice
        ):
            raise UsageError(
                f"{RESUME_FLAG} {choice!r} is a run folder, not a checkpoint; pass one of its "
                f"checkpoint-N folders, or '{LATEST}' with --output_dir {choice!r}"
            )
        if problem := checkpoint_problem(choice):
            earlier = last_good_checkpoint(os.path.dirname(os.path.normpath(choice)))
            hint = (
                f"pass an earlier one such as {earlier!r}"
                if earlier
                else "pass a complete checkpoint-N folder"
            )
            raise UsageError(
                f"{RESUME_FLAG} {choice!r} is incomplete or corrupt ({problem}); {hint}, "
                f"or '{LATEST}' to pick the newest complete one"
            )
        return ResumePlan(path=choice)

    candidates = list_checkpoints(output_dir)
    if not candidates:
        raise UsageError(
            f"{RESUME_FLAG} {LATEST}: --output_dir {output_dir!r} has no checkpoint-N folders to "
            f"resume from; check --output_dir, or drop {RESUME_FLAG} to start a new run"
        )
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumePlan(path=path, skipped=skipped)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
        skipped.append((path, problem))
    listing = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
    raise UsageError(
        f"{RESUME_FLAG} {LATEST}: no complete checkpoint in --output_dir {output_dir!r} "
        f"({listing}); pass a complete checkpoint folder, or drop {RESUME_FLAG} and use a new "
        "--output_dir"
    )
