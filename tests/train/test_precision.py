"""wikigpt/train/precision.py: bf16 where the CPU multiplies bf16 natively, fp32 one flag away; the
bf16 and compiled paths train to the fp32 eager losses."""

import json

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

import wikigpt.train.precision
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.cli import parse_args
from wikigpt.errors import UsageError
from wikigpt.train.optimizers import MuonAdamWFactory
from wikigpt.train.arguments import WikiTrainingArguments

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
# Largest relative gap between a bf16-autocast and an fp32 logged loss over the same 20 steps from
# the same seed.
BF16_LOSS_RTOL = 5e-3


def training_args(*argv, flags=None, monkeypatch=None):
    if flags is not None:
        monkeypatch.delenv(wikigpt.train.precision.OVERRIDE, raising=False)
        monkeypatch.setattr(wikigpt.train.precision, "cpu_flags", lambda: frozenset(flags))
    (args,) = parse_args((WikiTrainingArguments,), [*argv, "--output_dir", "unused"])
    return args


@cpu_only
def test_bf16_on_a_cpu_needs_no_use_cpu():
    args = training_args("--bf16")
    assert (
        args.bf16 and args.use_cpu and args.device.type == "cpu" and args.mixed_precision == "bf16"
    )


@cpu_only
@pytest.mark.parametrize(
    "flags, bf16",
    [
        ({"avx2", "avx512_bf16"}, True),
        ({"avx2", "amx_bf16"}, True),
        ({"avx2", "avx512f"}, False),
        (set(), False),
    ],
)
def test_default_precision_follows_the_cpu(flags, bf16, monkeypatch):
    args = training_args(flags=flags, monkeypatch=monkeypatch)
    assert args.bf16 is bf16 and args.mixed_precision == ("bf16" if bf16 else "no")


@cpu_only
def test_fp32_is_one_flag_away_on_a_bf16_cpu(monkeypatch):
    args = training_args("--bf16", "false", flags={"avx512_bf16"}, monkeypatch=monkeypatch)
    assert args.bf16 is False and args.mixed_precision == "no"


@cpu_only
@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_bf16"}])
@pytest.mark.parametrize("override, bf16", [("0", False), ("1", True)])
def test_the_switch_makes_any_host_act_as_the_other_kind(flags, override, bf16, monkeypatch):
    """WIKIGPT_CPU_BF16 overrides /proc/cpuinfo both ways: the bf16 default and the Muon dtype
    follow it."""
    monkeypatch.setattr(wikigpt.train.precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setenv("WIKIGPT_CPU_BF16", override)
    args = training_args()
    assert args.bf16 is bf16 and args.mixed_precision == ("bf16" if bf16 else "no")
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64)
    )
    optimizer = MuonAdamWFactory()(
        model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8
    )
    assert optimizer.muon.orthogonalize_dtype == (torch.bfloat16 if bf16 else torch.float32)


@cpu_only
def test_a_bad_switch_value_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("WIKIGPT_CPU_BF16", "yes")
    with pytest.raises(UsageError) as err:
        training_args()
    assert str(err.value) == (
        "WIKIGPT_CPU_BF16='yes' is not 0 or 1; set it to 0 (act as without native bf16), "
        "1 (as with it), or unset it"
    )


def logged_losses(files, out, monkeypatch, *extra, steps=20):
    # A high learning rate without warmup: the losses compared move (10.8 -> below 10 in 20 steps).
    argv = micro_args(
        files,
        out,
        "--save_strategy",
        "no",
        "--bf16",
        "false",
        "--learning_rate",
        "1e-2",
        "--warmup_steps",
        "0",
        *extra,
        max_steps=steps,
    )
    assert train_in_process(argv, monkeypatch) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@cpu_only
def test_bf16_losses_stay_within_tolerance_of_fp32(micro_files, tmp_path, monkeypatch):
    fp32 = logged_losses(micro_files, tmp_path / "fp32", monkeypatch)
    bf16 = logged_losses(micro_files, tmp_path / "bf16", monkeypatch, "--bf16", "true")
    assert len(fp32) == len(bf16) == 20
    assert fp32[-1] < fp32[0] - 0.3  # it trains: the comparison is over a moving loss
    gaps = [abs(b - f) / f for b, f in zip(bf16, fp32)]
    assert max(gaps) < BF16_LOSS_RTOL, gaps
    assert bf16 != fp32  # bf16 autocast really ran


@cpu_only
def test_compiled_and_eager_training_agree(micro_files, tmp_path, monkeypatch):
    # Dropout off: Inductor draws its own dropout masks, so only the deterministic model can match.
    no_dropout = ["--config_overrides", "n_embd=16,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"]
    eager = logged_losses(micro_files, tmp_path / "eager", monkeypatch, *no_dropout, steps=6)
    compiled = logged_losses(
        micro_files,
        tmp_path / "compiled",
        monkeypatch,
        *no_dropout,
        "--torch_compile",
        "true",
        steps=6,
    )
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_train_py_uses_huge_pages_and_importing_wikigpt_leaves_the_allocator_alone():
    import os
    import subprocess
    import sys

    from conftest import REPO

    def setting(module, value=None):
        code = f"import os, {module}, torch; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = value
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
        ).stdout

    assert setting("wikigpt.train.run") == "None\n"  # a library import changes nothing
    assert setting("train") == "1\n"  # train.py's process: huge pages
    assert setting("train", "0") == "0\n"  # unless the user says otherwise
