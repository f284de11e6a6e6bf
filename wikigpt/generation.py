"""Sampling: prompts in, completions out; all decoding is `model.generate` with a `GenerationConfig`.

Settings are layered: the user's flags > the checkpoint's saved generation_config.json > FALLBACKS.
Batches are left-padded with an attention mask (GPT-2 has no pad token, so pad = eos); a prompt's greedy
continuation is then the same whichever prompts share its batch.
"""

import json
import logging
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, TextStreamer

from .errors import UsageError
from .model import pick_device

logger = logging.getLogger("wikigpt.generate")

# Used when neither a flag nor the checkpoint's generation_config.json sets a value.
FALLBACKS = dict(max_new_tokens=100, do_sample=True, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
                 repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1)
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p")
PROMPT_FILE_HINT = 'pass a text file with one prompt per line, or a .jsonl file with a "prompt" field per line'


def _flag(help_text: str, **argparse_kwargs) -> dict:
    return {"help": help_text, **argparse_kwargs}


def _knob(help_text: str, key: str, **argparse_kwargs) -> dict:
    """A decoding setting: unset (None) means the checkpoint's generation_config value, else FALLBACKS[key]."""
    return _flag(f"{help_text}. Unset: the checkpoint's generation_config value, else {FALLBACKS[key]}.",
                 **argparse_kwargs)


@dataclass
class GenerateArguments:
    model: str = field(default="gpt2", metadata=_flag(
        "Checkpoint to sample from: a local folder (e.g. a train.py --output_dir) or a Hub id."))
    tokenizer_name: str | None = field(default=None, metadata=_flag(
        "Tokenizer (Hub id or local folder). Default: the one saved with --model."))
    prompt: list[str] = field(default_factory=list, metadata=_flag(
        'A prompt; repeat the flag for several. "" samples unconditionally from <|endoftext|>.', action="append"))
    prompt_file: str | None = field(default=None, metadata=_flag(
        'Prompts, one per line (blank lines skipped), or a .jsonl file with a "prompt" field per line.'))
    output_file: str | None = field(default=None, metadata=_flag(
        "Write one JSON record per sample to this .jsonl file (an existing file is never overwritten)."))
    max_new_tokens: int | None = field(default=None, metadata=_knob("Tokens to generate per sample", "max_new_tokens"))
    do_sample: bool | None = field(default=None, metadata=_knob(
        "Sample; --do_sample false decodes greedily (or by beam search)", "do_sample", nargs="?", const=True))
    greedy: bool = field(default=False, metadata=_flag("Shortcut for --do_sample false."))
    temperature: float | None = field(default=None, metadata=_knob("Sampling temperature, > 0", "temperature"))
    top_k: int | None = field(default=None, metadata=_knob("Sample from the k likeliest tokens (0 = all)", "top_k"))
    top_p: float | None = field(default=None, metadata=_knob("Nucleus sampling mass in (0, 1] (1 = off)", "top_p"))
    typical_p: float | None = field(default=None, metadata=_knob("Typical sampling mass in (0, 1] (1 = off)",
                                                                  "typical_p"))
    repetition_penalty: float | None = field(default=None, metadata=_knob(
        "> 1 discourages repeated tokens (1 = off)", "repetition_penalty"))
    no_repeat_ngram_size: int | None = field(default=None, metadata=_knob(
        "Never repeat an n-gram of this size (0 = off)", "no_repeat_ngram_size"))
    num_beams: int | None = field(default=None, metadata=_knob(
        "Beam search with this many beams; greedy beam search unless --do_sample is given", "num_beams"))
    num_return_sequences: int | None = field(default=None, metadata=_knob("Sequences per prompt",
                                                                          "num_return_sequences"))
    stop: list[str] = field(default_factory=list, metadata=_flag(
        r"Stop at this string and cut it off; repeat for several. \n and \t are understood, e.g. --stop '\n\n'.",
        action="append"))
    seed: int | None = field(default=None, metadata=_flag(
        "Random seed; the same seed and flags give the same samples. Default: a fresh one, reported in the records."))
    batch_size: int = field(default=8, metadata=_flag("Prompts per model.generate call."))
    device: str = field(default="auto", metadata=_flag("auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps."))
    dtype: str = field(default="auto", metadata=_flag("auto (bfloat16 on a GPU that supports it, else float32), "
                                                      "float32, bfloat16 or float16."))
    stream: bool = field(default=True, metadata=_flag(
        "Print tokens as they come (one prompt, one sequence, no beams); --no_stream prints at the end."))
    echo_prompt: bool = field(default=True, metadata=_flag(
        "Print the prompt before its continuation; --no_echo_prompt prints the continuation only."))
    trust_remote_code: bool = field(default=False, metadata=_flag("Allow code from the checkpoint's repo to run."))
    allow_pickle: bool = field(default=False, metadata=_flag("Allow pickle weights (pytorch_model.bin); they can run "
                                                             "code when loaded. Default: safetensors only."))

    def __post_init__(self):
        # action="append" with nargs="+" gives one list per flag; unquoted words of one flag form one prompt.
        self.prompt = [" ".join(p) if isinstance(p, list) else p for p in self.prompt]
        self.stop = [unescape(" ".join(s) if isinstance(s, list) else s) for s in self.stop]


def unescape(text: str) -> str:
    """Shell quoting keeps \\n literal; stop strings are nearly always newlines, so read \\n, \\t and \\\\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# --- checks ---------------------------------------------------------------------------------------------------

RANGES = {  # key: (is it valid, what to say)
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v > 0, "must be > 0 when sampling; for greedy decoding pass --greedy"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 turns top-k filtering off)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 turns nucleus sampling off)"),
    "typical_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 turns typical sampling off)"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0 (1.0 means no penalty)"),
    "no_repeat_ngram_size": (lambda v: v >= 0, "must be >= 0 (0 turns it off)"),
    "num_beams": (lambda v: v >= 1, "must be >= 1"),
    "num_return_sequences": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 4294967295] (leave it out for a fresh one)"),
}


def _check_ranges(values: dict, from_checkpoint: set = frozenset()) -> None:
    for key, (ok, rule) in RANGES.items():
        value = values.get(key)
        if key == "temperature" and values.get("do_sample") is False:
            continue  # unused by greedy and beam search
        if value is not None and not ok(value):
            where = " (it comes from the checkpoint's generation_config.json; override it with the flag)" \
                if key in from_checkpoint else ""
            raise UsageError(f"--{key} {value} {rule}{where}")


def check_arguments(args: GenerateArguments) -> None:
    """Everything that can be checked before the model is loaded."""
    if args.greedy and args.do_sample:
        raise UsageError("--greedy and --do_sample contradict each other; pass only one of them")
    do_sample = False if args.greedy else args.do_sample
    _check_ranges({**vars(args), "do_sample": do_sample})
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        raise UsageError(f"--prompt_file {args.prompt_file!r} does not exist or is not a file; {PROMPT_FILE_HINT}")
    if args.output_file is not None and os.path.exists(args.output_file):
        raise UsageError(f"--output_file {args.output_file!r} already exists; pass a new path (nothing is overwritten)")
    if any(s == "" for s in args.stop):
        raise UsageError('--stop "" would stop at once; pass a non-empty string such as --stop "\\n"')


def resolve_settings(args: GenerateArguments, saved: GenerationConfig | None) -> tuple[dict, set]:
    """Flags > the checkpoint's generation_config.json > FALLBACKS; returns (settings, keys from the checkpoint)."""
    settings, from_checkpoint = {}, set()
    for key, fallback in FALLBACKS.items():
        user, stored = getattr(args, key), getattr(saved, key, None)
        if user is not None:
            settings[key] = user
        elif stored is not None:
            settings[key] = stored
            from_checkpoint.add(key)
        else:
            settings[key] = fallback
    if args.greedy:
        settings["do_sample"] = False
    elif args.do_sample is None and args.num_beams is not None and args.num_beams > 1:
        settings["do_sample"] = False  # --num_beams alone asks for (deterministic) beam search
        from_checkpoint.discard("do_sample")
    return settings, from_checkpoint


def check_settings(settings: dict, from_checkpoint: set, context: int) -> None:
    """Combinations that generate() would reject or silently ignore, on the resolved settings."""
    _check_ranges(settings, from_checkpoint)
    beams, sequences = settings["num_beams"], settings["num_return_sequences"]
    if beams > 1 and sequences > beams:
        raise UsageError(f"--num_return_sequences {sequences} is more than --num_beams {beams}; beam search returns "
                         f"at most one sequence per beam: raise --num_beams or lower --num_return_sequences")
    if beams == 1 and not settings["do_sample"] and sequences > 1:
        raise UsageError(f"--num_return_sequences {sequences} with greedy decoding would repeat one sequence; "
                         f"add --do_sample, or --num_beams {sequences}")
    if settings["max_new_tokens"] >= context:
        raise UsageError(f"--max_new_tokens {settings['max_new_tokens']} leaves no room for a prompt in the model's "
                         f"context of {context} tokens; use at most {context - 1}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is unknown; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available here; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r}: MPS is not available here; use --device auto or cpu")
    return device


# --- prompts --------------------------------------------------------------------------------------------------

def read_prompt_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not path.endswith(".jsonl"):
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--prompt_file {path!r} line {number} is not valid JSON ({err}); "
                                 f"write one JSON object per line") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UsageError(f'--prompt_file {path!r} line {number} has no "prompt" string; '
                                 f'write e.g. {{"prompt": "The meaning of life is"}}')
            prompts.append(record["prompt"])
    if not prompts:
        raise UsageError(f"--prompt_file {path!r} holds no prompts; {PROMPT_FILE_HINT}")
    return prompts


def read_prompts(args: GenerateArguments, stdin=None) -> list[str]:
    """--prompt (in order), then --prompt_file; else stdin when it is piped; else one unconditional sample."""
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts and stdin is not None and not stdin.isatty():
        text = stdin.read()
        if text.strip():
            prompts.append(text.removesuffix("\n"))  # the newline `echo` adds is not part of the prompt
    if not prompts:
        logger.info("no prompt given (--prompt, --prompt_file or stdin): sampling unconditionally")
        prompts = [""]
    return prompts


def start_token_id(tokenizer) -> int:
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise UsageError("an empty prompt starts from the tokenizer's bos/eos token, and --tokenizer_name has "
                         "neither; pass a non-empty --prompt")
    return token_id


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, context: int) -> list[list[int]]:
    """Token ids per prompt; "" becomes <|endoftext|> (bos); too long keeps its end, with a warning."""
    encoded = []
    for number, prompt in enumerate(prompts, start=1):
        ids = tokenizer(prompt, verbose=False)["input_ids"] if prompt else [start_token_id(tokenizer)]
        if len(ids) > max_prompt_tokens:
            logger.warning("prompt %d has %d tokens; keeping its last %d so that prompt + --max_new_tokens fits "
                           "the model's context of %d tokens", number, len(ids), max_prompt_tokens, context)
            ids = ids[-max_prompt_tokens:]
        encoded.append(ids)
    return encoded


# --- model and decoding ---------------------------------------------------------------------------------------

def for_batched_generation(tokenizer):
    """The tokenizer from model.load_pretrained, set up for batched generation: pad = eos, left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("--tokenizer_name has neither a pad nor an eos token, so prompts cannot be batched; "
                             "use a tokenizer that has one")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # new tokens must follow the prompt directly
    return tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def build_generation_config(settings: dict, stop: list[str], tokenizer, eos_ids: list[int]) -> GenerationConfig:
    """Unset fields fall back to the model's own generation_config inside generate()."""
    values = {k: v for k, v in settings.items() if k in FALLBACKS}
    if not settings["do_sample"]:
        # transformers' neutral values: otherwise generate() merges in the checkpoint's sampling knobs and warns.
        values.update({k: FALLBACKS[k] for k in SAMPLING_ONLY})
    return GenerationConfig(**values, stop_strings=stop or None, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=eos_ids or None, use_cache=True)


def generate_batch(model, tokenizer, batch: list[list[int]], config: GenerationConfig,
                   streamer=None, stopping_criteria=None) -> list[list[int]]:
    """New token ids of every sample, prompt-major (prompt 0's sequences first), padding included."""
    inputs = tokenizer.pad({"input_ids": batch}, padding=True, padding_side="left", return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config, tokenizer=tokenizer, streamer=streamer,
                                stopping_criteria=stopping_criteria)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def find_stop(text: str, stops: list[str], before: str = "") -> int | None:
    """Where `text` must be cut: the start of the first stop string in it. A stop string may begin in `before`
    (the prompt): generation stops there too, and the cut is then at 0."""
    cuts = []
    for stop in stops:
        lead = before[len(before) - len(stop) + 1:] if len(stop) > 1 else ""
        at = (lead + text).find(stop)
        if at >= 0:
            cuts.append(max(0, at - len(lead)))
    return min(cuts) if cuts else None


def finish_sample(new_ids: list[int], tokenizer, *, eos_ids: list[int], stops: list[str], max_new_tokens: int,
                  prompt: str = "") -> tuple[str, int, str]:
    """(completion, new tokens, finish reason) of one sample from its generated ids (padded to the batch's length)."""
    end, hit_eos = len(new_ids), False
    for i, token in enumerate(new_ids):
        if token in eos_ids or token == tokenizer.pad_token_id:
            end, hit_eos = i, token in eos_ids
            break
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    cut = find_stop(text, stops, prompt)
    if cut is not None:  # an eos right after a stop string is padding (pad = eos), not generated
        return text[:cut], end, "stop_string"
    if hit_eos:
        return text, end + 1, "eos"
    # Stopped short without eos: a stop string that began in the prompt ended the sample.
    return text, end, "length" if end >= max_new_tokens else "stop_string"


class StopStringStreamer(TextStreamer):
    """TextStreamer that never prints a stop string: text that could start one is held back until it cannot."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stops, self.out = stops, out or sys.stdout
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        self.pending += text
        cut = find_stop(self.pending, self.stops)
        if cut is not None:
            self.pending, self.stopped = self.pending[:cut], True
        keep = 0 if (stream_end or self.stopped) else self.hold
        split = max(0, len(self.pending) - keep)
        ready, self.pending = self.pending[:split], self.pending[split:]
        self.out.write(ready)
        self.out.flush()


def sample(model, tokenizer, prompts: list[str], encoded: list[list[int]], settings: dict, stop: list[str],
           batch_size: int, stream_to=None, stopping_criteria=None):
    """Yield, per batch, one record per sample: prompt, completion, new_tokens, finish_reason, seconds (the batch's)."""
    eos_ids = eos_token_ids(model, tokenizer)
    config = build_generation_config(settings, stop, tokenizer, eos_ids)
    sequences = settings["num_return_sequences"]
    for first in range(0, len(prompts), batch_size):
        batch = encoded[first:first + batch_size]
        streamer = StopStringStreamer(tokenizer, stop, stream_to) if stream_to is not None else None
        start = time.perf_counter()
        new_ids = generate_batch(model, tokenizer, batch, config, streamer, stopping_criteria)
        seconds = time.perf_counter() - start
        records = []
        for row, ids in enumerate(new_ids):
            index = first + row // sequences
            completion, new_tokens, reason = finish_sample(
                ids, tokenizer, eos_ids=eos_ids, stops=stop, max_new_tokens=settings["max_new_tokens"],
                prompt=prompts[index])
            records.append({"prompt_index": index, "sample_index": row % sequences, "prompt": prompts[index],
                            "completion": completion, "new_tokens": new_tokens, "finish_reason": reason,
                            "prompt_tokens": len(encoded[index]), "seconds": round(seconds, 4)})
        yield records


class CancelCriteria(StoppingCriteria):
    """Ends generation at the next token once `event` is set (a user pressed Stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueOut:
    """A file-like target for StopStringStreamer that hands each written piece to another thread."""

    def __init__(self):
        self.pieces = queue.Queue()

    def write(self, text: str) -> None:
        if text:
            self.pieces.put(text)

    def flush(self) -> None:
        pass


def stream_sample(model, tokenizer, prompt: str, prompt_ids: list[int], settings: dict, stop: list[str],
                  cancel: threading.Event | None = None):
    """One prompt, one sequence, as a generator: yields the completion's text pieces as generate.py prints them
    (stop strings held back), then sample()'s record (a dict). Setting `cancel`, or closing the generator, ends
    generation at the next token. For callers that cannot read from a streamed stdout (e.g. a web page)."""
    cancel = cancel or threading.Event()
    out, finished, result = _QueueOut(), object(), {}

    def run():
        try:
            (result["record"],) = next(sample(model, tokenizer, [prompt], [prompt_ids], settings, stop, 1,
                                              stream_to=out, stopping_criteria=[CancelCriteria(cancel)]))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = err
        finally:
            out.pieces.put(finished)

    worker = threading.Thread(target=run, name="wikigpt-generate", daemon=True)
    worker.start()
    drained = False
    try:
        while (piece := out.pieces.get()) is not finished:
            yield piece
        drained = True
    finally:
        if not drained:
            cancel.set()  # a consumer that stops reading early stops the model too
        worker.join()
    if "error" in result:
        raise result["error"]
    yield result["record"]


def can_stream(args: GenerateArguments, prompts: list[str], settings: dict) -> bool:
    # TextStreamer takes one sequence; generate() refuses a streamer with beam search.
    return args.stream and len(prompts) == 1 and settings["num_return_sequences"] == 1 and settings["num_beams"] == 1


def public_settings(settings: dict, **extra) -> dict:
    """What a record says was used: sampling knobs only when sampling."""
    shown = {k: v for k, v in settings.items() if settings["do_sample"] or k not in SAMPLING_ONLY}
    return {**shown, **extra}


class JsonlWriter:
    """Records go to PATH.partial as they come (an interrupted run keeps them); renamed to PATH when done."""

    def __init__(self, path: str):
        self.path, self.partial = path, path + ".partial"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.partial, "w", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            logger.warning("stopped early; the samples written so far are in %s", self.partial)
        return False
