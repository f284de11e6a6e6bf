"""generate.py's flags and the decoding settings they resolve to, checked before and after the model
loads.

Settings are layered: the user's flags > the checkpoint's saved generation_config.json > FALLBACKS.
Our own range and combination checks run first, so a bad value fails in one line naming its flag
(transformers' GenerationConfig.validate() also runs, in wikigpt.generation.sampling, but lets e.g.
a negative temperature through).
"""

import os
import re
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from wikigpt.errors import UsageError
from wikigpt.model import pick_device
from wikigpt.generation.prompts import PROMPT_FILE_HINT

# Used when neither a flag nor the checkpoint's generation_config.json sets a value.
FALLBACKS = dict(
    max_new_tokens=100,
    do_sample=True,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    typical_p=1.0,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    num_beams=1,
    num_return_sequences=1,
)
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p")


def _flag(help_text: str, **argparse_kwargs) -> dict:
    return {"help": help_text, **argparse_kwargs}


def _knob(help_text: str, key: str, **argparse_kwargs) -> dict:
    """A decoding setting: unset (None) means the checkpoint's generation_config value, else
    FALLBACKS[key]."""
    return _flag(
        f"{help_text}. Unset: the checkpoint's generation_config value, else {FALLBACKS[key]}.",
        **argparse_kwargs,
    )


@dataclass
class GenerateArguments:
    model: str = field(
        default="gpt2",
        metadata=_flag(
            "Checkpoint to sample from: a local folder (e.g. a train.py --output_dir) or a Hub id."
        ),
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata=_flag("Tokenizer (Hub id or local folder). Default: the one saved with --model."),
    )
    prompt: list[str] = field(
        default_factory=list,
        metadata=_flag(
            'A prompt; repeat the flag for several. "" samples unconditionally from <|endoftext|>.',
            action="append",
        ),
    )
    prompt_file: str | None = field(
        default=None,
        metadata=_flag(
            "Prompts, one per line (blank lines skipped), "
            'or a .jsonl file with a "prompt" field per line.'
        ),
    )
    output_file: str | None = field(
        default=None,
        metadata=_flag(
            "Write one JSON record per sample to this .jsonl file (an existing file is never "
            "overwritten)."
        ),
    )
    max_new_tokens: int | None = field(
        default=None, metadata=_knob("Tokens to generate per sample", "max_new_tokens")
    )
    do_sample: bool | None = field(
        default=None,
        metadata=_knob(
            "Sample; --do_sample false decodes greedily (or by beam search)",
            "do_sample",
            nargs="?",
            const=True,
        ),
    )
    greedy: bool = field(default=False, metadata=_flag("Shortcut for --do_sample false."))
    temperature: float | None = field(
        default=None, metadata=_knob("Sampling temperature, > 0", "temperature")
    )
    top_k: int | None = field(
        default=None, metadata=_knob("Sample from the k likeliest tokens (0 = all)", "top_k")
    )
    top_p: float | None = field(
        default=None, metadata=_knob("Nucleus sampling mass in (0, 1] (1 = off)", "top_p")
    )
    typical_p: float | None = field(
        default=None, metadata=_knob("Typical sampling mass in (0, 1] (1 = off)", "typical_p")
    )
    repetition_penalty: float | None = field(
        default=None,
        metadata=_knob("> 1 discourages repeated tokens (1 = off)", "repetition_penalty"),
    )
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata=_knob("Never repeat an n-gram of this size (0 = off)", "no_repeat_ngram_size"),
    )
    num_beams: int | None = field(
        default=None,
        metadata=_knob(
            "Beam search with this many beams; greedy beam search unless --do_sample is given",
            "num_beams",
        ),
    )
    num_return_sequences: int | None = field(
        default=None, metadata=_knob("Sequences per prompt", "num_return_sequences")
    )
    stop: list[str] = field(
        default_factory=list,
        metadata=_flag(
            r"Stop at this string and cut it off; repeat for several. \n and \t are understood, "
            r"e.g. --stop '\n\n'.",
            action="append",
        ),
    )
    seed: int | None = field(
        default=None,
        metadata=_flag(
            "Random seed; the same seed and flags give the same samples. Default: a fresh one, "
            "reported in the records."
        ),
    )
    batch_size: int = field(default=8, metadata=_flag("Prompts per model.generate call."))
    device: str = field(
        default="auto", metadata=_flag("auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps.")
    )
    dtype: str = field(
        default="auto",
        metadata=_flag(
            "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."
        ),
    )
    stream: bool = field(
        default=True,
        metadata=_flag(
            "Print tokens as they come (one prompt, one sequence, no beams); "
            "--no_stream prints at the end."
        ),
    )
    echo_prompt: bool = field(
        default=True,
        metadata=_flag(
            "Print the prompt before its continuation; "
            "--no_echo_prompt prints the continuation only."
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_flag("Allow code from the checkpoint's repo to run.")
    )
    allow_pickle: bool = field(
        default=False,
        metadata=_flag(
            "Allow pickle weights (pytorch_model.bin); they can run "
            "code when loaded. Default: safetensors only."
        ),
    )

    def __post_init__(self):
        # action="append" with nargs="+" gives one list per flag; unquoted words of one flag form
        # one prompt.
        self.prompt = [" ".join(p) if isinstance(p, list) else p for p in self.prompt]
        self.stop = [unescape(" ".join(s) if isinstance(s, list) else s) for s in self.stop]


def unescape(text: str) -> str:
    """Shell quoting keeps \\n literal; stop strings are nearly always newlines, so read \\n, \\t
    and \\\\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# --- checks ---------------------------------------------------------------------------------------

RANGES = {  # key: (is it valid, what to say)
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (
        lambda v: v > 0,
        "must be > 0 when sampling; for greedy decoding pass --greedy",
    ),
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
            where = (
                " (it comes from the checkpoint's generation_config.json; "
                "override it with the flag)"
                if key in from_checkpoint
                else ""
            )
            raise UsageError(f"--{key} {value} {rule}{where}")


def check_arguments(args: GenerateArguments) -> None:
    """Everything that can be checked before the model is loaded."""
    if args.greedy and args.do_sample:
        raise UsageError("--greedy and --do_sample contradict each other; pass only one of them")
    do_sample = False if args.greedy else args.do_sample
    _check_ranges({**vars(args), "do_sample": do_sample})
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        raise UsageError(
            f"--prompt_file {args.prompt_file!r} does not exist or is not a file; "
            f"{PROMPT_FILE_HINT}"
        )
    if args.output_file is not None and os.path.exists(args.output_file):
        raise UsageError(
            f"--output_file {args.output_file!r} already exists; "
            "pass a new path (nothing is overwritten)"
        )
    if any(s == "" for s in args.stop):
        raise UsageError(
            '--stop "" would stop at once; pass a non-empty string such as --stop "\\n"'
        )


def resolve_settings(args: GenerateArguments, saved: GenerationConfig | None) -> tuple[dict, set]:
    """Flags > the checkpoint's generation_config.json > FALLBACKS; returns (settings, keys from the
    checkpoint)."""
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
        raise UsageError(
            f"--num_return_sequences {sequences} is more than --num_beams {beams}; beam search "
            "returns at most one sequence per beam: "
            "raise --num_beams or lower --num_return_sequences"
        )
    if beams == 1 and not settings["do_sample"] and sequences > 1:
        raise UsageError(
            f"--num_return_sequences {sequences} with greedy decoding would repeat one sequence; "
            f"add --do_sample, or --num_beams {sequences}"
        )
    if settings["max_new_tokens"] >= context:
        raise UsageError(
            f"--max_new_tokens {settings['max_new_tokens']} leaves no room for a prompt in the "
            f"model's context of {context} tokens; use at most {context - 1}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(
            f"--device {name!r} is unknown; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available here; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r}: MPS is not available here; use --device auto or cpu")
    return device
