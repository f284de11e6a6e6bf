"""Training throughput: wikigpt's train.py path against a plain run_clm-style Trainer setup, in one process.

    python benchmarks/train_throughput.py                                  # GPU: GPT-2 124M, 16 x 1024, bf16
    python benchmarks/train_throughput.py --levers true                    # + one lever at a time on the plain setup
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --preset tiny --block_size 64 --batch_size 4 \
        --steps 6 --warmup_steps 2 --levers true --output_json benchmarks/results/cpu_tiny.json   # CPU smoke

Both setups run N real optimizer steps through `Trainer.train()` on the same WikiText-2 blocks; the first
--warmup_steps (compilation, allocator warm-up) are not timed. ms/step is wall time per optimizer step
(CUDA synchronised), data loading included. MFU uses wikigpt.throughput's 6N + 12·L·H·Q·T per token of the
unpadded model for every row (padding adds no useful work). Peak memory: torch.cuda.max_memory_allocated on a
GPU; on CPU the process's peak RSS (VmHWM, reset before each run). See benchmarks/README.md.
"""

import gc
import json
import logging
import os
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

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments,  # noqa: E402
                          default_data_collator, set_seed)

from wikigpt.chunked_loss import check_chunked_loss_args, use_chunked_loss  # noqa: E402
from wikigpt.cli import parse_args  # noqa: E402
from wikigpt.errors import UsageError, run_main  # noqa: E402
from wikigpt.data import DataArguments, load_raw_splits, prepare_lm_splits, resolve_block_size  # noqa: E402
from wikigpt.metrics import compute_perplexity, nll_and_count  # noqa: E402
from wikigpt.model import PRESETS, ModelArguments, check_model_args, context_length, load_model  # noqa: E402
from wikigpt.model import load_tokenizer  # noqa: E402
from wikigpt.numerics import NonFiniteGuard  # noqa: E402
from wikigpt.padded_vocab import pad_vocab  # noqa: E402
from wikigpt.preemption import PreemptionCallback  # noqa: E402
from wikigpt.throughput import add_throughput_callback, current_device_name, model_flops_per_token  # noqa: E402
from wikigpt.throughput import resolve_peak_flops  # noqa: E402
from wikigpt.training import WikiTrainingArguments, tokens_per_step  # noqa: E402

logger = logging.getLogger("wikigpt.benchmark")
DATA = REPO / "data"
GPU_CONFIG = REPO / "configs" / "gpu_fast.yaml"
CPU_WIKIGPT_ARGS = "--pad_vocab_multiple 64"  # the CPU-runnable levers (gpu_fast.yaml needs CUDA: bf16, tf32)
JSON_VERSION = 1


@dataclass
class BenchmarkArguments:
    preset: str = field(default="gpt2", metadata={"help": "Model size (wikigpt preset) for both setups."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per block."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per optimizer step (one device)."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps per setup, warm-up included."})
    warmup_steps: int = field(default=5, metadata={"help": "First steps not timed (torch.compile, allocator)."})
    logging_steps: int = field(default=10, metadata={"help": "Trainer logging interval for every setup (a log syncs)."})
    tokenizer_name: str = field(default=str(DATA / "gpt2-tokenizer"), metadata={"help": "Tokenizer folder or id."})
    train_file: str = field(default=str(DATA / "wikitext-2-raw" / "wiki.valid.raw"),
                            metadata={"help": "Text the training blocks come from (content does not affect speed)."})
    test_file: str = field(default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
                           metadata={"help": "Second WikiText-2 split for the preprocessing measurement."})
    wikigpt_config: str | None = field(
        default=None, metadata={"help": "train.py config file for the wikigpt setup (default: configs/gpu_fast.yaml "
                                        "on CUDA; none on CPU)."})
    wikigpt_args: str | None = field(
        default=None, metadata={"help": f"Extra train.py flags for the wikigpt setup (default on CPU: "
                                        f"'{CPU_WIKIGPT_ARGS}')."})
    chunked_loss_size: int = field(default=4096, metadata={"help": "Tokens per chunk for the chunked_loss lever "
                                                                 "(a batch of 16 x 1024 is 4 chunks)."})
    levers: bool = field(default=False, metadata={"help": "Also time each lever alone on top of the plain setup."})
    lever_names: str | None = field(default=None, metadata={"help": "Comma-separated subset of levers to time."})
    preprocessing: bool = field(default=True, metadata={"help": "Time tokenize+group of WT2 valid+test (cold/cached)."})
    preprocessing_num_workers: int = field(default=2, metadata={"help": "Processes for the preprocessing timing."})
    peak_flops: float | None = field(default=None, metadata={"help": "Peak FLOP/s of the device for MFU "
                                                                    "(default: wikigpt.throughput's table)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results here as JSON."})
    repeats: int = field(default=1, metadata={"help": "Run every setup this many times (round-robin); report the "
                                                      "median ms/step."})
    seed: int = field(default=42, metadata={"help": "Seed for model init and data order."})


# ---------------------------------------------------------------------------------------------------------------
# The plain setup and its levers


@dataclass
class PlainSetup:
    """run_clm-style: GPT2LMHeadModel from GPT2Config, TrainingArguments defaults except batch (and bf16 on GPU)."""

    name: str = "plain"
    lever: str = "run_clm defaults (transformers " + transformers.__version__ + ")"
    pad_vocab_multiple: int | None = None
    chunked_loss_size: int | None = None
    attn_implementation: str | None = None  # None: transformers' default (sdpa in 5.x)
    dropout: float | None = None  # None: GPT2Config's 0.1
    training: dict = field(default_factory=dict)  # TrainingArguments overrides


def lever_setups(on_gpu: bool, chunked_loss_size: int = 4096) -> list[PlainSetup]:
    """One lever at a time on top of the plain setup. Levers that transformers already turns on by default
    (fused AdamW, SDPA, pinned memory) are turned *off* instead: their row shows what the default buys."""
    setups = [
        PlainSetup("pad_vocab_64", "vocab padded to a multiple of 64 (50257 -> 50304)", pad_vocab_multiple=64),
        PlainSetup("torch_compile", "torch_compile=True", training={"torch_compile": True}),
        PlainSetup("chunked_loss", f"loss from hidden states in chunks of {chunked_loss_size} tokens (no full-batch "
                   f"logits)", chunked_loss_size=chunked_loss_size),
        PlainSetup("unfused_adamw", "OFF: optim=adamw_torch (default is adamw_torch_fused)",
                   training={"optim": "adamw_torch"}),
        PlainSetup("eager_attention", "OFF: attn_implementation=eager (default is sdpa)", attn_implementation="eager"),
        PlainSetup("dataloader_workers", "dataloader_num_workers=2, persistent workers",
                   training={"dataloader_num_workers": 2, "dataloader_persistent_workers": True}),
        PlainSetup("no_pin_memory", "OFF: dataloader_pin_memory=False (default True)",
                   training={"dataloader_pin_memory": False}),
        PlainSetup("dropout_0", "dropout 0 (attn, resid, embd)", dropout=0.0),
    ]
    if on_gpu:
        setups.insert(4, PlainSetup("tf32", "tf32=True", training={"tf32": True}))
    return setups


# ---------------------------------------------------------------------------------------------------------------
# Measuring


class StepTimer(TrainerCallback):
    """Wall clock at the end of every optimizer step (after a CUDA sync, so queued kernels are counted)."""

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
                    return int(line.split()[1]) / 1024, "process peak RSS (CPU, VmHWM reset before the run)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS so far (CPU, ru_maxrss)"


def float32_matmul_state():
    # torch >= 2.9 (which transformers' tf32=True then uses): reading the legacy allow_tf32 flags after the new
    # fp32_precision API has been set raises, so save whichever API is there.
    if hasattr(torch.backends, "fp32_precision"):
        return ("new", torch.backends.fp32_precision)
    return ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def restore_float32_matmul_state(state) -> None:
    # TrainingArguments(tf32=True) flips process-wide flags; later setups must not inherit them.
    if state[0] == "new":
        torch.backends.fp32_precision = state[1]
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1:]


def timed_train(trainer: Trainer, bench: BenchmarkArguments, tokens_per_step: int, flops_per_token: int,
                peak_flops: float | None) -> dict:
    timer = StepTimer()
    trainer.add_callback(timer)
    reset_peak_memory()
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    memory, memory_kind = peak_memory()
    timed = timer.times[bench.warmup_steps - 1:] if bench.warmup_steps > 0 else [start, *timer.times]
    ms_per_step = 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)
    tokens_per_second = tokens_per_step * 1000 / ms_per_step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "ms_per_step": round(ms_per_step, 3),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": float(f"{tokens_per_second * flops_per_token / peak_flops:.4g}") if peak_flops else None,
        "peak_memory_mib": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "timed_steps": len(timed) - 1,
        "total_seconds_with_warmup": round(total, 2),
        "last_logged_loss": losses[-1] if losses else None,
    }


def forget_compiled() -> None:
    torch._dynamo.reset()  # compiled graphs of one setup must not serve the next


# ---------------------------------------------------------------------------------------------------------------
# The two setups


def plain_config(bench: BenchmarkArguments, tokenizer, dropout: float | None) -> GPT2Config:
    fields = dict(PRESETS[bench.preset])
    if dropout is not None:
        fields.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **fields)


def run_plain(setup: PlainSetup, bench, tokenizer, train_blocks, out_dir, on_gpu, flops, peak) -> dict:
    set_seed(bench.seed)
    config = plain_config(bench, tokenizer, setup.dropout)
    kwargs = {"attn_implementation": setup.attn_implementation} if setup.attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    if setup.pad_vocab_multiple:
        pad_vocab(model, setup.pad_vocab_multiple)
    if setup.chunked_loss_size:
        use_chunked_loss(model, setup.chunked_loss_size)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, setup.name), per_device_train_batch_size=bench.batch_size, bf16=on_gpu,
        max_steps=bench.steps, logging_steps=bench.logging_steps, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=bench.seed, **setup.training)
    fp32_state = float32_matmul_state()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=train_blocks, processing_class=tokenizer,
                          data_collator=default_data_collator)
        result = timed_train(trainer, bench, bench.batch_size * bench.block_size, flops, peak)
    finally:
        restore_float32_matmul_state(fp32_state)
    result.update(name=setup.name, lever=setup.lever, attn_implementation=model.config._attn_implementation,
                  optim=str(args.optim.value), vocab_size=model.config.vocab_size, bf16=args.bf16,
                  torch_compile=args.torch_compile)
    forget_compiled()
    return result


def wikigpt_argv(bench: BenchmarkArguments, on_gpu: bool, out_dir: str) -> list[str]:
    config = bench.wikigpt_config if bench.wikigpt_config is not None else (str(GPU_CONFIG) if on_gpu else "")
    extra = bench.wikigpt_args if bench.wikigpt_args is not None else ("" if on_gpu else CPU_WIKIGPT_ARGS)
    return [*([config] if config else []),
            "--preset", bench.preset, "--tokenizer_name", bench.tokenizer_name, "--train_file", bench.train_file,
            "--validation_file", bench.test_file, "--block_size", str(bench.block_size),
            "--per_device_train_batch_size", str(bench.batch_size), "--gradient_accumulation_steps", "1",
            "--max_steps", str(bench.steps), "--logging_steps", str(bench.logging_steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", str(bench.seed),
            "--output_dir", os.path.join(out_dir, "wikigpt"), "--overwrite_output_dir", "true",
            *shlex.split(extra)]


def describe_wikigpt(bench: BenchmarkArguments, argv: list[str]) -> str:
    config = os.path.relpath(argv[0], REPO) if argv[0].endswith((".yaml", ".yml", ".json")) else "defaults"
    extra = " ".join(argv[argv.index("true", argv.index("--overwrite_output_dir")) + 1:])
    return f"train.py {config} {extra}".strip()


def run_wikigpt(bench, argv, flops, peak) -> dict:
    """train.py's components, in train.py's order (no final save/eval: only training is timed)."""
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, WikiTrainingArguments), argv)
    check_model_args(model_args)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    model, _ = load_model(model_args, tokenizer)
    block_size = resolve_block_size(data_args.block_size, context_length(model.config))
    raw = load_raw_splits(data_args, training_args.seed, required=("train", "validation"))
    blocks, _ = prepare_lm_splits(raw, tokenizer, block_size, data_args.preprocessing_num_workers)
    fp32_state = float32_matmul_state()
    try:
        trainer = Trainer(model=model, args=training_args, train_dataset=blocks["train"],
                          eval_dataset=blocks["validation"], processing_class=tokenizer,
                          data_collator=default_data_collator, compute_metrics=compute_perplexity,
                          preprocess_logits_for_metrics=nll_and_count,
                          callbacks=[PreemptionCallback(), NonFiniteGuard()])
        add_throughput_callback(trainer, block_size, tokens_per_step(training_args, block_size),
                                training_args.peak_flops)
        result = timed_train(trainer, bench, tokens_per_step(training_args, block_size), flops, peak)
    finally:
        restore_float32_matmul_state(fp32_state)
    result.update(name="wikigpt", lever=describe_wikigpt(bench, argv), train_py_args=argv,
                  attn_implementation=model.config._attn_implementation, optim=str(training_args.optim.value), vocab_size=model.config.vocab_size, bf16=training_args.bf16,
                  torch_compile=training_args.torch_compile)
    forget_compiled()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing speed


def time_preprocessing(bench: BenchmarkArguments, tokenizer) -> dict:
    """Load + tokenize + group WT2 validation and test: once from an empty datasets cache, then again (cache hits)."""
    data_args = DataArguments(validation_file=bench.train_file, test_file=bench.test_file)
    saved_cache = datasets.config.HF_DATASETS_CACHE
    result = {"files": [bench.train_file, bench.test_file], "num_proc": bench.preprocessing_num_workers,
              "block_size": bench.block_size}
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-cache-") as cache:
        datasets.config.HF_DATASETS_CACHE = Path(cache)  # read at call time by load_dataset: a cold cache
        try:
            for label in ("cold_cache_seconds", "cached_seconds"):
                start = time.perf_counter()
                raw = load_raw_splits(data_args, bench.seed, required=("validation",))
                _, counts = prepare_lm_splits(raw, tokenizer, bench.block_size, bench.preprocessing_num_workers)
                result[label] = round(time.perf_counter() - start, 3)
        finally:
            datasets.config.HF_DATASETS_CACHE = saved_cache
    result["tokens"] = sum(c["tokens"] for c in counts.values())
    result["blocks"] = sum(c["blocks"] for c in counts.values())
    return result


# ---------------------------------------------------------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    """The run with the median ms/step (lower middle for an even count), with every repeat's ms/step beside it."""
    ordered = sorted(runs, key=lambda r: r["ms_per_step"])
    return {**ordered[(len(ordered) - 1) // 2], "ms_per_step_repeats": [r["ms_per_step"] for r in runs],
            "peak_memory_mib": max(r["peak_memory_mib"] for r in runs)}


def table(rows: list[dict], baseline: dict) -> str:
    head = f"{'setup':<20} {'ms/step':>10} {'tokens/s':>12} {'MFU':>7} {'peak MiB':>10} {'vs plain':>9}  what"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = r["tokens_per_second"] / baseline["tokens_per_second"]
        lines.append(f"{r['name']:<20} {r['ms_per_step']:>10.1f} {r['tokens_per_second']:>12,.0f} {mfu:>7} "
                     f"{r['peak_memory_mib']:>10,.0f} {ratio:>8.2f}x  {r['lever']}")
    return "\n".join(lines)


def environment() -> dict:
    return {"device_name": current_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def main() -> None:
    (bench,) = parse_args((BenchmarkArguments,), description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    datasets.disable_progress_bars()
    if bench.repeats < 1:
        raise UsageError(f"--repeats must be at least 1; got {bench.repeats}")
    if bench.warmup_steps < 0 or bench.steps < bench.warmup_steps + 2:
        raise UsageError("--steps must be at least --warmup_steps + 2 (two timed step ends); raise --steps")
    check_chunked_loss_args(bench.chunked_loss_size)
    on_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(ModelArguments(tokenizer_name=bench.tokenizer_name))
    report: dict = {"version": JSON_VERSION, "environment": environment(), "settings": asdict(bench)}
    if bench.preprocessing:
        report["preprocessing"] = time_preprocessing(bench, tokenizer)
        p = report["preprocessing"]
        print(f"preprocessing (tokenize + group WT2 validation+test, {p['tokens']:,} tokens, num_proc "
              f"{p['num_proc']}): {p['cold_cache_seconds']:.2f} s from an empty datasets cache, "
              f"{p['cached_seconds']:.2f} s from the cache", flush=True)

    # Same training blocks for the plain setup (wikigpt prepares its own through train.py's path: a cache hit).
    raw = load_raw_splits(DataArguments(train_file=bench.train_file), bench.seed, required=("train",))
    blocks, _ = prepare_lm_splits(raw, tokenizer, resolve_block_size(bench.block_size, 1 << 30))
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(plain_config(bench, tokenizer, None))
    flops = model_flops_per_token(reference, bench.block_size)  # unpadded model: the useful work
    peak, peak_source = resolve_peak_flops(bench.peak_flops, current_device_name())
    report.update(flops_per_token=flops, peak_flops_per_device=peak, peak_flops_source=peak_source,
                  tokens_per_step=bench.batch_size * bench.block_size)

    chosen = set(filter(None, (bench.lever_names or "").split(",")))
    levers = [s for s in lever_setups(on_gpu, bench.chunked_loss_size) if bench.levers and (not chosen or s.name in chosen)]
    measured: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="wikigpt-bench-") as out_dir:
        # Round-robin over the setups, --repeats times: slow drifts of a shared machine hit every setup alike.
        for repeat in range(bench.repeats):
            for setup in [PlainSetup(), "wikigpt", *levers]:
                if setup == "wikigpt":
                    result = run_wikigpt(bench, wikigpt_argv(bench, on_gpu, out_dir), flops, peak)
                else:
                    result = run_plain(setup, bench, tokenizer, blocks["train"], out_dir, on_gpu, flops, peak)
                measured.setdefault(result["name"], []).append(result)
                print(f"  [{repeat + 1}/{bench.repeats}] {result['name']}: {result['ms_per_step']:.1f} ms/step, "
                      f"{result['tokens_per_second']:,.0f} tokens/s", flush=True)
    median = {name: median_run(runs) for name, runs in measured.items()}
    plain, wiki = median["plain"], median["wikigpt"]
    report["runs"] = [plain, wiki]
    report["wikigpt_vs_plain"] = round(wiki["tokens_per_second"] / plain["tokens_per_second"], 3)
    print("\n" + table([plain, wiki], plain), flush=True)
    print(f"wikigpt / plain tokens/s: {report['wikigpt_vs_plain']:.2f}x", flush=True)
    if levers:
        report["levers"] = [median[s.name] for s in levers]
        print("\none lever at a time on top of plain:\n" + table([plain, *report["levers"]], plain), flush=True)
    if bench.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(bench.output_json)), exist_ok=True)
        with open(bench.output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {bench.output_json}")


if __name__ == "__main__":
    run_main(main)
