"""Process-wide settings for CPU training and benchmarks.

glibc's malloc serves blocks from 128 KiB up (adapting upwards as they are freed) with mmap, and
gives the top of the heap back to the kernel whenever more than twice that is free there. A training
step frees and reallocates the same tens of MB of activations every step, so by default the kernel
takes those pages back and faults them in again on the next step: at the WikiText-2 preset shape
with d_osc 32, ~2,500 page faults and ~5 ms of system time per attention fwd+bwd that computes for
~15 ms (fused softmax: none). A whole training step at that shape faulted ~125,000 pages (the
logits alone are 128 MB) and spent ~240 of ~800 ms in the kernel, for every variant alike.
`tune_allocator` keeps freed memory in the process instead, as PyTorch's CUDA caching allocator
does on GPU and jemalloc / tcmalloc (PyTorch's CPU tuning advice) do on CPU: no mmap blocks, no
trimming below 1 GiB, and the heap grown in 256 MB steps. Measured with it: no page faults, and
the same step in ~575 ms. Resident memory then stays at its peak until the process ends.

On by default in `run_trial` and `scaling bench`; `SCALING_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # fixed (glibc adapts it otherwise)
    (M_MMAP_MAX, 0),  # no block from mmap (whose free unmaps it), however large: logits are > 100 MB
    (M_TRIM_THRESHOLD, 1024 * 1024 * 1024),  # give memory back only past 1 GiB free at the heap top
    (M_TOP_PAD, 256 * 1024 * 1024),  # grow the heap 256 MB at a time (64 MB still faulted 5,000 pages a step)
)

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Apply the malloc settings above once per process. Returns whether they are in effect
    (False off Linux/glibc, or with SCALING_MALLOC_TUNING=0)."""
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if os.environ.get("SCALING_MALLOC_TUNING", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            tuned = all([bool(mallopt(option, value)) for option, value in SETTINGS])
    _state["tuned"] = tuned
    return tuned


def allocator_name() -> str:
    """How the process allocates host memory, for benchmark records."""
    return "glibc, freed memory kept (workers.runtime)" if _state.get("tuned") else "default"
