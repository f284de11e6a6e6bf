"""--optim_matrices muon: torch.optim.Muon for the 2-D hidden matrices, AdamW for everything else.

Muon (orthogonalised momentum) only suits the weight matrices inside the blocks (GPT-2's attention
and MLP Conv1D weights). Embeddings (wte, which is also the tied lm_head, and wpe), LayerNorm
weights and biases stay on AdamW with the run's --learning_rate, betas, epsilon; AdamW decays the
2-D embeddings and not the 1-D parameters (nanoGPT's rule, the same split the Trainer's default
makes for GPT-2). The two optimizers are one torch Optimizer to the Trainer (MuonWithAdamW shares
their parameter groups and state), so the learning-rate schedule scales both (each from its own
peak), and optimizer.pt checkpoints and resumes both.

torch's Muon orthogonalises each update in bf16, which a CPU without native bf16 matmuls (AVX2 only)
emulates: on an 8 x 128 GPT-2 one optimizer step took 2.0 s, over three times a whole fp32 training
step. On such a CPU the same Newton-Schulz iteration runs in fp32: 0.16 s.

torch's Muon also steps one matrix at a time: for a small model on a CPU that is ~15 small matmuls
and their dispatch per matrix, 48 matrices for a 12-layer GPT-2. BatchedMuon is torch's Muon (same
state, groups, defaults and update, to the bit in bf16) stepping all matrices of one shape as one
batch; AdamW is torch's fused kernel (the Trainer's default, adamw_torch_fused). Together: 24.8 ms a
step instead of 69.7 for a 12 x 128 GPT-2 on 2 CPU cores (benchmarks/optimizer_step.py).

Muon scales each update by sqrt(max(1, out/in)) (torch's "original" rule, written for nn.Linear's
(out, in) weights). GPT-2's Conv1D stores its weights as (in, out), so those matrices are scaled by
their transpose's shape: c_attn and the MLP's up projection by sqrt(3) and 2 at width 128, the MLP's
down projection by 1.

Muon: Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon); the Newton-Schulz coefficients are theirs, as in
torch.optim.Muon.

Handed to the Trainer through its `optimizer_cls_and_kwargs` hook as a factory (called with the
model).
"""

import math

import torch
from torch.optim import AdamW, Muon, Optimizer
from transformers.pytorch_utils import Conv1D

from wikigpt.errors import UsageError
from wikigpt.train.precision import cpu_has_native_bf16

CHOICES = ("adamw", "muon")


def check_optimizer_args(args) -> None:
    if args.optim_matrices not in CHOICES:
        raise UsageError(
            f"--optim_matrices {args.optim_matrices!r} is unknown; "
            f"choose one of {', '.join(CHOICES)}"
        )
    if args.muon_learning_rate <= 0:
        raise UsageError(
            "--muon_learning_rate must be a positive number (e.g. 0.02); got "
            f"{args.muon_learning_rate}"
        )


def split_parameters(model: torch.nn.Module) -> tuple[list, list, list]:
    """(Muon matrices, AdamW decayed, AdamW not decayed) as lists of (name, parameter); tied weights
    once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    matrices, decayed, other = [], [], []
    for name, p in model.named_parameters():  # named_parameters lists a tied tensor once
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) not in embeddings:
            matrices.append((name, p))
        elif p.ndim >= 2:
            decayed.append((name, p))
        else:
            other.append((name, p))
    return matrices, decayed, other


def orthogonalize(
    updates: torch.Tensor,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """torch's Muon Newton-Schulz iteration (same coefficients, steps and scaling) on a batch of
    matrices [n, rows, cols], in `dtype` (torch's: bf16)."""
    a, b, c = ns_coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def evaluate_closure(closure):
    """torch optimizers' step(closure): the loss, recomputed with gradients on, where a closure is
    given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def in_out_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights stored as (in, out): transformers' Conv1D (GPT-2's attention and MLP)."""
    return [m.weight for m in model.modules() if isinstance(m, Conv1D)]


class BatchedMuon(Muon):
    """torch.optim.Muon, stepping the matrices of one shape together (Newton-Schulz as batched
    matmuls).

    `in_out`: parameters stored as (in, out) (Conv1D); their update scale reads the shape as (out,
    in).
    """

    def __init__(self, params, *, orthogonalize_in_fp32: bool = False, in_out=(), **kwargs):
        if kwargs.get("adjust_lr_fn") not in (None, "original"):
            raise ValueError(
                "BatchedMuon scales each update as torch's default adjust_lr_fn ('original') does"
            )
        super().__init__(params, **kwargs)
        self.orthogonalize_dtype = torch.float32 if orthogonalize_in_fp32 else torch.bfloat16
        self.in_out = {id(p) for p in in_out}

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon supports dense real matrices only")
                state = self.state[p]
                if (
                    "momentum_buffer" not in state
                ):  # torch's Muon state, so checkpoints load either way
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
                key = (p.shape, id(p) in self.in_out)
                by_shape.setdefault(key, []).append((p, p.grad, state["momentum_buffer"]))
            for (shape, in_out), items in by_shape.items():
                params, grads, buffers = (list(column) for column in zip(*items))
                self._step_shape(group, shape[::-1] if in_out else shape, params, grads, buffers)
        return loss

    def _step_shape(self, group, shape, params, grads, buffers):
        """One Muon step of same-shape matrices; `shape` is (out, in) for the update's scale."""
        momentum, lr = group["momentum"], group["lr"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch.stack(buffers)
        if group["nesterov"]:
            updates = torch.stack(grads).lerp_(updates, momentum)
        updates = orthogonalize(
            updates,
            group["ns_coefficients"],
            group["ns_steps"],
            group["eps"],
            self.orthogonalize_dtype,
        )
        rows, cols = shape
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(
            params,
            list(updates.to(params[0].dtype).unbind(0)),
            alpha=-lr * math.sqrt(max(1, rows / cols)),
        )


class MuonWithAdamW(Optimizer):
    """One Optimizer over a Muon and an AdamW: their parameter groups and per-parameter state are
    this one's."""

    def __init__(self, muon: Muon, adamw: AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._link()

    def _link(self):
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = (
            self.param_groups[:n],
            self.param_groups[n:],
        )
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # replaces self.state and the groups' contents
        self._link()


class MuonAdamWFactory:
    """The Trainer calls MuonAdamWFactory()(model, **kwargs) (transformers' optimizer-factory
    hook)."""

    def __call__(
        self,
        model,
        *,
        muon_lr,
        adamw_lr,
        weight_decay,
        betas,
        eps,
        momentum=0.95,
        orthogonalize_in_fp32=None,
    ):
        matrices, decayed, other = split_parameters(model)
        if (
            orthogonalize_in_fp32 is None
        ):  # bf16 where the matrices live on a GPU or a CPU with native bf16
            on_cpu = any(p.device.type == "cpu" for _, p in matrices)
            orthogonalize_in_fp32 = on_cpu and not cpu_has_native_bf16()
        muon = BatchedMuon(
            [p for _, p in matrices],
            orthogonalize_in_fp32=orthogonalize_in_fp32,
            lr=muon_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            in_out=in_out_matrices(model),
        )
        vectors = [p for _, p in decayed + other]
        fused = (
            all(p.device.type in ("cpu", "cuda") for p in vectors) or None
        )  # else torch's default kernel
        adamw = AdamW(
            [
                {"params": [p for _, p in decayed], "weight_decay": weight_decay},
                {"params": [p for _, p in other], "weight_decay": 0.0},
            ],
            lr=adamw_lr,
            betas=betas,
            eps=eps,
            fused=fused,
        )
        return MuonWithAdamW(muon, adamw)


def optimizer_cls_and_kwargs(args):
    """The Trainer's `optimizer_cls_and_kwargs` for --optim_matrices (None: its own --optim)."""
    if args.optim_matrices == "adamw":
        return None
    return MuonAdamWFactory, {
        "muon_lr": args.muon_learning_rate,
        "adamw_lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
