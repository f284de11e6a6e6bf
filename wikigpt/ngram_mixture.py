"""eval.py --ngram_order N: the model interpolated with a Kneser-Ney n-gram of the text it trained on.

    p(w | h) = (1 - weight) p_model(w | h) + weight p_KN(w | the last N-1 tokens of h)

Both are distributions over the model's vocabulary, so the mixture is one too, and each token's mixture
probability needs only the two models' probabilities of that token. On little data the two are complementary
(the n-gram remembers the exact short contexts of rare tokens that a small network smooths away), so the
mixture scores well below either alone. The n-gram is fitted on the train split (the text the model trained
on), `weight` on the validation split, the held-out text that chose the model; the scored split chooses
nothing. It is reported beside the model's own perplexity, never instead of it: the saved model is the network.
"""

import json
import math
import os

import numpy as np

from .errors import UsageError
from .kneser_ney import KneserNey


def fit_weight(model_nll: np.ndarray, ngram_nll: np.ndarray, tolerance: float = 1e-7, max_iter: int = 1000) -> float:
    """The n-gram's weight that minimises the mixture's mean NLL over these tokens (EM on the one weight).

    The mean NLL is convex in the weight, and each EM step (the weight becomes the mean posterior that the
    n-gram produced the token) lowers it, so the iteration converges to the minimum in [0, 1].
    """
    log_ratio = model_nll - ngram_nll  # log(p_ngram / p_model) per token
    weight = 0.5
    for _ in range(max_iter):
        # posterior of the n-gram: w q / (w q + (1 - w) p) = sigmoid(log w - log(1 - w) + log q - log p)
        logit = math.log(weight) - math.log1p(-weight) + log_ratio
        new = float(np.mean(0.5 * (1.0 + np.tanh(0.5 * logit))))
        new = min(max(new, 1e-12), 1.0 - 1e-12)
        if abs(new - weight) < tolerance:
            return new
        weight = new
    return weight


def mixture_nll(model_nll: np.ndarray, ngram_nll: np.ndarray, weight: float) -> np.ndarray:
    """Per-token NLL of (1 - weight) p_model + weight p_ngram, from the two models' per-token NLLs."""
    return -np.logaddexp(math.log1p(-weight) - model_nll, math.log(weight) - ngram_nll)


def ngram_block_nll(ngram: KneserNey, blocks) -> np.ndarray:
    """The n-gram's NLL of every token the blocks method scores (each block's tokens but its first), each
    predicted from the tokens before it in its block, as the model reads the block."""
    return np.concatenate([-ngram.log_probs(block)[1:] for block in blocks if len(block) > 1])


def check_run_split(model_dir: str, counts: dict) -> None:
    """Refuse a train/validation split that is not the one a train.py run folder trained and selected on."""
    try:
        with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
            recorded = json.load(f).get("data") or {}
    except (OSError, ValueError, AttributeError):
        return  # not a train.py run folder: nothing to compare with
    here = {s: counts[s]["tokens"] for s in ("train", "validation")}
    there = {s: (recorded.get(s) or {}).get("tokens") for s in ("train", "validation")}
    if None not in there.values() and here != there:
        raise UsageError(
            f"--ngram_order: these data flags give train/validation splits of {here['train']:,} / "
            f"{here['validation']:,} tokens, but {model_dir} trained on {there['train']:,} / {there['validation']:,} "
            f"(its results.json); pass the data flags train.py ran with (--train_file, --validation_file or "
            f"--validation_split_percentage, and --seed)")


def mixture_report(order: int, vocab_size: int, train_ids, validation_blocks, validation_nll: np.ndarray,
                   split_blocks, split_nll: np.ndarray) -> tuple[float, dict]:
    """Fit the n-gram on train_ids and the weight on the validation blocks; score the split's blocks.

    `*_nll` are the model's per-token NLLs of the blocks' scored tokens (score_windows(keep_token_nll=True)).
    Returns (the split's mixture perplexity, details for the report)."""
    ngram = KneserNey(train_ids, order, vocab_size)
    validation_ngram, split_ngram = ngram_block_nll(ngram, validation_blocks), ngram_block_nll(ngram, split_blocks)
    weight = fit_weight(validation_nll, validation_ngram)
    ppl = lambda nll: round(float(np.exp(np.mean(nll))), 4)  # noqa: E731
    return ppl(mixture_nll(split_nll, split_ngram, weight)), {
        "order": order, "weight": round(weight, 6), "train_tokens": len(train_ids),
        "validation_tokens": len(validation_nll), "validation_perplexity": ppl(validation_nll),
        "validation_ngram_perplexity": ppl(validation_ngram),
        "validation_mixture_perplexity": ppl(mixture_nll(validation_nll, validation_ngram, weight)),
        "ngram_perplexity": ppl(split_ngram),
    }
