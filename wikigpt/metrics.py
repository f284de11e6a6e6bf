"""Perplexity through the repo's `evaluate` module (wikigpt/corpus_perplexity), for eval.py and the Trainer.

`Trainer(..., compute_metrics=compute_perplexity, preprocess_logits_for_metrics=nll_and_count)` adds
{prefix}_perplexity, _token_loss, _tokens and _blocks to evaluate()'s metrics. The Trainer hook reduces each eval batch's logits to (summed NLL, token count) per sequence right away
(`preprocess_logits_for_metrics`), so evaluation never keeps full-vocabulary logits beyond one batch, and
`compute_metrics` turns the gathered sums into one corpus-level perplexity.
"""

import os

import evaluate
import numpy as np
import torch
import torch.nn.functional as F

METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_perplexity")


def load_corpus_perplexity():
    # keep_in_memory: no cache files, so concurrent processes never share (or lock) a metric file.
    return evaluate.load(METRIC_DIR, keep_in_memory=True)


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) and count of scored targets per row; `targets[:, i]` is predicted by `logits[:, i]`,
    -100 = not scored. Rows are upcast to fp32 one at a time, so the fp32 logits never exceed one sequence."""
    nll = torch.stack([
        F.cross_entropy(logits[row].float(), targets[row], ignore_index=-100, reduction="sum")
        for row in range(logits.shape[0])
    ]).double()
    return nll, (targets != -100).sum(dim=1)


def nll_and_count(logits, labels) -> torch.Tensor:
    """Trainer `preprocess_logits_for_metrics`: labels are the inputs (the model shifts), so shift here too."""
    if isinstance(logits, tuple):
        logits = logits[0]
    nll, count = sequence_nll(logits[:, :-1], labels[:, 1:])
    return torch.stack([nll, count.double()], dim=1)


def compute_perplexity(eval_pred) -> dict:
    """Trainer `compute_metrics`: corpus perplexity = exp(sum NLL / sum tokens) over the whole eval set."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2)
    zeros = [0] * len(stats)
    metric = load_corpus_perplexity()
    metric.add_batch(nll_sum=stats[:, 0].tolist(), token_count=stats[:, 1].astype(np.int64).tolist(),
                     word_count=zeros, byte_count=zeros)
    result = metric.compute()
    # token_loss: mean NLL over real tokens, every sequence once (the Trainer's eval_loss is a mean of batch
    # means and, on several processes, includes the copies that pad the last batch).
    return {"perplexity": result["perplexity"], "token_loss": result["mean_nll"], "tokens": result["tokens"],
            "blocks": len(stats)}
