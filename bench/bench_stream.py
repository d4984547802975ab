"""Bytes a node-local pulls per change: the full image (compressed) against the delta.

Builds a cluster of N Services (each with an EndpointSlice of --per-slice endpoints, every
--headless-every-th headless, as bench_api_scale.py's), compiles it, then applies one change
of each kind and compiles again, and measures what kdns/serve/delta.py sends for it:

    .venv/bin/python bench/bench_stream.py --services 1000 10000

Prints one JSON line per (services, change): image bytes, the full image zlib'd, the
delta, and the time to make and to apply the delta. The serial is fixed, as two replicas'
images of the same state would differ only there (a real change moves it: +8 bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_api_scale import service, slice_for  # noqa: E402
from kdns.serve import delta  # noqa: E402
from kdns.serve import build  # noqa: E402


def cluster(n: int, per: int, headless_every: int, changes=()) -> list[dict]:
    items = []
    for ns in range(min(50, n) or 1):
        items.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{ns}"}})
    for i in range(n):
        svc = {"apiVersion": "v1", "kind": "Service", **service(i, i % headless_every == 0)}
        sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              **slice_for(i, per)}
        items += [svc, sl]
    for change in changes:
        change(items)
    return items


def compile_items(items, serial: int) -> bytes:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    try:
        return build.compile_file(f.name, serial=serial)
    finally:
        os.unlink(f.name)


def add_service(n):
    def change(items):
        items.append({"apiVersion": "v1", "kind": "Service", **service(n, False)})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      **slice_for(n, 3)})
    return change


def move_endpoint(i):
    def change(items):
        for it in items:
            if it["kind"] == "EndpointSlice" and it["metadata"]["name"] == f"svc{i}-abc":
                it["endpoints"][0]["addresses"] = ["10.250.1.2"]
    return change


def remove_endpoint(i):
    def change(items):
        for it in items:
            if it["kind"] == "EndpointSlice" and it["metadata"]["name"] == f"svc{i}-abc":
                del it["endpoints"][0]
    return change


def measure(n: int, per: int, headless_every: int) -> list[dict]:
    base = compile_items(cluster(n, per, headless_every), serial=1)
    full = len(zlib.compress(base, 6))
    out = []
    mid = n // 2 + 1          # not headless (headless_every divides 0, not n//2+1 here)
    for what, change in (("add 1 service", add_service(n)),
                         ("change 1 endpoint IP", move_endpoint(mid)),
                         ("remove 1 endpoint", remove_endpoint(mid))):
        target = compile_items(cluster(n, per, headless_every, [change]), serial=2)
        t0 = time.perf_counter()
        d = delta.make(base, target)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert delta.apply(base, d) == target
        applied = time.perf_counter() - t0
        out.append({"services": n, "change": what, "image_bytes": len(target),
                    "full_zlib_bytes": full, "delta_bytes": len(d),
                    "ratio_full_over_delta": round(full / len(d), 1),
                    "make_s": round(made, 3), "apply_s": round(applied, 3)})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--per-slice", type=int, default=10)
    ap.add_argument("--headless-every", type=int, default=5)
    a = ap.parse_args(argv)
    rows = []
    for n in a.services:
        for row in measure(n, a.per_slice, a.headless_every):
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
