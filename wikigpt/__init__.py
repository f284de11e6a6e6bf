"""wikigpt: train, evaluate and sample GPT-2-family causal LMs on WikiText-2 with the Hugging Face stack.

The package is flat; each module does one job. By script:

Shared      cli (flags + config file), errors (one-line errors), model (GPT-2 presets; the one checkpoint and
            tokenizer loader), data (WikiText -> blocks), wikitext (articles, detokenizer, word/byte counts),
            perplexity (token windows, NLL scoring, corpus perplexity through the `evaluate` module in
            corpus_perplexity/), results (atomic JSON)
train.py    run (one run: build, train, finish), training_args (TrainingArguments defaults, output-dir rules),
            checkpoints (complete? which to resume), block_offsets (--random_block_offset), nan_guard (stop at
            NaN/inf), preemption (SIGTERM saves), write_failures (disk full), early_stopping, schedules,
            time_budget (--max_train_minutes), weight_averaging (--ema_decay/--swa_start), optimizers (Muon),
            precision (CPU bf16), cpu_memory (glibc), throughput (tokens/s, MFU), training_loss (swap the training
            loss) with chunked_loss, tied_tokens and distillation (--distill_from), padded_vocab, plots, model_card,
            hub, tuning (--hp_search)
eval.py     evaluation (arguments, checks, three methods, report, model card update)
generate.py generation_settings (flags -> checked decoding settings), prompts (read, encode), generation
            (GenerationConfig -> model.generate -> finished samples, stop strings, streaming, JSONL)
app.py      demo (load, sample, describe a run, without the web page)
benchmarks  kneser_ney (the n-gram baseline)
"""

import os

# Large CPU tensors (the 50,257-wide logits of every step) on transparent huge pages: far fewer page faults, 1.1-1.3x
# faster CPU training steps (docs/speed.md). torch reads this once, at its first allocation: set before torch loads.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
