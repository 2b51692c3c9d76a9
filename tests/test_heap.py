"""training.heap: inside `kept()` a freed buffer's pages are reused, not faulted in again; after it they go back.

Each check runs in a fresh interpreter: glibc's state (its mmap threshold, what the heap holds) is process-wide, and
whatever ran before in the test process would decide what a fresh allocation costs."""

import os
import shutil
import subprocess
import sys

import pytest

from tunelab.training import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only (or MALLOC_* set): kept() changes nothing")

PRELUDE = """
import ctypes, os, torch
from tunelab.training import heap
MB = 2**20
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def churn(mb=48, torch_buffer=False):  # allocate, touch and free a buffer over the 32 MB mmap ceiling
    mapped, before = libc.mallinfo2().hblkhd, resident()
    if torch_buffer:
        buffer = torch.empty(mb * MB // 4).fill_(1.0)
    else:
        buffer = libc.malloc(mb * MB)
        ctypes.memset(buffer, 1, mb * MB)
    mapped, held = libc.mallinfo2().hblkhd - mapped, resident() - before
    if torch_buffer:
        del buffer
    else:
        libc.free(ctypes.c_void_p(buffer))
    return mapped // MB, held // MB, (resident() - before) // MB  # a mapping of its own; grown while held; after
"""


def _run(code: str, **env: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    p = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return [int(v) for v in p.stdout.split()]


def test_a_freed_buffer_is_reused_inside_and_given_back_outside():
    # Measured by glibc's own count of mapped bytes and by resident memory, not by page faults: how a kernel counts
    # those (huge pages, a sandbox's own paging) differs between machines. The reuse is checked with glibc's malloc
    # itself: torch asks for 64-byte aligned memory, and glibc 2.36 splits each such block off a larger free one,
    # so whether the next one of the same size fits the hole depends on what small allocations took the slivers
    values = _run("""
churn()
outside, torch_outside = churn(), churn(torch_buffer=True)
with heap.kept() as on:
    torch_inside = churn(torch_buffer=True)  # the heap grows from the OS; freed, the memory stays with it
    again = [churn() for _ in range(4)]
print(int(on), *outside, *torch_outside, *torch_inside, *(v for c in again for v in c))
""")
    on, rest = values[0], values[1:]
    outside, torch_outside, torch_inside, *again = (rest[i:i + 3] for i in range(0, len(rest), 3))
    assert on == 1
    for mapped, held, after in (outside, torch_outside):
        assert mapped >= 48 and held >= 36 and after <= 12, (outside, torch_outside)  # mapped, unmapped on free
    mapped, held, after = torch_inside
    assert mapped < 12 and held >= 36 and after >= 36, torch_inside  # from the heap, kept once freed
    for mapped, held, after in again:
        assert mapped < 12 and held <= 12 and after <= 12, again  # the same pages again: nothing new resident


def test_an_allocator_put_in_front_of_glibc_is_left_alone(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build an interposed malloc")
    (tmp_path / "front.c").write_text("#include <stddef.h>\nextern void *__libc_malloc(size_t);\n"
                                      "void *malloc(size_t n) { return __libc_malloc(n); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", tmp_path / "front.so", tmp_path / "front.c"], check=True)
    (on,) = _run("with heap.kept() as on: print(int(on))", LD_PRELOAD=str(tmp_path / "front.so"))
    assert on == 0  # glibc's mallopt would tune an allocator nobody calls


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
