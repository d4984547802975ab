"""What a kdns pod costs in memory: summed PSS of every kdns process over its life.

The pod's memory cgroup is charged each page once, whichever process maps it; summed PSS
(``/proc/<pid>/smaps_rollup``: each shared page split between its sharers) of the supervisor
and every worker is the closest per-process view of that charge. This starts a real
``kdns serve`` and samples every kdns process every 0.1 s through:

- start: from exec until /readiness answers 200 (every worker serves the first image);
- sync: with ``--source api``, the first list is part of start (readiness waits for it);
- idle: ``--idle`` seconds of nothing;
- churn: with ``--source api``, ``--churn`` seconds of endpoint changes at ``--rate``/s.

Sources: ``file`` is the example cluster (``examples/cluster.yaml``); ``api`` is the stand-in
Kubernetes API of the test suite (``tests/fakeapi.py``) holding ``--services`` services with
``--per-slice`` endpoints each (bench/bench_api_scale.py's cluster).

Printed: per worker count, the peak and idle sum, and the idle per-process breakdown
(supervisor, each worker). Written: a JSON of every sample and, when matplotlib is installed
(``pip install -e '.[bench]'``), a PNG of summed PSS over time with kube-dns's 170Mi limit
and CoreDNS's sizing formula ((pods + services) / 1000 + 54 MiB) drawn as lines.

Not a test (a quiet machine wanted).

    .venv/bin/python bench/bench_memory.py [--workers 1,2,8] [--source file|api]
        [--services 1000] [--idle 3] [--churn 5] [--out bench/out/memory]
        [--kdns-arg=--worker-processes=2 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from serverutil import children, comm, free_port  # noqa: E402

EXAMPLE = os.path.join(ROOT, "examples", "cluster.yaml")
KUBE_DNS_LIMIT_MIB = 170
SAMPLE_EVERY = 0.1


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def family(pid: int) -> list[int]:
    """The supervisor and every descendant (workers, and whatever they start)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(sorted(children(p)))
    return out


class Sampler(threading.Thread):
    """Samples summed PSS of ``pid``'s process tree until stopped; ``phase`` labels samples."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.t0 = time.monotonic()
        self.phase = "start"
        self.samples: list[dict] = []
        self.done = threading.Event()

    def sample(self) -> dict:
        per = {}
        for p in family(self.pid):
            kib = pss_kib(p)
            if kib is not None:
                per[p] = kib
        s = {"t": round(time.monotonic() - self.t0, 3), "phase": self.phase,
             "sum_kib": sum(per.values()), "per_pid_kib": per}
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.done.wait(SAMPLE_EVERY):
            self.sample()


def wait_ready(proc, port: int, log_path: str, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"kdns exited {proc.returncode}:\n{open(log_path).read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readiness", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"not ready after {timeout}s:\n{open(log_path).read()}")


def api_cluster(a, tmp: str):
    """The stand-in API holding bench_api_scale's cluster, and a kubeconfig for it."""
    import yaml
    from fakeapi import FakeApiServer
    from bench_api_scale import service, slice_for
    api = FakeApiServer().start()
    api.create_many("namespaces", ({"metadata": {"name": f"ns{n}"}} for n in range(50)))
    api.create_many("services", (service(i, i % 5 == 0) for i in range(a.services)))
    api.create_many("endpointslices", (slice_for(i, a.per_slice) for i in range(a.services)))
    kubeconfig = os.path.join(tmp, "kubeconfig")
    with open(kubeconfig, "w") as f:
        yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                        "users": [{"name": "u", "user": {}}]}, f)
    return api, kubeconfig


def run_one(a, workers: int, tmp: str) -> dict:
    api = None
    if a.source == "api":
        api, kubeconfig = api_cluster(a, tmp)
        source = ["--kubecfg-file", kubeconfig]
        services = a.services
    else:
        source = ["--from-file", a.file]
        services = sum(1 for line in open(a.file) if line.strip() == "kind: Service")
    http_port = free_port()
    log_path = os.path.join(tmp, f"kdns-{workers}.log")
    resolv = os.path.join(tmp, "empty-resolv.conf")
    open(resolv, "w").close()             # no upstreams: nothing leaves the machine
    argv = [sys.executable, "-m", "kdns", "serve", *source,
            "--dns-bind-address", "127.0.0.1", "--dns-port", "0",
            "--healthz-port", str(http_port), "--metrics-port", "0", "--health-port", "0",
            "--ready-port", "0", "--sidecar-port", "0", "--lameduck", "0",
            "--resolv-conf", resolv, "--config-dir", os.path.join(tmp, "no-config"),
            "--workers", str(workers), *getattr(a, "kdns_arg", ())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    sampler = Sampler(proc.pid)
    sampler.start()
    try:
        ready = wait_ready(proc, http_port, log_path)
        sampler.phase = "idle"
        time.sleep(a.idle)
        idle = sampler.sample()
        zygotes = {p for p in idle["per_pid_kib"] if comm(p) == "kdns-zygote"}
        if api is not None and a.churn > 0:
            from bench_api_scale import slice_for
            sampler.phase = "churn"
            end, gen, i = time.monotonic() + a.churn, 1, 0
            while time.monotonic() < end:
                api.update("endpointslices", slice_for(i * 5 % a.services, a.per_slice, gen))
                i, gen = i + 1, gen + 1
                time.sleep(1 / a.rate)
        sampler.phase = "end"
        time.sleep(0.3)
    finally:
        sampler.done.set()
        sampler.join()
        proc.terminate()
        proc.wait(10)
        if api is not None:
            api.close()
    sup = proc.pid
    per = idle["per_pid_kib"]
    breakdown = {"supervisor": per.get(sup, 0) / 1024,
                 "zygote": sum(kib for pid, kib in per.items() if pid in zygotes) / 1024,
                 "workers": [kib / 1024 for pid, kib in sorted(per.items())
                             if pid != sup and pid not in zygotes]}
    endpoints = a.services * a.per_slice if api is not None else 0
    return {"workers": workers, "services": services, "endpoints": endpoints,
            "ready_s": round(ready, 2),
            "peak_mib": max(s["sum_kib"] for s in sampler.samples) / 1024,
            "idle_mib": idle["sum_kib"] / 1024, "idle_breakdown_mib": breakdown,
            "samples": sampler.samples}


def plot(results: list[dict], a, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        line, = ax.plot([s["t"] for s in r["samples"]],
                        [s["sum_kib"] / 1024 for s in r["samples"]],
                        label=f"{r['workers']} workers (ready {r['ready_s']:.1f}s, idle "
                              f"{r['idle_mib']:.0f}, peak {r['peak_mib']:.0f} MiB)")
        # Where start ends (ready) and churn begins, in the run's colour.
        for phase in ("idle", "churn"):
            t = next((s["t"] for s in r["samples"] if s["phase"] == phase), None)
            if t is not None:
                ax.axvline(t, color=line.get_color(), linestyle=":" if phase == "idle" else "-.",
                           linewidth=0.8)
    services = results[0]["services"]
    # CoreDNS's formula counts the cluster's pods, which --pods insecure never watches but a
    # cluster has: one behind each endpoint of the stand-in API's cluster.
    pods = results[0].get("endpoints", 0)
    coredns = (pods + services) / 1000 + 54
    ax.axhline(KUBE_DNS_LIMIT_MIB, color="red", linestyle="--",
               label=f"kube-dns memory limit {KUBE_DNS_LIMIT_MIB}Mi")
    ax.axhline(coredns, color="grey", linestyle=":",
               label=f"CoreDNS formula (pods+services)/1000+54 = {coredns:.0f} MiB")
    ax.set_xlabel("seconds since exec (dotted: ready, dash-dot: churn starts)")
    ax.set_ylabel("summed PSS of every kdns process (MiB)")
    ax.set_title(f"kdns memory, {a.source} source, {services} services")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,8", help="comma-separated worker counts")
    ap.add_argument("--source", choices=("file", "api"), default="file")
    ap.add_argument("--file", default=EXAMPLE, help="--source file: the cluster file")
    ap.add_argument("--services", type=int, default=1000, help="--source api: services")
    ap.add_argument("--per-slice", type=int, default=10, help="--source api: endpoints each")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds idle after ready")
    ap.add_argument("--churn", type=float, default=5.0, help="--source api: seconds of churn")
    ap.add_argument("--rate", type=float, default=100.0, help="endpoint changes per second")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "memory"))
    ap.add_argument("--kdns-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for kdns serve (repeat), e.g. "
                         "--kdns-arg=--worker-processes=2")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.workers.split(",")):
            r = run_one(a, n, tmp)
            results.append(r)
            b = r["idle_breakdown_mib"]
            prev = results[-2] if len(results) > 1 else None     # the marginal cost
            extra = (r["idle_mib"] - prev["idle_mib"]) / (n - prev["workers"]) \
                if prev is not None and n != prev["workers"] else None
            print(f"{n} workers: ready {r['ready_s']:.2f}s, peak {r['peak_mib']:.1f} MiB, "
                  f"idle {r['idle_mib']:.1f} MiB = supervisor {b['supervisor']:.1f} + zygote "
                  f"{b['zygote']:.1f} + workers "
                  f"{' '.join(f'{w:.1f}' for w in b['workers'])}"
                  + (f"; {extra:.1f} MiB per worker added since {prev['workers']}"
                     if extra is not None else ""),
                  flush=True)
    stem = os.path.join(a.out, f"memory-{a.source}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f)
    if plot(results, a, stem + ".png"):
        print(f"wrote {stem}.png and {stem}.json")
    return results


if __name__ == "__main__":
    main()
