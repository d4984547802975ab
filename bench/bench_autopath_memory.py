"""The memory autopath's client table costs at scale: 150,000 pods (default) in 500
namespaces, slimmed into the cluster model as the pods watch keeps them (namespace, name,
IP), and compiled into the image's autopath section (kdns/zone/layout.py).

Prints the model's Python heap for the pods (tracemalloc), the section's bytes in the
image, the time to build the section, and one lookup's cost in the compiled path.

    .venv/bin/python bench/bench_autopath_memory.py [--pods 150000]
"""
from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from kdns.kube.model import ClusterModel
from kdns.kube import records
from kdns.serve import build
from kdns.zone import encode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=150_000)
    ap.add_argument("--namespaces", type=int, default=500)
    a = ap.parse_args(argv)
    m = ClusterModel(clock=lambda: 1_700_000_000)
    m.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "kubernetes"},
             "spec": {"clusterIP": "10.96.0.1"}})
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(a.pods):
        ns = f"team-{i % a.namespaces}"
        m.apply({"kind": "Pod", "metadata": {"namespace": ns, "name": f"app-{i}-x7k2p"},
                 "status": {"phase": "Running",
                            "podIP": f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"}})
    gc.collect()
    model_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    keys: dict = {}
    t0 = time.perf_counter()
    section = build.autopath_image(m, ("example.org",), keys)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert build.autopath_image(m, ("example.org",), keys) == section
    rebuild_s = time.perf_counter() - t0
    with_ap = build.compile_model(m, autopath=("example.org",))
    without = build.compile_model(m)
    from kdns.packet import _fastpath
    import dns.message
    img = _fastpath.Image(with_ap)
    q = dns.message.make_query("kubernetes.default.team-7.svc.cluster.local", "A").to_wire()
    key = encode.ip_key("10.64.0.7")
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        _fastpath.answer(img, q, edns_max=1232, client=key)
    walk_ns = (time.perf_counter() - t0) / n * 1e9
    t0 = time.perf_counter()
    for _ in range(n):
        _fastpath.answer(img, q, edns_max=1232)
    plain_ns = (time.perf_counter() - t0) / n * 1e9
    print(f"{a.pods:,} pods in {a.namespaces} namespaces:")
    print(f"  cluster model, the pods' slim objects: {model_bytes / 2**20:.1f} MiB "
          f"({model_bytes / a.pods:.0f} B/pod)")
    print(f"  image autopath section: {len(section) / 2**20:.2f} MiB "
          f"({len(section) / a.pods:.1f} B/pod; image {len(without):,} -> {len(with_ap):,} B)")
    print(f"  section build: {build_s * 1000:.0f} ms first, {rebuild_s * 1000:.0f} ms after a pod "
          f"change (the incremental compiler's key cache)")
    print(f"  answer() through Python, walked query {walk_ns:.0f} ns vs NXDOMAIN without a "
          f"client {plain_ns:.0f} ns (both include the Python call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
