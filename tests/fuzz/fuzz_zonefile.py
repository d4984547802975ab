"""Fuzz target: the zone-file loader (``--from-file``), from bytes on disk to an image.

Input: the file's bytes. ``serve.build.compile_file_counted`` must either give image
bytes the packet path accepts, or raise ``kube.file.InputError`` (one sentence naming the
file and the problem); any other exception is a crash, because ``kdns serve`` would show
a traceback instead of the sentence (or a reload would die instead of keeping the last
good image).

Known open bugs, each with its reproducer under ``known/``:

- ``zonefile-kind-not-a-string``: a ``kind`` that is a mapping or a list (``kind: {name:
  a}``) raises TypeError in ``kube.file._flatten`` (``kind in KINDS`` hashes it) instead of
  being ignored like any other unknown kind;
- ``zonefile-deep-json``: JSON nested deeper than the interpreter's recursion limit
  (``[`` x 1100) raises RecursionError out of ``kube.file._parse``, which catches only
  ``json.JSONDecodeError``.
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
    except TypeError as e:
        if "unhashable" in str(e) and common.raised_in(e, "kdns/kube/file.py"):
            common.known("zonefile", "kind-not-a-string", data, str(e))
            return
        raise
    except RecursionError as e:
        if common.passed_through(e, "kdns/kube/file.py"):
            common.known("zonefile", "deep-json", data, str(e))
            return
        raise
    except InputError as e:
        if not str(e).startswith(S["path"] + ":"):
            common.mismatch("zonefile", data, f"the error does not name the file: {e}")
        return
    img = F.Image(buf)          # ValueError here: the compiler made an image C refuses
    img.verify()


if __name__ == "__main__":
    common.main(sys.modules[__name__])
