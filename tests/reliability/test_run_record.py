"""wikigpt/reliability/run_record.py: the record a checkpoint carries, and what resuming does.

A resumed run with another split, lever or model setting is refused in one line; a checkpoint of
an older run (no record) resumes with one warning. Whole runs: tests/reliability/test_resume.py.
"""

import copy
import logging
from types import SimpleNamespace

import pytest
from runs import make_checkpoint

from wikigpt.calibration.arguments import CalibrationArguments
from wikigpt.data.blocks import DataArguments
from wikigpt.errors import UsageError
from wikigpt.model import ModelArguments
from wikigpt.objectives.arguments import LeverArguments
from wikigpt.reliability.run_record import (
    RECORD_FILE,
    check_resume_record,
    may_hold_out,
    read_run_record,
    run_record,
    write_run_record,
)

FIX = "resume with the checkpoint's settings or start a new --output_dir"


def record_of(train_file="train.raw", **levers) -> dict:
    training = SimpleNamespace(
        seed=42, data_seed=None, optim_matrices="muon", muon_learning_rate=0.02
    )
    return run_record(
        ModelArguments(preset="tiny"),
        DataArguments(train_file=train_file),
        LeverArguments(**levers),
        CalibrationArguments(calibrate_temperature=True),
        training,
    )


@pytest.fixture
def checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "run" / "checkpoint-4", 4)
    write_run_record(str(path), record_of(rare_tokens_below=4))
    return path


def test_the_record_round_trips_and_names_every_lever(checkpoint):
    saved = read_run_record(str(checkpoint))
    assert saved == record_of(rare_tokens_below=4)
    assert (
        saved["split"]["train_file"].endswith("/train.raw")
        and saved["split"]["dataset_name"] is None
    )
    assert set(saved["levers"]) == {
        "rare_tokens_below",
        "rare_token_groups",
        "rare_input_dropout",
        "distill_from",
        "distill_share",
        "chunked_loss_size",
        "optim_matrices",
        "muon_learning_rate",
        "calibrate_temperature",
        "calibrate_token_offsets",
    }
    check_resume_record(str(checkpoint), record_of(rare_tokens_below=4))  # the same run: resumes


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["split"].update(seed=7), "was trained with --seed 42; this run has 7"),
        (
            lambda r: r["levers"].update(distill_from="teacher"),
            "was trained without --distill_from; this run has teacher",
        ),
        (
            lambda r: r["levers"].update(calibrate_temperature=False),
            "was trained with --calibrate_temperature true; this run has false",
        ),
        (
            lambda r: r["model"].update(config_overrides="n_embd=16"),
            "was trained without --config_overrides; this run has n_embd=16",
        ),
    ],
)
def test_resuming_with_another_setting_is_refused_in_one_line(checkpoint, change, message):
    record = copy.deepcopy(record_of(rare_tokens_below=4))
    change(record)
    with pytest.raises(UsageError) as refused:
        check_resume_record(str(checkpoint), record)
    assert str(refused.value) == f"--resume_from_checkpoint {str(checkpoint)!r} {message}: {FIX}"


def test_a_checkpoint_without_a_record_resumes_with_one_warning(tmp_path, caplog):
    path = make_checkpoint(tmp_path / "checkpoint-2", 2)
    with caplog.at_level(logging.WARNING, logger="wikigpt.reliability.run_record"):
        check_resume_record(str(path), record_of())
    assert [r.getMessage() for r in caplog.records] == [
        f"--resume_from_checkpoint {str(path)!r} has no {RECORD_FILE} (saved by an older wikigpt): "
        f"its data split and levers are not checked against this run's"
    ]


def test_only_a_split_without_a_validation_source_is_held_out(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text("x")
    assert may_hold_out({"train_file": "/a", "validation_file": None, "dataset_dir": None})
    assert not may_hold_out({"train_file": "/a", "validation_file": "/b", "dataset_dir": None})
    assert not may_hold_out({"validation_file": None, "dataset_dir": str(tmp_path)})
    assert may_hold_out({"validation_file": None, "dataset_dir": None, "dataset_name": "wikitext"})
