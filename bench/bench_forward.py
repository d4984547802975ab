"""Forwarding benchmark: cache hits next to cluster hits, and cache misses next to
Unbound and dnsmasq, all in one run, on loopback only.

    .venv/bin/python bench/bench_forward.py [--seconds 3] [--rounds 2]

Cells (loadgen pinned to CPU 0, every server under test pinned to CPU 1, one worker/thread):
  cluster   kdns, names answered from the zone image (the reference for the cache goal)
  cachehit  kdns, 1,000 outside names already in its cache (served by the compiled path)
  miss-*    kdns / Unbound / dnsmasq forwarding names never asked before to one NSD
            upstream (also CPU 1) serving a zone of unique names: every query is a cache miss
            (kdns and Unbound cache but never see a name twice; dnsmasq runs cache-size=0).

Every server is started here, listens on 127.0.0.1 only and forwards only to the NSD started
here (Unbound: forward-zone "." to it, outgoing-interface 127.0.0.1; dnsmasq: --no-resolv).
Goals: cachehit >= 0.8 x cluster; kdns miss QPS above both Unbound's and dnsmasq's.
Results go to bench/out/forward-<time>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import load  # noqa: E402  (bench/ is not a package)
from load import HOST, Server, free_port, log, nsd_conf, tool  # noqa: E402

ZONE = "fwd.test"
SERVER_CPU = load.SERVER_CPU


def write_zone(path: str, n: int) -> None:
    with open(path, "w") as f:
        f.write(f"$ORIGIN {ZONE}.\n$TTL 300\n@ SOA ns.{ZONE}. host.{ZONE}. 1 7200 1800 86400 60\n"
                f"@ NS ns.{ZONE}.\nns A 127.0.0.1\nready A 127.0.0.2\n")
        for i in range(n):
            f.write(f"n{i} A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n")


def nsd_upstream(rundir: str, port: int) -> Server:
    conf = nsd_conf(rundir, rundir, port, [ZONE])
    return Server("nsd-upstream", [tool("nsd"), "-d", "-c", conf], port, SERVER_CPU,
                  os.path.join(rundir, "nsd.log"), ready_query=(f"ready.{ZONE}", "A"))


def kdns_server(rundir: str, port: int, upstream: int, image: str) -> Server:
    resolv = os.path.join(rundir, "empty-resolv.conf")
    open(resolv, "w").close()
    argv = load.kdns_cmd() + [
        "serve", "--from-image", image, "--dns-bind-address", HOST, "--dns-port", str(port),
        "--workers", "1", "--healthz-port", "0", "--metrics-port", "0",
        "--resolv-conf", resolv, "--config-dir", os.path.join(rundir, "no-config"),
        "--nameservers", f"{HOST}:{upstream}", "--log-level", "info"]
    # Extra listeners some kdns versions have: off, so runs never collide on fixed ports.
    helptext = load.subprocess.run(load.kdns_cmd() + ["serve", "--help"], capture_output=True,
                                   text=True, cwd=ROOT).stdout
    argv += [x for flag in ("--health-port", "--ready-port", "--sidecar-port")
             if flag in helptext for x in (flag, "0")]
    env = dict(os.environ)
    env.pop("KDNS_PURE", None)
    return Server("kdns", argv, port, SERVER_CPU, os.path.join(rundir, "kdns.log"), env=env,
                  port_in_log=load.KDNS_PORT_IN_LOG)


def unbound_server(rundir: str, port: int, upstream: int) -> Server:
    conf = os.path.join(rundir, "unbound.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
    interface: {HOST}
    port: {port}
    outgoing-interface: {HOST}
    do-ip6: no
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "{rundir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    module-config: "iterator"
    do-not-query-localhost: no
    qname-minimisation: no
    prefetch: no
    ratelimit: 0
    ip-ratelimit: 0
    num-queries-per-thread: 4096
    outgoing-range: 8192
    so-reuseport: no
    # RFC 6761 makes "test." special; unbound answers it locally unless told otherwise.
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-addr: {HOST}@{upstream}
remote-control:
    control-enable: no
""")
    exe = tool("unbound")
    load.subprocess.run([tool("unbound-checkconf"), conf], check=True, capture_output=True)
    return Server("unbound", [exe, "-d", "-c", conf], port, SERVER_CPU,
                  os.path.join(rundir, "unbound.log"), ready_query=(f"ready.{ZONE}", "A"))


def dnsmasq_server(rundir: str, port: int, upstream: int) -> Server:
    argv = [tool("dnsmasq"), "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", f"--server={HOST}#{upstream}", f"--listen-address={HOST}",
            "--bind-interfaces", f"--port={port}", "--cache-size=0", "--dns-forward-max=4096",
            "--user=root", "--pid-file", "--log-facility=-"]
    return Server("dnsmasq", argv, port, SERVER_CPU, os.path.join(rundir, "dnsmasq.log"),
                  ready_query=(f"ready.{ZONE}", "A"))


def write_queries(path: str, names) -> str:
    with open(path, "w") as f:
        f.writelines(f"{n} A\n" for n in names)
    return path


def cell(server: Server, exe: str, qfile: str, seconds: float, a, limit: int | None = None):
    argv = load.pinned(load.CLIENT_CPU, [exe, "-s", HOST, "-p", str(server.port), "-d", qfile,
                                         "-l", str(seconds), "-w", str(a.window), "-b",
                                         str(a.batch), "-c", str(a.sockets), "-t", "2",
                                         "-g", "1"] + (["-n", str(limit)] if limit else []))
    out, m = load.run_measured(server, argv, seconds + 30)
    r = json.loads(out.strip().splitlines()[-1])
    return {**m, "qps": r["qps"], "sent": r["sent"], "answered": r["answered"],
            "lost": r["lost"], "rcodes": r["rcodes"], "p99_us": r["latency_us"]["p99"],
            "cpu_us_per_query": m["server_cpu_s"] / r["answered"] * 1e6 if r["answered"] else None}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--names", type=int, default=150_000, help="unique names per miss cell")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sockets", type=int, default=4)
    ap.add_argument("--targets", default="kdns,unbound,dnsmasq")
    a = ap.parse_args(argv)
    targets = a.targets.split(",")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rundir = os.path.join(load.OUT, "forward-" + stamp)
    os.makedirs(rundir)
    exes = load.build_tools()
    ncells = a.rounds * len(targets)
    total = (ncells + 1) * a.names
    write_zone(os.path.join(rundir, f"{ZONE}.zone"), total)
    from zonefixtures import sample_image
    image = os.path.join(rundir, "cluster.img")
    with open(image, "wb") as f:
        f.write(sample_image())
    # Query files: every miss cell gets its own never-asked slice of the zone.
    rnd = random.Random(1)
    slices = list(range(ncells))
    rnd.shuffle(slices)
    cluster_q = write_queries(os.path.join(rundir, "cluster.txt"),
                              ["kubernetes.default.svc.cluster.local",
                               "dual.default.svc.cluster.local",
                               "dns-version.cluster.local"] * 100)
    hit_names = [f"n{total - a.names + i}.{ZONE}" for i in range(1000)]
    hit_q = write_queries(os.path.join(rundir, "cachehit.txt"), hit_names)
    servers, results = [], {"cells": [], "args": vars(a)}
    try:
        nsd = nsd_upstream(rundir, free_port())
        nsd.start(120)
        servers.append(nsd)
        up = nsd.port
        made = {"kdns": lambda: kdns_server(rundir, 0, up, image),
                "unbound": lambda: unbound_server(rundir, free_port(), up),
                "dnsmasq": lambda: dnsmasq_server(rundir, free_port(), up)}
        srv = {}
        for t in targets:
            srv[t] = made[t]()
            srv[t].start(60)
            servers.append(srv[t])
        k = 0
        for rnd_i in range(a.rounds):
            if "kdns" in srv:
                # Warm: every worker (one here) forwards the 1,000 names once and caches them.
                cell(srv["kdns"], exes["loadgen"], hit_q, 1.0, a)
                for name, q in (("cluster", cluster_q), ("cachehit", hit_q)):
                    c = cell(srv["kdns"], exes["loadgen"], q, a.seconds, a)
                    c.update(target="kdns", mix=name, round=rnd_i)
                    results["cells"].append(c)
                    log(f"kdns {name}: {c['qps']:,.0f} qps, lost {c['lost']}, {c['rcodes']}")
            for t in targets:
                lo = slices[k] * a.names
                k += 1
                q = write_queries(os.path.join(rundir, f"miss-{t}-{rnd_i}.txt"),
                                  (f"n{i}.{ZONE}" for i in range(lo, lo + a.names)))
                c = cell(srv[t], exes["loadgen"], q, a.seconds, a, limit=a.names)
                c.update(target=t, mix="miss", round=rnd_i)
                results["cells"].append(c)
                log(f"{t} miss: {c['qps']:,.0f} qps, lost {c['lost']}, {c['rcodes']}")
    finally:
        for s in reversed(servers):
            s.stop()
    med, cpu = {}, {}
    for c in results["cells"]:
        med.setdefault((c["target"], c["mix"]), []).append(c["qps"])
        cpu.setdefault((c["target"], c["mix"]), []).append(c["cpu_us_per_query"])
    med = {key: median(v) for key, v in med.items()}
    cpu = {key: median([x for x in v if x is not None]) for key, v in cpu.items()}
    # Server CPU per answered query is the steadier figure on a shared machine: it does not
    # drop when another process takes the core away, QPS does.
    lines = [f"{t:<8} {m:<9} {q:>12,.0f} qps {cpu[(t, m)] or 0:>8.2f} server CPU us/query"
             for (t, m), q in sorted(med.items())]
    ratios = {}
    if ("kdns", "cluster") in med:
        ratios["cachehit/cluster"] = med[("kdns", "cachehit")] / med[("kdns", "cluster")]
        ratios["cachehit/cluster by CPU per query (cluster/cachehit)"] = (
            cpu[("kdns", "cluster")] / cpu[("kdns", "cachehit")])
    for other in ("unbound", "dnsmasq"):
        if (other, "miss") in med and ("kdns", "miss") in med:
            ratios[f"kdns miss/{other} miss"] = med[("kdns", "miss")] / med[(other, "miss")]
            ratios[f"kdns miss/{other} miss by CPU per query ({other}/kdns)"] = (
                cpu[(other, "miss")] / cpu[("kdns", "miss")])
    lines += [f"{name}: {r:.2f}x" for name, r in ratios.items()]
    results["medians"] = {f"{t}/{m}": q for (t, m), q in med.items()}
    results["cpu_us_per_query"] = {f"{t}/{m}": v for (t, m), v in cpu.items()}
    results["ratios"] = ratios
    out = os.path.join(load.OUT, f"forward-{stamp}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
