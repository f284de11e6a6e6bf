"""Choose the calibrations on held-out evidence: fit on half the held-out articles, score the rest.

A calibration is fitted on the held-out articles, so a calibrated model's held-out perplexity is an
in-sample number and may not choose between calibrations (docs/results.md, the selection rules).
This script splits the held-out articles into two halves (alternate articles), fits each variant on
one half of a trained model's checkpoint (before calibration) and scores it on the other, both
ways round. The pooled perplexity of the two scored halves is out of sample.

    python scripts/calibration_cv.py --checkpoint out/cpu-30min/student/checkpoint-N \\
        --output_json benchmarks/results/calibration_cv.json

Defaults are the CPU recipe's data: configs/cpu/recipe.yaml's files, seed, hold-out share, blocks.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wikigpt.calibration.temperature import calibrate_temperature  # noqa: E402
from wikigpt.calibration.token_offsets import calibrate_token_offsets  # noqa: E402
from wikigpt.data.blocks import (  # noqa: E402
    DataArguments,
    load_raw_splits,
    prepare_lm_splits,
    token_stream,
)
from wikigpt.data.wikitext import article_spans  # noqa: E402

# name -> (temperature, token offsets)
VARIANTS = {
    "none": (False, False),
    "temperature": (True, False),
    "offsets": (False, True),
    "temperature+offsets": (True, True),
}


def nll_sum(model, blocks, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over `blocks`, in fp32."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
            loss = model(ids, labels=ids).loss
            n = ids.shape[0] * (ids.shape[1] - 1)
            total, tokens = total + loss.item() * n, tokens + n
    return total, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a trained model before calibration")
    parser.add_argument("--tokenizer_name", default="data/gpt2-tokenizer")
    parser.add_argument("--train_file", default="data/wikitext-2-raw/wiki.valid.raw")
    parser.add_argument("--validation_split_percentage", type=float, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--output_json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants {unknown} unknown; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    data = DataArguments(
        train_file=args.train_file, validation_split_percentage=args.validation_split_percentage
    )
    raw = load_raw_splits(data, args.seed)
    spans = article_spans(raw["validation"]["text"])
    halves = datasets.DatasetDict(
        {
            name: raw["validation"].select([i for span in spans[first::2] for i in span])
            for name, first in (("a", 0), ("b", 1))
        }
    )
    blocks, counts = prepare_lm_splits(halves, tokenizer, args.block_size)
    vocab = len(tokenizer)
    train_counts = np.bincount(token_stream(raw["train"], tokenizer), minlength=vocab)

    results = {}
    for name in variants:
        temperature, offsets = VARIANTS[name]
        out_nll = out_tokens = in_nll = in_tokens = 0
        for fit, score in (("a", "b"), ("b", "a")):
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
            if temperature:
                calibrate_temperature(model, blocks[fit], args.batch_size)
            if offsets:
                summary = calibrate_token_offsets(model, blocks[fit], args.batch_size, train_counts)
                if "skipped" in summary:
                    raise SystemExit(f"{name}: the offsets were skipped ({summary['skipped']})")
            nll, n = nll_sum(model, blocks[score], args.batch_size)
            out_nll, out_tokens = out_nll + nll, out_tokens + n
            nll, n = nll_sum(model, blocks[fit], args.batch_size)
            in_nll, in_tokens = in_nll + nll, in_tokens + n
        results[name] = {
            "out_of_sample_perplexity": round(math.exp(out_nll / out_tokens), 2),
            "in_sample_perplexity": round(math.exp(in_nll / in_tokens), 2),
        }
        print(
            f"{name:36s} out of sample {results[name]['out_of_sample_perplexity']:8.2f}   "
            f"in sample {results[name]['in_sample_perplexity']:8.2f}",
            flush=True,
        )
    report = {
        "checkpoint": args.checkpoint,
        "held_out_articles": {half: len(spans[first::2]) for half, first in (("a", 0), ("b", 1))},
        "tokens": {half: counts[half]["tokens"] for half in ("a", "b")},
        "variants": results,
    }
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
