"""Score a causal LM on token windows: summed NLL per window, batched, sharded by accelerate, gathered once.

Every evaluation method is a list of windows. A window is a token sequence `ids` (at most context + 1 long)
of which the last `n_scored` tokens are predicted: the model reads `ids[:-1]` and we sum
-log p(ids[i + 1] | ids[: i + 1]) over the scored positions. The three methods only differ in how they cut
the text into windows:

- `block_windows`: the disjoint training blocks; every token but each block's first is predicted
  (the Trainer's eval_loss).
- `sliding_windows`: the HF guide "Perplexity of fixed-length models": windows of `context` tokens moved
  by `stride`; only the tokens not scored by an earlier window are scored.
- `rolling_windows`: lm-evaluation-harness's `loglikelihood_rolling` (get_rolling_token_windows with
  context_len=1 + make_disjoint_window): the first window is predicted from the prefix token; the last,
  partial window re-reads earlier tokens as context.
"""

import math
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .metrics import sequence_nll


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
        windows.append({"ids": ids[end - context - 1: end], "n_scored": n})
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
        targets[row, n - w["n_scored"]: n] = ids[n - w["n_scored"] + 1:]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
        "word_count": torch.tensor([w.get("word_count", 0) for w in windows]),
        "byte_count": torch.tensor([w.get("byte_count", 0) for w in windows]),
    }


def score_windows(model, windows: list[dict], metric, accelerator, batch_size: int, pad_id: int,
                  desc: str = "scoring") -> dict:
    """Feed every window through the model once across all processes; add each window to `metric` once.

    `accelerator.prepare` shards the windows across processes; `gather_for_metrics` drops the samples
    that even batching repeats at the end, so 1 and N processes add the same rows. Returns the metric's
    result (on every process) plus throughput.
    """
    loader = accelerator.prepare(DataLoader(windows, batch_size=batch_size, shuffle=False,
                                            collate_fn=lambda ws: _collate(ws, pad_id)))
    start, n_tokens = time.perf_counter(), 0
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, counts = sequence_nll(logits, batch["targets"])
        nll, counts, words, n_bytes = accelerator.gather_for_metrics(
            (nll, counts, batch["word_count"], batch["byte_count"]))
        n_tokens += int(counts.sum())
        metric.add_batch(nll_sum=nll.tolist(), token_count=counts.tolist(),
                         word_count=words.tolist(), byte_count=n_bytes.tolist())
    seconds = time.perf_counter() - start
    result = metric.compute()
    result.update(seconds=round(seconds, 3), tokens_per_second=round(n_tokens / seconds, 1) if seconds else math.nan)
    return result
