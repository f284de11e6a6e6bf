"""Train a GPT-2-family causal LM on WikiText-2 (or any text) with the Hugging Face Trainer.

    python train.py --preset tiny --train_file wiki.valid.raw --validation_file wiki.test.raw \
        --tokenizer_name path/to/gpt2-tokenizer --output_dir out/tiny --max_steps 30
    python train.py configs/some_recipe.yaml --learning_rate 3e-4      # config file + overrides

Every TrainingArguments flag works (see --help). Multi-GPU: accelerate launch --config_file accelerate_config.yaml train.py ...
"""

import logging
import sys
import time

from transformers import Trainer, default_data_collator, set_seed

from wikigpt import __version__
from wikigpt.checkpoints import plan_resume
from wikigpt.cli import parse_args
from wikigpt.data import DataArguments, check_data_args, load_raw_splits, prepare_lm_splits, resolve_block_size
from wikigpt.early_stopping import best_model_summary, early_stopping_callbacks
from wikigpt.errors import run_main
from wikigpt.hub import defer_push, push_after_local_save
from wikigpt.metrics import compute_perplexity, nll_and_count
from wikigpt.model import ModelArguments, check_model_args, context_length, describe_source, load_model, load_tokenizer
from wikigpt.model_card import describe_run, write_model_card
from wikigpt.numerics import NonFiniteGuard, check_numerics_args
from wikigpt.plots import check_report_to, plot_training_curves
from wikigpt.preemption import PreemptionCallback
from wikigpt.reblocking import random_offset_training
from wikigpt.results import write_json_atomic
from wikigpt.throughput import add_throughput_callback
from wikigpt.tuning import SearchArguments, hp_search, load_search_space
from wikigpt.training import WikiTrainingArguments, check_output_dir, tokens_per_step

logger = logging.getLogger("wikigpt.train")


def main() -> None:
    argv = sys.argv[1:]
    model_args, data_args, training_args, search_args = parse_args(
        (ModelArguments, DataArguments, WikiTrainingArguments, SearchArguments), description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    check_model_args(model_args)
    check_data_args(data_args)
    check_numerics_args(training_args)
    resume = plan_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.resume_from_checkpoint = resume.path
    check_output_dir(training_args)
    check_report_to(training_args)
    searching = search_args.hp_search is not None or search_args.hp_space is not None
    space = load_search_space(search_args, model_args, data_args, training_args) if searching else None
    set_seed(training_args.seed)
    if space is not None:
        tokenizer = load_tokenizer(model_args)
        raw = load_raw_splits(data_args, training_args.seed, required=("train", "validation"))
        summary = hp_search(argv, model_args, data_args, training_args, search_args, space, tokenizer, raw)
        logger.info("search done: best trial %d, held-out perplexity %.4f; trials in %s, recipe in %s",
                    summary["best_trial"], summary["best_held_out_perplexity"], summary["trials"],
                    summary["best_recipe"])
        return

    tokenizer = load_tokenizer(model_args)
    model, source = load_model(model_args, tokenizer)
    block_size = resolve_block_size(data_args.block_size, context_length(model.config))
    logger.info("model: %s, %.2fM parameters", describe_source(source), source["parameters"] / 1e6)
    resume.check_model(model.config)

    # Rank 0 tokenizes first and writes the datasets cache; the other ranks then read it.
    with training_args.main_process_first(desc="tokenize and group"):
        raw = load_raw_splits(data_args, training_args.seed, required=("train", "validation"))
        blocks, counts = prepare_lm_splits(raw, tokenizer, block_size, data_args.preprocessing_num_workers)
        train_set, reblocking = random_offset_training(data_args, raw["train"], blocks["train"], tokenizer,
                                                       block_size, training_args)

    push = defer_push(training_args)  # push once at the end, after the local save
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      eval_dataset=blocks["validation"], processing_class=tokenizer,
                      data_collator=default_data_collator,
                      # Perplexity through wikigpt's `evaluate` module: per-sequence NLL sums, never stored logits.
                      compute_metrics=compute_perplexity, preprocess_logits_for_metrics=nll_and_count,
                      callbacks=[preemption := PreemptionCallback(), nan_guard := NonFiniteGuard(),
                                 *early_stopping_callbacks(training_args), *reblocking])
    resume.set_aside_skipped(trainer.is_world_process_zero())
    throughput = add_throughput_callback(trainer, block_size, tokens_per_step(training_args, block_size),
                                         training_args.peak_flops)
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume.path)
    train_seconds = time.time() - start
    nan_guard.raise_if_diverged(training_args)  # before anything below saves the broken model
    preemption.exit_if_interrupted(training_args.output_dir, trainer.is_world_process_zero())
    trainer.save_model()  # model.safetensors + config + tokenizer, loadable with from_pretrained(output_dir)
    trainer.save_state()

    results = {
        "wikigpt_version": __version__,
        "model": {**source, "description": describe_source(source)},
        "block_size": block_size,
        "data": counts,
        "train": {**train_result.metrics, "global_step": train_result.global_step,
                  "tokens_seen": train_result.global_step * tokens_per_step(training_args, block_size),
                  "wall_time_s": round(train_seconds, 2)},
        "throughput": throughput.summary,
        **best_model_summary(trainer),  # best checkpoint and metric, step training stopped at (early stopping)
        **describe_run(data_args, training_args, model, block_size),
    }
    if push:
        results["hub_model_id"] = training_args.hub_model_id
    for split in ("validation", "test"):
        if split in blocks:
            prefix = "eval" if split == "validation" else split
            # {prefix}_perplexity = exp({prefix}_token_loss), every block once (wikigpt.metrics, corpus_perplexity)
            metrics = trainer.evaluate(blocks[split], metric_key_prefix=prefix)
            results[split] = metrics
            logger.info("%s perplexity = %.4f (corpus-level exp(sum NLL / tokens) over %d blocks of %d)",
                        split, metrics[f"{prefix}_perplexity"], counts[split]["blocks"], block_size)
    if trainer.is_world_process_zero():
        write_json_atomic(f"{training_args.output_dir}/results.json", results)
        plot_training_curves(trainer.state.log_history, f"{training_args.output_dir}/training_curves.png",
                             tokens_per_step(training_args, block_size), describe_source(source))
        write_model_card(training_args.output_dir, results)
    if push:
        push_after_local_save(trainer)


if __name__ == "__main__":
    run_main(main)
