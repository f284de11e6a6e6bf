"""--distill_from: learn a teacher's next-token distribution along with the data's next token.

233k training tokens give one observed next token per position; a teacher (an earlier run of the same recipe, or
any GPT-2 model of the same tokenizer) gives a whole distribution there, which tells the student which other
tokens were plausible. Training target per position: (1 - share) x one-hot + share x softmax(teacher logits), and
the loss is the cross-entropy against it ("born-again" self-distillation when the teacher is the same recipe).

The loss goes through wikigpt.chunked_loss, which forms softmax - target for its gradient anyway; the teacher's
logits are made there a chunk at a time, never for the whole batch. The teacher is frozen, in eval mode (no
dropout), reads the batch's real token ids (not --tied_input_dropout's), and is no submodule of the student:
checkpoints and the saved model hold the student alone.
"""

import logging
import math

import torch
from transformers import GPT2LMHeadModel

from .block_offsets import RandomOffsetBlocks
from .chunked_loss import use_chunked_loss
from .errors import UsageError
from .model import load_causal_lm
from .ngram_targets import NgramTargets

logger = logging.getLogger(__name__)

FLAG = "--distill_from"
WHOLE_BATCH = 2**62  # the chunk size of a run without --chunked_loss_size: one chunk, the plain loss's memory


def check_distill_args(args) -> None:
    if not 0 < args.distill_share <= 1:
        raise UsageError(f"--distill_share is the teacher's part of each training target, in (0, 1]; got "
                         f"{args.distill_share}. Pass e.g. --distill_share 0.5")
    if not 0 <= args.distill_ngram_share < 1:
        raise UsageError(f"--distill_ngram_share is the n-gram's part of each training target, in [0, 1); got "
                         f"{args.distill_ngram_share}. Pass e.g. --distill_ngram_share 0.15, or 0 for none")
    if args.distill_from and args.distill_share + args.distill_ngram_share > 1:
        raise UsageError(f"--distill_share {args.distill_share} and --distill_ngram_share {args.distill_ngram_share} "
                         f"are parts of each training target and add up to more than 1; lower one of them")


class Teacher:
    """The frozen teacher model, its share of the targets, and its logits in the student's head columns."""

    def __init__(self, model: GPT2LMHeadModel | None, share: float):
        self.model, self.share = model, share  # model None: the n-gram alone (--distill_ngram_share)
        self.hidden = None  # the batch's final hidden states, set by the training forward (wikigpt.training_loss)
        self.ngram = None  # --distill_ngram_share: a wikigpt.ngram_targets.NgramTargets mixed into the distribution
        self.positions = None  # the stream position of each row's target (with self.ngram)

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask=None, block_start=None) -> None:
        if self.model is not None:
            if self.model.device != input_ids.device:  # no submodule, so the Trainer does not move it
                self.model.to(input_ids.device)
            hidden = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            self.hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.ngram is not None:
            if block_start is None:
                raise RuntimeError("--distill_ngram_share needs each training block's stream position (block_start)")
            offsets = torch.arange(1, input_ids.shape[1] + 1)  # row t predicts the token after it
            self.positions = (block_start.cpu().reshape(-1, 1) + offsets).reshape(-1)

    def _mixed(self, logits):
        """(start, stop) -> the soft part of the targets: softmax of `logits(start, stop)` and the n-gram's
        distribution, each weighted by its share of the targets."""
        def probs(start: int, stop: int) -> torch.Tensor:
            if self.ngram is None:
                return torch.softmax(logits(start, stop), dim=-1)
            ngram = self.ngram.dense(self.positions[start:stop], self.ngram.unigram.device)
            if self.model is None:
                return ngram
            p = torch.softmax(logits(start, stop), dim=-1)
            weight = self.ngram.share / self.share
            p.mul_(1 - weight)[:, :ngram.shape[1]].add_(ngram.to(p.device), alpha=weight)
            return p

        return probs

    def full_probs(self, width: int, real_vocab: int):
        """(start, stop) -> the teacher's fp32 distribution over the vocabulary, 0 in padded columns up to `width`."""
        if self.model is None:  # the n-gram alone, over the real vocabulary: nothing in padded columns
            return lambda start, stop: torch.nn.functional.pad(self._mixed(None)(start, stop), (0, width - real_vocab))
        weight = self.model.lm_head.weight

        def logits(start: int, stop: int) -> torch.Tensor:
            out = torch.full((stop - start, width), float("-inf"), device=weight.device)
            out[:, :real_vocab] = (self.hidden[start:stop] @ weight.T).float()
            return out

        return self._mixed(logits)

    def class_probs(self, kept: torch.Tensor, tied: torch.Tensor):
        """(start, stop) -> the teacher's fp32 distribution over the kept tokens, then the tied tokens as one class.

        The class's logit is the log-sum-exp of the tied tokens' logits: the teacher's probability that the next
        token is one of them. A teacher trained with the same --tie_tokens_below has equal tied rows, so that is one
        row's logit + log(n), without the product over all tied rows (which costs as much as a full-width head).
        """
        if self.model is None:
            return self._mixed(None)
        weight = self.model.lm_head.weight
        kept_weight, tied_weight = weight[kept.to(weight.device)], weight[tied.to(weight.device)]
        log_n = 0.0
        if torch.equal(tied_weight, tied_weight[:1].expand_as(tied_weight)):
            tied_weight, log_n = tied_weight[:1], math.log(len(tied))

        def logits(start: int, stop: int) -> torch.Tensor:
            hidden = self.hidden[start:stop]
            class_logit = torch.logsumexp((hidden @ tied_weight.T).float(), dim=-1, keepdim=True) + log_n
            return torch.cat([(hidden @ kept_weight.T).float(), class_logit], dim=1)

        return self._mixed(logits)


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


def attach_ngram(model, train_set, share: float) -> dict:
    """Mix a cross-fitted 4-gram of `train_set`'s stream into the targets, at `share` of each (after the teacher,
    if any, is attached). Returns results.json's summary."""
    if not isinstance(train_set, RandomOffsetBlocks):
        raise UsageError("--distill_ngram_share reads each block's place in the training stream: pass "
                         "--random_block_offset")
    teacher = getattr(model, "_teacher", None)
    if teacher is None:
        attach_teacher(model, None, None, 0.0)
        teacher = model._teacher
    tied = getattr(model, "_tied_tokens", None)
    columns, width = (tied.column.numpy()[train_set.ids], len(tied.kept) + 1) if tied else (
        train_set.ids, model.lm_head.out_features)
    teacher.ngram = NgramTargets(columns, width, share)
    teacher.share += share
    train_set.with_block_start = True
    logger.info("--distill_ngram_share %.2f: each training target is %.2f x a cross-fitted 4-gram's distribution + "
                "%.2f x the teacher's + %.2f x the data's next token", share, share, teacher.share - share,
                1 - teacher.share)
    return {"share": share, "order": teacher.ngram.order, "folds": teacher.ngram.folds}


def attach_teacher(model, teacher: GPT2LMHeadModel, name: str, share: float) -> dict:
    """Train `model` on targets mixed with `teacher`'s distribution (after --tie_tokens_below has narrowed the
    head). Returns results.json's summary."""
    if getattr(model, "_training_loss", None) is None:  # neither --chunked_loss_size nor --tie_tokens_below
        use_chunked_loss(model, WHOLE_BATCH)
    object.__setattr__(model, "_teacher", Teacher(teacher, share))
    if teacher is None:  # --distill_ngram_share alone
        return {}
    logger.info("%s %s: each training target is %.2f x the teacher's next-token distribution + %.2f x the data's "
                "next token", FLAG, name, share, 1 - share)
    return {"teacher": name, "share": share}
