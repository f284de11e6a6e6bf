"""Keep freed memory in the process on Linux/glibc CPU training: no page faults for every step's
large tensors.

Every CPU training step allocates and frees the same large tensors (the logits, the attention
scores, the gradients). glibc serves blocks over 32 MB with mmap and gives them back with munmap, so
each step maps fresh pages and the kernel zeroes and faults in every one of them again. tcmalloc
keeps freed memory instead and trains ~1.3x faster (docs/speed.md), but it must be preloaded
(LD_PRELOAD) before the process starts. glibc can do the same from inside the process:
mallopt(M_MMAP_MAX, 0) serves every block from the heap, and a high M_TRIM_THRESHOLD keeps the freed
heap for the next step. Set WIKIGPT_KEEP_FREED_MEMORY=0 to turn it off.
"""

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
ENV = "WIKIGPT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True when it took effect."""
    if sys.platform != "linux" or os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
