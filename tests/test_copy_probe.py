"""benchmarks/copy_probe.py: both readings are scored on the same targets, the JSON says what was
measured, and bad sizes get one error line before anything is written."""

import importlib.util
import json

import torch
from conftest import REPO, WT2, run_script
from transformers import GPT2LMHeadModel

spec = importlib.util.spec_from_file_location("copy_probe", REPO / "benchmarks" / "copy_probe.py")
copy_probe_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(copy_probe_module)


def test_a_model_that_reads_only_the_current_token_gains_nothing(tiny_checkpoint):
    # Attention writes nothing and every position reads the same (zero) row: each prediction depends
    # on the current token alone, so both readings, scored on the same targets after the same
    # tokens, cost the same.
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
    ids = torch.randint(0, 5000, (3, 20), generator=torch.Generator().manual_seed(0))
    result = copy_probe_module.copy_probe(model, ids)
    assert abs(result["copy_gain_nats"]) < 1e-4
    # and the first reading is the model's loss on the spans alone: the second does not leak back
    first = model(ids, labels=ids).loss.item()
    assert abs(result["nll_first_reading"] - first) < 1e-4


def test_heads_that_attend_evenly_score_one_over_the_position(tiny_checkpoint):
    # Zero queries and keys: every head spreads its attention evenly, 1/(q + 1) on each key of query
    # q, so the induction score is the mean of 1/(q + 1) over the second reading and the
    # previous-token score over all.
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    n_embd = model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * n_embd] = 0
            block.attn.c_attn.bias[: 2 * n_embd] = 0
    span = 10
    result = copy_probe_module.copy_probe(model, torch.randint(0, 5000, (2, span)))
    induction = sum(1 / (q + 1) for q in range(span, 2 * span)) / span
    previous = sum(1 / (q + 1) for q in range(1, 2 * span)) / (2 * span - 1)
    assert result["induction_score_by_layer"] == [round(induction, 4)] * model.config.n_layer
    assert result["previous_token_score_by_layer"] == [round(previous, 4)] * model.config.n_layer


def head_looking_back(checkpoint, span: int, target) -> GPT2LMHeadModel:
    """The checkpoint with layer 0, head 0 attending from each position q to position target(q):
    positions are one-hot rows (tokens read zero), the key is the position, the query a large weight
    on target(q)'s."""
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    n_embd, head = model.config.n_embd, model.config.n_embd // model.config.n_head
    assert 2 * span <= head
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[: 2 * span, : 2 * span] = torch.eye(2 * span)
        model.transformer.h[0].ln_1.weight.fill_(1)
        model.transformer.h[0].ln_1.bias.zero_()
        for columns in (slice(0, head), slice(n_embd, n_embd + head)):  # head 0's query and key
            attn.c_attn.weight[:, columns] = 0
            attn.c_attn.bias[columns] = 0
        for q in range(2 * span):
            attn.c_attn.weight[q, target(q)] = 50.0
            attn.c_attn.weight[q, n_embd + q] = 1.0
    return model


def test_a_previous_token_head_scores_one_and_copies_nothing(tiny_checkpoint):
    span = 6
    model = head_looking_back(tiny_checkpoint, span, lambda q: max(q - 1, 0))
    result = copy_probe_module.copy_probe(model, torch.randint(0, 5000, (2, span)))
    assert result["previous_token_score_by_layer"][0] > 0.99
    assert (
        result["induction_score_by_layer"][0] < 0.2
    )  # layer 0's other head, attending about evenly: 0.11


def test_an_induction_head_scores_one(tiny_checkpoint):
    # on [A A], the token after a token's first occurrence is span - 1 positions back
    span = 6
    model = head_looking_back(tiny_checkpoint, span, lambda q: q - span + 1 if q >= span else q)
    result = copy_probe_module.copy_probe(model, torch.randint(0, 5000, (2, span)))
    assert result["induction_score_by_layer"][0] > 0.99
    assert (
        result["previous_token_score_by_layer"][0] < 0.3
    )  # the other head, attending about evenly: 0.19


def test_script_writes_the_json(tmp_path, tiny_checkpoint):
    out = tmp_path / "probe.json"
    proc = run_script(
        "benchmarks/copy_probe.py",
        "--model",
        tiny_checkpoint,
        "--span",
        30,
        "--samples",
        4,
        "--stride",
        200,
        "--output_json",
        out,
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["span"], report["samples"], report["stride"]) == (30, 4, 200)
    assert report["test_file"] == str(WT2 / "wiki.test.raw")
    # a random tiny model is near uniform over the 50,257 tokens (ln 50257 = 10.8) on both readings
    assert 10 < report["nll_first_reading"] < 11.5 and 10 < report["nll_second_reading"] < 11.5
    assert f"copying gains {report['copy_gain_nats']:.3f} nats" in proc.stdout
    assert (
        len(report["induction_score_by_layer"]) == len(report["previous_token_score_by_layer"]) == 2
    )  # 2 layers
    assert f"induction score {report['induction_score_by_layer']}" in proc.stdout


def test_span_longer_than_half_the_context_is_one_error_line(tmp_path, tiny_checkpoint):
    out = tmp_path / "probe.json"
    proc = run_script(
        "benchmarks/copy_probe.py", "--model", tiny_checkpoint, "--span", 100, "--output_json", out
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [
        "error: --span 100: a sample is 2 x span = 200 tokens, more than the model's context of "
        "128; pass --span 64 or less"
    ]
    assert not out.exists()
