"""Where a wake-up's CPU goes: syscalls, context switches and CPU per answered query at a
fixed offered rate, kdns against NSD (and against another build, ``--baseline``), same run.

At everyday load a DNS server's CPU is mostly the cost of waking up, not of answering: each
wake-up is an epoll_wait, a recvmmsg, a sendmmsg and a trip through the scheduler, whatever
the batch it finds. Timing noise on a shared machine hides small differences in CPU time;
syscall counts do not have that noise. This harness:
  1. generates the cluster (bench/gen_cluster.py) and starts NSD and each kdns target, all
     pinned to CPU 1 (bench/load.py's servers);
  2. offers each target a fixed rate with dnsperf -Q (pinned to CPU 0), interleaved rounds;
  3. counts, over every thread of the server, the syscalls by name (perf stat on the
     raw_syscalls and syscalls tracepoints), context switches and task-clock while
     dnsperf runs;
  4. prints them per answered query, with the CPU per query (/proc, as load.py) and p50/p99.

    .venv/bin/python bench/wakeups.py --short
    .venv/bin/python bench/wakeups.py --baseline ../base --targets nsd,kdns1,kdns1base,floor

Needs perf (linux-perf) with tracepoint access (perf_event_paranoid <= 2 for one's own
processes, or root). Loopback only; every server is ended by its process group.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen_cluster  # noqa: E402
import load  # noqa: E402

# Every syscall a packet server makes per wake-up, and those that betray other work (the
# GIL's futex, the loop's self-pipe, timers, sleeps). The rest is summed as "other".
SYSCALLS = ("epoll_wait", "epoll_pwait", "recvmmsg", "recvfrom", "recvmsg", "sendmmsg",
            "sendto", "sendmsg", "clock_nanosleep", "nanosleep", "futex", "read", "write",
            "getpid", "clock_gettime")
EVENTS = (["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS]
          + ["context-switches", "task-clock"])


def perf_available() -> str | None:
    """None when perf can count the tracepoints, else why not."""
    perf = load.shutil.which("perf")
    if not perf:
        return "perf is not installed (apt-get install linux-perf)"
    p = subprocess.run([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"],
                       capture_output=True, text=True)
    if p.returncode or "<not supported>" in p.stderr:
        return f"perf cannot count syscall tracepoints: {p.stderr.strip()[-300:]}"
    return None


def perf_counts(text: str) -> dict[str, float]:
    """perf stat -x, output -> {event: value summed over its lines} (<not counted>, an event
    that never fired on a thread that slept throughout, is 0). Lines are value,unit,event,...
    or, with --per-thread, comm-tid,value,unit,event,..."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) < 4 or not line.strip() or line.startswith("#"):
            continue
        if not (_number(f[0]) or f[0].startswith("<")):
            f = f[1:]                   # --per-thread: the thread first
        value, event = f[0], f[2]
        out[event] = out.get(event, 0.0) + (float(value) if _number(value) else 0.0)
    return out


def _number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def measure(server: load.Server, qfile: str, rate: int, seconds: float, a, scratch: str) -> dict:
    """One fixed-rate dnsperf cell with perf counting the server's threads meanwhile."""
    pids = ",".join(str(p) for p in load.proc_tree(server.proc.pid))
    # perf starts first and outlasts dnsperf by a little: every query of the cell falls
    # inside its window (the idle margins add a few timer wake-ups, counted as they are).
    perf = subprocess.Popen([load.shutil.which("perf"), "stat", "-x,", "-e", ",".join(EVENTS),
                             "-p", pids, "--", "sleep", str(seconds + 1.0)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=load._die_with_parent)
    time.sleep(0.3)
    try:
        c = load.fixed_rate_cell(server, qfile, rate, seconds, a, scratch)
    finally:
        _, err = perf.communicate(timeout=seconds + 40)
    counts = perf_counts(err)
    n = c["completed"] or 1
    per_q = {s: counts.get(f"syscalls:sys_enter_{s}", 0) / n for s in SYSCALLS}
    total = counts.get("raw_syscalls:sys_enter", 0)
    c.update(syscalls_per_query=total / n,
             by_syscall_per_query={s: v for s, v in per_q.items() if v},
             other_syscalls_per_query=(total - sum(counts.get(f"syscalls:sys_enter_{s}", 0)
                                                   for s in SYSCALLS)) / n,
             ctx_switches_per_query=counts.get("context-switches", 0) / n,
             task_clock_us_per_query=counts.get("task-clock", 0) * 1e3 / n)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="1,000 services, 3 s per cell")
    ap.add_argument("--rates", default="20000,100000")
    ap.add_argument("--seconds", type=float, help="per cell and round (default 5, --short 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default="nsd,kdns1",
                    help="nsd, kdns1, kdns1hold (--hold-us UDP hold), kdns1holdN (an N us "
                         "hold), kdns1base (kdns1 from --baseline), kdns1baseholdN (that build "
                         "with an N us hold), floor (the C responder: recvmmsg/sendmmsg, no DNS)")
    ap.add_argument("--baseline", metavar="DIR", help="another checkout with its own .venv")
    ap.add_argument("--hold-us", type=int, default=100, help="KDNS_UDP_HOLD_US of kdns1hold")
    ap.add_argument("--quiet", action="store_true",
                    help="medians over the cells whose core ran nothing else (< 5%%) only")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="more environment for the kdns targets (all of them)")
    a = ap.parse_args(argv)
    a.rates = [int(r) for r in a.rates.split(",") if r]
    a.targets = [t for t in a.targets.split(",") if t]
    a.seconds = a.seconds or (3.0 if a.short else 5.0)
    # What load.fixed_rate_cell reads of load.py's arguments.
    a.dnsperf_clients, a.fixed_outstanding = 4, 1000
    if "kdns1base" in a.targets and not a.baseline:
        ap.error("kdns1base needs --baseline DIR")
    why = perf_available()
    if why:
        raise SystemExit(f"wakeups.py: {why}")
    extra = dict(e.split("=", 1) for e in a.env)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    outdir = os.path.join(load.OUT, "wakeups-" + stamp)
    os.makedirs(outdir, exist_ok=True)
    services = 1000 if a.short else 5000
    meta = gen_cluster.write_all(os.path.join(outdir, "cluster"), services,
                                 20 if a.short else 50, 200 if a.short else 1000, 1,
                                 20_000 if a.short else 100_000)
    cj, zdir = meta["paths"]["kdns_input"], os.path.join(outdir, "cluster", "nsd")
    makers = {
        "nsd": lambda p: load.nsd_server(zdir, os.path.join(outdir, "nsd-run"), p,
                                         load.SERVER_CPU),
        "kdns1": lambda _: load.kdns_server(cj, 0, load.SERVER_CPU, 1, outdir,
                                            extra_env=extra),
        "kdns1hold": lambda _: load.kdns_server(cj, 0, load.SERVER_CPU, 1, outdir,
                                                extra_env={**extra, "KDNS_UDP_HOLD_US":
                                                           str(a.hold_us)}, suffix="-hold"),
        "kdns1base": lambda _: load.kdns_server(cj, 0, load.SERVER_CPU, 1, outdir,
                                                extra_env=extra, suffix="-base",
                                                root=os.path.abspath(a.baseline or ".")),
    }
    if "floor" in a.targets:
        exe = load.build_tools()["responder"]
        bound = 120 + a.rounds * len(a.rates) * len(a.targets) * (a.seconds + 10)
        makers["floor"] = lambda p: load.responder_server(exe, p, load.SERVER_CPU, outdir, bound)
    for t in a.targets:
        for prefix, root in (("kdns1basehold", a.baseline), ("kdns1hold", None)):
            if t.startswith(prefix) and t[len(prefix):].isdigit():
                hold = {**extra, "KDNS_UDP_HOLD_US": t[len(prefix):]}
                makers[t] = (lambda hold=hold, t=t, root=root: lambda _: load.kdns_server(
                    cj, 0, load.SERVER_CPU, 1, outdir, extra_env=hold, suffix="-" + t,
                    root=os.path.abspath(root or load.ROOT)))()
                break
    servers: dict[str, load.Server] = {}
    samples = []
    try:
        for t in a.targets:
            for attempt in range(3):
                s = makers[t](load.free_port())
                try:
                    s.start(120)
                    break
                except RuntimeError:
                    s.stop()
                    if attempt == 2:
                        raise
            servers[t] = s
        keys = list(servers)
        for rnd in range(a.rounds):
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for rate in a.rates:
                for t in order:
                    c = measure(servers[t], meta["paths"]["hits"], rate, a.seconds, a,
                                os.path.join(outdir, "dnsperf-v.out"))
                    c.update(target=t, round=rnd)
                    samples.append(c)
                    load.log(f"r{rnd} {t:<10} {rate:>7,}: {c['qps']:>8,.0f} q/s "
                             f"p50 {load.fmt(c['p50_us'], '.0f')} p99 "
                             f"{load.fmt(c['p99_us'], '.0f')} us lost {c['lost']} "
                             f"CPU {load.fmt(c['cpu_us_per_query'], '.2f')} "
                             f"(task-clock {c['task_clock_us_per_query']:.2f}) us/q, "
                             f"{c['syscalls_per_query']:.2f} syscalls/q "
                             + " ".join(f"{k}={v:.2f}" for k, v in
                                        c["by_syscall_per_query"].items())
                             + f" other={c['other_syscalls_per_query']:.2f} "
                             f"cs={c['ctx_switches_per_query']:.2f} "
                             f"core others {100 * c['core_others_s'] / c['wall_s']:.0f}%")
    finally:
        for s in servers.values():
            s.stop()

    rows = []
    # A cell whose core ran other programs batches more per wake-up (cheaper per query);
    # --quiet keeps only the cells whose core was the server's own (others under 5%).
    if a.quiet:
        samples = [c for c in samples if c["core_others_s"] <= 0.05 * c["wall_s"]]
    for rate in a.rates:
        nsd = [c for c in samples if c["rate"] == rate and c["target"] == "nsd"]
        ref = load.median(c["task_clock_us_per_query"] for c in nsd) if nsd else None
        for t in servers:
            cs = [c for c in samples if c["rate"] == rate and c["target"] == t]
            med = {k: load.median(c[k] for c in cs)
                   for k in ("task_clock_us_per_query", "cpu_us_per_query", "p50_us",
                             "p99_us", "syscalls_per_query", "ctx_switches_per_query",
                             "other_syscalls_per_query")}
            by = {s: load.median(c["by_syscall_per_query"].get(s, 0) for c in cs)
                  for s in SYSCALLS}
            if not cs:
                continue
            rows.append({"rate": rate, "target": t, "rounds": len(cs),
                         "lost": sum(c["lost"] for c in cs), **med,
                         "by_syscall_per_query": {s: v for s, v in by.items() if v},
                         "task_clock_over_nsd": med["task_clock_us_per_query"] / ref
                         if ref else None})
    print(f"\nfixed rate, dnsperf -Q, {a.seconds:g} s x {a.rounds} rounds (medians"
          f"{' of the quiet cells' if a.quiet else ''}), server on CPU {load.SERVER_CPU}; "
          f"per answered query: task-clock (perf) and /proc CPU, syscalls (sys) by name, "
          f"context switches (cs):")
    head = (f"{'rate':>7} {'target':<14} {'n':>2} {'task us':>7} {'x NSD':>5} {'/proc us':>8} "
            f"{'p50':>5} {'p99':>5} {'lost':>4} {'sys':>5} {'cs':>5}  syscalls")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['rate']:>7,} {r['target']:<14} {r['rounds']:>2} "
              f"{r['task_clock_us_per_query']:>7.2f} "
              f"{load.fmt(r['task_clock_over_nsd'], '.2f'):>5} "
              f"{load.fmt(r['cpu_us_per_query'], '.2f'):>8} {load.fmt(r['p50_us'], '.0f'):>5} "
              f"{load.fmt(r['p99_us'], '.0f'):>5} {r['lost']:>4} "
              f"{r['syscalls_per_query']:>5.2f} {r['ctx_switches_per_query']:>5.2f}  "
              + " ".join(f"{k}={v:.2f}" for k, v in r["by_syscall_per_query"].items())
              + f" other={r['other_syscalls_per_query']:.2f}")
    path = os.path.join(outdir, "results.json")
    with open(path, "w") as f:
        json.dump({"args": vars(a), "samples": samples, "rows": rows}, f, indent=1)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
