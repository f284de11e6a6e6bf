"""EXPERIMENT (INDUCTION_INIT env): seed a previous-token head (layer 0, head 0) and an induction head (layer 1,
head 0) in a fresh GPT-2, in reserved residual dimensions: tokens | positions (8 sinusoid pairs) | previous token.

INDUCTION_INIT="emb_scale=10,copy_gain=1,key_scale=4,write_gain=2" sets the keyword arguments; "1": defaults.
"""
import math
import os

import torch

OMEGAS = [0.2459, 1.0531, 1.9793, 2.0379, 2.7114, 2.727, 2.9283, 3.0513]  # sidelobes <= 3.82 of 8 over 256 positions


def from_env(model):
    spec = os.environ.get("INDUCTION_INIT")
    if spec:
        induction_init(model, **{k: float(v) for k, v in (a.split("=") for a in spec.split(",") if "=" in a)})


@torch.no_grad()
def induction_init(model, prev_sharpness=2.5, match_sharpness=4.0, write_gain=None, copy_gain=None, seed=0,
                   emb_scale=1.0, key_scale=1.0):
    cfg = model.config
    d, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    m = len(OMEGAS)
    t = d - 2 * m - hd
    T, P, S = slice(0, t), slice(t, t + 2 * m), slice(t + 2 * m, d)
    g = torch.Generator().manual_seed(int(seed))
    tr = model.transformer
    std = cfg.initializer_range * emb_scale
    tr.wte.weight[:, t:] = 0
    tr.wte.weight[:, :t] *= emb_scale
    n_pos = tr.wpe.weight.shape[0]
    ang = torch.arange(n_pos)[:, None].float() * torch.tensor(OMEGAS)[None]
    u = torch.stack([ang.cos(), ang.sin()], -1).reshape(n_pos, 2 * m)
    tr.wpe.weight.zero_()
    tr.wpe.weight[:, P] = std * math.sqrt(t / m) * u  # as much energy as the token block
    R = torch.zeros(2 * m, 2 * m)  # takes u(i) to u(i-1)
    for k, om in enumerate(OMEGAS):
        c, s = math.cos(om), math.sin(om)
        R[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.tensor([[c, s], [-s, c]])
    A = torch.linalg.qr(torch.randn(t, hd, generator=g))[0].T  # hd x t, orthonormal rows
    B = torch.linalg.qr(torch.randn(t, hd, generator=g))[0].T
    p_scale = math.sqrt(d / 2 / (2 * m))
    beta = prev_sharpness * math.sqrt(hd) / p_scale ** 2
    a0 = tr.h[0].attn  # Conv1D: x @ W + b, columns q | k | v, head h at h * hd
    W, b = a0.c_attn.weight, a0.c_attn.bias
    for off in (0, d, 2 * d):
        W[:, off:off + hd] = 0
        b[off:off + hd] = 0
    W[P, 0:2 * m] = beta * R.T
    W[P, d:d + 2 * m] = torch.eye(2 * m)
    W[T, 2 * d:2 * d + hd] = A.T
    a0.c_proj.weight[0:hd] = 0
    write = write_gain if write_gain is not None else std * math.sqrt(t / hd) / math.sqrt(t / d)
    a0.c_proj.weight[0:hd, S] = write * torch.eye(hd)
    a1 = tr.h[1].attn
    W, b = a1.c_attn.weight, a1.c_attn.bias
    for off in (0, d, 2 * d):
        W[:, off:off + hd] = 0
        b[off:off + hd] = 0
    W[T, 0:hd] = match_sharpness / key_scale * A.T
    W[S, d:d + hd] = key_scale * torch.eye(hd)
    W[T, 2 * d:2 * d + hd] = B.T
    a1.c_proj.weight[0:hd] = 0
    a1.c_proj.weight[0:hd, T] = (copy_gain if copy_gain is not None else 4 * std) * B
    return model
