"""Interpolated modified Kneser-Ney n-gram language model over integer tokens (numpy only).

Modified Kneser-Ney (Chen & Goodman 1998, "An Empirical Study of Smoothing Techniques",
section 3.5), interpolated:

    p_k(w | h) = max(a(h w) - D_k(a(h w)), 0) / a(h .) + gamma_k(h) p_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3+ N3+(h .)) / a(h .)
    p_1(w)     = max(a(w) - D_1(a(w)), 0) / a(.) + gamma_1 / V

where h' is h without its first token, a() is the raw count at the highest order and the
continuation count N1+(. h w) (distinct tokens seen before h w) at every lower order, N_i(h .)
counts the tokens that follow h with a() = i, and a context never seen at order k (a(h .) = 0)
passes p_{k-1} through unchanged. The three discounts of each order come from that order's
count-of-counts n_1..n_4 of a(): Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2,
D3+ = 3 - 4Y n4/n3. On tiny corpora, where a count-of-count is zero and an estimate is undefined or
outside (0, i], D_i falls back to Y (0.5 when Y is 0 or undefined); `discounts` holds the ones used.

n-grams are numpy int64 keys (id of the (k-1)-gram prefix x V + last token), counted with np.unique
and looked up with np.searchsorted: order 5 fit on the 247k-token WikiText-2 validation split scores
the test split in about a second on one core (benchmarks/ngram_baseline.py).
"""

import math

import numpy as np


def modified_kn_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts of `counts` (Chen & Goodman's estimates)."""
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == i)) for i in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.0
    fallback = y if y > 0 else 0.5
    discounts = []
    for i, (num, den) in enumerate(((n2, n1), (n3, n2), (n4, n3)), start=1):
        d = i - (i + 1) * y * num / den if den else math.nan
        discounts.append(d if 0 < d <= i else fallback)
    return tuple(discounts)


class KneserNey:
    """Interpolated modified Kneser-Ney model of order `order` over tokens 0..vocab_size-1."""

    def __init__(self, tokens, order: int, vocab_size: int):
        t = np.asarray(tokens, dtype=np.int64)
        if order < 1:
            raise ValueError(f"order must be at least 1; got {order}")
        if len(t) == 0 or t.min() < 0 or t.max() >= vocab_size:
            raise ValueError(f"tokens must be non-empty and in [0, {vocab_size})")
        self.order, self.vocab_size = order, vocab_size
        V = vocab_size
        # Order k's distinct grams: sorted keys[k] (prefix id * V + last token); a gram's id is its
        # index there, a 1-gram's id is its token. In the loop, gram_ids[i] is the id of the k-gram
        # ending at position i + k - 1.
        self.keys = {1: np.arange(V, dtype=np.int64)}
        raw = {1: np.bincount(t, minlength=V)}
        suffix = {}  # k -> id of each k-gram's last k-1 tokens (a (k-1)-gram id)
        gram_ids = t
        for k in range(2, order + 1):
            prefix = gram_ids[:-1]  # the (k-1)-gram ending one position earlier
            if len(prefix) == 0:
                self.keys[k], raw[k], suffix[k] = (np.zeros(0, np.int64),) * 3
                gram_ids = prefix
                continue
            last_ids = gram_ids[
                1:
            ]  # the (k-1)-gram ending here = this k-gram without its first token
            keys, first, inverse = np.unique(
                prefix * V + t[k - 1 :], return_index=True, return_inverse=True
            )
            self.keys[k], raw[k], suffix[k] = keys, np.bincount(inverse), last_ids[first]
            gram_ids = inverse
        # a(): raw counts at the top order, continuation counts (distinct left extensions) below it.
        self.counts = {
            k: raw[k] if k == order else np.bincount(suffix[k + 1], minlength=len(self.keys[k]))
            for k in range(1, order + 1)
        }
        self.discounts, self.scaled, self.gamma, self.total = {}, {}, {}, {}
        for k in range(1, order + 1):
            a = self.counts[k]
            d = modified_kn_discounts(a)
            self.discounts[k] = d
            n_contexts = len(self.keys[k - 1]) if k > 1 else 1
            context = self.keys[k] // V if k > 1 else np.zeros(len(a), np.int64)
            total = np.bincount(context, weights=a, minlength=n_contexts)
            n_with = [a == 1, a == 2, a >= 3]  # N1, N2, N3+ per context, after bincount
            mass = sum(
                d[i] * np.bincount(context, weights=n_with[i], minlength=n_contexts)
                for i in range(3)
            )
            seen = total > 0
            self.total[k] = total
            self.gamma[k] = np.divide(mass, total, out=np.zeros_like(mass), where=seen)
            discount = np.array([0.0, *d])[np.minimum(a, 3)]
            self.scaled[k] = np.divide(
                np.maximum(a - discount, 0.0), total[context], out=np.zeros(len(a)), where=a > 0
            )

    def gram_ids(self, tokens) -> dict[int, np.ndarray]:
        """For each order k: the id of the train k-gram ending at each position of `tokens`, -1
        where unseen."""
        t = np.asarray(tokens, dtype=np.int64)
        ids = {1: t}
        for k in range(2, self.order + 1):
            prev = np.full(len(t), -1, dtype=np.int64)
            prev[1:] = ids[k - 1][:-1]
            keys = self.keys[k]
            if len(keys) == 0:  # training stream shorter than k
                ids[k] = np.full(len(t), -1, dtype=np.int64)
                continue
            query = np.where(prev >= 0, prev * self.vocab_size + t, -1)
            pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
            ids[k] = np.where((prev >= 0) & (keys[pos] == query), pos, -1)
        return ids

    def log_probs(self, tokens) -> np.ndarray:
        """Natural-log probability of every token of the stream given the tokens before it (the
        first has none)."""
        t = np.asarray(tokens, dtype=np.int64)
        ids = self.gram_ids(t)
        p = self.scaled[1][t] + self.gamma[1][0] / self.vocab_size
        for k in range(2, self.order + 1):
            context = np.full(len(t), -1, dtype=np.int64)
            context[1:] = ids[k - 1][
                :-1
            ]  # the k-1 tokens before position j; -1 if too few or unseen
            seen = context >= 0
            seen[seen] = self.total[k][context[seen]] > 0
            gram = ids[k][seen]
            p[seen] = (
                np.where(gram >= 0, self.scaled[k][gram], 0.0)
                + self.gamma[k][context[seen]] * p[seen]
            )
        return np.log(p)

    def distribution(self, context) -> np.ndarray:
        """p(w | context) for every w in the vocabulary (uses the last order-1 tokens of
        `context`)."""
        V = self.vocab_size
        p = self.scaled[1] + self.gamma[1][0] / V
        context = list(context)[max(0, len(context) - self.order + 1) :] if self.order > 1 else []
        ids = self.gram_ids(context) if context else {}
        for k in range(2, min(len(context) + 1, self.order) + 1):
            h = int(ids[k - 1][-1])
            if h < 0 or self.total[k][h] == 0:
                continue
            lo, hi = np.searchsorted(self.keys[k], [h * V, (h + 1) * V])
            p = self.gamma[k][h] * p
            p[self.keys[k][lo:hi] % V] += self.scaled[k][lo:hi]
        return p
