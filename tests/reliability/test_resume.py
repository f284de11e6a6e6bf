"""Interrupted runs end where an uninterrupted run ends: SIGKILL + resume (skipping a half-written checkpoint),
and SIGTERM (preemption) -> checkpoint, exit 143, resume.

All runs (tests/runs.py micro_args): a 16-wide tiny GPT-2, block 32, 10 optimizer steps, a checkpoint every
4 steps, seed 42, dropout on. Resuming restores weights, AdamW moments, the LR scheduler, the RNG and the
position in the shuffled data, so the resumed run must reproduce the reference: same global_step, and eval loss
and per-step training losses equal within 1e-5 absolute, learning rates within 1e-12 (in practice all are
bit-identical on CPU; resuming with --ignore_data_skip, which restarts the data order, fails by ~1e-3).
"""

import json
import os
import signal

import pytest
from runs import micro_args, micro_files, start_paused, train_in_process  # noqa: F401 - micro_files is a fixture

MAX_STEPS = 10
TOLERANCE = 1e-5


def step_logs(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["learning_rate"]) for e in state["log_history"] if "loss" in e}


def assert_same_run(out, reference, resumed_after):
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["train"]["global_step"] == expected["train"]["global_step"] == MAX_STEPS
    assert abs(results["validation"]["eval_loss"] - expected["validation"]["eval_loss"]) <= TOLERANCE
    resumed, full = step_logs(out), step_logs(reference)
    assert sorted(resumed) == sorted(full) == list(range(1, MAX_STEPS + 1))
    for step, (loss, lr) in resumed.items():  # data order and LR schedule continue where they stopped
        assert abs(loss - full[step][0]) <= TOLERANCE and abs(lr - full[step][1]) <= 1e-12, step
    # This call trained only the steps after the checkpoint (its train_loss averages those), not from scratch.
    trained = range(resumed_after + 1, MAX_STEPS + 1)
    assert abs(results["train"]["train_loss"] - sum(full[s][0] for s in trained) / len(trained)) <= TOLERANCE


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_files):
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train_in_process(micro_args(micro_files, out), monkeypatch) == 0
    return out


def test_sigkill_then_resume_skips_a_half_written_checkpoint(tmp_path, micro_files, reference, monkeypatch, caplog):
    out = tmp_path / "run"
    proc = start_paused(micro_args(micro_files, out), tmp_path / "markers", 6)
    proc.send_signal(signal.SIGKILL)  # steps 5-6 are lost; checkpoint-4 is the last complete save
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out)) == ["checkpoint-4"]

    # What a kill during the save of step 8 leaves: weights half-written, no trainer_state.json yet.
    half = out / "checkpoint-8"
    half.mkdir()
    data = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) // 2])

    assert train_in_process([*micro_args(micro_files, out), "--resume_from_checkpoint"], monkeypatch) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping incomplete checkpoint" in r.getMessage()]
    assert skipped == [f"skipping incomplete checkpoint {half}: "
                       f"trainer_state.json is missing (the save was interrupted)"]
    assert (out / "corrupt-checkpoint-8" / "model.safetensors").stat().st_size == len(data) // 2
    assert_same_run(out, reference, resumed_after=4)


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes(tmp_path, micro_files, reference, monkeypatch):
    out = tmp_path / "run"
    markers = tmp_path / "markers"
    proc = start_paused(micro_args(micro_files, out), markers, 6)
    proc.send_signal(signal.SIGTERM)
    (markers / "go").touch()  # the step in progress finishes, then the checkpoint is saved
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "received SIGTERM: saving a checkpoint at the end of this step" in output
    assert (f"wikigpt: training stopped by SIGTERM at step 7; checkpoint saved in {out / 'checkpoint-7'}. "
            f"To continue, rerun the same command with --resume_from_checkpoint latest") in output
    assert "Traceback" not in output
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-7"]  # no final model, no results.json
    assert json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())["global_step"] == 7

    assert train_in_process([*micro_args(micro_files, out), "--resume_from_checkpoint", "latest"], monkeypatch) == 0
    assert_same_run(out, reference, resumed_after=7)


def test_overwrite_output_dir_never_resumes_or_names_the_earlier_run(tmp_path, micro_files, monkeypatch):
    # Run A leaves checkpoint-4 and checkpoint-6; run B, with --overwrite_output_dir, saves only checkpoint-2.
    from wikigpt.reliability.checkpoints import last_good_checkpoint, plan_resume

    out = tmp_path / "run"
    assert train_in_process(micro_args(micro_files, out, max_steps=6, save_steps=2), monkeypatch) == 0
    argv = micro_args(micro_files, out, "--overwrite_output_dir", "--seed", 7, max_steps=2, save_steps=2)
    assert train_in_process(argv, monkeypatch) == 0
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [
        "checkpoint-2", "previous-run-checkpoint-4", "previous-run-checkpoint-6"]
    # `latest` and the preemption/NaN messages (last_good_checkpoint) see run B's checkpoint only.
    assert plan_resume("latest", str(out)).path == str(out / "checkpoint-2")
    assert last_good_checkpoint(str(out)) == str(out / "checkpoint-2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["max_steps"] == 2
