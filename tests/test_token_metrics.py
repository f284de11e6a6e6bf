"""Exact token-level eval loss: per-token NLL matches the model's own loss; uneven batches count each block once."""

import math

import numpy as np
import pytest
import torch
from transformers import (EvalPrediction, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments,
                          default_data_collator)

from wikigpt.token_metrics import IGNORE_INDEX, exact_eval_kwargs, token_metrics, token_nll


def tiny_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=97))
    model.loss_type = "ForCausalLM"
    return model.eval()


def test_token_nll_mean_is_the_models_loss():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    nll = token_nll(out.logits, ids)
    assert nll.shape == (3, 11)
    assert nll.mean().item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_token_metrics_skips_ignored_labels():
    nll = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels = np.array([[0, 1, 2, IGNORE_INDEX], [0, 1, 2, 3]])  # position t predicts label t+1
    m = token_metrics(EvalPrediction(predictions=nll, label_ids=labels))
    assert m["tokens"] == 5 and m["blocks"] == 2
    assert m["token_loss"] == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    assert m["perplexity"] == pytest.approx(math.exp(18 / 5))


def test_trainer_evaluate_with_an_uneven_last_batch_counts_every_block_once(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 97, (11, 16))  # 11 blocks, batches of 4: the last batch holds 3
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    metrics = Trainer(model=model, args=args, data_collator=default_data_collator,
                      **exact_eval_kwargs()).evaluate(dataset)
    with torch.no_grad():
        per_block = [model(input_ids=r[None], labels=r[None]).loss.item() for r in ids]
    assert metrics["eval_blocks"] == 11 and metrics["eval_tokens"] == 11 * 15
    assert metrics["eval_token_loss"] == pytest.approx(np.mean(per_block), rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(np.mean(per_block)), rel=1e-6)


def test_trainer_loss_counts_shifted_labels_for_a_wikigpt_model(tmp_path, tokenizer):
    """transformers 5.23 leaves GPT-2's loss_type None and Trainer then divides by T tokens per block instead of
    T-1; load_model names the loss so Trainer's own eval_loss is the model's mean token loss."""
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
