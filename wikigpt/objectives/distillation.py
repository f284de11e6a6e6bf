"""--distill_from: learn a teacher's next-token distribution along with the data's next token.

233k training tokens give one observed next token per position; a teacher (an earlier run of the same recipe, or
any GPT-2 model of the same tokenizer) gives a whole distribution there, which tells the student which other
tokens were plausible. Training target per position: (1 - share) x one-hot + share x softmax(teacher logits), and
the loss is the cross-entropy against it ("born-again" self-distillation when the teacher is the same recipe).

The loss goes through wikigpt.objectives.chunked_loss, which forms softmax - target for its gradient anyway; the teacher's
logits are made there a chunk at a time, never for the whole batch. The teacher is frozen, in eval mode (no
dropout), reads the batch's real token ids (not --rare_input_dropout's), and is no submodule of the student:
checkpoints and the saved model hold the student alone.
"""

import logging

import torch
from transformers import GPT2LMHeadModel

from wikigpt.objectives.chunked_loss import use_chunked_loss
from wikigpt.errors import UsageError
from wikigpt.model import load_causal_lm

logger = logging.getLogger(__name__)

FLAG = "--distill_from"
WHOLE_BATCH = 2**62  # the chunk size of a run without --chunked_loss_size: one chunk, the plain loss's memory


def check_distill_args(args) -> None:
    if not 0 < args.distill_share <= 1:
        raise UsageError(f"--distill_share is the teacher's part of each training target, in (0, 1]; got "
                         f"{args.distill_share}. Pass e.g. --distill_share 0.5")


class Teacher:
    """The frozen teacher model, its share of the targets, and its logits in the student's head columns."""

    def __init__(self, model: GPT2LMHeadModel, share: float):
        self.model, self.share = model, share
        self.hidden = None  # the batch's final hidden states, set by the training forward (wikigpt.objectives.training_loss)

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask=None) -> None:
        if self.model.device != input_ids.device:  # no submodule, so the Trainer does not move it
            self.model.to(input_ids.device)
        hidden = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.hidden = hidden.reshape(-1, hidden.shape[-1])

    def full_logits(self, width: int, real_vocab: int):
        """(start, stop) -> the teacher's fp32 logits over the vocabulary, -inf in padded columns up to `width`."""
        weight = self.model.lm_head.weight

        def logits(start: int, stop: int) -> torch.Tensor:
            out = torch.full((stop - start, width), float("-inf"), device=weight.device)
            out[:, :real_vocab] = (self.hidden[start:stop] @ weight.T).float()
            return out

        return logits

    def class_logits(self, tied):
        """(start, stop) -> the teacher's fp32 logits of `tied`'s kept tokens, then of each tied class as one
        (wikigpt.objectives.rare_tokens.TiedTokens: the narrow head's columns).

        A class's logit is the log-sum-exp of its tokens' logits: the teacher's probability that the next token is
        one of them. A teacher trained with the same --rare_tokens_below has equal rows within a class, so that is one
        row's logit + log(n), without the product over all tied rows (which costs as much as a full-width head).
        """
        weight = self.model.lm_head.weight
        kept_weight = weight[tied.kept.to(weight.device)]
        tied_weight = weight[tied.tied.to(weight.device)]
        class_of = tied.class_of.to(weight.device)
        if torch.equal(tied_weight, weight[tied.row[tied.tied].to(weight.device)]):
            shared_weight, log_n = weight[tied.shared.to(weight.device)], tied.log_n.to(weight.device)
        else:
            shared_weight, log_n = None, None

        def logits(start: int, stop: int) -> torch.Tensor:
            hidden = self.hidden[start:stop]
            if shared_weight is not None:
                class_logit = (hidden @ shared_weight.T).float() + log_n
            else:  # log-sum-exp of each class's logits
                each = (hidden @ tied_weight.T).float()
                top = each.max(dim=1, keepdim=True).values
                sums = torch.zeros(len(hidden), len(tied.shared), device=each.device)
                sums.index_add_(1, class_of, (each - top).exp())
                class_logit = sums.log() + top
            return torch.cat([(hidden @ kept_weight.T).float(), class_logit], dim=1)

        return logits


def load_teacher(model, name: str, block_size: int, trust_remote_code: bool = False, allow_pickle: bool = False):
    """Checkpoint `name`, frozen, once it is known to fit `model` and the blocks (before any data is prepared)."""
    if not isinstance(model, GPT2LMHeadModel) or model.lm_head.bias is not None:
        raise UsageError(f"{FLAG} trains GPT-2 models (GPT2LMHeadModel); the model being trained is "
                         f"{type(model).__name__}: drop {FLAG}")
    teacher = load_causal_lm(name, flag=FLAG, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if not isinstance(teacher, GPT2LMHeadModel) or teacher.lm_head.bias is not None:
        raise UsageError(f"{FLAG} {name!r} is a {type(teacher).__name__}; the teacher must be a GPT-2 model "
                         f"(GPT2LMHeadModel), e.g. the output folder or a checkpoint-N of an earlier train.py run")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"{FLAG} {name!r} has a vocabulary of {teacher.config.vocab_size} tokens and the model "
                         f"being trained {model.config.vocab_size}; the teacher must use the same tokenizer")
    if teacher.config.n_positions < block_size:
        raise UsageError(f"{FLAG} {name!r} reads at most {teacher.config.n_positions} tokens but the blocks hold "
                         f"{block_size}; pass --block_size {teacher.config.n_positions} or a longer-context teacher")
    teacher.set_attn_implementation(model.config._attn_implementation)  # the student's --attn_implementation
    return teacher.eval().requires_grad_(False)


def attach_teacher(model, teacher: GPT2LMHeadModel, name: str, share: float) -> dict:
    """Train `model` on targets mixed with `teacher`'s distribution (after --rare_tokens_below has narrowed the
    head). Returns results.json's summary."""
    if getattr(model, "_training_loss", None) is None:  # neither --chunked_loss_size nor --rare_tokens_below
        use_chunked_loss(model, WHOLE_BATCH)
    object.__setattr__(model, "_teacher", Teacher(teacher, share))
    logger.info("%s %s: each training target is %.2f x the teacher's next-token distribution + %.2f x the data's "
                "next token", FLAG, name, share, 1 - share)
    return {"teacher": name, "share": share}
