"""One optimizer step of --optim_matrices muon: torch's Muon and AdamW as they come, against
wikigpt's.

torch.optim.Muon steps one matrix at a time and torch.optim.AdamW on a CPU takes its single-tensor
kernel; wikigpt.train.optimizers steps the matrices of one shape as one batch (BatchedMuon) and
AdamW with the fused kernel. Both step the same parameters with the same gradients, alternating, in
one process; prints the medians and the largest difference between the parameters they reach, and
writes them as JSON. The default shape is the CPU recipe's 12-layer student (12 x 128, vocabulary
50,257).

torch's Muon always orthogonalises in bf16. wikigpt's does so where the CPU has native bf16 and in
fp32 elsewhere (`--orthogonalize host`, the default). `--orthogonalize bf16` compares like with
like: the parameters then agree to the bit. In fp32 they differ by bf16's rounding, which the JSON's
`orthogonalize_dtype` names.

    python benchmarks/optimizer_step.py [--orthogonalize host|bf16|fp32] [--output_json FILE.json]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wikigpt.train.optimizers import MuonAdamWFactory, split_parameters  # noqa: E402

HYPER = {"muon_lr": 0.02, "adamw_lr": 2e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}


class TorchMuon:
    """torch.optim.Muon on nn.Linear's (out, in) layout: GPT-2's non-square Conv1D (in, out) weights
    are stepped as transposed copies (gradients in, weights back), so its scale rule reads their
    shape as wikigpt's does."""

    def __init__(self, matrices):
        self.pairs = [
            (p, p.detach().T.clone().requires_grad_() if p.size(0) != p.size(1) else p)
            for p in matrices
        ]
        self.muon = torch.optim.Muon(
            [q for _, q in self.pairs], lr=HYPER["muon_lr"], weight_decay=HYPER["weight_decay"]
        )

    @torch.no_grad()
    def step(self):
        for p, q in self.pairs:
            if q is not p:
                q.grad = p.grad.T.clone()
        self.muon.step()
        for p, q in self.pairs:
            if q is not p:
                p.copy_(q.T)


def torchs_optimizers(model):
    """torch's Muon and AdamW with their defaults, split as wikigpt splits the parameters."""
    matrices, decayed, other = split_parameters(model)
    muon = TorchMuon([p for _, p in matrices])
    adamw = torch.optim.AdamW(
        [
            {"params": [p for _, p in decayed], "weight_decay": HYPER["weight_decay"]},
            {"params": [p for _, p in other], "weight_decay": 0.0},
        ],
        lr=HYPER["adamw_lr"],
        betas=HYPER["betas"],
        eps=HYPER["eps"],
    )
    return muon, adamw


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps of each (after 3 untimed)"
    )
    parser.add_argument(
        "--orthogonalize",
        choices=("host", "bf16", "fp32"),
        default="host",
        help="wikigpt's Newton-Schulz dtype: the host's choice (default), or forced",
    )
    parser.add_argument("--output_json")
    args = parser.parse_args()
    in_fp32 = {"host": None, "bf16": False, "fp32": True}[args.orthogonalize]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=4,
        n_positions=256,
        vocab_size=args.vocab_size,
    )
    models = {"torch": GPT2LMHeadModel(config)}
    models["wikigpt"] = GPT2LMHeadModel(config)
    models["wikigpt"].load_state_dict(models["torch"].state_dict())
    optimizers = {
        "torch": torchs_optimizers(models["torch"]),
        "wikigpt": (MuonAdamWFactory()(models["wikigpt"], **HYPER, orthogonalize_in_fp32=in_fp32),),
    }
    dtype = optimizers["wikigpt"][0].muon.orthogonalize_dtype
    times = {name: [] for name in models}
    for step in range(3 + args.steps):
        grads = [torch.randn_like(p) for p in models["torch"].parameters()]
        for name, model in models.items():
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            start = time.perf_counter()
            for optimizer in optimizers[name]:
                optimizer.step()
            if step >= 3:
                times[name].append((time.perf_counter() - start) * 1000)
    torch_params = dict(models["torch"].named_parameters())
    difference = max(
        (p - torch_params[n]).abs().max().item() for n, p in models["wikigpt"].named_parameters()
    )
    result = {
        "shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab_size": args.vocab_size},
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "orthogonalize_dtype": str(dtype).removeprefix("torch."),
        "ms_per_step": {
            name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()
        },
        "max_abs_parameter_difference": difference,
    }
    result["speedup"] = (
        result["ms_per_step"]["torch"]["median"] / result["ms_per_step"]["wikigpt"]["median"]
    )
    for name, t in result["ms_per_step"].items():
        print(f"{name}: median {t['median']:.1f} ms (min {t['min']:.1f}) per optimizer step")
    print(
        f"speedup {result['speedup']:.2f}x; largest parameter difference after {3 + args.steps} "
        f"steps: {difference:.3g} (wikigpt orthogonalises in {result['orthogonalize_dtype']}, "
        "torch in bfloat16)"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
