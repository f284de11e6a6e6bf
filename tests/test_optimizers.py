"""--optim_matrices muon: Muon steps the block matrices, AdamW the rest, as one Trainer optimizer that trains and resumes."""

import copy
import json
import shutil

import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.optimizers import MuonAdamWFactory, split_parameters

KWARGS = {"muon_lr": 0.02, "adamw_lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}


def tiny_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=64))


def test_matrices_go_to_muon_embeddings_and_vectors_to_adamw():
    matrices, decayed, other = (sorted(n for n, _ in group) for group in split_parameters(tiny_model()))
    assert matrices == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert decayed == ["transformer.wpe.weight", "transformer.wte.weight"]  # wte is also lm_head: AdamW, once
    assert other and all(n.endswith(".bias") or ".ln_" in n for n in other)


def test_one_step_is_a_muon_step_and_an_adamw_step():
    model = tiny_model()
    batch = torch.randint(0, 64, (2, 16))
    model(batch, labels=batch).loss.backward()
    matrices, decayed, other = split_parameters(model)
    # The same step from the two torch optimizers on their own, on copies of the parameters.
    muon_copy = [p.detach().clone().requires_grad_() for _, p in matrices]
    adamw_copy = [p.detach().clone().requires_grad_() for _, p in decayed]
    for copy_, (_, p) in zip(muon_copy + adamw_copy, matrices + decayed):
        copy_.grad = p.grad.clone()
    torch.optim.Muon(muon_copy, lr=0.02, weight_decay=0.1).step()
    torch.optim.AdamW(adamw_copy, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1).step()

    MuonAdamWFactory()(model, **KWARGS).step()
    for expected, (name, p) in zip(muon_copy + adamw_copy, matrices + decayed):
        assert torch.equal(p.detach(), expected.detach()), name


def test_trains_and_resumes_with_muon(tmp_path, micro_files, monkeypatch):
    extra = ("--optim_matrices", "muon", "--save_total_limit", 5)
    full = tmp_path / "full"
    assert train_in_process(micro_args(micro_files, full, *extra, max_steps=4, save_steps=2), monkeypatch) == 0
    state = torch.load(full / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in state["state"].values())  # Muon's state is checkpointed
    assert any("exp_avg" in s for s in state["state"].values())  # and AdamW's
    log = json.loads((full / "trainer_state.json").read_text())["log_history"]
    assert all(0 < e["loss"] < 12 for e in log if "loss" in e)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    argv = micro_args(micro_files, resumed, *extra, "--resume_from_checkpoint", "latest", max_steps=4, save_steps=2)
    assert train_in_process(argv, monkeypatch) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
