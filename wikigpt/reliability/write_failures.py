"""A write that fails (disk full, quota, file-size limit) ends the run with one line, not a
traceback.

Clusters fill up: torch's checkpoint writer then dies with "[enforce fail at
inline_container.cc:672] . unexpected pos ...", safetensors with "I/O error: No space left on device
(os error 28)", Python with OSError ENOSPC. Around each thing train.py writes (its checkpoints, the
final model, results.json, the training-curves plot, the model card), `writing` turns such a failure
into `WriteFailed`: one `error:` line naming the folder, what was being written and the free space
there, exit status 4. What the failed write left behind is set aside (a half-written checkpoint-N
becomes corrupt-checkpoint-N, a half-written file corrupt-NAME), so nothing half-written passes for
good, and the line names the last complete checkpoint for --resume_from_checkpoint.
"""

import contextlib
import errno
import logging
import os
import re
import shutil

from wikigpt.reliability.checkpoints import (
    CORRUPT_PREFIX,
    RESUME_FLAG,
    checkpoint_problem,
    last_good_checkpoint,
    list_checkpoints,
    set_aside,
)
from wikigpt.errors import UsageError

logger = logging.getLogger(__name__)

EXIT_WRITE_FAILED = 4
CHECKPOINTS = (
    "checkpoints"  # `what` for trainer.train(): the Trainer saves checkpoint-N folders inside it
)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
# torch's zip writer and safetensors' Rust writer carry no errno, only their message.
WRITER_MESSAGE = re.compile(
    r"inline_container\.cc|unexpected pos|file write failed|"
    r"os error (%s)\b" % "|".join(str(e) for e in sorted(WRITE_ERRNOS))
)


class WriteFailed(UsageError):
    """A write into --output_dir failed; the fix is room on the disk (or another --output_dir)."""

    exit_code = EXIT_WRITE_FAILED


def write_failure(err: BaseException) -> BaseException | None:
    """The exception in `err`'s chain that is a failed write, or None (any other error is not ours
    to handle)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        if WRITER_MESSAGE.search(str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    if match := re.search(r"os error (\d+)", str(err)):
        return os.strerror(int(match.group(1)))
    return f"the writer stopped part-way: {str(err).strip().splitlines()[0][:120]}"


def _free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit} free there"
    return f"{free} bytes free there"


def _files(folder: str) -> dict[str, tuple[int, int]]:
    try:
        with os.scandir(folder) as entries:
            return {
                e.name: (e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.is_file()
            }
    except OSError:
        return {}


def _set_aside_partial(output_dir: str, what: str, files_before: dict) -> tuple[str, list[str]]:
    """Move what the failed write left aside; returns (the name of what was being written, where it
    went)."""
    if what == CHECKPOINTS:
        partial = [
            path for path in list_checkpoints(output_dir) if checkpoint_problem(path) is not None
        ]
        name = os.path.basename(partial[0]) if partial else "a checkpoint"
        return name, [set_aside(path) for path in partial]
    moved = []
    for name, stat in _files(output_dir).items():
        if files_before.get(name) != stat and not name.startswith(CORRUPT_PREFIX):
            moved.append(set_aside(os.path.join(output_dir, name)))
    return what, moved


@contextlib.contextmanager
def writing(output_dir: str, what: str, is_main_process: bool = True):
    """Run the block; a failed write in it becomes one `WriteFailed` line (see module docstring)."""
    files_before = _files(output_dir) if what != CHECKPOINTS else {}
    try:
        yield
    # only failed writes are turned into WriteFailed; the rest re-raise
    except Exception as err:
        cause = write_failure(err)
        if cause is None:
            raise
        name, moved = (
            _set_aside_partial(output_dir, what, files_before) if is_main_process else (what, [])
        )
        aside = f"the partial write is set aside as {', '.join(moved)}; " if moved else ""
        good = last_good_checkpoint(output_dir)
        resume = (
            f"free some space (or pass another --output_dir), then resume with {RESUME_FLAG} {good}"
            if good
            else "free some space (or pass another --output_dir) and rerun: "
            "no complete checkpoint to resume from"
        )
        raise WriteFailed(
            f"writing {name} to {output_dir!r} failed ({_reason(cause)}; "
            f"{_free_space(output_dir)}); {aside}{resume}"
        ) from err
