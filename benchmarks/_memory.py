"""Peak memory of one call, measured honestly.

CPU (Linux): peak resident-set growth. PyTorch's CPU allocator hands every tensor to glibc
malloc and returns it on free (no caching), so resident memory tracks live tensors, with two
distortions this module removes:

* glibc keeps freed heap memory resident (and, with its dynamic mmap threshold, serves
  blocks up to 32 MiB from the heap after the first large free), so a warm-up call leaves
  pages that the measured call would reuse without raising the peak. The measuring process
  is started with ``MALLOC_MMAP_THRESHOLD_`` fixed (large blocks always mmap'd, unmapped on
  free) and calls ``malloc_trim(0)`` before taking its baseline.
* ``ru_maxrss`` never goes down, so a setup step (inputs, a warm-up) that peaked higher
  would hide the call. Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
  high-water mark (VmHWM, which also feeds ru_maxrss) to the current RSS.

Measured value: VmHWM after the call minus VmRSS just before it (after warm-up, trim and
reset), i.e. everything the call allocated and touched at its peak, outputs (gradients)
included, inputs excluded. Without a writable clear_refs, the fallback is one call with no
warm-up and ru_maxrss minus the RSS before it (lazy one-time allocations then count too).

CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
memory allocated before the call (inputs): allocator-exact, caching does not distort it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from collections.abc import Callable

import torch

#: environment for a child process whose RSS should track live tensors (see module doc)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def malloc_trim() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_hwm() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_growth(fn: Callable[[], object], warmup: bool = True) -> dict:
    """Run ``fn`` (after one warm-up call) and return the peak RSS growth over the pre-call RSS.

    Returns {"peak_bytes", "method", "baseline_rss"}. The result of ``fn`` is dropped before
    returning but after the peak is read, so outputs count.
    """
    can_reset = reset_hwm()
    if warmup and can_reset:
        fn()
    gc.collect()
    malloc_trim()
    can_reset = reset_hwm()
    base = rss_bytes()
    out = fn()
    peak = hwm_bytes()
    del out
    if base is None or peak is None:
        return {"peak_bytes": None, "method": "unavailable", "baseline_rss": base}
    method = "VmHWM after clear_refs reset - VmRSS before" if can_reset else "ru_maxrss - VmRSS before (no reset)"
    return {"peak_bytes": max(peak - base, 0), "method": method, "baseline_rss": base}


def cuda_peak_extra(fn: Callable[[], object], device=None) -> dict:
    """Peak CUDA memory allocated during ``fn`` over what was allocated before it (the inputs)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"peak_bytes": peak - base, "method": "torch.cuda.max_memory_allocated - allocated before", "baseline": base}


def peak_extra(fn: Callable[[], object], device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_extra(fn, device)
    return cpu_peak_growth(fn)


def child_env() -> dict:
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    return env
