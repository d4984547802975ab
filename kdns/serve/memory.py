"""Handing a compile's transient memory back to the OS."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim          # glibc only: musl has no malloc_trim
except (OSError, AttributeError):
    _LIBC = None


def release_memory() -> None:
    """Give a compile's transient memory back to the OS, so the supervisor's PSS is its
    steady state, not its peak (the whole pod must fit kube-dns's 170 MiB limit).

    The full collection matters although a build leaves no cycles: measured at 10k services
    and 100k endpoints, RSS falls from ~180 to ~70 MiB (most likely because emptying the
    interpreter's free lists lets pymalloc unmap arenas that only cached objects held), and an
    idle supervisor allocates too little for the automatic full collection ever to run.
    malloc_trim(0) then hands glibc's free heap pages back (~70 -> ~55 MiB).
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)        # ctypes releases the GIL for the call
