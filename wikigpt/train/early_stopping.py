"""Early stopping on validation perplexity, keeping the best checkpoint: transformers'
EarlyStoppingCallback.

`--early_stopping_patience N` turns on the Trainer's own machinery: `load_best_model_at_end` (the
best checkpoint is kept through `--save_total_limit` rotation and loaded after training, so
train.py's final save and its validation/test numbers are the best model's), `metric_for_best_model`
= validation `perplexity` unless given, and `EarlyStoppingCallback` (stops after N evaluations
without an improvement larger than `--early_stopping_threshold`). Its counter is saved in
checkpoints and restored on resume (`restore_callback_states_from_checkpoint`, turned on with it).

Perplexities and losses are lower-is-better, with or without early stopping
(`--load_best_model_at_end` alone), unless --greater_is_better says otherwise. The callback is
removed after training: the final validation and test evaluations are reports, not patience steps.
"""

from transformers import EarlyStoppingCallback

from wikigpt.errors import UsageError

# eval_perplexity from wikigpt.evaluation.perplexity: exp(summed NLL / tokens) on validation
DEFAULT_METRIC = "perplexity"


def lower_is_better(metric: str) -> bool:
    """Perplexities and losses (wikigpt.evaluation.perplexity: perplexity, token_loss; the Trainer's
    loss) improve downwards."""
    name = metric.removeprefix("eval_")
    return name.endswith("perplexity") or name.endswith("loss")


def configure_early_stopping(args) -> None:
    """Check the flags and turn on load_best_model_at_end; called before
    TrainingArguments.__post_init__."""
    _turn_on_early_stopping(args)
    # Also without early stopping (--load_best_model_at_end --metric_for_best_model perplexity):
    # transformers sets greater_is_better for any name not ending in "loss", so it would keep the
    # highest-perplexity checkpoint. An explicit --greater_is_better still wins.
    if args.metric_for_best_model is not None and args.greater_is_better is None:
        args.greater_is_better = not lower_is_better(args.metric_for_best_model)


def _turn_on_early_stopping(args) -> None:
    patience, threshold = args.early_stopping_patience, args.early_stopping_threshold
    if patience is None:
        if threshold:
            raise UsageError(
                f"--early_stopping_threshold {threshold} has no effect without "
                "--early_stopping_patience; pass --early_stopping_patience N, or drop "
                "--early_stopping_threshold"
            )
        return
    if patience < 1:
        raise UsageError(
            f"--early_stopping_patience must be at least 1 (evaluations without improvement before "
            f"stopping); got {patience}"
        )
    if threshold < 0:
        raise UsageError(
            f"--early_stopping_threshold must be 0 or more (the smallest improvement that counts); "
            f"got {threshold}"
        )
    eval_strategy, save_strategy = (
        str(args.eval_strategy).split(".")[-1].lower(),
        str(args.save_strategy).split(".")[-1].lower(),
    )
    if eval_strategy == "no":
        raise UsageError(
            "--early_stopping_patience needs validation evaluations to compare: pass "
            "--eval_strategy epoch (or --eval_strategy steps --eval_steps N), or drop "
            "--early_stopping_patience"
        )
    if save_strategy == "no":
        raise UsageError(
            "--early_stopping_patience keeps the best checkpoint, so it needs checkpoints: pass "
            f"--save_strategy {eval_strategy} (as --eval_strategy), or drop "
            "--early_stopping_patience"
        )
    if save_strategy not in (eval_strategy, "best"):
        raise UsageError(
            "--early_stopping_patience needs --save_strategy equal to --eval_strategy (now "
            f"{save_strategy} and {eval_strategy}) so every evaluation has a checkpoint to return "
            f"to: pass --save_strategy {eval_strategy}"
        )
    if eval_strategy == "steps" and save_strategy == "steps":
        eval_steps = args.eval_steps or args.logging_steps  # the Trainer's own fallback
        if args.save_steps != eval_steps:
            raise UsageError(
                "--early_stopping_patience with --eval_strategy steps needs --save_steps equal to "
                f"--eval_steps (now {args.save_steps:g} and {eval_steps:g}): pass --save_steps "
                f"{eval_steps:g}"
            )
    args.load_best_model_at_end = True
    # The patience counter lives in the callback; without this a resumed run would start counting
    # from 0 again.
    args.restore_callback_states_from_checkpoint = True
    if args.metric_for_best_model is None:
        args.metric_for_best_model = DEFAULT_METRIC


def early_stopping_callbacks(args) -> list:
    """[EarlyStoppingCallback] when --early_stopping_patience is given, else []."""
    if args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold)]


def end_early_stopping(trainer) -> None:
    """After training: the final validation and test evaluations run through the callbacks too, and
    EarlyStoppingCallback would count them as patience steps, or warn that a test split has no eval_
    metric."""
    trainer.remove_callback(EarlyStoppingCallback)


def best_model_summary(trainer) -> dict:
    """What results.json records: the best checkpoint and metric, and the step training stopped
    at."""
    args, state = trainer.args, trainer.state
    if not args.load_best_model_at_end:
        return {}
    stopped_early = state.global_step < state.max_steps
    return {
        "best_model": {
            "metric": args.metric_for_best_model,
            "greater_is_better": args.greater_is_better,
            "best_metric": state.best_metric,
            "best_checkpoint": state.best_model_checkpoint,
            "best_global_step": state.best_global_step,
            "stopped_at_step": state.global_step,
            "max_steps": state.max_steps,
            "stopped_early": stopped_early,
            "early_stopping_patience": args.early_stopping_patience,
            "early_stopping_threshold": args.early_stopping_threshold,
        }
    }
