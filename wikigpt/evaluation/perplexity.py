"""Perplexity: cut text into token windows, score them with the model, sum through our `evaluate`
metric.

One number, one path: every perplexity wikigpt reports is exp(sum NLL / count) computed by the
`evaluate` module in wikigpt/evaluation/corpus_perplexity (corpus-level, not the Hub metric's mean
of per-text perplexities).

Training (Trainer hooks): `Trainer(..., compute_metrics=compute_perplexity,
preprocess_logits_for_metrics=nll_and_count)` adds {prefix}_perplexity, _token_loss, _tokens and
_blocks to evaluate()'s metrics. The hook reduces each eval batch's logits to (summed NLL, token
count) per sequence right away, so evaluation never keeps full-vocabulary logits beyond one batch,
and `compute_metrics` turns the gathered sums into one perplexity.

eval.py (windows): every evaluation method is a list of windows. A window is a token sequence `ids`
(at most context + 1 long) of which the last `n_scored` tokens are predicted: the model reads
`ids[:-1]` and we sum -log p(ids[i + 1] | ids[: i + 1]) over the scored positions. The methods only
differ in how they cut the text:

- `block_windows`: the disjoint training blocks; every token but each block's first is predicted
  (the Trainer's eval_loss).
- `sliding_windows`: the HF guide "Perplexity of fixed-length models": windows of `context` tokens
  moved by `stride`; only the tokens not scored by an earlier window are scored.
- `rolling_windows`: lm-evaluation-harness's `loglikelihood_rolling` (get_rolling_token_windows with
  context_len=1 + make_disjoint_window): the first window is predicted from the prefix token; the
  last, partial window re-reads earlier tokens as context.

`score_windows` feeds them through the model, batched and sharded by accelerate, and gathers the
sums once.
"""

import math
import os
import time

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_perplexity")


def load_corpus_perplexity():
    # keep_in_memory: no cache files, so concurrent processes never share (or lock) a metric file.
    return evaluate.load(METRIC_DIR, keep_in_memory=True)


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) and count of scored targets per row; `targets[:, i]` is predicted by
    `logits[:, i]`, -100 = not scored. Rows are upcast to fp32 one at a time, so the fp32 logits
    never exceed one sequence."""
    nll = torch.stack(
        [
            F.cross_entropy(logits[row].float(), targets[row], ignore_index=-100, reduction="sum")
            for row in range(logits.shape[0])
        ]
    ).double()
    return nll, (targets != -100).sum(dim=1)


def nll_and_count(logits, labels) -> torch.Tensor:
    """Trainer `preprocess_logits_for_metrics`: labels are the inputs (the model shifts), so shift
    here too."""
    if isinstance(logits, tuple):
        logits = logits[0]
    nll, count = sequence_nll(logits[:, :-1], labels[:, 1:])
    return torch.stack([nll, count.double()], dim=1)


def compute_perplexity(eval_pred) -> dict:
    """Trainer `compute_metrics`: corpus perplexity = exp(sum NLL / sum tokens) over the whole eval
    set."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2)
    zeros = [0] * len(stats)
    metric = load_corpus_perplexity()
    metric.add_batch(
        nll_sum=stats[:, 0].tolist(),
        token_count=stats[:, 1].astype(np.int64).tolist(),
        word_count=zeros,
        byte_count=zeros,
    )
    result = metric.compute()
    # token_loss: mean NLL over real tokens, every sequence once (the Trainer's eval_loss is a mean
    # of batch means and, on several processes, includes the copies that pad the last batch).
    return {
        "perplexity": result["perplexity"],
        "token_loss": result["mean_nll"],
        "tokens": result["tokens"],
        "blocks": len(stats),
    }


# --- eval.py's windows ----------------------------------------------------------------------------


def block_windows(blocks: list[list[int]]) -> list[dict]:
    return [{"ids": list(block), "n_scored": len(block) - 1} for block in blocks if len(block) > 1]


def sliding_windows(ids: list[int], context: int, stride: int) -> list[dict]:
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        # The window's first token has nothing before it to be predicted from.
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append({"ids": ids[begin:end], "n_scored": n_scored})
        prev_end = end
        if end == len(ids):
            break
    return windows


def rolling_windows(ids: list[int], context: int, prefix_token: int) -> list[dict]:
    if not ids:
        return []
    first = min(context, len(ids))
    windows = [{"ids": [prefix_token] + ids[:first], "n_scored": first}]
    predicted = first
    while predicted < len(ids):
        n = min(len(ids) - predicted, context)
        end = predicted + n
        windows.append({"ids": ids[end - context - 1 : end], "n_scored": n})
        predicted = end
    return windows


def _collate(windows: list[dict], pad_id: int) -> dict:
    width = max(len(w["ids"]) for w in windows) - 1
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(windows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids = torch.tensor(w["ids"], dtype=torch.long)
        n = len(ids) - 1
        input_ids[row, :n] = ids[:-1]
        attention_mask[row, :n] = 1
        targets[row, n - w["n_scored"] : n] = ids[n - w["n_scored"] + 1 :]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "word_count": torch.tensor([w.get("word_count", 0) for w in windows]),
        "byte_count": torch.tensor([w.get("byte_count", 0) for w in windows]),
    }


def score_windows(
    model,
    windows: list[dict],
    metric,
    accelerator,
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
    keep_token_nll: bool = False,
) -> dict:
    """Feed every window through the model once across all processes; add each window to `metric`
    once.

    `accelerator.prepare` shards the windows across processes; `gather_for_metrics` drops the
    samples that even batching repeats at the end, so 1 and N processes add the same rows. Returns
    the metric's result (on every process) plus throughput; with `keep_token_nll` (windows of one
    length, e.g. blocks), also `token_nll`: every scored token's NLL, in window order.
    """
    loader = accelerator.prepare(
        DataLoader(
            windows,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=lambda ws: _collate(ws, pad_id),
        )
    )
    start, n_tokens, token_nll = time.perf_counter(), 0, []
    for batch in tqdm(
        loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False
    ):
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        nll, counts = sequence_nll(logits, batch["targets"])
        if keep_token_nll:
            per_token = torch.stack(
                [
                    F.cross_entropy(logits[row].float(), batch["targets"][row], reduction="none")
                    for row in range(logits.shape[0])
                ]
            )
            per_token, targets = accelerator.gather_for_metrics((per_token, batch["targets"]))
            token_nll.append(per_token[targets != -100].double().cpu().numpy())
        nll, counts, words, n_bytes = accelerator.gather_for_metrics(
            (nll, counts, batch["word_count"], batch["byte_count"])
        )
        n_tokens += int(counts.sum())
        metric.add_batch(
            nll_sum=nll.tolist(),
            token_count=counts.tolist(),
            word_count=words.tolist(),
            byte_count=n_bytes.tolist(),
        )
    seconds = time.perf_counter() - start
    result = metric.compute()
    result.update(
        seconds=round(seconds, 3),
        tokens_per_second=round(n_tokens / seconds, 1) if seconds else math.nan,
    )
    if keep_token_nll:
        result["token_nll"] = np.concatenate(token_nll)
    return result
