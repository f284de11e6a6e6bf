"""--calibrate_token_offsets: after training, fit one logit scale, one logit offset and one slope on
the token's rank per token-frequency class on the held-out split and fold them into the saved model.

A model trained for many epochs on a small corpus misjudges how likely a token is by how often it
saw it: new articles bring tokens it never saw or saw once more often than the training text did,
while its many-times-seen tokens are slightly over-predicted. One softmax temperature
(--calibrate_temperature) cannot tell these apart; one scale and one offset per class of training
count can. Tokens are grouped by their count in the training text (COUNT_EDGES: 0, 1, 2, 3-4, 5-9,
10-29, 30-99, 100-999, 1000+). Within a class, the tokens the model could not learn apart (those
sharing one row under --rare_tokens_below get the same logit) still differ in how common they are in
text at large, and GPT-2's vocabulary says so: its ids follow the BPE merge order, most frequent
pairs first. So token t of group g gets the logit s_g z_t + o_g + a_g r_t, r_t = log(1 + t)
(centred), and (s, o, a) are those that minimise the held-out NLL: a convex function of 27 numbers
(the logits are linear in them), minimised by damped Newton steps over chunked passes of the
held-out logits, with a small L2 pull towards s = 1, o = a = 0 for groups the held-out text barely
holds. A tokenizer whose ids carry no such order gets slopes near 0.

Folding is exact too. GPT-2's logits are W h: the head is untied from the input embeddings
(config.tie_word_embeddings = False; the input embeddings are unchanged) and row t of W is
multiplied by s_t, its group's scale. h = gamma * n + beta from ln_f, and n sums to 0 (LayerNorm
subtracts the mean), so h . (1 / gamma) = sum(beta / gamma) = C for every input: adding
(o_t / C) / gamma to row t of W adds o_t = o_g + a_g r_t to token t's logit. C is whatever training
left in beta, and can be near 0 (then the rows that carry the offsets grow huge and so do the
logits' rounding errors), so beta first gains delta = k * gamma, which makes C' = C + k * width, and
row t of W gains ((o_t - W_t . delta) / C') / gamma: the logits are
W_t . h + W_t . delta + o_t - W_t . delta, exactly the scaled ones plus the offsets. k (in SHIFTS,
signed like C) is the one whose folded logits have the smallest bfloat16 rounding error on the
held-out positions. The saved model is a plain GPT2LMHeadModel for eval.py, generate.py and
from_pretrained alike. Where no k keeps a float32 logit within 1e-3 nats of s_t z_t + o_t and the
bfloat16 rounding error of the logits under twice the plain model's, the calibration is skipped with
a warning and the model is saved without it.
"""

import logging
import math

import numpy as np
import torch

from wikigpt.errors import UsageError

from wikigpt.calibration.temperature import final_norm, held_out_logit_inputs

logger = logging.getLogger(__name__)

FLAG = "--calibrate_token_offsets"
COUNT_EDGES = (
    0,
    1,
    2,
    3,
    5,
    10,
    30,
    100,
    1000,
)  # group g: COUNT_EDGES[g] <= training count < COUNT_EDGES[g + 1]
# on the mean held-out NLL: a group the held-out text (almost) never holds keeps a finite scale
# and offset
L2 = 1e-3
FOLD_TOLERANCE = 1e-3  # largest float32 logit error of the fold (in nats) on the held-out positions
BF16_TOLERANCE = (
    2.0  # the folded logits' mean bfloat16 rounding error, at most this many times the plain ones'
)
SHIFTS = (
    0.0,
    0.25,
    0.5,
    1.0,
    2.0,
)  # ln_f's bias may gain k * gamma: n's entries are ~1 in size, so k ~ 1 or less


def count_groups(counts: np.ndarray) -> torch.Tensor:
    """Group id of every token: the COUNT_EDGES bin of its training count."""
    return torch.as_tensor(np.searchsorted(COUNT_EDGES, counts, side="right") - 1, dtype=torch.long)


def check_rank_order(tokenizer, flag: str = "--calibrate_token_offsets") -> None:
    """The rank slopes read a token's id as its frequency rank, which holds for BPE vocabularies
    (ids in merge order, most frequent first: GPT-2's, SentencePiece BPE's); refuse a WordPiece,
    Unigram or word-level one."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(model).__name__ if model is not None else type(tokenizer).__name__
    if kind != "BPE":
        raise UsageError(
            f"{flag} fits a slope on log(1 + token id), which follows a BPE vocabulary's merge "
            f"order; tokenizer {tokenizer.name_or_path!r} is {kind}: use a BPE tokenizer or drop "
            f"{flag}"
        )


def rank_feature(vocab_size: int) -> torch.Tensor:
    """log(1 + token id), centred on its vocabulary mean: GPT-2's ids follow the BPE merge order,
    most frequent pairs first, so within a class of training count a low id marks a token common in
    the tokenizer's own text."""
    ranks = torch.log1p(torch.arange(vocab_size, dtype=torch.float64))
    return (ranks - ranks.mean()).float()


def class_logits(z, token_scales, token_offsets):
    """Logits of the calibrated softmax: s_t z_t + o_t (o_t = o_g + a_g r_t, t in group g)."""
    return z * token_scales + token_offsets


# the features of token t in its group's slots, as powers (of z_t, of r_t): the logit is
# s_g z_t + o_g + a_g r_t
FEATURES = ((1, 0), (0, 0), (0, 1))


@torch.no_grad()
def newton_terms(
    hidden,
    targets,
    weight,
    token_scales,
    token_offsets,
    groups=None,
    n_groups: int = 0,
    ranks=None,
    chunk: int = 1024,
):
    """Mean NLL of the logits s_t z_t + o_t and, given `groups` (each token's) and `ranks` (r_t),
    its gradient and Hessian in (s_1..s_G, o_1..o_G, a_1..a_G). Token t's features are z_t, 1 and
    r_t in its group's slots, so the softmax moments sum_t p_t z_t^i r_t^j over each group's tokens
    (i + j <= 2) give both. Chunked: a vocabulary-wide row per position."""
    nll, sums = 0.0, {}
    if groups is not None:
        member = torch.nn.functional.one_hot(groups, n_groups).to(hidden.dtype)
        by_rank = torch.cat(
            [member * ranks.to(member)[:, None] ** j for j in range(3)], 1
        )  # members times r_t^j
    for start in range(0, len(targets), chunk):
        z = hidden[start : start + chunk] @ weight.T
        y = targets[start : start + chunk]
        logits = class_logits(z, token_scales, token_offsets)
        lse = torch.logsumexp(logits, -1)
        nll += float((lse - logits.gather(-1, y[:, None])[:, 0]).double().sum())
        if groups is None:
            continue
        p = torch.exp(logits - lse[:, None])
        # (i, j): positions x G; one product per power of z reads its vocabulary-wide rows once
        moment = {}
        for i, p_z in enumerate((p, p * z, p * z * z)):
            sums_j = (p_z @ by_rank[:, : (3 - i) * n_groups]).double()
            moment.update(
                {(i, j): sums_j[:, j * n_groups : (j + 1) * n_groups] for j in range(3 - i)}
            )
        expected = torch.cat([moment[f] for f in FEATURES], -1)  # E_p[features] per position
        z_y, r_y = z.gather(-1, y[:, None]).double(), ranks.to(z)[y][:, None].double()
        y_member = member[y].double()
        target = torch.cat(
            [y_member * z_y**i * r_y**j for i, j in FEATURES], -1
        )  # the target's features
        chunk_sums = {
            **{key: m.sum(0) for key, m in moment.items()},
            "grad": (expected - target).sum(0),
            "outer": expected.T @ expected,
        }
        sums = {key: sums.get(key, 0) + value for key, value in chunk_sums.items()}
    n = len(targets)
    if groups is None:
        return nll / n, None, None
    # the moments (i, j), the gradient, E[f] E[f]^T
    sums = {key: value.cpu() / n for key, value in sums.items()}
    hessian, g = -sums["outer"], torch.arange(n_groups)
    for k, (ik, jk) in enumerate(FEATURES):
        for m, (im, jm) in enumerate(FEATURES):
            hessian[k * n_groups + g, m * n_groups + g] += sums[(ik + im, jk + jm)]
    return nll / n, sums["grad"], hessian


def fit_class_calibration(
    hidden,
    targets,
    weight,
    groups,
    n_groups: int,
    ranks,
    l2: float = L2,
    steps: int = 30,
    tol: float = 1e-8,
):
    """(scales, offsets, rank slopes), one each per group (1, 0 and 0 for a group without tokens),
    minimising the mean held-out NLL of s_g z_t + o_g + a_g r_t plus
    l2 * (|s - 1|^2 + |o|^2 + |a|^2): damped Newton steps on a convex function of 3 * n_groups
    numbers."""
    prior = torch.cat([torch.ones(n_groups), torch.zeros(2 * n_groups)]).double()
    ranks = ranks.to(groups.device)

    def per_token(theta):
        scales, offsets, slopes = theta.float().to(groups.device).view(3, n_groups)
        return scales[groups], offsets[groups] + slopes[groups] * ranks

    def evaluate(theta):
        nll, grad, hess = newton_terms(
            hidden, targets, weight, *per_token(theta), groups, n_groups, ranks
        )
        return (
            nll + l2 * float((theta - prior).square().sum()),
            grad + 2 * l2 * (theta - prior),
            hess + 2 * l2 * torch.eye(3 * n_groups, dtype=torch.float64),
        )

    params = prior.clone()
    current, grad, hess = evaluate(params)
    for _ in range(steps):
        step, scale = torch.linalg.solve(hess, grad), 1.0
        while True:  # halve the Newton step until the objective does not rise
            trial = params - scale * step
            value, trial_grad, trial_hess = evaluate(trial)
            if value <= current or scale < 1e-3:
                break
            scale /= 2
        if value > current:  # no step lowers it: at the minimum to rounding
            break
        params, improvement, current, grad, hess = (
            trial,
            current - value,
            value,
            trial_grad,
            trial_hess,
        )
        if improvement < tol:
            break
    return params.view(3, n_groups).unbind()


def offset_fold(model, weight: torch.Tensor, token_offsets: torch.Tensor, shift: float):
    """(ln_f bias, LM head weight) that add token t's offset to the logits of head `weight`: the
    bias gains delta = k * gamma (k = `shift`, signed like C), row t of the head
    ((o_t - W_t . delta) / C') / gamma (see above)."""
    norm = final_norm(model)
    gamma, beta, weight = (
        norm.weight.detach().double(),
        norm.bias.detach().double(),
        weight.detach().double(),
    )
    direction = 1.0 / gamma
    delta = (-shift if float(beta @ direction) < 0 else shift) * gamma
    constant = float((beta + delta) @ direction)
    correction = token_offsets.to(weight.device).double() - weight @ delta
    new_weight = weight + (correction / constant)[:, None] * direction[None, :]
    return (beta + delta).to(norm.bias.dtype), new_weight.to(
        model.get_output_embeddings().weight.dtype
    )


def fold_errors(
    hidden, weight, new_bias_shift, new_weight, token_scales, token_offsets, rows: int = 256
):
    """How exact a fold is on `rows` held-out positions (ln_f outputs, which gain `new_bias_shift`):
    the largest |folded logit - (s_t * logit + o_t)| in float32 (nats), and the mean bfloat16
    rounding error of the folded logits over that of the plain ones (the Trainer evaluates in bf16
    autocast, and users load models in bf16)."""
    h = hidden[:rows].float()
    h_folded = (h.double() + new_bias_shift.double()).float()
    plain, folded = h @ weight.float().T, h_folded @ new_weight.float().T
    wanted = class_logits(plain.double(), token_scales.double(), token_offsets.double())
    error = float((folded.double() - wanted).abs().max())
    plain_bf16 = (h.bfloat16() @ weight.bfloat16().T).float() - plain
    folded_bf16 = (h_folded.bfloat16() @ new_weight.bfloat16().T).float() - folded
    ratio = float(folded_bf16.abs().mean() / plain_bf16.abs().mean().clamp_min(1e-12))
    return (error, ratio) if math.isfinite(error) and math.isfinite(ratio) else (math.inf, math.inf)


def fold_offsets(model, new_bias: torch.Tensor, new_weight: torch.Tensor) -> None:
    """Give ln_f `new_bias`, untie the LM head from the input embeddings and give it `new_weight`
    (the input embeddings are unchanged)."""
    with torch.no_grad():
        final_norm(model).bias.copy_(new_bias)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(new_weight, requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = (
        False  # from_pretrained must load this head, not re-tie it to wte
    )
    if (text_config := model.config.get_text_config()) is not model.config:
        text_config.tie_word_embeddings = False


def calibrate_token_offsets(model, blocks, batch_size: int, counts: np.ndarray) -> dict:
    """Fit per-group scales and offsets on `blocks` (the held-out split) and fold them into `model`;
    returns what results.json records (or why they were skipped)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, targets = held_out_logit_inputs(model, blocks, batch_size)
    finally:
        model.train(was_training)
    weight = model.get_output_embeddings().weight.detach().float()
    groups = count_groups(counts[: weight.shape[0]]).to(targets.device)
    ranks = rank_feature(weight.shape[0]).to(groups.device)
    scales, offsets, slopes = (
        x.to(groups.device)
        for x in fit_class_calibration(hidden, targets, weight, groups, len(COUNT_EDGES), ranks)
    )
    token_scales, token_offsets = scales[groups], offsets[groups] + slopes[groups] * ranks.double()
    nll_before = newton_terms(hidden, targets, weight, 1.0, 0.0)[0]
    nll_after = newton_terms(hidden, targets, weight, token_scales.float(), token_offsets.float())[
        0
    ]
    summary = {
        "count_edges": list(COUNT_EDGES),
        "scales": [round(float(x), 6) for x in scales],
        "offsets": [round(float(o), 6) for o in offsets],
        "rank_slopes": [round(float(a), 6) for a in slopes],
        "group_tokens": torch.bincount(groups, minlength=len(offsets)).tolist(),
        "tokens": len(targets),
        "validation_perplexity_before": round(math.exp(nll_before), 4),
        "validation_perplexity_after": round(math.exp(nll_after), 4),
    }
    plain_weight, bias = (
        model.get_output_embeddings().weight.detach(),
        final_norm(model).bias.detach(),
    )
    scaled_weight = plain_weight.double() * token_scales.double()[:, None]
    folds = []  # (bf16 ratio, float32 error, shift, bias, weight) for each candidate shift
    for shift in SHIFTS:
        new_bias, new_weight = offset_fold(model, scaled_weight, token_offsets, shift)
        error, bf16_ratio = fold_errors(
            hidden, plain_weight, new_bias - bias, new_weight, token_scales, token_offsets
        )
        folds.append(
            (
                bf16_ratio if error <= FOLD_TOLERANCE else math.inf,
                error,
                shift,
                new_bias,
                new_weight,
            )
        )
    bf16_ratio, error, shift, new_bias, new_weight = min(folds, key=lambda fold: (fold[0], fold[1]))
    if error > FOLD_TOLERANCE or bf16_ratio > BF16_TOLERANCE:
        error, bf16_ratio = min(fold[1] for fold in folds), min(fold[0] for fold in folds)
        reason = (
            f"fold error {error:.3g} nats > {FOLD_TOLERANCE}"
            if error > FOLD_TOLERANCE
            else f"bfloat16 logit error {bf16_ratio:.3g}x the plain model's > {BF16_TOLERANCE}x"
        )
        logger.warning(
            "%s: skipped, the final LayerNorm cannot carry the offsets exactly (%s); the model is "
            "saved without them",
            FLAG,
            reason,
        )
        return {**summary, "skipped": reason}
    fold_offsets(model, new_bias, new_weight)
    logger.info(
        "%s: scales %s, offsets %s and rank slopes %s for training counts from %s, fitted on %d "
        "held-out tokens (perplexity %.2f -> %.2f), folded into the LM head (ln_f bias shift %s "
        "x its weight, bfloat16 logit error %.2fx the plain model's)",
        FLAG,
        summary["scales"],
        summary["offsets"],
        summary["rank_slopes"],
        list(COUNT_EDGES),
        len(targets),
        math.exp(nll_before),
        math.exp(nll_after),
        shift,
        bf16_ratio,
    )
    return {**summary, "ln_f_bias_shift": shift, "bfloat16_error_ratio": round(bf16_ratio, 4)}
