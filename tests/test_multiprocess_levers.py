"""The CPU recipe's levers on 2 CPU processes (accelerate, gloo) against 1 process at the same
global batch: rare tokens by spelling with their input dropout, Muon, the chunked loss, a teacher,
the token offsets.

--rare_input_dropout draws each block's mask from (seed, step, the block's tokens), so both layouts
draw the same masks; the model's own dropout is off, as in tests/test_multiprocess.py."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO, WT2, write_lines
from safetensors.torch import load_file
from test_multiprocess import LAUNCH, run, train_args

LEVERS = [
    "--rare_tokens_below",
    2,
    "--rare_token_groups",
    "spelling",
    "--optim_matrices",
    "muon",
    "--chunked_loss_size",
    64,
]
STUDENT = ["--rare_input_dropout", 0.1, "--calibrate_token_offsets", "true"]


@pytest.fixture(scope="module")
def lever_runs(tmp_path_factory, small_files):
    d = tmp_path_factory.mktemp("multiprocess-levers")
    validation = write_lines(d / "valid.raw", WT2 / "wiki.test.raw", 0, 36)
    teacher = run(
        [
            sys.executable,
            REPO / "train.py",
            *train_args(small_files, validation, d / "teacher", 4, 8),
            *LEVERS,
        ],
        d / "cache-teacher",
    )
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = [*LEVERS, *STUDENT, "--distill_from", d / "teacher"]
    one = run(
        [
            sys.executable,
            REPO / "train.py",
            *train_args(small_files, validation, d / "one", 4, 8),
            *student,
        ],
        d / "cache-one",
    )
    two = run(
        [
            *LAUNCH,
            REPO / "train.py",
            *train_args(small_files, validation, d / "two", 2, 4),
            *student,
        ],
        d / "cache-two",
    )
    return d, one, two


def test_two_processes_train_the_levers_like_one(lever_runs):
    d, one, two = lever_runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((d / name / "results.json").read_text()) for name in ("one", "two"))
    assert r2["hardware"]["processes"] == 2
    assert r1["levers"] == r2["levers"] and r1["levers"]["muon"] == {"learning_rate": 0.02}
    assert r1["levers"]["teacher"]["share"] == 0.5
    assert r1["levers"]["rare_tokens"]["input_dropout"] == 0.1
    # the same masks and blocks; gloo's summation order, rounded by Muon's bf16 Newton-Schulz on a
    # CPU with native bf16, leaves 2e-6 to 3e-5 (masks drawn apart: calibrated perplexity > 1e-3)
    assert r2["train"]["train_loss"] == pytest.approx(r1["train"]["train_loss"], rel=1e-4)
    assert r2["validation"]["eval_token_loss"] == pytest.approx(
        r1["validation"]["eval_token_loss"], rel=1e-4
    )
    o1, o2 = r1["token_offsets"], r2["token_offsets"]
    assert o1.keys() == o2.keys() and o1["tokens"] == o2["tokens"]
    for key in ("validation_perplexity_before", "validation_perplexity_after"):
        assert o2[key] == pytest.approx(o1[key], rel=1e-4)
    for key in ("scales", "offsets", "rank_slopes"):  # a fit on weights 1e-3 apart (below)
        np.testing.assert_allclose(o2[key], o1[key], rtol=0, atol=5e-3)
    # the rare tokens' rows: equal within each run's groups, and the same in both runs
    rare = r1["model"]["rare_tokens"]
    w1, w2 = (
        load_file(d / name / "model.safetensors")["transformer.wte.weight"].numpy()
        for name in ("one", "two")
    )
    # Muon's bf16 Newton-Schulz (a CPU with native bf16) rounds gloo's summation order apart
    np.testing.assert_allclose(w2, w1, rtol=0, atol=1e-3)
    assert rare["tied"] > 0 and len(rare["groups"]) == 6
    for weights in (w1, w2):  # the kept tokens' rows, then one row per spelling group
        assert len(np.unique(weights, axis=0)) == rare["kept"] + 6
