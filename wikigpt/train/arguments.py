"""TrainingArguments with language-modelling defaults, and the output-directory rules of a run."""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from wikigpt.reliability.checkpoints import RESUME_FLAG, in_output_dir
from wikigpt.train.early_stopping import configure_early_stopping
from wikigpt.errors import UsageError
from wikigpt.train.precision import resolve_cpu_precision
from wikigpt.train.optimizers import check_optimizer_args
from wikigpt.train.trainer import check_schedule_args
from wikigpt.train.time_budget import check_time_budget_args
from wikigpt.train.weight_averaging import check_weight_averaging_args


@dataclass
class WikiTrainingArguments(TrainingArguments):
    """HF TrainingArguments with GPT-2/nanoGPT-style LM pre-training defaults, and wikigpt's own
    training flags."""

    _argument_group_name = "training"  # its title in --help (HfArgumentParser)

    output_dir: str | None = field(
        default="out/wikigpt", metadata={"help": "Where the model and results go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow writing into a non-empty --output_dir; the earlier run's "
            "checkpoint-N folders are renamed previous-run-checkpoint-N. Default: off."
        },
    )
    learning_rate: float = field(
        default=6e-4, metadata={"help": "Peak learning rate. Default: 6e-4."}
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "Learning-rate schedule after warmup. Default: cosine. warmup_stable_decay "
            "needs --lr_scheduler_kwargs '{\"num_decay_steps\": 0.2}' (a fraction of all steps, or "
            "a step count)."
        },
    )
    warmup_steps: float = field(
        default=0.05,
        metadata={"help": "Warmup steps, or a fraction (< 1) of all steps. Default: 0.05."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay. Default: 0.1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2. Default: 0.95."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Blocks per device per step."}
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "Blocks per device per eval step."}
    )
    num_train_epochs: float = field(
        default=3.0, metadata={"help": "Passes over the training blocks."}
    )
    eval_strategy: str = field(
        default="epoch", metadata={"help": "When to evaluate on validation: no/steps/epoch."}
    )
    save_strategy: str = field(
        default="epoch", metadata={"help": "When to save a checkpoint: no/steps/epoch/best."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step's loss."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on when training on a CPU with native bf16 "
            "matmuls (AVX512-BF16 or AMX), off elsewhere; --bf16 false trains in fp32.",
            "nargs": "?",
            "const": True,
        },
    )
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Peak FLOP/s of one device, for the logged MFU. Default: looked up from the "
            "GPU name; no MFU on a CPU or an unknown GPU."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run: a checkpoint-N folder, or 'latest' (also the bare flag) for "
            "the newest complete checkpoint in --output_dir.",
            "nargs": "?",
            "const": "latest",
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without a better validation perplexity and "
            "end with the best checkpoint; needs --eval_strategy and --save_strategy equal. "
            "Default: off."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "With --early_stopping_patience: the smallest improvement that counts. "
            "Default: 0."
        },
    )

    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Evaluate and save an exponential moving average of the weights with this "
            "decay per step, in (0, 1), e.g. 0.999; training continues from the raw weights. "
            "Default: off."
        },
    )
    swa_start: float | None = field(
        default=None,
        metadata={
            "help": "Evaluate and save the uniform average of the weights of every step after this "
            "fraction of training, in [0, 1), e.g. 0.75; an alternative to --ema_decay. Default: "
            "off."
        },
    )

    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Train for this many minutes of wall time, the learning-rate schedule planned "
            "for the steps that fit; set --num_train_epochs high enough to fill it. Default: off."
        },
    )

    optim_matrices: str = field(
        default="adamw",
        metadata={
            "help": "Optimizer of the 2-D weight matrices inside the blocks: adamw (--optim for "
            "everything) or muon (at --muon_learning_rate; the rest stays on AdamW). Default: "
            "adamw.",
            "choices": ["adamw", "muon"],
        },
    )
    muon_learning_rate: float = field(
        default=0.02,
        metadata={
            "help": "With --optim_matrices muon: Muon's peak learning rate, scheduled like "
            "--learning_rate. Default: 0.02."
        },
    )

    def __post_init__(self):
        check_optimizer_args(self)
        check_weight_averaging_args(self)
        check_time_budget_args(self)
        configure_early_stopping(self)  # before the Trainer's own checks of load_best_model_at_end
        resolve_cpu_precision(self)  # bf16 auto; bf16 on a CPU-only machine without --use_cpu
        super().__post_init__()
        check_schedule_args(self)  # after the Trainer parsed --lr_scheduler_kwargs

    def __getstate__(self):
        # The Trainer pickles these arguments into training_args.bin in every checkpoint and in the
        # final model folder; a --hub_token must not travel with them (to_dict/to_json already mask
        # it).
        state = dict(self.__dict__)
        for key in state:
            if key.endswith("_token") and isinstance(state[key], str):
                state[key] = None
        return state


def check_output_dir(args: WikiTrainingArguments) -> None:
    """Refuse to write into a non-empty output dir unless the user continues its own run or allows
    overwriting.

    Called with --resume_from_checkpoint already resolved to a folder: a checkpoint from another
    folder does not make a non-empty --output_dir safe to write into.
    """
    out, resume = args.output_dir, args.resume_from_checkpoint
    if os.path.isfile(out):
        raise UsageError(f"--output_dir {out!r} is a file; pass a directory path")
    if not (os.path.isdir(out) and os.listdir(out)) or args.overwrite_output_dir:
        return
    if resume and in_output_dir(resume, out):
        return
    if resume:
        raise UsageError(
            f"--output_dir {out!r} is not empty and {RESUME_FLAG} {resume!r} is not one of its "
            "checkpoints; continue that run in its own folder or a new (empty) --output_dir, or "
            f"pass --overwrite_output_dir to write into {out!r}"
        )
    raise UsageError(
        f"--output_dir {out!r} is not empty; pass --overwrite_output_dir to write into it, "
        f"{RESUME_FLAG} to continue its run, or choose a new --output_dir"
    )


def tokens_per_step(args: WikiTrainingArguments, block_size: int) -> int:
    return (
        args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size
        * block_size
    )
