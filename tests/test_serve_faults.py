"""Faults against a running server (§6): a worker killed under load, clean stops,
and thousands of mutated and truncated packets."""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time

import dns.message
import pytest

from kdns.packet import engine
from kdns.zone import refpath
from serverutil import HOST, alive, a_records, running
from zonefixtures import SAMPLE_NAMES, sample_image

K = "kubernetes.default.svc.cluster.local"


def frame(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def read_frame(sock: socket.socket) -> bytes:
    head = sock.recv(2, socket.MSG_WAITALL)
    if len(head) < 2:
        raise EOFError("connection closed")
    n = struct.unpack("!H", head)[0]
    body = sock.recv(n, socket.MSG_WAITALL) if n else b""
    if len(body) < n:
        raise EOFError("connection closed")
    return body


def wait_for(predicate, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


# --------------------------------------------------------------------------- worker death


def test_sigkill_worker_under_load_is_replaced_within_a_second(tmp_path):
    results = []            # (send time, ok)
    stop = threading.Event()
    wire = dns.message.make_query(K, "A").to_wire()
    expected = refpath.answer(refpath.Image(sample_image()), wire)[1]
    nclients = 12           # one socket each: some hash to each worker's SO_REUSEPORT socket

    def client():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            while not stop.is_set():
                t = time.monotonic()
                try:
                    s.sendto(wire, (HOST, server.port))
                    ok = s.recv(65535) == expected
                except OSError:
                    ok = False
                results.append((t, ok))
                time.sleep(0.002)

    # Two worker processes: one is killed while the other keeps serving.
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        threads = [threading.Thread(target=client) for _ in range(nclients)]
        for t in threads:
            t.start()
        try:
            # Load first: answers flowing from every client before the kill.
            assert wait_for(lambda: sum(ok for _, ok in results) >= 10 * nclients, 10)
            before = server.worker_pids()
            assert len(before) == 2
            victim = min(before)
            survivor = (before - {victim}).pop()
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)              # a child of the server we started
            replaced = wait_for(lambda: len(server.worker_pids() - before) == 1, 1.0)
            replaced_after = time.monotonic() - killed_at
            assert replaced, f"no replacement after {replaced_after:.2f}s: {server.logs()}"
            assert replaced_after < 1.0
            # The supervisor zeroes a dead slot's generation, so 1 again means the
            # replacement has mapped the image and serves.
            server.wait_generation(1, timeout=5)
            serving_at = time.monotonic()
            # Enough queries sent after the replacement serves to show no lasting error.
            assert wait_for(lambda: sum(1 for t, _ in list(results) if t >= serving_at + 0.1)
                            > 100, 10)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert alive(survivor) and survivor in server.worker_pids()
        assert not alive(victim)
        gap = [ok for t, ok in results if killed_at <= t < serving_at]
        after = [ok for t, ok in results if t >= serving_at + 0.1]
        # The survivor kept answering while its sibling was dead and not yet replaced.
        assert sum(gap) > 0, (len(gap), serving_at - killed_at)
        # No lasting error: once the replacement serves, everything is answered.
        assert len(after) > 100 and all(after), (len(after), after.count(False))
        # Queued packets are not lost (the replacement inherits the socket): only a query
        # the killed worker had already read can go unanswered, one per client at most.
        assert sum(not ok for _, ok in results) <= nclients
        assert a_records(server.tcp(K)) == ["10.96.0.1"]
        assert "Traceback" not in server.logs()


def test_stopped_worker_is_detected_and_replaced(tmp_path):
    """A worker alive but making no progress (SIGSTOP) is killed and replaced, and the
    replacement answers what queued on its slot's socket meanwhile."""
    from kdns import settings
    wire = dns.message.make_query(K, "A").to_wire()
    expected = refpath.answer(refpath.Image(sample_image()), wire)[1]
    # Detection takes WORKER_STALL_TIMEOUT; a fresh interpreter's start is bounded by what
    # serverutil allows a whole kdns to start in.
    bound = settings.WORKER_STALL_TIMEOUT + 20
    # Two worker processes: one is stopped, and only it is replaced.
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        before = server.worker_pids()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGSTOP)              # a child of the server we started
        try:
            # One socket each: some hash to the stopped worker's socket and queue there.
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(12)]
            for s in socks:
                s.settimeout(bound)
                s.sendto(wire, (HOST, server.port))
            replaced = wait_for(lambda: not alive(victim)
                                and len(server.worker_pids() - before) == 1, bound)
            assert replaced, server.logs()
            for s in socks:                          # queued ones answered by the new one
                assert s.recv(65535) == expected
                s.close()
            server.wait_generation(1, timeout=bound)
            assert "made no progress" in server.logs()
            assert a_records(server.udp(K)) == ["10.96.0.1"]
        finally:
            if alive(victim):
                os.kill(victim, signal.SIGKILL)


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_everything_cleanly(tmp_path, sig):
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        pids = server.worker_pids()
        assert len(pids) == 2
        server.proc.send_signal(sig)
        assert server.proc.wait(10) == 0
        assert wait_for(lambda: not any(alive(p) for p in pids), 5)
        logs = server.logs()
        assert "Traceback" not in logs and "exited with status" not in logs, logs
        assert "stopped" in logs
        port = server.port
    # The sockets are closed: the port can be bound again (without SO_REUSEPORT).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        u.bind((HOST, port))
        t.bind((HOST, port))


def test_sigterm_with_lameduck_reports_not_ready_but_keeps_answering(tmp_path):
    with running(tmp_path, image=sample_image(), workers=2, args=("--lameduck", "1500ms")) as server:
        pids = server.worker_pids()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: server.http_get("/readiness")[0] == 503, 1.0)
        for _ in range(10):                          # still answering over both protocols
            assert a_records(server.udp(K)) == ["10.96.0.1"]
            assert a_records(server.tcp(K)) == ["10.96.0.1"]
        assert server.proc.wait(10) == 0
        assert time.monotonic() - signalled >= 1.4      # not before the lameduck ends
        assert wait_for(lambda: not any(alive(p) for p in pids), 5)
        assert "Traceback" not in server.logs()


def test_workers_exit_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL on the supervisor cannot run its shutdown: the workers notice the control
    channel close and exit by themselves, so nothing keeps answering as an orphan."""
    with running(tmp_path, image=sample_image(), workers=2) as server:
        pids = server.worker_pids()
        server.proc.kill()
        server.proc.wait(5)
        assert wait_for(lambda: not any(alive(p) for p in pids), 5)


# --------------------------------------------------------------------------- bad packets


def mutate(rng: random.Random, base: bytes) -> bytes:
    pkt = bytearray(base)
    kind = rng.randrange(7)
    if kind == 0:                                        # truncated anywhere
        return bytes(pkt[:rng.randrange(len(pkt))])
    if kind == 1:                                        # random byte flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(pkt))
            pkt[i] ^= 1 << rng.randrange(8)
        return bytes(pkt)
    if kind == 2:                                        # random bytes overwritten
        for _ in range(rng.randint(1, 6)):
            pkt[rng.randrange(len(pkt))] = rng.randrange(256)
        return bytes(pkt)
    if kind == 3:                                        # header counts and flags scrambled
        struct.pack_into("!H", pkt, 2 + 2 * rng.randrange(5), rng.randrange(65536))
        return bytes(pkt)
    if kind == 4:                                        # trailing garbage
        return bytes(pkt) + rng.randbytes(rng.randint(1, 40))
    if kind == 5:                                        # compression pointer in the question
        pkt[12] = 0xC0
        return bytes(pkt)
    return rng.randbytes(rng.randint(0, 80))             # noise


def base_queries() -> list[bytes]:
    out = []
    for i, name in enumerate(SAMPLE_NAMES):
        for rdtype in ("A", "AAAA", "SRV", "PTR"):
            q = dns.message.make_query(name, rdtype, use_edns=i % 3 != 0, want_dnssec=i % 5 == 0)
            q.id = i
            out.append(q.to_wire())
    return out


def expected_reply(img, pkt: bytes, tcp: bool) -> bytes | None:
    action, reply = refpath.answer(img, pkt, tcp=tcp)
    if action == refpath.ACTION_SEND:
        return reply
    if action == refpath.ACTION_HANDOFF:
        # With no upstream the hand-off answers an ExternalName's CNAME alone (the image
        # holds it; RFC 1034 §3.6.2: the client follows it), and REFUSED for the rest.
        action, reply = refpath.answer(img, pkt, tcp=tcp, external_cname=True)
        return reply if action == refpath.ACTION_SEND else engine.refused(pkt)
    return None


def test_mutated_and_truncated_packets(tmp_path):
    """5000 bad packets over UDP and 500 over TCP; each reply is the reference path's for the
    same bytes (or nothing when it drops), no worker dies, and the server answers correctly
    afterwards."""
    rng = random.Random(20261126)
    img = refpath.Image(sample_image())
    bases = base_queries()
    mismatches = []
    # Answers in the compiled order, so that each reply is refpath's for the same bytes
    # (rotated replies are held to refpath's rotation states in tests/test_loadbalance.py).
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--no-loadbalance",)) as server:
        pids = server.worker_pids()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for n in range(5000):
                pkt = mutate(rng, rng.choice(bases))
                want = expected_reply(img, pkt, tcp=False)
                s.sendto(pkt, (HOST, server.port))
                if want is None:
                    continue          # a wrong reply would surface at the next recv
                try:
                    got = s.recv(65535)
                except socket.timeout:
                    got = None
                if got != want:
                    mismatches.append(("udp", n, pkt.hex(), got and got.hex(), want.hex()))
                    if len(mismatches) > 10:
                        break
        with socket.create_connection((HOST, server.port), timeout=3) as t:
            for n in range(500):
                pkt = mutate(rng, rng.choice(bases))
                want = expected_reply(img, pkt, tcp=True)
                t.sendall(frame(pkt))
                if want is None:
                    continue
                got = read_frame(t)
                if got != want:
                    mismatches.append(("tcp", n, pkt.hex(), got.hex(), want.hex()))
                    if len(mismatches) > 10:
                        break
        assert not mismatches, mismatches[:3]
        assert server.worker_pids() == pids, server.logs()
        # Still correct afterwards, for every sample query.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for pkt in bases:
                want = expected_reply(img, pkt, tcp=False)
                s.sendto(pkt, (HOST, server.port))
                if want is not None:
                    assert s.recv(65535) == want
        assert "exited with status" not in server.logs()
