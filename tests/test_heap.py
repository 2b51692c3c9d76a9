"""training.heap: inside `kept()` a freed buffer's pages are reused, not faulted in again; after it they go back.

Each check runs in a fresh interpreter: glibc's state (its mmap threshold, what the heap holds) is process-wide, and
whatever ran before in the test process would decide what a fresh allocation costs."""

import os
import subprocess
import sys

import pytest

from tunelab.training import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only (or MALLOC_* set): kept() changes nothing")

PRELUDE = """
import os, resource, torch
from tunelab.training import heap
MB = 2**20
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def churn(times, mb=48):  # page faults while allocating, touching and freeing a buffer over the 32 MB mmap ceiling
    before = faults()
    for _ in range(times):
        torch.empty(mb * MB // 4).fill_(1.0)
    return faults() - before
"""


def _run(code: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    p = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return [int(v) for v in p.stdout.split()]


def test_a_freed_buffer_is_reused_inside_and_faulted_in_afresh_outside():
    outside, on, inside = _run("""
churn(1)
outside = churn(6)
with heap.kept() as on:
    churn(1)  # the first one comes from the OS either way
    inside = churn(6)
print(outside, int(on), inside)
""")
    assert on == 1
    assert outside >= 6  # each allocation was a fresh mapping
    assert inside < outside / 4, (inside, outside)


def test_the_kept_memory_goes_back_to_the_os_at_the_end():
    held, after = _run("""
with heap.kept():
    start = resident()
    buffers = [torch.ones(8 * MB // 4) for _ in range(40)]  # 320 MB in pieces under the mmap threshold
    del buffers
    held = resident() - start
print(held, resident() - start)
""")
    assert held > 200 * 2**20  # freed, but kept
    assert after < held / 4, (held, after)
