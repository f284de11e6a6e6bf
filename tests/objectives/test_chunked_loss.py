"""--chunked_loss_size (wikigpt/objectives/chunked_loss.py): the training loss from hidden states in
chunks equals the plain causal-LM loss, alone, with a padded vocabulary and with gradient
accumulation; evaluation is unchanged.

Tolerance: CPU at train.py's default precision (fp32; bf16 autocast on a CPU with native bf16),
per-step training loss and the final validation loss (log perplexity) within relative 1e-5 of the
plain run (measured: 1.8e-7 at most on an AVX2 CPU, 2.4e-6 on an AVX512-BF16 one; the chunked weight
gradient sums the chunks' matmuls in a different order).
"""

import json
import math

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.loss.loss_utils import ForCausalLMLoss

from wikigpt.objectives.chunked_loss import chunked_causal_lm_loss, use_chunked_loss
from wikigpt.errors import UsageError
from wikigpt.padded_vocab import pad_vocab

LOSS_RTOL = 1e-5
STEPS = 20
CHUNK = "24"  # micro batches are 2 x 32 = 64 tokens: chunks of 24, 24 and 16

RUNS = {
    "plain": [],
    "chunked": ["--chunked_loss_size", CHUNK],
    "padded_chunked": ["--pad_vocab_multiple", "64", "--chunked_loss_size", CHUNK],
    "accumulated": ["--gradient_accumulation_steps", "2"],
    "accumulated_chunked": ["--gradient_accumulation_steps", "2", "--chunked_loss_size", CHUNK],
}


def losses(out) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def eval_perplexity(out) -> float:
    return json.loads((out / "results.json").read_text())["validation"]["eval_perplexity"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_files):
    """The same 20-step micro run (same seed) with and without the chunked loss. The padded run is
    compared with the plain one: padding alone gives the plain losses
    (tests/train/test_throughput_levers.py), so both levers must too."""
    monkeypatch = pytest.MonkeyPatch()
    out = {}
    try:
        for name, extra in RUNS.items():
            out[name] = tmp_path_factory.mktemp(name)
            argv = micro_args(micro_files, out[name], *extra, max_steps=STEPS, save_steps=STEPS)
            assert train_in_process(argv, monkeypatch) == 0
    finally:
        monkeypatch.undo()
    return out


@pytest.mark.parametrize(
    "reference, chunked",
    [("plain", "chunked"), ("plain", "padded_chunked"), ("accumulated", "accumulated_chunked")],
)
def test_chunked_loss_trains_with_the_same_losses(runs, reference, chunked):
    expected, got = losses(runs[reference]), losses(runs[chunked])
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step
    # compared as losses: a perplexity's relative error is the loss's absolute one
    assert math.log(eval_perplexity(runs[chunked])) == pytest.approx(
        math.log(eval_perplexity(runs[reference])), rel=LOSS_RTOL
    )


def test_checkpoint_is_a_plain_gpt2(runs):
    config = json.loads((runs["chunked"] / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and "chunked_loss_size" not in config
    model = AutoModelForCausalLM.from_pretrained(runs["chunked"])
    assert type(model) is GPT2LMHeadModel and "forward" not in vars(model)


@pytest.mark.parametrize("padded_rows", [0, 14])
@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(37)])
def test_loss_and_gradients_equal_for_causal_lm_loss(padded_rows, num_items_in_batch):
    torch.manual_seed(0)
    vocab = 50
    hidden = torch.randn(3, 17, 8, requires_grad=True)
    weight = torch.randn(vocab + padded_rows, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 17))
    labels[0, :5] = labels[2, -3:] = -100
    expected = ForCausalLMLoss(
        (hidden @ weight.T)[..., :vocab],
        labels,
        vocab_size=vocab,
        num_items_in_batch=num_items_in_batch,
    )
    got = chunked_causal_lm_loss(
        hidden, weight, labels, 7, vocab, num_items_in_batch=num_items_in_batch
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(3 * expected, (hidden, weight)),
        torch.autograd.grad(3 * got, (hidden, weight)),
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_training_forward_has_no_logits_and_eval_is_unchanged():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        n_positions=32,
        vocab_size=100,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # train and eval forwards alike
    model = pad_vocab(GPT2LMHeadModel(config), 64)
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        expected = model.eval()(ids, labels=ids)
        use_chunked_loss(model, 16)
        got = model(ids, labels=ids)
    assert (
        torch.equal(got.logits, expected.logits)
        and got.logits.shape[-1] == 100
        and got.loss == expected.loss
    )
    trained = model.train()(ids, labels=ids)
    assert trained.logits is None and trained.loss.item() == pytest.approx(
        expected.loss.item(), rel=1e-6
    )
    trained.loss.backward()
    assert (
        model.lm_head.weight.grad.shape[0] == 100
    )  # the padding exists only inside the head's matmul


def test_bf16_autocast_matches_the_plain_path_to_bf16_rounding():
    """Under bf16 autocast (CPU here, as on a GPU run with --bf16) both paths round matmuls to bf16
    (8 bits of mantissa, ~0.4%): the loss agrees to 1e-4 and the gradients to 2% relative (measured
    0.3% and 0.6%)."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=1000,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    plain = pad_vocab(GPT2LMHeadModel(config), 64)
    chunked = use_chunked_loss(pad_vocab(GPT2LMHeadModel(config), 64), 50)
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 1000, (4, 64))
    labels = ids.clone()
    labels[0, :10] = -100
    results = []
    for model in (plain, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.train()(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append(
            (
                loss.item(),
                model.transformer.wte.weight.grad,
                model.transformer.h[0].attn.c_attn.weight.grad,
            )
        )
    (plain_loss, *plain_grads), (chunked_loss, *chunked_grads) = results
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-4)
    for a, b in zip(plain_grads, chunked_grads):
        assert ((a - b).norm() / a.norm()).item() < 2e-2


@pytest.mark.parametrize("value", ["0", "-4096"])
def test_bad_chunked_loss_size(value, tmp_path, micro_files, monkeypatch, capsys):
    argv = micro_args(micro_files, tmp_path / "out", "--chunked_loss_size", value)
    assert train_in_process(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --chunked_loss_size must be a positive number of tokens such as 4096; got "
        f"{value}. Pass e.g. --chunked_loss_size 4096, or leave it out to compute the loss over "
        "the whole batch at once"
    ), err
    assert not (tmp_path / "out").exists()


def test_other_architectures_are_refused():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        UsageError,
        match=r"^--chunked_loss_size supports GPT-2 models \(GPT2LMHeadModel\); this "
        r"model is LlamaForCausalLM: drop --chunked_loss_size$",
    ):
        use_chunked_loss(model, 4096)
