"""--calibrate_temperature: after training, fit one softmax temperature on the held-out blocks and
fold it into ln_f.

A model trained for many epochs on a small corpus is over-confident on new text: new articles hold
more rare and unseen tokens than its training text, and a softmax temperature T > 1 (logits / T)
gives them back probability. T is the one value that minimises the held-out NLL of the
full-vocabulary softmax (the test split never chooses it): with b = 1 / T, NLL(b) = sum_i
logsumexp(b z_i) - b z_i[y_i] is convex in b, so Newton's method on b finds it in a few passes
(NLL'(b) = sum_i E_p[z] - z[y], NLL''(b) = sum_i Var_p[z]).

GPT-2's logits are ln_f(x) @ W.T with no bias, so dividing ln_f's weight and bias by T divides every
logit by T: the saved model is a plain GPT2LMHeadModel whose own softmax is the calibrated one, for
eval.py, generate.py and from_pretrained alike (the tied input embeddings are untouched).
"""

import logging
import math

import torch

from wikigpt.errors import UsageError

logger = logging.getLogger(__name__)

FLAG = "--calibrate_temperature"
BOUNDS = (
    0.25,
    4.0,
)  # b = 1/T stays in [1/4, 4]: a temperature outside it means something else is wrong


def final_norm(model):
    """The last LayerNorm before the LM head (GPT-2's transformer.ln_f), or None."""
    return getattr(getattr(model, "transformer", None), "ln_f", None)


def check_calibration_model(model, flag: str = FLAG) -> None:
    """GPT-2's ln_f (with a bias) and a bias-free LM head: what --calibrate_temperature and
    --calibrate_token_offsets fold into."""
    what = "the temperature" if flag == FLAG else "its scales and offsets"
    if not isinstance(final_norm(model), torch.nn.LayerNorm) or final_norm(model).bias is None:
        raise UsageError(
            f"{flag} folds {what} into GPT-2's final LayerNorm (transformer.ln_f), which "
            f"{type(model).__name__} does not have; drop {flag}"
        )
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UsageError(f"{flag} needs an LM head without a bias (GPT-2's); drop {flag}")


@torch.no_grad()
def held_out_logit_inputs(model, blocks, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of every predicted position of `blocks` (rows of input_ids) and the
    tokens they predict."""
    device = next(model.parameters()).device
    hidden, targets = [], []
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(blocks[start : start + batch_size]["input_ids"], device=device)
        h = model.transformer(input_ids=ids).last_hidden_state[:, :-1]
        hidden.append(h.reshape(-1, h.shape[-1]).float())
        targets.append(ids[:, 1:].reshape(-1))
    return torch.cat(hidden), torch.cat(targets)


@torch.no_grad()
def nll_and_derivatives(
    hidden, targets, weight, b: float, chunk: int = 1024
) -> tuple[float, float, float]:
    """Mean NLL of softmax(b * hidden @ weight.T) and its first two derivatives in b."""
    nll = grad = curv = 0.0
    for start in range(0, len(targets), chunk):
        z = hidden[start : start + chunk] @ weight.T
        y = targets[start : start + chunk]
        logp = torch.log_softmax(b * z, dim=-1)
        p = logp.exp()
        mean_z = (p * z).sum(-1)
        z_y = z.gather(-1, y[:, None])[:, 0]
        nll += float((-logp.gather(-1, y[:, None])).double().sum())
        grad += float((mean_z - z_y).double().sum())
        curv += float((p * (z - mean_z[:, None]) ** 2).sum(-1).double().sum())
    n = len(targets)
    return nll / n, grad / n, curv / n


def fit_temperature(
    hidden, targets, weight, steps: int = 20, tol: float = 1e-5
) -> tuple[float, float, float]:
    """(T, held-out NLL at T = 1, held-out NLL at T): Newton's method on b = 1/T, kept within
    BOUNDS.

    A step that raises the NLL (far from the minimum Newton can overshoot) is halved until it does
    not."""
    b = 1.0
    current = nll_and_derivatives(hidden, targets, weight, b)
    nll_at_1 = current[0]
    for _ in range(steps):
        new_b = min(max(b - current[1] / max(current[2], 1e-12), BOUNDS[0]), BOUNDS[1])
        while abs(new_b - b) >= tol:
            trial = nll_and_derivatives(hidden, targets, weight, new_b)
            if trial[0] <= current[0]:
                break
            new_b = (b + new_b) / 2
        if abs(new_b - b) < tol:
            break
        b, current = new_b, trial
    return 1.0 / b, nll_at_1, current[0]


@torch.no_grad()
def apply_temperature(model, temperature: float) -> None:
    """Divide every logit of `model` by `temperature` (through ln_f's weight and bias)."""
    norm = final_norm(model)
    norm.weight.div_(temperature)
    norm.bias.div_(temperature)


def calibrate_temperature(model, blocks, batch_size: int) -> dict:
    """Fit T on `blocks` (the held-out split), fold it into `model`; returns what results.json
    records."""
    was_training = model.training
    model.eval()
    try:
        hidden, targets = held_out_logit_inputs(model, blocks, batch_size)
        weight = (
            model.get_output_embeddings().weight.float()
        )  # fp32 sums whatever the model's dtype
        temperature, nll_before, nll_after = fit_temperature(hidden, targets, weight)
    finally:
        model.train(was_training)
    apply_temperature(model, temperature)
    summary = {
        "temperature": round(temperature, 6),
        "tokens": len(targets),
        "validation_perplexity_before": round(math.exp(nll_before), 4),
        "validation_perplexity_after": round(math.exp(nll_after), 4),
    }
    logger.info(
        "%s: temperature %.4f fitted on %d held-out tokens (perplexity %.2f -> %.2f), "
        "folded into ln_f",
        FLAG,
        temperature,
        len(targets),
        math.exp(nll_before),
        math.exp(nll_after),
    )
    return summary
