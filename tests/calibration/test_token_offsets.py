"""--calibrate_token_offsets (wikigpt/calibration/token_offsets.py): tokens are grouped by training
count, the fitted scales and offsets minimise held-out NLL, folding them into ln_f's bias and an
untied LM head shifts each logit by its offset (and survives a save), a fold that would not be exact
leaves the model alone, and train.py saves and evaluates the result."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from wikigpt.calibration.temperature import check_calibration_model
from wikigpt.errors import UsageError
from wikigpt.calibration.token_offsets import (
    calibrate_token_offsets,
    count_groups,
    fit_class_calibration,
    fold_errors,
    fold_offsets,
    newton_terms,
    offset_fold,
    rank_feature,
)


def test_tokens_are_grouped_by_training_count():
    counts = np.array([0, 1, 2, 3, 4, 5, 9, 10, 29, 30, 99, 100, 999, 1000, 50_000])
    assert count_groups(counts).tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]


def test_rank_feature_is_log_one_plus_id_centred():
    expected = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(rank_feature(4), expected - expected.mean())


def drawn_with(
    true_scales, true_offsets, true_slopes=None, n: int = 30_000, width: int = 6, seed: int = 0
):
    """Hidden states, an output matrix, groups of its 40 tokens, and targets drawn from the softmax
    of s_g z_t + o_g + a_g r_t."""
    g = torch.Generator().manual_seed(seed)
    vocab = 40
    hidden, weight = torch.randn(n, width, generator=g), torch.randn(vocab, width, generator=g)
    groups = torch.arange(vocab) % len(true_offsets)
    slopes = (
        torch.zeros(len(true_offsets))
        if true_slopes is None
        else torch.as_tensor(true_slopes).float()
    )
    logits = (
        hidden @ weight.T * torch.as_tensor(true_scales).float()[groups]
        + torch.as_tensor(true_offsets).float()[groups]
        + slopes[groups] * rank_feature(vocab)
    )
    return (
        hidden,
        torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0],
        weight,
        groups,
    )


def nll_of(hidden, targets, weight, groups, scales, offsets, slopes):
    token_offsets = offsets.float()[groups] + slopes.float()[groups] * rank_feature(len(groups))
    return newton_terms(hidden, targets, weight, scales.float()[groups], token_offsets)[0]


def fit(hidden, targets, weight, groups, n_groups, **kwargs):
    return fit_class_calibration(
        hidden, targets, weight, groups, n_groups, rank_feature(len(groups)), **kwargs
    )


def test_fit_recovers_the_scales_offsets_and_slopes_the_targets_were_drawn_with():
    true_scales = torch.tensor([0.6, 1.0, 1.3, 0.9], dtype=torch.float64)
    true_offsets = torch.tensor([-1.0, 0.0, 0.7, 1.5], dtype=torch.float64)
    true_slopes = torch.tensor([0.5, 0.0, -0.8, 0.3], dtype=torch.float64)
    hidden, targets, weight, groups = drawn_with(true_scales, true_offsets, true_slopes, n=120_000)
    scales, offsets, slopes = fit(hidden, targets, weight, groups, 4, l2=1e-7)
    torch.testing.assert_close(scales, true_scales, atol=0.05, rtol=0)
    # a constant added to every offset leaves the softmax unchanged: compare them relative to their
    # mean
    torch.testing.assert_close(
        offsets - offsets.mean(), true_offsets - true_offsets.mean(), atol=0.06, rtol=0
    )
    torch.testing.assert_close(slopes, true_slopes, atol=0.08, rtol=0)


def test_newton_terms_are_the_nll_gradient_and_hessian():
    hidden, targets, weight, groups = drawn_with(
        [1.0, 0.8, 1.2], [0.5, -0.5, 0.0], [0.3, 0.0, -0.4], n=500, seed=2
    )
    theta = torch.tensor(
        [0.9, 1.1, 0.7, 0.3, -0.2, 0.1, 0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True
    )
    ranks = rank_feature(40).double()

    def nll(t):  # the same NLL, for autograd
        logits = (
            hidden.double() @ weight.double().T * t[:3][groups]
            + t[3:6][groups]
            + t[6:][groups] * ranks
        )
        return torch.nn.functional.cross_entropy(logits, targets)

    t = theta.detach()
    value, grad, hess = newton_terms(
        hidden.double(),
        targets,
        weight.double(),
        t[:3][groups],
        t[3:6][groups] + t[6:][groups] * ranks,
        groups,
        3,
        ranks,
        chunk=128,
    )
    assert value == pytest.approx(float(nll(t)), rel=1e-9)
    torch.testing.assert_close(grad, torch.autograd.grad(nll(theta), theta)[0])
    torch.testing.assert_close(hess, torch.autograd.functional.hessian(nll, t))


def test_fitted_scales_offsets_and_slopes_are_the_held_out_minimum():
    hidden, targets, weight, groups = drawn_with(
        [1.2, 0.8, 1.0], [0.5, -0.5, 0.0], [0.0, 0.6, -0.3], seed=1
    )
    fitted = fit(hidden, targets, weight, groups, 3, l2=1e-9)
    nll = nll_of(hidden, targets, weight, groups, *fitted)
    assert (
        nll
        < nll_of(hidden, targets, weight, groups, torch.ones(3), torch.zeros(3), torch.zeros(3))
        - 0.01
    )
    for params in fitted:
        for group in range(3):
            for step in (-0.05, 0.05):
                params[group] += step
                assert nll_of(hidden, targets, weight, groups, *fitted) > nll
                params[group] -= step


def test_a_group_without_tokens_keeps_scale_one_offset_and_slope_zero():
    hidden, targets, weight, groups = drawn_with([1.0, 0.7], [0.3, -0.3], [0.5, -0.5])
    groups = groups * 2  # groups 0 and 2 hold tokens, group 1 none
    scales, offsets, slopes = fit(hidden, targets, weight, groups, 3)
    assert (
        (scales[1], offsets[1], slopes[1]) == (1, 0, 0)
        and offsets[0] != 0
        and scales[2] != 1
        and slopes[2] != 0
    )


def tiny_gpt2(seed: int = 0, bias: bool = True):
    torch.manual_seed(seed)
    # rows and a final LayerNorm of a trained model's size (GPT-2's initial rows are 50x smaller)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, initializer_range=1.0
        )
    ).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        if bias:
            model.transformer.ln_f.bias.normal_()
    return model


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_folding_shifts_every_logit_by_its_token_offset_and_survives_save(tmp_path, shift):
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 12))
    token_offsets = torch.randn(64)
    bias = model.transformer.ln_f.bias.detach().clone()
    with torch.no_grad():
        before = model(ids).logits
        fold_offsets(model, *offset_fold(model, model.lm_head.weight, token_offsets, shift))
        after = model(ids).logits
    torch.testing.assert_close(after, before + token_offsets, rtol=0, atol=1e-4)
    assert model.lm_head.weight is not model.transformer.wte.weight
    # the bias gains shift * gamma, signed like C = sum(beta / gamma) so that C moves away from 0
    gamma = model.transformer.ln_f.weight.detach()
    sign = 1 if float(bias @ (1 / gamma)) >= 0 else -1
    torch.testing.assert_close(model.transformer.ln_f.bias.detach(), bias + sign * shift * gamma)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()(ids).logits
    torch.testing.assert_close(reloaded, after, rtol=0, atol=0)


def held_out_blocks(n: int = 12, length: int = 16):
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(
                0, 64, (n, length), generator=torch.Generator().manual_seed(3)
            ).tolist()
        }
    )


def test_calibration_lowers_held_out_nll_and_is_folded():
    model = tiny_gpt2()
    counts = np.arange(64) * 40  # every COUNT_EDGES group holds tokens
    blocks = held_out_blocks()
    summary = calibrate_token_offsets(model, blocks, batch_size=4, counts=counts)
    assert "skipped" not in summary and summary["tokens"] == 12 * 15
    assert summary["validation_perplexity_after"] < summary["validation_perplexity_before"]
    assert summary["group_tokens"] == count_groups(counts).bincount(minlength=9).tolist()
    ids = torch.as_tensor(blocks["input_ids"])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            model(ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)
        )
    assert float(nll.exp()) == pytest.approx(summary["validation_perplexity_after"], rel=1e-4)


def test_a_final_layernorm_without_bias_carries_offsets_after_a_shift():
    model = tiny_gpt2(
        bias=False
    )  # beta = 0: h . (1 / gamma) = 0 for every input, until the bias is shifted
    blocks = held_out_blocks()
    ids = torch.as_tensor(blocks["input_ids"])
    with torch.no_grad():
        before = model(ids).logits
    summary = calibrate_token_offsets(model, blocks, batch_size=4, counts=np.arange(64) * 40)
    assert (
        "skipped" not in summary
        and summary["ln_f_bias_shift"] > 0
        and summary["bfloat16_error_ratio"] < 2
    )
    groups = count_groups(np.arange(64) * 40)
    token_scales = torch.tensor(summary["scales"])[groups]
    token_offsets = torch.tensor(summary["offsets"])[groups] + torch.tensor(summary["rank_slopes"])[
        groups
    ] * rank_feature(64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, before * token_scales + token_offsets, rtol=0, atol=1e-4
        )


def test_a_fold_that_would_not_be_exact_leaves_the_model_alone(monkeypatch):
    monkeypatch.setattr(
        "wikigpt.calibration.token_offsets.SHIFTS", (0.0,)
    )  # no shift: C = 0 cannot carry an offset
    model = tiny_gpt2(bias=False)
    head, bias = model.lm_head.weight.detach().clone(), model.transformer.ln_f.bias.detach().clone()
    summary = calibrate_token_offsets(
        model, held_out_blocks(), batch_size=4, counts=np.arange(64) * 40
    )
    assert summary["skipped"] == "fold error inf nats > 0.001"
    assert (
        torch.equal(model.lm_head.weight, head)
        and model.lm_head.weight is model.transformer.wte.weight
    )
    assert (
        torch.equal(model.transformer.ln_f.bias, bias) and model.config.tie_word_embeddings is True
    )


def test_fold_errors_measure_the_float32_and_bfloat16_logit_errors():
    model = tiny_gpt2()
    hidden = model.transformer.ln_f(torch.randn(8, 16)).detach()
    weight, bias = model.lm_head.weight.detach(), model.transformer.ln_f.bias.detach()
    token_scales, token_offsets = torch.ones(64), torch.full((64,), 0.5)
    no_shift = torch.zeros(16)
    # no fold: off by the offsets
    error, bf16_ratio = fold_errors(hidden, weight, no_shift, weight, token_scales, token_offsets)
    assert error == pytest.approx(0.5) and bf16_ratio == pytest.approx(1.0)
    new_bias, new_weight = offset_fold(model, weight, token_offsets, 0.0)
    error, bf16_ratio = fold_errors(
        hidden, weight, new_bias - bias, new_weight, token_scales, token_offsets
    )
    assert error < 1e-5 and 0.5 < bf16_ratio < 2
    # the scales are in the logits it checks against: an unscaled head is off by (s - 1) * z
    error, _ = fold_errors(
        hidden, weight, new_bias - bias, new_weight, token_scales * 2, token_offsets
    )
    assert error == pytest.approx(float((hidden[:256] @ weight.T).abs().max()), rel=1e-4)
    # a 1e-3 times smaller C (beta scaled down): unshifted, the same offsets need 1e3 times larger
    # head rows; a bias shifted by gamma makes C large again
    with torch.no_grad():
        model.transformer.ln_f.bias.mul_(1e-3)
    hidden, bias = (
        model.transformer.ln_f(torch.randn(8, 16)).detach(),
        model.transformer.ln_f.bias.detach(),
    )
    new_bias, new_weight = offset_fold(model, weight, token_offsets, 0.0)
    assert (
        fold_errors(hidden, weight, new_bias - bias, new_weight, token_scales, token_offsets)[1]
        > 10
    )
    new_bias, new_weight = offset_fold(model, weight, token_offsets, 1.0)
    error, bf16_ratio = fold_errors(
        hidden, weight, new_bias - bias, new_weight, token_scales, token_offsets
    )
    assert error < 1e-5 and bf16_ratio < 2


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
        match=r"--calibrate_token_offsets folds its scales and offsets into GPT-2's final "
        r"LayerNorm \(transformer.ln_f\), which LlamaForCausalLM does not have; "
        r"drop --calibrate_token_offsets",
    ):
        check_calibration_model(model, "--calibrate_token_offsets")


@pytest.fixture(scope="module")
def trained_size_checkpoint(tmp_path_factory, tokenizer):
    """A micro GPT-2 whose LM head rows and final LayerNorm have a trained model's sizes (a
    from-scratch model after a few steps still has GPT-2's tiny initial rows: offsets of a nat would
    dominate its logits' rounding error)."""
    d = tmp_path_factory.mktemp("trained-size")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_head=2,
            n_embd=16,
            n_positions=64,
            vocab_size=len(tokenizer),
            initializer_range=1.0,
        )
    )
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(1.0, 0.5)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def offset_run_args(micro_files, out, *extra):
    args = micro_args(
        micro_files,
        out,
        "--calibrate_temperature",
        "true",
        "--calibrate_token_offsets",
        "true",
        *extra,
        max_steps=10,
        save_steps=10,
    )
    return [
        a
        for i, a in enumerate(args)
        if a not in ("--preset", "tiny") and "--config_overrides" not in args[i - 1 : i + 1]
    ]


def test_train_saves_and_evaluates_the_offset_model(
    tmp_path, micro_files, monkeypatch, trained_size_checkpoint
):
    out = tmp_path / "run"
    assert (
        train_in_process(
            offset_run_args(
                micro_files,
                out,
                "--model_name_or_path",
                trained_size_checkpoint,
            ),
            monkeypatch,
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    offsets = results["token_offsets"]
    assert "skipped" not in offsets and len(offsets["offsets"]) == len(offsets["rank_slopes"]) == 9
    assert offsets["bfloat16_error_ratio"] < 2
    assert offsets["validation_perplexity_after"] < offsets["validation_perplexity_before"]
    # the temperature is fitted first, the offsets on the calibrated model
    assert offsets["validation_perplexity_before"] == pytest.approx(
        results["calibration"]["validation_perplexity_after"], rel=1e-4
    )
    # the final validation evaluation (the Trainer's, in bf16 autocast on a CPU with native bf16)
    # scores it
    assert results["validation"]["eval_perplexity"] == pytest.approx(
        offsets["validation_perplexity_after"], rel=3e-3
    )
    trained, saved = (
        load_file(out / "checkpoint-10" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert (
        "lm_head.weight" in saved and "lm_head.weight" not in trained
    )  # untied: the head is saved on its own
    # the saved model's true size, head included, in results.json and config.json (not as built)
    assert results["model"]["parameters"] == sum(t.numel() for t in saved.values())
    assert results["model"]["parameters"] > sum(t.numel() for t in trained.values())
    config = json.loads((out / "config.json").read_text())
    assert config["wikigpt"]["parameters"] == results["model"]["parameters"]
    torch.testing.assert_close(
        saved["transformer.wte.weight"], trained["transformer.wte.weight"], rtol=0, atol=0
    )
    card = (out / "README.md").read_text()
    assert (
        f"- logit scales {offsets['scales']}, offsets {offsets['offsets']} and slopes "
        f"{offsets['rank_slopes']} on log(1 + token id) for tokens seen "
        f"[0, 1, 2, 3, 5, 10, 30, 100, 1000] or more times "
        "in the training text, fitted on the held-out split after training (held-out perplexity "
        f"{offsets['validation_perplexity_before']:,.2f} -> "
        f"{offsets['validation_perplexity_after']:,.2f}): folded into the final LayerNorm and the "
        "LM head, which is untied from the input embeddings"
    ) in card


def test_train_skips_offsets_a_fresh_model_cannot_carry(tmp_path, micro_files, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(
        micro_files,
        out,
        "--calibrate_temperature",
        "true",
        "--calibrate_token_offsets",
        "true",
        max_steps=10,
        save_steps=10,
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    offsets = results["token_offsets"]
    assert offsets["skipped"].startswith("bfloat16 logit error ") and offsets["skipped"].endswith(
        "x the plain model's > 2.0x"
    )
    # saved as calibrated by the temperature alone, with its head still tied
    assert results["validation"]["eval_perplexity"] == pytest.approx(
        results["calibration"]["validation_perplexity_after"], rel=1e-4
    )
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "): skipped (bfloat16 logit error " in (out / "README.md").read_text()


def test_calibration_cv_script_scores_each_variant_out_of_sample(
    tmp_path, micro_files, trained_size_checkpoint
):
    """scripts/calibration_cv.py: every variant fitted on one half of the held-out articles and
    scored on the other; the uncalibrated model scores the same in and out of sample."""
    from conftest import TOKENIZER_DIR, run_script

    out = tmp_path / "cv.json"
    proc = run_script(
        "scripts/calibration_cv.py",
        "--checkpoint",
        trained_size_checkpoint,
        "--tokenizer_name",
        TOKENIZER_DIR,
        "--train_file",
        micro_files["train"],
        "--validation_split_percentage",
        40,
        "--block_size",
        32,
        "--variants",
        "none,temperature",  # the token offsets' fit is tested above; here the folds
        "--output_json",
        out,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["held_out_articles"]["a"] >= 1 and report["held_out_articles"]["b"] >= 1
    variants = report["variants"]
    assert list(variants) == ["none", "temperature"]
    none = variants["none"]
    assert none["in_sample_perplexity"] == none["out_of_sample_perplexity"]  # the same two halves
    # a fit lowers the perplexity of the text it was fitted on
    assert variants["temperature"]["in_sample_perplexity"] < none["in_sample_perplexity"]
