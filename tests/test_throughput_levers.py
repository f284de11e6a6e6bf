"""Correctness guard for the speed levers that run on CPU (--pad_vocab_multiple): same losses as the plain path,
perplexity and sampling over the real vocabulary only, padded checkpoints reload and resume, bad values refused.

Tolerance: float32 on CPU, per-step training loss and final validation perplexity within relative 1e-5 of the
unpadded run (measured on CPU: identical; the padded LM head is a wider matmul, whose rounding could differ elsewhere).
"""

import json

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from transformers import AutoModelForCausalLM

from wikigpt.cli import parse_args
from wikigpt.data import DataArguments
from wikigpt.metrics import compute_perplexity, nll_and_count
from wikigpt.model import ModelArguments, load_causal_lm
from wikigpt.padded_vocab import REAL_VOCAB_KEY
from wikigpt.training import WikiTrainingArguments
from conftest import REPO

REAL_VOCAB, PADDED_VOCAB = 50257, 50304
LOSS_RTOL = 1e-5
STEPS = 20


def losses(out) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_files):
    """The same 20-step micro run, plain and with the vocabulary padded to a multiple of 64 (same seed)."""
    monkeypatch = pytest.MonkeyPatch()
    out = {}
    try:
        for name, extra in (("plain", []), ("padded", ["--pad_vocab_multiple", 64])):
            out[name] = tmp_path_factory.mktemp(name)
            argv = micro_args(micro_files, out[name], *extra, max_steps=STEPS, save_steps=10)
            assert train_in_process(argv, monkeypatch) == 0
    finally:
        monkeypatch.undo()
    return out


def test_padded_vocab_trains_with_the_same_losses(runs):
    plain, padded = losses(runs["plain"]), losses(runs["padded"])
    assert sorted(plain) == sorted(padded) == list(range(1, STEPS + 1))
    for step in plain:
        assert padded[step] == pytest.approx(plain[step], rel=LOSS_RTOL), step
    results = {k: json.loads((runs[k] / "results.json").read_text()) for k in runs}
    assert results["padded"]["validation"]["eval_perplexity"] == pytest.approx(
        results["plain"]["validation"]["eval_perplexity"], rel=LOSS_RTOL)
    assert results["padded"]["validation"]["eval_tokens"] == results["plain"]["validation"]["eval_tokens"]
    assert results["padded"]["model"]["vocab_padded_to"] == PADDED_VOCAB
    config = json.loads((runs["padded"] / "config.json").read_text())
    assert config["vocab_size"] == PADDED_VOCAB and config[REAL_VOCAB_KEY] == REAL_VOCAB


def blocks_of(micro_files, tokenizer, n=4, length=32):
    ids = tokenizer(open(micro_files["validation"], encoding="utf-8").read())["input_ids"][: n * length]
    return torch.tensor(ids).view(n, length)


def perplexity(model, ids) -> float:
    """The Trainer's eval path: logits -> per-block NLL sums (nll_and_count) -> corpus perplexity."""
    with torch.no_grad():
        logits = model(ids).logits
    stats = nll_and_count(logits, ids)

    class Pred:
        predictions = stats.numpy()
    return compute_perplexity(Pred)["perplexity"]


def make_padded_rows_huge(model):
    with torch.no_grad():
        model.get_input_embeddings().weight[REAL_VOCAB:] = 1e4  # a plain head would give them huge logits


def test_eval_perplexity_counts_only_the_real_vocabulary(runs, micro_files, tokenizer):
    model = load_causal_lm(str(runs["padded"]), flag="--model").eval()
    ids = blocks_of(micro_files, tokenizer)
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == REAL_VOCAB
    before = perplexity(model, ids)
    make_padded_rows_huge(model)
    assert perplexity(model, ids) == before
    # The same weights without the slice (plain from_pretrained) would put the mass on the padded ids.
    plain = AutoModelForCausalLM.from_pretrained(runs["padded"]).eval()
    make_padded_rows_huge(plain)
    assert perplexity(plain, ids) > 100 * before


def test_padded_checkpoint_reloads_and_never_samples_a_padded_id(runs, micro_files, tokenizer):
    prompt = blocks_of(micro_files, tokenizer, n=2, length=4)
    wikigpt_model = load_causal_lm(str(runs["padded"] / "checkpoint-10"), flag="--model").eval()
    plain = AutoModelForCausalLM.from_pretrained(runs["padded"]).eval()  # extra config key ignored
    assert plain.config.vocab_size == PADDED_VOCAB
    assert plain.generation_config.suppress_tokens == list(range(REAL_VOCAB, PADDED_VOCAB))
    for model in (wikigpt_model, plain):
        make_padded_rows_huge(model)
        torch.manual_seed(0)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             max_new_tokens=12, pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] == 16 and int(out.max()) < REAL_VOCAB


def test_padded_run_resumes(runs, micro_files, monkeypatch, capsys):
    out = runs["padded"]
    resumed_args = micro_args(micro_files, out, "--pad_vocab_multiple", 64, max_steps=STEPS, save_steps=10)
    original = losses(out)
    assert train_in_process([*resumed_args, "--resume_from_checkpoint", out / "checkpoint-10"], monkeypatch) == 0
    resumed = losses(out)
    for step in range(11, STEPS + 1):
        assert resumed[step] == pytest.approx(original[step], rel=LOSS_RTOL), step
    # Without the flag the model does not fit the checkpoint: one line naming the flag to add.
    unpadded_args = micro_args(micro_files, out, max_steps=STEPS, save_steps=10)
    capsys.readouterr()
    assert train_in_process([*unpadded_args, "--resume_from_checkpoint", out / "checkpoint-10"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "vocab_size 50304 there, 50257 here" in err and "--pad_vocab_multiple" in err


@pytest.mark.parametrize("extra, message", [
    (["--pad_vocab_multiple", "0"], "error: --pad_vocab_multiple must be a positive integer such as 64 or 128; "
                                    "got 0."),
    (["--pad_vocab_multiple", "-64"], "error: --pad_vocab_multiple must be a positive integer such as 64 or 128; "
                                      "got -64."),
    (["--pad_vocab_multiple", "64", "--model_name_or_path", "gpt2"],
     "error: --pad_vocab_multiple only applies to a model built from scratch"),
])
def test_bad_pad_vocab_multiple(extra, message, tmp_path, micro_files, monkeypatch, capsys):
    argv = micro_args(micro_files, tmp_path / "out")
    if "--model_name_or_path" in extra:
        argv = argv[4:]  # a checkpoint run takes no --preset/--config_overrides
    assert train_in_process([*argv, *extra], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert not (tmp_path / "out").exists()


def test_gpu_fast_config_holds_the_levers():
    model_args, data_args, args = parse_args(
        (ModelArguments, DataArguments, WikiTrainingArguments),
        [str(REPO / "configs" / "gpu_fast.yaml"), "--bf16", "false", "--tf32", "false"])  # no CUDA here
    assert model_args.pad_vocab_multiple == 64
    assert data_args.block_size == 1024 and args.per_device_train_batch_size == 16
    assert args.torch_compile and args.optim.value == "adamw_torch_fused"
    assert args.dataloader_num_workers == 2 and args.dataloader_pin_memory
    assert model_args.config_overrides == "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
