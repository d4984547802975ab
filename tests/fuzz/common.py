"""What the fuzz targets share: the import path, the stats file and saved findings.

A target is a module with ``TestOneInput(data: bytes)`` and ``setup()``. An exception that
escapes ``TestOneInput`` is a crash (atheris saves the input as ``crash-<sha1>`` and stops);
a disagreement between two implementations is a mismatch: ``mismatch(name, data, why)``
saves the input as ``mismatch-<name>-<sha1>`` in the findings directory and fuzzing goes on.
``tests/fuzz/run.py`` reads the counts back from the stats file the target writes.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# tests/ for zonefixtures; kdns itself comes from the installed (editable) package, or from
# PYTHONPATH when the sanitizer build puts its own copy first (tests/fuzz/sanitize.sh).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

FINDINGS = Path(os.environ.get("KDNS_FUZZ_FINDINGS", HERE / "findings"))
STATS = os.environ.get("KDNS_FUZZ_STATS")          # JSON file the runner reads back

counts = {"executions": 0, "mismatches": 0, "why": [], "known": {}}
KNOWN = HERE / "known"          # checked-in reproducers of open bugs: <target>-<name>


def write_stats() -> None:
    if STATS:
        Path(STATS).write_text(json.dumps(counts))


atexit.register(write_stats)


def executed() -> None:
    counts["executions"] += 1
    if counts["executions"] % 5000 == 0:
        write_stats()           # libFuzzer may end the process without atexit handlers


def mismatch(target: str, data: bytes, why: str) -> None:
    """Record a disagreement: the input is kept so that ``run.py --replay`` reproduces it."""
    counts["mismatches"] += 1
    if len(counts["why"]) < 20:
        counts["why"].append(why[:300])
    FINDINGS.mkdir(parents=True, exist_ok=True)
    name = f"mismatch-{target}-{hashlib.sha1(data).hexdigest()}"
    (FINDINGS / name).write_bytes(data)
    (FINDINGS / (name + ".txt")).write_text(why + "\n")
    write_stats()


FUZZING = os.environ.get("KDNS_FUZZ_MODE") == "atheris"


def instrumented():
    """Wrap a target's kdns imports: atheris adds coverage to the Python code they load
    (the compiled extensions are C: their coverage is not seen, their crashes are)."""
    if FUZZING:
        import atheris
        return atheris.instrument_imports(include=["kdns"])
    import contextlib
    return contextlib.nullcontext()


def known(target: str, name: str, data: bytes, why: str) -> None:
    """An open bug this target has a checked-in reproducer for (known/<target>-<name>):
    counted and kept once, not a crash, so fuzzing goes on looking for new ones. ``run.py
    replay`` fails once the reproducer stops reproducing, so the entry goes with the fix."""
    first = name not in counts["known"]
    counts["known"][name] = counts["known"].get(name, 0) + 1
    if first:
        FINDINGS.mkdir(parents=True, exist_ok=True)
        (FINDINGS / f"known-{target}-{name}-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
        write_stats()


def raised_in(exc: BaseException, path: str) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in ``path`` (e.g. kdns/kube/file.py)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(path)


def passed_through(exc: BaseException, path: str) -> bool:
    """Whether any frame of ``exc``'s traceback is in ``path``."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(path):
            return True
        tb = tb.tb_next
    return False


def main(module) -> None:
    """``python fuzz_x.py [libFuzzer flags] [corpus dirs]``: fuzz with atheris."""
    import atheris
    module.setup()
    atheris.Setup(sys.argv, module.TestOneInput)
    atheris.Fuzz()
