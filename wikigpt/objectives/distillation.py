"""--distill_from: learn a teacher's next-token distribution along with the data's next token.

233k training tokens give one observed next token per position; a teacher (an earlier run of the
same recipe, or any GPT-2 model of the same tokenizer) gives a whole distribution there, which tells
the student which other tokens were plausible. Training target per position: (1 - share) x one-hot +
share x softmax(teacher logits), and the loss is the cross-entropy against it: knowledge
distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), "born-again"
when the teacher is the same recipe (Furlanello et al. 2018, "Born-Again Neural Networks").

The loss goes through wikigpt.objectives.chunked_loss, which forms softmax - target for its gradient
anyway; the teacher's logits are made there a chunk at a time, never for the whole batch. The
teacher is frozen, in eval mode (no dropout), reads the batch's real token ids (not
--rare_input_dropout's), and is no submodule of the student: checkpoints and the saved model hold
the student alone.

A teacher that trained on the student's held-out articles leaks them into the student's targets
and biases every held-out number of the run: a teacher whose record (wikigpt_run.json,
wikigpt/reliability/run_record.py) or results.json shows another split is refused; one with
neither is taken, with a notice.
"""

import logging
import os

import torch
from transformers import GPT2LMHeadModel

from wikigpt.objectives.chunked_loss import use_chunked_loss
from wikigpt.errors import UsageError
from wikigpt.evaluation.mixture import recorded_split_tokens, split_tokens
from wikigpt.model import load_causal_lm
from wikigpt.reliability.run_record import (
    may_hold_out,
    read_run_record,
    run_folder_of,
    shown,
    trained_with,
)

logger = logging.getLogger(__name__)

FLAG = "--distill_from"
WHOLE_BATCH = (
    2**62
)  # the chunk size of a run without --chunked_loss_size: one chunk, the plain loss's memory


def check_distill_args(args) -> None:
    if not 0 < args.distill_share <= 1:
        raise UsageError(
            f"--distill_share is the teacher's part of each training target, in (0, 1]; got "
            f"{args.distill_share}. Pass e.g. --distill_share 0.5"
        )


class Teacher:
    """The frozen teacher model, its share of the targets, and its logits in the student's head
    columns."""

    def __init__(self, model: GPT2LMHeadModel, share: float):
        self.model, self.share = model, share
        # the batch's final hidden states, set by the training forward
        # (wikigpt.objectives.training_loss)
        self.hidden = None

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask=None) -> None:
        if self.model.device != input_ids.device:  # no submodule, so the Trainer does not move it
            self.model.to(input_ids.device)
        hidden = self.model.transformer(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        self.hidden = hidden.reshape(-1, hidden.shape[-1])

    def full_logits(self, width: int, real_vocab: int):
        """(start, stop) -> the teacher's fp32 logits over the vocabulary, -inf in padded columns up
        to `width`."""
        weight = self.model.lm_head.weight

        def logits(start: int, stop: int) -> torch.Tensor:
            out = torch.full((stop - start, width), float("-inf"), device=weight.device)
            out[:, :real_vocab] = (self.hidden[start:stop] @ weight.T).float()
            return out

        return logits

    def class_logits(self, tied):
        """(start, stop) -> the teacher's fp32 logits of `tied`'s kept tokens, then of each tied
        class as one (wikigpt.objectives.rare_tokens.TiedTokens: the narrow head's columns).

        A class's logit is the log-sum-exp of its tokens' logits: the teacher's probability that the
        next token is one of them. A teacher trained with the same --rare_tokens_below has equal
        rows within a class, so that is one row's logit + log(n), without the product over all tied
        rows (which costs as much as a full-width head).
        """
        weight = self.model.lm_head.weight
        kept_weight = weight[tied.kept.to(weight.device)]
        tied_weight = weight[tied.tied.to(weight.device)]
        class_of = tied.class_of.to(weight.device)
        if torch.equal(tied_weight, weight[tied.row[tied.tied].to(weight.device)]):
            shared_weight, log_n = (
                weight[tied.shared.to(weight.device)],
                tied.log_n.to(weight.device),
            )
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


SPLIT_FIX = (
    f"train the teacher with the student's --seed and --validation_split_percentage, or drop {FLAG}"
)
DATA_FIX = (
    f"train the teacher on the student's data (--train_file, --validation_file, "
    f"--dataset_dir, --dataset_name), or drop {FLAG}"
)
SPLIT_FLAGS = ("seed", "validation_split_percentage")  # where the held-out articles are held out
DATA_FLAGS = ("train_file", "validation_file", "dataset_dir", "dataset_name", "dataset_config_name")


def _teacher_record(name: str) -> dict | None:
    return read_run_record(name) if os.path.isdir(name) else None


def check_teacher_split(name: str, split: dict) -> None:
    """Refuse teacher `name` when its record shows a split other than the student's `split`
    (wikigpt.reliability.run_record.split_record): its training text may then hold the student's
    held-out articles. A teacher with neither a record nor a results.json (a Hub id, a folder
    from elsewhere) is taken, with one notice line."""
    record = _teacher_record(name)
    if record is None:
        if not (os.path.isdir(name) and recorded_split_tokens(run_folder_of(name))):
            logger.warning(
                "%s %r has no record of its training split; if it trained on this "
                "run's held-out articles, every held-out number of this run is biased",
                FLAG,
                name,
            )
        return  # an older run's folder: check_teacher_tokens compares its results.json's split
    there = record.get("split") or {}
    # --seed and --validation_split_percentage choose the held-out articles only where they are
    # held out of the training text; a separate validation file is the same whatever the seed.
    flags = (*SPLIT_FLAGS, *DATA_FLAGS) if may_hold_out(split) else DATA_FLAGS
    for flag in flags:
        if flag in there and there[flag] != split[flag]:
            fix = SPLIT_FIX if flag in SPLIT_FLAGS else DATA_FIX
            raise UsageError(
                f"{FLAG} {name!r} was trained {trained_with(flag, there[flag])} and "
                f"this run has {shown(split[flag])}, so it may have trained on this "
                f"run's held-out articles; {fix}"
            )


def check_teacher_tokens(name: str, counts: dict) -> None:
    """A teacher folder of an older run (a results.json, no record): refuse it when its
    train/validation token counts differ from the student's `counts` (as check_run_split)."""
    if not os.path.isdir(name) or _teacher_record(name) is not None:
        return
    there = recorded_split_tokens(run_folder_of(name))
    here = split_tokens(counts)
    if there is not None and there != here:
        raise UsageError(
            f"{FLAG} {name!r} was trained on train/validation splits of "
            f"{there['train']:,} / {there['validation']:,} tokens (its results.json) "
            f"and this run has {here['train']:,} / {here['validation']:,}, so it may "
            f"have trained on this run's held-out articles; {SPLIT_FIX}"
        )


def load_teacher(
    model,
    name: str,
    block_size: int,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    split: dict | None = None,
):
    """Checkpoint `name`, frozen, once it is known to fit `model` and the blocks (before any data is
    prepared).

    `split`: the student's (wikigpt.reliability.run_record.split_record), checked against the
    teacher's record."""
    if not isinstance(model, GPT2LMHeadModel) or model.lm_head.bias is not None:
        raise UsageError(
            f"{FLAG} trains GPT-2 models (GPT2LMHeadModel); the model being trained is "
            f"{type(model).__name__}: drop {FLAG}"
        )
    teacher = load_causal_lm(
        name, flag=FLAG, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    if not isinstance(teacher, GPT2LMHeadModel) or teacher.lm_head.bias is not None:
        raise UsageError(
            f"{FLAG} {name!r} is a {type(teacher).__name__}; the teacher must be a GPT-2 model "
            "(GPT2LMHeadModel), e.g. the output folder or a checkpoint-N of an earlier train.py "
            "run"
        )
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UsageError(
            f"{FLAG} {name!r} has a vocabulary of {teacher.config.vocab_size} tokens and the model "
            f"being trained {model.config.vocab_size}; the teacher must use the same tokenizer"
        )
    if teacher.config.n_positions < block_size:
        raise UsageError(
            f"{FLAG} {name!r} reads at most {teacher.config.n_positions} tokens but the blocks "
            f"hold {block_size}; pass --block_size {teacher.config.n_positions} or a "
            "longer-context teacher"
        )
    if split is not None:
        check_teacher_split(name, split)
    teacher.set_attn_implementation(
        model.config._attn_implementation
    )  # the student's --attn_implementation
    return teacher.eval().requires_grad_(False)


def attach_teacher(
    model, teacher: GPT2LMHeadModel, name: str, share: float, counts: dict | None = None
) -> dict:
    """Train `model` on targets mixed with `teacher`'s distribution (after --rare_tokens_below has
    narrowed the head). `counts`: the student's split sizes (prepare_lm_splits), checked against an
    older teacher run's results.json. Returns results.json's summary."""
    if counts is not None:
        check_teacher_tokens(name, counts)
    if (
        getattr(model, "_training_loss", None) is None
    ):  # neither --chunked_loss_size nor --rare_tokens_below
        use_chunked_loss(model, WHOLE_BATCH)
    object.__setattr__(model, "_teacher", Teacher(teacher, share))
    logger.info(
        "%s %s: each training target is %.2f x the teacher's next-token distribution + %.2f x the "
        "data's next token",
        FLAG,
        name,
        share,
        1 - share,
    )
    return {"teacher": name, "share": share}
