"""Training precision on CPU: bf16 autocast where the CPU multiplies bf16 natively, fp32 elsewhere.

A CPU with AVX512-BF16 or AMX-BF16 runs bf16 matmuls faster than fp32 ones (oneDNN), and bf16
autocast halves the activation traffic; on a CPU without them (e.g. AVX2 only) bf16 matmuls fall
back to slow conversion paths, so fp32 is faster there. `--bf16` left unset picks accordingly when
no GPU is present; `--bf16 false` is exact fp32, `--bf16` forces bf16 (and on a machine without a
GPU it no longer needs `--use_cpu`).

WIKIGPT_CPU_BF16=0 makes wikigpt act as on a CPU without native bf16 (fp32 default, fp32 Muon), =1
as on one with it; unset, /proc/cpuinfo decides. Tests use it to cover both host paths on any host.
"""

import functools
import os

import torch
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from wikigpt.errors import UsageError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names
OVERRIDE = "WIKIGPT_CPU_BF16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively; WIKIGPT_CPU_BF16=0/1 overrides what
    /proc/cpuinfo says."""
    override = os.environ.get(OVERRIDE, "")
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise UsageError(
            f"{OVERRIDE}={override!r} is not 0 or 1; set it to 0 (act as without native bf16), "
            f"1 (as with it), or unset it"
        )
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def no_accelerator() -> bool:
    """No GPU (or other device) transformers would train on: the Trainer would run on the CPU."""
    return not (
        torch.cuda.is_available() or is_torch_bf16_gpu_available() or is_torch_xla_available()
    )


def resolve_cpu_precision(args) -> None:
    """Before TrainingArguments.__post_init__: resolve `bf16=None` (auto) and let bf16 on a CPU-only
    machine run.

    transformers refuses bf16 without a bf16 GPU unless use_cpu is set ("Your setup doesn't support
    bf16/gpu"); with no accelerator at all the run is on the CPU anyway, so use_cpu only states
    that.
    """
    cpu_run = args.use_cpu or no_accelerator()
    if args.bf16 is None:
        args.bf16 = bool(cpu_run and not args.fp16 and cpu_has_native_bf16())
    if (args.bf16 or args.bf16_full_eval) and not args.use_cpu and no_accelerator():
        args.use_cpu = True
