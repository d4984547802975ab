"""Autopath's effect on the search-path mix: kdns with --autopath and without, same run.

A pod of one namespace (the client address 127.0.0.1, mapped to it by a Pod object in the
cluster file) looks names up the way glibc and musl do with ``ndots:5`` (bench/gen_cluster.py
``search_walk``: ``<name>.<ns>.svc.Z``, ``<name>.svc.Z``, ``<name>.Z``, up to the first
answer). Three cells per round, dnsperf from CPU 0 against one kdns worker on CPU 1:

  walk, autopath off   every candidate of every lookup (today's traffic)
  walk, autopath on    the same file: a first candidate is now answered by the walk
  first, autopath on   what the pod sends with autopath: one query per lookup

Queries per second are dnsperf's; lookups per second divide them by the queries each file
spends per lookup. Names outside the cluster are left out of the mix: their steps go to the
forwarder (the Python hand-off), which neither cell would measure the packet path by.
The numbers are as noisy as the machine: compare within one run.

    .venv/bin/python bench/bench_autopath.py --seconds 3 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen_cluster  # noqa: E402
import load  # noqa: E402


def lookups(c, podns: str, n: int, seed: int) -> list[list[str]]:
    """``n`` lookups from a pod of ``podns``: each its walk up to the first answer."""
    rng = random.Random(seed)
    fqdns = {s.fqdn for s in c.services}
    forms = [(f, w) for f, w in gen_cluster.SEARCH_MIX if f != "external"]
    out = []
    while len(out) < n:
        form = rng.choices([f for f, _ in forms], [w for _, w in forms])[0]
        s = rng.choice(c.services)
        name = {"svc.ns": f"{s.name}.{s.namespace}", "svc.ns.svc": f"{s.name}.{s.namespace}.svc",
                "svc.ns.svc.cluster.local": s.fqdn}[form]
        walk = []
        for cand in gen_cluster.search_walk(name, podns):
            walk.append(f"{cand} A")
            if cand in fqdns:
                break
        out.append(walk)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=2000)
    ap.add_argument("--namespaces", type=int, default=20)
    ap.add_argument("--lookups", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dnsperf-clients", type=int, default=4)
    ap.add_argument("--dnsperf-outstanding", type=int, default=200)
    a = ap.parse_args(argv)
    out = os.path.join(HERE, "out", "autopath-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    c = gen_cluster.generate(a.services, a.namespaces, min(200, a.services), 1)
    podns = c.namespaces[0]
    kl = gen_cluster.kube_list(c)
    kl["items"].append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"namespace": podns, "name": "bench-client"},
                        "status": {"phase": "Running", "podIP": load.HOST}})
    cluster = os.path.join(out, "cluster.json")
    with open(cluster, "w") as f:
        json.dump(kl, f)
    ls = lookups(c, podns, a.lookups, 7)
    files = {}
    for name, lines in (("walk", [q for w in ls for q in w]), ("first", [w[0] for w in ls])):
        files[name] = os.path.join(out, name + ".txt")
        with open(files[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    per_lookup = {"walk": sum(map(len, ls)) / len(ls), "first": 1.0}
    servers = {
        "off": load.kdns_server(cluster, 0, load.SERVER_CPU, 1, out),
        "on": load.kdns_server(cluster, 0, load.SERVER_CPU, 1, out, extra=("--autopath",),
                               tag="-autopath"),
    }
    cells = []
    try:
        for s in servers.values():
            s.start()
        for rnd in range(a.rounds):
            for key, mix in (("off", "walk"), ("on", "walk"), ("on", "first")):
                cell = load.dnsperf_cell(servers[key], files[mix], a.seconds, a)
                cell.update(autopath=key, mix=mix, round=rnd,
                            lookups_per_s=cell["qps"] / per_lookup[mix])
                load.log(f"r{rnd} autopath {key:<3} {mix:<5} {cell['qps']:>9,.0f} q/s "
                         f"{cell['lookups_per_s']:>9,.0f} lookups/s  rcodes {cell['rcodes']}")
                cells.append(cell)
    finally:
        for s in servers.values():
            s.stop()

    def med(key, mix, field):
        v = sorted(c[field] for c in cells if c["autopath"] == key and c["mix"] == mix)
        return v[len(v) // 2]

    base = med("off", "walk", "lookups_per_s")
    lines = [f"search-path mix from a pod of {podns}: {per_lookup['walk']:.2f} queries per lookup "
             f"without autopath, 1 with; {a.services} services, dnsperf {a.seconds:g} s x "
             f"{a.rounds} rounds (median), shared machine"]
    for key, mix in (("off", "walk"), ("on", "walk"), ("on", "first")):
        lines.append(f"  autopath {key:<3} {mix:<5} {med(key, mix, 'qps'):>10,.0f} q/s "
                     f"{med(key, mix, 'lookups_per_s'):>10,.0f} lookups/s "
                     f"({med(key, mix, 'lookups_per_s') / base:.2f}x) "
                     f"{med(key, mix, 'cpu_us_per_query'):.2f} us CPU/query")
    print("\n".join(lines))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "per_lookup": per_lookup, "cells": cells,
                   "summary": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
