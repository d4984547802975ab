"""The measurements at scale, in one script the lead can rerun on a quiet machine.

Why: three goals for a cluster of 10,000 services and 100,000 endpoints (the
cluster ``bench_compile.generate`` makes): compile under 1 second, total PSS of a running
``kdns serve`` supervisor plus 2 workers under 170 MiB (kube-dns's and CoreDNS's memory
limit), and query throughput within 10% of the 5,000-service figure. This prints:

1. model build, rules and compile times (best of ``--repeat``, wall and CPU) and image size;
2. PSS (``/proc/<pid>/smaps_rollup``) of a real ``kdns serve --from-file <10k/100k JSON>
   --workers 2`` once it answers, per process and summed: PSS counts a shared page
   (the image memfd both workers map, the interpreter's text) once in total, split among
   the processes that map it, so the sum is what the pod's memory limit sees;
3. a short loadgen comparison of that server against one serving ``gen_cluster``'s
   5,000-service cluster, same mix shape (``gen_cluster.HIT_MIX``), in interleaved rounds.

It only ever talks to 127.0.0.1, starts its servers in their own sessions with
PR_SET_PDEATHSIG (``load.Server``) and stops them by process group in ``finally``; every load
run is bounded. On a shared 2-core machine the QPS figures move with the neighbours; compare
within one run.

    .venv/bin/python bench/bench_scale.py [--seconds 3] [--rounds 2] [--no-load]
"""
from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import random
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

import bench_compile as BC       # noqa: E402  (bench/ is not a package)
import gen_cluster               # noqa: E402
import load                      # noqa: E402

from kdns.zone import image as I  # noqa: E402
from kdns.kube import records  # noqa: E402

OUT = os.path.join(BENCH, "out", "scale")
PSS_GOAL_MIB = 170
COMPILE_GOAL_S = 1.0
QPS_GOAL = 0.90
HTTP_FLAGS = ("--healthz-port", "--metrics-port", "--health-port", "--ready-port", "--sidecar-port")


# --------------------------------------------------------------------------- compile


def compile_times(objs: list, repeat: int) -> dict:
    model, mw, mc = BC.best_of(1, BC.build_model, objs)
    zd, rw, rc = BC.best_of(repeat, lambda: records.zone_data(model, serial=1))
    img, cw, cc = BC.best_of(repeat, lambda: I.compile_image(zd.rrsets, zd.zones,
                                                             exists=zd.exists, serial=1))
    return {"model_s": (mw, mc), "rules_s": (rw, rc), "compile_s": (cw, cc),
            "rules_compile_s": (rw + cw, rc + cc), "image_bytes": len(img),
            "names": len({s.name for s in zd.rrsets}), "rrsets": len(zd.rrsets)}


# --------------------------------------------------------------------------- files


def write_scale_cluster(objs: list, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": objs}, f)
    os.replace(path + ".tmp", path)


def scale_queries(objs: list, n: int, seed: int) -> list[str]:
    """The hit mix of ``gen_cluster.HIT_MIX`` over the scale cluster: half the A queries ask
    for an endpoint name and half the PTRs for an endpoint IP, so the whole image (not only
    the 10,000 service names) is in the working set. SRV goes to ClusterIP services only, as
    in the 5k cluster (a headless SRV carries ten targets and their glue: a bigger answer
    would measure answer size, not scale)."""
    rng = random.Random(seed)
    services = [o for o in objs if o["kind"] == "Service"
                and o["spec"].get("type") != "ExternalName"]
    cluster_ip = [s for s in services if s["spec"]["clusterIP"] != "None"]
    v4_only = [s for s in cluster_ip if len(s["spec"]["clusterIPs"]) == 1]     # AAAA: NODATA
    endpoints = [(o["metadata"]["namespace"], o["metadata"]["labels"]["kubernetes.io/service-name"],
                  ep) for o in objs if o["kind"] == "EndpointSlice" for ep in o["endpoints"]]

    def fqdn(s) -> str:
        return f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc.{gen_cluster.ZONE}"

    out = []
    for _ in range(n):
        kind = gen_cluster._pick(rng, gen_cluster.HIT_MIX)
        if kind == "A" and rng.random() < 0.5:
            ns, svc, ep = rng.choice(endpoints)
            host = ep.get("hostname") or ep["addresses"][0].replace(".", "-")
            out.append(f"{host}.{svc}.{ns}.svc.{gen_cluster.ZONE} A")
        elif kind == "A":
            out.append(f"{fqdn(rng.choice(services))} A")
        elif kind == "SRV_NAMED":
            out.append(f"_http._tcp.{fqdn(rng.choice(cluster_ip))} SRV")
        elif kind == "SRV_BARE":
            out.append(f"{fqdn(rng.choice(cluster_ip))} SRV")
        elif kind == "AAAA_NODATA":
            out.append(f"{fqdn(rng.choice(v4_only))} AAAA")
        elif rng.random() < 0.5:
            ip = rng.choice(endpoints)[2]["addresses"][0]
            out.append(f"{ipaddress.ip_address(ip).reverse_pointer} PTR")
        else:
            ip = rng.choice(cluster_ip)["spec"]["clusterIP"]
            out.append(f"{ipaddress.ip_address(ip).reverse_pointer} PTR")
    return out


# --------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def rollup(pid: int) -> dict:
    """The kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, Pss_Anon, Pss_Shmem, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the most the process ever had resident. A memory limit is hit at the peak (the
    compile), not at the steady state PSS shows."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_pss(server: "load.Server") -> dict:
    sup = server.proc.pid
    procs = {"supervisor": rollup(sup)}
    for i, kid in enumerate(sorted(_children(sup))):
        procs[f"worker{i}"] = rollup(kid)
    total = sum(p["Pss"] for p in procs.values()) / 1024
    return {"total_mib": total, "procs": {k: {f: v / 1024 for f, v in p.items()
                                              if f.startswith(("Rss", "Pss"))}
                                          for k, p in procs.items()}}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="compile timing: best of N")
    ap.add_argument("--seconds", type=float, default=3.0, help="per load cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-load", action="store_true", help="skip the QPS comparison")
    a = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)

    objs = BC.generate(a.services, a.endpoints)
    ct = compile_times(objs, a.repeat)
    print(f"cluster: {a.services} services, {a.endpoints} endpoints, {ct['names']} names, "
          f"{ct['rrsets']} RRsets (load average {os.getloadavg()[0]:.1f})")
    print(f"{'phase':28} {'wall s':>8} {'cpu s':>8}")
    for label, key in (("model from API dicts", "model_s"), ("rules (model->RRsets)", "rules_s"),
                       ("compile (RRsets->image)", "compile_s"),
                       ("rules + compile", "rules_compile_s")):
        print(f"{label:28} {ct[key][0]:8.3f} {ct[key][1]:8.3f}")
    print(f"image size {ct['image_bytes'] / 2**20:.1f} MiB; compile goal < {COMPILE_GOAL_S} s: "
          f"{'met' if ct['compile_s'][1] < COMPILE_GOAL_S else 'NOT met'} (CPU time)")

    big_json = os.path.join(OUT, "cluster-scale.json")
    write_scale_cluster(objs, big_json)
    big_q = os.path.join(OUT, "hits-scale.txt")
    with open(big_q, "w") as f:
        f.write("\n".join(scale_queries(objs, 100_000, 7)) + "\n")
    del objs
    gc.collect()
    small = gen_cluster.write_all(os.path.join(OUT, "cluster-5k"), 5000)

    servers = []
    try:
        big = load.kdns_server(big_json, 0, None, a.workers, OUT)
        big.name = "kdns-scale"
        big.ready_query = (gen_cluster.ZONE, "SOA")      # the generated cluster has no kubernetes svc
        # Every HTTP listener on, as in a deployed pod (its prober and threads count too),
        # on free ports: the defaults (8080, 8181, ...) may be taken on a shared machine.
        big.argv += [arg for flag in HTTP_FLAGS for arg in (flag, str(load.free_port()))]
        servers.append(big)
        w0 = time.monotonic()
        big.start(timeout=180)
        print(f"kdns serve --workers {a.workers} on the scale cluster answered after "
              f"{time.monotonic() - w0:.1f} s")
        time.sleep(1.0)                                  # let workers map and settle
        pss = server_pss(big)
        for name, p in pss["procs"].items():
            print(f"  {name:10} Pss {p['Pss']:6.1f} MiB  (Rss {p['Rss']:6.1f}, "
                  f"Pss_Anon {p.get('Pss_Anon', float('nan')):6.1f}, "
                  f"Pss_Shmem {p.get('Pss_Shmem', float('nan')):6.1f})")
        print(f"total PSS {pss['total_mib']:.1f} MiB; goal < {PSS_GOAL_MIB} MiB: "
              f"{'met' if pss['total_mib'] < PSS_GOAL_MIB else 'NOT met'}")
        print(f"supervisor peak RSS (VmHWM, during the first compile) "
              f"{peak_rss_mib(big.proc.pid):.0f} MiB")
        if a.no_load:
            return 0
        exe = load.build_tools()["loadgen"]
        smallsrv = load.kdns_server(small["paths"]["kdns_input"], 0, None,
                                    a.workers, OUT)
        smallsrv.name = "kdns-5k"
        smallsrv.argv += [arg for flag in HTTP_FLAGS for arg in (flag, "0")]
        servers.append(smallsrv)
        smallsrv.start(timeout=120)
        qps = {"5k": [], "scale": []}
        cpu = {"5k": [], "scale": []}
        opts = argparse.Namespace(window=64, batch=32, sockets=4)
        for rnd in range(a.rounds):
            order = [("5k", smallsrv, small["paths"]["hits"]), ("scale", big, big_q)]
            for key, srv, qfile in (order if rnd % 2 == 0 else order[::-1]):
                c = load.loadgen_cell(srv, exe, qfile, a.seconds, opts)
                qps[key].append(c["qps"])
                cpu[key].append(c["cpu_us_per_query"])
                print(f"  round {rnd} {key:6} {c['qps']:>10,.0f} q/s  lost {c['lost']}  "
                      f"server {load.fmt(c['cpu_us_per_query'], '.2f')} us CPU/q")
        m5, ms = statistics.median(qps["5k"]), statistics.median(qps["scale"])
        print(f"QPS median: 5k services {m5:,.0f}, scale {ms:,.0f}, ratio {ms / m5:.2f}; "
              f"goal >= {QPS_GOAL}: {'met' if ms / m5 >= QPS_GOAL else 'NOT met'}")
        c5, cs = statistics.median(cpu["5k"]), statistics.median(cpu["scale"])
        # Server CPU per answer moves less with the neighbours than QPS does.
        print(f"server CPU per query median: 5k {c5:.2f} us, scale {cs:.2f} us "
              f"(throughput ratio at equal CPU {c5 / cs:.2f})")
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
