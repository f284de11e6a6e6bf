"""wikigpt/checkpoints.py: half-written checkpoints are found without loading them; resume picks the newest good one."""

import json
import logging
import os

import pytest
from runs import make_checkpoint
from transformers import GPT2Config
from transformers.trainer_utils import sort_checkpoints

from wikigpt.checkpoints import ResumePlan, checkpoint_problem, normalize_resume_value, plan_resume
from wikigpt.errors import UsageError


def truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


CORRUPTIONS = {
    "no_trainer_state": (lambda c: (c / "trainer_state.json").unlink(),
                         "trainer_state.json is missing (the save was interrupted)"),
    "truncated_trainer_state": (lambda c: truncate(c / "trainer_state.json"),
                                "trainer_state.json is truncated or unreadable"),
    "half_safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated ("),
    "safetensors_header_only": (lambda c: truncate(c / "model.safetensors", keep=5),
                                "model.safetensors is truncated or not a safetensors file"),
    "no_weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no_optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated_optimizer": (lambda c: truncate(c / "optimizer.pt"),
                            "optimizer.pt is truncated or not a torch.save file"),
    "no_scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "truncated_rng": (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
    "no_rng": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "step_mismatch": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'),
                      "trainer_state.json says step 3, the folder name says 4"),
}


def test_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(make_checkpoint(tmp_path / "checkpoint-4", 4)) is None


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_half_written_checkpoint_is_detected(name, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    corrupt, problem = CORRUPTIONS[name]
    corrupt(checkpoint)
    assert checkpoint_problem(checkpoint).startswith(problem)


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"wte": "model-00001-of-00002.safetensors", "wpe": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(checkpoint) == "model-00002-of-00002.safetensors is missing"


@pytest.mark.parametrize("value, expected", [
    (None, None), (False, None), ("false", None), ("", None), (True, "latest"), ("true", "latest"),
    ("latest", "latest"), ("LATEST", "latest"), ("out/checkpoint-4", "out/checkpoint-4"),
])
def test_resume_values(value, expected):
    assert normalize_resume_value(value) == expected


def test_latest_skips_incomplete_checkpoints_in_one_line_each_and_sets_them_aside(tmp_path, caplog):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-8" / "optimizer.pt").unlink()
    truncate(tmp_path / "checkpoint-6" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="wikigpt.checkpoints"):
        plan = plan_resume("latest", str(tmp_path))
    assert plan.path == str(tmp_path / "checkpoint-4")
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping incomplete checkpoint {tmp_path / 'checkpoint-8'}: optimizer.pt is missing",
        f"skipping incomplete checkpoint {tmp_path / 'checkpoint-6'}: model.safetensors is truncated "
        f"({(tmp_path / 'checkpoint-6' / 'model.safetensors').stat().st_size} of "
        f"{(tmp_path / 'checkpoint-4' / 'model.safetensors').stat().st_size} bytes)",
    ]
    plan.set_aside_skipped(is_main_process=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "corrupt-checkpoint-6",
                                            "corrupt-checkpoint-8"]
    # The Trainer's rotation (save_total_limit) no longer counts them, so it cannot delete a good one for them.
    assert sort_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]


def test_no_good_checkpoint_is_an_error_and_changes_nothing(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    before = sorted(os.walk(tmp_path))
    with pytest.raises(UsageError) as err:
        plan_resume(True, str(tmp_path))
    assert str(err.value) == (
        f"--resume_from_checkpoint latest: no complete checkpoint in --output_dir {str(tmp_path)!r} (checkpoint-2: "
        f"trainer_state.json is missing (the save was interrupted)); pass a complete checkpoint folder, or drop "
        f"--resume_from_checkpoint and use a new --output_dir")
    assert sorted(os.walk(tmp_path)) == before


@pytest.mark.parametrize("setup, value, message", [
    (None, "latest", r"--resume_from_checkpoint latest: --output_dir '.*' has no checkpoint-N folders to resume"),
    (None, "{tmp}/nope", r"--resume_from_checkpoint '.*/nope' does not exist; pass a checkpoint-N folder, or 'latest'"),
    ("file", "{tmp}/file", r"--resume_from_checkpoint '.*/file' is a file; pass a checkpoint-N folder"),
    ("run", "{tmp}", r"--resume_from_checkpoint '.*' is a run folder, not a checkpoint; pass one of its checkpoint-N"),
    ("corrupt", "{tmp}/checkpoint-4", r"--resume_from_checkpoint '.*/checkpoint-4' is incomplete or corrupt "
                                      r"\(scheduler.pt is missing\); pass an earlier one such as '.*/checkpoint-2'"),
])
def test_bad_resume_values(setup, value, message, tmp_path):
    if setup == "file":
        (tmp_path / "file").write_text("x")
    if setup in ("run", "corrupt"):
        make_checkpoint(tmp_path / "checkpoint-2", 2)
        make_checkpoint(tmp_path / "checkpoint-4", 4)
    if setup == "corrupt":
        (tmp_path / "checkpoint-4" / "scheduler.pt").unlink()
    with pytest.raises(UsageError, match=message):
        plan_resume(value.format(tmp=tmp_path), str(tmp_path / "out"))


def test_explicit_complete_checkpoint_is_used_as_is(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", 4)
    assert plan_resume(str(checkpoint), str(tmp_path / "elsewhere")) == ResumePlan(path=str(checkpoint))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    plan = ResumePlan(path=str(make_checkpoint(tmp_path / "checkpoint-4", 4, n_embd=8)))
    plan.check_model(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=100, n_positions=32))
    with pytest.raises(UsageError, match=r"--resume_from_checkpoint '.*checkpoint-4' holds a different model "
                                         r"\(vocab_size 100 there, 50257 here; n_embd 8 there, 16 here\); resume"):
        plan.check_model(GPT2Config(n_layer=1, n_head=1, n_embd=16, vocab_size=50257, n_positions=32))
