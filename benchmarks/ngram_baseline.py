"""N-gram baseline: interpolated modified Kneser-Ney LMs over GPT-2 tokens, a bar for neural models.

    # orders 1-5, train wiki.valid.raw, test wiki.test.raw
    OMP_NUM_THREADS=1 python benchmarks/ngram_baseline.py

Same protocol as the neural models: both files are loaded and tokenized by wikigpt.data.blocks
(Hub-format rows, GPT-2 tokenizer) and each split's rows are concatenated into one token stream. The
models are fit on the train stream and score every token of the test stream from the tokens before
it, over the full tokenizer vocabulary (50,257 for GPT-2): token j is predicted from its last min(j,
order - 1) tokens, so the first test token, which has no history, gets the order-1 distribution that
every higher order interpolates down to. Perplexity = exp(mean negative log-likelihood) over all
test tokens.

The models are wikigpt.evaluation.kneser_ney.KneserNey (interpolated modified Kneser-Ney, Chen &
Goodman), fit once per order.
"""

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from wikigpt.cli import parse_args  # noqa: E402
from wikigpt.data.blocks import DataArguments, load_raw_splits, token_stream  # noqa: E402
from wikigpt.atomic_json import write_json_atomic  # noqa: E402
from wikigpt.errors import UsageError, run_main  # noqa: E402
from wikigpt.evaluation.kneser_ney import KneserNey  # noqa: E402
from wikigpt.model import DEFAULT_TOKENIZER, load_tokenizer  # noqa: E402

DATA = REPO / "data"  # the bundled WikiText-2 files and GPT-2 tokenizer
JSON_VERSION = 1
FIRST_TOKEN = (
    "every test token is scored; token j is predicted from its last min(j, order-1) tokens, so the "
    "first token (no history) gets the order-1 distribution"
)


@dataclass
class NgramArguments:
    train_file: str = field(
        default=str(DATA / "wikitext-2-raw" / "wiki.valid.raw"),
        metadata={"help": "Text the n-gram counts come from (.raw/.txt/.jsonl/.csv/.parquet)."},
    )
    test_file: str = field(
        default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
        metadata={"help": "Text whose token-level perplexity is reported."},
    )
    tokenizer_name: str = field(
        default=str(DATA / "gpt2-tokenizer"), metadata={"help": "Tokenizer folder or id."}
    )
    max_order: int = field(
        default=5, metadata={"help": "Fit and score every order from 1 to this one."}
    )
    output_json: str = field(
        default=str(REPO / "benchmarks" / "results" / "ngram_baseline.json"),
        metadata={"help": "Write the results here as JSON."},
    )


def display_path(path: str) -> str:
    """Local paths relative to the repository (committed JSON names no machine), Hub ids kept."""
    return os.path.relpath(path, REPO) if os.path.exists(path) else path


def load_token_streams(args: NgramArguments):
    """wikigpt.data.blocks's loading and tokenization, each split's rows joined into one stream."""
    data_args = DataArguments(train_file=args.train_file, test_file=args.test_file)
    raw = load_raw_splits(data_args, seed=0, required=("train", "test"))
    tokenizer = load_tokenizer(args.tokenizer_name or DEFAULT_TOKENIZER)
    streams = {}
    for split in ("train", "test"):
        streams[split] = token_stream(raw[split], tokenizer).astype(np.int64)
        if len(streams[split]) == 0:
            flag = "--train_file" if split == "train" else "--test_file"
            raise UsageError(f"{flag} has no tokens; pass a file with text in it")
    return streams, tokenizer


def main() -> None:
    (args,) = parse_args((NgramArguments,), description=__doc__)
    if args.max_order < 1:
        raise UsageError(f"--max_order must be at least 1; got {args.max_order}")
    streams, tokenizer = load_token_streams(args)
    vocab_size = len(tokenizer)
    train, test = streams["train"], streams["test"]
    results = []
    for order in range(1, args.max_order + 1):
        start = time.perf_counter()
        model = KneserNey(train, order, vocab_size)
        nll = -float(np.mean(model.log_probs(test)))
        seconds = time.perf_counter() - start
        results.append(
            {
                "order": order,
                "perplexity": round(math.exp(nll), 2),
                "nll_per_token": round(nll, 5),
                "train_tokens": len(train),
                "test_tokens": len(test),
                "seconds": round(seconds, 2),
                "discounts": {
                    str(k): [round(d, 4) for d in model.discounts[k]] for k in range(1, order + 1)
                },
                "distinct_ngrams": int(np.count_nonzero(model.counts[order])),
            }
        )
        print(
            f"order {order}: perplexity {results[-1]['perplexity']:,.2f} ({seconds:.1f} s)",
            flush=True,
        )
    header = (
        f"{'order':>5} | {'test perplexity':>15} | {'train tokens':>12} | {'test tokens':>11} | "
        f"{'seconds':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['order']:>5} | {r['perplexity']:>15,.2f} | {r['train_tokens']:>12,} | "
            f"{r['test_tokens']:>11,} | {r['seconds']:>7.1f}"
        )
    report = {
        "version": JSON_VERSION,
        "method": "interpolated modified Kneser-Ney (Chen & Goodman), order 1 interpolated with "
        "uniform",
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "train_file": display_path(args.train_file),
        "test_file": display_path(args.test_file),
        "tokenizer": display_path(args.tokenizer_name),
        "vocab_size": vocab_size,
        "train_tokens": len(train),
        "test_tokens": len(test),
        "first_token": FIRST_TOKEN,
        "results": results,
    }
    write_json_atomic(args.output_json, report)  # a half-written file never replaces the last one
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    run_main(main)
