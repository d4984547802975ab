"""The scale measurement: kdns serve against a fake API holding a large cluster.

A real ``kdns serve`` (supervisor + workers) lists 10,000 services and 100,000 endpoints
(one 10-address EndpointSlice per service) from ``tests/fakeapi.py`` over loopback through
a kubeconfig, then rides a churn of endpoint changes while being queried continuously.

Reported:
- list/sync time (the controller's "synced ... after start" log line) and time from process
  start to /readiness 200 (first synced image served by every worker);
- supervisor peak RSS (VmHWM) and PSS at the end, and the workers' PSS;
- DNS programming latency under churn, measured from outside: the moment the fake API applied
  a change -> the first UDP answer showing it (p50/p99/max, and how many never showed);
- kdns's responsiveness during churn: success rate and RTT percentiles of the queries.

Not a test (it takes minutes and a quiet machine).

    .venv/bin/python bench/bench_api_scale.py [--services 10000] [--per-slice 10]
        [--rate 100] [--seconds 20] [--workers 1] [--out bench/out/api_scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import dns.message
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fakeapi import FakeApiServer          # noqa: E402
from serverutil import children, free_port  # noqa: E402

ZONE = "cluster.local"


def service(i: int, headless: bool) -> dict:
    ns = f"ns{i % 50}"
    ip = "None" if headless else f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return {"metadata": {"namespace": ns, "name": f"svc{i}"},
            "spec": {"clusterIP": ip,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_ip(i: int, j: int, gen: int = 0) -> str:
    n = i * 16 + j
    return f"10.{128 + gen % 64}.{n // 256 % 256}.{n % 256}" if n < 65536 else \
        f"10.{192 + gen % 32 + n // 65536 % 32}.{n // 256 % 256}.{n % 256}"


def slice_for(i: int, per: int, gen: int = 0) -> dict:
    return {"metadata": {"namespace": f"ns{i % 50}", "name": f"svc{i}-abc",
                         "labels": {"kubernetes.io/service-name": f"svc{i}"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [endpoint_ip(i, j, gen)], "conditions": {"ready": True}}
                          for j in range(per)],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}


def proc_kb(pid: int, field: str, path: str = "status") -> int:
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def programming_histogram(metrics_port: int) -> dict:
    """kdns's coredns_kubernetes_dns_programming_duration_seconds, summed over service_kind:
    count, mean, and the p50/p99 bucket bounds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    name = "coredns_kubernetes_dns_programming_duration_seconds"
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])

    def quantile(q):
        for bound in sorted(buckets):
            if buckets[bound] >= q * count:
                return bound
        return None

    return {"count": int(count), "mean_s": round(total / count, 4) if count else None,
            "p50_bucket_le_s": quantile(0.5), "p99_bucket_le_s": quantile(0.99)}


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


class Prober:
    """UDP queries from one socket; returns (rcode, A addresses) or None on timeout."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(1.0)
        self.rtts: list[float] = []
        self.failures = 0

    def query(self, name: str):
        q = dns.message.make_query(name, "A")
        t0 = time.monotonic()
        self.sock.send(q.to_wire())
        try:
            while True:
                r = dns.message.from_wire(self.sock.recv(4096))
                if r.id == q.id:
                    break
        except (socket.timeout, dns.exception.DNSException):
            self.failures += 1
            return None
        self.rtts.append(time.monotonic() - t0)
        return r.rcode(), {rd.address for rr in r.answer for rd in rr if rr.rdtype == 1}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--per-slice", type=int, default=10)
    ap.add_argument("--headless-every", type=int, default=5, help="every Nth service headless")
    ap.add_argument("--rate", type=float, default=100.0, help="endpoint changes per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "api_scale.json"))
    ap.add_argument("--full-compile", action="store_true",
                    help="KDNS_FULL_COMPILE=1: a full compile on every change (the reference)")
    a = ap.parse_args(argv)

    api = FakeApiServer().start()
    tmp = os.path.join(ROOT, "bench", "out", "api_scale")
    os.makedirs(tmp, exist_ok=True)
    open(os.path.join(tmp, "empty-resolv.conf"), "w").close()   # no upstreams: loopback only
    proc = None
    try:
        t0 = time.monotonic()
        headless = [i for i in range(a.services) if i % a.headless_every == 0]
        api.create_many("namespaces", ({"metadata": {"name": f"ns{n}"}} for n in range(50)))
        api.create_many("services", (service(i, i % a.headless_every == 0)
                                     for i in range(a.services)))
        api.create_many("endpointslices", (slice_for(i, a.per_slice) for i in range(a.services)))
        print(f"fake API loaded: {a.services} services, {a.services * a.per_slice} endpoints "
              f"in {time.monotonic() - t0:.1f}s", flush=True)

        kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(kubeconfig, "w") as f:
            yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                            "contexts": [{"name": "fake",
                                          "context": {"cluster": "fake", "user": "u"}}],
                            "users": [{"name": "u", "user": {}}]}, f)
        # The DNS port kdns binds itself (0) and logs; the HTTP ports must be named (0 turns
        # a listener off), so they are drawn here.
        http_port, metrics_port = free_port(), free_port()
        log_path = os.path.join(tmp, "kdns.log")
        log = open(log_path, "wb")
        argv = [sys.executable, "-m", "kdns", "serve", "--kubecfg-file", kubeconfig,
                "--dns-bind-address", "127.0.0.1", "--dns-port", "0",
                "--healthz-port", str(http_port), "--metrics-port", str(metrics_port),
                "--health-port", "0", "--ready-port", "0", "--sidecar-port", "0",
                "--lameduck", "0", "--resolv-conf", os.path.join(tmp, "empty-resolv.conf"),
                "--config-dir", os.path.join(tmp, "no-config"),
                "--workers", str(a.workers)]
        started = time.monotonic()
        env = {**os.environ, "KDNS_FULL_COMPILE": "1" if a.full_compile else "0"}
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        ready_after = None
        while time.monotonic() - started < 300:
            assert proc.poll() is None, open(log_path).read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readiness",
                                            timeout=1) as r:
                    if r.status == 200:
                        ready_after = time.monotonic() - started
                        break
            except OSError:
                pass
            time.sleep(0.05)
        text = open(log_path).read()
        port = int(re.search(r"listening on 127\.0\.0\.1 port (\d+) ", text).group(1))
        m = re.search(r"synced: every watched resource listed once \(([\d.]+)s after start\)", text)
        sync_after = float(m.group(1)) if m else None
        print(f"synced (listed) {sync_after}s after the controller started; "
              f"/readiness 200 {ready_after:.2f}s after process start", flush=True)

        # ---- churn: each change gives one headless service a new endpoint set
        probe = Prober(port)
        steady = Prober(port)
        lock = threading.Lock()
        outstanding: dict[str, tuple[float, str]] = {}    # name -> (changed at, expected IP)
        latencies: list[float] = []
        stop = threading.Event()

        def churn():
            n, gen = 0, 1
            t_next = time.monotonic()
            while not stop.is_set():
                i = headless[n % len(headless)]
                if n and n % len(headless) == 0:
                    gen += 1
                name = f"svc{i}.ns{i % 50}.svc.{ZONE}"
                with lock:
                    if name in outstanding:           # wait for it rather than overwrite
                        n += 1
                        continue
                api.update("endpointslices", slice_for(i, a.per_slice, gen))
                with lock:
                    outstanding[name] = (time.monotonic(), endpoint_ip(i, 0, gen))
                n += 1
                t_next += 1.0 / a.rate
                delay = t_next - time.monotonic()
                if delay > 0:
                    stop.wait(delay)

        def check():
            while not stop.is_set() or outstanding:
                with lock:
                    names = list(outstanding.items())
                if not names:
                    time.sleep(0.001)
                    continue
                # Oldest first, and stop at the first change not served yet: an image holds a
                # prefix of the event stream (events are applied in order, then compiled), so
                # newer ones cannot be visible either. Keeps the prober from loading the box.
                for name, (at, ip) in names:
                    r = probe.query(name)
                    if r is None or ip not in r[1]:
                        break
                    with lock:
                        outstanding.pop(name, None)
                    latencies.append(time.monotonic() - at)
                time.sleep(0.002)
                if stop.is_set() and time.monotonic() > stop_at + 30:
                    break

        def steady_queries():
            while not stop.is_set():
                steady.query(f"svc1.ns1.svc.{ZONE}")
                time.sleep(0.002)

        stop_at = float("inf")
        threads = [threading.Thread(target=f, daemon=True) for f in (churn, check, steady_queries)]
        for t in threads:
            t.start()
        hwm_peak = 0
        t_end = time.monotonic() + a.seconds
        while time.monotonic() < t_end:
            hwm_peak = max(hwm_peak, proc_kb(proc.pid, "VmHWM"))
            time.sleep(0.5)
        stop_at = time.monotonic()
        stop.set()
        threads[0].join(5)
        threads[2].join(5)
        threads[1].join(40)
        with lock:
            never = len(outstanding)
        pss_end = proc_kb(proc.pid, "Pss", "smaps_rollup")
        inside = programming_histogram(metrics_port)
        time.sleep(3.0)         # idle: the controller gives a compile's memory back
        pids = children(proc.pid)
        result = {
            "compiler": "full" if a.full_compile else "incremental",
            "services": a.services, "endpoints": a.services * a.per_slice,
            "headless_services": len(headless), "workers": a.workers,
            "list_and_sync_seconds": sync_after,
            "time_to_first_ready_seconds": round(ready_after, 3),
            "supervisor_peak_rss_mb": round(max(hwm_peak, proc_kb(proc.pid, "VmHWM")) / 1024, 1),
            "supervisor_pss_mb_end_of_churn": round(pss_end / 1024, 1),
            "supervisor_pss_mb_idle": round(proc_kb(proc.pid, "Pss", "smaps_rollup") / 1024, 1),
            "workers_pss_mb_end": [round(proc_kb(p, "Pss", "smaps_rollup") / 1024, 1)
                                   for p in sorted(pids)],
            "churn_rate_per_second": a.rate, "churn_seconds": a.seconds,
            "changes_observed": len(latencies), "changes_never_observed": never,
            "programming_latency_p50_s": pct(latencies, 50),
            "programming_latency_p99_s": pct(latencies, 99),
            "programming_latency_max_s": max(latencies) if latencies else None,
            # kdns's own measure (what CoreDNS exports): API event seen -> every worker
            # serves it; quantiles are bucket upper bounds (1 ms x 2^k).
            "programming_latency_inside": inside,
            "queries": len(probe.rtts) + len(steady.rtts) + probe.failures + steady.failures,
            "query_success_rate": round(1 - (probe.failures + steady.failures) / max(1, (
                len(probe.rtts) + len(steady.rtts) + probe.failures + steady.failures)), 5),
            "query_rtt_p50_ms": round(pct(steady.rtts, 50) * 1000, 3) if steady.rtts else None,
            "query_rtt_p99_ms": round(pct(steady.rtts, 99) * 1000, 3) if steady.rtts else None,
            "query_rtt_max_ms": round(max(steady.rtts) * 1000, 3) if steady.rtts else None,
            "publishes": len(re.findall(r"published image generation", open(log_path).read())),
        }
        print(json.dumps(result, indent=2), flush=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        return result
    finally:
        if proc is not None:
            pids = children(proc.pid)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for p in pids:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
        api.close()


if __name__ == "__main__":
    main()
