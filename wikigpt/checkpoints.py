"""Trainer checkpoints: is a checkpoint-N folder complete, which one to resume from, does it fit the model.

The Trainer saves a checkpoint in this order: weights, optimizer.pt, scheduler.pt, rng_state.pth, and
trainer_state.json last, each file written in place. A save killed half-way therefore lacks
trainer_state.json or has a truncated file; `checkpoint_problem` finds both without loading anything
(safetensors: header vs file size; torch files: the zip directory at their end), so a half-written
checkpoint never passes for a complete one.
"""

import json
import logging
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field

from .errors import UsageError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # what the Trainer writes and rotates
CORRUPT_PREFIX = "corrupt-"  # set-aside name; the Trainer's rotation globs "checkpoint-*" and never sees it
LATEST = "latest"
# Values of --resume_from_checkpoint that mean "the newest complete checkpoint in --output_dir".
LATEST_WORDS = {LATEST, "last", "true", "yes"}
NO_RESUME_WORDS = {"", "false", "no", "none"}
# Config fields that decide parameter shapes; a checkpoint must agree on all of them to be resumed.
SHAPE_KEYS = ("model_type", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "n_positions",
              "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings")
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
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + data_end:
        return f"{name} is truncated ({size} of {8 + header_len + data_end} bytes)"
    return None


def _torch_file_problem(path: str) -> str | None:
    # torch.save writes a zip archive whose directory sits at the very end: a truncated file has none.
    if not zipfile.is_zipfile(path):
        return f"{os.path.basename(path)} is truncated or not a torch.save file"
    return None


def weights_problem(path: str) -> str | None:
    """Why the weights in model folder `path` are missing or truncated, or None (also usable for a final model)."""
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


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete Trainer checkpoint to resume from, or None when it is."""
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
    if problem := weights_problem(path):
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if problem := _torch_file_problem(file):
            return problem
    rng_files = [n for n in os.listdir(path) if n.startswith("rng_state") and n.endswith(".pth")]
    if not rng_files:
        return "rng_state.pth is missing (resuming would change dropout and data order)"
    for name in sorted(rng_files) + (["scaler.pt"] if os.path.isfile(os.path.join(path, "scaler.pt")) else []):
        if problem := _torch_file_problem(os.path.join(path, name)):
            return problem
    return None


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def last_good_checkpoint(output_dir: str, before_step: int | None = None) -> str | None:
    """Newest complete checkpoint, optionally only those saved before `before_step`."""
    for path in list_checkpoints(output_dir):
        step = int(CHECKPOINT_NAME.match(os.path.basename(path)).group(1))
        if (before_step is None or step < before_step) and checkpoint_problem(path) is None:
            return path
    return None


@dataclass
class ResumePlan:
    """Where training resumes from (None: a fresh run), and the incomplete checkpoints skipped to get there."""

    path: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def check_model(self, config) -> None:
        """The checkpoint's weights must fit `config`; otherwise loading them fails with a shape error."""
        if self.path is None:
            return
        try:
            with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise UsageError(f"{RESUME_FLAG} {self.path!r} has no readable config.json ({err}); "
                             f"pass a checkpoint folder saved by train.py") from err
        current = config.to_dict()
        differences = [f"{key} {saved.get(key)} there, {current.get(key)} here" for key in SHAPE_KEYS
                       if (key in saved or key in current) and saved.get(key) != current.get(key)]
        if differences:
            raise UsageError(
                f"{RESUME_FLAG} {self.path!r} holds a different model ({'; '.join(differences)}); resume with the "
                f"original run's --preset/--config_overrides/--pad_vocab_multiple/--model_name_or_path/--tokenizer_name, "
                f"or start a new run in a new --output_dir")

    def set_aside_skipped(self, is_main_process: bool) -> None:
        """Rename skipped checkpoints to corrupt-checkpoint-N: kept for inspection, but out of the Trainer's
        rotation (they would count against --save_total_limit) and out of the way of the re-save of step N."""
        if not is_main_process:
            return
        for path, _ in self.skipped:
            set_aside(path)


def set_aside(path: str) -> str:
    """Rename a checkpoint folder (or file) to corrupt-NAME (corrupt-2-NAME, ... if taken); returns the new path."""
    parent, name = os.path.split(os.path.normpath(path))
    target = os.path.join(parent, CORRUPT_PREFIX + name)
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(parent, f"{CORRUPT_PREFIX}{suffix}-{name}")
    os.rename(path, target)
    logger.warning("moved incomplete %s to %s", path, target)
    return target


def normalize_resume_value(value) -> str | None:
    """--resume_from_checkpoint as given (bare flag, true/false from a config file, path) -> None, LATEST or a path."""
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


def plan_resume(value, output_dir: str) -> ResumePlan:
    """Pick the checkpoint to resume from; incomplete ones are skipped for the previous good one (one log line each)."""
    choice = normalize_resume_value(value)
    if choice is None:
        return ResumePlan()
    if choice != LATEST:
        if not os.path.exists(choice):
            raise UsageError(f"{RESUME_FLAG} {choice!r} does not exist; pass a checkpoint-N folder, "
                             f"or '{LATEST}' for the newest complete one in --output_dir")
        if not os.path.isdir(choice):
            raise UsageError(f"{RESUME_FLAG} {choice!r} is a file; pass a checkpoint-N folder, "
                             f"or '{LATEST}' for the newest complete one in --output_dir")
        if not os.path.exists(os.path.join(choice, "trainer_state.json")) and list_checkpoints(choice):
            raise UsageError(f"{RESUME_FLAG} {choice!r} is a run folder, not a checkpoint; pass one of its "
                             f"checkpoint-N folders, or '{LATEST}' with --output_dir {choice!r}")
        if problem := checkpoint_problem(choice):
            earlier = last_good_checkpoint(os.path.dirname(os.path.normpath(choice)))
            hint = f"pass an earlier one such as {earlier!r}" if earlier else "pass a complete checkpoint-N folder"
            raise UsageError(f"{RESUME_FLAG} {choice!r} is incomplete or corrupt ({problem}); {hint}, "
                             f"or '{LATEST}' to pick the newest complete one")
        return ResumePlan(path=choice)

    candidates = list_checkpoints(output_dir)
    if not candidates:
        raise UsageError(f"{RESUME_FLAG} {LATEST}: --output_dir {output_dir!r} has no checkpoint-N folders to "
                         f"resume from; check --output_dir, or drop {RESUME_FLAG} to start a new run")
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumePlan(path=path, skipped=skipped)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
        skipped.append((path, problem))
    listing = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
    raise UsageError(f"{RESUME_FLAG} {LATEST}: no complete checkpoint in --output_dir {output_dir!r} ({listing}); "
                     f"pass a complete checkpoint folder, or drop {RESUME_FLAG} and use a new --output_dir")
