"""eval.py's work: load a causal LM and one split, score it three ways, report every number with its
method."""

import json
import logging
import os
from dataclasses import dataclass, field

from wikigpt import __version__
from wikigpt.data.blocks import (
    SPLITS,
    DataArguments,
    count_tokens,
    load_raw_splits,
    prepare_lm_splits,
    resolve_block_size,
    tokenize,
)
from wikigpt.errors import UsageError
from wikigpt.reporting.model_card import split_dataset_info, write_model_card
from wikigpt.model import context_length, load_pretrained, resolve_dtype
from wikigpt.evaluation.mixture import check_run_split, mixture_metrics
from wikigpt.evaluation.perplexity import (
    block_windows,
    load_corpus_perplexity,
    rolling_windows,
    score_windows,
    sliding_windows,
)
from wikigpt.atomic_json import write_json_atomic
from wikigpt.data.wikitext import byte_count, detokenize, split_documents, word_count

logger = logging.getLogger(__name__)

METHODS = ("blocks", "sliding_window", "documents")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class EvalArguments:
    model: str = field(
        metadata={
            "help": "Model to evaluate: a local folder (e.g. train.py's --output_dir) or a Hub id."
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the model's own)."}
    )
    split: str = field(default="test", metadata={"help": f"Split to score: {', '.join(SPLITS)}."})
    methods: str = field(
        default="blocks,sliding_window,documents",
        metadata={
            "help": "Comma-separated: blocks (perplexity as train.py), sliding_window (HF guide), "
            "documents (lm-evaluation-harness word/byte perplexity, bits per byte)."
        },
    )
    stride: int | None = field(
        default=None,
        metadata={
            "help": "Sliding-window stride in tokens (default: half the context; = context "
            "gives disjoint windows)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass (per process)."})
    dtype: str = field(
        default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16 or auto."}
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Also write the JSON report here."}
    )
    update_model_card: bool = field(
        default=False,
        metadata={
            "help": "When --model is a train.py output folder (it has results.json), save the "
            "report there as eval_<split>.json and add its metrics to the model card "
            "(README.md), labelled with the data scored. Default: the folder is left "
            "untouched."
        },
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the validation hold-out when only train is given."}
    )
    ngram_order: int = field(
        default=0,
        metadata={
            "help": "Also report ngram_mixture_perplexity: the blocks method with each token's "
            "probability interpolated with an interpolated modified Kneser-Ney n-gram of "
            "this order (4 is a good choice) fitted on the train split, with the weight "
            "that fits the validation split best. Pass the data flags train.py ran with "
            "(--train_file, hold-out, --seed). A test-time mixture, reported beside the "
            "model's own `perplexity`; 0 (default): off."
        },
    )
    block_cache: bool = field(
        default=False,
        metadata={
            "help": "Also report cache_mixture_perplexity: the blocks method with each token's "
            "probability interpolated with a cache of the block so far (how often the "
            "token occurred before it in its block), weight fitted on the validation "
            "split; with --ngram_order, also ngram_cache_mixture_perplexity (all "
            "three). Pass the data flags train.py ran with. A test-time mixture, "
            "reported beside the model's own `perplexity`."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model's repo to run."}
    )
    allow_pickle: bool = field(
        default=False,
        metadata={
            "help": "Allow pickle weights (pytorch_model.bin); they can "
            "run code when loaded. Default: safetensors only."
        },
    )


def check_eval_args(args: EvalArguments) -> list[str]:
    """Fail fast on arguments that cannot work; returns the list of methods."""
    if args.split not in SPLITS:
        raise UsageError(f"--split {args.split!r} is unknown; choose one of {', '.join(SPLITS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(
            f"--methods {args.methods!r} has unknown entries {unknown}; choose from "
            f"{', '.join(METHODS)}"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1; got {args.batch_size}")
    if args.ngram_order < 0:
        raise UsageError(
            f"--ngram_order must be 0 (off) or an n-gram order such as 4; got {args.ngram_order}"
        )
    for flag, on, what in (
        ("--ngram_order", args.ngram_order, "the n-gram"),
        ("--block_cache", args.block_cache, "the cache"),
    ):
        if on and "blocks" not in methods:
            raise UsageError(
                f"{flag} mixes {what} into the blocks method; add blocks to --methods "
                f"(got {args.methods!r})"
            )
        if on and args.split != "test":
            raise UsageError(
                f"{flag} fits its mixture's weights on the validation split; score another split: "
                f"--split test (got {args.split!r})"
            )
    if args.output_file and os.path.isdir(args.output_file):
        raise UsageError(
            f"--output_file {args.output_file!r} is a directory; pass a file path such as "
            "results.json"
        )
    if os.path.isdir(args.model) and not args.tokenizer_name:
        if not any(os.path.exists(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
            raise UsageError(
                f"--model {args.model!r} holds no tokenizer files; pass --tokenizer_name DIR "
                f"(the tokenizer the model was trained with)"
            )
    return methods


def run_block_size(model: str) -> int | None:
    """The block size a train.py run recorded in its output folder (results.json), or None for any
    other model."""
    try:
        with open(os.path.join(model, "results.json"), encoding="utf-8") as f:
            block_size = json.load(f).get("block_size")
    except (OSError, ValueError, AttributeError):
        return None
    return block_size if isinstance(block_size, int) and block_size > 0 else None


def resolve_stride(stride: int | None, context: int) -> int:
    if stride is None:
        return max(1, context // 2)
    if stride <= 0 or stride > context:
        raise UsageError(
            f"--stride must be between 1 and the model's context ({context}); got {stride}. "
            f"Pass --stride {context // 2} (half overlap) or {context} (disjoint windows)"
        )
    return stride


def _encode_long(tokenizer, text: str) -> list[int]:
    # A whole split is far longer than model_max_length; that warning is about feeding it to the
    # model at once, which never happens here (it is cut into windows).
    tok_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = tok_logger.level
    tok_logger.setLevel(logging.ERROR)
    try:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tok_logger.setLevel(level)


def evaluate_split(args: EvalArguments, data_args: DataArguments, accelerator) -> dict:
    """Score one split with every requested method; returns the report (the same on every
    process)."""
    methods = check_eval_args(args)
    if data_args.detokenize:
        raise UsageError(
            "--detokenize is a train.py flag; eval.py's documents method already scores "
            "detokenized articles (--methods documents): drop --detokenize"
        )
    dtype = resolve_dtype(args.dtype, accelerator.device)
    model, tokenizer = load_pretrained(
        args.model,
        args.tokenizer_name,
        device=accelerator.device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        vocab_fix="pass the tokenizer the model was trained with",
    )
    context = context_length(model.config)
    stride = resolve_stride(args.stride, context)
    # A train.py run folder defaults to the run's own block size, so `perplexity` is train.py's
    # number.
    block_size = resolve_block_size(data_args.block_size or run_block_size(args.model), context)
    with (
        accelerator.main_process_first()
    ):  # the main process fills the datasets cache, the others read it
        # a mixture also needs the run's train split (the n-gram, the run's hold-out) and held-out
        # split (weights)
        mixing = bool(args.ngram_order or args.block_cache)
        required = ("train", "validation", args.split) if mixing else (args.split,)
        raw = load_raw_splits(data_args, args.seed, required=required)
        rows = raw[args.split]
        scored = {s: raw[s] for s in required if s != "train"}
        blocks, counts = (
            prepare_lm_splits(scored, tokenizer, block_size) if "blocks" in methods else ({}, {})
        )
        if mixing:
            train_tokens = tokenize(raw["train"], tokenizer)
            flag = "--ngram_order" if args.ngram_order else "--block_cache"
            check_run_split(
                args.model, {"train": {"tokens": count_tokens(train_tokens)}, **counts}, flag
            )
            train_ids = [t for row in train_tokens["input_ids"] for t in row]
    rows = rows["text"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )

    def score(windows, desc, keep_token_nll=False):
        return score_windows(
            model,
            windows,
            load_corpus_perplexity(),
            accelerator,
            args.batch_size,
            pad_id,
            desc,
            keep_token_nll,
        )

    metrics, details = {}, {}
    if "blocks" in methods:
        r = score(block_windows(blocks[args.split]["input_ids"]), "blocks", keep_token_nll=mixing)
        metrics["perplexity"] = {
            "value": r["perplexity"],
            "method": f"disjoint blocks of {block_size} tokens as train.py groups them (split "
            "concatenated, final remainder dropped); every token but each block's first "
            "is predicted; exp(sum NLL / tokens) = exp(Trainer eval_loss)",
        }
        details["blocks"] = {
            **counts[args.split],
            "scored_tokens": r["tokens"],
            "tokens_per_second": r["tokens_per_second"],
        }
    if mixing:
        held_out, scored_blocks = blocks["validation"]["input_ids"], blocks[args.split]["input_ids"]
        v = score(block_windows(held_out), "validation blocks", keep_token_nll=True)
        mixed, details["mixture"] = mixture_metrics(
            (held_out, scored_blocks),
            (v["token_nll"], r["token_nll"]),
            args.ngram_order,
            train_ids,
            model.config.vocab_size,
            args.block_cache,
        )
        metrics.update(mixed)
    if "sliding_window" in methods:
        ids = _encode_long(tokenizer, "\n\n".join(rows))
        r = score(sliding_windows(ids, context, stride), "sliding windows")
        metrics["sliding_window_perplexity"] = {
            "value": r["perplexity"],
            "method": "HF guide 'Perplexity of fixed-length models': '\\n\\n'.join(rows), windows "
            f"of {context} tokens, stride {stride}, only tokens not scored before are "
            "scored; exp(sum NLL / tokens)",
        }
        details["sliding_window"] = {
            "tokens": len(ids),
            "scored_tokens": r["tokens"],
            "context": context,
            "stride": stride,
            "tokens_per_second": r["tokens_per_second"],
        }
    if "documents" in methods:
        windows, pages = [], split_documents(rows)
        for page in pages:
            doc_windows = rolling_windows(
                _encode_long(tokenizer, detokenize(page)), context, prefix
            )
            if doc_windows:  # words and bytes ride on the document's first window
                doc_windows[0].update(word_count=word_count(page), byte_count=byte_count(page))
            windows += doc_windows
        r = score(windows, "documents")
        harness = (
            f"lm-evaluation-harness 'wikitext' task: {len(pages)} documents split at top-level "
            f"headings, wikitext detokenizer, rolling windows of {context} tokens (first predicted "
            f"from token {prefix})"
        )
        metrics["word_perplexity"] = {
            "value": r["word_perplexity"],
            "method": f"{harness}; exp(sum NLL / words of the original pages)",
        }
        metrics["byte_perplexity"] = {
            "value": r["byte_perplexity"],
            "method": f"{harness}; exp(sum NLL / UTF-8 bytes of the original pages)",
        }
        metrics["bits_per_byte"] = {
            "value": r["bits_per_byte"],
            "method": f"{harness}; sum NLL / bytes / ln 2",
        }
        metrics["document_token_perplexity"] = {
            "value": r["perplexity"],
            "method": f"{harness}; exp(sum NLL / tokens of the detokenized pages)",
        }
        details["documents"] = {
            "documents": len(pages),
            "tokens": r["tokens"],
            "words": r["words"],
            "bytes": r["bytes"],
            "tokens_per_second": r["tokens_per_second"],
        }
    source = (
        data_args.dataset_dir
        or getattr(data_args, f"{args.split}_file")
        or f"{data_args.dataset_name}/{data_args.dataset_config_name}"
    )
    return {
        "wikigpt_version": __version__,
        "model": args.model,
        "split": args.split,
        "dataset": source,
        "data": split_dataset_info(data_args, args.split),
        "dtype": str(dtype).replace("torch.", ""),
        "context": context,
        "block_size": block_size,
        "stride": stride,
        "processes": accelerator.num_processes,
        "metrics": metrics,
        "counts": {"rows": len(rows), **details},
    }


def update_model_card(model_dir: str, report: dict) -> str | None:
    """Add eval.py's metrics to a train.py run's model card; returns the card's path, None if not a
    run folder."""
    results_path = os.path.join(model_dir, "results.json")
    if not os.path.isfile(results_path):
        return None
    write_json_atomic(os.path.join(model_dir, f"eval_{report['split']}.json"), report)
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    return write_model_card(model_dir, results, report)
