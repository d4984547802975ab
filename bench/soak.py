"""Soak: kdns under mixed traffic for minutes, its memory sampled per process.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --seconds 60    # a short one

The run, all on 127.0.0.1:
  1. starts a loopback upstream (in this process) that answers every A query for a name
     under ``soak.example`` with one address, TTL 300, so forwarded answers are cacheable;
  2. starts ``kdns serve --from-file examples/cluster.yaml`` with that upstream as its only
     nameserver (``--nameservers``), two workers, the metrics port on;
  3. runs dnsperf (-Q bounded) over a query file that mixes every cluster name of the
     example (A/AAAA/SRV/PTR, plus misses) with many distinct forwarded names, more than
     the forward cache holds, so the cache fills, evicts and must level off at its bound;
  4. meanwhile sends malformed packets over UDP (random bytes, cut queries, pointers out of
     the message or into loops, responses, huge EDNS options) and over TCP (bad framing);
  5. samples RSS and PSS (/proc/<pid>/smaps_rollup) of the supervisor, the worker zygote
     (the supervisor's child that names itself kdns-zygote; workers are forked from it and
     reparented to the supervisor, so both are its children) and each worker, and the
     forward cache's entries (coredns_cache_entries) every --interval seconds;
  6. prints the table, checks that the cache levelled off (its last third grew by at most
     2% and it never passed its bound), that each process's RSS levelled off (its last
     third grew by at most RSS_GROWTH_MAX of it, or RSS_GROWTH_FLOOR_MIB for a small one)
     and that kdns is still answering, and writes bench/out/soak-latest.json. Exit 1 when
     a check fails.

Everything it starts it stops by pid; dnsperf and kdns die with it (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
sys.path.insert(0, ROOT)

from kdns import settings  # noqa: E402
from kdns.forward import handoff  # noqa: E402
from kdns.serve.zygote import ZYGOTE_NAME  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
from serverutil import comm  # noqa: E402

HOST = "127.0.0.1"
FWD_ZONE = "soak.example"
WORKERS = 2
# RSS that still grows in the last third of the run is a leak, not warm-up: at most this
# share of it, and never less than the floor (a few pages of a small process are noise).
RSS_GROWTH_MAX = 0.02
RSS_GROWTH_FLOOR_MIB = 1.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def bound_pair() -> tuple[int, socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to one loopback port."""
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((HOST, 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind((HOST, port))
            return port, u, t
        except OSError:
            u.close()
            t.close()


def free_port() -> int:
    # kdns binds its own ports (no SO_REUSEPORT sharing with us): drawn, then released.
    port, u, t = bound_pair()
    u.close()
    t.close()
    return port


# --------------------------------------------------------------------------- upstream


class Upstream(threading.Thread):
    """Answers A for any name with an address derived from it (TTL 300); NXDOMAIN else."""

    def __init__(self):
        super().__init__(daemon=True)
        self.port, self.sock, tcp = bound_pair()
        tcp.close()                   # kdns asks over TCP only after TC, which never comes
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.answered = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                q, addr = self.sock.recvfrom(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            r = self.reply(q)
            if r:
                self.sock.sendto(r, addr)
                self.answered += 1

    @staticmethod
    def reply(q: bytes) -> bytes | None:
        if len(q) < 17:
            return None
        off = 12
        while off < len(q) and q[off]:
            off += 1 + q[off]
        qend = off + 5
        if qend > len(q):
            return None
        qtype = struct.unpack_from("!H", q, off + 1)[0]
        name = q[12:off + 1]
        flags = 0x8180
        head = q[:2] + struct.pack("!HHHHH", flags, 1, 1 if qtype == 1 else 0, 0, 0)
        if qtype != 1:
            return head + q[12:qend]
        h = hash(name) & 0xFFFFFF
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([10, h >> 16 & 255,
                                                                         h >> 8 & 255, h & 255])
        return head + q[12:qend] + rr


# --------------------------------------------------------------------------- traffic


def cluster_queries() -> list[str]:
    """Every name of the example with its type, from ``kdns records`` (and a few misses)."""
    out = subprocess.run([sys.executable, "-m", "kdns", "records", "--from-file",
                          os.path.join(ROOT, "examples", "cluster.yaml")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    qs = []
    for line in out.splitlines():
        if line.startswith(";"):
            continue
        f = line.split("\t")
        if len(f) >= 4 and f[3] in ("A", "AAAA", "SRV", "PTR", "TXT", "CNAME"):
            qs.append(f"{f[0]} {f[3]}")
    qs += ["nope.default.svc.cluster.local A", "x.y.svc.cluster.local AAAA",
           "10-244-0-9.default.pod.cluster.local A"]
    return qs


def query_file(path: str, distinct: int) -> None:
    """Cluster names and forwarded names interleaved: 1 in 3 queries is forwarded."""
    cluster = cluster_queries()
    rng = random.Random(7)
    names = [f"n{i}.{FWD_ZONE} A" for i in range(distinct)]
    rng.shuffle(names)
    with open(path, "w") as f:
        for i, n in enumerate(names):
            f.write(n + "\n")
            f.write(cluster[(2 * i) % len(cluster)] + "\n")
            f.write(cluster[(2 * i + 1) % len(cluster)] + "\n")


def malformed(rng: random.Random) -> bytes:
    base = bytearray(struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0) +
                     b"\x0akubernetes\x07default\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01")
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
    if kind == 1:
        return bytes(base[:rng.randrange(len(base))])
    if kind == 2:                                 # owner pointer outside the message
        base[11] = 1
        return bytes(base) + b"\xff\xff\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00"
    if kind == 3:                                 # a pointer loop in the question
        return bytes(base[:12]) + b"\xc0\x0c\x00\x01\x00\x01"
    if kind == 4:                                 # a response: must be dropped
        base[2] |= 0x80
        return bytes(base)
    if kind == 5:                                 # a 3,000-byte EDNS option
        base[11] = 1
        opt = struct.pack("!HH", 65001, 3000) + bytes(3000)
        return bytes(base) + b"\x00" + struct.pack("!HHIH", 41, 4096, 0, len(opt)) + opt
    for _ in range(rng.randint(1, 5)):            # bit flips
        i = rng.randrange(len(base))
        base[i] ^= 1 << rng.randrange(8)
    return bytes(base)


class Malformed(threading.Thread):
    """About ``rate`` bad UDP packets a second, and a bad TCP stream every second."""

    def __init__(self, port: int, rate: int):
        super().__init__(daemon=True)
        self.port, self.rate = port, rate
        self.stop = threading.Event()
        self.sent = self.tcp = 0

    def run(self) -> None:
        rng = random.Random(11)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        tick = time.monotonic()
        while not self.stop.wait(max(0.0, tick - time.monotonic())):
            tick += 0.1
            for _ in range(max(1, self.rate // 10)):
                try:
                    s.sendto(malformed(rng), (HOST, self.port))
                    self.sent += 1
                except OSError:
                    pass
            while True:                           # replies (FORMERR...) are not our business
                try:
                    s.recv(65535)
                except OSError:
                    break
            if int(tick * 10) % 10 == 0:
                self.bad_tcp(rng)
        s.close()

    def bad_tcp(self, rng: random.Random) -> None:
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as c:
                m = malformed(rng)
                # a length that lies, then a short frame, then hang up
                c.sendall(struct.pack("!H", len(m) + rng.randrange(1, 50)) + m)
                self.tcp += 1
        except OSError:
            pass


# --------------------------------------------------------------------------- sampling


def children(pid: int) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(e))
    return sorted(out)


def started(pid: int) -> int:
    """Start time in clock ticks since boot (proc(5) stat field 22); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return 0
    return int(st[st.rindex(")") + 2:].split()[19])


def processes(sup: int) -> list[tuple[str, int]]:
    """(label, pid) of the supervisor, the zygote and each worker. A worker just forked
    carries the zygote's name until it renames itself: of several kdns-zygote children the
    oldest is the zygote."""
    kids = children(sup)
    named = sorted((p for p in kids if comm(p) == ZYGOTE_NAME.decode()), key=started)
    zygote = named[:1]
    workers = [p for p in kids if p not in zygote]
    return ([("supervisor", sup)] + [("zygote", p) for p in zygote] +
            [(f"worker{i}", p) for i, p in enumerate(workers)])


def mem(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    rss = int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))
    pss = int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))
    return rss, pss


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


def ask(port: int, name: str) -> int | None:
    """The rcode of one UDP A query, or None on timeout."""
    q = struct.pack("!HHHHHH", 0x5150, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q, (HOST, port))
        try:
            return s.recv(65535)[3] & 0xF
        except OSError:
            return None


# --------------------------------------------------------------------------- run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--qps", type=int, default=1500, help="dnsperf's -Q")
    ap.add_argument("--malformed", type=int, default=100, help="bad UDP packets a second")
    ap.add_argument("--distinct", type=int, default=40000, help="distinct forwarded names")
    ap.add_argument("--interval", type=float, default=0.0,
                    help="seconds between samples (default: a 30th of the run)")
    a = ap.parse_args()
    interval = a.interval or max(2.0, a.seconds / 30)
    rundir = os.path.join(OUT, f"soak-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(rundir, exist_ok=True)
    qfile = os.path.join(rundir, "queries.txt")
    query_file(qfile, a.distinct)

    up = Upstream()
    up.start()
    port, http = free_port(), free_port()
    resolv = os.path.join(rundir, "empty-resolv.conf")
    open(resolv, "w").close()
    argv = [sys.executable, "-m", "kdns", "serve", "--from-file",
            os.path.join(ROOT, "examples", "cluster.yaml"), "--dns-bind-address", HOST,
            "--dns-port", str(port), "--workers", str(WORKERS),
            "--metrics-port", str(http), "--healthz-port", "0", "--health-port", "0",
            "--ready-port", "0", "--sidecar-port", "0", "--lameduck", "0",
            "--resolv-conf", resolv, "--config-dir", os.path.join(rundir, "no-config"),
            "--nameservers", f"{HOST}:{up.port}", "--log-level", "warning"]
    log = open(os.path.join(rundir, "kdns.log"), "wb")
    kdns = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    perf = bad = None
    try:
        deadline = time.monotonic() + 60
        while ask(port, "kubernetes.default.svc.cluster.local") != 0:
            if kdns.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kdns did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.2)
        perf_out = open(os.path.join(rundir, "dnsperf.txt"), "w")
        perf = subprocess.Popen(["dnsperf", "-s", HOST, "-p", str(port), "-d", qfile,
                                 "-l", str(a.seconds), "-Q", str(a.qps), "-c", "4", "-q", "200",
                                 "-t", "2"], stdout=perf_out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        bad = Malformed(port, a.malformed)
        bad.start()
        samples = []
        start = time.monotonic()
        while True:
            t = time.monotonic() - start
            procs = processes(kdns.pid)
            row = {"t": round(t), "cache": metric(http, "coredns_cache_entries"),
                   "procs": {name: mem(pid) for name, pid in procs}}
            samples.append(row)
            print(f"t={row['t']:>4}s cache={row['cache']} " + " ".join(
                f"{n}={v[0] // 1024 if v else '-'}M" for n, v in row["procs"].items()),
                file=sys.stderr, flush=True)
            if perf.poll() is not None or t >= a.seconds:
                break
            time.sleep(min(interval, max(0.5, a.seconds - t)))
        perf.wait(a.seconds + 30)
        alive = ask(port, "kubernetes.default.svc.cluster.local") == 0
        fwd_ok = ask(port, f"n1.{FWD_ZONE}") == 0
    finally:
        if bad is not None:
            bad.stop.set()
            bad.join(3)
        if perf is not None and perf.poll() is None:
            perf.kill()
            perf.wait()
        kdns.send_signal(signal.SIGTERM)
        try:
            kdns.wait(20)
        except subprocess.TimeoutExpired:
            kdns.kill()
            kdns.wait()
        up.stop.set()
        up.join(2)
        log.close()

    text = open(perf_out.name).read()
    num = lambda label: float(re.search(label + r"\s*:?\s*([\d.]+)", text).group(1))
    sent, completed, lost = num("Queries sent"), num("Queries completed"), num("Queries lost")
    fast_slots = min(handoff._pow2(settings.CACHE_SIZE), settings.FAST_CACHE_SLOTS)
    per_worker = fast_slots + settings.CACHE_SIZE
    bound = WORKERS * per_worker
    caches = [s["cache"] for s in samples if s["cache"] is not None]
    third = caches[len(caches) * 2 // 3:] or caches
    growth = (third[-1] - third[0]) / max(third[0], 1)
    checks = {
        "cache never above its bound": max(caches) <= bound,
        "cache levelled off (last third grew <= 2%)": growth <= 0.02,
        "cache filled (at least half the compiled slots)": third[-1] >= WORKERS * fast_slots / 2,
        "kdns answers cluster names at the end": alive,
        "kdns answers forwarded names at the end": fwd_ok,
    }
    names = list(dict.fromkeys(n for s in samples for n in s["procs"]))
    rss_growth = {}
    for n in names:
        tail = [s["procs"][n][0] / 1024 for s in samples[len(samples) * 2 // 3:]
                if s["procs"].get(n)]
        if len(tail) >= 2:
            rss_growth[n] = (tail[-1] - tail[0], max(RSS_GROWTH_MAX * tail[0],
                                                     RSS_GROWTH_FLOOR_MIB))
    checks["zygote sampled apart from the workers"] = "zygote" in names and sum(
        n.startswith("worker") for n in names) == WORKERS
    checks[f"RSS levelled off (last third grew <= {RSS_GROWTH_MAX:.0%}, at least "
           f"{RSS_GROWTH_FLOOR_MIB:g} MiB, per process)"] = bool(rss_growth) and all(
        grew <= limit for grew, limit in rss_growth.values())
    print(f"\nsoak {a.seconds} s: dnsperf sent {sent:.0f}, completed {completed:.0f}, lost "
          f"{lost:.0f}; upstream answered {up.answered}; malformed UDP {bad.sent}, bad TCP "
          f"streams {bad.tcp}")
    print(f"{'t (s)':>6} {'cache':>7} " + " ".join(f"{n + ' RSS/PSS MiB':>22}" for n in names))
    for s in samples:
        cells = []
        for n in names:
            v = s["procs"].get(n)
            cells.append(f"{(f'{v[0] / 1024:.1f}/{v[1] / 1024:.1f}' if v else '-'):>22}")
        print(f"{s['t']:>6} {s['cache'] if s['cache'] is not None else '-':>7} " + " ".join(cells))
    print(f"cache bound {bound} ({WORKERS} workers x {per_worker}); last third grew "
          f"{growth * 100:.2f}%")
    print("RSS growth in the last third (MiB): " + ", ".join(
        f"{n} {grew:+.1f} (limit {limit:.1f})" for n, (grew, limit) in rss_growth.items()))
    for k, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {k}")
    result = dict(seconds=a.seconds, qps=a.qps, sent=sent, completed=completed, lost=lost,
                  upstream_answered=up.answered, malformed_udp=bad.sent, bad_tcp=bad.tcp,
                  cache_bound=bound, samples=samples, checks=checks,
                  rss_growth_mib={n: g for n, (g, _) in rss_growth.items()})
    for path in (os.path.join(rundir, "results.json"), os.path.join(OUT, "soak-latest.json")):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
