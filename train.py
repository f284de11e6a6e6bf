"""Train a GPT-2-family causal LM on WikiText-2 (or any text) with the Hugging Face Trainer.

    python train.py --preset tiny --train_file wiki.valid.raw --validation_file wiki.test.raw \
        --tokenizer_name path/to/gpt2-tokenizer --output_dir out/tiny --max_steps 30
    python train.py configs/some_recipe.yaml --learning_rate 3e-4      # config file + overrides

Every TrainingArguments flag works (see --help). Multi-GPU: accelerate launch --config_file accelerate_config.yaml train.py ...
"""

import logging

from wikigpt.errors import run_main
from wikigpt.run import build_run, finish_run, parse_run_args, train_run


def main() -> None:
    model_args, data_args, training_args = parse_run_args(description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    run = build_run(model_args, data_args, training_args)  # wikigpt/run.py: checks, model, data, callbacks, Trainer
    train_result, train_seconds = train_run(run)
    finish_run(run, train_result, train_seconds)  # save, evaluate, results.json, model card, plot, push


if __name__ == "__main__":
    run_main(main)
