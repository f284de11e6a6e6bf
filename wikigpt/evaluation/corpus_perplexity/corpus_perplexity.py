"""Corpus-level perplexity as an `evaluate` module: sums of NLL and counts in, corpus ratios out.

The Hub's `perplexity` metric averages per-text perplexities, which weights a 10-token text like a
10,000-token one and disagrees with every paper. This module instead accumulates, over `add_batch`
calls (one row per scored sequence: a block, a window or a document), the summed negative
log-likelihood in nats and the number of predicted tokens — plus, optionally, the words and UTF-8
bytes that sequence stands for — and computes:

    perplexity      = exp(sum nll / sum tokens)
    word_perplexity = exp(sum nll / sum words)          (lm-evaluation-harness `word_perplexity`)
    byte_perplexity = exp(sum nll / sum bytes)          (lm-evaluation-harness `byte_perplexity`)
    bits_per_byte   = sum nll / sum bytes / ln 2         (lm-evaluation-harness `bits_per_byte`)

Load it by path (works offline): `evaluate.load("path/to/wikigpt/evaluation/corpus_perplexity")`.
"""

import math

import datasets
import evaluate

_CITATION = """\
@misc{wikigpt_corpus_perplexity,
  title = {wikigpt corpus perplexity: token, word and byte perplexity from summed log-likelihoods},
  year = {2026}
}
"""

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (list of float): summed negative log-likelihood (nats) of each scored sequence.
    token_count (list of int): number of predicted tokens in each sequence.
    word_count (list of int): words each sequence stands for (0 where words are not counted).
    byte_count (list of int): UTF-8 bytes each sequence stands for (0 where bytes are not counted).
Returns:
    perplexity, mean_nll, nll_sum, tokens; and word_perplexity, words when words were counted;
    byte_perplexity, bits_per_byte, bytes when bytes were counted.
Example:
    >>> metric = evaluate.load("wikigpt/evaluation/corpus_perplexity")
    >>> metric.add_batch(
    ...     nll_sum=[2.0, 4.0], token_count=[1, 2], word_count=[0, 0], byte_count=[0, 0]
    ... )
    >>> round(metric.compute()["perplexity"], 4)
    7.3891
"""

_FEATURES = datasets.Features(
    {
        "nll_sum": datasets.Value("float64"),
        "token_count": datasets.Value("int64"),
        "word_count": datasets.Value("int64"),
        "byte_count": datasets.Value("int64"),
    }
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CorpusPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
        )

    def _compute(self, nll_sum, token_count, word_count, byte_count):
        total = math.fsum(nll_sum)  # exact summation: results must not depend on batch order
        tokens = int(sum(token_count))
        if tokens <= 0:
            raise ValueError("corpus_perplexity: no tokens were scored (token_count sums to 0)")
        result = {
            "perplexity": _exp(total / tokens),
            "mean_nll": total / tokens,
            "nll_sum": total,
            "tokens": tokens,
        }
        words = int(sum(word_count))
        if words > 0:
            result.update(word_perplexity=_exp(total / words), words=words)
        n_bytes = int(sum(byte_count))
        if n_bytes > 0:
            result.update(
                byte_perplexity=_exp(total / n_bytes),
                bits_per_byte=total / n_bytes / math.log(2),
                bytes=n_bytes,
            )
        return result


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
