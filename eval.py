"""Evaluate any causal LM on a WikiText split (or any text file): perplexity numbers you can cite.

    python eval.py --model out/tiny --tokenizer_name path/to/tokenizer --test_file wiki.test.raw
    accelerate launch --num_processes 2 eval.py --model out/tiny ...  # same numbers, sharded

Reports, each with its method: `perplexity` (disjoint blocks, = exp(train.py eval_loss)),
`sliding_window_perplexity` (HF guide), and lm-evaluation-harness's `word_perplexity`,
`byte_perplexity`, `bits_per_byte` (document-level WikiText, rolling windows); with --ngram_order,
also `ngram_mixture_perplexity` (the blocks with a Kneser-Ney n-gram of the training text mixed in),
with --block_cache `cache_mixture_perplexity` (a cache of the block so far mixed in). Data flags are
train.py's (see --help).
"""

import json
import logging

from accelerate import Accelerator

from wikigpt.cli import parse_args
from wikigpt.data.blocks import DataArguments
from wikigpt.errors import run_main
from wikigpt.evaluation.run import EvalArguments, evaluate_split, update_model_card
from wikigpt.atomic_json import write_json_atomic

logger = logging.getLogger("wikigpt.eval")


def main() -> None:
    eval_args, data_args = parse_args((EvalArguments, DataArguments), description=__doc__)
    accelerator = Accelerator()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    report = evaluate_split(eval_args, data_args, accelerator)
    if accelerator.is_main_process:
        for name, metric in report["metrics"].items():
            logger.info("%s = %.4f", name, metric["value"])
        for method, counts in report["counts"].items():
            if isinstance(counts, dict) and "tokens_per_second" in counts:
                logger.info("%s: %.0f tokens/s", method, counts["tokens_per_second"])
        if eval_args.output_file:
            write_json_atomic(eval_args.output_file, report)
        if eval_args.update_model_card and (card := update_model_card(eval_args.model, report)):
            logger.info(
                "added these metrics to the model card %s (and eval_%s.json)", card, eval_args.split
            )
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)
