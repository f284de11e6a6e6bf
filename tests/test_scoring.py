"""wikigpt/scoring.py: windows of each method, and scores equal to the simplest reference computations."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import WT2

from wikigpt.metrics import load_corpus_perplexity
from wikigpt.scoring import block_windows, rolling_windows, score_windows, sliding_windows


def scored_positions(windows, offsets):
    """Token positions (in the original sequence) each window scores, given where each window starts."""
    return [p for w, start in zip(windows, offsets) for p in range(start + len(w["ids"]) - w["n_scored"],
                                                                   start + len(w["ids"]))]


def test_sliding_windows_score_every_token_but_the_first_once():
    ids = list(range(10))
    assert sliding_windows(ids, 4, 4) == [{"ids": [0, 1, 2, 3], "n_scored": 3}, {"ids": [4, 5, 6, 7], "n_scored": 3},
                                          {"ids": [8, 9], "n_scored": 1}]
    assert sliding_windows(ids, 4, 2) == [{"ids": [0, 1, 2, 3], "n_scored": 3}, {"ids": [2, 3, 4, 5], "n_scored": 2},
                                          {"ids": [4, 5, 6, 7], "n_scored": 2}, {"ids": [6, 7, 8, 9], "n_scored": 2}]
    for stride in (1, 2, 3):
        windows = sliding_windows(ids, 4, stride)
        assert scored_positions(windows, range(0, 10, stride)) == list(range(1, 10))


def test_rolling_windows_match_the_harness():
    # lm-evaluation-harness get_rolling_token_windows(ids, prefix 99, max_seq_len 4, context_len 1) followed by
    # make_disjoint_window, written out by hand: model input = ids[:-1], the last n_scored tokens predicted.
    assert rolling_windows(list(range(10)), 4, 99) == [
        {"ids": [99, 0, 1, 2, 3], "n_scored": 4},
        {"ids": [3, 4, 5, 6, 7], "n_scored": 4},
        {"ids": [5, 6, 7, 8, 9], "n_scored": 2},  # the last partial window re-reads earlier context
    ]
    assert rolling_windows([7, 8], 4, 99) == [{"ids": [99, 7, 8], "n_scored": 2}]
    assert rolling_windows([], 4, 99) == []


@pytest.fixture(scope="module")
def model_and_ids(tiny_checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    lines = (WT2 / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:30]
    ids = tokenizer("\n".join(lines))["input_ids"]
    return model, ids  # n_positions 128; ~1.7k real WikiText-2 tokens


def score(model, windows, batch_size=3):
    return score_windows(model, windows, load_corpus_perplexity(), Accelerator(cpu=True), batch_size, pad_id=0)


def test_blocks_equal_the_models_own_loss(model_and_ids):
    model, ids = model_and_ids
    blocks = [ids[i: i + 64] for i in range(0, len(ids) - 63, 64)]
    nll = 0.0
    with torch.no_grad():
        for block in blocks:  # the reference: HF's loss (mean over the 63 shifted labels) times 63
            t = torch.tensor([block])
            nll += model(t, labels=t).loss.item() * 63
    result = score(model, block_windows(blocks))
    assert result["tokens"] == 63 * len(blocks)
    assert result["perplexity"] == pytest.approx(math.exp(nll / result["tokens"]), rel=1e-5)


def test_sliding_window_equals_the_hf_guide_loop(model_and_ids):
    model, ids = model_and_ids
    context, stride = 128, 48
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():  # the guide's loop, counting exactly the labels the shifted loss uses
        for begin in range(0, len(ids), stride):
            end = min(begin + context, len(ids))
            trg_len = end - prev_end
            input_ids = torch.tensor([ids[begin:end]])
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            n = int((target_ids[:, 1:] != -100).sum())
            nll += model(input_ids, labels=target_ids).loss.item() * n
            count += n
            prev_end = end
            if end == len(ids):
                break
    result = score(model, sliding_windows(ids, context, stride))
    assert result["tokens"] == count == len(ids) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_stride_equal_to_context_is_disjoint_windows(model_and_ids):
    model, ids = model_and_ids
    disjoint = [ids[i: i + 128] for i in range(0, len(ids), 128)]  # the last one partial
    assert sliding_windows(ids, 128, 128) == block_windows(disjoint)
    assert score(model, sliding_windows(ids, 128, 128))["perplexity"] == \
        pytest.approx(score(model, block_windows(disjoint), batch_size=5)["perplexity"], rel=1e-6)


def test_rolling_windows_equal_token_by_token_reference(model_and_ids):
    model, ids = model_and_ids
    doc, context, prefix = ids[:300], 128, 50256
    seq, nll = [prefix] + doc, 0.0
    with torch.no_grad():  # each chunk of `context` targets, read with as much context as fits
        for p in range(0, len(doc), context):
            e = min(p + context, len(doc))
            inputs = seq[max(0, e - context): e]
            logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
            for target in range(p, e):  # doc[target] = seq[target + 1], predicted at input position target - start
                nll -= logp[target - max(0, e - context), doc[target]].item()
    result = score(model, rolling_windows(doc, context, prefix))
    assert result["tokens"] == 300
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)


class ContextOracle(torch.nn.Module):
    """A stand-in LM over the sequence 0, 1, 2, ...: it knows the next token is input + 1 and is more sure of
    it the more tokens it has read. Any method that gives tokens more context must score it better."""

    def forward(self, input_ids, attention_mask=None):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, 1000)
        confidence = torch.arange(1, width + 1, dtype=torch.float).expand(batch, width)
        logits.scatter_(2, (input_ids + 1).clamp(max=999).unsqueeze(-1), confidence.unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def test_smaller_stride_gives_lower_perplexity():
    ids = list(range(900))
    values = [score(ContextOracle(), sliding_windows(ids, 64, stride))["perplexity"] for stride in (64, 32, 8, 1)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1] * 1.01
