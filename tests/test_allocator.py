"""spiral.runtime.allocator: freed activations stay in the process instead of being page-faulted anew.

Each case runs in a fresh interpreter, because ``mallopt`` changes the whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One "update" allocates and frees 40, 40 and 12 MB tensors (above glibc's largest dynamic
# mmap threshold, 32 MB, like a CPU learner's activations); after five warm-up updates, count
# the minor page faults of ten more. With glibc's defaults every block is a fresh mmap.
PROBE = """
import json, resource
import torch
from spiral.runtime.allocator import retain_freed_memory
retained = retain_freed_memory()
def update():
    a, b, c = torch.ones(10 << 20), torch.ones(10 << 20), torch.ones(3 << 20)
    del a, b, c
for _ in range(5):
    update()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    update()
print(json.dumps({"retained": retained, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(retain: str) -> dict:
    env = {**os.environ, "SPIRAL_MALLOC_RETAIN": retain}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults() -> None:
    default, kept = probe("0"), probe("1")
    assert default["retained"] is False and kept["retained"] is True
    pages = 10 * (92 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > pages // 2, default  # every block faulted in again
    assert kept["faults"] < pages // 20, kept  # the same block came back from the heap


def test_limits_outside_mallopts_int_are_refused() -> None:
    from spiral.runtime.allocator import retain_freed_memory

    for bad in (0, 1 << 31):
        with pytest.raises(ValueError, match="limit_bytes"):
            retain_freed_memory(bad)
