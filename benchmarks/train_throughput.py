"""Training throughput: wikigpt's train.py path vs a plain run_clm-style Trainer, in one process.

    python benchmarks/train_throughput.py                 # GPU: GPT-2 124M, 16 x 1024, bf16
    python benchmarks/train_throughput.py --levers true   # + one lever at a time on the plain setup
    # CPU smoke:
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --preset tiny --block_size 64 \
        --batch_size 4 --steps 6 --warmup_steps 2 --levers true \
        --output_json benchmarks/results/cpu_tiny.json

Both setups run N real optimizer steps through `Trainer.train()` on the same WikiText-2 blocks; the
first --warmup_steps (compilation, allocator warm-up) are not timed. ms/step is wall time per
optimizer step (CUDA synchronised), data loading included. MFU uses wikigpt.train.throughput's 6N +
12·L·H·Q·T per token of the unpadded model for every row (padding adds no useful work). Peak memory:
torch.cuda.max_memory_allocated on a GPU; on CPU the process's peak RSS (VmHWM, reset before each
run). See benchmarks/README.md.
"""

import gc
import logging
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as train.py sets it: time what users run
import platform
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,  # noqa: E402
    default_data_collator,
    set_seed,
)

from wikigpt.objectives.chunked_loss import check_chunked_loss_args, use_chunked_loss  # noqa: E402
from wikigpt.cli import parse_args  # noqa: E402
from wikigpt.train.cpu_memory import keep_freed_memory  # noqa: E402
from wikigpt.atomic_json import write_json_atomic  # noqa: E402
from wikigpt.errors import UsageError, run_main  # noqa: E402
from wikigpt.data.blocks import (
    DataArguments,
    load_raw_splits,
    prepare_lm_splits,
    resolve_block_size,
)  # noqa: E402
from wikigpt.model import (
    DEFAULT_TOKENIZER,
    PRESETS,
    load_model,
    load_tokenizer,
    parse_config_overrides,
)  # noqa: E402
from wikigpt.padded_vocab import head_width, pad_vocab  # noqa: E402
from wikigpt.train.precision import cpu_has_native_bf16  # noqa: E402
from wikigpt.train.run import build_run, parse_run_args, train_run  # noqa: E402
from wikigpt.train.throughput import (  # noqa: E402
    current_device_name,
    model_flops_per_token,
    resolve_peak_flops,
)

from nanogpt_model import GPT, GPTConfig  # noqa: E402

logger = logging.getLogger("wikigpt.benchmark")
DATA = REPO / "data"
GPU_CONFIG = REPO / "configs" / "gpu_fast.yaml"
CPU_WIKIGPT_ARGS = (
    "--pad_vocab_multiple 64"  # the CPU-runnable levers (gpu_fast.yaml needs CUDA: bf16, tf32)
)
JSON_VERSION = 2


@dataclass
class BenchmarkArguments:
    preset: str = field(
        default="gpt2", metadata={"help": "Model size (wikigpt preset) for every setup."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "GPT2Config fields on top of the preset for every setup (nanoGPT too), e.g. "
            '"n_layer=4,n_head=4,n_embd=256,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0".'
        },
    )
    block_size: int = field(default=1024, metadata={"help": "Tokens per block."})
    batch_size: int = field(
        default=16, metadata={"help": "Blocks per optimizer step (one device)."}
    )
    steps: int = field(
        default=30, metadata={"help": "Optimizer steps per setup, warm-up included."}
    )
    warmup_steps: int = field(
        default=5, metadata={"help": "First steps not timed (torch.compile, allocator)."}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Trainer logging interval for every setup (a log syncs)."}
    )
    tokenizer_name: str = field(
        default=str(DATA / "gpt2-tokenizer"), metadata={"help": "Tokenizer folder or id."}
    )
    train_file: str = field(
        default=str(DATA / "wikitext-2-raw" / "wiki.valid.raw"),
        metadata={"help": "Text the training blocks come from (content does not affect speed)."},
    )
    test_file: str = field(
        default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
        metadata={"help": "Second WikiText-2 split for the preprocessing measurement."},
    )
    wikigpt_config: str | None = field(
        default=None,
        metadata={
            "help": "train.py config file for the wikigpt setup (default: configs/gpu_fast.yaml "
            "on CUDA; none on CPU)."
        },
    )
    wikigpt_args: str | None = field(
        default=None,
        metadata={
            "help": f"Extra train.py flags for the wikigpt setup (default on CPU: "
            f"'{CPU_WIKIGPT_ARGS}')."
        },
    )
    chunked_loss_size: int = field(
        default=4096,
        metadata={
            "help": "Tokens per chunk for the chunked_loss lever "
            "(a batch of 16 x 1024 is 4 chunks)."
        },
    )
    levers: bool = field(
        default=False, metadata={"help": "Also time each lever alone on top of the plain setup."}
    )
    wikigpt_levers: bool = field(
        default=False,
        metadata={
            "help": "Also time train.py's path with one flag changed "
            "at a time (compile, bf16/fp32, chunked loss, ...)."
        },
    )
    references: bool = field(
        default=True,
        metadata={
            "help": "Also time a hand-written PyTorch loop over the wikigpt "
            "model and nanoGPT's model and loop at the same shape."
        },
    )
    bf16_rows: bool | None = field(
        default=None,
        metadata={
            "help": "Time the bf16 variants on CPU (default: only where the CPU multiplies bf16 "
            "natively; elsewhere bf16 matmuls are many times slower than fp32)."
        },
    )
    probe_seconds: float = field(
        default=5.0,
        metadata={
            "help": "Matmul probe: skip a shape whose one call would "
            "take longer than this (estimated from smaller ones)."
        },
    )
    lever_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated subset of the optional rows "
            "(levers, wikigpt levers, references) to time."
        },
    )
    preprocessing: bool = field(
        default=True, metadata={"help": "Time tokenize+group of WT2 valid+test (cold/cached)."}
    )
    preprocessing_num_workers: int = field(
        default=2, metadata={"help": "Processes for the preprocessing timing."}
    )
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Peak FLOP/s of the device for MFU (default: wikigpt.train.throughput's table)."
        },
    )
    output_json: str | None = field(
        default=None, metadata={"help": "Write the results here as JSON."}
    )
    repeats: int = field(
        default=1,
        metadata={
            "help": "Run every setup this many times (round-robin); report the median ms/step."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for model init and data order."})


# --------------------------------------------------------------------------------------------------
# The plain setup and its levers


@dataclass
class PlainSetup:
    """run_clm-style: GPT2LMHeadModel from GPT2Config, TrainingArguments defaults except batch (and
    bf16 on GPU)."""

    name: str = "plain"
    lever: str = "run_clm defaults (transformers " + transformers.__version__ + ")"
    pad_vocab_multiple: int | None = None
    chunked_loss_size: int | None = None
    attn_implementation: str | None = None  # None: transformers' default (sdpa in 5.x)
    dropout: float | None = None  # None: GPT2Config's 0.1
    training: dict = field(default_factory=dict)  # TrainingArguments overrides


def lever_setups(on_gpu: bool, chunked_loss_size: int = 4096) -> list[PlainSetup]:
    """One lever at a time on top of the plain setup. Levers that transformers already turns on by
    default (fused AdamW, SDPA, pinned memory) are turned *off* instead: their row shows what the
    default buys."""
    setups = [
        PlainSetup(
            "pad_vocab_64",
            "vocab padded to a multiple of 64 (50257 -> 50304)",
            pad_vocab_multiple=64,
        ),
        PlainSetup("torch_compile", "torch_compile=True", training={"torch_compile": True}),
        PlainSetup(
            "chunked_loss",
            f"loss from hidden states in chunks of {chunked_loss_size} tokens (no full-batch "
            f"logits)",
            chunked_loss_size=chunked_loss_size,
        ),
        PlainSetup(
            "unfused_adamw",
            "OFF: optim=adamw_torch (default is adamw_torch_fused)",
            training={"optim": "adamw_torch"},
        ),
        PlainSetup(
            "eager_attention",
            "OFF: attn_implementation=eager (default is sdpa)",
            attn_implementation="eager",
        ),
        PlainSetup(
            "dataloader_workers",
            "dataloader_num_workers=2, persistent workers",
            training={"dataloader_num_workers": 2, "dataloader_persistent_workers": True},
        ),
        PlainSetup(
            "no_pin_memory",
            "OFF: dataloader_pin_memory=False (default True)",
            training={"dataloader_pin_memory": False},
        ),
        PlainSetup("dropout_0", "dropout 0 (attn, resid, embd)", dropout=0.0),
    ]
    if on_gpu:
        setups.insert(4, PlainSetup("tf32", "tf32=True", training={"tf32": True}))
    return setups


# --------------------------------------------------------------------------------------------------
# Measuring


class StepTimer(TrainerCallback):
    """Wall clock at the end of every optimizer step (after a CUDA sync: queued kernels count)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def reset_peak_memory() -> None:
    gc.collect()  # the previous setup's model and optimizer state
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(
                        line.split()[1]
                    ) / 1024, "process peak RSS (CPU, VmHWM reset before the run)"
    except OSError:
        pass
    return resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss / 1024, "process max RSS so far (CPU, ru_maxrss)"


def float32_matmul_state():
    # torch >= 2.9 (which transformers' tf32=True then uses): reading the legacy allow_tf32 flags
    # after the new fp32_precision API has been set raises, so save whichever API is there.
    if hasattr(torch.backends, "fp32_precision"):
        return ("new", torch.backends.fp32_precision)
    return ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def restore_float32_matmul_state(state) -> None:
    # TrainingArguments(tf32=True) flips process-wide flags; later setups must not inherit them.
    if state[0] == "new":
        torch.backends.fp32_precision = state[1]
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1:]


def timed_train(
    trainer: Trainer,
    bench: BenchmarkArguments,
    tokens_per_step: int,
    flops_per_token: int,
    peak_flops: float | None,
    train=None,
) -> dict:
    timer = StepTimer()
    trainer.add_callback(timer)
    reset_peak_memory()
    start = time.perf_counter()
    (train or trainer.train)()
    total = time.perf_counter() - start
    memory, memory_kind = peak_memory()
    timed = (
        timer.times[bench.warmup_steps - 1 :] if bench.warmup_steps > 0 else [start, *timer.times]
    )
    ms_per_step = 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens_per_second = tokens_per_step * 1000 / ms_per_step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "ms_per_step": round(ms_per_step, 3),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": float(f"{tokens_per_second * flops_per_token / peak_flops:.4g}")
        if peak_flops
        else None,
        "peak_memory_mib": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "timed_steps": len(timed) - 1,
        "total_seconds_with_warmup": round(total, 2),
        "last_logged_loss": losses[-1] if losses else None,
    }


def forget_compiled() -> None:
    torch._dynamo.reset()  # compiled graphs of one setup must not serve the next


# --------------------------------------------------------------------------------------------------
# The two setups


def plain_config(bench: BenchmarkArguments, tokenizer, dropout: float | None) -> GPT2Config:
    fields = dict(PRESETS[bench.preset])
    fields.update(parse_config_overrides(bench.config_overrides or ""))
    if dropout is not None:
        fields.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )


def run_plain(
    setup: PlainSetup, bench, tokenizer, train_blocks, out_dir, on_gpu, flops, peaks
) -> dict:
    set_seed(bench.seed)
    config = plain_config(bench, tokenizer, setup.dropout)
    kwargs = {"attn_implementation": setup.attn_implementation} if setup.attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    if setup.pad_vocab_multiple:
        pad_vocab(model, setup.pad_vocab_multiple)
    if setup.chunked_loss_size:
        use_chunked_loss(model, setup.chunked_loss_size)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, setup.name),
        per_device_train_batch_size=bench.batch_size,
        bf16=on_gpu,
        max_steps=bench.steps,
        logging_steps=bench.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=bench.seed,
        **setup.training,
    )
    peak = peaks.get("bf16" if args.bf16 else "fp32")
    fp32_state = float32_matmul_state()
    try:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_blocks,
            processing_class=tokenizer,
            data_collator=default_data_collator,
        )
        result = timed_train(trainer, bench, bench.batch_size * bench.block_size, flops, peak)
    finally:
        restore_float32_matmul_state(fp32_state)
    result.update(
        name=setup.name,
        lever=setup.lever,
        attn_implementation=model.config._attn_implementation,
        optim=str(args.optim.value),
        vocab_size=head_width(model),
        bf16=args.bf16,
        torch_compile=args.torch_compile,
        peak_flops=peak,
    )
    forget_compiled()
    return result


def wikigpt_argv(bench: BenchmarkArguments, on_gpu: bool, out_dir: str) -> list[str]:
    config = (
        bench.wikigpt_config
        if bench.wikigpt_config is not None
        else (str(GPU_CONFIG) if on_gpu else "")
    )
    extra = (
        bench.wikigpt_args
        if bench.wikigpt_args is not None
        else ("" if on_gpu else CPU_WIKIGPT_ARGS)
    )
    return [
        *([config] if config else []),
        "--preset",
        bench.preset,
        *(["--config_overrides", bench.config_overrides] if bench.config_overrides else []),
        "--tokenizer_name",
        bench.tokenizer_name,
        "--train_file",
        bench.train_file,
        "--validation_file",
        bench.test_file,
        "--block_size",
        str(bench.block_size),
        "--per_device_train_batch_size",
        str(bench.batch_size),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(bench.steps),
        "--logging_steps",
        str(bench.logging_steps),
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        str(bench.seed),
        "--output_dir",
        os.path.join(out_dir, "wikigpt"),
        "--overwrite_output_dir",
        "true",
        *shlex.split(extra),
    ]


def describe_wikigpt(bench: BenchmarkArguments, argv: list[str]) -> str:
    config = (
        os.path.relpath(argv[0], REPO)
        if argv[0].endswith((".yaml", ".yml", ".json"))
        else "defaults"
    )
    extra = " ".join(argv[argv.index("true", argv.index("--overwrite_output_dir")) + 1 :])
    return f"train.py {config} {extra}".strip()


def run_wikigpt(bench, argv, flops, peaks, name: str = "wikigpt") -> dict:
    """train.py's own path: wikigpt.train.run's build_run and train_run (no final save/eval: only
    training is timed)."""
    run = build_run(*parse_run_args(argv))
    peak = peaks.get("bf16" if run.training_args.bf16 else "fp32")
    fp32_state = float32_matmul_state()
    try:
        result = timed_train(
            run.trainer, bench, run.tokens_per_step, flops, peak, train=lambda: train_run(run)
        )
    finally:
        restore_float32_matmul_state(fp32_state)
    model, training_args = run.model, run.training_args
    result.update(
        name=name,
        lever=describe_wikigpt(bench, argv),
        train_py_args=argv,
        attn_implementation=model.config._attn_implementation,
        optim=str(training_args.optim.value),
        vocab_size=head_width(model),
        bf16=training_args.bf16,
        torch_compile=training_args.torch_compile,
        peak_flops=peak,
    )
    forget_compiled()
    return result


def wikigpt_lever_flags(
    bench: BenchmarkArguments, default_bf16: bool, bf16_rows: bool
) -> list[tuple[str, str]]:
    """(row name, train.py flags): train.py's path with one flag changed at a time."""
    flags = [
        ("wikigpt+compile", "--torch_compile true"),
        ("wikigpt+chunked_loss", f"--chunked_loss_size {bench.chunked_loss_size}"),
        # exact: the tokens the training data never contains share one row
        # (wikigpt/objectives/rare_tokens.py)
        ("wikigpt+tie_tokens", "--rare_tokens_below 1"),
        # tokens seen once (2) or at most twice (3, the CPU recipe's) join them: a modelling choice,
        # rare tokens as one class, which the held-out articles chose for quality (docs/results.md)
        ("wikigpt+tie_tokens2", "--rare_tokens_below 2"),
        ("wikigpt+tie_tokens3", "--rare_tokens_below 3"),
        (
            "wikigpt+tie_tokens+chunked_loss",
            f"--rare_tokens_below 1 --chunked_loss_size {bench.chunked_loss_size}",
        ),
        (
            "wikigpt+tie_tokens2+chunked_loss",
            f"--rare_tokens_below 2 --chunked_loss_size {bench.chunked_loss_size}",
        ),
        (
            "wikigpt+tie_tokens3+chunked_loss",  # the CPU recipe's speed flags
            f"--rare_tokens_below 3 --chunked_loss_size {bench.chunked_loss_size}",
        ),
        # OFF: transformers' Python GELU ("gelu_new", GPT2Config's default), not torch's fused one
        (
            "wikigpt-fused_gelu",
            "--config_overrides "
            + shlex.quote(
                ",".join(filter(None, [bench.config_overrides, "activation_function=gelu_new"]))
            ),
        ),
        ("wikigpt-unfused_adamw", "--optim adamw_torch"),
        # the attention kernel (the CPU recipe sets eager; transformers' default is sdpa)
        ("wikigpt+attention_eager", "--attn_implementation eager"),
        ("wikigpt+attention_sdpa", "--attn_implementation sdpa"),
    ]
    if default_bf16:
        flags.insert(0, ("wikigpt-bf16", "--bf16 false"))
    elif bf16_rows:
        flags[1:1] = [
            ("wikigpt+bf16", "--bf16 true"),
            ("wikigpt+bf16+compile", "--bf16 true --torch_compile true"),
        ]
    return flags


# --------------------------------------------------------------------------------------------------
# References outside the Trainer: a hand-written loop over wikigpt's model, and nanoGPT


def timed_loop(
    step, batches, bench: BenchmarkArguments, tokens_per_step: int, flops: int, peak
) -> dict:
    """`step(batch) -> loss tensor` for --steps batches, timed as timed_train times the Trainer."""
    reset_peak_memory()
    times, start, loss = [], time.perf_counter(), None
    for _, batch in zip(range(bench.steps), batches):
        loss = step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    total = time.perf_counter() - start
    memory, memory_kind = peak_memory()
    timed = times[bench.warmup_steps - 1 :] if bench.warmup_steps > 0 else [start, *times]
    ms_per_step = 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens_per_second = tokens_per_step * 1000 / ms_per_step
    return {
        "ms_per_step": round(ms_per_step, 3),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": float(f"{tokens_per_second * flops / peak:.4g}") if peak else None,
        "peak_memory_mib": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "timed_steps": len(timed) - 1,
        "total_seconds_with_warmup": round(total, 2),
        "last_logged_loss": round(float(loss), 4),
    }


def endless_batches(blocks, batch_size: int, seed: int):
    """Shuffled batches of the training blocks, epoch after epoch (as the Trainer's sampler)."""
    blocks = blocks.with_format("torch")
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = torch.utils.data.DataLoader(
            blocks,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=default_data_collator,
            drop_last=True,
        )
        yield from loader


def autocast(bf16: bool):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def run_hand_loop(bench, argv, tokenizer, train_blocks, flops, peaks) -> dict:
    """wikigpt's model and optimizer settings (from train.py's flags), trained by a plain PyTorch
    loop: no Trainer."""
    model_args, _, lever_args, _, training_args = parse_run_args(argv)
    set_seed(training_args.seed)
    model, _ = load_model(model_args, tokenizer)
    if lever_args.chunked_loss_size:
        use_chunked_loss(model, lever_args.chunked_loss_size)
    device = training_args.device
    model.to(device).train()
    compiled = torch.compile(model) if training_args.torch_compile else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    fused = str(training_args.optim.value) == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": training_args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        fused=fused,
    )

    def step(batch):
        with autocast(training_args.bf16):
            loss = compiled(
                input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    peak = peaks.get("bf16" if training_args.bf16 else "fp32")
    result = timed_loop(
        step,
        endless_batches(train_blocks, bench.batch_size, bench.seed),
        bench,
        bench.batch_size * bench.block_size,
        flops,
        peak,
    )
    result.update(
        name="hand_loop",
        lever="PyTorch loop over the wikigpt model: AdamW (same settings), clipping, "
        f"{'bf16 autocast' if training_args.bf16 else 'fp32'}"
        f"{', torch.compile' if training_args.torch_compile else ''}; no Trainer",
        vocab_size=model.config.vocab_size,
        optim="torch.optim.AdamW" + (" fused" if fused else ""),
        bf16=training_args.bf16,
        torch_compile=training_args.torch_compile,
        peak_flops=peak,
    )
    forget_compiled()
    return result


@dataclass
class NanoGPTSetup:
    name: str
    lever: str
    bf16: bool
    compile: bool


def nanogpt_setups(on_gpu: bool, bf16_rows: bool) -> list[NanoGPTSetup]:
    # nanoGPT's train.py: compile=True; on CPU no autocast (fp32); on a bf16 GPU bf16 autocast.
    setups = [
        NanoGPTSetup(
            "nanogpt",
            "nanoGPT model + train.py loop, its defaults here: "
            + ("bf16 autocast" if on_gpu else "fp32")
            + ", torch.compile",
            on_gpu,
            True,
        ),
        NanoGPTSetup(
            "nanogpt_eager",
            "nanoGPT, " + ("bf16 autocast" if on_gpu else "fp32") + ", no compile",
            on_gpu,
            False,
        ),
    ]
    if bf16_rows and not on_gpu:
        setups.append(
            NanoGPTSetup("nanogpt_bf16", "nanoGPT, bf16 autocast, torch.compile", True, True)
        )
    return setups


def run_nanogpt(setup: NanoGPTSetup, bench, config, train_blocks, flops, peaks) -> dict:
    """nanoGPT's model at the same shape, trained by its train.py loop (AdamW 6e-4, betas 0.9/0.95,
    wd 0.1, clip 1)."""
    set_seed(bench.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT(
        GPTConfig(
            block_size=bench.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            dropout=config.resid_pdrop,
            bias=False,
        )
    ).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    compiled = torch.compile(model) if setup.compile else model

    def step(batch):
        ids = batch["input_ids"].to(device)
        targets = torch.cat(
            [ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1
        )  # next token; last: ignored
        with autocast(setup.bf16):
            _, loss = compiled(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    peak = peaks.get("bf16" if setup.bf16 else "fp32")
    result = timed_loop(
        step,
        endless_batches(train_blocks, bench.batch_size, bench.seed),
        bench,
        bench.batch_size * bench.block_size,
        flops,
        peak,
    )
    result.update(
        name=setup.name,
        lever=setup.lever,
        vocab_size=model.config.vocab_size,
        bf16=setup.bf16,
        torch_compile=setup.compile,
        optim="torch.optim.AdamW" + (" fused" if device == "cuda" else ""),
        peak_flops=peak,
    )
    forget_compiled()
    return result


# --------------------------------------------------------------------------------------------------
# Matmul probe: the device's measured peak, for MFU where no data-sheet peak applies (CPU)


def matmul_probe(
    shapes: list[tuple[str, int, int, int]], dtypes: list[str], budget_s: float
) -> list[dict]:
    """GFLOP/s of [M x K] @ [K x N] per shape and dtype, best of a few calls; a shape whose single
    call would take more than `budget_s` (estimated from the smaller shapes' rate) is skipped and
    marked so."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        rate = None
        for label, m, k, n in sorted(shapes, key=lambda s: s[1] * s[2] * s[3]):
            flop = 2 * m * k * n
            row = {"shape": label, "m": m, "k": k, "n": n, "dtype": dtype_name}
            if rate is not None and flop / rate > budget_s:
                results.append(
                    {**row, "gflops": None, "skipped": f"one call estimated at {flop / rate:.0f} s"}
                )
                continue
            a, b = (
                torch.randn(m, k, dtype=dtype, device=device),
                torch.randn(k, n, dtype=dtype, device=device),
            )
            best, spent = float("inf"), 0.0
            for i in range(6):
                sync()
                start = time.perf_counter()
                a @ b
                sync()
                took = time.perf_counter() - start
                spent += took
                best = min(best, took) if i else best  # the first call warms up
                if i and (spent > budget_s or i >= 5):
                    break
            best = best if best != float("inf") else took
            rate = flop / best
            results.append({**row, "gflops": round(rate / 1e9, 2)})
    return results


def probe_shapes(config, bench: BenchmarkArguments) -> list[tuple[str, int, int, int]]:
    rows, c = bench.batch_size * bench.block_size, config.n_embd
    return [
        ("attention out [BT x C] @ [C x C]", rows, c, c),
        ("MLP up [BT x C] @ [C x 4C]", rows, c, 4 * c),
        ("LM head [BT x C] @ [C x V]", rows, c, config.vocab_size),
    ]


# --------------------------------------------------------------------------------------------------
# Preprocessing speed


def time_preprocessing(bench: BenchmarkArguments, tokenizer) -> dict:
    """Load + tokenize + group WT2 validation and test: once from an empty datasets cache, then
    again (cache hits)."""
    data_args = DataArguments(validation_file=bench.train_file, test_file=bench.test_file)
    saved_cache = datasets.config.HF_DATASETS_CACHE
    result = {
        "files": [bench.train_file, bench.test_file],
        "num_proc": bench.preprocessing_num_workers,
        "block_size": bench.block_size,
    }
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-cache-") as cache:
        datasets.config.HF_DATASETS_CACHE = Path(
            cache
        )  # read at call time by load_dataset: a cold cache
        try:
            for label in ("cold_cache_seconds", "cached_seconds"):
                start = time.perf_counter()
                raw = load_raw_splits(data_args, bench.seed, required=("validation",))
                _, counts = prepare_lm_splits(
                    raw, tokenizer, bench.block_size, bench.preprocessing_num_workers
                )
                result[label] = round(time.perf_counter() - start, 3)
        finally:
            datasets.config.HF_DATASETS_CACHE = saved_cache
    result["tokens"] = sum(c["tokens"] for c in counts.values())
    result["blocks"] = sum(c["blocks"] for c in counts.values())
    return result


# --------------------------------------------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    """The run with the median ms/step (lower middle for an even count), with every repeat's ms/step
    beside it."""
    ordered = sorted(runs, key=lambda r: r["ms_per_step"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "ms_per_step_repeats": [r["ms_per_step"] for r in runs],
        "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
    }


def table(rows: list[dict], baseline: dict) -> str:
    head = (
        f"{'setup':<22} {'ms/step':>10} {'tokens/s':>10} {'MFU':>7} {'peak MiB':>9} "
        f"{'vs ' + baseline['name']:>11}  what"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = r["tokens_per_second"] / baseline["tokens_per_second"]
        lines.append(
            f"{r['name']:<22} {r['ms_per_step']:>10.1f} {r['tokens_per_second']:>10,.0f} {mfu:>7} "
            f"{r['peak_memory_mib']:>9,.0f} {ratio:>10.2f}x  {r['lever']}"
        )
    return "\n".join(lines)


def environment() -> dict:
    return {
        "device_name": current_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    (bench,) = parse_args((BenchmarkArguments,), description=__doc__)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING
    )
    logger.setLevel(logging.INFO)
    datasets.disable_progress_bars()
    if bench.repeats < 1:
        raise UsageError(f"--repeats must be at least 1; got {bench.repeats}")
    if bench.warmup_steps < 0 or bench.steps < bench.warmup_steps + 2:
        raise UsageError(
            "--steps must be at least --warmup_steps + 2 (two timed step ends); raise --steps"
        )
    check_chunked_loss_args(bench.chunked_loss_size)
    on_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(bench.tokenizer_name or DEFAULT_TOKENIZER)
    report: dict = {
        "version": JSON_VERSION,
        "environment": environment(),
        "settings": asdict(bench),
    }
    if bench.preprocessing:
        report["preprocessing"] = time_preprocessing(bench, tokenizer)
        p = report["preprocessing"]
        print(
            f"preprocessing (tokenize + group WT2 validation+test, {p['tokens']:,} tokens, "
            f"num_proc {p['num_proc']}): {p['cold_cache_seconds']:.2f} s from an empty datasets "
            f"cache, {p['cached_seconds']:.2f} s from the cache",
            flush=True,
        )

    # Same training blocks for the plain setup (wikigpt's come via train.py's path: a cache hit).
    raw = load_raw_splits(
        DataArguments(train_file=bench.train_file), bench.seed, required=("train",)
    )
    blocks, _ = prepare_lm_splits(raw, tokenizer, resolve_block_size(bench.block_size, 1 << 30))
    config = plain_config(bench, tokenizer, None)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    flops = model_flops_per_token(reference, bench.block_size)  # unpadded model: the useful work
    bf16_rows = (
        bench.bf16_rows if bench.bf16_rows is not None else (on_gpu or cpu_has_native_bf16())
    )
    report["matmul_probe"] = matmul_probe(
        probe_shapes(config, bench),
        ["fp32", "bf16"] if bf16_rows else ["fp32"],
        bench.probe_seconds,
    )
    for row in report["matmul_probe"]:
        rate = (
            f"{row['gflops']:,.1f} GFLOP/s"
            if row["gflops"] is not None
            else f"skipped ({row['skipped']})"
        )
        print(
            f"matmul {row['dtype']} {row['shape']} = [{row['m']} x {row['k']}] @ [{row['k']} x "
            f"{row['n']}]: {rate}",
            flush=True,
        )
    # Peak per precision: --peak_flops, else the GPU data sheet, else (CPU) the best measured matmul
    # of that dtype.
    peak, peak_source = resolve_peak_flops(bench.peak_flops, current_device_name())
    measured_peaks = {
        d: max(
            (r["gflops"] * 1e9 for r in report["matmul_probe"] if r["dtype"] == d and r["gflops"]),
            default=None,
        )
        for d in ("fp32", "bf16")
    }
    if peak is not None:
        peaks = {"fp32": peak, "bf16": peak}
    else:
        peaks, peak_source = (
            measured_peaks,
            "best matmul of the row's precision measured in this run",
        )
    report.update(
        flops_per_token=flops,
        peak_flops_per_device=peak,
        peak_flops_source=peak_source,
        measured_peak_flops=measured_peaks,
        tokens_per_step=bench.batch_size * bench.block_size,
    )

    # train.py's allocator setting (wikigpt/train/cpu_memory.py) is process-wide: set it before any
    # row, so every row, nanoGPT's included, runs with the same allocator
    keep_freed_memory()
    chosen = set(filter(None, (bench.lever_names or "").split(",")))
    levers = [
        s
        for s in lever_setups(on_gpu, bench.chunked_loss_size)
        if bench.levers and (not chosen or s.name in chosen)
    ]
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-") as out_dir:
        argv = wikigpt_argv(bench, on_gpu, out_dir)
        default_bf16 = parse_run_args(argv)[-1].bf16
        wiki_levers = [
            (name, flags)
            for name, flags in wikigpt_lever_flags(bench, default_bf16, bf16_rows)
            if bench.wikigpt_levers and (not chosen or name in chosen)
        ]
        nano = [
            s
            for s in nanogpt_setups(on_gpu, bf16_rows)
            if bench.references and (not chosen or s.name in chosen)
        ]
        hand = ["hand_loop"] if bench.references and (not chosen or "hand_loop" in chosen) else []
        setups = [PlainSetup(), "wikigpt", *wiki_levers, *hand, *nano, *levers]
        measured: dict[str, list[dict]] = {}
        # Round-robin over setups, --repeats times: a shared machine's slow drifts hit all alike.
        for repeat in range(bench.repeats):
            for setup in setups:
                if setup == "wikigpt":
                    result = run_wikigpt(bench, argv, flops, peaks)
                elif setup == "hand_loop":
                    result = run_hand_loop(bench, argv, tokenizer, blocks["train"], flops, peaks)
                elif isinstance(setup, tuple):
                    result = run_wikigpt(
                        bench, [*argv, *shlex.split(setup[1])], flops, peaks, name=setup[0]
                    )
                elif isinstance(setup, NanoGPTSetup):
                    result = run_nanogpt(setup, bench, config, blocks["train"], flops, peaks)
                else:
                    result = run_plain(
                        setup, bench, tokenizer, blocks["train"], out_dir, on_gpu, flops, peaks
                    )
                measured.setdefault(result["name"], []).append(result)
                print(
                    f"  [{repeat + 1}/{bench.repeats}] {result['name']}: "
                    f"{result['ms_per_step']:.1f} ms/step, {result['tokens_per_second']:,.0f} "
                    "tokens/s",
                    flush=True,
                )
    median = {name: median_run(runs) for name, runs in measured.items()}
    plain, wiki = median["plain"], median["wikigpt"]
    report["runs"] = [plain, wiki]
    report["wikigpt_vs_plain"] = round(wiki["tokens_per_second"] / plain["tokens_per_second"], 3)
    baseline = median[nano[0].name] if nano else plain  # nanoGPT with its own defaults when it ran
    main_rows = [plain, wiki]
    if wiki_levers:
        report["wikigpt_levers"] = [median[name] for name, _ in wiki_levers]
        main_rows += report["wikigpt_levers"]
    if hand or nano:
        report["references"] = [median[name] for name in [*hand, *(s.name for s in nano)]]
        main_rows += report["references"]
    if nano:
        report["wikigpt_vs_nanogpt"] = round(
            wiki["tokens_per_second"] / baseline["tokens_per_second"], 3
        )
    for row in main_rows:
        row["vs_" + baseline["name"]] = round(
            row["tokens_per_second"] / baseline["tokens_per_second"], 3
        )
    print("\n" + table(main_rows, baseline), flush=True)
    print(f"wikigpt / plain tokens/s: {report['wikigpt_vs_plain']:.2f}x", flush=True)
    if "wikigpt_vs_nanogpt" in report:
        print(
            f"wikigpt / {baseline['name']} tokens/s: {report['wikigpt_vs_nanogpt']:.2f}x",
            flush=True,
        )
    if levers:
        report["levers"] = [median[s.name] for s in levers]
        print(
            "\none lever at a time on top of plain:\n" + table([plain, *report["levers"]], plain),
            flush=True,
        )
    if bench.output_json:
        write_json_atomic(
            bench.output_json, report
        )  # a half-written file never replaces the last one
        print(f"wrote {bench.output_json}")


if __name__ == "__main__":
    run_main(main)
