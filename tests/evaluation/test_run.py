"""eval.py end to end: perplexity = exp(Trainer eval_loss), the JSON report, and 1 vs 2
processes."""

import json
import math
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator
from conftest import REPO, WT2, run_script, write_lines
from transformers import Trainer, TrainingArguments, default_data_collator

from wikigpt.data.blocks import DataArguments, load_raw_splits, prepare_lm_splits
from wikigpt.evaluation.run import EvalArguments, evaluate_split
from wikigpt.evaluation.perplexity import compute_perplexity, nll_and_count
from wikigpt.model import load_causal_lm


@pytest.fixture(scope="module")
def three_documents(tmp_path_factory):
    """WikiText-2 test lines 265-330: the 'Dick Rifenburg', '1933 Treasure Coast hurricane' and (the
    start of) 'Second Battle of Naktong Bulge' articles, ~4k tokens."""
    return write_lines(
        tmp_path_factory.mktemp("docs") / "three.raw", WT2 / "wiki.test.raw", 264, 330
    )


def test_perplexity_equals_exp_of_trainer_eval_loss(
    tmp_path, tiny_checkpoint, tokenizer, small_files
):
    data_args = DataArguments(test_file=str(small_files["test"]), block_size=64)
    report = evaluate_split(
        EvalArguments(model=str(tiny_checkpoint), methods="blocks", batch_size=5),
        data_args,
        Accelerator(cpu=True),
    )
    blocks, counts = prepare_lm_splits(load_raw_splits(data_args, 0, ("test",)), tokenizer, 64)
    trainer = Trainer(
        model=load_causal_lm(str(tiny_checkpoint), flag="--model"),  # as train.py loads it
        args=TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True
        ),
        data_collator=default_data_collator,
        compute_metrics=compute_perplexity,
        preprocess_logits_for_metrics=nll_and_count,
    )
    metrics = trainer.evaluate(blocks["test"])
    value = report["metrics"]["perplexity"]["value"]
    assert value == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-4)
    assert value == pytest.approx(metrics["eval_perplexity"], rel=1e-6)
    assert (
        report["counts"]["blocks"]["scored_tokens"]
        == counts["test"]["blocks"] * 63
        == metrics["eval_tokens"]
    )


@pytest.fixture(scope="module")
def one_process_report(tmp_path_factory, tiny_checkpoint, three_documents):
    out = tmp_path_factory.mktemp("eval") / "report.json"
    proc = run_script(
        "eval.py",
        "--model",
        tiny_checkpoint,
        "--test_file",
        three_documents,
        "--block_size",
        64,
        "--stride",
        32,
        "--batch_size",
        3,
        "--output_file",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(out.read_text())
    assert "tokens/s" in proc.stderr
    return json.loads(out.read_text())


def test_report_has_every_metric_with_its_method(one_process_report, tokenizer, three_documents):
    report = one_process_report
    assert set(report["metrics"]) == {
        "perplexity",
        "sliding_window_perplexity",
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "document_token_perplexity",
    }
    assert all(m["method"] and math.isfinite(m["value"]) for m in report["metrics"].values())
    assert "stride 32" in report["metrics"]["sliding_window_perplexity"]["method"]
    assert (report["context"], report["stride"], report["block_size"], report["dtype"]) == (
        128,
        32,
        64,
        "float32",
    )
    docs = report["counts"]["documents"]
    text = three_documents.read_text(encoding="utf-8")
    # The pages are the file's lines; the 2 newlines that join the 3 pages belong to none of them.
    assert docs["documents"] == 3 and docs["bytes"] == len(text.encode("utf-8")) - 2
    m = report["metrics"]
    # word perplexity = token perplexity ** (tokens / words)
    assert math.log(m["word_perplexity"]["value"]) == pytest.approx(
        math.log(m["document_token_perplexity"]["value"]) * docs["tokens"] / docs["words"]
    )


def test_two_processes_give_the_one_process_numbers(
    one_process_report, tiny_checkpoint, three_documents, tmp_path
):
    out = tmp_path / "report.json"
    # accelerate 1.15 starts one process for `--cpu --num_processes 2` (without MPI); --multi_gpu on
    # a machine without GPUs starts 2 CPU processes over gloo.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    args = [
        "--model",
        tiny_checkpoint,
        "--test_file",
        three_documents,
        "--block_size",
        64,
        "--stride",
        32,
        "--batch_size",
        3,
        "--output_file",
        out,
    ]
    proc = subprocess.run(
        [*launch, str(REPO / "eval.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2 and one_process_report["processes"] == 1
    # Same windows scored once each (even batching's repeated samples dropped): counts equal
    # exactly, values to float rounding of differently composed batches.
    for method in ("blocks", "sliding_window", "documents"):
        one_counts = {
            k: v
            for k, v in one_process_report["counts"][method].items()
            if k != "tokens_per_second"
        }
        assert {
            k: v for k, v in two["counts"][method].items() if k != "tokens_per_second"
        } == one_counts
    for name, metric in one_process_report["metrics"].items():
        assert two["metrics"][name]["value"] == pytest.approx(metric["value"], rel=1e-6), name


def test_eval_adds_its_metrics_to_a_train_run_model_card(tmp_path, one_process_report):
    from huggingface_hub import ModelCard
    from test_model_card import results_for

    from wikigpt.evaluation.run import update_model_card

    assert (
        update_model_card(str(tmp_path), one_process_report) is None
    )  # not a train.py run: left alone
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "results.json").write_text(json.dumps(results_for("from_scratch")))
    card = ModelCard.load(update_model_card(str(tmp_path), one_process_report))
    values = {
        (r.dataset_type, r.dataset_split, r.metric_name): r.metric_value
        for r in card.data.eval_results
    }
    metrics = one_process_report["metrics"]
    # eval.py scored three.raw, not WikiText's test split: its numbers are labelled with that file
    assert values[("custom", "test", "Perplexity (token-level)")] == round(
        metrics["perplexity"]["value"], 4
    )
    assert (
        "wikitext",
        "validation",
        "Perplexity (token-level)",
    ) in values  # train.py's numbers stay
    assert ("wikitext", "test", "Perplexity (token-level)") in values
    assert values[("custom", "test", "Word-level perplexity")] == round(
        metrics["word_perplexity"]["value"], 4
    )
    assert values[("custom", "test", "Bits per byte")] == round(
        metrics["bits_per_byte"]["value"], 4
    )
    assert json.loads((tmp_path / "eval_test.json").read_text()) == one_process_report


def test_a_bos_adding_tokenizer_gives_every_method_the_same_stream(
    tmp_path, tiny_checkpoint, three_documents
):
    """No special tokens inside the text stream, whatever the tokenizer adds: train.py's blocks, the
    sliding window and the documents score the same tokens with a tokenizer that adds BOS as with
    one that does not."""
    from transformers import AutoTokenizer

    bos_dir = tmp_path / "bos-tokenizer"
    AutoTokenizer.from_pretrained(tiny_checkpoint, add_bos_token=True).save_pretrained(bos_dir)
    bos_tokenizer = AutoTokenizer.from_pretrained(bos_dir)
    assert (
        bos_tokenizer("Hello")["input_ids"][0] == bos_tokenizer.bos_token_id
    )  # it really adds BOS
    data_args = DataArguments(test_file=str(three_documents), block_size=64)
    reports = [
        evaluate_split(
            EvalArguments(model=str(tiny_checkpoint), tokenizer_name=name, stride=64, batch_size=4),
            data_args,
            Accelerator(cpu=True),
        )
        for name in (None, str(bos_dir))
    ]
    for report in reports:
        for counts in report["counts"].values():
            if isinstance(counts, dict):
                counts.pop("tokens_per_second")
    assert reports[1]["metrics"] == reports[0]["metrics"]
    assert reports[1]["counts"] == reports[0]["counts"]
    blocks, _ = prepare_lm_splits(load_raw_splits(data_args, 0, ("test",)), bos_tokenizer, 64)
    assert bos_tokenizer.bos_token_id not in {
        t for block in blocks["test"]["input_ids"] for t in block
    }


def eval_py_in_process(monkeypatch, *argv) -> None:
    """eval.py's main as the command line runs it (the report goes to stdout)."""
    import importlib

    eval_py = importlib.import_module("eval")
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, argv)])
    from wikigpt.errors import run_main

    run_main(eval_py.main)


def test_eval_of_a_train_run_folder_uses_its_block_size_and_leaves_the_card(
    tmp_path, tiny_checkpoint, small_files, monkeypatch, capsys
):
    import shutil

    from test_model_card import results_for

    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    (run / "results.json").write_text(json.dumps({**results_for("from_scratch"), "block_size": 48}))
    (run / "README.md").write_text("the run's own card\n")
    args = ["--model", run, "--test_file", small_files["test"], "--methods", "blocks"]
    eval_py_in_process(monkeypatch, *args)
    report = json.loads(capsys.readouterr().out)
    assert (
        report["block_size"] == 48
        and "blocks of 48 tokens" in report["metrics"]["perplexity"]["method"]
    )
    assert (run / "README.md").read_text() == "the run's own card\n"  # not asked to update it
    assert not (run / "eval_test.json").exists()
    eval_py_in_process(monkeypatch, *args, "--update_model_card")
    assert "Perplexity (token-level)" in (run / "README.md").read_text()
    assert json.loads((run / "eval_test.json").read_text())["block_size"] == 48
    capsys.readouterr()
    eval_py_in_process(monkeypatch, *args, "--block_size", 32)  # an explicit --block_size wins
    assert json.loads(capsys.readouterr().out)["block_size"] == 32
