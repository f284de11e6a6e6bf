"""Interrupted runs end where an uninterrupted run ends: SIGKILL + resume (skipping a half-written
checkpoint), and SIGTERM (preemption) -> checkpoint, exit 143, resume.

All runs (tests/runs.py micro_args): a 16-wide tiny GPT-2, block 32, 10 optimizer steps, a
checkpoint every 4 steps, seed 42, dropout on. Resuming restores weights, AdamW moments, the LR
scheduler, the RNG and the position in the shuffled data, so the resumed run must reproduce the
reference: same global_step, and eval loss and per-step training losses equal within 1e-5 absolute,
learning rates within 1e-12 (in practice all are bit-identical on CPU; resuming with
--ignore_data_skip, which restarts the data order, fails by ~1e-3).

With the CPU recipe's levers (rare-token rows, Muon, the chunked loss, a teacher, calibrations),
a resumed run ends where the uninterrupted one does, its saved model loads as plain GPT-2 with
eval.py's perplexity, and resuming with another lever setting is refused (wikigpt_run.json).
"""

import json
import math
import os
import signal

import pytest
import torch
from conftest import run_script

# micro_files is a fixture
from runs import micro_args, micro_files, start_paused, train_in_process  # noqa: F401

MAX_STEPS = 10
TOLERANCE = 1e-5


def step_logs(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["learning_rate"]) for e in state["log_history"] if "loss" in e}


def assert_same_run(out, reference, resumed_after):
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["train"]["global_step"] == expected["train"]["global_step"] == MAX_STEPS
    assert (
        abs(results["validation"]["eval_loss"] - expected["validation"]["eval_loss"]) <= TOLERANCE
    )
    resumed, full = step_logs(out), step_logs(reference)
    assert sorted(resumed) == sorted(full) == list(range(1, MAX_STEPS + 1))
    for step, (
        loss,
        lr,
    ) in resumed.items():  # data order and LR schedule continue where they stopped
        assert abs(loss - full[step][0]) <= TOLERANCE and abs(lr - full[step][1]) <= 1e-12, step
    # This call trained only the steps after the checkpoint (its train_loss averages those), not
    # from scratch.
    trained = range(resumed_after + 1, MAX_STEPS + 1)
    assert (
        abs(results["train"]["train_loss"] - sum(full[s][0] for s in trained) / len(trained))
        <= TOLERANCE
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_files):
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train_in_process(micro_args(micro_files, out), monkeypatch) == 0
    return out


def test_sigkill_then_resume_skips_a_half_written_checkpoint(
    tmp_path, micro_files, reference, monkeypatch, caplog
):
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

    assert (
        train_in_process([*micro_args(micro_files, out), "--resume_from_checkpoint"], monkeypatch)
        == 0
    )
    skipped = [
        r.getMessage() for r in caplog.records if "skipping incomplete checkpoint" in r.getMessage()
    ]
    assert skipped == [
        f"skipping incomplete checkpoint {half}: "
        f"trainer_state.json is missing (the save was interrupted)"
    ]
    assert (out / "corrupt-checkpoint-8" / "model.safetensors").stat().st_size == len(data) // 2
    assert_same_run(out, reference, resumed_after=4)


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes(
    tmp_path, micro_files, reference, monkeypatch
):
    out = tmp_path / "run"
    markers = tmp_path / "markers"
    proc = start_paused(micro_args(micro_files, out), markers, 6)
    proc.send_signal(signal.SIGTERM)
    (markers / "go").touch()  # the step in progress finishes, then the checkpoint is saved
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "received SIGTERM: saving a checkpoint at the end of this step" in output
    assert (
        "wikigpt: training stopped by SIGTERM at step 7; checkpoint saved in "
        f"{out / 'checkpoint-7'}. To continue, rerun the same command with "
        "--resume_from_checkpoint latest"
    ) in output
    assert "Traceback" not in output
    assert sorted(os.listdir(out)) == [
        "checkpoint-4",
        "checkpoint-7",
    ]  # no final model, no results.json
    assert json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())["global_step"] == 7

    assert (
        train_in_process(
            [*micro_args(micro_files, out), "--resume_from_checkpoint", "latest"], monkeypatch
        )
        == 0
    )
    assert_same_run(out, reference, resumed_after=7)


def test_overwrite_output_dir_never_resumes_or_names_the_earlier_run(
    tmp_path, micro_files, monkeypatch
):
    # Run A leaves checkpoint-4 and checkpoint-6; run B, with --overwrite_output_dir, saves only
    # checkpoint-2.
    from wikigpt.reliability.checkpoints import last_good_checkpoint, plan_resume

    out = tmp_path / "run"
    assert (
        train_in_process(micro_args(micro_files, out, max_steps=6, save_steps=2), monkeypatch) == 0
    )
    argv = micro_args(
        micro_files, out, "--overwrite_output_dir", "--seed", 7, max_steps=2, save_steps=2
    )
    assert train_in_process(argv, monkeypatch) == 0
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [
        "checkpoint-2",
        "previous-run-checkpoint-4",
        "previous-run-checkpoint-6",
    ]
    # `latest` and the preemption/NaN messages (last_good_checkpoint) see run B's checkpoint only.
    assert plan_resume("latest", str(out)).path == str(out / "checkpoint-2")
    assert last_good_checkpoint(str(out)) == str(out / "checkpoint-2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["max_steps"] == 2


LEVERS = [
    "--rare_tokens_below",
    4,
    "--rare_token_groups",
    "spelling",
    "--rare_input_dropout",
    0.1,
    "--optim_matrices",
    "muon",
    "--chunked_loss_size",
    64,
    "--calibrate_temperature",
    "true",
    "--calibrate_token_offsets",
    "true",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    4,
]


def lever_args(files, out, teacher, *extra) -> list:
    """The micro run with the CPU recipe's levers; the teacher is the tiny_checkpoint fixture."""
    return micro_args(files, out, *LEVERS, "--distill_from", teacher, *extra)


@pytest.fixture(scope="module")
def lever_reference(tmp_path_factory, micro_files, tiny_checkpoint):
    out = tmp_path_factory.mktemp("lever-reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train_in_process(lever_args(micro_files, out, tiny_checkpoint), monkeypatch) == 0
    return out


def plain_perplexity(model_dir, validation_file) -> float:
    """exp(mean NLL) of plain AutoModelForCausalLM.from_pretrained(model_dir) on 32-token blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wikigpt.data.blocks import DataArguments, load_raw_splits, prepare_lm_splits

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    raw = load_raw_splits(
        DataArguments(validation_file=str(validation_file)), 42, required=("validation",)
    )
    blocks, _ = prepare_lm_splits(raw, AutoTokenizer.from_pretrained(model_dir), 32)
    ids = torch.tensor(blocks["validation"]["input_ids"])
    with torch.no_grad():
        loss = model(
            input_ids=ids, labels=ids
        ).loss  # every block has 31 scored tokens: the mean is over all
    return math.exp(loss.item())


def test_a_run_with_the_levers_resumes_to_the_same_model(
    tmp_path, micro_files, tiny_checkpoint, lever_reference, monkeypatch
):
    out = tmp_path / "run"
    argv = lever_args(micro_files, out, tiny_checkpoint)
    proc = start_paused(argv, tmp_path / "markers", 6)
    proc.kill()  # steps 5-6 are lost; checkpoint-4 (with its wikigpt_run.json) is the last save
    proc.communicate(timeout=60)
    assert sorted(os.listdir(out)) == ["checkpoint-4"]
    record = json.loads((out / "checkpoint-4" / "wikigpt_run.json").read_text())
    assert (
        record["levers"]["rare_tokens_below"] == 4 and record["levers"]["optim_matrices"] == "muon"
    )

    assert train_in_process([*argv, "--resume_from_checkpoint", "latest"], monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((lever_reference / "results.json").read_text())
    assert results["train"]["global_step"] == MAX_STEPS
    assert results["validation"]["eval_loss"] == pytest.approx(
        expected["validation"]["eval_loss"], rel=1e-3
    )
    assert (
        json.loads((out / "wikigpt_run.json").read_text()) == record
    )  # the final folder's record too

    # The saved model, calibrations folded in, is plain GPT-2: from_pretrained gives eval.py's.
    report = tmp_path / "eval.json"
    proc = run_script(
        "eval.py",
        "--model",
        out,
        "--validation_file",
        micro_files["validation"],
        "--split",
        "validation",
        "--methods",
        "blocks",
        "--output_file",
        report,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_eval = json.loads(report.read_text())["metrics"]["perplexity"]["value"]
    plain = plain_perplexity(out, micro_files["validation"])
    assert plain == pytest.approx(from_eval, rel=1e-4)
    assert plain == pytest.approx(
        results["validation"]["eval_perplexity"], rel=1e-4
    )  # results.json's


def test_resuming_with_another_lever_setting_is_refused(
    tmp_path, micro_files, tiny_checkpoint, lever_reference, monkeypatch, capsys
):
    checkpoint = lever_reference / "checkpoint-8"  # kept: --save_total_limit 2 keeps 8 and 10
    before = sorted(p.name for p in lever_reference.rglob("*"))
    argv = lever_args(
        micro_files,
        tmp_path / "run",
        tiny_checkpoint,
        "--rare_tokens_below",
        5,
        "--resume_from_checkpoint",
        checkpoint,
    )
    assert train_in_process(argv, monkeypatch) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume_from_checkpoint {str(checkpoint)!r} was trained with "
        f"--rare_tokens_below 4; this run has 5: resume with the checkpoint's settings or start a "
        f"new --output_dir"
    )
    assert (
        sorted(p.name for p in lever_reference.rglob("*")) == before
        and not (tmp_path / "run").exists()
    )
