"""Data: load WikiText (Hub or local files), tokenize with the GPT-2 tokenizer, group into
fixed-length blocks.

Local `.raw`/`.txt` files give exactly the rows the Hub's `wikitext` gives (one row per line,
newline kept, whitespace-only lines -> ""), so local and Hub runs tokenize to the same tokens. Every
step is a `datasets` map with an explicit fingerprint, so a second identical run reads the cache and
a changed tokenizer or block size recomputes.
"""

import logging
import os
import random
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from wikigpt.errors import UsageError, loading
from wikigpt.data.wikitext import detokenize, split_documents
from wikigpt.data.wikitext import article_spans

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_FILE_FLAGS = {
    "train": "--train_file",
    "validation": "--validation_file",
    "test": "--test_file",
}
WIKITEXT_RAW_NAMES = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
}
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".raw": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
LOCAL_DATA_HINT = (
    "to run offline pass --dataset_dir DIR (holding wiki.train.raw/wiki.valid.raw/wiki.test.raw) "
    "or --train_file/--validation_file/--test_file"
)


@dataclass
class DataArguments:
    _argument_group_name = "data"  # its title in --help (HfArgumentParser)

    dataset_name: str | None = field(
        default="wikitext",
        metadata={"help": "Hub dataset name; ignored when a local file or --dataset_dir is given."},
    )
    dataset_config_name: str | None = field(
        default="wikitext-2-raw-v1", metadata={"help": "Hub dataset config."}
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with wiki.train.raw, wiki.valid.raw, wiki.test.raw (WikiText raw)."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training file (.txt/.raw/.json/.jsonl/.csv/.parquet)."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file."})
    text_column: str = field(
        default="text", metadata={"help": "Column holding the text in json/csv/parquet files."}
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Without a validation split, hold out whole articles (WikiText ' = Title = ' "
            "headings), about this percent of the training text, chosen by --seed; text without "
            "article headings holds out one contiguous slice of rows."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training block. Default: min(1024, model n_positions)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )
    random_block_offset: bool = field(
        default=False,
        metadata={
            "help": "Re-cut the training tokens into blocks at a new random offset in [0, "
            "block_size) every epoch (drawn from --seed and the epoch), so epochs see different "
            "block boundaries; validation and test blocks are unchanged."
        },
    )

    detokenize: bool = field(
        default=False,
        metadata={
            "help": "Train, validate and test on WikiText as lm-evaluation-harness scores it: one "
            "row per article (split at ' = Title = ' headings), detokenized (' @-@ ' -> '-', ' , ' "
            "-> ', ', ...) with the harness's rules, the same as eval.py's documents method. "
            "train.py only."
        },
    )

    @property
    def uses_local_files(self) -> bool:
        return bool(self.dataset_dir or self.train_file or self.validation_file or self.test_file)


def resolve_block_size(block_size: int | None, n_positions: int) -> int:
    if block_size is None:
        return min(1024, n_positions)
    if block_size <= 0 or block_size > n_positions:
        raise UsageError(
            f"--block_size must be between 1 and the model's n_positions ({n_positions}); got "
            f"{block_size}. Pass --block_size {min(1024, n_positions)} or less"
        )
    return block_size


def _check_file(flag: str, path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r} does not exist; pass the path of an existing file")
    if os.path.isdir(path):
        raise UsageError(
            f"{flag} {path!r} is a directory; pass a file (or use --dataset_dir for a folder)"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDER_BY_EXTENSION:
        raise UsageError(
            f"{flag} {path!r} has unsupported extension {ext or '(none)'!r}; "
            f"use one of {', '.join(sorted(BUILDER_BY_EXTENSION))}"
        )
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path!r} is empty; pass a file with text in it")
    return path


def _hub_rows(batch):
    # The Hub's wikitext keeps each line's "\n" but turns whitespace-only lines into "".
    return {"text": [line if line.strip() else "" for line in batch["text"]]}


def _caused_by(err: BaseException, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def _load_local_split(flag: str, path: str, text_column: str) -> datasets.Dataset:
    builder = BUILDER_BY_EXTENSION[os.path.splitext(path)[1].lower()]
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    with loading(flag, path, "pass a readable UTF-8 file"):
        try:
            ds = datasets.load_dataset(
                builder, data_files={"data": os.path.abspath(path)}, split="data", **kwargs
            )
        except Exception as err:  # noqa: BLE001 - datasets wraps the decode error in its own
            if decode_error := _caused_by(err, UnicodeDecodeError):
                raise UsageError(
                    f"{flag} {path!r} is not UTF-8 text ({decode_error.reason}); "
                    f"convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
                ) from err
            raise
    if builder == "text":
        ds = ds.map(_hub_rows, batched=True, desc=f"Hub-format rows of {os.path.basename(path)}")
    elif text_column not in ds.column_names:
        raise UsageError(
            f"--text_column {text_column!r} is not a column of {flag} {path!r} (columns: "
            f"{ds.column_names}); pass --text_column with one of them"
        )
    else:
        ds = ds.select_columns([text_column])
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
    if len(ds) == 0 or not any(t and t.strip() for t in ds["text"]):
        raise UsageError(f"{flag} {path!r} holds no text; pass a file with text in it")
    return ds


def _local_files(args: DataArguments) -> dict[str, tuple[str, str]]:
    """Map split -> (flag, path) for every local split the user gave."""
    files = {}
    if args.dataset_dir:
        if not os.path.isdir(args.dataset_dir):
            raise UsageError(
                f"--dataset_dir {args.dataset_dir!r} is not a directory; pass the folder holding "
                "wiki.*.raw"
            )
        for split, name in WIKITEXT_RAW_NAMES.items():
            path = os.path.join(args.dataset_dir, name)
            if os.path.exists(path):
                files[split] = ("--dataset_dir", path)
    for split, flag in SPLIT_FILE_FLAGS.items():
        path = getattr(args, split + "_file")
        if path:
            files[split] = (flag, path)
    return files


def hold_out(
    train: datasets.Dataset, percentage: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out whole articles, about `percentage` % of the training text, chosen by `seed`; row
    order is kept.

    Articles start at WikiText's top-level ` = Title = ` headings. A held-out slice cut from the
    middle of articles shares names and topics with the training rows around it and rates an
    over-fitted model far better than unseen text (the test split) would; whole held-out articles
    track the test split. Text without two such headings falls back to one contiguous slice of rows
    placed by `seed`.
    """
    if not 0 < percentage < 100:
        raise UsageError(f"--validation_split_percentage must be in (0, 100); got {percentage}")
    rows, n = train["text"], len(train)
    spans = article_spans(rows)
    if len(spans) >= 2:
        sizes = [sum(len(rows[i]) for i in span) for span in spans]
        target = sum(sizes) * percentage / 100
        order = list(range(len(spans)))
        random.Random(seed).shuffle(order)
        chosen, held = set(), 0
        for (
            a
        ) in order:  # whole articles until the target is reached; always at least one, never all
            if held >= target or len(chosen) == len(spans) - 1:
                break
            chosen.add(a)
            held += sizes[a]
        held_rows = sorted(i for a in chosen for i in spans[a])
    else:
        k = max(1, round(n * percentage / 100))
        if k >= n:
            raise UsageError(
                f"--validation_split_percentage {percentage} leaves no training rows out of {n}; "
                "lower it"
            )
        start = random.Random(seed).randrange(0, n - k + 1)
        held_rows = list(range(start, start + k))
    held_set = set(held_rows)
    logger.info(
        "held out %d of %d rows for validation (%s)",
        len(held_rows),
        n,
        f"{len(chosen)} of {len(spans)} articles" if len(spans) >= 2 else "one contiguous slice",
    )
    return train.select([i for i in range(n) if i not in held_set]), train.select(held_rows)


TEST_FILE_NAMES = ("wiki.test.raw", "wiki.test.tokens")


def validation_is_test(args: DataArguments) -> str | None:
    """Why the validation file is the test split (the same file, the same bytes, or WikiText's test
    file), else None: validation perplexity is then test perplexity, and whatever it chooses is
    chosen on test."""
    validation, test = args.validation_file, args.test_file
    if not validation or not os.path.isfile(validation):
        return None
    if os.path.basename(validation) in TEST_FILE_NAMES:
        return f"it is WikiText's {os.path.basename(validation)}"
    if test and os.path.isfile(test):
        same = os.path.samefile(validation, test) or (
            os.path.getsize(validation) == os.path.getsize(test)
            and open(validation, "rb").read() == open(test, "rb").read()
        )
        if same:
            return "it is --test_file's text"
    return None


def check_data_args(args: DataArguments) -> None:
    """Fail fast on bad local paths, before any model is built or file written."""
    for flag, path in _local_files(args).values():
        _check_file(flag, path)


def load_raw_splits(
    args: DataArguments, seed: int, required: tuple[str, ...] = ("train", "validation")
) -> datasets.DatasetDict:
    """Rows of text (one `text` column) for every available split; `required` splits must exist.

    A missing validation split is held out of train when "validation" is required.
    """
    if args.uses_local_files:
        check_data_args(args)
        files = _local_files(args)
        raw = datasets.DatasetDict(
            {
                split: _load_local_split(flag, path, args.text_column)
                for split, (flag, path) in files.items()
            }
        )
    else:
        with loading("--dataset_name", args.dataset_name or "", LOCAL_DATA_HINT):
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        raw = datasets.DatasetDict({s: raw[s] for s in SPLITS if s in raw})
        if args.text_column not in raw[next(iter(raw))].column_names:
            raise UsageError(
                f"--text_column {args.text_column!r} is not a column of --dataset_name "
                f"{args.dataset_name!r}"
            )
        if args.text_column != "text":
            raw = raw.select_columns([args.text_column]).rename_column(args.text_column, "text")
    if "validation" in required and "validation" not in raw and "train" in raw:
        raw["train"], raw["validation"] = hold_out(
            raw["train"], args.validation_split_percentage, seed
        )
    for split in required:
        if split not in raw:
            if args.dataset_dir:
                raise UsageError(
                    f"--dataset_dir {args.dataset_dir!r} has no {WIKITEXT_RAW_NAMES[split]} "
                    f"({split} split); add it or pass {SPLIT_FILE_FLAGS[split]}"
                )
            raise UsageError(f"no {split} split: pass {SPLIT_FILE_FLAGS[split]} (or --dataset_dir)")
    return raw


def detokenize_splits(raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """--detokenize: every split as one row per article, detokenized (wikigpt.data.wikitext, as
    eval.py's documents)."""

    def to_documents(batch):
        return {"text": [detokenize(page) for page in split_documents(batch["text"])]}

    # One batch per split: an article's lines must meet in one call of split_documents.
    detokenized = datasets.DatasetDict(
        {
            split: ds.map(
                to_documents,
                batched=True,
                batch_size=None,
                remove_columns=ds.column_names,
                new_fingerprint=Hasher.hash(["detokenize-v1", ds._fingerprint]),
                desc=f"Detokenizing {split} articles",
            )
            for split, ds in raw.items()
        }
    )
    for split, ds in detokenized.items():
        logger.info("%s: %d lines -> %d detokenized articles", split, len(raw[split]), len(ds))
    return detokenized


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the full tokenizer definition, not the Python
    object."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(backend.to_str() if backend is not None else tokenizer)


def tokenize(ds: datasets.Dataset, tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    """Token ids of every row, without special tokens: one text stream, as every evaluation method
    reads it.

    A tokenizer that adds BOS/EOS (add_special_tokens) would otherwise put one inside the stream per
    row, i.e. per WikiText line; the sliding-window and document methods of eval.py tokenize without
    them too.
    """
    fingerprint = Hasher.hash(["tokenize-v2", ds._fingerprint, tokenizer_fingerprint(tokenizer)])

    def encode(batch):
        return {
            "input_ids": tokenizer(
                batch["text"], add_special_tokens=False, return_attention_mask=False
            )["input_ids"]
        }

    # Rows are longer than model_max_length only before grouping; the warning would be noise.
    tok_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = tok_logger.level
    tok_logger.setLevel(logging.ERROR)
    try:
        return ds.map(
            encode,
            batched=True,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            new_fingerprint=fingerprint,
            desc="Tokenizing",
        )
    finally:
        tok_logger.setLevel(level)


def token_stream(ds: datasets.Dataset, tokenizer, num_proc: int | None = None) -> np.ndarray:
    """`tokenize`'s rows concatenated into one array of token ids (read from the datasets cache when
    it holds them)."""
    return pc.list_flatten(
        tokenize(ds, tokenizer, num_proc).with_format("arrow")[:]["input_ids"]
    ).to_numpy()


def group_texts(tokenized: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenate the whole split and cut it into `block_size` blocks; only the split's final
    remainder is dropped.

    One batch per split (batch_size=None) so no remainder is dropped in the middle, unlike run_clm's
    per-1,000-row grouping. Arrow in, Arrow out: no per-token Python objects.
    """
    fingerprint = Hasher.hash(["group-v1", tokenized._fingerprint, block_size])

    def to_blocks(table: pa.Table) -> pa.Table:
        ids = pc.list_flatten(table.column("input_ids")).to_numpy()
        n_blocks = len(ids) // block_size
        flat = pa.array(np.ascontiguousarray(ids[: n_blocks * block_size], dtype=np.int32))
        blocks = pa.FixedSizeListArray.from_arrays(flat, block_size)
        return pa.table(
            {"input_ids": blocks, "labels": blocks}
        )  # labels = inputs; the model shifts them

    grouped = tokenized.with_format("arrow").map(
        to_blocks,
        batched=True,
        batch_size=None,
        remove_columns=tokenized.column_names,
        new_fingerprint=fingerprint,
        desc=f"Grouping into blocks of {block_size}",
    )
    return grouped.with_format(None)


def count_tokens(tokenized: datasets.Dataset) -> int:
    lengths = pc.list_value_length(tokenized.with_format("arrow")[:]["input_ids"])
    return int(pc.sum(lengths).as_py() or 0)


def prepare_lm_splits(
    raw: datasets.DatasetDict, tokenizer, block_size: int, num_proc: int | None = None
):
    """Tokenize and group every split. Returns (blocks per split, counts per split)."""
    blocks, counts = datasets.DatasetDict(), {}
    for split, ds in raw.items():
        tokenized = tokenize(ds, tokenizer, num_proc)
        blocks[split] = group_texts(tokenized, block_size)
        tokens = count_tokens(tokenized)
        n_blocks = len(blocks[split])
        counts[split] = {
            "rows": len(ds),
            "tokens": tokens,
            "blocks": n_blocks,
            "tokens_in_blocks": n_blocks * block_size,
            "tokens_dropped": tokens - n_blocks * block_size,
        }
        if n_blocks == 0:
            raise UsageError(
                f"the {split} split has {tokens} tokens, fewer than one block of --block_size "
                f"{block_size}; pass more text or a smaller --block_size"
            )
        logger.info(
            "%s: %d rows, %d tokens, %d blocks of %d (%d tokens dropped at the end)",
            split,
            len(ds),
            tokens,
            n_blocks,
            block_size,
            counts[split]["tokens_dropped"],
        )
    return blocks, counts
