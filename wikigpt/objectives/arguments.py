"""The levers for small data: train.py's flags of the chunked loss, the rare tokens and
distillation."""

from dataclasses import dataclass, field

from wikigpt.cli import old_flags
from wikigpt.objectives.chunked_loss import check_chunked_loss_args
from wikigpt.objectives.distillation import check_distill_args
from wikigpt.objectives.rare_tokens import check_rare_tokens_args


@dataclass
class LeverArguments:
    _argument_group_name = "levers for small data"  # its title in --help (HfArgumentParser)

    chunked_loss_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the training loss from the hidden states this many tokens at a time "
            "(a positive count, e.g. 4096), so the batch's full fp32 logits never exist; "
            "the loss is the same. GPT-2 models only. Default: off."
        },
    )
    rare_tokens_below: int | None = field(
        default=None,
        metadata={
            "help": "From scratch only: tokens seen fewer than this many times (1 or more) in the "
            "training data share one embedding row, and the training LM head covers the "
            "other tokens plus that row; the saved model is a plain GPT-2. Default: off.",
            "aliases": old_flags("rare_tokens_below"),
        },
    )
    rare_input_dropout: float = field(
        default=0.0,
        metadata={
            "help": "With --rare_tokens_below: the probability, in [0, 1), that a training input "
            "token reads the shared rare-token row instead of its own (its target stays). "
            "Default: 0 (off).",
            "aliases": old_flags("rare_input_dropout"),
        },
    )
    rare_token_groups: str = field(
        default="one",
        metadata={
            "help": "With --rare_tokens_below: one (the rare tokens share one row) or spelling "
            "(six rows: leading space or not x first letter upper-case, lower-case or "
            "neither). Default: one.",
            "choices": ["one", "spelling"],
            "aliases": old_flags("rare_token_groups"),
        },
    )
    distill_from: str | None = field(
        default=None,
        metadata={
            "help": "A GPT-2 teacher with the same tokenizer (folder or Hub id): each training "
            "target mixes its next-token distribution (--distill_share) with the data's "
            "next token; the saved model is the student alone. Default: off."
        },
    )
    distill_share: float = field(
        default=0.5,
        metadata={
            "help": "With --distill_from: the teacher's part of each training target, in (0, 1]. "
            "Default: 0.5."
        },
    )


def check_lever_args(levers: LeverArguments, model_name_or_path: str | None = None) -> None:
    """Values and combinations of the levers that cannot work, before anything is loaded."""
    check_chunked_loss_args(levers.chunked_loss_size)
    check_rare_tokens_args(levers, model_name_or_path)
    check_distill_args(levers)
