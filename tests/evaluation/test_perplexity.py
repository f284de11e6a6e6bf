"""wikigpt/evaluation/perplexity.py and the corpus_perplexity `evaluate` module: corpus-level sums,
Trainer hooks, and the windows of each eval.py method, scored equal to the simplest reference
computations."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import WT2
from transformers import (
    EvalPrediction,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from wikigpt.model import mark_causal_lm_loss
from wikigpt.evaluation.perplexity import (
    block_windows,
    compute_perplexity,
    load_corpus_perplexity,
    nll_and_count,
    rolling_windows,
    score_windows,
    sequence_nll,
    sliding_windows,
)


def test_module_loads_offline_by_path_and_is_corpus_level():
    metric = load_corpus_perplexity()
    # A 1-token text with NLL 1 and a 100-token text with mean NLL 5: corpus perplexity weights
    # tokens, while the Hub "perplexity" metric would average exp(1) and exp(5) per text.
    metric.add_batch(nll_sum=[1.0], token_count=[1], word_count=[0], byte_count=[0])
    metric.add_batch(nll_sum=[500.0], token_count=[100], word_count=[0], byte_count=[0])
    result = metric.compute()
    assert result["perplexity"] == pytest.approx(math.exp(501 / 101))
    assert result["perplexity"] != pytest.approx((math.exp(1) + math.exp(5)) / 2)
    assert (
        result["tokens"] == 101 and result["nll_sum"] == 501.0 and "word_perplexity" not in result
    )


def test_word_and_byte_normalisation():
    metric = load_corpus_perplexity()
    metric.add_batch(
        nll_sum=[30.0, 10.0], token_count=[8, 4], word_count=[5, 0], byte_count=[20, 0]
    )
    result = metric.compute()
    assert result["word_perplexity"] == pytest.approx(math.exp(40 / 5))
    assert result["byte_perplexity"] == pytest.approx(math.exp(40 / 20))
    assert result["bits_per_byte"] == pytest.approx(40 / 20 / math.log(2))
    assert (result["words"], result["bytes"]) == (5, 20)


def test_no_tokens_is_an_error():
    metric = load_corpus_perplexity()
    metric.add_batch(nll_sum=[0.0], token_count=[0], word_count=[0], byte_count=[0])
    with pytest.raises(ValueError, match="no tokens were scored"):
        metric.compute()


def test_sequence_nll_and_trainer_hooks_match_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 4:] = -100  # padding the loss must skip
    stats = nll_and_count(logits, labels)
    for row in range(3):
        mask = labels[row, 1:] != -100
        expected = F.cross_entropy(logits[row, :-1][mask], labels[row, 1:][mask], reduction="sum")
        assert stats[row, 0].item() == pytest.approx(expected.item(), rel=1e-6)
        assert stats[row, 1].item() == mask.sum().item()
    nll, count = sequence_nll(logits[:, :-1], labels[:, 1:])
    assert torch.equal(count, stats[:, 1].long()) and torch.allclose(nll, stats[:, 0])
    result = compute_perplexity(EvalPrediction(predictions=stats.numpy(), label_ids=labels.numpy()))
    expected_ppl = math.exp(float(stats[:, 0].sum()) / float(stats[:, 1].sum()))
    assert result == {
        "perplexity": pytest.approx(expected_ppl),
        "token_loss": pytest.approx(math.log(expected_ppl)),
        "tokens": 13,
        "blocks": 3,
    }


def tiny_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=97)
    )
    return mark_causal_lm_loss(model).eval()


def test_trainer_evaluate_with_an_uneven_last_batch_counts_every_block_once(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 97, (11, 16))  # 11 blocks, batches of 4: the last batch holds 3
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    metrics = Trainer(
        model=model,
        args=args,
        data_collator=default_data_collator,
        compute_metrics=compute_perplexity,
        preprocess_logits_for_metrics=nll_and_count,
    ).evaluate(dataset)
    with torch.no_grad():
        per_block = [model(input_ids=r[None], labels=r[None]).loss.item() for r in ids]
    assert metrics["eval_blocks"] == 11 and metrics["eval_tokens"] == 11 * 15
    assert metrics["eval_token_loss"] == pytest.approx(np.mean(per_block), rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(np.mean(per_block)), rel=1e-6)


def test_trainer_loss_counts_shifted_labels_for_a_wikigpt_model(tmp_path, tokenizer):
    """transformers 5.23 leaves GPT-2's loss_type None and the Trainer then divides by T tokens per
    block instead of T-1; wikigpt names the loss so the Trainer's own eval_loss is the model's mean
    token loss."""
    from wikigpt.model import ModelArguments, load_model

    torch.manual_seed(0)
    model, _ = load_model(ModelArguments(preset="tiny"), tokenizer)
    ids = torch.randint(0, len(tokenizer), (8, 16))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    metrics = Trainer(model=model, args=args, data_collator=default_data_collator).evaluate(dataset)
    model.eval()
    with torch.no_grad():
        per_block = [model(input_ids=r[None], labels=r[None]).loss.item() for r in ids]
    assert metrics["eval_loss"] == pytest.approx(np.mean(per_block), rel=1e-5)  # not x 15/16


# --- eval.py's windows ----------------------------------------------------------------------------


def scored_positions(windows, offsets):
    """Token positions (in the original sequence) each window scores, given where each window
    starts."""
    return [
        p
        for w, start in zip(windows, offsets)
        for p in range(start + len(w["ids"]) - w["n_scored"], start + len(w["ids"]))
    ]


def test_sliding_windows_score_every_token_but_the_first_once():
    ids = list(range(10))
    assert sliding_windows(ids, 4, 4) == [
        {"ids": [0, 1, 2, 3], "n_scored": 3},
        {"ids": [4, 5, 6, 7], "n_scored": 3},
        {"ids": [8, 9], "n_scored": 1},
    ]
    assert sliding_windows(ids, 4, 2) == [
        {"ids": [0, 1, 2, 3], "n_scored": 3},
        {"ids": [2, 3, 4, 5], "n_scored": 2},
        {"ids": [4, 5, 6, 7], "n_scored": 2},
        {"ids": [6, 7, 8, 9], "n_scored": 2},
    ]
    for stride in (1, 2, 3):
        windows = sliding_windows(ids, 4, stride)
        assert scored_positions(windows, range(0, 10, stride)) == list(range(1, 10))


def test_rolling_windows_match_the_harness():
    # lm-evaluation-harness get_rolling_token_windows(ids, prefix 99, max_seq_len 4, context_len 1)
    # followed by make_disjoint_window, written out by hand: model input = ids[:-1], the last
    # n_scored tokens predicted.
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
    return score_windows(
        model, windows, load_corpus_perplexity(), Accelerator(cpu=True), batch_size, pad_id=0
    )


def test_blocks_equal_the_models_own_loss(model_and_ids):
    model, ids = model_and_ids
    blocks = [ids[i : i + 64] for i in range(0, len(ids) - 63, 64)]
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
    disjoint = [ids[i : i + 128] for i in range(0, len(ids), 128)]  # the last one partial
    assert sliding_windows(ids, 128, 128) == block_windows(disjoint)
    assert score(model, sliding_windows(ids, 128, 128))["perplexity"] == pytest.approx(
        score(model, block_windows(disjoint), batch_size=5)["perplexity"], rel=1e-6
    )


def test_rolling_windows_equal_token_by_token_reference(model_and_ids):
    model, ids = model_and_ids
    doc, context, prefix = ids[:300], 128, 50256
    seq, nll = [prefix] + doc, 0.0
    with torch.no_grad():  # each chunk of `context` targets, read with as much context as fits
        for p in range(0, len(doc), context):
            e = min(p + context, len(doc))
            inputs = seq[max(0, e - context) : e]
            logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
            for target in range(
                p, e
            ):  # doc[target] = seq[target + 1], predicted at input position target - start
                nll -= logp[target - max(0, e - context), doc[target]].item()
    result = score(model, rolling_windows(doc, context, prefix))
    assert result["tokens"] == 300
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)


class ContextOracle(torch.nn.Module):
    """A stand-in LM over the sequence 0, 1, 2, ...: it knows the next token is input + 1 and is
    more sure of it the more tokens it has read. Any method that gives tokens more context must
    score it better."""

    def forward(self, input_ids, attention_mask=None):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, 1000)
        confidence = torch.arange(1, width + 1, dtype=torch.float).expand(batch, width)
        logits.scatter_(2, (input_ids + 1).clamp(max=999).unsqueeze(-1), confidence.unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def test_smaller_stride_gives_lower_perplexity():
    ids = list(range(900))
    values = [
        score(ContextOracle(), sliding_windows(ids, 64, stride))["perplexity"]
        for stride in (64, 32, 8, 1)
    ]
    assert values == sorted(values, reverse=True) and values[0] > values[-1] * 1.01
