"""eval.py --ngram_order, --block_cache: the weight fit, the per-block n-gram and cache scores, the
report, and the refusals."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO
from transformers import GPT2LMHeadModel

from wikigpt.data.blocks import DataArguments, load_raw_splits, prepare_lm_splits, tokenize
from wikigpt.errors import UsageError
from wikigpt.evaluation.run import EvalArguments, evaluate_split
from wikigpt.evaluation.kneser_ney import KneserNey
from wikigpt.evaluation.mixture import (
    block_cache_nll,
    check_run_split,
    fit_weights,
    mixture_nll,
    ngram_block_nll,
)


@pytest.mark.parametrize("true_weight", [0.05, 0.3, 0.8])
def test_fit_weight_recovers_the_rate_tokens_were_drawn_from_the_ngram(true_weight):
    rng = np.random.default_rng(0)
    model_p, ngram_p = rng.dirichlet(np.ones(40), size=2)
    from_ngram = rng.random(40_000) < true_weight
    tokens = np.where(
        from_ngram, rng.choice(40, 40_000, p=ngram_p), rng.choice(40, 40_000, p=model_p)
    )
    nlls = [-np.log(model_p[tokens]), -np.log(ngram_p[tokens])]
    model_weight, weight = fit_weights(nlls)
    assert weight == pytest.approx(
        true_weight, abs=0.03
    ) and model_weight + weight == pytest.approx(1)
    # the fitted weight is the minimum of the mean mixture NLL
    at = lambda w: mixture_nll(nlls, [1 - w, w]).mean()  # noqa: E731
    assert at(weight) < at(weight + 0.02) and at(weight) < at(max(weight - 0.02, 1e-6))


def test_fit_weight_is_near_zero_for_an_ngram_that_is_always_worse():
    model_nll = np.random.default_rng(1).uniform(1, 8, size=5000)
    assert fit_weights([model_nll, model_nll + math.log(2)])[1] < 1e-3


def test_three_weights_recover_the_rates_and_a_component_may_give_zero():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(30), size=3)
    p[2, :10] = 0  # a cache: no probability for tokens it has not held
    p[2] /= p[2].sum()
    source = rng.choice(3, 60_000, p=[0.5, 0.3, 0.2])
    tokens = np.array([rng.choice(30, p=p[k]) for k in source])
    with np.errstate(divide="ignore"):
        nlls = [-np.log(p[k][tokens]) for k in range(3)]
    assert fit_weights(nlls) == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


def test_mixture_nll_is_the_nll_of_the_interpolated_probability():
    value = mixture_nll(
        [np.array([-math.log(0.5)]), np.array([-math.log(0.1)]), np.array([math.inf])],
        [0.6, 0.25, 0.15],
    )
    assert value[0] == pytest.approx(-math.log(0.6 * 0.5 + 0.25 * 0.1))


def test_block_cache_counts_only_the_tokens_before_in_the_same_block():
    nll = block_cache_nll([[5, 5, 6, 5], [6, 7, 6]])
    # block 1: 5 after [5] -> 1/1; 6 after [5, 5] -> none; 5 after [5, 5, 6] -> 2/3. block 2 starts
    # empty: 7 -> none
    expected = [0.0, math.inf, -math.log(2 / 3), math.inf, -math.log(1 / 2)]
    assert nll.tolist() == pytest.approx(expected)


def test_ngram_block_nll_skips_each_first_token_and_reads_only_its_own_block():
    ngram = KneserNey([1, 2, 3, 1, 2, 4, 2, 3, 3, 1], order=2, vocab_size=6)
    nll = ngram_block_nll(ngram, [[1, 2, 3], [4, 2, 5]])
    assert len(nll) == 4
    # block 2's second token is predicted from token 4 alone (its block's history), not from block
    # 1's end
    assert nll[2] == pytest.approx(-math.log(ngram.distribution([4])[2]))
    assert nll[3] == pytest.approx(-math.log(ngram.distribution([2])[5]))
    assert nll[0] == pytest.approx(-math.log(ngram.distribution([1])[2]))


def _args(small_files, **data):
    return DataArguments(
        train_file=str(small_files["train"]),
        validation_file=str(small_files["validation"]),
        test_file=str(small_files["test"]),
        block_size=64,
        **data,
    )


def test_report_adds_the_mixture_beside_the_models_own_perplexity(
    tiny_checkpoint, tokenizer, small_files
):
    data_args = _args(small_files)
    plain = evaluate_split(
        EvalArguments(model=str(tiny_checkpoint), methods="blocks"),
        data_args,
        Accelerator(cpu=True),
    )
    report = evaluate_split(
        EvalArguments(
            model=str(tiny_checkpoint),
            methods="blocks",
            ngram_order=3,
            batch_size=3,
            block_cache=True,
        ),
        data_args,
        Accelerator(cpu=True),
    )
    assert report["metrics"]["perplexity"]["value"] == pytest.approx(
        plain["metrics"]["perplexity"]["value"], rel=1e-9
    )
    details = report["counts"]["mixture"]
    assert (
        0 < details["ngram"]["weights"]["ngram"] < 1
        and 0 < details["cache"]["weights"]["cache"] < 1
    )
    assert details["ngram"]["validation_mixture_perplexity"] < min(
        details["validation_perplexity"], details["ngram_alone"]["validation_perplexity"]
    )
    assert details["ngram+cache"]["validation_mixture_perplexity"] < min(
        details["ngram"]["validation_mixture_perplexity"],
        details["cache"]["validation_mixture_perplexity"],
    )
    # the test value, recomputed here from the model's logits and the n-gram fitted on the train
    # split's tokens
    raw = load_raw_splits(data_args, 0, ("train", "test"))
    train_ids = [t for row in tokenize(raw["train"], tokenizer)["input_ids"] for t in row]
    assert details["ngram_alone"]["train_tokens"] == len(train_ids)
    ngram = KneserNey(train_ids, 3, len(tokenizer))
    blocks = torch.tensor(
        prepare_lm_splits({"test": raw["test"]}, tokenizer, 64)[0]["test"]["input_ids"]
    )
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        log_p = torch.log_softmax(model(blocks).logits[:, :-1].double(), -1)
    p_model = log_p.gather(-1, blocks[:, 1:, None])[..., 0].exp().numpy()
    p_ngram = np.stack([np.exp(ngram.log_probs(b.numpy()))[1:] for b in blocks])
    # the cache: how often each token occurred before it in its block
    p_cache = np.array(
        [[list(b[:j]).count(b[j]) / j for j in range(1, len(b))] for b in blocks.tolist()]
    )
    w = details["ngram"]["weights"]["ngram"]
    expected = math.exp(-np.log((1 - w) * p_model + w * p_ngram).mean())
    assert report["metrics"]["ngram_mixture_perplexity"]["value"] == pytest.approx(
        expected, rel=1e-5
    )
    assert (
        f"{w:.4f} x an interpolated modified Kneser-Ney 3-gram"
        in report["metrics"]["ngram_mixture_perplexity"]["method"]
    )
    w = details["cache"]["weights"]["cache"]
    expected = math.exp(-np.log((1 - w) * p_model + w * p_cache).mean())
    assert report["metrics"]["cache_mixture_perplexity"]["value"] == pytest.approx(
        expected, rel=1e-5
    )
    w = details["ngram+cache"]["weights"]
    expected = math.exp(
        -np.log(w["model"] * p_model + w["ngram"] * p_ngram + w["cache"] * p_cache).mean()
    )
    assert report["metrics"]["ngram_cache_mixture_perplexity"]["value"] == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(ngram_order=-1),
            "--ngram_order must be 0 (off) or an n-gram order such as 4; got -1",
        ),
        (
            dict(ngram_order=4, methods="documents"),
            "--ngram_order mixes the n-gram into the blocks method; add blocks to --methods (got "
            "'documents')",
        ),
        (
            dict(ngram_order=4, split="validation"),
            "--ngram_order fits its mixture's weights on the validation split; score another "
            "split: --split test (got 'validation')",
        ),
        (
            dict(block_cache=True, methods="sliding_window"),
            "--block_cache mixes the cache into the blocks method; add blocks to --methods (got "
            "'sliding_window')",
        ),
    ],
)
def test_bad_ngram_flags_are_refused(tiny_checkpoint, small_files, flags, message):
    with pytest.raises(UsageError) as err:
        evaluate_split(
            EvalArguments(model=str(tiny_checkpoint), **flags),
            _args(small_files),
            Accelerator(cpu=True),
        )
    assert str(err.value) == message


def test_without_a_train_split_the_flag_names_it(tiny_checkpoint, small_files):
    with pytest.raises(
        UsageError, match=r"^no train split: pass --train_file \(or --dataset_dir\)$"
    ):
        evaluate_split(
            EvalArguments(model=str(tiny_checkpoint), methods="blocks", ngram_order=2),
            DataArguments(test_file=str(small_files["test"]), block_size=64),
            Accelerator(cpu=True),
        )


def test_a_split_other_than_the_runs_is_refused(tmp_path, tiny_checkpoint, small_files):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    (run / "results.json").write_text(
        json.dumps({"data": {"train": {"tokens": 1000}, "validation": {"tokens": 50}}})
    )
    with pytest.raises(UsageError) as err:
        evaluate_split(
            EvalArguments(model=str(run), methods="blocks", ngram_order=2),
            _args(small_files, validation_split_percentage=10),
            Accelerator(cpu=True),
        )
    assert str(err.value).startswith(
        "--ngram_order: these data flags give train/validation splits of "
    )
    assert str(err.value).endswith(
        f"but {run} trained on 1,000 / 50 (its results.json); pass the data flags "
        f"train.py ran with (--train_file, --validation_file or "
        f"--validation_split_percentage, and --seed)"
    )
    check_run_split(
        str(run), {"train": {"tokens": 1000}, "validation": {"tokens": 50}}
    )  # the run's own: accepted


def test_two_processes_give_the_one_process_mixture(tmp_path, tiny_checkpoint, small_files):
    """Per-token NLLs gathered from 2 processes (uneven last batch: even batching repeats blocks)
    line up with the n-gram's as on one process."""
    args = [
        "--model",
        tiny_checkpoint,
        "--methods",
        "blocks",
        "--ngram_order",
        3,
        "--train_file",
        small_files["train"],
        "--validation_file",
        small_files["validation"],
        "--test_file",
        small_files["test"],
        "--block_size",
        64,
        "--batch_size",
        4,
        "--output_file",
        tmp_path / "two.json",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    proc = subprocess.run(
        [*launch, str(REPO / "eval.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate_split(
        EvalArguments(model=str(tiny_checkpoint), methods="blocks", ngram_order=3, batch_size=4),
        _args(small_files),
        Accelerator(cpu=True),
    )
    assert (
        two["processes"] == 2 and two["counts"]["blocks"]["blocks"] % 8
    )  # the last batch is uneven
    two_mixture, one_mixture = two["counts"]["mixture"], one["counts"]["mixture"]
    assert two_mixture["validation_perplexity"] == pytest.approx(
        one_mixture["validation_perplexity"], rel=1e-6
    )
    assert two_mixture["ngram_alone"] == pytest.approx(one_mixture["ngram_alone"], rel=1e-6)
    assert two_mixture["ngram"]["weights"] == pytest.approx(
        one_mixture["ngram"]["weights"], rel=1e-6
    )
    assert two["metrics"]["ngram_mixture_perplexity"]["value"] == pytest.approx(
        one["metrics"]["ngram_mixture_perplexity"]["value"], rel=1e-6
    )
