"""wikigpt: train, evaluate and sample GPT-2-family causal LMs on WikiText-2 with the Hugging
Face stack.

One subpackage per concern; each module does one job.

(top)        cli (flags + config file), errors (one-line errors, exit codes), model (presets,
             the checkpoint and tokenizer loader), padded_vocab (the head's matmul width),
             atomic_json (result files)
data/        blocks (text -> grouped blocks, held-out articles), wikitext (articles, detokenizer),
             block_offsets (--random_block_offset)
train/       run (train.py's run), arguments (TrainingArguments defaults), trainer (the Trainer
             subclass), optimizers (Muon), time_budget, precision (CPU bf16), cpu_memory,
             throughput, early_stopping, weight_averaging, hp_search (--hp_search)
objectives/  training_loss (swap the loss), chunked_loss, rare_tokens (rare tokens share rows),
             distillation (--distill_from)
calibration/ temperature, token_offsets (per-class scales, offsets and slopes folded into the head)
reliability/ checkpoints, preemption (SIGTERM), nan_guard, write_failures (disk full)
evaluation/  run (eval.py), perplexity, corpus_perplexity (the `evaluate` module), kneser_ney,
             mixture
generation/  settings (flags -> decoding settings), prompts, sampling (model.generate, streaming,
             JSONL)
reporting/   model_card, plots, hub, demo (app.py without the web page)
"""

__version__ = "0.1.0"
