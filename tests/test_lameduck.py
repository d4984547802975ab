"""Lameduck the way a rolling update exercises it: two kdns instances share one
DNS port through SO_REUSEPORT, dnsperf sends steady load, one instance gets SIGTERM. It must
report not ready at once, keep answering for --lameduck, exit 0, and dnsperf must lose no
query: the dying instance's UDP sockets leave the SO_REUSEPORT group and drain what is
queued on them before they close."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from conftest import require_tool
from serverutil import Kdns
from zonefixtures import sample_image

pytestmark = pytest.mark.timeout(120)

QUERIES = ["kubernetes.default.svc.cluster.local A", "kubernetes.default.svc.cluster.local SRV",
           "_https._tcp.kubernetes.default.svc.cluster.local SRV",
           "dual.default.svc.cluster.local AAAA", "nope.default.svc.cluster.local A"]
LAMEDUCK = 3.0
RUN = 9                   # seconds of load; SIGTERM at 2 s, so the exit falls inside the run


def requests(k: Kdns) -> int:
    return int(sum(v for (name, labels), v in k.metrics().items()
                   if name == "coredns_dns_requests_total"))


# The instance that leaves: one worker, or four slots as threads of two processes (each
# slot's socket leaves the group and is drained by its own thread's loop).
@pytest.mark.parametrize("old_workers", [1, 4])
def test_rolling_update_loses_no_query(tmp_path, old_workers):
    dnsperf = require_tool("dnsperf")
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(QUERIES) + "\n")
    args = ("--lameduck", f"{LAMEDUCK}s")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Kdns(tmp_path / "old",
               image=sample_image(), workers=old_workers, args=args)
    old.start()
    # Same DNS port for both (known once old runs): the supervisor sets SO_REUSEPORT on
    # every socket.
    new = Kdns(tmp_path / "new",
               image=sample_image(), workers=1, args=args, dns_port=old.port)
    try:
        new.start()
        perf = subprocess.Popen(
            [dnsperf, "-s", "127.0.0.1", "-p", str(old.port), "-d", str(qfile), "-l", str(RUN),
             "-Q", "2000", "-c", "16", "-t", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # Load reaches both instances (SO_REUSEPORT spreads dnsperf's 16 sockets); the
            # wait leaves most of the run after SIGTERM + LAMEDUCK.
            deadline = time.monotonic() + RUN - LAMEDUCK - 2
            while min(requests(old), requests(new)) == 0:
                assert time.monotonic() < deadline, "load did not reach both instances"
                time.sleep(0.05)
            both = requests(old), requests(new)
            t0 = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            # Not ready at once: well inside the lameduck, while the process still runs...
            while old.http_get("/readiness")[0] == 200:
                assert time.monotonic() - t0 < LAMEDUCK / 2, "still ready after SIGTERM"
                time.sleep(0.01)
            assert old.proc.poll() is None, "exited instead of lameducking"
            # ...still answering through the lameduck, then exit 0 (not before it ends; the
            # wait bounds the other side).
            served_at_term = requests(old)
            assert old.proc.wait(LAMEDUCK + 10) == 0, old.logs()
            took = time.monotonic() - t0
            assert took >= LAMEDUCK - 0.2, took
            out, _ = perf.communicate(timeout=RUN + 20)
        finally:
            if perf.poll() is None:
                perf.kill()
                perf.wait()
        sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))
        lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
        assert sent > 2000 * (RUN - 2), out
        assert lost == 0, out
        assert served_at_term > 0
        assert new.ready() and requests(new) > both[1]
    finally:
        old.stop()
        new.stop()
