"""Per-step cost of --ema_decay: AveragedModel.update_parameters (torch._foreach_lerp_) vs a step.

    OMP_NUM_THREADS=1 python benchmarks/weight_averaging_cost.py --preset tiny --block_size 128 \
        --batch_size 8 --output_json benchmarks/results/weight_averaging_cpu_tiny.json

A model of the preset (random weights, GPT-2 vocabulary); a training step is forward + backward +
AdamW step on a random batch of batch_size x block_size tokens. Both are timed as the median of
--repeats calls after --warmup calls. Prints the two times and their ratio, and saves them as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from wikigpt.model import PRESETS  # noqa: E402


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **PRESETS[args.preset]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 50257, (args.batch_size, args.block_size))

    def train_step():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    averaged = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(args.decay), use_buffers=False
    )
    step_ms = median_ms(train_step, args.warmup, args.repeats)
    ema_ms = median_ms(lambda: averaged.update_parameters(model), args.warmup, args.repeats * 5)
    result = {
        "preset": args.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "train_step_ms": round(step_ms, 2),
        "ema_update_ms": round(ema_ms, 3),
        "ema_share_of_step": round(ema_ms / step_ms, 4),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(
        f"{args.preset}: {result['parameters'] / 1e6:.2f}M parameters, batch {args.batch_size} x "
        f"{args.block_size}"
    )
    print(f"  training step  {step_ms:9.2f} ms")
    print(f"  EMA update     {ema_ms:9.3f} ms  ({ema_ms / step_ms:.2%} of a step)")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
