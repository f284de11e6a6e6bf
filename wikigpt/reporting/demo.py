"""What the web demo (app.py) does, without the web page: load a checkpoint, sample from it,
describe its run.

Sampling goes through wikigpt.generation.settings, wikigpt.generation.prompts and
wikigpt.generation.sampling exactly as generate.py does (same settings layering, checks, prompt
encoding, seed and stop strings), so a seed gives the page the text generate.py prints. Bad input
never raises here: every function returns a message the page shows. gradio is imported only by
app.py.
"""

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import set_seed

from wikigpt.errors import UsageError
from wikigpt.generation.sampling import for_batched_generation, stream_sample
from wikigpt.generation.settings import (
    GenerateArguments,
    check_arguments,
    check_settings,
    resolve_device,
    resolve_settings,
)
from wikigpt.model import context_length, load_pretrained, resolve_dtype
from wikigpt.generation.prompts import encode_prompts

# The page's names for generate.py's flags, so that its error messages read right on the page.
PAGE_NAMES = {
    "--do_sample": "sampling",
    "--greedy": "greedy decoding",
    "--max_new_tokens": "Max new tokens",
    "--temperature": "Temperature",
    "--top_k": "Top-k",
    "--top_p": "Top-p",
    "--repetition_penalty": "Repetition penalty",
    "--seed": "Seed",
    "--stop": "Stop string",
    "--num_return_sequences": "Sequences",
    "--num_beams": "Beams",
}
RUN_FILES = (
    "results.json",
    "README.md",
    "training_curves.png",
    "eval_test.json",
    "eval_validation.json",
)

EXAMPLES = [  # prompt, stop string, what it shows
    ["The history of the city began in", "", "free continuation"],
    [
        "Q: What is the capital of France?\nA: Paris\nQ: Who wrote Hamlet?\nA: William "
        "Shakespeare\nQ: What is the largest planet?\nA:",
        r"\n",
        "a Q/A pattern, stopped at the end of the line",
    ],
    [
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889.\nTL;DR:",
        r"\n",
        "TL;DR: summarisation",
    ],
]
CAN_AND_CANNOT = (
    "A small model trained on WikiText-2 (about two million words of Wikipedia articles) continues "
    "text in the style of Wikipedia: headings, dates, battles, albums. It has not been taught to "
    "answer questions or follow instructions, so a Q/A pattern or a *TL;DR:* only works as far as "
    "it imitates the pattern, and what it writes is often fluent but false. A large model (GPT-2 "
    "and up) follows both patterns much better."
)


def page_message(err: Exception | str) -> str:
    """A UsageError from wikigpt, reworded for the page: flags become the controls' names."""
    text = str(err)
    text = text.replace("pass --greedy", "choose greedy decoding").replace(
        "add --do_sample", "choose sampling"
    )
    text = text.replace("override it with the flag", "set it on the page")
    return re.sub(r"--\w+", lambda m: PAGE_NAMES.get(m.group(0), m.group(0)), text)


@dataclass
class DemoModel:
    """A loaded checkpoint, or the reason it could not be loaded (`error`, shown on the page)."""

    name: str
    model: Any = None
    tokenizer: Any = None
    context: int = 0
    defaults: dict = field(
        default_factory=dict
    )  # generate.py's settings for this checkpoint when no flag is given
    error: str | None = None


def load_demo_model(
    name: str, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False
) -> DemoModel:
    try:
        torch_device = resolve_device(device)
        model, tokenizer = load_pretrained(
            name,
            device=torch_device,
            dtype=resolve_dtype(dtype, torch_device),
            allow_pickle=allow_pickle,
        )
        tokenizer = for_batched_generation(tokenizer)
    except UsageError as err:
        return DemoModel(name, error=str(err))
    defaults, _ = resolve_settings(GenerateArguments(model=name), model.generation_config)
    return DemoModel(name, model, tokenizer, context_length(model.config), defaults)


@dataclass
class Request:
    """One press of Generate: the page's controls (None = left empty)."""

    prompt: str = ""
    greedy: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | str | None = None  # the page's box gives text: "" means a fresh seed
    stop: str = ""

    def arguments(self, model: str) -> GenerateArguments:
        """generate.py's arguments for the same request: --prompt P [--greedy] --max_new_tokens N
        ... --stop S."""
        return GenerateArguments(
            model=model,
            prompt=[self.prompt or ""],
            greedy=self.greedy,
            stop=[self.stop] if self.stop else [],
            max_new_tokens=_number(self.max_new_tokens, int),
            temperature=_number(self.temperature, float),
            top_k=_number(self.top_k, int),
            top_p=_number(self.top_p, float),
            repetition_penalty=_number(self.repetition_penalty, float),
            seed=_number(self.seed, int),
        )


def _number(value, kind):
    return None if value is None else kind(value)


def _whole(name: str, value) -> str | None:
    if value is not None and float(value) != int(value):
        return f"{name} {value} must be a whole number"
    return None


def generate(demo: DemoModel, request: Request, cancel: threading.Event | None = None):
    """Yield (text so far, status line) while sampling; bad input yields one ("", "error: ...") and
    stops."""
    if demo.error:
        yield "", f"error: {page_message(demo.error)}"
        return
    if isinstance(request.seed, str):
        try:
            request.seed = int(request.seed) if request.seed.strip() else None
        except ValueError:
            yield (
                "",
                f"error: Seed {request.seed!r} must be a whole number, or empty for a fresh one",
            )
            return
    for name, value in (("Max new tokens", request.max_new_tokens), ("Top-k", request.top_k)):
        if (problem := _whole(name, value)) is not None:
            yield "", f"error: {problem}"
            return
    try:
        args = request.arguments(demo.name)
        check_arguments(args)
        settings, from_checkpoint = resolve_settings(args, demo.model.generation_config)
        check_settings(settings, from_checkpoint, demo.context)
    except UsageError as err:
        yield "", f"error: {page_message(err)}"
        return

    prompt, notes = args.prompt[0], []
    room = demo.context - settings["max_new_tokens"]
    (prompt_ids,) = encode_prompts(demo.tokenizer, [prompt], room, demo.context)
    if not prompt:
        notes.append("Empty prompt: an unconditional sample, started from <|endoftext|>.")
    elif (full := len(demo.tokenizer(prompt, verbose=False)["input_ids"])) > len(prompt_ids):
        notes.append(
            f"The prompt has {full} tokens; the model saw only its last {len(prompt_ids)}, so that "
            f"prompt + {settings['max_new_tokens']} new tokens fit its context of {demo.context} "
            "tokens."
        )
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    set_seed(seed)  # as generate.py: the same seed and settings give the same text

    text, start, record = prompt, time.perf_counter(), None
    for piece in stream_sample(
        demo.model, demo.tokenizer, prompt, prompt_ids, settings, args.stop, cancel
    ):
        if isinstance(piece, dict):
            record = piece
            break
        text += piece
        yield (
            text,
            " ".join(notes + [f"generating... {time.perf_counter() - start:.1f} s (seed {seed})"]),
        )
    reason = (
        "stopped"
        if cancel is not None and cancel.is_set()
        else record["finish_reason"].replace("_", " ")
    )
    rate = record["new_tokens"] / max(record["seconds"], 1e-9)
    decoding = "greedy" if not settings["do_sample"] else "sampling"
    yield (
        text,
        " ".join(
            notes
            + [
                f"{record['new_tokens']} new tokens in {record['seconds']:.2f} s: "
                f"{rate:.1f} tokens/s ({decoding}, seed {seed}, ended by {reason})."
            ]
        ),
    )


# --- the model's facts ----------------------------------------------------------------------------


def fetch_run_files(name: str) -> dict:
    """Paths of the train.py / eval.py files next to the weights (local folder, or a Hub repo when
    reachable)."""
    if os.path.isdir(name):
        return {
            f: os.path.join(name, f) for f in RUN_FILES if os.path.isfile(os.path.join(name, f))
        }
    found = {}
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return found
    from huggingface_hub import hf_hub_download

    for filename in RUN_FILES:
        try:
            found[filename] = hf_hub_download(name, filename)
        except Exception:  # offline, no such repo or no such file: the fact is just not shown
            continue
    return found


def _read_json(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fmt(value, digits: int = 2) -> str:
    """Numbers as the facts tab shows them: perplexity 1,234.57, counts 12,345."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _card_body(path: str | None) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return re.sub(
        r"\A---\n.*?\n---\n", "", text, flags=re.S
    ).strip()  # the YAML metadata block is for the Hub


def model_facts(demo: DemoModel) -> tuple[str, str | None, str]:
    """(facts as Markdown, training-curves image path or None, the model card's Markdown or "")."""
    files = fetch_run_files(demo.name)
    results = _read_json(files.get("results.json"))
    lines = [f"## `{demo.name}`", ""]
    if demo.error:
        lines += [f"**error:** {page_message(demo.error)}", ""]
    if not results:
        lines.append(
            "No results.json in this checkpoint (train.py writes one into its --output_dir), so "
            "there are no training facts to show."
            + ("" if demo.model is None else " From its config:")
        )
        if demo.model is not None:
            config = demo.model.config
            lines += [
                "",
                f"- parameters: {fmt(demo.model.num_parameters())}",
                f"- architecture: {config.model_type}, {config.num_hidden_layers} layers, "
                f"{config.num_attention_heads} heads, width {config.hidden_size}, context "
                f"{fmt(demo.context)}",
            ]
        return (
            "\n".join(lines) + "\n",
            files.get("training_curves.png"),
            _card_body(files.get("README.md")),
        )

    model, arch, data = (
        results.get("model", {}),
        results.get("architecture", {}),
        results.get("data", {}),
    )
    train, hp, hw = (
        results.get("train", {}),
        results.get("hyperparameters", {}),
        results.get("hardware", {}),
    )
    dataset = results.get("dataset", {})
    source = dataset.get("id") or "local text files"
    if dataset.get("source") == "local files":
        source += (
            " ("
            + ", ".join(f"{split}: {name}" for split, name in dataset.get("files", {}).items())
            + ")"
        )
    lines += [
        f"- **parameters:** {fmt(model.get('parameters'))} "
        f"({fmt(model.get('non_embedding_parameters'))} without the embeddings); "
        f"{arch.get('model_type')}, {arch.get('n_layer')} layers, {arch.get('n_head')} heads, "
        f"width {arch.get('n_embd')}, context {fmt(arch.get('context_length'))} tokens",
        f"- **origin:** {model.get('description', 'n/a')}",
        f"- **data:** {source}; trained on {fmt(train.get('tokens_seen'))} tokens "
        f"({fmt(train.get('global_step'))} steps, {fmt(train.get('wall_time_s'))} s on "
        f"{hw.get('device', 'n/a')})",
        "",
        "### Quality (lower perplexity is better)",
        "",
        "| split | metric | value | source |",
        "| --- | --- | ---: | --- |",
    ]
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = results.get(split) or {}
        if f"{prefix}_perplexity" in metrics:
            lines.append(
                f"| {split} | perplexity (token-level, {results.get('block_size')}-token blocks) | "
                f"{fmt(metrics[f'{prefix}_perplexity'])} | train.py, "
                f"{fmt(metrics.get(f'{prefix}_tokens'))} tokens |"
            )
    for split in ("validation", "test"):
        report = _read_json(files.get(f"eval_{split}.json"))
        for key, metric in (report.get("metrics") or {}).items():
            if isinstance(metric, dict) and isinstance(metric.get("value"), (int, float)):
                lines.append(
                    f"| {split} | {key.replace('_', ' ')} | {fmt(float(metric['value']), 4)} | "
                    "eval.py |"
                )
    if not any(results.get(s) for s in ("validation", "test")):
        lines.append("| - | no perplexity in results.json | - | - |")
    lines += ["", "### Hyper-parameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in hp.items()]
    if data:
        lines += [
            "",
            "### Data",
            "",
            "| split | rows | tokens | blocks |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {s} | {fmt(c.get('rows'))} | {fmt(c.get('tokens'))} | {fmt(c.get('blocks'))} |"
            for s, c in data.items()
        ]
    return (
        "\n".join(lines) + "\n",
        files.get("training_curves.png"),
        _card_body(files.get("README.md")),
    )
