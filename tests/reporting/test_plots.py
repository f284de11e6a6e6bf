"""Training-curve PNG from a log_history, and the --report_to tensorboard check."""

import math
import sys

import pytest
from conftest import tiny_train_args
from PIL import Image

import train
import wikigpt.reporting.plots
from wikigpt.errors import run_main
from wikigpt.reporting.plots import _perplexity_series, _series, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"loss": 10.8, "learning_rate": 0.0, "tokens_per_second": 250.0, "step": 1},
    {"loss": 10.5, "learning_rate": 6e-4, "step": 5},
    {"eval_loss": 10.4, "eval_perplexity": math.exp(10.4), "step": 5},
    {"loss": 10.1, "learning_rate": 3e-4, "step": 10},
    {"eval_loss": 10.0, "eval_perplexity": math.exp(10.0), "step": 10},
    {"train_runtime": 3.0, "train_loss": 10.4, "step": 10},
    {
        "eval_loss": 10.0,
        "eval_perplexity": math.exp(10.0),
        "step": 10,
    },  # train.py's final evaluation
    {"test_loss": 10.1, "step": 10},  # no test_perplexity: derived from the loss
]


def test_series_keep_one_point_per_step():
    assert _series(HISTORY, "loss") == ([1, 5, 10], [10.8, 10.5, 10.1])
    assert _series(HISTORY, "learning_rate") == ([1, 5, 10], [0.0, 6e-4, 3e-4])
    assert _perplexity_series(HISTORY, "eval") == ([5, 10], [math.exp(10.4), math.exp(10.0)])
    assert _perplexity_series(HISTORY, "test") == ([10], [pytest.approx(math.exp(10.1))])


@pytest.mark.parametrize(
    "history", [HISTORY, [h for h in HISTORY if "loss" in h]], ids=["with_eval", "no_eval"]
)
def test_png_is_written_and_valid(tmp_path, history):
    path = plot_training_curves(
        history, str(tmp_path / "training_curves.png"), tokens_per_step=256, title="run"
    )
    data = (tmp_path / "training_curves.png").read_bytes()
    assert path.endswith("training_curves.png") and data.startswith(PNG_MAGIC)
    with Image.open(tmp_path / "training_curves.png") as image:
        image.verify()
        assert image.size == (800, 850)


def test_report_to_tensorboard_without_the_package_is_one_error_line(
    tmp_path, small_files, monkeypatch, capsys
):
    monkeypatch.setattr(wikigpt.reporting.plots, "is_tensorboard_available", lambda: False)
    out = tmp_path / "tb"
    monkeypatch.setattr(
        sys,
        "argv",
        ["train.py", *map(str, tiny_train_args(small_files, out, "--report_to", "tensorboard"))],
    )
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2
    assert errors == [
        "error: --report_to tensorboard needs the tensorboard package, which is not installed; "
        "run `pip install tensorboard`, or drop --report_to tensorboard"
    ]
    assert not out.exists()
