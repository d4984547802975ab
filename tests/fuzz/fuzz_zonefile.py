"""Fuzz target: the zone-file loader (``--from-file``), from bytes on disk to an image.

Input: the file's bytes. ``serve.build.compile_file_counted`` must either give image
bytes the packet path accepts, or raise ``kube.file.InputError`` (one sentence naming the
file and the problem); any other exception is a crash, because ``kdns serve`` would show
a traceback instead of the sentence (or a reload would die instead of keeping the last
good image).

Its first findings (a ``kind`` that is a mapping; JSON nested past the recursion limit)
are fixed and kept as tests in tests/test_file_source.py.
"""
from __future__ import annotations

import os
import sys
import tempfile

import common

with common.instrumented():
    from kdns.kube.file import InputError
    from kdns.packet import _fastpath as F
    from kdns.serve import build

S: dict = {}


def setup() -> None:
    import logging
    logging.disable(logging.WARNING)          # one warning per bad object is expected
    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, S["path"] = tempfile.mkstemp(prefix="kdns-fuzz-", suffix=".yaml", dir=d)
    os.close(fd)
    import atexit
    atexit.register(os.unlink, S["path"])


def TestOneInput(data: bytes) -> None:
    if not S:
        setup()
    common.executed()
    with open(S["path"], "wb") as f:
        f.write(data)
    try:
        buf, _ = build.compile_file_counted(S["path"], serial=1)
    except InputError as e:
        if not str(e).startswith(S["path"] + ":"):
            common.mismatch("zonefile", data, f"the error does not name the file: {e}")
        return
    img = F.Image(buf)          # ValueError here: the compiler made an image C refuses
    img.verify()


if __name__ == "__main__":
    common.main(sys.modules[__name__])
