"""--detokenize: train.py trains on the articles lm-evaluation-harness scores, detokenized, in every
split."""

import json

import numpy as np
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture

from wikigpt.data.blocks import DataArguments, detokenize_splits, load_raw_splits, prepare_lm_splits
from wikigpt.data.wikitext import detokenize, split_documents


def expected_stream(path, tokenizer) -> list[int]:
    """The file read directly, split into articles and detokenized, each article's tokens one after
    the other."""
    with open(path, encoding="utf-8") as f:
        rows = [
            line + "\n" if line.strip() else "" for line in f.read().split("\n")[:-1]
        ]  # Hub rows of the file
    ids = []
    for page in split_documents(rows):
        ids.extend(tokenizer(detokenize(page))["input_ids"])
    return ids


def test_training_stream_is_the_detokenized_articles(micro_files, tokenizer):
    args = DataArguments(
        train_file=str(micro_files["train"]), validation_file=str(micro_files["validation"])
    )
    raw = detokenize_splits(load_raw_splits(args, seed=0))
    assert " @-@ " not in "".join(
        raw["train"]["text"]
    )  # the raw file has them; the harness's form does not
    blocks, counts = prepare_lm_splits(raw, tokenizer, 32)
    for split in ("train", "validation"):
        expected = expected_stream(micro_files[split], tokenizer)
        stream = np.concatenate(blocks[split]["input_ids"]).tolist()
        assert counts[split]["tokens"] == len(expected)
        assert stream == expected[: len(stream)] and len(expected) - len(stream) < 32


def test_train_py_reports_the_detokenized_counts(tmp_path, micro_files, tokenizer, monkeypatch):
    out = tmp_path / "run"
    assert (
        train_in_process(
            micro_args(micro_files, out, "--detokenize", max_steps=2, save_steps=2), monkeypatch
        )
        == 0
    )
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["train"]["tokens"] == len(expected_stream(micro_files["train"], tokenizer))
    assert data["train"]["rows"] == len(
        split_documents(open(micro_files["train"], encoding="utf-8").read().split("\n"))
    )
