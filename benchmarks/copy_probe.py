"""Copy probe: does a causal LM copy from its context?

    # 16 spans of 100 tokens of wiki.test.raw, each read twice
    python benchmarks/copy_probe.py --model out/wt2-cpu

Each sample is a span A of real text followed by A again. A model that copies from its context (the
induction heads of Olsson et al., 2022) predicts the second reading far better than the first; a
model that does not scores both alike. Both readings are scored on the same targets (A's tokens
after its first, each from the same previous token), so a model that sees only the current token
scores them exactly alike. New articles repeat names the training text never held, so copying is
what a test-time cache adds to a model that lacks it (docs/results.md).

It also measures the two heads copying is built from, in each layer (the best of its heads): the
induction score, the attention a token of the second reading pays to the token after its first
occurrence (the one to copy), and the previous-token score, the attention a token pays to the one
just before it. A head that does either job puts most of its attention there; a head that attends
evenly puts 1/(position + 1).

Prints the mean negative log-likelihood per token (nats) of both readings and their difference, and
writes them and the head scores as JSON.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wikigpt.cli import parse_args  # noqa: E402
from wikigpt.data.blocks import DataArguments, load_raw_splits, token_stream  # noqa: E402
from wikigpt.errors import UsageError, run_main  # noqa: E402
from wikigpt.model import context_length, load_pretrained  # noqa: E402
from wikigpt.atomic_json import write_json_atomic  # noqa: E402


@dataclass
class CopyProbeArguments:
    model: str = field(metadata={"help": "Checkpoint folder (train.py's --output_dir) or Hub id."})
    test_file: str = field(
        default=str(REPO / "data" / "wikitext-2-raw" / "wiki.test.raw"),
        metadata={"help": "Text the spans come from (.raw/.txt/.jsonl/.csv/.parquet)."},
    )
    span: int = field(
        default=100, metadata={"help": "Tokens per span; each sample is 2 x span tokens."}
    )
    samples: int = field(
        default=16, metadata={"help": "Spans, taken every --stride tokens from the start."}
    )
    stride: int = field(
        default=1000, metadata={"help": "Tokens from one span's start to the next one's."}
    )
    output_json: str | None = field(
        default=None, metadata={"help": "Also write the results here as JSON."}
    )


def copy_probe(model, ids: torch.Tensor) -> dict:
    """ids: [samples, span]. Mean NLL of A[1:] in the first and in the second reading of [A A], and
    per layer the best head's induction and previous-token scores."""
    span = ids.shape[1]
    x = torch.cat([ids, ids], dim=1).to(model.device)
    model.set_attn_implementation("eager")  # the fused kernels return no attention weights
    with torch.no_grad():
        out = model(x, output_attentions=True)
    logits = out.logits.float()
    nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"
    )  # nll[:, t]: x[t + 1]
    first, second = nll[:, : span - 1].mean().item(), nll[:, span:].mean().item()
    query = torch.arange(
        span, 2 * span
    )  # the second reading; its token at q first occurred at q - span
    later = torch.arange(1, 2 * span)
    induction = [
        round(a[:, :, query, query - span + 1].mean(dim=(0, 2)).max().item(), 4)
        for a in out.attentions
    ]
    previous = [
        round(a[:, :, later, later - 1].mean(dim=(0, 2)).max().item(), 4) for a in out.attentions
    ]
    return {
        "nll_first_reading": round(first, 5),
        "nll_second_reading": round(second, 5),
        "copy_gain_nats": round(first - second, 5),
        "induction_score_by_layer": induction,
        "previous_token_score_by_layer": previous,
    }


def main() -> None:
    (args,) = parse_args((CopyProbeArguments,), description=__doc__)
    for flag, value, least in (
        ("--span", args.span, 2),
        ("--samples", args.samples, 1),
        ("--stride", args.stride, 1),
    ):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}; got {value}")
    model, tokenizer = load_pretrained(args.model, device=torch.device("cpu"))
    if 2 * args.span > context_length(model.config):
        raise UsageError(
            f"--span {args.span}: a sample is 2 x span = {2 * args.span} tokens, more than the "
            f"model's context of {context_length(model.config)}; pass --span "
            f"{context_length(model.config) // 2} or less"
        )
    raw = load_raw_splits(DataArguments(test_file=args.test_file), seed=0, required=("test",))
    stream = token_stream(raw["test"], tokenizer)
    needed = (args.samples - 1) * args.stride + args.span
    if len(stream) < needed:
        raise UsageError(
            f"--test_file holds {len(stream)} tokens; {args.samples} spans of {args.span} every "
            f"{args.stride} need {needed}: pass fewer --samples, a smaller --stride or a longer "
            "file"
        )
    ids = torch.stack(
        [
            torch.from_numpy(stream[i * args.stride : i * args.stride + args.span]).long()
            for i in range(args.samples)
        ]
    )
    report = {
        "model": args.model,
        "test_file": args.test_file,
        "span": args.span,
        "samples": args.samples,
        "stride": args.stride,
        **copy_probe(model, ids),
    }
    print(
        f"{args.model}: NLL per token {report['nll_first_reading']:.3f} reading a span the first "
        f"time, {report['nll_second_reading']:.3f} the second time: copying gains "
        f"{report['copy_gain_nats']:.3f} nats"
    )
    print(
        f"best head per layer: induction score {report['induction_score_by_layer']}, "
        f"previous-token score {report['previous_token_score_by_layer']}"
    )
    if args.output_json:
        write_json_atomic(args.output_json, report)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    run_main(main)
