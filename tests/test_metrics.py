"""wikigpt/metrics.py and the corpus_perplexity `evaluate` module: corpus-level sums, Trainer hooks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (EvalPrediction, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments,
                          default_data_collator)

from wikigpt.metrics import compute_perplexity, load_corpus_perplexity, nll_and_count, sequence_nll
from wikigpt.model import mark_causal_lm_loss


def test_module_loads_offline_by_path_and_is_corpus_level():
    metric = load_corpus_perplexity()
    # A 1-token text with NLL 1 and a 100-token text with mean NLL 5: corpus perplexity weights tokens, while
    # the Hub "perplexity" metric would average exp(1) and exp(5) per text.
    metric.add_batch(nll_sum=[1.0], token_count=[1], word_count=[0], byte_count=[0])
    metric.add_batch(nll_sum=[500.0], token_count=[100], word_count=[0], byte_count=[0])
    result = metric.compute()
    assert result["perplexity"] == pytest.approx(math.exp(501 / 101))
    assert result["perplexity"] != pytest.approx((math.exp(1) + math.exp(5)) / 2)
    assert result["tokens"] == 101 and result["nll_sum"] == 501.0 and "word_perplexity" not in result


def test_word_and_byte_normalisation():
    metric = load_corpus_perplexity()
    metric.add_batch(nll_sum=[30.0, 10.0], token_count=[8, 4], word_count=[5, 0], byte_count=[20, 0])
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
    assert result == {"perplexity": pytest.approx(expected_ppl), "token_loss": pytest.approx(math.log(expected_ppl)),
                      "tokens": 13, "blocks": 3}


def tiny_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=97))
    return mark_causal_lm_loss(model).eval()


def test_trainer_evaluate_with_an_uneven_last_batch_counts_every_block_once(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 97, (11, 16))  # 11 blocks, batches of 4: the last batch holds 3
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    metrics = Trainer(model=model, args=args, data_collator=default_data_collator, compute_metrics=compute_perplexity,
                      preprocess_logits_for_metrics=nll_and_count).evaluate(dataset)
    with torch.no_grad():
        per_block = [model(input_ids=r[None], labels=r[None]).loss.item() for r in ids]
    assert metrics["eval_blocks"] == 11 and metrics["eval_tokens"] == 11 * 15
    assert metrics["eval_token_loss"] == pytest.approx(np.mean(per_block), rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(np.mean(per_block)), rel=1e-6)


def test_trainer_loss_counts_shifted_labels_for_a_wikigpt_model(tmp_path, tokenizer):
    """transformers 5.23 leaves GPT-2's loss_type None and the Trainer then divides by T tokens per block instead
    of T-1; wikigpt names the loss so the Trainer's own eval_loss is the model's mean token loss."""
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
