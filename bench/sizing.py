"""A sizing formula for kdns's memory, measured rather than guessed.

bench/bench_memory.py runs a real ``kdns serve`` against the test suite's stand-in
Kubernetes API, and this script runs it at several cluster sizes and worker counts. It
fits two formulas by least squares, one for the peak (the first sync) and one for the
steady state (under endpoint churn):

    MiB ~= a + b * services/1000 + c * endpoints/1000 + d * workers

Both are summed PSS of every kdns process, which is what the pod's memory cgroup is charged.
CoreDNS publishes a formula of the same shape, (pods + services) / 1000 + 54 MiB, where the
pods are the ones behind the endpoints (one endpoint per pod here). This one is measured the
same way, from runs, and it says which limit a cluster needs.

Printed: one line per run, the two fits with their largest residual, and the largest cluster
that fits a memory limit at a worker count (--limit, --workers-for-limit), with --headroom
left free. Written: a JSON of the runs and the fits.

Not a test (a quiet machine wanted: each run is a real start and sync).

    .venv/bin/python bench/sizing.py [--grid 1000x10x2,4000x10x2,...] [--limit 170]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_memory  # noqa: E402

# services x endpoints-per-service x workers. The endpoint count varies at fixed services
# (and the reverse), and the workers at one size, so that the four terms can be told apart.
DEFAULT_GRID = ("1000x10x2,4000x10x2,10000x10x2,4000x2x2,10000x2x2,10000x5x2,"
                "4000x10x1,4000x10x4")
TERMS = ("base", "per_1000_services", "per_1000_endpoints", "per_worker")


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    runs = []
    for item in text.split(","):
        try:
            s, e, w = (int(x) for x in item.split("x"))
        except ValueError:
            raise SystemExit(f"--grid: {item!r} is not SERVICESxPER_SERVICExWORKERS") from None
        runs.append((s, e, w))
    return runs


def lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares through the normal equations (four unknowns: plain Gauss-Jordan with
    partial pivoting is exact enough, and needs no numpy)."""
    n = len(rows[0])
    m = [[sum(r[i] * r[j] for r in rows) for j in range(n)]
         + [sum(r[i] * y for r, y in zip(rows, ys))] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise SystemExit("the grid cannot separate the terms: vary services, endpoints "
                             "and workers independently")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def features(services: int, endpoints: int, workers: int) -> list[float]:
    return [1.0, services / 1000, endpoints / 1000, float(workers)]


def fit(runs: list[dict], key: str) -> dict:
    rows = [features(r["services"], r["endpoints"], r["workers"]) for r in runs]
    coef = lstsq(rows, [r[key] for r in runs])
    worst = max(abs(sum(c * x for c, x in zip(coef, row)) - r[key])
                for row, r in zip(rows, runs))
    return {**dict(zip(TERMS, coef)), "worst_residual_mib": worst}


def coredns_mib(services: int, endpoints: int) -> float:
    """CoreDNS's published sizing, (pods + services) / 1000 + 54 MiB, a pod per endpoint."""
    return (endpoints + services) / 1000 + 54


def predict(f: dict, services: int, endpoints: int, workers: int) -> float:
    return sum(f[t] * x for t, x in zip(TERMS, features(services, endpoints, workers)))


def formula(f: dict) -> str:
    return (f"{f['base']:.1f} + {f['per_1000_services']:.2f}*svc/1000 + "
            f"{f['per_1000_endpoints']:.2f}*ep/1000 + {f['per_worker']:.2f}*workers MiB "
            f"(worst residual {f['worst_residual_mib']:.1f})")


def largest_fit(f: dict, limit: float, workers: int, per_service: int) -> int:
    """The most services (each with ``per_service`` endpoints) whose prediction stays under
    ``limit``."""
    per = f["per_1000_services"] + per_service * f["per_1000_endpoints"]
    room = limit - f["base"] - f["per_worker"] * workers
    return max(0, int(room / per * 1000)) if per > 0 else 0


def steady_mib(samples: list[dict]) -> float:
    """Where a run settles: the last sample, after the churn (the memory a long-running pod
    keeps; Python's allocator does not give the first sync's peak back all at once)."""
    return samples[-1]["sum_kib"] / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=DEFAULT_GRID,
                    help="comma-separated SERVICESxPER_SERVICExWORKERS runs")
    ap.add_argument("--idle", type=float, default=2.0)
    ap.add_argument("--churn", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--limit", type=float, default=170.0, help="a memory limit, MiB")
    ap.add_argument("--workers-for-limit", type=int, default=2)
    ap.add_argument("--headroom", type=float, default=0.2,
                    help="share of the limit left free for what the fit does not see")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "sizing.json"))
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for services, per_service, workers in parse_grid(a.grid):
            opts = argparse.Namespace(source="api", services=services, per_slice=per_service,
                                      idle=a.idle, churn=a.churn, rate=a.rate, file="")
            r = bench_memory.run_one(opts, workers, tmp)
            run = {"services": services, "endpoints": services * per_service,
                   "workers": workers, "ready_s": r["ready_s"],
                   "peak_mib": round(r["peak_mib"], 1),
                   "steady_mib": round(steady_mib(r["samples"]), 1)}
            runs.append(run)
            print(f"{services:>6} svc {run['endpoints']:>7} ep {workers} workers: ready "
                  f"{run['ready_s']:.1f}s, peak {run['peak_mib']:.1f} MiB, steady "
                  f"{run['steady_mib']:.1f} MiB", flush=True)
    fits = {"peak": fit(runs, "peak_mib"), "steady": fit(runs, "steady_mib")}
    print(f"peak   ~= {formula(fits['peak'])}")
    print(f"steady ~= {formula(fits['steady'])}")
    usable = a.limit * (1 - a.headroom)
    for per_service in (10, 2):
        n = largest_fit(fits["peak"], usable, a.workers_for_limit, per_service)
        print(f"{a.limit:.0f} MiB with {a.headroom:.0%} headroom, {a.workers_for_limit} "
              f"workers, {per_service} endpoints per service: up to {n} services "
              f"({n * per_service} endpoints) by the peak fit")
    for r in runs:
        coredns = coredns_mib(r["services"], r["endpoints"])
        print(f"{r['services']:>6} svc {r['endpoints']:>7} ep {r['workers']} workers: peak "
              f"{r['peak_mib']:.0f} (fit {predict(fits['peak'], r['services'], r['endpoints'], r['workers']):.0f}), "
              f"steady {r['steady_mib']:.0f} MiB; CoreDNS's formula {coredns:.0f} MiB: peak "
              f"{r['peak_mib'] / coredns:.2f}x, steady {r['steady_mib'] / coredns:.2f}x")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"runs": runs, "fits": fits}, f, indent=1)
    return {"runs": runs, "fits": fits}


if __name__ == "__main__":
    main()
