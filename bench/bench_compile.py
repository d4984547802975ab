"""How long a from-scratch zone build takes at scale, and how big the image is.

Why: the goal is "compile under 1 second" for 10,000 services and 100,000 endpoints;
the controller rebuilds the whole image on every (debounced) change, so this is the latency
between an API event and the answer changing. Run as a script (prints a table, optional
cProfile) or under pytest-benchmark (``pytest bench/bench_compile.py``).

It generates the cluster in memory (no API, no files); it must not touch the network.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdns import settings  # noqa: E402
from kdns.zone import image as I  # noqa: E402
from kdns.kube import records  # noqa: E402
from kdns.serve import build
from kdns.kube.model import ClusterModel  # noqa: E402


def generate(services: int = 10_000, endpoints: int = 100_000, namespaces: int = 100):
    """API-shaped dicts: every 10th service headless (StatefulSet-style hostnames on every
    20th), every 25th dual-stack, every 50th ExternalName; the rest ClusterIP with one or
    two named ports. Endpoints are spread evenly over the non-ExternalName services."""
    objs = [{"kind": "Namespace", "metadata": {"name": f"ns{n}"}} for n in range(namespaces)]
    with_eps = [i for i in range(services) if i % 50 != 49]
    per = endpoints // len(with_eps)
    extra = endpoints - per * len(with_eps)
    pod = 0
    for i in range(services):
        ns, name = f"ns{i % namespaces}", f"svc{i}"
        objs.append(_service(i, ns, name))
        if i % 50 == 49:
            continue
        n = per + (1 if extra > 0 else 0)
        extra -= 1
        eps = []
        for k in range(n):
            ip = f"10.{64 + pod // 65536}.{pod // 256 % 256}.{pod % 256}"
            ep = {"addresses": [ip], "conditions": {"ready": True},
                  "targetRef": {"kind": "Pod", "name": f"{name}-{k}", "namespace": ns}}
            if i % 20 == 0:
                ep["hostname"] = f"{name}-{k}"
            eps.append(ep)
            pod += 1
        objs.append({"kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-abcde", "namespace": ns,
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4", "endpoints": eps,
                     "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    return objs


def _service(i: int, ns: str, name: str) -> dict:
    if i % 50 == 49:
        return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
                "spec": {"type": "ExternalName", "externalName": f"{name}.example.com"}}
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    if i % 3 == 0:
        ports.append({"name": "metrics", "port": 9100, "protocol": "TCP"})
    v4 = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    ips = ["None"] if i % 10 == 0 else [v4, f"fd00:10:96::{i:x}"] if i % 25 == 1 else [v4]
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ports": ports}}


def build_model(objs) -> ClusterModel:
    model = ClusterModel()
    for obj in objs:
        model.apply(obj)
    return model


def compile_model(model: ClusterModel) -> bytes:
    """Rules and compile: what the controller does after each (debounced) change."""
    zd = records.zone_data(model, serial=1)
    return I.compile_image(zd.rrsets, zd.zones, exists=zd.exists, serial=zd.serial)


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak is the compile's own.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed(fn, *args):
    """(result, wall seconds, CPU seconds): on a shared machine CPU time is the steadier."""
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def best_of(n: int, fn, *args):
    runs = [timed(fn, *args) for _ in range(n)]
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", choices=("rules", "compile"), help="cProfile one phase")
    ap.add_argument("--pure", action="store_true",
                    help="the reference compiler (oracle.ReferenceCompiler), not the compiled core")
    args = ap.parse_args(argv)
    if args.pure:
        settings.ENV = dataclasses.replace(settings.ENV, pure_compile=True)
    objs = generate(args.services, args.endpoints)
    model, mw, mc = best_of(1, build_model, objs)
    del objs
    gc.collect()
    rss_model = _rss_mib("VmRSS")
    # The first build on its own, as the controller does it (build.compile_model: the
    # compiler may let the RRsets go before assembling): the timing runs below keep their
    # results alive, so their peak is not the one a memory limit sees.
    _reset_peak()
    first = build.compile_model(model, serial=1)
    peak_first = _rss_mib("VmHWM")
    del first
    gc.collect()
    _reset_peak()
    zd, rw, rc = best_of(args.repeat, lambda: records.zone_data(model, serial=1))
    compile_zd = lambda: I.compile_image(zd.rrsets, zd.zones, exists=zd.exists, serial=zd.serial)
    img, cw, cc = best_of(args.repeat, compile_zd)
    names = len({s.name for s in zd.rrsets})
    print(f"compiler: {'reference (pure Python)' if I._compiled_core() is None else 'compiled core'}")
    print(f"services={args.services} endpoints={args.endpoints} rrsets={len(zd.rrsets)} "
          f"names={names} (best of {args.repeat}; load average {os.getloadavg()[0]:.1f})")
    print(f"{'phase':24} {'wall s':>8} {'cpu s':>8}")
    for label, w, c in (("model from API dicts", mw, mc), ("rules (model->RRsets)", rw, rc),
                        ("compile (RRsets->image)", cw, cc), ("rules + compile", rw + cw, rc + cc)):
        print(f"{label:24} {w:8.3f} {c:8.3f}")
    print(f"image size {len(img) / 2**20:.1f} MiB; RSS with the model {rss_model:.0f} MiB; "
          f"peak RSS during the first rules+compile {peak_first:.0f} MiB "
          f"(during the timing runs {_rss_mib('VmHWM'):.0f} MiB)")
    if args.profile:
        stmt = "compile_zd()" if args.profile == "compile" else "records.zone_data(model, serial=1)"
        cProfile.runctx(stmt, globals(), {"compile_zd": compile_zd, "model": model},
                        "/tmp/kdns_compile.prof")
        pstats.Stats("/tmp/kdns_compile.prof").sort_stats("tottime").print_stats(25)


def test_compile_10k(benchmark):
    """pytest-benchmark entry: rules + compile of the full-size cluster."""
    model = build_model(generate())
    benchmark.pedantic(compile_model, args=(model,), rounds=3, iterations=1)


if __name__ == "__main__":
    main()
