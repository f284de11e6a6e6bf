"""--distill_ngram_share: mix a Kneser-Ney n-gram's next-token distribution into the teacher's training targets.

On test text a network and a Kneser-Ney 4-gram fitted on the training tokens are complementary (docs/results.md:
the mixture beats either). Here the n-gram's knowledge goes into training instead, so the saved model carries it:
each training target becomes g x the n-gram's distribution + --distill_share x the teacher's (with --distill_from)
+ the rest x the data's next token.

An n-gram fitted on all the training tokens has seen every training position's own next token, so at those
positions it mostly repeats the data. It is cross-fitted instead: the stream is cut into `folds` contiguous parts
and the distribution at each position comes from an n-gram fitted on the other parts, as it would be on new text.
Tables are computed once, before training, over the narrow head's columns (--tie_tokens_below's class as one
token): for each stream position the `top_k` most likely columns and their probabilities; the rest of the mass
is spread as the unigram distribution of the whole stream.
"""

import logging
import time

import numpy as np
import torch

from .kneser_ney import KneserNey

logger = logging.getLogger(__name__)


def next_token_distributions(model: KneserNey, ids: dict, positions: np.ndarray) -> torch.Tensor:
    """p(token at j | tokens before j) over model's vocabulary for each j in `positions`: [len(positions), V].

    `ids`: model.gram_ids(stream) for the stream the positions index."""
    V = model.vocab_size
    p = torch.from_numpy(model.scaled[1] + model.gamma[1][0] / V).float().repeat(len(positions), 1)
    rows_all = np.arange(len(positions))
    for k in range(2, model.order + 1):
        context = np.full(len(positions), -1, dtype=np.int64)
        has_prev = positions >= 1
        context[has_prev] = ids[k - 1][positions[has_prev] - 1]
        seen = context >= 0
        seen[seen] = model.total[k][context[seen]] > 0
        if not seen.any():
            continue
        rows, h = rows_all[seen], context[seen]
        p[torch.from_numpy(rows)] *= torch.from_numpy(model.gamma[k][h]).float().unsqueeze(1)
        lo = np.searchsorted(model.keys[k], h * V)
        hi = np.searchsorted(model.keys[k], (h + 1) * V)
        lengths = hi - lo
        flat = np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        entry_rows = np.repeat(rows, lengths)
        p.index_put_((torch.from_numpy(entry_rows), torch.from_numpy(model.keys[k][flat] % V)),
                     torch.from_numpy(model.scaled[k][flat]).float(), accumulate=True)
    return p


class NgramTargets:
    """Cross-fitted n-gram distributions at every position of the training stream, top-k plus a unigram rest."""

    def __init__(self, columns: np.ndarray, width: int, share: float, order: int = 4, folds: int = 5,
                 top_k: int = 64, chunk: int = 2048):
        start = time.time()
        columns = np.asarray(columns, dtype=np.int64)
        n, top_k = len(columns), min(top_k, width)
        self.share, self.width, self.order, self.folds = share, width, order, folds
        self.unigram = torch.from_numpy(KneserNey(columns, 1, width).distribution([])).float()
        self.index = torch.zeros((n, top_k), dtype=torch.int32)
        self.prob = torch.zeros((n, top_k), dtype=torch.float32)
        self.rest = torch.zeros(n, dtype=torch.float32)
        bounds = [n * f // folds for f in range(folds + 1)]
        for f in range(folds):
            lo, hi = bounds[f], bounds[f + 1]
            model = KneserNey(np.concatenate([columns[:lo], columns[hi:]]), order, width)
            ids = model.gram_ids(columns)
            for a in range(lo, hi, chunk):
                positions = np.arange(a, min(a + chunk, hi))
                p = next_token_distributions(model, ids, positions)
                top = p.topk(top_k, dim=1)
                self.index[positions] = top.indices.int()
                self.prob[positions] = top.values
                self.rest[positions] = (1 - top.values.sum(1)).clamp_min(0)
        logger.info("n-gram targets: order %d cross-fitted over %d folds, top %d of %d columns, %d positions "
                    "(%.1f s); mean top-%d mass %.3f", order, folds, top_k, width, n, time.time() - start, top_k,
                    1 - self.rest.mean().item())

    def rows(self, positions: torch.Tensor):
        """(index, prob, rest) of the stream positions `positions` (the position of the token predicted)."""
        positions = positions.clamp(0, len(self.rest) - 1).cpu()
        return self.index[positions].long(), self.prob[positions], self.rest[positions]

    def dense(self, positions: torch.Tensor, device=None) -> torch.Tensor:
        """The n-gram distributions of `positions` over all columns: [len(positions), width]."""
        index, prob, rest = self.rows(positions)
        out = rest.unsqueeze(1) * self.unigram.unsqueeze(0)
        out.scatter_add_(1, index, prob)
        return out.to(device) if device is not None else out
