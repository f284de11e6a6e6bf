"""wikigpt/model.py: presets, typed config overrides, checkpoint loading, truthful model source."""

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.activations import ACT2FN

from wikigpt.errors import UsageError
from wikigpt.model import (
    ModelArguments,
    build_config,
    context_length,
    describe_source,
    load_model,
    non_embedding_parameters,
    parse_config_overrides,
)

# Parameter counts of the released GPT-2 models (tied embeddings), vocab 50257, context 1024.
RELEASED_SIZES = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("preset, expected", RELEASED_SIZES.items())
def test_presets_match_released_gpt2_sizes(preset, expected):
    config = build_config(preset, None, 50257, 50256)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    assert model.num_parameters() == expected


def test_tiny_preset_is_cpu_sized():
    config = build_config("tiny", None, 50257, 50256)
    model = GPT2LMHeadModel(config)
    assert non_embedding_parameters(model) <= 1_000_000
    assert context_length(config) == config.n_positions == 256


def test_overrides_are_typed_and_applied():
    assert parse_config_overrides(
        "n_layer=6, n_embd=384,resid_pdrop=0,activation_function=gelu"
    ) == {"n_layer": 6, "n_embd": 384, "resid_pdrop": 0.0, "activation_function": "gelu"}
    config = build_config("tiny", "n_layer=3,resid_pdrop=0.2,scale_attn_weights=False", 100, 99)
    assert (config.n_layer, config.resid_pdrop, config.scale_attn_weights, config.vocab_size) == (
        3,
        0.2,
        False,
        100,
    )


def test_from_scratch_gelu_is_gpt2s_through_the_fused_kernel():
    assert build_config("tiny", None, 100, 99).activation_function == "gelu_pytorch_tanh"
    assert (
        build_config("tiny", "activation_function=gelu_new", 100, 99).activation_function
        == "gelu_new"
    )
    x = torch.linspace(-8, 8, 10_001, dtype=torch.float64, requires_grad=True)
    fused, python = (
        ACT2FN["gelu_pytorch_tanh"],
        ACT2FN["gelu_new"],
    )  # gelu_new: the released GPT-2 checkpoints'
    (fused_grad,), (python_grad,) = (torch.autograd.grad(f(x).sum(), x) for f in (fused, python))
    assert torch.allclose(fused(x), python(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(fused_grad, python_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("n_layr=2", r"--config_overrides key 'n_layr' is not a GPT2Config field"),
        ("n_layer=2.5", r"--config_overrides n_layer=2.5 has the wrong type: n_layer takes int"),
        (
            "resid_pdrop=high",
            r"--config_overrides resid_pdrop='high' has the wrong type: resid_pdrop takes float",
        ),
        ("scale_attn_weights=1", r"scale_attn_weights takes bool"),
        ("n_layer", r"--config_overrides item 'n_layer' is not key=value"),
        ("vocab_size=10", r"--config_overrides key 'vocab_size' is not a GPT2Config field"),
    ],
)
def test_bad_overrides(text, message):
    with pytest.raises(UsageError, match=message):
        parse_config_overrides(text)


def test_unknown_preset_and_indivisible_heads():
    with pytest.raises(UsageError, match=r"--preset 'gpt3' is unknown; choose one of tiny, gpt2"):
        build_config("gpt3", None, 100, 99)
    with pytest.raises(UsageError, match=r"n_embd \(64\) must be divisible by n_head \(3\)"):
        build_config("tiny", "n_head=3", 100, 99)


def test_from_scratch_source_never_claims_gpt2_weights(tokenizer):
    model, source = load_model(ModelArguments(preset="tiny"), tokenizer)
    assert source["kind"] == "from_scratch" and "base_model" not in source
    assert "from scratch" in describe_source(source) and "fine-tuned" not in describe_source(source)
    assert (
        model.config.vocab_size == len(tokenizer)
        and model.config.eos_token_id == tokenizer.eos_token_id
    )


def test_load_checkpoint(tiny_checkpoint, tokenizer):
    model, source = load_model(ModelArguments(model_name_or_path=str(tiny_checkpoint)), tokenizer)
    assert source == {**source, "kind": "pretrained", "base_model": str(tiny_checkpoint)}
    assert (
        model.config.n_embd == 32
        and describe_source(source) == f"fine-tuned from {tiny_checkpoint}"
    )


def test_attn_implementation_switches_the_kernel_and_keeps_the_loss(tiny_checkpoint, tokenizer):
    scratch, _ = load_model(ModelArguments(preset="tiny", attn_implementation="eager"), tokenizer)
    eager, _ = load_model(
        ModelArguments(model_name_or_path=str(tiny_checkpoint), attn_implementation="eager"),
        tokenizer,
    )
    sdpa, _ = load_model(ModelArguments(model_name_or_path=str(tiny_checkpoint)), tokenizer)
    assert [m.config._attn_implementation for m in (scratch, eager, sdpa)] == [
        "eager",
        "eager",
        "sdpa",
    ]
    batch = torch.randint(0, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))
    eager_loss, sdpa_loss = (m.eval()(batch, labels=batch).loss for m in (eager, sdpa))
    assert torch.allclose(eager_loss, sdpa_loss, rtol=1e-5) and eager_loss > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            dict(preset="tiny", attn_implementation="fast"),
            r"--attn_implementation 'fast' cannot be used: .* Pass eager or sdpa, or drop the flag",
        ),
        (
            dict(model_name_or_path="x", config_overrides="n_layer=2"),
            r"--config_overrides only applies to a model built from scratch",
        ),
        (dict(model_name_or_path="x", preset="tiny"), r"pass only one of them"),
        (
            dict(model_name_or_path="/definitely/not/here"),
            r"--model_name_or_path '/definitely/not/here' does not exist; pass a checkpoint folder",
        ),
    ],
)
def test_bad_model_arguments(args, message, tokenizer):
    with pytest.raises(UsageError, match=message):
        load_model(ModelArguments(**args), tokenizer)
