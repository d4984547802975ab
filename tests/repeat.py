"""Flake finder: run the suite N times on the current tree and name every test that did not
pass every time.

Why: a flaky test hides real regressions (people learn to re-run) and shows up only under
repetition and load. Run this on any change that touches timing, processes or sockets:

    make test-repeat N=3            # or: python tests/repeat.py -n 3 [-- extra pytest args]

Each run writes its own JUnit XML (under ``--out``); the summary lists each test with its
pass count out of N, and the exit status is non-zero when any test did not pass in every
run (a test missing from a run, e.g. because that run crashed, counts as not passed). A test
skipped in every run is reported apart: consistent, but not a pass.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outcomes(junit_path: str) -> dict[str, str]:
    """{test id: 'passed' | 'failed' | 'error' | 'skipped'} from one pytest JUnit XML."""
    try:
        tree = ET.parse(junit_path)
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for case in tree.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        test_id = f"{cls}::{name}" if cls else name
        result = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                result = "failed" if child.tag == "failure" else "error"
                break
            if child.tag == "skipped":
                result = "skipped"
        # A setup error plus a call failure shows up as two <testcase>s: keep the worst.
        if out.get(test_id) in ("failed", "error"):
            continue
        out[test_id] = result
    return out


def summarise(runs: list[dict[str, str]]) -> tuple[list[tuple[str, int, list[str]]], list[str]]:
    """(tests not passed in every run as (id, passes, outcomes per run), always-skipped ids)."""
    ids = sorted(set().union(*runs)) if runs else []
    unstable, skipped = [], []
    for test_id in ids:
        seen = [run.get(test_id, "missing") for run in runs]
        if all(s == "skipped" for s in seen):
            skipped.append(test_id)
            continue
        passes = seen.count("passed")
        if passes != len(runs):
            unstable.append((test_id, passes, seen))
    return unstable, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="number of runs (default 3)")
    ap.add_argument("--out", default=None,
                    help="directory for the per-run JUnit XML and logs (default: a new temp dir)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("-n must be at least 1")
    out = args.out or tempfile.mkdtemp(prefix="kdns-test-repeat-")
    os.makedirs(out, exist_ok=True)
    runs, lines = [], []
    for i in range(1, args.n + 1):
        junit = os.path.join(out, f"run{i}.xml")
        log = os.path.join(out, f"run{i}.log")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *args.pytest_args]
        started = time.monotonic()
        with open(log, "wb") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        took = time.monotonic() - started
        run = outcomes(junit)
        runs.append(run)
        counts = defaultdict(int)
        for v in run.values():
            counts[v] += 1
        line = (f"run {i}/{args.n}: exit {rc}, {took:.0f} s, "
                + ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped")
                            if counts[k]))
        lines.append(line)
        print(line, flush=True)
    unstable, skipped = summarise(runs)
    print(f"\n{args.n} runs of {len(set().union(*runs))} tests; logs and JUnit XML in {out}")
    for line in lines:
        print("  " + line)
    if skipped:
        print(f"skipped in every run ({len(skipped)}):")
        for test_id in skipped:
            print(f"  {test_id}")
    if unstable:
        print(f"NOT passed every time ({len(unstable)}):")
        for test_id, passes, seen in unstable:
            print(f"  {passes}/{args.n} passed  {test_id}  [{' '.join(seen)}]")
        return 1
    print(f"every test passed in all {args.n} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
