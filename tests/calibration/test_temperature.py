"""--calibrate_temperature (wikigpt/calibration/temperature.py): the fitted temperature minimises
held-out NLL, folding it into ln_f divides the logits by it, and train.py saves and evaluates the
calibrated model."""

import json
import math

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from wikigpt.calibration.temperature import (
    apply_temperature,
    check_calibration_model,
    fit_temperature,
    nll_and_derivatives,
)
from wikigpt.errors import UsageError


def sampled_logit_inputs(
    temperature: float, n: int = 20_000, vocab: int = 40, width: int = 6, seed: int = 0
):
    """Hidden states, an output matrix, and targets drawn from softmax(hidden @ weight.T /
    temperature)."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, width, generator=g), torch.randn(vocab, width, generator=g)
    probs = torch.softmax(hidden @ weight.T / temperature, dim=-1)
    return hidden, torch.multinomial(probs, 1, generator=g)[:, 0], weight


@pytest.mark.parametrize("true_temperature", [0.3, 0.6, 1.0, 1.7, 3.5])
def test_fit_recovers_the_temperature_the_targets_were_drawn_at(true_temperature):
    hidden, targets, weight = sampled_logit_inputs(true_temperature)
    temperature, nll_at_1, nll = fit_temperature(hidden, targets, weight)
    assert temperature == pytest.approx(true_temperature, rel=0.04)
    assert nll <= nll_at_1 + 1e-9


def test_fitted_temperature_is_the_held_out_minimum():
    hidden, targets, weight = sampled_logit_inputs(1.4, seed=1)
    temperature, _, nll = fit_temperature(hidden, targets, weight)
    for nearby in (0.97 * temperature, 1.03 * temperature):
        assert nll_and_derivatives(hidden, targets, weight, 1 / nearby)[0] > nll
    assert nll_and_derivatives(hidden, targets, weight, 1 / temperature)[1] == pytest.approx(
        0, abs=1e-6
    )


def test_folding_into_ln_f_divides_every_logit():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    ).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.normal_()  # a non-zero bias must be divided too
        ids = torch.randint(0, 64, (2, 12))
        before = model(ids).logits
        apply_temperature(model, 1.6)
        after = model(ids).logits
    torch.testing.assert_close(after, before / 1.6, rtol=1e-5, atol=1e-6)


def test_model_without_gpt2_final_layernorm_is_refused():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        UsageError,
        match=r"--calibrate_temperature folds the temperature into GPT-2's final "
        r"LayerNorm \(transformer.ln_f\), which LlamaForCausalLM does not have",
    ):
        check_calibration_model(model)


def test_train_saves_and_evaluates_the_calibrated_model(tmp_path, micro_files, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(
        micro_files, out, "--calibrate_temperature", "true", max_steps=10, save_steps=10
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    calibration = results["calibration"]
    temperature = calibration["temperature"]
    assert calibration["validation_perplexity_after"] <= calibration["validation_perplexity_before"]
    # the final validation evaluation (the Trainer's) scores the calibrated model: the fitted
    # perplexity
    assert results["validation"]["eval_perplexity"] == pytest.approx(
        calibration["validation_perplexity_after"], rel=1e-4
    )
    # the weights training ended with (checkpoint-10) and the saved model differ only in ln_f,
    # divided by T
    trained, saved = (
        load_file(out / "checkpoint-10" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    for name, value in saved.items():
        expected = (
            trained[name] / temperature if name.startswith("transformer.ln_f.") else trained[name]
        )
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    assert not math.isclose(temperature, 1.0, abs_tol=1e-3)  # else the check above could not tell
    card = (out / "README.md").read_text()
    assert (
        f"- softmax temperature {temperature:.4f}, fitted on the held-out split after training and "
        "folded into the final LayerNorm (held-out perplexity "
        f"{calibration['validation_perplexity_before']:,.2f} -> "
        f"{calibration['validation_perplexity_after']:,.2f})"
    ) in card
