"""Chaos under load: API faults, worker kills and stops, and image swaps together.

kdns serves from the fake API server (tests/fakeapi.py) with two workers while dnsperf
sends cluster names and verifying clients check every reply against the answers the API
has published. Meanwhile: the API goes down and comes back (history compacted), its
watches fail (HTTP 500, 410 Gone, reset streams), one worker is SIGKILLed, one is stopped
briefly (SIGSTOP/SIGCONT, under WORKER_STALL_TIMEOUT) and one for good (the supervisor
must kill and replace it), and a headless service's endpoints change every 0.2 s, so
images are swapped all along.

What must hold (docs/architecture.md, "Failure behaviour"):
- no wrong answer, ever: a stable name gets exactly its address, a churned name one of
  the endpoint sets the API has published, a missing name NXDOMAIN;
- every dnsperf reply has the rcode its name must get (dnsperf -v prints one line per
  reply; it does not read the records, the verifiers do);
- a lost query only where a worker died with it: a verifying client (one query in flight)
  loses at most one per kill or stop that the supervisor answers by a replacement, and
  dnsperf at most its outstanding limit per such event (queries queued on the socket are
  served by the replacement, which inherits it).
Everything runs on loopback; every process is ended by its pid.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import dns.message
import dns.query
import dns.rcode

from conftest import report, require_tool
from fakeapi import FakeApiServer, Gone, HttpError, Reset
from kdns import settings
from serverutil import HOST, a_records, alive
from test_controller import ApiKdns, eps, nsobj, svc

ZONE = "cluster.local"
STABLE = {f"s{i}": f"10.96.7.{i + 1}" for i in range(4)}
CHURN = "churn"
MISSING = f"nope.default.svc.{ZONE}"
CLIENTS = 4
# A verifying client waits this long for a reply: detecting a stopped worker takes
# WORKER_STALL_TIMEOUT, then a fresh worker must start and drain the kept socket (a new
# interpreter on a loaded two-core machine: a few seconds).
START_ALLOWANCE = 4.0
CLIENT_TIMEOUT = settings.WORKER_STALL_TIMEOUT + START_ALLOWANCE
DNSPERF_QPS, DNSPERF_OUTSTANDING = 400, 50
RUN_SECONDS = 36


class Published:
    """Every endpoint set the churned service has had in the API, in order."""

    def __init__(self):
        self.sets: list[frozenset] = []
        self.lock = threading.Lock()

    def add(self, ips) -> None:
        with self.lock:
            self.sets.append(frozenset(ips))

    def known(self, ips) -> bool:
        with self.lock:
            return frozenset(ips) in self.sets


def check(name: str, msg: dns.message.Message, published: Published) -> str | None:
    """None for a right answer, else what is wrong with it."""
    rcode = dns.rcode.to_text(msg.rcode())
    if name == MISSING:
        return None if rcode == "NXDOMAIN" else f"{name}: {rcode}"
    if rcode != "NOERROR":
        return f"{name}: {rcode}"
    got = a_records(msg)
    short = name.split(".")[0]
    if short in STABLE:
        return None if got == [STABLE[short]] else f"{name}: {got}"
    return None if got and published.known(got) else f"{name}: {got} never published"


class Verifier(threading.Thread):
    """One UDP socket, one query at a time, every reply checked."""

    def __init__(self, port: int, names: list[str], published: Published, stop):
        super().__init__(daemon=True)
        self.port, self.names, self.published, self.stop = port, names, published, stop
        self.sent = 0
        self.lost: list[float] = []       # send times of queries that got no reply
        self.wrong: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name = self.names[i % len(self.names)]
            i += 1
            q = dns.message.make_query(name, "A")
            t = time.monotonic()
            self.sent += 1
            try:
                msg = dns.query.udp(q, HOST, port=self.port, timeout=CLIENT_TIMEOUT)
            except dns.exception.Timeout:
                self.lost.append(t)
                continue
            why = check(name, msg, self.published)
            if why:
                self.wrong.append(why)
            time.sleep(0.005)


def dnsperf_numbers(text: str) -> tuple[int, int]:
    num = lambda label: int(re.search(label + r":\s+(\d+)", text).group(1))
    return num("Queries sent"), num("Queries lost")


def dnsperf_rcodes(text: str) -> tuple[dict[str, int], list[str]]:
    """dnsperf -v's reply lines (``> RCODE name type latency``): the count per rcode, and
    the replies whose rcode is not the one their name must get."""
    counts: dict[str, int] = {}
    wrong = []
    for m in re.finditer(r"^> (\S+) (\S+) (\S+) ", text, re.M):
        rcode, name = m.group(1), m.group(2).rstrip(".")
        counts[rcode] = counts.get(rcode, 0) + 1
        if rcode != ("NXDOMAIN" if name == MISSING else "NOERROR"):
            wrong.append(f"{name}: {rcode}")
    return counts, wrong


def test_chaos_under_dnsperf_load(tmp_path):
    dnsperf = require_tool("dnsperf")
    api = FakeApiServer(token="secret", bookmark_interval=1.0).start()
    published = Published()
    api.create("namespaces", nsobj("default"))
    for name, ip in STABLE.items():
        api.create("services", svc(name, ip=ip))
    headless = svc(CHURN, ip="None")
    api.create("services", headless)
    first = ["10.8.0.1", "10.8.0.2"]
    published.add(first)
    api.create("endpointslices", eps(f"{CHURN}-1", CHURN, first))
    names = [f"{n}.default.svc.{ZONE}" for n in [*STABLE, CHURN]] + [MISSING]
    qfile = tmp_path / "queries.txt"
    qfile.write_text("".join(f"{n} A\n" for n in names))

    # Two worker processes: each kill or stop hits one while the other serves.
    k = ApiKdns(tmp_path, api, workers=2, args=("--worker-processes", "2"),
                env={"KDNS_WATCH_SETTINGS": '{"backoff_base": 0.1, "backoff_cap": 1.0}'})
    stop = threading.Event()
    verifiers = [Verifier(0, names[i:] + names[:i], published, stop) for i in range(CLIENTS)]
    perf = None
    replaced_events = 0
    timeline = []
    try:
        k.start(timeout=30)
        for v in verifiers:
            v.port = k.port
            v.start()
        perf_log = open(tmp_path / "dnsperf.txt", "w")
        perf = subprocess.Popen([dnsperf, "-s", HOST, "-p", str(k.port), "-d", str(qfile),
                                 "-l", str(RUN_SECONDS), "-Q", str(DNSPERF_QPS),
                                 "-q", str(DNSPERF_OUTSTANDING), "-t", str(int(CLIENT_TIMEOUT)),
                                 "-v"],
                                stdout=perf_log, stderr=subprocess.STDOUT)

        def churn():
            n = 0
            while not stop.is_set():
                n += 1
                ips = [f"10.8.{n % 200}.{j + 1}" for j in range(1 + n % 3)]
                published.add(ips)            # before the API has it: never a false alarm
                api.update("endpointslices", eps(f"{CHURN}-1", CHURN, ips))
                stop.wait(0.2)
        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        start = time.monotonic()

        def at(t: float, what: str) -> None:
            left = start + t - time.monotonic()
            if left > 0:
                time.sleep(left)
            timeline.append((round(time.monotonic() - start, 1), what))

        def replace(sig: int, what: str) -> None:
            """Signal one worker (a child of the kdns we started) and wait for its
            replacement to serve; it counts as a replaced event."""
            nonlocal replaced_events
            before = k.worker_pids()
            assert len(before) == 2, before
            victim = min(before)
            os.kill(victim, sig)
            replaced_events += 1
            deadline = time.monotonic() + settings.WORKER_STALL_TIMEOUT + 20
            while not (len(k.worker_pids() - before) == 1 and not alive(victim)):
                assert time.monotonic() < deadline, f"{what}: no replacement\n{k.logs()[-3000:]}"
                time.sleep(0.02)
            # A dead slot's generation reads 0 until its replacement has mapped an image.
            while min(k.served_generations()) == 0:
                assert time.monotonic() < deadline, f"{what}: replacement not serving"
                time.sleep(0.02)
            timeline.append((round(time.monotonic() - start, 1), f"{what}: replaced"))

        at(2, "API down")
        api.set_down(True)
        at(5, "API up (history compacted)")
        api.compact()
        api.set_down(False)
        at(8, "watch faults")
        api.inject("endpointslices", "watch", HttpError(500), times=2)
        api.inject("services", "watch", Gone(after_events=0))
        api.inject("endpointslices", "watch", Reset(after_events=1))
        api.drop_connections()
        at(11, "SIGKILL a worker")
        replace(signal.SIGKILL, "SIGKILL")
        at(16, "SIGSTOP a worker for 0.3 s")
        pids = k.worker_pids()
        brief = min(pids)
        os.kill(brief, signal.SIGSTOP)
        time.sleep(0.3)               # well under WORKER_STALL_TIMEOUT: kept, not replaced
        os.kill(brief, signal.SIGCONT)
        at(19, "SIGSTOP a worker for good")
        replace(signal.SIGSTOP, "SIGSTOP")
        at(25, "API down and SIGKILL together")
        api.set_down(True)
        replace(signal.SIGKILL, "SIGKILL during the outage")
        at(29, "API up")
        api.set_down(False)
        at(RUN_SECONDS - 2, "end")
    finally:
        stop.set()
        for v in verifiers:
            v.join(CLIENT_TIMEOUT + 2)
        if perf is not None:
            try:
                perf.wait(RUN_SECONDS + 30)
            except subprocess.TimeoutExpired:
                perf.kill()
                perf.wait()
        logs = k.logs()
        k.stop()
        api.close()
    perf_text = (tmp_path / "dnsperf.txt").read_text()
    sent, lost = dnsperf_numbers(perf_text)
    rcodes, perf_wrong = dnsperf_rcodes(perf_text)
    vsent = sum(v.sent for v in verifiers)
    vlost = sum(len(v.lost) for v in verifiers)
    wrong = [w for v in verifiers for w in v.wrong]
    figures = (f"dnsperf sent {sent} lost {lost} wrong rcode {len(perf_wrong)} ("
               + ", ".join(f"{r} {n}" for r, n in sorted(rcodes.items())) + "); "
               f"verifiers sent {vsent} lost {vlost} wrong {len(wrong)}; "
               f"{replaced_events} workers replaced; {len(published.sets)} endpoint sets "
               "published\n  " + "\n  ".join(f"{t:>5} s {w}" for t, w in timeline))
    print(f"\nchaos: {figures}")
    report("chaos under dnsperf load", figures)
    assert not wrong, wrong[:10]
    assert not perf_wrong, perf_wrong[:10]
    completed = int(re.search(r"Queries completed:\s+(\d+)", perf_text).group(1))
    assert sum(rcodes.values()) == completed, (rcodes, completed)    # every reply was read
    assert vlost <= CLIENTS * replaced_events, (vlost, timeline)
    assert lost <= DNSPERF_OUTSTANDING * replaced_events, (lost, timeline)
    assert sent > DNSPERF_QPS * RUN_SECONDS / 2, f"dnsperf sent only {sent}"
    assert vsent > 100 * CLIENTS
    assert "Traceback" not in logs, logs[-3000:]
