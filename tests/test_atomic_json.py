"""wikigpt/atomic_json.py: a results file is replaced whole or not at all."""

import json
import os

import pytest

from wikigpt.atomic_json import write_json_atomic


class Unprintable:
    def __str__(self):
        raise RuntimeError("disk full, or killed, half-way through writing")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(str(path), {"eval_loss": 3.5})
    with pytest.raises(RuntimeError):
        write_json_atomic(
            str(path), {"eval_loss": 1.0, "note": Unprintable()}
        )  # fails after "eval_loss" is written
    assert json.loads(path.read_text()) == {"eval_loss": 3.5}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_replaces_and_creates_the_directory(tmp_path):
    path = tmp_path / "new" / "results.json"
    write_json_atomic(str(path), {"a": 1})
    write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and os.listdir(path.parent) == ["results.json"]
