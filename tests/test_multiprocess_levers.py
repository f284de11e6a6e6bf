"""The CPU recipe's levers on 2 CPU processes (accelerate, gloo) against 1 process at the same
global batch: rare tokens by spelling, Muon, the chunked loss, the temperature.

Random masks are drawn by each process from its own generator, so --rare_input_dropout, like
dropout (off in tests/test_multiprocess.py), is off here: with it the two layouts see different
masks (held-out loss 1.8e-3 apart after 6 steps), as with dropout."""

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
    "--calibrate_temperature",
    "true",
]


@pytest.fixture(scope="module")
def lever_runs(tmp_path_factory, small_files):
    d = tmp_path_factory.mktemp("multiprocess-levers")
    validation = write_lines(d / "valid.raw", WT2 / "wiki.test.raw", 0, 36)
    one = run(
        [
            sys.executable,
            REPO / "train.py",
            *train_args(small_files, validation, d / "one", 4, 8),
            *LEVERS,
        ],
        d / "cache-one",
    )
    two = run(
        [
            *LAUNCH,
            REPO / "train.py",
            *train_args(small_files, validation, d / "two", 2, 4),
            *LEVERS,
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
    assert r2["validation"]["eval_token_loss"] == pytest.approx(
        r1["validation"]["eval_token_loss"], rel=1e-3
    )
    assert r2["calibration"]["temperature"] == pytest.approx(
        r1["calibration"]["temperature"], rel=1e-3
    )
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
