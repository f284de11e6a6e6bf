"""eval.py --ngram_order N, --block_cache: the model interpolated with count-based models of
the text.

    p(w | h) = w_model p_model(w | h) + w_ngram p_KN(w | the last N-1 tokens of h)
               + w_cache p_cache(w | h)

The n-gram is an interpolated modified Kneser-Ney model of the text the model trained on (the train
split). The cache is a unigram model of the block so far (Kuhn & De Mori 1990; Grave et al. 2017's
cache, on tokens rather than hidden states): p_cache(w | h) = how often w occurs in h / len(h). All
are distributions over the model's vocabulary, so the mixture is one too, and each token's mixture
probability needs only each component's probability of that token. On little data they are
complementary: the n-gram remembers the exact short contexts of rare tokens that a small network
smooths away, and the cache knows the names of the article at hand, which a model that never read
the article cannot. The weights are fitted on the validation split, the held-out text that chose the
model; the scored split chooses nothing. They are reported beside the model's own perplexity, never
instead of it: the saved model is the network.
"""

import json
import math
import os

import numpy as np

from wikigpt.errors import UsageError
from wikigpt.evaluation.kneser_ney import KneserNey


def fit_weights(
    component_nll: list[np.ndarray], tolerance: float = 1e-7, max_iter: int = 1000
) -> np.ndarray:
    """The mixture weights (summing to 1) that minimise the mixture's mean NLL over these tokens
    (EM).

    `component_nll`: each component's per-token NLL (inf where it gives the token no probability).
    The mean NLL is convex in the weights, and each EM step (a weight becomes the mean posterior
    that its component produced the token) lowers it, so the iteration converges to the minimum on
    the simplex.
    """
    log_p = -np.stack(component_nll)
    weights = np.full(len(component_nll), 1.0 / len(component_nll))
    for _ in range(max_iter):
        joint = np.log(weights)[:, None] + log_p
        new = np.exp(joint - np.logaddexp.reduce(joint, axis=0)).mean(axis=1)
        new = np.clip(new, 1e-12, None) / np.clip(new, 1e-12, None).sum()
        if np.abs(new - weights).max() < tolerance:
            return new
        weights = new
    return weights


def mixture_nll(component_nll: list[np.ndarray], weights) -> np.ndarray:
    """Per-token NLL of sum_k weights[k] p_k, from the components' per-token NLLs."""
    return -np.logaddexp.reduce(
        np.log(np.asarray(weights))[:, None] - np.stack(component_nll), axis=0
    )


def ngram_block_nll(ngram: KneserNey, blocks) -> np.ndarray:
    """The n-gram's NLL of every token the blocks method scores (each block's tokens but its first),
    each predicted from the tokens before it in its block, as the model reads the block."""
    return np.concatenate([-ngram.log_probs(block)[1:] for block in blocks if len(block) > 1])


def block_cache_nll(blocks) -> np.ndarray:
    """The block cache's NLL of every token the blocks method scores: -log(occurrences of the token
    among the block's tokens before it / their number); inf for a token its block has not held
    yet."""
    nll = []
    for block in blocks:
        seen: dict[int, int] = {}
        for position, token in enumerate(block):
            if position:
                count = seen.get(token, 0)
                nll.append(math.log(position / count) if count else math.inf)
            seen[token] = seen.get(token, 0) + 1
    return np.array(nll)


def recorded_split_tokens(model_dir: str) -> dict | None:
    """The train/validation token counts a train.py run folder's results.json records, or None
    (no such file, or one without them: not a train.py run folder)."""
    try:
        with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
            recorded = json.load(f).get("data") or {}
        there = {s: (recorded.get(s) or {}).get("tokens") for s in ("train", "validation")}
    except (OSError, ValueError, AttributeError):
        return None
    return None if None in there.values() else there


def split_tokens(counts: dict) -> dict:
    """The train/validation token counts of prepared splits (prepare_lm_splits' counts)."""
    return {s: counts[s]["tokens"] for s in ("train", "validation")}


def check_run_split(model_dir: str, counts: dict, flag: str = "--ngram_order") -> None:
    """Refuse a train/validation split that is not the one a train.py run folder trained and
    selected on."""
    there = recorded_split_tokens(model_dir)
    here = split_tokens(counts)
    if there is not None and here != there:
        raise UsageError(
            f"{flag}: these data flags give train/validation splits of {here['train']:,} / "
            f"{here['validation']:,} tokens, but {model_dir} trained on {there['train']:,} / "
            f"{there['validation']:,} (its results.json); pass the data flags train.py ran with "
            "(--train_file, --validation_file or --validation_split_percentage, and --seed)"
        )


def mixture_metrics(
    blocks: tuple, model_nll: tuple, ngram_order: int, train_ids, vocab_size: int, block_cache: bool
) -> tuple[dict, dict]:
    """eval.py's mixture metrics and details: weights fitted on the validation blocks, the split's
    blocks scored.

    `blocks`, `model_nll`: the (validation, split) blocks and the model's per-token NLLs of their
    scored tokens (score_windows(keep_token_nll=True)). One mixture per component alone with the
    model ("ngram", "cache") and, with both, one of all three ("ngram+cache")."""
    ppl = lambda nll: round(float(np.exp(np.mean(nll))), 4)  # noqa: E731
    details = {"validation_tokens": len(model_nll[0]), "validation_perplexity": ppl(model_nll[0])}
    components, described = {}, {}
    if ngram_order:
        ngram = KneserNey(train_ids, ngram_order, vocab_size)
        components["ngram"] = tuple(ngram_block_nll(ngram, b) for b in blocks)
        details["ngram_alone"] = {
            "order": ngram_order,
            "train_tokens": len(train_ids),
            "validation_perplexity": ppl(components["ngram"][0]),
            "perplexity": ppl(components["ngram"][1]),
        }
        described["ngram"] = (
            f"an interpolated modified Kneser-Ney {ngram_order}-gram's (fitted on the train "
            f"split's {len(train_ids):,} tokens)"
        )
    if block_cache:
        components["cache"] = tuple(block_cache_nll(b) for b in blocks)
        described["cache"] = (
            "the block cache's (how often the token occurred before it in its block)"
        )
    names = list(components)
    metrics = {}
    for mixture in [[name] for name in names] + ([names] if len(names) > 1 else []):
        validation = [model_nll[0], *(components[n][0] for n in mixture)]
        weights = fit_weights(validation)
        named = {n: round(float(w), 6) for n, w in zip(["model", *mixture], weights)}
        value = ppl(mixture_nll([model_nll[1], *(components[n][1] for n in mixture)], weights))
        details["+".join(mixture)] = {
            "perplexity": value,
            "weights": named,
            "validation_mixture_perplexity": ppl(mixture_nll(validation, weights)),
        }
        terms = " + ".join(f"{named[n]:.4f} x {described[n]}" for n in mixture)
        metrics["_".join(mixture) + "_mixture_perplexity"] = {
            "value": value,
            "method": f"blocks as `perplexity`, each token's probability {named['model']:.4f} x "
            f"the model's + {terms}; weights fitted on the validation split's blocks; a test-time "
            "mixture, not the saved model's own number",
        }
    return metrics, details
