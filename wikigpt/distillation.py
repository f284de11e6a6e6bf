"""--distill_from: learn a teacher's next-token distribution along with the data's next token.

233k training tokens give one observed next token per position; a teacher (an earlier run of the same recipe, or
any GPT-2 model of the same tokenizer) gives a whole distribution there, which tells the student which other
tokens were plausible. Training target per position: (1 - share) x one-hot + share x softmax(teacher logits), and
the loss is the cross-entropy against it ("born-again" self-distillation when the teacher is the same recipe).

The loss goes through wikigpt.chunked_loss, which forms softmax - target for its gradient anyway; the teacher's
logits are made there a chunk at a time, never for the whole batch. The teacher is frozen, in eval mode (no
dropout), reads the batch's real token ids (not --tied_input_dropout's), and is no submodule of the student:
checkpoints and the saved model hold the student alone.

--distill_cache_share c mixes a cache of the block so far into the teacher (the block cache of eval.py's mixtures,
wikigpt.mixture): its target at each position is (1 - c) x softmax(teacher logits) + c x how often each token
occurred in the block up to that position. A new article repeats its names, and the network learns to copy from
the context only from targets that ask for it at every position, not only where the next token happens to repeat.
"""

import logging
import math

import torch
from transformers import GPT2LMHeadModel

from .chunked_loss import use_chunked_loss
from .errors import UsageError
from .model import load_causal_lm

logger = logging.getLogger(__name__)

FLAG = "--distill_from"
WHOLE_BATCH = 2**62  # the chunk size of a run without --chunked_loss_size: one chunk, the plain loss's memory


def check_distill_args(args) -> None:
    if not 0 < args.distill_share <= 1:
        raise UsageError(f"--distill_share is the teacher's part of each training target, in (0, 1]; got "
                         f"{args.distill_share}. Pass e.g. --distill_share 0.5")
    if not 0 <= args.distill_cache_share < 1:
        raise UsageError(f"--distill_cache_share is the block cache's part of the teacher's distribution, in [0, 1); "
                         f"got {args.distill_cache_share}. Pass e.g. --distill_cache_share 0.1, or 0 for none")
    if args.distill_cache_share and not args.distill_from:
        raise UsageError("--distill_cache_share mixes a block cache into a teacher's distribution; pass "
                         "--distill_from too, or drop --distill_cache_share")


class Teacher:
    """The frozen teacher model, its share of the targets, and its logits in the student's head columns."""

    def __init__(self, model: GPT2LMHeadModel, share: float, cache_share: float = 0.0):
        self.model, self.share, self.cache_share = model, share, cache_share
        self.hidden = None  # the batch's final hidden states, set by the training forward (wikigpt.training_loss)
        self.input_ids = None  # the batch's real ids, for the block cache

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask=None) -> None:
        if self.model.device != input_ids.device:  # no submodule, so the Trainer does not move it
            self.model.to(input_ids.device)
        hidden = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.input_ids = input_ids

    def _with_cache(self, probs, columns: torch.Tensor):
        """`probs`, or (1 - cache_share) x them + cache_share x the block cache, whose counts are over
        `columns[token id]` (the head's column of each token)."""
        if not self.cache_share:
            return probs
        ids = columns.to(self.input_ids.device)[self.input_ids]  # batch x block
        block = ids.shape[1]
        # Sparse: position i of a block adds to the columns of its tokens 0..i only, each token once (at its first
        # occurrence j in the block): cache_share x how often it occurs among tokens 0..i / (i + 1).
        same = ids[:, :, None] == ids[:, None, :]  # same[b, j, k]: tokens j and k of block b are one token
        first = ~same.tril(-1).any(2)  # no earlier position holds token j
        seen = same.float().cumsum(2).transpose(1, 2)  # seen[b, i, j]: how often token j occurs among tokens 0..i
        position = torch.arange(block, device=ids.device)
        read = position[None, :, None] >= position[None, None, :]  # j <= i
        share = seen * (read & first[:, None, :]) * (self.cache_share / (position + 1.0))[None, :, None]
        at, share = ids[:, None, :].expand(-1, block, -1).reshape(-1, block), share.reshape(-1, block)

        def mixed(start: int, stop: int) -> torch.Tensor:
            return probs(start, stop).mul_(1 - self.cache_share).scatter_add_(1, at[start:stop], share[start:stop])

        return mixed

    def full_probs(self, width: int, real_vocab: int):
        """(start, stop) -> the teacher's fp32 next-token probabilities, 0 in padded columns up to `width`."""
        weight = self.model.lm_head.weight

        def probs(start: int, stop: int) -> torch.Tensor:
            out = torch.zeros((stop - start, width), device=weight.device)
            out[:, :real_vocab] = torch.softmax((self.hidden[start:stop] @ weight.T).float(), dim=-1)
            return out

        return self._with_cache(probs, torch.arange(real_vocab))

    def class_probs(self, kept: torch.Tensor, tied: torch.Tensor):
        """(start, stop) -> the teacher's fp32 probabilities of the kept tokens, then of the tied tokens as one class.

        The class's logit is the log-sum-exp of the tied tokens' logits: the teacher's probability that the next
        token is one of them. A teacher trained with the same --tie_tokens_below has equal tied rows, so that is one
        row's logit + log(n), without the product over all tied rows (which costs as much as a full-width head).
        """
        weight = self.model.lm_head.weight
        kept_weight, tied_weight = weight[kept.to(weight.device)], weight[tied.to(weight.device)]
        log_n = 0.0
        if torch.equal(tied_weight, tied_weight[:1].expand_as(tied_weight)):
            tied_weight, log_n = tied_weight[:1], math.log(len(tied))

        def probs(start: int, stop: int) -> torch.Tensor:
            hidden = self.hidden[start:stop]
            class_logit = torch.logsumexp((hidden @ tied_weight.T).float(), dim=-1, keepdim=True) + log_n
            return torch.softmax(torch.cat([(hidden @ kept_weight.T).float(), class_logit], dim=1), dim=-1)

        columns = torch.full((len(kept) + len(tied),), len(kept), dtype=torch.long)  # a tied token: the class
        columns[kept] = torch.arange(len(kept))
        return self._with_cache(probs, columns)


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
    return teacher.eval().requires_grad_(False)


def attach_teacher(model, teacher: GPT2LMHeadModel, name: str, share: float, cache_share: float = 0.0) -> dict:
    """Train `model` on targets mixed with `teacher`'s distribution (after --tie_tokens_below has narrowed the
    head). Returns results.json's summary."""
    if getattr(model, "_training_loss", None) is None:  # neither --chunked_loss_size nor --tie_tokens_below
        use_chunked_loss(model, WHOLE_BATCH)
    object.__setattr__(model, "_teacher", Teacher(teacher, share, cache_share))
    logger.info("%s %s: each training target is %.2f x the teacher's next-token distribution + %.2f x the data's "
                "next token", FLAG, name, share, 1 - share)
    if not cache_share:
        return {"teacher": name, "share": share}
    logger.info("--distill_cache_share %.2f: the teacher's distribution is %.2f x its softmax + %.2f x the block "
                "cache", cache_share, 1 - cache_share, cache_share)
    return {"teacher": name, "share": share, "cache_share": cache_share}
