"""Model and tokenizer: GPT-2 presets built locally from GPT2Config, config overrides, or a
checkpoint.

The one loader of the scripts: train.py builds or loads its model with `load_model`; eval.py,
generate.py and the demo load a checkpoint with its tokenizer through `load_pretrained`. Both go
through `load_causal_lm`, `load_tokenizer` and `check_vocabulary`, so every script reads weights and
tokenizers the same way.
"""

import ast
import glob
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from wikigpt.errors import UsageError, loading
from wikigpt.padded_vocab import check_pad_vocab_args, pad_vocab, padded_size

# Sizes from the GPT-2 paper (Radford et al., 2019); `tiny` is a CPU smoke model (< 1M non-embedding
# params).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
DEFAULT_PRESET = "gpt2"
# GPT-2's GELU (tanh approximation) through torch's fused kernel: the formula of GPT2Config's
# "gelu_new", which transformers computes with six separate elementwise ops; CPU steps 5-7% faster
# at 4 x 4 x 256 (docs/speed.md). Any transformers version loads it; --config_overrides
# activation_function=gelu_new restores the Python one.
FROM_SCRATCH_DEFAULTS = {"activation_function": "gelu_pytorch_tanh"}
# Bookkeeping fields of the config file, not architecture.
NOT_OVERRIDABLE = {
    "transformers_version",
    "architectures",
    "model_type",
    "dtype",
    "vocab_size",
    "id2label",
    "label2id",
}
DEFAULT_TOKENIZER = "gpt2"
TOKENIZER_HINT = (
    "to run offline pass --tokenizer_name DIR, a local folder holding the GPT-2 tokenizer files"
)
CHECKPOINT_HINT = "to run offline pass a local checkpoint folder (config.json + model.safetensors)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    _argument_group_name = "model"  # its title in --help (HfArgumentParser)

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this checkpoint (Hub id or local folder). Default: a new model "
            "from --preset."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": f"From-scratch model size: {', '.join(PRESETS)}. Default: {DEFAULT_PRESET}."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch only: GPT2Config fields, e.g. "
            '"n_layer=6,n_embd=384,resid_pdrop=0.2".'
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or local folder). Default: the checkpoint's, else gpt2."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the checkpoint's repo to run."}
    )
    allow_pickle: bool = field(
        default=False,
        metadata={
            "help": "Also load pickle weights (pytorch_model.bin), which can run code when loaded. "
            "Default: safetensors only."
        },
    )
    pad_vocab_multiple: int | None = field(
        default=None,
        metadata={
            "help": "From scratch only: pad the embedding and LM head to a multiple of this (e.g. "
            "64) for faster GPU matmuls; the tokenizer, loss and perplexity keep the real "
            "vocabulary. Default: off."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel, as transformers' attn_implementation: sdpa, eager or "
            "flash_attention_2 (GPU, needs flash-attn); a --distill_from teacher uses the "
            "same. Default: sdpa."
        },
    )


def _check_type(key: str, value, default):
    """Overrides take the type of GPT2Config's default; ints are accepted for float fields."""
    if default is None:
        return value  # optional fields such as n_inner: any literal
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(
            f"--config_overrides {key}={value!r} has the wrong type: {key} takes "
            f"{type(default).__name__} (default {default!r})"
        )
    return value


def parse_config_overrides(text: str) -> dict:
    """Parse "key=value,key=value" into typed GPT2Config fields; unknown keys and wrong types are
    errors."""
    defaults = {
        k: v
        for k, v in GPT2Config().to_dict().items()
        if k not in NOT_OVERRIDABLE and not k.startswith("_")
    }
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw_value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise UsageError(
                f"--config_overrides item {item!r} is not key=value; write e.g. "
                '"n_layer=6,n_embd=384"'
            )
        if key not in defaults:
            raise UsageError(
                f"--config_overrides key {key!r} is not a GPT2Config field; check the spelling "
                f"(e.g. n_layer, n_head, n_embd, n_positions, resid_pdrop)"
            )
        try:
            value = ast.literal_eval(raw_value)
        except (ValueError, SyntaxError):
            value = raw_value  # a bare word, e.g. activation_function=gelu_new
        overrides[key] = _check_type(key, value, defaults[key])
    return overrides


def build_config(
    preset: str | None, config_overrides: str | None, vocab_size: int, eos_token_id: int
) -> GPT2Config:
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    fields = {**FROM_SCRATCH_DEFAULTS, **PRESETS[name]}
    if config_overrides:
        fields.update(parse_config_overrides(config_overrides))
    config = GPT2Config(
        vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, **fields
    )
    if config.n_embd % config.n_head:
        raise UsageError(
            f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}); "
            f"fix --preset/--config_overrides"
        )
    return config


def tokenizer_for(args: ModelArguments) -> str:
    """train.py's tokenizer: --tokenizer_name, else the checkpoint's, else gpt2's."""
    return args.tokenizer_name or args.model_name_or_path or DEFAULT_TOKENIZER


def load_tokenizer(name: str, trust_remote_code: bool = False):
    # Errors name --tokenizer_name even when the name came from the model flag: that is the flag
    # that fixes them.
    with loading("--tokenizer_name", name, TOKENIZER_HINT):
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def check_vocabulary(tokenizer, model, whose: str, fix: str) -> None:
    """A tokenizer with more tokens than the model has embedding rows would index past them
    mid-run."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UsageError(
            f"--tokenizer_name has {len(tokenizer)} tokens but the {whose} vocabulary has {vocab}; "
            f"{fix}"
        )


def check_model_args(args: ModelArguments) -> None:
    """Argument combinations that cannot work, before anything is loaded."""
    if args.model_name_or_path and args.config_overrides:
        raise UsageError(
            "--config_overrides only applies to a model built from scratch; drop it, "
            "or drop --model_name_or_path to train a new model"
        )
    if args.model_name_or_path and args.preset:
        raise UsageError(
            "--preset builds a new model and --model_name_or_path loads one; pass only one of them"
        )
    if args.model_name_or_path and os.path.isfile(args.model_name_or_path):
        raise UsageError(
            f"--model_name_or_path {args.model_name_or_path!r} is a file; pass the checkpoint "
            "folder"
        )
    check_pad_vocab_args(args.pad_vocab_multiple, args.model_name_or_path)


def load_model(args: ModelArguments, tokenizer):
    """Returns (model, source) where `source` says truthfully where the weights came from."""
    check_model_args(args)
    if args.model_name_or_path:
        model = load_causal_lm(
            args.model_name_or_path,
            flag="--model_name_or_path",
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
        )
        check_vocabulary(tokenizer, model, "checkpoint's", "use the checkpoint's own tokenizer")
        source = {"kind": "pretrained", "base_model": args.model_name_or_path}
    else:
        config = build_config(
            args.preset, args.config_overrides, len(tokenizer), tokenizer.eos_token_id
        )
        model = mark_causal_lm_loss(GPT2LMHeadModel(config))
        if args.pad_vocab_multiple:
            pad_vocab(model, args.pad_vocab_multiple)
        source = {
            "kind": "from_scratch",
            "preset": args.preset or DEFAULT_PRESET,
            "config_overrides": args.config_overrides,
        }
        if args.pad_vocab_multiple:
            source["vocab_padded_to"] = padded_size(
                model.config.vocab_size, args.pad_vocab_multiple
            )
    if args.attn_implementation:
        use_attention(model, args.attn_implementation)
    source["parameters"] = model.num_parameters()
    source["non_embedding_parameters"] = non_embedding_parameters(model)
    return model, source


def use_attention(model, implementation: str) -> None:
    """transformers' own switch; its refusal (unknown name, missing package) becomes one line naming
    the flag."""
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as error:
        raise UsageError(
            f"--attn_implementation {implementation!r} cannot be used: {error} Pass eager or sdpa, "
            f"or drop the flag"
        ) from None


def non_embedding_parameters(model) -> int:
    embeddings = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    position = getattr(getattr(model, "transformer", None), "wpe", None)
    if position is not None:
        embeddings |= {id(p) for p in position.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def describe_source(source: dict) -> str:
    if source["kind"] == "pretrained":
        return f"fine-tuned from {source['base_model']}"
    extra = (
        f" with overrides {source['config_overrides']}" if source.get("config_overrides") else ""
    )
    return (
        f"trained from scratch (preset {source['preset']}{extra}; random initialisation, not gpt2 "
        "weights)"
    )


def context_length(config) -> int:
    """Longest sequence the model takes (GPT-2: n_positions; most other causal LMs:
    max_position_embeddings)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def load_causal_lm(
    name: str,
    *,
    flag: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
):
    """Any causal-LM checkpoint (Hub id or local folder); a failed load becomes one line naming
    `flag`.

    Safetensors only unless `allow_pickle`: unpickling a pytorch_model.bin can run arbitrary code.
    """
    if os.path.isfile(name):
        raise UsageError(
            f"{flag} {name!r} is a file; pass the checkpoint folder (config.json + "
            "model.safetensors)"
        )
    # A Hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(
            f"{flag} {name!r} does not exist; pass a checkpoint folder (config.json + "
            f"model.safetensors, e.g. train.py's --output_dir) or a Hub id"
        )
    if (
        not allow_pickle
        and os.path.isdir(name)
        and not glob.glob(os.path.join(name, "*.safetensors"))
    ):
        pickles = sorted(
            os.path.basename(p) for p in glob.glob(os.path.join(name, "pytorch_model*.bin"))
        )
        if pickles:
            raise UsageError(
                f"{flag} {name!r} holds only pickle weights ({', '.join(pickles)}), which can run "
                "code when loaded; convert them to safetensors, or pass --allow_pickle if you "
                "trust the source"
            )
    with loading(flag, name, CHECKPOINT_HINT):
        model = AutoModelForCausalLM.from_pretrained(
            name,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
        )
    return mark_causal_lm_loss(model)


def load_pretrained(
    name: str,
    tokenizer_name: str | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    vocab_fix: str = "use the checkpoint's own tokenizer",
):
    """(model, tokenizer) of checkpoint `name` for eval.py, generate.py and the demo (--model,
    --tokenizer_name).

    The tokenizer is `tokenizer_name` when given, else the checkpoint's own; the model is on
    `device`, in eval mode. `vocab_fix` ends the error for a tokenizer larger than the model's
    vocabulary.
    """
    model = load_causal_lm(
        name,
        flag="--model",
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        allow_pickle=allow_pickle,
    )
    tokenizer = load_tokenizer(tokenizer_name or name, trust_remote_code)
    check_vocabulary(tokenizer, model, "model's", vocab_fix)
    return model.to(device).eval(), tokenizer


def mark_causal_lm_loss(model):
    """Name the loss of classes such as GPT2LMHeadModel, whose names transformers cannot map to one.

    With `loss_type` None the Trainer counts a batch's tokens without the causal shift (B*T instead
    of B*(T-1)), so its loss and eval_loss come out (T-1)/T too low: 1.6% at block 64, 0.1% at 1024
    (seen with transformers 5.23). The model itself already uses the causal-LM loss.
    """
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def pick_device() -> torch.device:
    """The device accelerate (and so the Trainer) would use here: CUDA > MPS > other accelerators >
    CPU."""
    from accelerate import PartialState

    return PartialState().device


def resolve_dtype(name: str | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """`auto`/None: bfloat16 on a GPU that supports it, else float32; otherwise one of DTYPES."""
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"{flag} {name!r} is unknown; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
