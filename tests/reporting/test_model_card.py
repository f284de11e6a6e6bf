"""The model card parses with huggingface_hub.ModelCard; its model-index holds the perplexities;
base_model only when fine-tuned."""

import math

import pytest
from huggingface_hub import ModelCard
from runs import micro_files  # noqa: F401 - a fixture

from wikigpt.data.blocks import DataArguments
from wikigpt.reporting.model_card import (
    TOKEN_PPL_METHOD,
    dataset_info,
    split_dataset_info,
    write_model_card,
)


def results_for(kind: str) -> dict:
    model = (
        {"kind": "pretrained", "base_model": "gpt2"}
        if kind == "pretrained"
        else {"kind": "from_scratch", "preset": "gpt2", "config_overrides": None}
    )
    return {
        "wikigpt_version": "0.1.0",
        "model": {**model, "parameters": 124439808, "non_embedding_parameters": 85056000},
        "block_size": 1024,
        "data": {
            "train": {"rows": 36718, "tokens": 2391884, "blocks": 2335},
            "validation": {"rows": 3760, "tokens": 247289, "blocks": 241},
            "test": {"rows": 4358, "tokens": 283287, "blocks": 276},
        },
        "train": {
            "global_step": 500,
            "tokens_seen": 4096000,
            "wall_time_s": 321.5,
            "train_loss": 3.9,
        },
        "validation": {
            "eval_loss": 3.4,
            "eval_token_loss": 3.4,
            "eval_perplexity": math.exp(3.4),
            "eval_blocks": 241,
            "eval_tokens": 246543,
        },
        "test": {
            "test_loss": 3.35,
            "test_token_loss": 3.35,
            "test_perplexity": math.exp(3.35),
            "test_blocks": 276,
            "test_tokens": 282348,
        },
        "throughput": {"tokens_per_second": 512000.0, "mfu": 0.443},
        "dataset": {"id": "wikitext", "config": "wikitext-2-raw-v1", "source": "hub"},
        "architecture": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768},
        "hyperparameters": {"learning_rate": 0.0006, "global_batch_tokens": 8192, "seed": 42},
        "hardware": {"device": "NVIDIA H100 80GB HBM3", "processes": 1, "distributed": "NO"},
    }


EVAL_PY = {
    "model": "out/gpt2-wt2",
    "split": "test",
    "dataset": "wikitext/wikitext-2-raw-v1",
    "data": {"id": "wikitext", "config": "wikitext-2-raw-v1", "source": "hub"},
    "metrics": {
        "perplexity": {"value": 28.41, "method": "non-overlapping 1024-token blocks"},
        "sliding_window_perplexity": {"value": 25.12, "method": "stride 512, context 1024"},
        "word_perplexity": {"value": 71.3, "method": "token NLL summed, divided by 245,569 words"},
        "byte_perplexity": {"value": 1.86, "method": "per UTF-8 byte"},
        "bits_per_byte": {"value": 0.8951, "method": "log2 of byte perplexity"},
    },
    "counts": {"tokens": 283287, "words": 245569, "bytes": 1289021},
}


def metrics_by(card) -> dict:
    return {(r.dataset_split, r.metric_name): r for r in card.data.eval_results}


def test_from_scratch_card_parses_with_perplexities_and_no_base_model(tmp_path):
    path = write_model_card(tmp_path, results_for("from_scratch"), model_name="me/gpt2-wt2")
    assert path == str(tmp_path / "README.md")
    card = ModelCard.load(path)
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert card.data.model_name == "me/gpt2-wt2" and card.data.datasets == ["wikitext"]
    results = metrics_by(card)
    assert set(results) == {
        ("validation", "Perplexity (token-level)"),
        ("test", "Perplexity (token-level)"),
    }
    test = results[("test", "Perplexity (token-level)")]
    assert test.metric_type == "perplexity" and test.metric_value == round(math.exp(3.35), 4)
    assert test.dataset_type == "wikitext" and test.dataset_config == "wikitext-2-raw-v1"
    assert test.task_type == "text-generation"
    assert test.metric_args["method"] == TOKEN_PPL_METHOD.format(block_size=1024)
    assert test.metric_args["tokens"] == 282348
    assert results[("validation", "Perplexity (token-level)")].metric_value == round(
        math.exp(3.4), 4
    )
    body = card.text
    assert "trained from scratch" in body and "fine-tuned" not in body
    for fact in (
        "4,096,000",
        "321.50 s",
        "NVIDIA H100 80GB HBM3",
        "512,000 tokens/s",
        "MFU 44.3%",
        "| learning_rate | 0.0006 |",
        "## Intended use",
        "## Limitations",
        "2,391,884",
    ):
        assert fact in body, fact


def test_fine_tuned_card_names_its_base_model(tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, results_for("pretrained")))
    assert card.data.base_model == "gpt2"
    assert "fine-tuned from `gpt2`" in card.text
    assert card.data.model_name == tmp_path.name  # default name: the output folder's


def test_eval_py_results_add_word_perplexity_and_bits_per_byte(tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, results_for("from_scratch"), EVAL_PY))
    results = metrics_by(card)
    word = results[("test", "Word-level perplexity")]
    assert word.metric_type == "word_perplexity" and word.metric_value == 71.3
    assert word.metric_args["method"] == "token NLL summed, divided by 245,569 words"
    bpb = results[("test", "Bits per byte")]
    assert bpb.metric_type == "bits_per_byte" and bpb.metric_value == 0.8951
    assert results[("test", "Perplexity (token-level, sliding window)")].metric_value == 25.12
    # eval.py's test perplexity replaces train.py's for the same split; validation stays train.py's
    assert results[("test", "Perplexity (token-level)")].metric_value == 28.41
    assert results[("validation", "Perplexity (token-level)")].metric_value == round(
        math.exp(3.4), 4
    )
    assert len(card.data.eval_results) == 6


def test_a_test_time_mixture_is_not_put_on_the_card_as_the_models_result(tmp_path):
    mixed = {
        **EVAL_PY,
        "metrics": {
            **EVAL_PY["metrics"],
            "ngram_mixture_perplexity": {"value": 20.5, "method": "a test-time mixture"},
            "cache_mixture_perplexity": {"value": 19.5, "method": "a test-time mixture"},
            "ngram_cache_mixture_perplexity": {"value": 18.5, "method": "a test-time mixture"},
        },
    }
    card = ModelCard.load(write_model_card(tmp_path, results_for("from_scratch"), mixed))
    assert len(card.data.eval_results) == 6
    values = {r.metric_value for r in card.data.eval_results}
    for value in (20.5, 19.5, 18.5):
        assert value not in values and str(value) not in card.text


def test_local_files_are_named_as_wikitext_only_when_they_are_wikitext_raw_files(
    tmp_path, small_files
):
    wt2_dir = tmp_path / "wt2"
    wt2_dir.mkdir()
    for name in ("wiki.train.raw", "wiki.valid.raw"):
        (wt2_dir / name).write_text("text\n")
    assert dataset_info(DataArguments(dataset_dir=str(wt2_dir)))["id"] == "wikitext"
    info = dataset_info(DataArguments(train_file=str(small_files["train"])))
    assert info["id"] is None and info["files"] == {"train": "train.raw"}
    results = results_for("from_scratch")
    results["dataset"] = info
    card = ModelCard.load(write_model_card(tmp_path, results))
    assert card.data.datasets is None
    assert {r.dataset_type for r in card.data.eval_results} == {"custom"}


def test_eval_py_metrics_on_another_file_keep_their_own_label(tmp_path):
    """A model trained on WikiText, scored by eval.py on some other file: its numbers are labelled
    with that file, and train.py's WikiText test perplexity stays."""
    on_notes = {
        **EVAL_PY,
        "data": {
            "id": None,
            "config": None,
            "source": "local files",
            "files": {"test": "notes.txt"},
        },
    }
    card = ModelCard.load(write_model_card(tmp_path, results_for("from_scratch"), on_notes))
    by_data = {
        (r.dataset_type, r.dataset_name, r.metric_name): r.metric_value
        for r in card.data.eval_results
        if r.dataset_split == "test"
    }
    assert by_data[("custom", "local text files (notes.txt)", "Perplexity (token-level)")] == 28.41
    assert by_data[("custom", "local text files (notes.txt)", "Word-level perplexity")] == 71.3
    assert by_data[
        ("wikitext", "wikitext (wikitext-2-raw-v1)", "Perplexity (token-level)")
    ] == round(math.exp(3.35), 4)
    assert not any(t == "wikitext" and name != "Perplexity (token-level)" for t, _, name in by_data)


def test_eval_splits_are_wikitext_only_as_that_splits_wikitext_file(tmp_path):
    for name in ("wiki.test.raw", "wiki.valid.raw", "notes.raw"):
        (tmp_path / name).write_text("text\n")
    test_file = split_dataset_info(DataArguments(test_file=str(tmp_path / "wiki.test.raw")), "test")
    assert (test_file["id"], test_file["config"]) == ("wikitext", "wikitext-2-raw-v1")
    for name in (
        "wiki.valid.raw",
        "notes.raw",
    ):  # another split's file, or another file, passed as --test_file
        info = split_dataset_info(DataArguments(test_file=str(tmp_path / name)), "test")
        assert info["id"] is None and info["files"] == {"test": name}
    assert split_dataset_info(DataArguments(), "test")["id"] == "wikitext"  # the Hub dataset


@pytest.mark.parametrize("kind", ["from_scratch", "pretrained"])
def test_rewriting_the_card_replaces_it_whole(tmp_path, kind):
    (tmp_path / "README.md").write_text("old card\n")
    write_model_card(tmp_path, results_for(kind))
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n") and "old card" not in text
    assert not (tmp_path / "README.md.tmp").exists()


def test_precision_includes_what_accelerate_launch_set(monkeypatch):
    from wikigpt.reporting.model_card import precision
    from wikigpt.train.arguments import WikiTrainingArguments

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(
        "wikigpt.train.precision.cpu_has_native_bf16", lambda: False
    )  # else bf16 is the CPU default
    assert precision(WikiTrainingArguments(output_dir="unused")) == "fp32"
    monkeypatch.setenv(
        "ACCELERATE_MIXED_PRECISION", "bf16"
    )  # accelerate launch with mixed_precision: bf16
    assert precision(WikiTrainingArguments(output_dir="unused")) == "bf16 mixed"


def test_a_run_states_its_levers_in_results_config_and_card(tmp_path, micro_files, monkeypatch):
    import json

    from runs import micro_args, train_in_process  # noqa: I001

    out = tmp_path / "run"
    argv = micro_args(
        micro_files,
        out,
        "--rare_tokens_below",
        2,
        "--rare_token_groups",
        "spelling",
        "--optim_matrices",
        "muon",
        "--calibrate_temperature",
        "true",
        max_steps=2,
        save_steps=2,
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    levers = results["levers"]
    rare = levers["rare_tokens"]
    assert (rare["below"], rare["groups_by"], len(rare["groups"])) == (2, "spelling", 6)
    assert levers["muon"] == {"learning_rate": 0.02} and "teacher" not in levers
    assert levers["calibration"] == {"fitted": ["temperature"]}
    assert json.loads((out / "config.json").read_text())["wikigpt"] == {
        "parameters": results["model"]["parameters"],
        "levers": levers,
    }
    card = (out / "README.md").read_text()
    assert (
        f"- rare tokens: the {rare['tied']:,} tokens seen fewer than 2 times in the training text "
        "share 6 embedding rows (by spelling): as inputs they are indistinguishable"
    ) in card
    assert "- Muon for the block matrices (learning rate 0.02), AdamW for the rest" in card
    assert (
        "Fine-tuning `ln_f` or the head, or re-tying the head to the input embeddings, undoes them."
        in card
    )
