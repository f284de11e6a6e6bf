"""One training run, as train.py runs it: checked arguments -> tokenizer, model, data, callbacks,
Trainer -> train -> save, evaluate, results.json, model card, plot, push.

train.py is `parse_run_args`, `build_run`, `train_run`, `finish_run`; benchmarks/train_throughput.py
times `train_run` of a `build_run` from the same argument dataclasses, so what it measures is what
users run.
"""

import logging
import os
import time
from dataclasses import dataclass

import datasets
from transformers import Trainer, default_data_collator, set_seed

from wikigpt import __version__
from wikigpt.reliability.checkpoints import ResumePlan, plan_resume
from wikigpt.cli import parse_args
from wikigpt.errors import UsageError
from wikigpt.train.cpu_memory import keep_freed_memory
from wikigpt.data.blocks import (
    DataArguments,
    validation_is_test,
    check_data_args,
    detokenize_splits,
    load_raw_splits,
    prepare_lm_splits,
    resolve_block_size,
)
from wikigpt.train.early_stopping import (
    best_model_summary,
    early_stopping_callbacks,
    end_early_stopping,
)
from wikigpt.reporting.hub import defer_push, push_after_local_save
from wikigpt.model import (
    ModelArguments,
    non_embedding_parameters,
    check_model_args,
    context_length,
    describe_source,
    load_model,
    load_tokenizer,
    tokenizer_for,
)
from wikigpt.reporting.model_card import describe_levers, describe_run, write_model_card
from wikigpt.reliability.nan_guard import NonFiniteGuard, check_nan_guard_args
from wikigpt.train.optimizers import optimizer_cls_and_kwargs
from wikigpt.evaluation.perplexity import compute_perplexity, nll_and_count
from wikigpt.reporting.plots import check_report_to, plot_training_curves
from wikigpt.reliability.preemption import PreemptionCallback
from wikigpt.data.block_offsets import random_offset_training
from wikigpt.calibration.arguments import CalibrationArguments
from wikigpt.calibration.temperature import calibrate_temperature, check_calibration_model
from wikigpt.atomic_json import write_json_atomic
from wikigpt.train.trainer import WikiTrainer
from wikigpt.objectives.arguments import LeverArguments, check_lever_args
from wikigpt.objectives.chunked_loss import use_chunked_loss
from wikigpt.objectives.distillation import attach_teacher, load_teacher
from wikigpt.objectives.rare_tokens import share_rare_rows, spelling_groups, training_token_counts
from wikigpt.calibration.token_offsets import calibrate_token_offsets, check_rank_order
from wikigpt.train.throughput import ThroughputCallback, add_throughput_callback
from wikigpt.train.time_budget import TimeBudgetCallback, time_budget_callbacks
from wikigpt.train.arguments import WikiTrainingArguments, check_output_dir, tokens_per_step
from wikigpt.reliability.write_failures import CHECKPOINTS, writing
from wikigpt.reliability.run_record import (
    RECORD_FILE,
    RunRecordCallback,
    check_resume_record,
    run_record,
    write_run_record,
)
from wikigpt.train.weight_averaging import weight_averaging_callbacks

logger = logging.getLogger(__name__)

# The argument dataclasses of a run, in the order of their groups in `train.py --help`.
RUN_ARGUMENTS = (
    ModelArguments,
    DataArguments,
    LeverArguments,
    CalibrationArguments,
    WikiTrainingArguments,
)


@dataclass
class Run:
    """Everything a built run holds: its arguments, the Trainer, the data, and the callbacks read
    after training."""

    model_args: ModelArguments
    data_args: DataArguments
    lever_args: LeverArguments
    calibration_args: CalibrationArguments
    training_args: WikiTrainingArguments
    trainer: Trainer
    # the model as built (trainer.model_wrapped may be a compiled or distributed wrapper of it)
    model: object
    tokenizer: object
    source: dict  # where the weights came from (wikigpt.model.load_model)
    block_size: int
    # fixed blocks of every split (training may use re-cut ones: trainer.train_dataset)
    blocks: datasets.DatasetDict
    counts: dict  # rows/tokens/blocks per split
    resume: ResumePlan
    push: bool  # --push_to_hub was given: pushed by finish_run, after the local save
    preemption: PreemptionCallback
    nan_guard: NonFiniteGuard
    throughput: ThroughputCallback
    time_budget: TimeBudgetCallback | None  # --max_train_minutes

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.training_args, self.block_size)


def parse_run_args(argv: list[str] | None = None, description: str | None = None):
    """(model_args, data_args, lever_args, calibration_args, training_args) from a command line
    (config files first, then flags)."""
    return parse_args(RUN_ARGUMENTS, argv, description=description)


SELECTING_FLAGS = (
    "early_stopping_patience",
    "load_best_model_at_end",
    "calibrate_temperature",
    "calibrate_token_offsets",
)


def check_validation_is_not_test(
    data_args: DataArguments,
    calibration_args: CalibrationArguments,
    training_args: WikiTrainingArguments,
) -> None:
    """The test split chooses nothing: refuse a run that would select with it, and say so for one
    that reports it."""
    why = validation_is_test(data_args)
    if not why:
        return
    chooses = [
        f"--{flag}"
        for flag in SELECTING_FLAGS
        if getattr(calibration_args if flag.startswith("calibrate_") else training_args, flag)
    ]
    if chooses:
        raise UsageError(
            f"--validation_file {data_args.validation_file!r} is the test split ({why}) and "
            f"{', '.join(chooses)} would choose with it; drop --validation_file to hold out "
            f"training articles, or turn {', '.join(chooses)} off"
        )
    logger.warning(
        "--validation_file is the test split (%s): its perplexity is test perplexity, and it chose "
        "nothing in this run",
        why,
    )


def fsdp_requested(training_args: WikiTrainingArguments) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (configs/accelerate/fsdp.yaml)."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in (
        "1",
        "true",
    )


def check_levers_under_fsdp(
    lever_args: LeverArguments,
    calibration_args: CalibrationArguments,
    training_args: WikiTrainingArguments,
) -> None:
    """FSDP shards every weight; the levers below read or rewrite whole weights (re-tied rare rows,
    the narrow head, a teacher's logits, Muon's orthogonalised matrices, the calibrations folded
    into ln_f and the head). None is tested sharded, so each is refused before anything is built."""
    if not fsdp_requested(training_args):
        return
    given = [
        flag
        for flag, on in (
            ("--rare_tokens_below", lever_args.rare_tokens_below),
            ("--chunked_loss_size", lever_args.chunked_loss_size),
            ("--distill_from", lever_args.distill_from),
            ("--optim_matrices muon", training_args.optim_matrices == "muon"),
            ("--calibrate_temperature", calibration_args.calibrate_temperature),
            ("--calibrate_token_offsets", calibration_args.calibrate_token_offsets),
        )
        if on
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot train under FSDP (it reads or rewrites whole weights); "
            f"use DDP (accelerate_config.yaml) or one process, or drop {', '.join(given)}"
        )


def build_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    lever_args: LeverArguments,
    calibration_args: CalibrationArguments,
    training_args: WikiTrainingArguments,
) -> Run:
    """Check every argument, then build tokenizer, model, data and the Trainer with wikigpt's
    callbacks.

    Takes RUN_ARGUMENTS' objects in their order: `build_run(*parse_run_args(argv))`."""
    check_model_args(model_args)
    check_lever_args(lever_args, model_args.model_name_or_path)
    check_data_args(data_args)
    check_validation_is_not_test(data_args, calibration_args, training_args)
    check_levers_under_fsdp(lever_args, calibration_args, training_args)
    check_nan_guard_args(training_args)
    resume = plan_resume(
        training_args.resume_from_checkpoint,
        training_args.output_dir,
        training_args.overwrite_output_dir,
    )
    training_args.resume_from_checkpoint = resume.path
    # split and levers go with each checkpoint; a resumed run keeps them (reliability/run_record.py)
    record = run_record(model_args, data_args, lever_args, calibration_args, training_args)
    check_output_dir(training_args)
    check_report_to(training_args)
    set_seed(training_args.seed)
    # glibc: reuse freed memory instead of faulting in fresh pages every step (cpu_memory.py)
    keep_freed_memory()

    tokenizer = load_tokenizer(tokenizer_for(model_args), model_args.trust_remote_code)
    model, source = load_model(model_args, tokenizer)
    if calibration_args.calibrate_token_offsets:
        check_rank_order(tokenizer)
    if lever_args.chunked_loss_size:
        use_chunked_loss(model, lever_args.chunked_loss_size)
    for flag in ("calibrate_temperature", "calibrate_token_offsets"):
        if getattr(calibration_args, flag):
            check_calibration_model(model, f"--{flag}")
    block_size = resolve_block_size(data_args.block_size, context_length(model.config))
    logger.info("model: %s, %.2fM parameters", describe_source(source), source["parameters"] / 1e6)
    resume.check_model(model.config)
    check_resume_record(resume.path, record)  # after the shapes: those name the model flags to fix
    teacher = (
        load_teacher(
            model,
            lever_args.distill_from,
            block_size,
            model_args.trust_remote_code,
            model_args.allow_pickle,
            split=record["split"],
        )
        if lever_args.distill_from
        else None
    )

    # Rank 0 tokenizes first and writes the datasets cache; the other ranks then read it.
    with training_args.main_process_first(desc="tokenize and group"):
        raw = load_raw_splits(data_args, training_args.seed, required=("train", "validation"))
        if data_args.detokenize:
            raw = detokenize_splits(
                raw
            )  # after the held-out articles are chosen from the raw lines
        blocks, counts = prepare_lm_splits(
            raw, tokenizer, block_size, data_args.preprocessing_num_workers
        )
        train_set, block_offsets = random_offset_training(
            data_args, raw["train"], blocks["train"], tokenizer, block_size, training_args
        )
    # before the weight averaging callbacks: the tied rows are equal again before an average takes
    # them in
    below = lever_args.rare_tokens_below
    groups = (
        spelling_groups(tokenizer, model.get_output_embeddings().out_features)
        if below and lever_args.rare_token_groups == "spelling"
        else None
    )
    tying, tied = (
        share_rare_rows(model, train_set, below, lever_args.rare_input_dropout, groups)
        if below
        else ([], None)
    )
    if tied:
        source["rare_tokens"] = tied  # below, kept, tied: results.json's model section
    if teacher:  # after the tying: the teacher's distribution over the narrow head's classes
        source["distilled_from"] = attach_teacher(
            model, teacher, lever_args.distill_from, lever_args.distill_share, counts
        )

    push = defer_push(training_args)  # push once at the end, after the local save
    # WikiTrainer: the Trainer, with fraction-of-the-run decay lengths for warmup_stable_decay
    # (wikigpt/train/trainer.py)
    trainer = WikiTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        # Perplexity through wikigpt's `evaluate` module: per-sequence NLL sums, never stored
        # logits.
        compute_metrics=compute_perplexity,
        preprocess_logits_for_metrics=nll_and_count,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(training_args),  # --optim_matrices
        callbacks=[
            preemption := PreemptionCallback(),
            nan_guard := NonFiniteGuard(),
            *early_stopping_callbacks(training_args),
            *block_offsets,
            *tying,
            # the budget may end a step; weight averaging then swaps in for its save
            *(budget := time_budget_callbacks(training_args, resume.path)),
            *weight_averaging_callbacks(training_args, resume.path),
            RunRecordCallback(record),
        ],
    )
    resume.set_aside(trainer.is_world_process_zero())  # skipped checkpoints, an overwritten run's
    throughput = add_throughput_callback(
        trainer, block_size, tokens_per_step(training_args, block_size), training_args.peak_flops
    )
    return Run(
        model_args,
        data_args,
        lever_args,
        calibration_args,
        training_args,
        trainer,
        model,
        tokenizer,
        source,
        block_size,
        blocks,
        counts,
        resume,
        push,
        preemption,
        nan_guard,
        throughput,
        budget[0] if budget else None,
    )


def train_run(run: Run):
    """Trainer.train(), then stop with one line on a diverged or interrupted run. Returns
    (TrainOutput, seconds)."""
    start = time.time()
    # full disk, quota: one line, exit 4 (wikigpt.reliability.write_failures)
    with writing(run.training_args.output_dir, CHECKPOINTS, run.trainer.is_world_process_zero()):
        train_result = run.trainer.train(resume_from_checkpoint=run.resume.path)
    train_seconds = time.time() - start
    run.nan_guard.raise_if_diverged(run.training_args)  # before anything saves the broken model
    run.preemption.exit_if_interrupted(
        run.training_args.output_dir, run.trainer.is_world_process_zero()
    )
    return train_result, train_seconds


def finish_run(run: Run, train_result, train_seconds: float) -> dict:
    """Save the model, evaluate validation/test, write results.json, the model card and the plot,
    push. Returns results."""
    trainer, training_args, block_size = run.trainer, run.training_args, run.block_size
    calibration_args = run.calibration_args
    output_dir, is_main = training_args.output_dir, trainer.is_world_process_zero()
    end_early_stopping(trainer)  # the evaluations below are reports, not patience steps
    # --calibrate_temperature: the held-out split chooses T; saved, evaluated and pushed with the
    # model
    calibration = (
        calibrate_temperature(
            trainer.model, run.blocks["validation"], training_args.per_device_eval_batch_size
        )
        if calibration_args.calibrate_temperature
        else None
    )
    # --calibrate_token_offsets: then a logit scale and offset per class of training count, in ln_f
    # and an untied head
    token_offsets = (
        calibrate_token_offsets(
            trainer.model,
            run.blocks["validation"],
            training_args.per_device_eval_batch_size,
            training_token_counts(
                trainer.train_dataset, trainer.model.get_output_embeddings().out_features
            ),
        )
        if calibration_args.calibrate_token_offsets
        else None
    )
    # the saved model as it is: a calibrated head is untied, so it holds more parameters than the
    # model built
    run.source["parameters"] = trainer.model.num_parameters()
    run.source["non_embedding_parameters"] = non_embedding_parameters(trainer.model)
    levers = describe_levers(run.lever_args, run.calibration_args, training_args, run.source)
    trainer.model.config.wikigpt = {
        "parameters": run.source["parameters"],
        "levers": levers,
    }  # in config.json
    with writing(output_dir, "the final model", is_main):
        # model.safetensors + config + tokenizer, loadable with from_pretrained(output_dir)
        trainer.save_model()
        trainer.save_state()

    results = {
        "wikigpt_version": __version__,
        "model": {**run.source, "description": describe_source(run.source)},
        "block_size": block_size,
        "data": run.counts,
        "train": {
            **train_result.metrics,
            "global_step": train_result.global_step,
            "tokens_seen": train_result.global_step * run.tokens_per_step,
            "wall_time_s": round(train_seconds, 2),
        },
        "throughput": run.throughput.summary,
        **best_model_summary(
            trainer
        ),  # best checkpoint and metric, step training stopped at (early stopping)
        **(
            run.time_budget.summary(train_result.global_step) if run.time_budget else {}
        ),  # --max_train_minutes
        **describe_run(run.data_args, training_args, run.model, block_size),
        **({"levers": levers} if levers else {}),
        **({"calibration": calibration} if calibration else {}),
        **({"token_offsets": token_offsets} if token_offsets else {}),
    }
    if run.push:
        results["hub_model_id"] = training_args.hub_model_id
    for split in ("validation", "test"):
        if split in run.blocks:
            prefix = "eval" if split == "validation" else split
            # {prefix}_perplexity = exp({prefix}_token_loss), every block once
            # (wikigpt.evaluation.perplexity, corpus_perplexity)
            metrics = trainer.evaluate(run.blocks[split], metric_key_prefix=prefix)
            results[split] = metrics
            logger.info(
                "%s perplexity = %.4f (corpus-level exp(sum NLL / tokens) over %d blocks of %d)",
                split,
                metrics[f"{prefix}_perplexity"],
                run.counts[split]["blocks"],
                block_size,
            )
    if is_main:
        with writing(output_dir, RECORD_FILE):  # the split and levers, as in every checkpoint
            write_run_record(
                output_dir,
                run_record(
                    run.model_args, run.data_args, run.lever_args, calibration_args, training_args
                ),
            )
        with writing(output_dir, "results.json"):
            write_json_atomic(f"{output_dir}/results.json", results)
        with writing(output_dir, "training_curves.png"):
            plot_training_curves(
                trainer.state.log_history,
                f"{output_dir}/training_curves.png",
                run.tokens_per_step,
                describe_source(run.source),
            )
        with writing(output_dir, "README.md (the model card)"):
            write_model_card(output_dir, results)
    if run.push:
        push_after_local_save(trainer)
    return results
