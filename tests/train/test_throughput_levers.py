"""Correctness guard for the speed levers that run on CPU (--pad_vocab_multiple): same losses as the
plain path, the padded width only inside the LM head's matmul, a saved model and checkpoints with
the real vocabulary (what a plain from_pretrained scores is what eval.py and train.py report), exact
resume, bad values refused.

Tolerance: float32 on CPU, per-step training loss and final validation perplexity within relative
1e-5 of the unpadded run (measured on CPU: identical; the padded LM head is a wider matmul, whose
rounding could differ elsewhere).
"""

import json

import pytest
import torch
from accelerate import Accelerator
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from wikigpt.cli import parse_args
from wikigpt.data.blocks import DataArguments, load_raw_splits, prepare_lm_splits
from wikigpt.evaluation.perplexity import compute_perplexity, nll_and_count
from wikigpt.evaluation.run import EvalArguments, evaluate_split
from wikigpt.model import ModelArguments, load_model
from wikigpt.train.arguments import WikiTrainingArguments
from conftest import REPO

REAL_VOCAB, PADDED_VOCAB = 50257, 50304
LOSS_RTOL = 1e-5
STEPS = 20


def losses(out) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_files):
    """The same 20-step micro run, plain and with the vocabulary padded to a multiple of 64 (same
    seed)."""
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
        results["plain"]["validation"]["eval_perplexity"], rel=LOSS_RTOL
    )
    assert (
        results["padded"]["validation"]["eval_tokens"]
        == results["plain"]["validation"]["eval_tokens"]
    )
    assert results["padded"]["model"]["vocab_padded_to"] == PADDED_VOCAB


def blocks_of(micro_files, tokenizer, n=4, length=32):
    ids = tokenizer(open(micro_files["validation"], encoding="utf-8").read())["input_ids"][
        : n * length
    ]
    return torch.tensor(ids).view(n, length)


def perplexity(model, ids) -> float:
    """The Trainer's eval path: logits -> per-block NLL sums (nll_and_count) -> corpus
    perplexity."""
    with torch.no_grad():
        logits = model(ids).logits
    stats = nll_and_count(logits, ids)

    class Pred:
        predictions = stats.numpy()

    return compute_perplexity(Pred)["perplexity"]


def test_padded_head_multiplies_at_the_padded_width(micro_files, tokenizer):
    """The padding is real in memory: the LM head's matmul is 50304 wide, its output and its weight
    50257."""
    model, _ = load_model(
        ModelArguments(preset="tiny", config_overrides="n_embd=16", pad_vocab_multiple=64),
        tokenizer,
    )
    widths = []

    class LinearWidths(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                widths.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), LinearWidths():
        logits = model.eval()(blocks_of(micro_files, tokenizer, n=1)).logits
    assert PADDED_VOCAB in widths and logits.shape[-1] == REAL_VOCAB
    assert model.lm_head.weight.shape[0] == REAL_VOCAB


def test_saved_padded_model_is_a_plain_real_vocabulary_model(runs, micro_files, tokenizer):
    """lm-eval, pipelines and the Hub load the output folder with plain from_pretrained: 50257
    logits, and the perplexity eval.py and train.py report."""
    out = runs["padded"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == REAL_VOCAB and "real_vocab_size" not in config
    assert (
        json.loads((out / "checkpoint-10" / "config.json").read_text())["vocab_size"] == REAL_VOCAB
    )
    data_args = DataArguments(validation_file=str(micro_files["validation"]), block_size=32)
    blocks, _ = prepare_lm_splits(load_raw_splits(data_args, 0, ("validation",)), tokenizer, 32)
    ids = torch.tensor(blocks["validation"]["input_ids"])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.vocab_size == REAL_VOCAB and not getattr(
        plain.generation_config, "suppress_tokens", None
    )
    with torch.no_grad():
        assert plain(ids[:1]).logits.shape[-1] == REAL_VOCAB
    report = evaluate_split(
        EvalArguments(model=str(out), split="validation", methods="blocks"),
        data_args,
        Accelerator(cpu=True),
    )
    assert perplexity(plain, ids) == pytest.approx(
        report["metrics"]["perplexity"]["value"], rel=1e-5
    )
    train_py = json.loads((out / "results.json").read_text())["validation"]["eval_perplexity"]
    assert report["metrics"]["perplexity"]["value"] == pytest.approx(train_py, rel=1e-5)


def test_padded_run_resumes(runs, micro_files, monkeypatch):
    out = runs["padded"]
    resumed_args = micro_args(
        micro_files, out, "--pad_vocab_multiple", 64, max_steps=STEPS, save_steps=10
    )
    original = losses(out)
    assert (
        train_in_process(
            [*resumed_args, "--resume_from_checkpoint", out / "checkpoint-10"], monkeypatch
        )
        == 0
    )
    resumed = losses(out)
    for step in range(11, STEPS + 1):
        assert resumed[step] == pytest.approx(original[step], rel=LOSS_RTOL), step


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--pad_vocab_multiple", "0"],
            "error: --pad_vocab_multiple must be a positive integer such as 64 or 128; got 0.",
        ),
        (
            ["--pad_vocab_multiple", "-64"],
            "error: --pad_vocab_multiple must be a positive integer such as 64 or 128; got -64.",
        ),
        (
            ["--pad_vocab_multiple", "64", "--model_name_or_path", "gpt2"],
            "error: --pad_vocab_multiple only applies to a model built from scratch",
        ),
    ],
)
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
        [str(REPO / "configs" / "gpu_fast.yaml"), "--bf16", "false", "--tf32", "false"],
    )  # no CUDA here
    assert model_args.pad_vocab_multiple == 64
    assert data_args.block_size == 1024 and args.per_device_train_batch_size == 16
    assert args.torch_compile and args.optim.value == "adamw_torch_fused"
    assert args.dataloader_num_workers == 2 and args.dataloader_pin_memory
    assert model_args.config_overrides == "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
