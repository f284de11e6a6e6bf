"""GELU forward + backward at the MLP activation of nanoGPT's CPU shape (8 x 256 tokens, 4 x 256
wide, fp32).

transformers' Python `gelu_new` (GPT2Config's default: six elementwise ops) against torch's fused
kernel (`gelu_pytorch_tanh`, wikigpt's from-scratch default), alternating calls in one process;
prints the medians and writes them as JSON.

    python benchmarks/gelu_timing.py [--output_json benchmarks/results/cpu_gelu.json]
"""

import argparse
import json
import statistics
import time

import torch
from transformers.activations import ACT2FN

NAMES = ("gelu_new", "gelu_pytorch_tanh")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8 * 256)
    parser.add_argument("--width", type=int, default=4 * 256)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--output_json")
    args = parser.parse_args()
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    grad = torch.randn(args.tokens, args.width)
    times = {name: [] for name in NAMES}
    for _ in range(args.calls):
        for name in NAMES:
            start = time.perf_counter()
            ACT2FN[name](x).backward(grad)
            times[name].append((time.perf_counter() - start) * 1000)
            x.grad = None
    result = {
        "shape": [args.tokens, args.width],
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "ms_forward_backward": {
            name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()
        },
    }
    for name, t in result["ms_forward_backward"].items():
        print(f"{name}: median {t['median']:.2f} ms (min {t['min']:.2f}) forward + backward")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
