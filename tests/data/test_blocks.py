"""wikigpt/data/blocks.py on the real WikiText-2 splits: Hub-format rows, token counts, grouping,
hold-out, cache."""

import json

import pyarrow.compute as pc
import pytest
from conftest import WT2, write_lines

from wikigpt.data.blocks import (
    DataArguments,
    count_tokens,
    group_texts,
    hold_out,
    load_raw_splits,
    prepare_lm_splits,
    resolve_block_size,
    tokenize,
)
from wikigpt.errors import UsageError


@pytest.fixture(scope="module")
def wt2_raw():
    args = DataArguments(
        validation_file=str(WT2 / "wiki.valid.raw"), test_file=str(WT2 / "wiki.test.raw")
    )
    return load_raw_splits(args, seed=0, required=("validation", "test"))


def test_local_raw_rows_are_hub_rows(wt2_raw):
    assert len(wt2_raw["validation"]) == 3760 and len(wt2_raw["test"]) == 4358
    test_rows = wt2_raw["test"]["text"]
    assert test_rows[0] == ""  # " \n" becomes "" like the Hub's wikitext
    assert test_rows[1] == " = Robert Boulter = \n"
    assert all(row == "" or (row.endswith("\n") and row.strip()) for row in test_rows)
    assert "".join(test_rows).count("\n") == sum(1 for r in test_rows if r)


def test_token_counts_match_hub_rows(wt2_raw, tokenizer):
    assert count_tokens(tokenize(wt2_raw["validation"], tokenizer)) == 247_289
    assert count_tokens(tokenize(wt2_raw["test"], tokenizer)) == 283_287


def test_grouping_drops_only_the_final_remainder(tmp_path, tokenizer):
    path = write_lines(tmp_path / "slice.raw", WT2 / "wiki.test.raw", 0, 300)
    raw = load_raw_splits(DataArguments(test_file=str(path)), seed=0, required=("test",))
    tokenized = tokenize(raw["test"], tokenizer)
    flat = pc.list_flatten(tokenized.with_format("arrow")[:]["input_ids"]).to_pylist()
    blocks = group_texts(tokenized, 100)
    n = len(flat) // 100
    assert len(blocks) == n and len(flat) - n * 100 < 100
    assert [t for block in blocks["input_ids"] for t in block] == flat[: n * 100]
    assert blocks["labels"] == blocks["input_ids"]
    _, counts = prepare_lm_splits(raw, tokenizer, 100)
    assert counts["test"] == {
        "rows": 300,
        "tokens": len(flat),
        "blocks": n,
        "tokens_in_blocks": n * 100,
        "tokens_dropped": len(flat) - n * 100,
    }


def test_hold_out_takes_whole_articles_ordered_and_deterministic(wt2_raw):
    rows = wt2_raw["validation"]
    train_a, val_a = hold_out(rows, 5, seed=1)
    train_b, val_b = hold_out(rows, 5, seed=1)
    _, val_c = hold_out(rows, 5, seed=2)
    assert val_a["text"] == val_b["text"] and train_a["text"] == train_b["text"]
    assert val_a["text"] != val_c["text"]
    all_rows = list(rows["text"])
    headings = [
        i for i, r in enumerate(all_rows) if r.startswith(" = ") and not r.startswith(" = = ")
    ]
    assert len(headings) == 60  # the articles of WikiText-2 validation
    # every article lies wholly on one side: its heading's side decides all of its rows
    held = set(val_a["text"])
    ends = headings[1:] + [len(all_rows)]
    held_articles = [(a, b) for a, b in zip(headings, ends) if all_rows[a] in held]
    assert 2 <= len(held_articles) < 60
    expected_val = [r for a, b in held_articles for r in all_rows[a:b]]
    assert list(val_a["text"]) == expected_val
    assert list(train_a["text"]) == [
        r for i, r in enumerate(all_rows) if not any(a <= i < b for a, b in held_articles)
    ]
    held_chars = sum(len(r) for r in expected_val)
    total_chars = sum(len(r) for r in all_rows)
    # whole articles until 5% of the text is reached: the last one added crossed the line
    assert (
        0.05 * total_chars
        <= held_chars
        < 0.05 * total_chars + max(sum(len(r) for r in all_rows[a:b]) for a, b in held_articles)
    )


def test_hold_out_without_headings_is_one_contiguous_slice(wt2_raw):
    rows = wt2_raw["validation"].filter(lambda r: not r["text"].startswith(" = "))
    train, val = hold_out(rows, 5, seed=1)
    all_rows, k = list(rows["text"]), len(val)
    assert k == round(len(all_rows) * 0.05) and len(train) + k == len(all_rows)
    assert any(
        all_rows[s : s + k] == list(val["text"])
        and all_rows[:s] + all_rows[s + k :] == list(train["text"])
        for s in range(len(all_rows) - k + 1)
    )


def test_missing_validation_is_held_out_of_train(tmp_path):
    path = write_lines(tmp_path / "train.raw", WT2 / "wiki.valid.raw", 0, 200)
    raw = load_raw_splits(
        DataArguments(train_file=str(path), validation_split_percentage=10), seed=0
    )
    # lines 0-199 of WikiText-2 validation: articles start at rows 1, 47, 78, 103 and 132; seed 0
    # holds out two
    rows = list(
        load_raw_splits(DataArguments(validation_file=str(path)), 0, ("validation",))["validation"][
            "text"
        ]
    )
    assert list(raw["validation"]["text"]) == rows[47:103]
    assert list(raw["train"]["text"]) == rows[:47] + rows[103:]


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    path = write_lines(tmp_path / "c.raw", WT2 / "wiki.test.raw", 0, 200)
    args = DataArguments(test_file=str(path))
    first, _ = prepare_lm_splits(load_raw_splits(args, 0, ("test",)), tokenizer, 64)
    again, _ = prepare_lm_splits(load_raw_splits(args, 0, ("test",)), tokenizer, 64)
    other_block, _ = prepare_lm_splits(load_raw_splits(args, 0, ("test",)), tokenizer, 32)
    assert first["test"].cache_files and first["test"].cache_files == again["test"].cache_files
    assert other_block["test"].cache_files != first["test"].cache_files
    changed = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    changed.add_tokens(["<wikigpt-new-token>"])
    raw = load_raw_splits(args, 0, ("test",))
    assert (
        tokenize(raw["test"], changed)._fingerprint != tokenize(raw["test"], tokenizer)._fingerprint
    )


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".parquet"])
def test_structured_files_with_text_column(tmp_path, ext, tokenizer):
    import pandas as pd

    rows = [" = A = \n", "", " Some text here .\n"]
    frame = pd.DataFrame({"id": range(3), "body": rows})
    path = tmp_path / f"data{ext}"
    if ext == ".json":
        path.write_text(json.dumps([{"id": i, "body": r} for i, r in enumerate(rows)]))
    elif ext == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif ext == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    raw = load_raw_splits(DataArguments(test_file=str(path), text_column="body"), 0, ("test",))
    assert raw["test"].column_names == ["text"]
    assert [t or "" for t in raw["test"]["text"]] == rows


@pytest.mark.parametrize(
    "block_size, n_positions, expected", [(None, 1024, 1024), (None, 256, 256), (128, 256, 128)]
)
def test_block_size_default_and_range(block_size, n_positions, expected):
    assert resolve_block_size(block_size, n_positions) == expected


@pytest.mark.parametrize("block_size", [0, -5, 257])
def test_block_size_out_of_range(block_size):
    with pytest.raises(
        UsageError, match=r"--block_size must be between 1 and the model's n_positions \(256\)"
    ):
        resolve_block_size(block_size, 256)


def _bad(tmp_path, case):
    if case == "missing":
        return DataArguments(
            train_file=str(tmp_path / "nope.raw")
        ), r"--train_file '.*nope.raw' does not exist"
    if case == "extension":
        (tmp_path / "a.docx").write_text("x")
        return DataArguments(
            train_file=str(tmp_path / "a.docx")
        ), r"--train_file '.*a.docx' has unsupported extension '.docx'"
    if case == "empty":
        (tmp_path / "e.raw").write_text("")
        return DataArguments(
            validation_file=str(tmp_path / "e.raw")
        ), r"--validation_file '.*e.raw' is empty"
    if case == "blank":
        (tmp_path / "b.raw").write_text(" \n \n\n")
        return DataArguments(
            test_file=str(tmp_path / "b.raw")
        ), r"--test_file '.*b.raw' holds no text"
    if case == "directory":
        return DataArguments(train_file=str(tmp_path)), r"--train_file '.*' is a directory"
    if case == "dataset_dir_without_train":
        return DataArguments(
            dataset_dir=str(WT2)
        ), r"--dataset_dir '.*' has no wiki.train.raw \(train split\)"
    if case == "dataset_dir_is_file":
        return DataArguments(
            dataset_dir=str(WT2 / "wiki.test.raw")
        ), r"--dataset_dir '.*' is not a directory"
    if case == "text_column":
        (tmp_path / "t.jsonl").write_text('{"body": "x"}\n')
        return DataArguments(
            train_file=str(tmp_path / "t.jsonl")
        ), r"--text_column 'text' is not a column"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "extension",
        "empty",
        "blank",
        "directory",
        "dataset_dir_without_train",
        "dataset_dir_is_file",
        "text_column",
    ],
)
def test_bad_data_input_names_the_argument(tmp_path, case):
    args, message = _bad(tmp_path, case)
    with pytest.raises(UsageError, match=message):
        load_raw_splits(args, seed=0)


def test_dataset_dir_with_all_splits(tmp_path):
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        write_lines(tmp_path / name, WT2 / "wiki.test.raw", 0, 50)
    raw = load_raw_splits(
        DataArguments(dataset_dir=str(tmp_path)), 0, ("train", "validation", "test")
    )
    assert sorted(raw) == ["test", "train", "validation"] and len(raw["train"]) == 50
