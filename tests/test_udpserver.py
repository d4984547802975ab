"""UdpServer on real loopback sockets: batched replies are right, handoffs carry the client's
address, nothing is lost in a burst. Only 127.0.0.1 and ::1 are ever used."""
import mmap
import select
import socket
import threading

import dns.message
import dns.query
import dns.rcode
import pytest

from kdns import settings
from kdns.packet import _fastpath as F
from kdns.packet import counters as K
from kdns.zone import refpath as P
from tests import zonefixtures as Z

S = "kubernetes.default.svc.cluster.local."
BUF = 1 << 20


class Loopback:
    """A kdns UDP socket on loopback served by UdpServer, pumped from the test thread."""

    def __init__(self, family=socket.AF_INET, host="127.0.0.1", image=None, **server_args):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # A burst of 200 queries must fit the receive queue (SO_RCVBUF is doubled and capped
        # by net.core.rmem_max; 1 MiB asks for plenty).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.buf = image or Z.sample_image()
        self.img = F.Image(self.buf)
        self.ref = P.Image(self.buf)
        self.page = mmap.mmap(-1, K.SLOT_WORDS * 8)     # a worker's shared counter page
        self.counters = F.Counters(self.page)
        server_args.setdefault("edns_max", settings.EDNS_UDP_SIZE)
        self.server = F.UdpServer(self.sock.fileno(), **server_args)
        self.handoffs = []
        self.serve_calls = []

    def pump(self, idle=0.3, max_batches=16):
        """Serve until the socket has been quiet for ``idle`` seconds; keep the handoffs."""
        while select.select([self.sock], [], [], idle)[0]:
            n = self.server.serve(self.img, self.counters, max_batches)
            assert self.server.last_errno == 0
            self.serve_calls.append(n)
            self.handoffs += [(self.server.handoff_packet(i), self.server.handoff_addr(i))
                              for i in range(n)]

    def counter(self, name):
        return self.counters[K.LAYOUT[name]]

    def close(self):
        del self.server, self.counters
        self.page.close()
        self.sock.close()


@pytest.fixture
def lo():
    server = Loopback()
    yield server
    server.close()


def client(family=socket.AF_INET, host="127.0.0.1"):
    c = socket.socket(family, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    c.bind((host, 0))
    c.settimeout(2)
    return c


def wire(name, rdtype="A", qid=7, edns=-1, payload=1232):
    m = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    m.id = qid
    return m.to_wire()


def receive(sock, n):
    return [sock.recv(65535) for _ in range(n)]


def test_replies_are_the_oracles_bytes(lo):
    c = client()
    queries = [wire(S), wire("_https._tcp." + S, "SRV", qid=8, edns=0),
               wire("NoPe.Default.svc.cluster.local.", qid=9),
               wire("1-2-3-4.default.pod.cluster.local.", qid=10),
               wire("big.default.svc.cluster.local.", qid=11)]
    for q in queries:
        c.sendto(q, lo.addr)
    lo.pump()
    replies = {dns.message.from_wire(r).id: r for r in receive(c, len(queries))}
    for q in queries:
        qid = int.from_bytes(q[:2], "big")
        assert (P.ACTION_SEND, replies[qid]) == P.answer(lo.ref, q)
    assert dns.message.from_wire(replies[7]).answer[0].to_text() == f"{S} 30 IN A 10.96.0.1"
    assert dns.message.from_wire(replies[9]).rcode() == dns.rcode.NXDOMAIN
    assert dns.message.from_wire(replies[11]).flags & dns.flags.TC     # 120 A > 512 bytes
    assert lo.handoffs == []
    c.close()


def test_dnspython_client_gets_an_answer(lo):
    result = {}

    def ask():
        q = dns.message.make_query("dual.default.svc.cluster.local.", "AAAA")
        result["r"] = dns.query.udp(q, "127.0.0.1", port=lo.addr[1], timeout=5)

    t = threading.Thread(target=ask)
    t.start()
    while t.is_alive():
        lo.pump(idle=0.05)
    t.join()
    assert result["r"].answer[0].to_text() == "dual.default.svc.cluster.local. 30 IN AAAA fd00::20"


def test_out_of_zone_names_are_handed_off_with_the_client_address(lo):
    c1, c2 = client(), client()
    q1, q2 = wire("google.com.", qid=1), wire("2.0.96.10.in-addr.arpa.", "PTR", qid=2)
    c1.sendto(q1, lo.addr)
    c2.sendto(q2, lo.addr)
    c1.sendto(wire(S, qid=3), lo.addr)               # answered in the same batch
    lo.pump()
    assert sorted(lo.handoffs) == sorted([(q1, c1.getsockname()), (q2, c2.getsockname())])
    assert dns.message.from_wire(c1.recv(4096)).id == 3
    c2.settimeout(0.2)
    with pytest.raises(socket.timeout):               # a handoff is never answered here
        c2.recv(4096)
    c1.close()
    c2.close()


def test_ipv6_loopback_handoff_address_is_a_4_tuple():
    lo6 = Loopback(socket.AF_INET6, "::1")
    c = client(socket.AF_INET6, "::1")
    c.sendto(wire("example.org."), lo6.addr)
    c.sendto(wire(S, qid=5), lo6.addr)
    lo6.pump()
    (packet, addr), = lo6.handoffs
    assert addr == c.getsockname() and len(addr) == 4
    assert dns.message.from_wire(c.recv(4096)).id == 5
    c.close()
    lo6.close()


def test_a_burst_of_200_is_fully_answered(lo):
    c = client()
    names = [n for n in Z.SAMPLE_NAMES if P.answer(lo.ref, wire(n))[0] == P.ACTION_SEND]
    queries = [wire(names[i % len(names)], qid=1000 + i) for i in range(200)]
    for q in queries:
        c.sendto(q, lo.addr)
    lo.pump()
    replies = {dns.message.from_wire(r).id: r for r in receive(c, 200)}
    assert len(replies) == 200
    for q in queries:
        assert replies[int.from_bytes(q[:2], "big")] == P.answer(lo.ref, q)[1]
    assert lo.counter("send_failed_udp") == 0
    assert sum(lo.counter(f"rcode_udp_{r}") for r in range(17)) == 200


def test_handoff_area_fills_at_256_and_the_rest_waits(lo):
    c = client()
    for i in range(300):
        c.sendto(wire(f"host{i}.example.org.", qid=i), lo.addr)
    lo.pump()
    assert max(lo.serve_calls) == 256
    assert sorted(int.from_bytes(p[:2], "big") for p, _ in lo.handoffs) == list(range(300))
    c.close()


def test_datagrams_of_any_size_are_read_whole_and_edns_is_capped_at_4096():
    """A query slot takes the largest UDP payload: nothing is cut on receive (MSG_TRUNC)
    and dropped; a 60,000-byte datagram without a question is FORMERR like a small one."""
    lo = Loopback(edns_max=65535)
    c = client()
    junk = b"\0" * 60000
    c.sendto(junk, lo.addr)
    big = wire("big.default.svc.cluster.local.", edns=0, payload=65535)
    c.sendto(big, lo.addr)
    lo.pump()
    replies = receive(c, 2)
    assert sorted(replies) == sorted([P.answer(lo.ref, junk)[1],
                                      P.answer(lo.ref, big, edns_max=4096)[1]])
    m = dns.message.from_wire(max(replies, key=len))
    assert m.payload == 4096 and len(m.answer[0]) == 120 and not m.flags & dns.flags.TC
    assert (lo.counter("dropped_udp"), lo.counter("formerr_udp")) == (0, 1)
    c.close()
    lo.close()


def test_server_arguments_are_checked():
    with pytest.raises(ValueError):
        F.UdpServer(-1, settings.EDNS_UDP_SIZE)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(ValueError):
            F.UdpServer(s.fileno(), settings.EDNS_UDP_SIZE, batch=0)
        page = bytearray(K.SLOT_WORDS * 8)
        with pytest.raises(TypeError):                  # before the first image arrives
            F.UdpServer(s.fileno(), settings.EDNS_UDP_SIZE).serve(None, F.Counters(page))


# --------------------------------------------------------------------------- wait()
# UdpServer.wait is the worker's event-loop wait (kdns/serve/worker.py UdpSelector): it
# serves the socket in C and returns only for the loop's other fds, hand-offs, a timeout.


def wait_set(lo):
    """An epoll set like the worker's loop's: kdns's socket plus a loop fd (a socketpair)."""
    ep = select.epoll()
    ep.register(lo.sock.fileno(), select.EPOLLIN)
    loop_side, poke = socket.socketpair()
    ep.register(loop_side.fileno(), select.EPOLLIN)
    return ep, loop_side, poke


def poke_after_replies(c, poke, n):
    """A thread that reads ``n`` replies, then makes the loop's fd readable: the wait must
    have answered them while blocked (it returns for the loop's fd, not for UDP)."""
    got = []

    def run():
        try:
            for _ in range(n):
                got.append(dns.message.from_wire(c.recv(65535)))
        finally:
            poke.send(b"x")
    t = threading.Thread(target=run)
    t.start()
    return t, got


def test_wait_answers_in_c_and_returns_only_for_the_loops_fds(lo):
    ep, loop_side, poke = wait_set(lo)
    c = client()
    try:
        t, got = poke_after_replies(c, poke, 3)
        for i in range(3):
            c.sendto(wire(S, qid=i), lo.addr)
        events = lo.server.wait(lo.img, lo.counters, ep.fileno(), -1)
        t.join()
        assert events == [(loop_side.fileno(), select.EPOLLIN)]
        assert sorted(m.id for m in got) == [0, 1, 2]
        assert all(m.rcode() == dns.rcode.NOERROR and m.answer for m in got)
        assert lo.server.handoffs == 0 and lo.server.last_errno == 0
        assert lo.counter("rcode_udp_0") == 3
    finally:
        c.close()
        ep.close()
        loop_side.close()
        poke.close()


def test_wait_returns_for_hand_offs_and_on_its_timeout(lo):
    ep, loop_side, poke = wait_set(lo)
    c = client()
    try:
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), 0) == []    # nothing ready
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), 2) == []    # the loop's timer
        q = wire("www.example.org.", qid=9)
        c.sendto(q, lo.addr)
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), -1) == []
        assert lo.server.handoffs == 1
        assert lo.server.handoff_packet(0) == q
        assert lo.server.handoff_addr(0) == c.getsockname()
        assert lo.server.handbacks == 0                 # no compiled forwarder here
    finally:
        c.close()
        ep.close()
        loop_side.close()
        poke.close()


def test_wait_holds_after_a_small_batch_and_never_after_a_full_one():
    lo = Loopback(batch=4)
    ep, loop_side, poke = wait_set(lo)
    c = client()
    try:
        # Four queued at once fill a batch of four: answered with no hold. The thread pokes
        # only after the replies, so the wait serves them and then blocks again.
        for i in range(4):
            c.sendto(wire(S, qid=i), lo.addr)
        t, got = poke_after_replies(c, poke, 4)
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), -1, 1000) == [
            (loop_side.fileno(), select.EPOLLIN)]
        t.join()
        assert len(got) == 4
        # (the socket may have been drained in one recvmmsg of 4, then found empty)
        assert lo.server.holds == 0
        loop_side.recv(16)
        # One query is a small batch: after answering it the wait sleeps the hold once
        # before it waits again (and then returns for the poke).
        t, got = poke_after_replies(c, poke, 1)
        c.sendto(wire(S, qid=5), lo.addr)
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), -1, 1000) == [
            (loop_side.fileno(), select.EPOLLIN)]
        t.join()
        assert [m.id for m in got] == [5]
        assert lo.server.holds == 1
    finally:
        c.close()
        ep.close()
        loop_side.close()
        poke.close()
        lo.close()


def test_wait_counts_its_wake_ups_batches_and_returns():
    """The engine's own account of a wake-up (what bench/wakeups.py compares with NSD): six
    queued queries with a batch of four are one epoll_wait return, two recvmmsg batches
    (four, then the two left) and one return to Python; an idle wait is a wake-up (its
    timeout) with no batch."""
    lo = Loopback(batch=4)
    ep, loop_side, poke = wait_set(lo)
    c = client()
    try:
        for i in range(6):
            c.sendto(wire(S, qid=i), lo.addr)
        # On loopback a datagram is in the receive queue when sendto returns (the kernel
        # delivers it inside the sender's call): all six are queued before the wait looks.
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), 0) == []
        assert (lo.server.wakeups, lo.server.batches, lo.server.datagrams,
                lo.server.waits) == (1, 2, 6, 1)
        assert sorted(dns.message.from_wire(c.recv(65535)).id for _ in range(6)) == list(range(6))
        assert lo.server.wait(lo.img, lo.counters, ep.fileno(), 0) == []
        assert (lo.server.wakeups, lo.server.batches, lo.server.datagrams,
                lo.server.waits) == (2, 2, 6, 2)
        assert lo.server.holds == 0
    finally:
        c.close()
        ep.close()
        loop_side.close()
        poke.close()
        lo.close()


def test_wait_raises_on_a_bad_epoll_fd(lo):
    with pytest.raises(OSError):
        lo.server.wait(lo.img, lo.counters, lo.sock.fileno(), 0)   # not an epoll fd


def test_a_hold_that_finds_nothing_backs_the_holds_off():
    """A lone query is held after (nothing arrives meanwhile: the client waits for its
    reply), so the next small batch answers without a hold, and the one after holds again."""
    lo = Loopback()
    ep, loop_side, poke = wait_set(lo)
    c = client()
    holds = []
    try:
        for i in range(3):
            t, got = poke_after_replies(c, poke, 1)
            c.sendto(wire(S, qid=i), lo.addr)
            assert lo.server.wait(lo.img, lo.counters, ep.fileno(), -1, 1000) == [
                (loop_side.fileno(), select.EPOLLIN)]
            t.join()
            assert [m.id for m in got] == [i]
            loop_side.recv(16)
            holds.append(lo.server.holds)
        assert holds == [1, 1, 2]
    finally:
        c.close()
        ep.close()
        loop_side.close()
        poke.close()
        lo.close()
