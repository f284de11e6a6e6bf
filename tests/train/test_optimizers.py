"""--optim_matrices muon: Muon steps the block matrices, AdamW the rest, as one Trainer optimizer
that trains and resumes."""

import copy
import json
import shutil

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.train import optimizers
from wikigpt.train.optimizers import BatchedMuon, MuonAdamWFactory, split_parameters

KWARGS = {"muon_lr": 0.02, "adamw_lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}


def tiny_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=64)
    )


def test_matrices_go_to_muon_embeddings_and_vectors_to_adamw():
    matrices, decayed, other = (
        sorted(n for n, _ in group) for group in split_parameters(tiny_model())
    )
    assert matrices == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert decayed == [
        "transformer.wpe.weight",
        "transformer.wte.weight",
    ]  # wte is also lm_head: AdamW, once
    assert other and all(n.endswith(".bias") or ".ln_" in n for n in other)


def test_steps_are_torchs_muon_and_fused_adamw_steps():
    """Three steps (momentum included) match torch's Muon and fused AdamW to the bit, each matrix
    shape batched.

    GPT-2's Conv1D weights are (in, out); torch's Muon reads a shape as nn.Linear's (out, in). So
    torch steps the transposed copies of the non-square ones, with transposed gradients: the same
    update in the layout its scale rule is written for (a square matrix's scale is 1 either way, and
    transposing it would change the rounding)."""

    def linear_layout(t):
        return t.T if t.size(0) != t.size(1) else t

    model = tiny_model()
    matrices, decayed, other = split_parameters(model)
    # The same steps from the two torch optimizers on their own, on (out, in) copies of the
    # parameters.
    muon_copy = [linear_layout(p.detach()).clone().requires_grad_() for _, p in matrices]
    adamw_copy = [p.detach().clone().requires_grad_() for _, p in decayed]
    muon = torch.optim.Muon(muon_copy, lr=0.02, weight_decay=0.1)
    adamw = torch.optim.AdamW(
        adamw_copy, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True
    )
    optimizer = MuonAdamWFactory()(model, **KWARGS, orthogonalize_in_fp32=False)
    for step in range(3):
        batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        model(batch, labels=batch).loss.backward()
        for copy_, (_, p) in zip(muon_copy, matrices):
            copy_.grad = linear_layout(p.grad).clone()
        for copy_, (_, p) in zip(adamw_copy, decayed):
            copy_.grad = p.grad.clone()
        muon.step()
        adamw.step()
        optimizer.step()
    assert {tuple(p.shape) for _, p in matrices} == {
        (16, 48),
        (16, 16),
        (16, 64),
        (64, 16),
    }  # wide, square, tall
    for expected, (name, p) in zip(muon_copy, matrices):
        assert torch.equal(p.detach(), linear_layout(expected.detach())), name
    for expected, (name, p) in zip(adamw_copy, decayed):
        assert torch.equal(p.detach(), expected.detach()), name


def test_plain_matrices_step_as_torchs_muon():
    """Matrices not marked (in, out) (nn.Linear's layout) take torch's rule as it is, to the bit."""
    torch.manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 24), (24, 8), (8, 24), (8, 8))
    ]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    batched, reference = BatchedMuon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
            b.grad = a.grad.clone()
        batched.step()
        reference.step()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, theirs))


def test_gpt2_conv1d_matrices_are_scaled_by_out_over_in():
    """c_attn (16 -> 48) and the MLP's up projection (16 -> 64) take sqrt(3) and 2; its down
    projection 1."""
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(
            p
        )  # rank one: every orthogonalised update has the same spectral shape
    optimizer = MuonAdamWFactory()(
        model, **{**KWARGS, "weight_decay": 0.0}, orthogonalize_in_fp32=True
    )
    optimizer.step()
    steps = {n: (p.detach() - start[n]).norm().item() for n, p in split_parameters(model)[0]}
    unit = steps["transformer.h.0.attn.c_proj.weight"]  # square: scale 1
    assert steps["transformer.h.0.attn.c_attn.weight"] / unit == pytest.approx(3**0.5, rel=1e-3)
    assert steps["transformer.h.0.mlp.c_fc.weight"] / unit == pytest.approx(2.0, rel=1e-3)
    assert steps["transformer.h.0.mlp.c_proj.weight"] / unit == pytest.approx(1.0, rel=1e-3)


def newton_schulz_float64(grad, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    x = grad.double().T if grad.size(0) > grad.size(1) else grad.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if grad.size(0) > grad.size(1) else x).float()


def test_fp32_orthogonalisation_is_torchs_iteration_without_bf16_rounding():
    model = tiny_model()
    batch = torch.randint(0, 64, (2, 16))
    model(batch, labels=batch).loss.backward()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bf16_model = copy.deepcopy(model)
    MuonAdamWFactory()(model, **KWARGS, orthogonalize_in_fp32=True).step()
    MuonAdamWFactory()(bf16_model, **KWARGS, orthogonalize_in_fp32=False).step()
    bf16_params = dict(bf16_model.named_parameters())
    for name, p in split_parameters(model)[
        0
    ]:  # the Muon matrices: first step, momentum buffer = grad
        g = grads[name]
        update = g + 0.95 * g  # nesterov: grad + momentum * buffer
        scale = max(1, g.size(1) / g.size(0)) ** 0.5  # Conv1D: (in, out), scaled by out / in
        expected = start[name] * (1 - 0.02 * 0.1) - 0.02 * scale * newton_schulz_float64(update)
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6), name
        bf16_gap = (bf16_params[name].detach() - expected).abs().max().item()
        assert 1e-6 < bf16_gap < 0.02 * scale, (
            name
        )  # torch's bf16 result: the same step, rounded (NS amplifies it)


def test_batched_muon_refuses_an_lr_scaling_it_does_not_implement():
    matrix = torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(
        ValueError,
        match=r"^BatchedMuon scales each update as torch's default adjust_lr_fn "
        r"\('original'\) does$",
    ):
        BatchedMuon([matrix], adjust_lr_fn="match_rms_adamw")
    assert BatchedMuon([matrix], adjust_lr_fn="original").param_groups[0]["params"] == [matrix]


def test_fp32_orthogonalisation_where_the_cpu_lacks_native_bf16(monkeypatch):
    for native, fp32 in ((False, True), (True, False)):
        monkeypatch.setattr(optimizers, "cpu_has_native_bf16", lambda native=native: native)
        dtype = MuonAdamWFactory()(tiny_model(), **KWARGS).muon.orthogonalize_dtype
        assert dtype == (torch.float32 if fp32 else torch.bfloat16)


def test_trains_and_resumes_with_muon(tmp_path, micro_files, monkeypatch):
    extra = ("--optim_matrices", "muon", "--save_total_limit", 5)
    full = tmp_path / "full"
    assert (
        train_in_process(
            micro_args(micro_files, full, *extra, max_steps=4, save_steps=2), monkeypatch
        )
        == 0
    )
    state = torch.load(full / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert any(
        "momentum_buffer" in s for s in state["state"].values()
    )  # Muon's state is checkpointed
    assert any("exp_avg" in s for s in state["state"].values())  # and AdamW's
    log = json.loads((full / "trainer_state.json").read_text())["log_history"]
    assert all(0 < e["loss"] < 12 for e in log if "loss" in e)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    argv = micro_args(
        micro_files,
        resumed,
        *extra,
        "--resume_from_checkpoint",
        "latest",
        max_steps=4,
        save_steps=2,
    )
    assert train_in_process(argv, monkeypatch) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
