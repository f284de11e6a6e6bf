"""MFU formula and peak table, and the callback's tokens/s arithmetic (with a fake clock: no timing
asserted)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState

from wikigpt.train import throughput
from wikigpt.model import PRESETS, non_embedding_parameters
from wikigpt.train.throughput import (
    ThroughputCallback,
    device_peak_flops,
    flops_per_token,
    matmul_parameters,
    model_flops_per_token,
    resolve_peak_flops,
)


def gpt2_on_meta():
    with torch.device("meta"):  # shapes only: no 500 MB of weights
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, **PRESETS["gpt2"]))


def test_gpt2_flops_per_token_by_hand():
    # One GPT-2 small block: c_attn 768x2304+2304, attn c_proj 768x768+768, two LayerNorms
    # 2x(2x768), c_fc 768x3072+3072, mlp c_proj 3072x768+768 = 7,087,872; x12 + final LayerNorm
    # 1,536 = 85,056,000.
    block = 768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768
    assert block == 7_087_872
    non_embedding = 12 * block + 2 * 768
    head = 768 * 50257  # tied LM head: one more matmul per token
    n = non_embedding + head
    assert n == 123_653_376
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024  # 6N + 12*L*H*Q*T
    assert expected == 855_166_464
    model = gpt2_on_meta()
    assert non_embedding_parameters(model) == non_embedding == 85_056_000
    assert matmul_parameters(model) == n
    assert model_flops_per_token(model, 1024) == flops_per_token(n, 12, 12, 64, 1024) == expected
    # nanoGPT's published yardstick: nanoGPT at 455k tokens/s on one H100 SXM is ~40% MFU under this
    # formula
    assert 455_000 * expected / 989e12 == pytest.approx(0.393, abs=0.001)


def test_untied_head_is_counted_once():
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16, tie_word_embeddings=False
    )
    model = GPT2LMHeadModel(config)
    assert matmul_parameters(model) == non_embedding_parameters(model) + 8 * 50


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Tesla T4", None),
        ("cpu", None),
        (None, None),
    ],
)
def test_peak_flops_table_matches_device_names(name, peak):
    assert device_peak_flops(name) == peak


def test_peak_flops_override_wins_and_cpu_has_none():
    assert resolve_peak_flops(None, "cpu") == (None, None)
    assert resolve_peak_flops(2e12, "cpu") == (2e12, "--peak_flops")
    assert resolve_peak_flops(None, "NVIDIA H100 80GB HBM3") == (
        989e12,
        "table (NVIDIA H100 80GB HBM3)",
    )
    assert resolve_peak_flops(5e14, "NVIDIA H100 80GB HBM3") == (5e14, "--peak_flops")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Args:
    world_size = 2


def test_callback_rates_leave_out_eval_and_save(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    cb = ThroughputCallback(
        tokens_per_step=1000, flops_per_token=1_000_000, peak_flops_per_device=1e10
    )
    state, control, args = TrainerState(), TrainerControl(), Args()

    def step(seconds):
        clock.now += seconds
        state.global_step += 1
        cb.on_step_end(args, state, control)

    def log():
        logs = {"loss": 1.0}
        state.log_history.append({**logs, "step": state.global_step})
        cb.on_log(args, state, control, logs=logs)
        return logs

    cb.on_train_begin(args, state, control)
    step(1.0)
    step(1.0)
    first = log()
    assert first["tokens_per_second"] == 1000.0  # 2 steps x 1000 tokens in 2 s
    assert first["mfu"] == pytest.approx(1000 * 1e6 / (1e10 * 2))  # peak of both devices
    assert (
        state.log_history[-1]["tokens_per_second"] == 1000.0
    )  # also in trainer_state.json's history
    clock.now += 30.0  # evaluation right after the log
    cb.on_evaluate(args, state, control)
    clock.now += 10.0  # then a checkpoint save
    cb.on_save(args, state, control)
    step(0.5)
    step(0.5)
    second = log()
    assert (
        second["tokens_per_second"] == 2000.0
    )  # 2 steps in 1 s of training; the 40 s of eval+save left out
    eval_logs = {"eval_loss": 2.0}
    cb.on_log(args, state, control, logs=eval_logs)
    assert "tokens_per_second" not in eval_logs
    cb.on_train_end(args, state, control)
    assert (
        cb.summary["tokens"] == 4000 and cb.summary["train_seconds_excluding_eval_and_save"] == 3.0
    )
    assert cb.summary["tokens_per_second"] == pytest.approx(4000 / 3, abs=0.1)
    assert cb.summary["mfu"] == pytest.approx((4000 / 3) * 1e6 / 2e10, rel=1e-3)


def test_callback_without_peak_logs_no_mfu(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    cb = ThroughputCallback(tokens_per_step=64, flops_per_token=10, peak_flops_per_device=None)
    state, control, args = TrainerState(), TrainerControl(), Args()
    cb.on_train_begin(args, state, control)
    clock.now += 2.0
    state.global_step = 4
    logs = {"loss": 3.0}
    cb.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_second"] == 128.0 and "mfu" not in logs
    cb.on_train_end(args, state, control)
    assert cb.summary["mfu"] is None and cb.summary["peak_flops_per_device"] is None
