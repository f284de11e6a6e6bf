"""A failed write (disk full, quota, file-size limit) ends train.py with one line and exit status 4,
the partial write set aside and the last complete checkpoint named. The real runs hit a file-size
limit (RLIMIT_FSIZE with SIGXFSZ ignored, so writes fail with EFBIG as on a full disk) in a
subprocess."""

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest

# micro_files is a fixture
from runs import THREADS, micro_args, micro_files, train_in_process  # noqa: F401
from conftest import REPO

from wikigpt.reliability.checkpoints import checkpoint_problem
from wikigpt.reliability.write_failures import EXIT_WRITE_FAILED, WriteFailed, writing

MB = 1_000_000


def train_with_file_size_limit(argv, limit_bytes: int) -> subprocess.CompletedProcess:
    def limit_file_size():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )


def test_a_checkpoint_that_does_not_fit_ends_with_one_line(tmp_path, micro_files, monkeypatch):
    """The micro model's checkpoint: model.safetensors 3.3 MB fits under 5 MB, optimizer.pt 6.5 MB
    does not (torch's own error: "[enforce fail at inline_container.cc:672] . unexpected pos")."""
    out = tmp_path / "run"
    assert (
        train_in_process(micro_args(micro_files, out, max_steps=4, save_steps=4), monkeypatch) == 0
    )
    proc = train_with_file_size_limit(
        [
            *micro_args(micro_files, out, max_steps=8, save_steps=4),
            "--resume_from_checkpoint",
            out / "checkpoint-4",
        ],
        5 * MB,
    )
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: writing checkpoint-8 to '{out}' failed (the writer stopped part-way: "
    ), last
    assert " free there); the partial write is set aside as " in last
    assert last.endswith(
        f"corrupt-checkpoint-8; free some space (or pass another --output_dir), then resume with "
        f"--resume_from_checkpoint {out / 'checkpoint-4'}"
    ), last
    assert not (out / "checkpoint-8").exists() and (out / "corrupt-checkpoint-8").is_dir()
    assert checkpoint_problem(str(out / "checkpoint-4")) is None


def test_a_final_model_that_does_not_fit_ends_with_one_line(tmp_path, micro_files):
    """The final model.safetensors (3.3 MB) over a 2 MB limit: safetensors' "File too large (os
    error 27)"."""
    out = tmp_path / "run"
    proc = train_with_file_size_limit(
        micro_args(micro_files, out, "--save_strategy", "no", max_steps=2), 2 * MB
    )
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing the final model to '{out}' failed (File too large; "), (
        last
    )
    assert "set aside as " in last and str(out / "corrupt-config.json") in last, last
    assert last.endswith("and rerun: no complete checkpoint to resume from"), last
    # Nothing of the half-saved model is left to pass for a model: no weights, no config.json, no
    # results.
    left = {p.name for p in out.iterdir()}
    assert not left & {"model.safetensors", "config.json", "results.json"}, (left, last)
    assert "corrupt-config.json" in left, (left, last)


def test_a_failed_file_write_sets_the_partial_file_aside_and_keeps_the_good_ones(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # written before: untouched
    with pytest.raises(WriteFailed) as failure:
        with writing(str(tmp_path), "results.json"):
            (tmp_path / "results.json").write_text('{"half')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert failure.value.exit_code == EXIT_WRITE_FAILED
    assert str(failure.value).startswith(
        f"writing results.json to '{tmp_path}' failed (No space left on device; "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "corrupt-results.json"]


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(
        OSError
    ) as failure:  # a read error, say: not a failed write, not ours to reword
        with writing(str(tmp_path), "results.json"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
    assert not isinstance(failure.value, WriteFailed)
