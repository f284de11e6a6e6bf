"""Chunked LM-head loss: training never materialises the fp32 logits of the whole batch.

GPT-2's training loss goes hidden states -> logits (batch x block x 50257) -> fp32 upcast ->
log-softmax -> CE, and autograd keeps the logits, their fp32 copy and the log-softmax for the
backward pass: at 16 x 1024 tokens each fp32 copy is 3.3 GB. With `--chunked_loss_size N` the
training forward computes the loss from the final hidden states N tokens at a time, and computes
each chunk's gradients right there (softmax - one-hot, then the two LM-head matmuls), so only one
chunk's logits are ever alive and nothing is recomputed in the backward pass (the same FLOPs as the
plain path; a Liger-style fused linear cross-entropy written with plain torch ops).

Only the training forward with labels changes (wikigpt.objectives.training_loss): it returns the
loss and `logits=None`. Evaluation, generation and checkpoints are those of the plain
GPT2LMHeadModel.
"""

import torch
from transformers import GPT2LMHeadModel

from wikigpt.errors import UsageError
from wikigpt.padded_vocab import head_weight
from wikigpt.objectives.training_loss import replace_training_loss

FLAG = "--chunked_loss_size"
IGNORE_INDEX = -100  # transformers' ForCausalLMLoss default, and what the Trainer pads labels with


def check_chunked_loss_args(size: int | None) -> None:
    if size is not None and size <= 0:
        raise UsageError(
            f"{FLAG} must be a positive number of tokens such as 4096; got {size}. Pass e.g. "
            f"{FLAG} 4096, or leave it out to compute the loss over the whole batch at once"
        )


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of CE(hidden @ weight.T, targets) and its gradients, computed chunk by chunk
    in forward.

    `real_vocab` < weight rows (a padded vocabulary): the padded columns are set to -inf before the
    softmax, so they get no probability and no gradient, while the matmuls keep the padded,
    tile-friendly width.
    `class_offsets`: constants added to the last len(class_offsets) columns' logits
    (--rare_tokens_below's classes).
    `teacher_logits(start, stop)` (--distill_from): the teacher's fp32 logits of those rows, in this
    head's columns; the target is then (1 - teacher_share) x one-hot + teacher_share x their softmax
    (wikigpt.objectives.distillation).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        chunk_size: int,
        real_vocab: int,
        class_offsets=None,
        teacher_logits=None,
        teacher_share: float = 0.0,
    ):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (
                h @ weight.T
            ).float()  # the LM head (autocast applies), upcast like ForCausalLMLoss
            if real_vocab < logits.shape[-1]:
                logits[:, real_vocab:] = float("-inf")
            if class_offsets is not None:
                logits[:, logits.shape[1] - len(class_offsets) :] += class_offsets
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            target_logit = logits.gather(1, safe_t).squeeze(1)
            if teacher_logits is not None:
                soft = torch.softmax(teacher_logits(start, start + h.shape[0]), dim=-1)
                expected = (soft[:, :real_vocab] * logits[:, :real_vocab]).sum(
                    1
                )  # padded columns: 0 x -inf
                target_logit = (1 - teacher_share) * target_logit + teacher_share * expected
            total += ((log_norm.squeeze(1) - target_logit) * valid).sum()
            # d(sum of CE)/d(logits) = softmax - target, zero for ignored tokens; reuses the logits'
            # memory.
            grad = logits.sub_(log_norm).exp_()
            grad.scatter_add_(
                1, safe_t, torch.full_like(safe_t, -1 + teacher_share, dtype=grad.dtype)
            )
            if teacher_logits is not None:
                grad.sub_(soft, alpha=teacher_share)
                del soft
            grad = grad.mul_(valid.unsqueeze(1)).to(
                weight.dtype
            )  # as autograd casts back through .float()
            grad_hidden[start : start + chunk_size] = grad @ weight
            grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_causal_lm_loss(
    hidden_states,
    weight,
    labels,
    chunk_size: int,
    real_vocab: int,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels=None,
    teacher=None,
):
    """transformers' ForCausalLMLoss(hidden_states @ weight.T, labels) without the whole batch's
    logits.

    Same shift (position i predicts label i+1, the last position predicts nothing), same -100
    handling, mean over real label tokens, or sum / num_items_in_batch when the Trainer passes it
    (gradient accumulation). `teacher`: a wikigpt.objectives.distillation.Teacher whose distribution
    is mixed into the targets.
    """
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if teacher is None:
        total = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, real_vocab)
    else:
        total = ChunkedLinearCrossEntropy.apply(
            hidden,
            weight,
            targets,
            chunk_size,
            real_vocab,
            None,
            teacher.full_logits(weight.shape[0], real_vocab),
            teacher.share,
        )
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunked_loss(model, hidden_states, labels, teacher=None, **loss_kwargs):
    # head_weight: the padded-width weight when --pad_vocab_multiple is on (wikigpt.padded_vocab)
    return chunked_causal_lm_loss(
        hidden_states,
        head_weight(model.lm_head),
        labels,
        model._chunked_loss_size,
        model.lm_head.out_features,
        teacher=teacher,
        **loss_kwargs,
    )


def use_chunked_loss(model, chunk_size: int):
    """Compute this model's training loss in chunks of `chunk_size` tokens (GPT-2 models only)."""
    check_chunked_loss_args(chunk_size)
    if not isinstance(model, GPT2LMHeadModel) or model.lm_head.bias is not None:
        raise UsageError(
            f"{FLAG} supports GPT-2 models (GPT2LMHeadModel); this model is "
            f"{type(model).__name__}: drop {FLAG}"
        )
    model._chunked_loss_size = chunk_size
    return replace_training_loss(model, _chunked_loss)
