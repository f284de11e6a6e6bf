r"""Train a GPT-2-family causal LM on WikiText-2 (or any text) with the Hugging Face Trainer.

    python train.py configs/quickstart.yaml                  # offline, the bundled data, 5 minutes
    python train.py configs/cpu/recipe.yaml configs/cpu/student.yaml --learning_rate 1e-3  # layered
    python train.py --preset tiny --train_file wiki.valid.raw --tokenizer_name DIR --max_steps 30
    python train.py configs/cpu/recipe.yaml --hp_search 8 --hp_space configs/search_spaces/cpu.yaml

Every TrainingArguments flag works. Several GPUs or nodes: accelerate launch --config_file
accelerate_config.yaml train.py ... Exit status: 0 done, 2 bad input, 3 diverged (NaN/inf),
4 a write failed (disk full, quota), 128+N signal N.
"""

import logging
import os
import sys

# Large CPU tensors (the 50,257-wide logits of every step) on transparent huge pages: far fewer page
# faults, 1.1-1.3x faster CPU training steps (docs/speed.md). torch reads this once, at its first
# allocation, so it is set before torch loads, in train.py's process only (importing wikigpt leaves
# a user's allocator alone).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from wikigpt.cli import parse_args
from wikigpt.errors import run_main
from wikigpt.train.run import RUN_ARGUMENTS, build_run, finish_run, train_run
from wikigpt.train.hp_search import SearchArguments, searching, tune


def main() -> None:
    argv = sys.argv[1:]
    # model, data, levers, calibration, training (wikigpt/train/run.py RUN_ARGUMENTS), then the
    # search's flags
    *run_args, search_args = parse_args(
        (*RUN_ARGUMENTS, SearchArguments), argv, description=__doc__
    )
    training_args = run_args[-1]
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    if searching(
        search_args
    ):  # wikigpt/train/hp_search.py: N runs as below, then trials.csv and best_recipe.yaml
        tune(argv, *run_args, search_args)
        return
    run = build_run(*run_args)  # wikigpt/train/run.py: checks, model, data, callbacks, Trainer
    train_result, train_seconds = train_run(run)
    finish_run(
        run, train_result, train_seconds
    )  # save, evaluate, results.json, model card, plot, push


if __name__ == "__main__":
    run_main(main)
