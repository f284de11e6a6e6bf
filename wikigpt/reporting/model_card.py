"""The Hub model card (README.md in the output dir): model-index metadata with perplexities, and a
readable body.

Written by every train.py run from its results.json content; eval.py's results (word-level
perplexity, bits per byte, ...) are added when given. `huggingface_hub.ModelCard.load` parses it,
and the Hub shows the model-index numbers as evaluation results.
"""

import os
import platform

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from wikigpt import __version__
from wikigpt.data.blocks import WIKITEXT_RAW_NAMES, _local_files

TASK = "text-generation"
TOKEN_PPL_METHOD = (
    "exp(mean next-token negative log-likelihood over every token of the split), the split "
    "concatenated and cut into non-overlapping {block_size}-token blocks (each block's first token "
    "has no context; the split's last partial block is dropped)"
)
# eval.py metric keys -> (model-index metric type, pretty name)
EVAL_METRICS = {
    "perplexity": ("perplexity", "Perplexity (token-level)"),
    "sliding_window_perplexity": ("perplexity", "Perplexity (token-level, sliding window)"),
    "word_perplexity": ("word_perplexity", "Word-level perplexity"),
    "byte_perplexity": ("byte_perplexity", "Byte-level perplexity"),
    "bits_per_byte": ("bits_per_byte", "Bits per byte"),
}


def dataset_info(data_args) -> dict:
    """Which dataset the run used, as the card names it. Local files named like WikiText's raw files
    (wiki.train.raw, ...) are labelled --dataset_name/--dataset_config_name (default
    wikitext-2-raw-v1); other local files are "custom"."""
    files = {split: path for split, (_, path) in _local_files(data_args).items()}
    if not files:
        return {
            "id": data_args.dataset_name,
            "config": data_args.dataset_config_name,
            "source": "hub",
        }
    if all(os.path.basename(p) in WIKITEXT_RAW_NAMES.values() for p in files.values()):
        return {
            "id": data_args.dataset_name,
            "config": data_args.dataset_config_name,
            "source": "local files",
            "files": {s: os.path.basename(p) for s, p in files.items()},
        }
    return {
        "id": None,
        "config": None,
        "source": "local files",
        "files": {s: os.path.basename(p) for s, p in files.items()},
    }


def split_dataset_info(data_args, split: str) -> dict:
    """Which dataset eval.py's `split` came from, as the card names it: the Hub dataset, or a local
    file named as WikiText's file of that split (wiki.test.raw for test); any other file is
    "custom", whatever the model was trained on."""
    files = _local_files(data_args)
    if not files:
        return {
            "id": data_args.dataset_name,
            "config": data_args.dataset_config_name,
            "source": "hub",
        }
    name = os.path.basename(files[split][1]) if split in files else None
    if name == WIKITEXT_RAW_NAMES[split]:
        return {
            "id": data_args.dataset_name,
            "config": data_args.dataset_config_name,
            "source": "local files",
            "files": {split: name},
        }
    return {"id": None, "config": None, "source": "local files", "files": {split: name}}


def precision(training_args) -> str:
    # mixed_precision also holds what `accelerate launch` set (ACCELERATE_MIXED_PRECISION) without
    # --bf16
    mixed = getattr(training_args, "mixed_precision", None)
    if mixed not in ("bf16", "fp16"):
        mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    return f"{mixed} mixed" if mixed else "fp32"


def describe_run(data_args, training_args, model, block_size: int) -> dict:
    """What the card needs beyond train.py's metrics: dataset, architecture, hyper-parameters,
    hardware."""
    config = model.config
    global_batch_blocks = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    return {
        "dataset": dataset_info(data_args),
        "architecture": {
            "model_type": config.model_type,
            "n_layer": config.num_hidden_layers,
            "n_head": config.num_attention_heads,
            "n_embd": config.hidden_size,
            "context_length": getattr(config, "n_positions", None),
            "vocab_size": config.vocab_size,
        },
        "hyperparameters": {
            "block_size": block_size,
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(
                getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
            ),
            "warmup_steps": training_args.warmup_steps,
            "weight_decay": training_args.weight_decay,
            "adam_beta1": training_args.adam_beta1,
            "adam_beta2": training_args.adam_beta2,
            "adam_epsilon": training_args.adam_epsilon,
            "max_grad_norm": training_args.max_grad_norm,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "global_batch_blocks": global_batch_blocks,
            "global_batch_tokens": global_batch_blocks * block_size,
            "num_train_epochs": training_args.num_train_epochs,
            "max_steps": training_args.max_steps,
            "seed": training_args.seed,
            "precision": precision(training_args),
            "torch_compile": training_args.torch_compile,
        },
        "hardware": {
            "device": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU ({platform.processor() or platform.machine()})",
            "processes": training_args.world_size,
            "distributed": getattr(
                getattr(training_args.distributed_state, "distributed_type", None), "value", "NO"
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def describe_levers(lever_args, calibration_args, training_args, source: dict) -> dict:
    """The small-data levers a run used, as results.json, config.json and the card state them."""
    levers = {}
    if rare := source.get("rare_tokens"):
        levers["rare_tokens"] = {**rare, "groups_by": lever_args.rare_token_groups}
    if teacher := source.get("distilled_from"):
        levers["teacher"] = teacher
    if training_args.optim_matrices == "muon":
        levers["muon"] = {"learning_rate": training_args.muon_learning_rate}
    if lever_args.chunked_loss_size:
        levers["chunked_loss_size"] = lever_args.chunked_loss_size
    calibrations = [
        name
        for name in ("temperature", "token_offsets")
        if getattr(calibration_args, f"calibrate_{name}")
    ]
    if calibrations:
        levers["calibration"] = {"fitted": calibrations}
    return levers


def levers_paragraph(levers: dict) -> list[str]:
    """What the levers mean for a user of the saved model: plain text lines of the card."""
    lines = []
    if rare := levers.get("rare_tokens"):
        rows = len(rare.get("groups") or [1])
        lines.append(
            f"- rare tokens: the {rare['tied']:,} tokens seen fewer than {rare['below']} times in "
            f"the training text share {rows} embedding row{'s' if rows > 1 else ''} "
            f"(by {rare['groups_by']}): as inputs they are indistinguishable, and as outputs each "
            f"group's probability is spread evenly over its tokens"
        )
    if teacher := levers.get("teacher"):
        lines.append(
            f"- trained against the next-token distribution of `{teacher['teacher']}` (share "
            f"{teacher['share']}); the teacher is not part of this model"
        )
    if muon := levers.get("muon"):
        lines.append(
            f"- Muon for the block matrices (learning rate {muon['learning_rate']}), "
            "AdamW for the rest"
        )
    if calibration := levers.get("calibration"):
        lines.append(
            f"- calibrated after training on the held-out split: {', '.join(calibration['fitted'])}"
        )
    if not lines:
        return []
    lines += [
        "",
        "Using it further: the calibrations live in the final LayerNorm (`ln_f`) and the LM head. "
        "Fine-tuning `ln_f` or the head, or re-tying the head to the input embeddings, undoes "
        "them. fp16 can overflow the scaled logits, and quantising the head rounds the per-class "
        "offsets: measure perplexity again after either. The shared rare-token rows stay shared "
        "only while nothing trains them apart.",
    ]
    return lines


def _split_label(dataset: dict) -> tuple[str, str]:
    if dataset.get("id"):
        return dataset["id"], f"{dataset['id']} ({dataset['config']})" if dataset.get(
            "config"
        ) else dataset["id"]
    return "custom", "local text files (" + ", ".join(
        sorted(dataset.get("files", {}).values())
    ) + ")"


def eval_results_list(results: dict, eval_results: dict | None = None) -> list[EvalResult]:
    """Token-level perplexity on validation/test from train.py; plus every metric of eval.py's
    results."""
    dataset = results.get("dataset", {})
    block_size = results.get("block_size")

    def entry(dataset, split, metric_type, value, name, args):
        dataset_type, dataset_name = _split_label(dataset)
        return EvalResult(
            task_type=TASK,
            task_name="Causal language modeling",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=dataset.get("config"),
            dataset_split=split,
            metric_type=metric_type,
            metric_value=round(float(value), 4),
            metric_name=name,
            metric_args=args,
        )

    entries = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = results.get(split) or {}
        if f"{prefix}_perplexity" in metrics:
            args = {
                "method": TOKEN_PPL_METHOD.format(block_size=block_size),
                "block_size": block_size,
                "tokens": metrics.get(f"{prefix}_tokens"),
                "source": "train.py",
            }
            entries[(_split_label(dataset), split, "perplexity")] = entry(
                dataset,
                split,
                "perplexity",
                metrics[f"{prefix}_perplexity"],
                "Perplexity (token-level)",
                args,
            )
    if eval_results:
        split = eval_results.get("split", "test")
        # eval.py's data is labelled as itself (split_dataset_info), never as the training dataset
        eval_dataset = eval_results.get("data") or {
            "id": None,
            "files": {split: str(eval_results.get("dataset"))},
        }
        for key, metric in eval_results.get("metrics", {}).items():
            if not isinstance(metric, dict) or not isinstance(metric.get("value"), (int, float)):
                continue
            if key.endswith(
                "_mixture_perplexity"
            ):  # a test-time mixture (eval.py --ngram_order, --block_cache)
                continue
            metric_type, name = EVAL_METRICS.get(key, (key, key.replace("_", " ").capitalize()))
            args = {"method": metric.get("method"), "source": "eval.py"}
            # eval.py's numbers replace train.py's for the same dataset, split and metric key
            entries[(_split_label(eval_dataset), split, key)] = entry(
                eval_dataset, split, metric_type, metric["value"], name, args
            )
    return list(entries.values())


def _fmt(value, digits=2):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _body(
    results: dict, evals: list[EvalResult], eval_results: dict | None, title: str, load_from: str
) -> str:
    model = results.get("model", {})
    arch = results.get("architecture", {})
    hp = results.get("hyperparameters", {})
    hw = results.get("hardware", {})
    train = results.get("train", {})
    data = results.get("data", {})
    dataset = results.get("dataset", {})
    throughput = results.get("throughput") or {}
    fine_tuned = model.get("kind") == "pretrained"
    origin = (
        f"fine-tuned from `{model['base_model']}`"
        if fine_tuned
        else "trained from scratch (random initialisation; no pretrained GPT-2 weights)"
    )
    lines = [
        f"# {title}",
        "",
        f"A GPT-2-family causal language model ({_fmt(model.get('parameters'))} parameters, "
        f"{_fmt(model.get('non_embedding_parameters'))} without embeddings; {arch.get('n_layer')} "
        f"layers, {arch.get('n_head')} heads, width {arch.get('n_embd')}), {origin}, on "
        f"{_split_label(dataset)[1]} with wikigpt {results.get('wikigpt_version', __version__)}.",
        "",
        "## Evaluation",
        "",
        "| split | metric | value | method |",
        "| --- | --- | ---: | --- |",
    ]
    for e in evals:
        method = (e.metric_args or {}).get("method") or ""
        lines.append(
            f"| {e.dataset_split} | {e.metric_name} | {_fmt(e.metric_value, 4)} | {method} |"
        )
    if eval_results:
        lines += [
            "",
            f"eval.py results: model `{eval_results.get('model')}`, dataset "
            f"`{eval_results.get('dataset')}`, split `{eval_results.get('split')}`, counts "
            f"{eval_results.get('counts')}.",
        ]
    lines += ["", "## Training data", ""]
    source = (
        f"from the Hub (`{dataset.get('id')}`, config `{dataset.get('config')}`)"
        if dataset.get("source") == "hub"
        else "from local files "
        + ", ".join(f"`{f}` ({s})" for s, f in dataset.get("files", {}).items())
    )
    lines.append(
        f"Loaded {source}. Each split is tokenized with the GPT-2 tokenizer, concatenated and cut "
        f"into {results.get('block_size')}-token blocks:"
    )
    lines += ["", "| split | rows | tokens | blocks |", "| --- | ---: | ---: | ---: |"]
    for split, c in data.items():
        lines.append(
            f"| {split} | {_fmt(c.get('rows'))} | {_fmt(c.get('tokens'))} | "
            f"{_fmt(c.get('blocks'))} |"
        )
    lines += [
        "",
        "## Training procedure",
        "",
        f"- training tokens: {_fmt(train.get('tokens_seen'))} ({_fmt(train.get('global_step'))} "
        f"optimizer steps of {_fmt(hp.get('global_batch_tokens'))} tokens)",
        f"- training time: {_fmt(train.get('wall_time_s'))} s",
        f"- hardware: {hw.get('processes', 1)} x {hw.get('device', 'unknown')} (distributed: "
        f"{hw.get('distributed')}), torch {hw.get('torch')}, transformers {hw.get('transformers')}",
    ]
    if calibration := results.get("calibration"):
        lines.append(
            f"- softmax temperature {calibration['temperature']:.4f}, fitted on the held-out split "
            "after training and folded into the final LayerNorm (held-out perplexity "
            f"{_fmt(calibration['validation_perplexity_before'], 2)} -> "
            f"{_fmt(calibration['validation_perplexity_after'], 2)}): "
            "the saved logits are divided by it"
        )
    if offsets := results.get("token_offsets"):
        slopes = (
            f" and slopes {offsets['rank_slopes']} on log(1 + token id)"
            if "rank_slopes" in offsets
            else ""
        )
        lines.append(
            f"- logit scales {offsets['scales']}, offsets {offsets['offsets']}{slopes} for tokens "
            f"seen {offsets['count_edges']} or more times "
            f"in the training text, fitted on the held-out split"
            + f" after training (held-out perplexity "
            f"{_fmt(offsets['validation_perplexity_before'], 2)} -> "
            f"{_fmt(offsets['validation_perplexity_after'], 2)}): "
            + (
                f"skipped ({offsets['skipped']})"
                if "skipped" in offsets
                else "folded into the final LayerNorm and the LM head, "
                "which is untied from the input embeddings"
            )
        )
    if levers := results.get("levers"):
        lines += ["", "## Levers for small data", "", *levers_paragraph(levers), ""]
    if throughput:
        mfu = throughput.get("mfu")
        lines.append(
            f"- throughput: {_fmt(throughput.get('tokens_per_second'), 0)} tokens/s"
            + (f", MFU {mfu:.1%}" if isinstance(mfu, (int, float)) else "")
        )
    lines += ["", "| hyper-parameter | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in hp.items()]
    lines += [
        "",
        "## Intended use",
        "",
        "Research and teaching: studying language-model training, evaluation and perplexity on "
        "WikiText-2, and as a baseline or starting point for further fine-tuning. Load it with",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{load_from}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")',
        "```",
        "",
        "## Limitations",
        "",
        f"- Trained on {_fmt((data.get('train') or {}).get('tokens'))} tokens of English Wikipedia "
        "text; it knows little beyond that, writes only English, "
        "and its output is often fluent but false.",
        "- Not instruction-tuned and not safety-tuned: do not use it for facts, advice, "
        "or in products.",
        "- It reproduces the topics, style and biases of the Wikipedia articles it was trained on.",
        "- Perplexities are only comparable between models with the same tokenizer and the same "
        "method (block size, stride, token vs word level); see the Evaluation table.",
    ]
    if not fine_tuned and (train.get("tokens_seen") or 0) < 10_000_000:
        lines.append(
            "- Trained from scratch on few tokens: a training-pipeline artefact, "
            "not a useful language model."
        )
    return "\n".join(lines) + "\n"


def build_model_card(
    results: dict, eval_results: dict | None = None, model_name: str = "wikigpt-model"
) -> ModelCard:
    model = results.get("model", {})
    dataset = results.get("dataset", {})
    evals = eval_results_list(results, eval_results)
    data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=TASK,
        language="en",
        tags=["gpt2", "causal-lm", "wikigpt"]
        + (["wikitext"] if dataset.get("id") == "wikitext" else []),
        datasets=[dataset["id"]] if dataset.get("id") else None,
        # base_model says "these weights came from there": true only for a fine-tuned checkpoint.
        base_model=model.get("base_model") if model.get("kind") == "pretrained" else None,
        eval_results=evals or None,
    )
    load_from = results.get("hub_model_id") or f"path/to/{model_name}"
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n"
        f"{_body(results, evals, eval_results, model_name, load_from)}"
    )


def write_model_card(
    output_dir: str, results: dict, eval_results: dict | None = None, model_name: str | None = None
) -> str:
    """Write README.md (the Hub model card) into output_dir; returns its path."""
    name = (
        model_name or results.get("hub_model_id") or os.path.basename(os.path.abspath(output_dir))
    )
    card = build_model_card(results, eval_results, name)
    path = os.path.join(output_dir, "README.md")
    tmp = path + ".tmp"
    card.save(tmp)
    os.replace(tmp, path)  # never a half-written card
    return path
