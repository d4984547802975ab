"""Run inside a fresh network and mount namespace (``unshare -n -m``, tests/test_autopath_libc.py):
the libc resolvers of a pod against kdns with autopath off, then on.

The namespace's loopback is the pod network: kdns listens on 127.0.0.1:53 (the port the
resolvers' resolv.conf cannot change), the cluster file maps 127.0.0.1, the source address
of the resolvers' queries, to a pod of ``development``, and a pod-style resolv.conf
(``search development.svc.cluster.local svc.cluster.local cluster.local example.org``,
``ndots:5``) is bind-mounted over /etc/resolv.conf in this mount namespace only. The
upstream is a TestDNSServer started here. For each resolver (glibc through Python's
getaddrinfo, musl through a tiny C client built with musl-gcc when given) this prints, as
JSON: the queries kdns received per lookup of an outside name, the mean lookup latency
with warm caches, and the addresses the lookup gave.

Usage: autopath_libc.py OUT_DIR [MUSL_CLIENT]
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from serverutil import Kdns  # noqa: E402
from upstream import TestDNSServer  # noqa: E402

NAME = "www.example.com"          # an outside name: the forwarder's steps
CLUSTER_NAME = "db.prod"           # a service of another namespace: the image's steps
LOOKUPS = 200


def requests(k: Kdns) -> float:
    """The A and AAAA queries kdns has received (what a lookup sends; kdns's own readiness
    probe asks other types now and then)."""
    t = by_type(k)
    return t.get("A", 0) + t.get("AAAA", 0)


def by_type(k: Kdns) -> dict:
    out = {}
    for (name, labels), v in k.metrics().items():
        if name == "coredns_dns_requests_total":
            t = dict(labels).get("type", "?")
            out[t] = out.get(t, 0) + v
    return out


def glibc_lookup(name: str):
    return sorted({ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_UNSPEC,
                                                         socket.SOCK_DGRAM)})


def measure(k: Kdns, musl: str | None, name: str) -> dict:
    out = {}
    # glibc: one lookup counted (caches warm from the first), then the timed ones.
    glibc_lookup(name)
    before = requests(k)
    addrs = glibc_lookup(name)
    out["glibc"] = {"queries_per_lookup": requests(k) - before, "addresses": addrs}
    t0 = time.perf_counter()
    for _ in range(LOOKUPS):
        glibc_lookup(name)
    out["glibc"]["latency_us"] = (time.perf_counter() - t0) / LOOKUPS * 1e6
    if musl:
        subprocess.run([musl, name, "1"], check=True, capture_output=True)
        before, types = requests(k), by_type(k)
        r = subprocess.run([musl, name, "1"], check=True, capture_output=True, text=True)
        q = requests(k) - before
        if os.environ.get("AP_DEBUG"):
            print(name, {t: v - types.get(t, 0) for t, v in by_type(k).items()}, file=sys.stderr)
        r = subprocess.run([musl, name, str(LOOKUPS)], check=True, capture_output=True,
                           text=True)
        lat, *addrs = r.stdout.split()
        out["musl"] = {"queries_per_lookup": q, "latency_us": float(lat),
                       "addresses": sorted(set(addrs))}
    return out


def main() -> int:
    out_dir, musl = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    pod_resolv = os.path.join(out_dir, "pod-resolv.conf")
    with open(pod_resolv, "w") as f:
        f.write("nameserver 127.0.0.1\nsearch development.svc.cluster.local svc.cluster.local "
                "cluster.local example.org\noptions ndots:5\n")
    subprocess.run(["mount", "--bind", pod_resolv, "/etc/resolv.conf"], check=True)
    server_resolv = os.path.join(out_dir, "server-resolv.conf")
    with open(server_resolv, "w") as f:
        f.write("search example.org\n")         # the node's search domain, as the pod's
    cluster = os.path.join(out_dir, "cluster.json")
    with open(cluster, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": [
            {"kind": "Namespace", "metadata": {"name": "development"}},
            {"kind": "Namespace", "metadata": {"name": "prod"}},
            {"kind": "Service", "metadata": {"namespace": "development", "name": "test"},
             "spec": {"clusterIP": "10.96.1.5"}},
            {"kind": "Service", "metadata": {"namespace": "prod", "name": "db"},
             "spec": {"clusterIP": "10.96.2.7"}},
            {"kind": "Pod", "metadata": {"namespace": "development", "name": "client"},
             "status": {"phase": "Running", "podIP": "127.0.0.1"}}]}, f)
    results = {}
    up = TestDNSServer({NAME + ".": ["A 93.184.216.34", "AAAA 2001:db8::34"]})
    with up:
        cfg = os.path.join(out_dir, "kube-dns-config")
        os.makedirs(cfg, exist_ok=True)
        with open(os.path.join(cfg, "upstreamNameservers"), "w") as f:
            json.dump([f"{up.host}:{up.port}"], f)
        for mode, extra in (("off", ()), ("on", ("--autopath",))):
            tmp = os.path.join(out_dir, mode)
            os.makedirs(tmp, exist_ok=True)
            from pathlib import Path
            k = Kdns(Path(tmp), zone_file=cluster, workers=1, dns_port=53,
                     args=(*extra, "--config-dir", cfg, "--resolv-conf", server_resolv))
            k.start()
            try:
                results[mode] = {"outside": measure(k, musl, NAME),
                                 "cluster": measure(k, musl, CLUSTER_NAME)}
            finally:
                k.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
