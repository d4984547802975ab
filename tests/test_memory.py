"""kdns.serve.memory: the supervisor's malloc tuning (glibc)."""
import subprocess
import sys

from conftest import unavailable

from kdns.serve import memory

# In a fresh interpreter: free an mmapped 8 MiB block (glibc then raises its mmap threshold
# to 8 MiB), then allocate 1 MiB and say whether it got pages of its own (mallinfo2's hblkhd).
PROBE = r"""
import ctypes, sys
from kdns.serve import memory
libc = ctypes.CDLL("libc.so.6")
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = memory.tune_malloc() if sys.argv[1] == "tune" else None
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
p = libc.malloc(1 << 20)
print(tuned, libc.mallinfo2().hblkhd - before >= 1 << 20)
libc.free(p)
"""


def probe(mode: str, **env) -> str:
    import os
    e = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          check=True, timeout=60, env=e).stdout.split()


def test_tuned_malloc_keeps_big_blocks_out_of_the_heap_after_a_big_free():
    if memory._LIBC is None or not hasattr(memory._LIBC, "mallinfo2"):
        unavailable("glibc's mallopt and mallinfo2 only")
    # Untuned, glibc's dynamic threshold serves the 1 MiB block from the heap.
    assert probe("plain") == ["None", "False"]
    assert probe("tune") == ["True", "True"]


def test_an_operators_malloc_setting_is_left_alone():
    if memory._LIBC is None:
        unavailable("glibc only")
    assert probe("tune", MALLOC_MMAP_THRESHOLD_="4194304") == ["False", "False"]
