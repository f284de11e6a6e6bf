"""Training throughput: tokens/s and model FLOPs utilisation (MFU), logged by a TrainerCallback
during every run.

MFU = achieved model FLOP/s / (peak bf16 dense FLOP/s per device x devices), with model FLOPs
per token

    6 N + 12 L H Q T        (forward + backward; PaLM appendix B, nanoGPT's estimate_mfu)

N = parameters that do a matmul for every token: everything except the embedding lookups (token and
position), plus the LM head (with GPT-2's tied weights the head *is* the token embedding, used a
second time as a matmul). This is the convention of nanoGPT's estimate_mfu, so MFU numbers compare
with nanoGPT's directly. L layers, H heads, Q head dim, T block size (the attention term: scores and
weighted values for T positions).
"""

import logging
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Peak dense bf16 tensor-core FLOP/s per device (no sparsity), from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(), case-insensitively, first hit wins:
# specific names before general ones.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("GH200", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
]


def flops_per_token(
    n_matmul_params: int, n_layer: int, n_head: int, head_dim: int, block_size: int
) -> int:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N) + 12·L·H·Q·T
    for attention."""
    return 6 * n_matmul_params + 12 * n_layer * n_head * head_dim * block_size


def matmul_parameters(model) -> int:
    """N of the MFU formula: all parameters but the embedding lookups, plus the LM head's matmul
    (see module doc)."""
    lookups = {
        id(p)
        for m in (
            model.get_input_embeddings(),
            getattr(getattr(model, "transformer", None), "wpe", None),
        )
        if m is not None
        for p in m.parameters()
    }
    n = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    head = model.get_output_embeddings()
    if head is not None and any(id(p) in lookups for p in head.parameters()):
        rows = head.weight.shape[0]
        tied_tokens = getattr(
            model, "_tied_tokens", None
        )  # --rare_tokens_below: training multiplies fewer rows
        if tied_tokens is not None:
            rows = tied_tokens.columns
        n += (
            rows * head.weight.shape[1]
        )  # tied head: the same tensor, but a second (matmul) use per token
    return n


def model_flops_per_token(model, block_size: int) -> int:
    config = model.config
    n_layer = config.num_hidden_layers
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return flops_per_token(matmul_parameters(model), n_layer, n_head, head_dim, block_size)


def device_peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 dense FLOP/s of one device from PEAK_BF16_FLOPS, or None for an unknown device (or
    CPU)."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern.lower() in name:
            return flops
    return None


def current_device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def resolve_peak_flops(override: float | None, device_name: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s per device, where it came from). --peak_flops wins; else the table; else (None,
    None)."""
    if override is not None:
        return float(override), "--peak_flops"
    peak = device_peak_flops(device_name) if device_name != "cpu" else None
    return (peak, f"table ({device_name})") if peak is not None else (None, None)


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (all devices together) and `mfu` to every training log line.

    Each value covers the steps since the previous log, and time spent in evaluation and checkpoint
    saving is left out, so the numbers describe training alone. Tokens per optimizer step =
    per-device batch x gradient accumulation x processes x block size (every block is full; a short
    last batch of an epoch counts as full). `summary` holds the totals for the whole run (for
    results.json).
    """

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: int,
        peak_flops_per_device: float | None,
        peak_flops_source: str | None = None,
        device_name: str | None = None,
    ):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.peak_flops_source = peak_flops_source
        self.device_name = device_name
        self.summary: dict = {}

    def _mfu(self, tokens_per_second: float, world_size: int) -> float | None:
        if not self.peak_flops_per_device:
            return None
        return tokens_per_second * self.flops_per_token / (self.peak_flops_per_device * world_size)

    def _rates(self, steps: int, seconds: float, world_size: int) -> dict:
        tps = steps * self.tokens_per_step / seconds if seconds > 0 else 0.0
        rates = {"tokens_per_second": round(tps, 1)}
        mfu = self._mfu(tps, world_size)
        if mfu is not None:
            rates["mfu"] = float(f"{mfu:.4g}")  # 4 significant digits: CPU runs give tiny fractions
        return rates

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._start, self._start_step = now, state.global_step
        self._window_start, self._window_step = now, state.global_step
        self._mark = now  # last moment training (not eval or saving) was known to be running
        self._excluded = self._excluded_total = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def _exclude_since_mark(self):
        now = time.perf_counter()
        self._excluded += now - self._mark
        self._excluded_total += now - self._mark
        self._mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._exclude_since_mark()

    def on_save(self, args, state, control, **kwargs):
        self._exclude_since_mark()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not hasattr(self, "_window_start"):
            return  # eval logs and the end-of-training summary carry no training window
        now = time.perf_counter()
        rates = self._rates(
            state.global_step - self._window_step,
            now - self._window_start - self._excluded,
            args.world_size,
        )
        logs.update(rates)  # later callbacks (TensorBoard, progress bar, printer) see it
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)  # Trainer appended this log before calling back
        self._window_start, self._window_step, self._mark, self._excluded = (
            now,
            state.global_step,
            now,
            0.0,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if not hasattr(self, "_start"):
            return
        seconds = time.perf_counter() - self._start - self._excluded_total
        steps = state.global_step - self._start_step
        rates = self._rates(steps, seconds, args.world_size)
        self.summary = {
            "tokens_per_second": rates["tokens_per_second"],
            "mfu": rates.get("mfu"),
            "tokens": steps * self.tokens_per_step,
            "train_seconds_excluding_eval_and_save": round(seconds, 3),
            "flops_per_token": self.flops_per_token,
            "peak_flops_per_device": self.peak_flops_per_device,
            "peak_flops_source": self.peak_flops_source,
            "devices": args.world_size,
            "device_name": self.device_name,
        }
        if state.is_world_process_zero:
            mfu = (
                f", MFU {rates['mfu']:.1%}"
                if "mfu" in rates
                else " (MFU: unknown device peak; pass --peak_flops)"
            )
            logger.info(
                "throughput: %.0f tokens/s over %d steps%s", rates["tokens_per_second"], steps, mfu
            )


def add_throughput_callback(
    trainer, block_size: int, tokens_per_step: int, peak_flops: float | None = None
) -> ThroughputCallback:
    """Attach a ThroughputCallback first in line, so reporters (TensorBoard, W&B) and the progress
    bar get its numbers."""
    device_name = current_device_name()
    peak, source = resolve_peak_flops(peak_flops, device_name)
    callback = ThroughputCallback(
        tokens_per_step, model_flops_per_token(trainer.model, block_size), peak, source, device_name
    )
    # Trainer puts callbacks passed to it after the reporting integrations, which would then log
    # without our keys.
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
