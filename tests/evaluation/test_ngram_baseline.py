"""wikigpt.evaluation.kneser_ney + benchmarks/ngram_baseline.py: modified Kneser-Ney distributions
are normalised and match a hand computation; the script scores real WikiText-2 slices and writes its
JSON; bad input gets one error line."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TOKENIZER_DIR, WT2, run_script, write_lines

from wikigpt.evaluation.kneser_ney import KneserNey

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def toy_stream():
    """600 tokens of a repetitive 40-token language inside the GPT-2 vocabulary, so contexts of
    every order recur."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 40, size=rng.integers(2, 6)) for _ in range(15)]
    return np.concatenate([phrases[i] for i in rng.integers(0, 15, size=200)])[:600] + 1000


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_full_vocabulary_sums_to_one_for_seen_and_unseen_contexts(toy_stream, order):
    model = KneserNey(toy_stream, order, GPT2_VOCAB)
    seen = list(toy_stream[100:104])  # every suffix of it is a train context
    unseen = [7, 8, 9, 10]  # tokens never in training
    mixed = [7, *toy_stream[101:104]]  # unseen first token, seen suffix: backs off part of the way
    for context in ([], seen, unseen, mixed, seen[-1:]):
        p = model.distribution(context)
        assert p.shape == (GPT2_VOCAB,)
        assert p.sum() == pytest.approx(1.0, abs=1e-9), (order, context)
        assert p.min() > 0  # unseen tokens get mass through the lower orders and the uniform
        # The stream scorer gives the same probabilities as the full distribution (different code
        # path).
        for w in (int(toy_stream[104]), 7, 49000):
            assert math.exp(model.log_probs([*context, w])[-1]) == pytest.approx(p[w], rel=1e-9)
    if (
        order > 1
    ):  # a seen context changes the prediction, an unseen one falls back to the shorter history
        assert not np.allclose(
            model.distribution(seen),
            model.distribution(seen[len(seen) - order + 2 :] if order > 2 else []),
        )
        np.testing.assert_allclose(model.distribution(unseen), model.distribution([]))


def test_bigram_matches_a_hand_computation():
    # Tokens 1-4 in training, vocabulary of 6 (0 and 5 never seen).
    tokens = [4, 3, 1, 3, 2, 1, 4, 1, 3, 1, 1, 2, 3, 1, 2, 3, 1, 3]
    V = 6
    # Bigram counts, by hand: (3,1) 4, (1,3) 3, (1,2) 2, (2,3) 2, and once each (4,3) (3,2) (2,1)
    # (1,4) (4,1) (1,1) -> count-of-counts n1..n4 = 6, 2, 1, 1.
    y = 6 / (6 + 2 * 2)
    d1, d2, d3 = 1 - 2 * y * 2 / 6, 2 - 3 * y * 1 / 2, 3 - 4 * y * 1 / 1  # 0.6, 1.1, 0.6
    # Unigram continuation counts (distinct predecessors): 1 <- {3,2,4,1} 4, 3 <- {4,1,2} 3, 2 <-
    # {3,1} 2, 4 <- {1} 1; total 10, count-of-counts 1, 1, 1, 1.
    u = 1 / (1 + 2 * 1)
    e1, e2, e3 = 1 - 2 * u, 2 - 3 * u, 3 - 4 * u  # 1/3, 1, 5/3
    gamma_unigram = (
        e1 * 1 + e2 * 1 + e3 * 2
    ) / 10  # one token each with count 1 and 2, two with >= 3
    p1 = {
        w: max(c - (e3 if c >= 3 else e2 if c == 2 else e1), 0) / 10 + gamma_unigram / V
        for w, c in {0: 0, 1: 4, 2: 2, 3: 3, 4: 1, 5: 0}.items()
    }
    # After token 1: (1,3) 3, (1,2) 2, (1,4) 1, (1,1) 1 -> total 7, N1 = 2, N2 = 1, N3+ = 1.
    gamma_1 = (d1 * 2 + d2 * 1 + d3 * 1) / 7
    expected = {
        3: (3 - d3) / 7 + gamma_1 * p1[3],
        2: (2 - d2) / 7 + gamma_1 * p1[2],
        4: (1 - d1) / 7 + gamma_1 * p1[4],
        0: gamma_1 * p1[0],
    }
    assert expected[3] == pytest.approx(
        2.4 / 7 + 2.9 / 7 * 19 / 90
    )  # the arithmetic above, written out

    model = KneserNey(tokens, 2, V)
    assert model.discounts[2] == pytest.approx((0.6, 1.1, 0.6))
    assert model.discounts[1] == pytest.approx((1 / 3, 1, 5 / 3))
    p = model.distribution([1])
    for w, value in expected.items():
        assert p[w] == pytest.approx(value, rel=1e-12), w
    # Context 0 was never seen: the unigram (continuation) distribution; the first token of a stream
    # gets it too.
    np.testing.assert_allclose(model.distribution([0]), [p1[w] for w in range(V)], rtol=1e-12)
    assert model.log_probs([3, 1])[0] == pytest.approx(math.log(p1[3]), rel=1e-12)


def hub_rows_token_count(path, tokenizer) -> int:
    """Tokens of a file read as the Hub's wikitext rows (newline kept, whitespace-only lines
    empty)."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return sum(len(ids) for ids in tokenizer(rows)["input_ids"])


def test_script_scores_real_slices_and_writes_the_json(tmp_path, tokenizer):
    train = write_lines(tmp_path / "train.raw", WT2 / "wiki.valid.raw", 0, 300)
    test = write_lines(tmp_path / "test.raw", WT2 / "wiki.test.raw", 0, 60)
    out = tmp_path / "results" / "ngram.json"
    proc = run_script(
        "benchmarks/ngram_baseline.py",
        "--train_file",
        train,
        "--test_file",
        test,
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--max_order",
        3,
        "--output_json",
        out,
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    train_tokens, test_tokens = (
        hub_rows_token_count(train, tokenizer),
        hub_rows_token_count(test, tokenizer),
    )
    assert report["vocab_size"] == GPT2_VOCAB
    assert (report["train_tokens"], report["test_tokens"]) == (train_tokens, test_tokens)
    assert [r["order"] for r in report["results"]] == [1, 2, 3]
    for r in report["results"]:
        assert (r["train_tokens"], r["test_tokens"]) == (train_tokens, test_tokens)
        assert r["perplexity"] == pytest.approx(math.exp(r["nll_per_token"]), rel=1e-4)
        assert r["seconds"] >= 0 and sorted(r["discounts"]) == [
            str(k) for k in range(1, r["order"] + 1)
        ]
        row = (
            f"{r['order']:>5} | {r['perplexity']:>15,.2f} | {train_tokens:>12,} | "
            f"{test_tokens:>11,} |"
        )
        assert row in proc.stdout
    # On real text a bigram model beats the unigram by a wide margin, and no model does worse than
    # uniform.
    ppl = [r["perplexity"] for r in report["results"]]
    assert ppl[1] < 0.7 * ppl[0] < GPT2_VOCAB
    assert report["command"].startswith("python benchmarks/ngram_baseline.py --train_file")
    assert "first token" in report["first_token"]


def test_missing_train_file_is_one_error_line_and_nothing_written(tmp_path):
    out = tmp_path / "ngram.json"
    out.write_text("precious")
    test = write_lines(tmp_path / "test.raw", WT2 / "wiki.test.raw", 0, 20)
    proc = run_script(
        "benchmarks/ngram_baseline.py",
        "--train_file",
        tmp_path / "nope.raw",
        "--test_file",
        test,
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--output_json",
        out,
        timeout=600,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [
        (
            f"error: --train_file {str(tmp_path / 'nope.raw')!r} does not exist; "
            f"pass the path of an existing file"
        )
    ]
    assert out.read_text() == "precious"


def test_defaults_are_the_bundled_files():
    """Run without flags, the script scores the repository's own WikiText-2 files with its own
    tokenizer."""
    spec = importlib.util.spec_from_file_location(
        "ngram_baseline", REPO / "benchmarks" / "ngram_baseline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.NgramArguments()
    assert (
        Path(args.train_file) == WT2 / "wiki.valid.raw"
        and Path(args.test_file) == WT2 / "wiki.test.raw"
    )
    assert Path(args.tokenizer_name) == TOKENIZER_DIR
    assert all(
        Path(p).resolve().is_relative_to(REPO)
        for p in (args.train_file, args.test_file, args.tokenizer_name)
    )
