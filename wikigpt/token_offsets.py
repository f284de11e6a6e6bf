"""--calibrate_token_offsets: after training, fit one logit offset per token-frequency class on the held-out split
and fold it into the saved LM head.

A model trained for many epochs on a small corpus misjudges how likely a token is by how often it saw it: new
articles bring tokens it never saw or saw once more often than the training text did, while its many-times-seen
tokens are slightly over-predicted. One softmax temperature (--calibrate_temperature) cannot tell these apart; one
offset per class of training count can. Tokens are grouped by their count in the training text (COUNT_EDGES: 0,
1, 2, 3-4, 5-9, 10-29, 30-99, 100-999, 1000+), and the offsets o_g are those that minimise the held-out NLL.

Fitting is cheap and exact: with S_ig = logsumexp of the logits z_i over group g's tokens,
    log p(y_i) = z_iy + o_g(y) - logsumexp_g (o_g + S_ig),
so one pass over the held-out logits gives S, and the NLL is a convex function of a handful of numbers (Newton's
method, a small L2 pull towards 0 for groups the held-out text barely holds).

Folding is exact too. GPT-2's logits are W h, h = gamma * n + beta from ln_f, and n sums to 0 (LayerNorm subtracts
the mean), so h . (1 / gamma) = sum(beta / gamma) = C for every input: adding (o_t / C) / gamma to row t of W adds
o_t to token t's logit. C is whatever training left in beta, and can be near 0 (then the rows that carry the
offsets grow huge and so do the logits' rounding errors), so beta first gains delta = k * gamma, which makes
C' = C + k * width, and row t of W gains ((o_t - W_t . delta) / C') / gamma: the logits are W_t . h + W_t . delta +
o_t - W_t . delta, exactly the old ones plus the offsets. k (in SHIFTS, signed like C) is the one whose folded
logits have the smallest bfloat16 rounding error on the held-out positions. The head is untied from the input
embeddings for it (config.tie_word_embeddings = False; the input embeddings are unchanged), and the saved model is
a plain GPT2LMHeadModel for eval.py, generate.py and from_pretrained alike. Where no k keeps a float32 logit within
1e-3 nats of its offset and the bfloat16 rounding error of the logits under twice the plain model's, the offsets
are skipped with a warning and the model is saved without them.
"""

import logging
import math

import numpy as np
import torch

from .calibration import final_norm, held_out_logit_inputs

logger = logging.getLogger(__name__)

FLAG = "--calibrate_token_offsets"
COUNT_EDGES = (0, 1, 2, 3, 5, 10, 30, 100, 1000)  # group g: COUNT_EDGES[g] <= training count < COUNT_EDGES[g + 1]
L2 = 1e-3  # on the mean held-out NLL: keeps the offset of a group the held-out text (almost) never holds finite
FOLD_TOLERANCE = 1e-3  # largest float32 logit error of the fold (in nats) on the held-out positions
BF16_TOLERANCE = 2.0  # the folded logits' mean bfloat16 rounding error, at most this many times the plain ones'
SHIFTS = (0.0, 0.25, 0.5, 1.0, 2.0)  # ln_f's bias may gain k * gamma: n's entries are ~1 in size, so k ~ 1 or less


def count_groups(counts: np.ndarray) -> torch.Tensor:
    """Group id of every token: the COUNT_EDGES bin of its training count."""
    return torch.as_tensor(np.searchsorted(COUNT_EDGES, counts, side="right") - 1, dtype=torch.long)


@torch.no_grad()
def group_logsumexp(hidden, targets, weight, groups, n_groups: int | None = None, chunk: int = 1024):
    """(S, z_y): per position, logsumexp of the logits over each of `n_groups` groups' tokens (-inf for an empty
    group), and the target's logit."""
    n_groups = n_groups or int(groups.max()) + 1
    members = [torch.nonzero(groups == g)[:, 0] for g in range(n_groups)]
    lse, target_logit = [], []
    for start in range(0, len(targets), chunk):
        z = hidden[start:start + chunk] @ weight.T
        lse.append(torch.stack([torch.logsumexp(z[:, m], -1) if len(m) else torch.full((len(z),), -math.inf)
                                for m in members], -1).double())
        target_logit.append(z.gather(-1, targets[start:start + chunk, None])[:, 0].double())
    return torch.cat(lse), torch.cat(target_logit)


def offsets_nll(offsets, lse, target_logit, target_group) -> float:
    """Mean NLL of the offset softmax (without the L2 term)."""
    return float((torch.logsumexp(offsets + lse, -1) - target_logit - offsets[target_group]).mean())


def fit_offsets(lse, target_logit, target_group, l2: float = L2, steps: int = 50, tol: float = 1e-9):
    """Offsets (one per group, 0 for an empty group) minimising mean NLL + l2 * |o|^2: damped Newton steps."""
    present = torch.isfinite(lse).all(0)  # a group without tokens has S = -inf everywhere and keeps offset 0
    s = lse[:, present]
    remap = torch.cumsum(present.long(), 0) - 1
    y_group = remap[target_group]
    observed = torch.bincount(y_group, minlength=s.shape[1]).double() / len(y_group)

    def objective(o):
        return float((torch.logsumexp(o + s, -1) - o[y_group]).mean()) + l2 * float(o @ o)

    o = torch.zeros(s.shape[1], dtype=torch.float64)
    current = objective(o)
    for _ in range(steps):
        q = torch.softmax(o + s, -1)
        grad = q.mean(0) - observed + 2 * l2 * o
        hess = torch.diag(q.mean(0)) - q.T @ q / len(q) + 2 * l2 * torch.eye(len(o), dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            trial = objective(o - scale * step)
            if trial <= current:
                break
            scale /= 2
        o, improvement, current = o - scale * step, current - trial, trial
        if improvement < tol:
            break
    offsets = torch.zeros(lse.shape[1], dtype=torch.float64)
    offsets[present] = o
    return offsets


def offset_fold(model, token_offsets: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln_f bias, LM head weight) that add token t's offset to its logit: the bias gains delta = k * gamma (k =
    `shift`, signed like C), row t of the head ((o_t - W_t . delta) / C') / gamma (see above)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    gamma, beta, weight = (t.detach().double() for t in (norm.weight, norm.bias, head.weight))
    direction = 1.0 / gamma
    delta = (-shift if float(beta @ direction) < 0 else shift) * gamma
    constant = float((beta + delta) @ direction)
    correction = token_offsets.to(weight.device).double() - weight @ delta
    new_weight = weight + (correction / constant)[:, None] * direction[None, :]
    return (beta + delta).to(norm.bias.dtype), new_weight.to(head.weight.dtype)


def fold_errors(hidden, weight, new_bias_shift, new_weight, token_offsets, rows: int = 256) -> tuple[float, float]:
    """How exact a fold is on `rows` held-out positions (ln_f outputs, which gain `new_bias_shift`): the largest
    |logit shift - offset| in float32 (nats), and the mean bfloat16 rounding error of the folded logits over that
    of the plain ones (the Trainer evaluates in bf16 autocast, and users load models in bf16)."""
    h = hidden[:rows].float()
    h_folded = (h.double() + new_bias_shift.double()).float()
    plain, folded = h @ weight.float().T, h_folded @ new_weight.float().T
    error = float((folded.double() - plain.double() - token_offsets.double()).abs().max())
    plain_bf16 = (h.bfloat16() @ weight.bfloat16().T).float() - plain
    folded_bf16 = (h_folded.bfloat16() @ new_weight.bfloat16().T).float() - folded
    ratio = float(folded_bf16.abs().mean() / plain_bf16.abs().mean().clamp_min(1e-12))
    return (error, ratio) if math.isfinite(error) and math.isfinite(ratio) else (math.inf, math.inf)


def fold_offsets(model, new_bias: torch.Tensor, new_weight: torch.Tensor) -> None:
    """Give ln_f `new_bias`, untie the LM head from the input embeddings and give it `new_weight` (the input
    embeddings are unchanged)."""
    with torch.no_grad():
        final_norm(model).bias.copy_(new_bias)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(new_weight, requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False  # from_pretrained must load this head, not re-tie it to wte
    if (text_config := model.config.get_text_config()) is not model.config:
        text_config.tie_word_embeddings = False


def calibrate_token_offsets(model, blocks, batch_size: int, counts: np.ndarray) -> dict:
    """Fit per-group offsets on `blocks` (the held-out split) and fold them into `model`; returns what results.json
    records (or why they were skipped)."""
    was_training = model.training
    model.eval()
    try:
        hidden, targets = held_out_logit_inputs(model, blocks, batch_size)
        weight = model.get_output_embeddings().weight.float()
        groups = count_groups(counts[:weight.shape[0]]).to(targets.device)
        lse, target_logit = group_logsumexp(hidden, targets, weight, groups, len(COUNT_EDGES))
    finally:
        model.train(was_training)
    offsets = fit_offsets(lse, target_logit, groups[targets])
    nll_before = offsets_nll(torch.zeros_like(offsets), lse, target_logit, groups[targets])
    nll_after = offsets_nll(offsets, lse, target_logit, groups[targets])
    summary = {"count_edges": list(COUNT_EDGES), "offsets": [round(float(o), 6) for o in offsets],
               "group_tokens": torch.bincount(groups, minlength=len(offsets)).tolist(), "tokens": len(targets),
               "validation_perplexity_before": round(math.exp(nll_before), 4),
               "validation_perplexity_after": round(math.exp(nll_after), 4)}
    token_offsets = offsets[groups].to(weight.device)
    plain_weight, bias = model.get_output_embeddings().weight.detach(), final_norm(model).bias.detach()
    folds = []  # (bf16 ratio, float32 error, shift, bias, weight) for each candidate shift
    for shift in SHIFTS:
        new_bias, new_weight = offset_fold(model, token_offsets, shift)
        error, bf16_ratio = fold_errors(hidden, plain_weight, new_bias - bias, new_weight, token_offsets)
        folds.append((bf16_ratio if error <= FOLD_TOLERANCE else math.inf, error, shift, new_bias, new_weight))
    bf16_ratio, error, shift, new_bias, new_weight = min(folds, key=lambda fold: (fold[0], fold[1]))
    if error > FOLD_TOLERANCE or bf16_ratio > BF16_TOLERANCE:
        error, bf16_ratio = min(fold[1] for fold in folds), min(fold[0] for fold in folds)
        reason = (f"fold error {error:.3g} nats > {FOLD_TOLERANCE}" if error > FOLD_TOLERANCE else
                  f"bfloat16 logit error {bf16_ratio:.3g}x the plain model's > {BF16_TOLERANCE}x")
        logger.warning("%s: skipped, the final LayerNorm cannot carry the offsets exactly (%s); the model is saved "
                       "without them", FLAG, reason)
        return {**summary, "skipped": reason}
    fold_offsets(model, new_bias, new_weight)
    logger.info("%s: offsets %s for training counts from %s, fitted on %d held-out tokens (perplexity %.2f -> %.2f), "
                "folded into the LM head (ln_f bias shift %s x its weight, bfloat16 logit error %.2fx the plain "
                "model's)", FLAG, summary["offsets"], list(COUNT_EDGES), len(targets), math.exp(nll_before),
                math.exp(nll_after), shift, bf16_ratio)
    return {**summary, "ln_f_bias_shift": shift, "bfloat16_error_ratio": round(bf16_ratio, 4)}
