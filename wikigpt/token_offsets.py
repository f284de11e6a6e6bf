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
o_t to token t's logit. The head is untied from the input embeddings for it (config.tie_word_embeddings = False;
the input embeddings are unchanged), and the saved model is a plain GPT2LMHeadModel for eval.py, generate.py and
from_pretrained alike. The fold is only as exact as C is far from 0: where it would shift a float32 logit by more
than 1e-3 nats off its offset, or double the bfloat16 rounding error of the logits, the offsets are skipped with a
warning and the model is saved without them.
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


def offset_head(model, token_offsets: torch.Tensor) -> torch.Tensor:
    """The LM head's weight with (o_t / C) / gamma added to row t: token t's logit gains o_t (see above)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    direction = 1.0 / norm.weight.detach().double()
    constant = float(norm.bias.detach().double() @ direction)
    weight = head.weight.detach().double() + (token_offsets.double() / constant)[:, None] * direction[None, :]
    return weight.to(head.weight.dtype)


def fold_errors(hidden, weight, new_weight, token_offsets, rows: int = 256) -> tuple[float, float]:
    """How exact the fold is on `rows` held-out positions (ln_f outputs): the largest |logit shift - offset| in
    float32 (nats), and the mean bfloat16 rounding error of the folded logits over that of the plain ones (the
    Trainer evaluates in bf16 autocast, and users load models in bf16)."""
    h = hidden[:rows].float()
    plain, folded = h @ weight.float().T, h @ new_weight.float().T
    error = float((folded.double() - plain.double() - token_offsets.double()).abs().max())
    hb = h.bfloat16()
    plain_bf16 = (hb @ weight.bfloat16().T).float() - plain
    folded_bf16 = (hb @ new_weight.bfloat16().T).float() - folded
    ratio = float(folded_bf16.abs().mean() / plain_bf16.abs().mean().clamp_min(1e-12))
    return (error, ratio) if math.isfinite(error) and math.isfinite(ratio) else (math.inf, math.inf)


def fold_offsets(model, new_weight: torch.Tensor) -> None:
    """Untie the LM head from the input embeddings and give it `new_weight` (the input embeddings are unchanged)."""
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
    new_weight = offset_head(model, token_offsets)
    error, bf16_ratio = fold_errors(hidden, model.get_output_embeddings().weight.detach(), new_weight, token_offsets)
    if error > FOLD_TOLERANCE or bf16_ratio > BF16_TOLERANCE:
        reason = (f"fold error {error:.3g} nats > {FOLD_TOLERANCE}" if error > FOLD_TOLERANCE else
                  f"bfloat16 logit error {bf16_ratio:.3g}x the plain model's > {BF16_TOLERANCE}x")
        logger.warning("%s: skipped, the final LayerNorm cannot carry the offsets exactly (%s); the model is saved "
                       "without them", FLAG, reason)
        return {**summary, "skipped": reason}
    fold_offsets(model, new_weight)
    logger.info("%s: offsets %s for training counts from %s, fitted on %d held-out tokens (perplexity %.2f -> %.2f), "
                "folded into the LM head", FLAG, summary["offsets"], list(COUNT_EDGES), len(targets),
                math.exp(nll_before), math.exp(nll_after))
    return summary
