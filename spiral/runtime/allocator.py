"""Keep freed memory in the process so CPU training does not page-fault its activations anew.

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (at most 32 MiB, adjusted on
the fly) with a fresh ``mmap`` and hands it back with ``munmap`` when freed, and it trims the
top of the heap back to the kernel above ``M_TRIM_THRESHOLD``. A CPU learner allocates and
frees the same full-resolution activations on every update (``[T*B, 16, 64, 64]`` float32 is
38 MB for the CPU profile), so by default each update touches ~35,000 fresh pages, and the
kernel zero-fills every one: measured on the CPU profile's torso, forward + backward of 144
frames took 129 ms with ~35,000 minor page faults and 73 ms with none (``bench/RESULTS.md``).

:func:`retain_freed_memory` raises both thresholds so such blocks come from the heap and go
back to it, which costs resident memory (a process keeps up to its peak: 576 MB instead of
402 MB for the CPU profile's learner) but no speed. The policy learner calls it at start-up
(``start_process(..., retain_memory=True)``), and so do the benchmarks that time its update.
The other services do not: their blocks are below the threshold anyway (a discriminator update
at batch 16 is unchanged, 0.95-1.05x). The setting changes no number: updates, renders and
whole in-process training loops are bit-identical either way (``bench/RESULTS.md``). It does
nothing where the C library is not glibc (musl, macOS) and when ``SPIRAL_MALLOC_RETAIN=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (``<malloc.h>``)."""

RETAIN_BYTES = 1 << 30
"""Blocks up to this size come from the heap, and up to this much freed heap is kept (1 GiB;
``mallopt`` takes an ``int``, so 2 GiB is the most it could be)."""


def retain_freed_memory(limit_bytes: int = RETAIN_BYTES) -> bool:
    """Make glibc keep freed blocks of up to ``limit_bytes`` for reuse; True if it took effect."""
    if os.environ.get("SPIRAL_MALLOC_RETAIN", "1") == "0":
        return False
    if not 0 < limit_bytes < 1 << 31:
        raise ValueError(f"limit_bytes must be in (0, 2 GiB), got {limit_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, limit_bytes))
    if not ok:
        log.warning("mallopt refused to raise the mmap/trim thresholds to %d bytes", limit_bytes)
    return ok
