"""Run the fuzz targets and print one table: target, executions, crashes, mismatches.

``run.py fuzz [--seconds N] [target...]``: coverage-guided, one atheris (libFuzzer) process
per target for N seconds, starting from the checked-in seeds (corpus/<target>/) plus what
earlier runs grew (out/work/<target>/, not checked in). Crashes are saved by libFuzzer as
findings/<target>-crash-<sha1> (also -timeout-, -oom-), mismatches by the target as
findings/mismatch-<target>-<sha1> with a .txt saying what differed.

``run.py replay [--mutations N] [target...]``: no libFuzzer; every seed, every saved finding
and N deterministic mutations of each seed through the targets in this process. The
sanitizer build runs this (a crash there is an AddressSanitizer/UBSan report); it also
reproduces a finding: ``run.py replay scan`` after fixing.

Exit status 1 when any target crashed or mismatched.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("answer", "tcp", "scan", "zonefile")
FINDINGS = HERE / "findings"
WORK = HERE / "out" / "work"
ARTIFACT_KINDS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def artifacts(target: str) -> set[Path]:
    if not FINDINGS.is_dir():
        return set()
    return {p for p in FINDINGS.iterdir()
            if p.name.startswith(f"{target}-") and any(k in p.name for k in ARTIFACT_KINDS)}


def fuzz_one(target: str, seconds: int, max_len: int) -> dict:
    FINDINGS.mkdir(exist_ok=True)
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    stats = WORK / f"{target}.stats.json"
    stats.unlink(missing_ok=True)
    before = artifacts(target)
    env = dict(os.environ, KDNS_FUZZ_MODE="atheris", KDNS_FUZZ_STATS=str(stats),
               KDNS_FUZZ_FINDINGS=str(FINDINGS))
    cmd = [sys.executable, str(HERE / f"fuzz_{target}.py"), f"-max_total_time={seconds}",
           "-timeout=10", "-rss_limit_mb=2048", f"-max_len={max_len}",
           f"-artifact_prefix={FINDINGS}/{target}-", "-print_final_stats=1",
           str(work), str(HERE / "corpus" / target)]
    log = WORK / f"{target}.log"
    started = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            timeout=seconds + 120).returncode
    text = log.read_text(errors="replace")
    m = re.findall(r"Done (\d+) runs", text) or re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    mism = json.loads(stats.read_text()) if stats.exists() else {}
    execs = int(m[-1]) if m else mism.get("executions", 0)
    new = sorted(artifacts(target) - before)
    crashed = len(new) or (rc != 0 and not m)
    return dict(target=target, executions=execs, crashes=int(bool(crashed)) if not new else len(new),
                mismatches=mism.get("mismatches", 0), seconds=round(time.monotonic() - started),
                saved=[p.name for p in new], why=mism.get("why", []), log=str(log),
                known=mism.get("known", {}))


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0xC0, 0x3F, 0x29, rng.randrange(256)))
        elif op == 2 and b:
            del b[rng.randrange(len(b)):]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4 and pool:
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
        elif op == 5 and len(b) > 2:
            i = rng.randrange(len(b) - 1)
            b[i:i + 2] = rng.randrange(65536).to_bytes(2, "big")
    return bytes(b)


def replay_one(target: str, mutations: int) -> dict:
    sys.path.insert(0, str(HERE))
    import common
    mod = importlib.import_module(f"fuzz_{target}")
    mod.setup()
    seeds = [p.read_bytes() for p in sorted((HERE / "corpus" / target).iterdir())]
    saved = []
    if FINDINGS.is_dir():
        saved = [p for p in sorted(FINDINGS.iterdir()) if not p.name.endswith(".txt") and
                 (p.name.startswith(f"{target}-") or p.name.startswith(f"mismatch-{target}-"))]
    inputs = seeds + [p.read_bytes() for p in saved]
    rng = random.Random(12)
    for s in seeds:
        inputs += [mutate(rng, s, seeds) for _ in range(mutations)]
    start_m, start_w = common.counts["mismatches"], len(common.counts["why"])
    crashes, why = 0, []
    # Each checked-in reproducer of an open bug must still be reported as that bug.
    for p in sorted(common.KNOWN.glob(f"{target}-*")) if common.KNOWN.is_dir() else ():
        name = p.name[len(target) + 1:]
        hits = common.counts["known"].get(name, 0)
        mod.TestOneInput(p.read_bytes())
        if common.counts["known"].get(name, 0) == hits:
            crashes += 1
            why.append(f"known/{p.name} no longer reproduces its bug: remove it and its "
                       f"handling in fuzz_{target}.py")
    for data in inputs:
        try:
            mod.TestOneInput(data)
        except Exception as e:          # noqa: BLE001 -- a crash of the target, reported
            crashes += 1
            if len(why) < 5:
                why.append(f"{type(e).__name__}: {e} on {data[:80].hex()}")
                traceback.print_exc()
    return dict(target=target, executions=len(inputs), crashes=crashes,
                mismatches=common.counts["mismatches"] - start_m,
                why=why + common.counts["why"][start_w:], known=dict(common.counts["known"]))


def table(rows: list[dict], title: str) -> str:
    out = [title, f"{'target':<10} {'executions':>11} {'crashes':>8} {'mismatches':>11}"]
    for r in rows:
        out.append(f"{r['target']:<10} {r['executions']:>11} {r['crashes']:>8} {r['mismatches']:>11}")
    for r in rows:
        for w in r.get("why", [])[:3]:
            out.append(f"  {r['target']}: {w[:200]}")
        for s in r.get("saved", []):
            out.append(f"  {r['target']}: saved findings/{s}")
        for name, n in r.get("known", {}).items():
            out.append(f"  {r['target']}: known open bug {name} (tests/fuzz/known/"
                       f"{r['target']}-{name}) hit {n} times")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("fuzz", "replay"))
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    ap.add_argument("--mutations", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    bad = [t for t in a.targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown targets {bad}; they are {', '.join(TARGETS)}")
    rows = []
    if a.mode == "replay":
        from kdns.packet import _fastpath
        print(f"engine: {_fastpath.__file__}", file=sys.stderr)
    for t in a.targets:
        if a.mode == "fuzz":
            rows.append(fuzz_one(t, a.seconds, a.max_len))
        else:
            rows.append(replay_one(t, a.mutations))
        print(f"{t}: {rows[-1]['executions']} executions, {rows[-1]['crashes']} crashes, "
              f"{rows[-1]['mismatches']} mismatches", file=sys.stderr, flush=True)
    title = (f"fuzz, {a.seconds} s per target" if a.mode == "fuzz"
             else f"replay of seeds, findings and {a.mutations} mutations per seed")
    print(table(rows, title))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["crashes"] or r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
