"""The compiled forwarder (kdns/packet/fwd.pxi + handoff.CompiledForward), driven
through a real UdpServer on loopback, with the Python Forwarder as the reference.

Each test runs a small worker harness: the client socket's queries go through
``UdpServer.serve`` (image miss, cache miss -> FwdEngine), replies come back through
``FwdEngine.drain``, and what the engine hands back goes to ``Forwarder.resolve`` with a
``Retry``. Every upstream is a TestDNSServer on loopback started by the test.
"""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from dnslib import DNSRecord

from kdns import settings
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.forward.cache import Cache, CompiledCache, key_bytes
from kdns.forward.forwarder import Forwarder, Upstream
from kdns.forward.handoff import CompiledForward, _pow2
from upstream import TestDNSServer, make_query
from zonefixtures import sample_image

if engine.IMPLEMENTATION != "compiled":
    # Under CI this fails: the compiled forwarder must be built and tested.
    from conftest import unavailable
    unavailable("the compiled forwarder needs the compiled engine (make install builds it)")

ZONE = {"widget.local.": ["A 3.3.3.3"],
        "big.local.": [f"A 10.0.0.{i}" for i in range(1, 60)],
        **{f"n{i}.local.": [f"A 10.1.0.{i}"] for i in range(64)}}


class Harness:
    """One worker's UDP path with the compiled forwarder attached (worker.py's shape)."""

    def __init__(self, loop, upstreams, *, try_timeout=2.0, max_inflight=1000, nsockets=64,
                 sweep=0.05, stubs=None, serve_stale=False):
        from kdns.packet import _fastpath
        self.loop = loop
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.addr = self.udp.getsockname()
        self.img = engine.Image(sample_image())
        self.page = bytearray(C.SLOT_WORDS * 8)
        self.counters = engine.Counters(self.page)
        self.server = engine.UdpServer(self.udp.fileno(), settings.EDNS_UDP_SIZE)
        self.udp_server = self.server
        self.fast = _fastpath.PacketCache(capacity=_pow2(1024), edns_size=settings.EDNS_UDP_SIZE)
        self.fwd_counters = C.ForwardCounters(self.page)     # as ForwardingHandoff does
        self.cache = CompiledCache(self.fast, 1024, serve_stale=serve_stale,
                                   counters=self.fwd_counters)
        self.server.set_cache(self.fast)
        self.forwarder = Forwarder([up(s) for s in upstreams], stubs or {}, cache=self.cache,
                                   try_timeout=try_timeout, max_inflight=max_inflight,
                                   counters=self.fwd_counters)
        self.tasks = set()
        self.compiled = CompiledForward(self, loop, self, nsockets=nsockets,
                                        sweep=sweep)
        loop.add_reader(self.udp.fileno(), self.drain_udp)

    # the bits of ForwardingHandoff / Worker that CompiledForward uses
    def serve_udp(self):
        return self.server.serve(self.img, self.counters)

    def drain_udp(self):
        n = self.serve_udp()
        for i in range(n):
            self.spawn(self.server.handoff_packet(i), self.server.handoff_addr(i), None)

    def udp_retry(self, packet, addr, retry, received_ns=None):
        self.spawn(packet, addr, retry)

    def spawn(self, packet, addr, retry):
        async def run():
            reply = await self.forwarder.resolve(packet, "udp", retry)
            if reply is not None:
                self.udp.sendto(reply, addr)
        t = self.loop.create_task(run())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def close(self):
        self.loop.remove_reader(self.udp.fileno())
        self.compiled.close()
        self.udp.close()

    def stats(self):
        return self.compiled.engine.stats()

    async def ask(self, query: bytes, timeout: float = 5.0) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.setblocking(False)
            c.connect(self.addr)
            c.send(query)
            return await asyncio.wait_for(self.loop.sock_recv(c, 65535), timeout)


def up(s: TestDNSServer) -> Upstream:
    return Upstream(s.host, s.port)


def client_queries(s: TestDNSServer) -> int:
    """What the server was asked over UDP but health checks (`. NS`, Forwarder.health_check)."""
    return sum(1 for name, qtype, proto in list(s.queries)
               if proto == "udp" and (name, qtype) != (".", "NS"))


def run_with(upstreams, body, limit=15.0, **kw):
    async def main():
        h = Harness(asyncio.get_running_loop(), upstreams, **kw)
        try:
            return await asyncio.wait_for(body(h), limit)
        finally:
            h.close()
    return asyncio.run(main())


def answers(reply: bytes) -> list[str]:
    return sorted(str(r.rdata) for r in DNSRecord.parse(reply).rr)


async def until(cond, limit=3.0):
    for _ in range(int(limit / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_plain_forward_is_relayed_by_c_and_cached():
    with TestDNSServer(ZONE) as s:
        async def body(h):
            reply = await h.ask(make_query("widget.local", qid=77))
            assert answers(reply) == ["3.3.3.3"]
            assert h.stats()["relayed"] == 1
            assert h.forwarder.inflight == 0            # no Python task was involved
            # The reply went into the compiled cache: the next ask is a hit.
            await h.ask(make_query("widget.local", qid=78))
            assert s.udp_queries == 1
        run_with([s], body)


def test_client_id_and_case_restored_upstream_sees_our_id():
    with TestDNSServer(ZONE) as s:
        async def body(h):
            q = make_query("WiDgEt.LoCaL", qid=0x4242)
            reply = await h.ask(q)
            assert reply[:2] == b"\x42\x42"
            assert reply[12:12 + 18] == q[12:12 + 18]          # the question as sent
            sent, _ = s.raw[0]
            assert sent[12:30] == q[12:30]                      # case preserved upstream
            seen = len(s.raw)
            for i in range(16):
                await h.ask(make_query(f"n{i}.local", qid=7))
            # Every upstream query since (not raw[-1] after each ask: under load a late
            # duplicate or a retry can be the last one recorded).
            ids = {data[:2] for data, _ in s.raw[seen:]}
            assert len(ids) >= 12                               # fresh random ID per query
        run_with([s], body)


def test_source_ports_vary_across_queries():
    with TestDNSServer(ZONE) as s:
        async def body(h):
            for i in range(24):
                await h.ask(make_query(f"n{i}.local", qid=i))
            ports = {addr[1] for _, addr in s.raw}
            assert len(ports) >= 10                             # 24 draws from 64 sockets
        run_with([s], body)


def test_ports_rotate():
    with TestDNSServer(ZONE) as s:
        async def body(h):
            before = {so.getsockname()[1] for so in h.compiled.socks}
            # One socket rotates per sweep (0.05 s here): five new ports take five sweeps;
            # until() allows 60 (a loaded machine delays the sweeps, never skips them).
            await until(lambda: len({so.getsockname()[1] for so in h.compiled.socks}
                                    - before) >= 5)
            assert answers(await h.ask(make_query("widget.local"))) == ["3.3.3.3"]
        run_with([s], body, nsockets=8)


def test_forged_replies_dropped_and_counted_by_c():
    with TestDNSServer(ZONE) as s:
        s.silent = True
        async def body(h):
            q = make_query("widget.local", qid=9)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.setblocking(False)
                c.connect(h.addr)
                c.send(q)
                await until(lambda: s.raw)
                sent, ours = s.raw[0]
                good = s.answer(sent).pack()
                wrong_id = struct.pack("!H", (struct.unpack_from("!H", good)[0] + 1) & 0xFFFF) \
                    + good[2:]
                other = s.answer(make_query("n1.local", qid=struct.unpack_from("!H", sent)[0]))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as port_s, \
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as addr_s:
                    port_s.bind(("127.0.0.1", 0))
                    addr_s.bind(("127.0.0.2", s.port))
                    s.udp.sendto(wrong_id, ours)                # wrong ID
                    s.udp.sendto(other.pack(), ours)            # wrong question
                    port_s.sendto(good, ours)                   # wrong source port
                    addr_s.sendto(good, ours)                   # wrong source address
                    await until(lambda: (h.stats()["forged"] +
                                         h.stats()["upstreams"][0]["forged"]) >= 4)
                    s.udp.sendto(good, ours)                    # the real one
                    reply = await asyncio.wait_for(h.loop.sock_recv(c, 65535), 5)
            assert reply[:2] == q[:2] and answers(reply) == ["3.3.3.3"]
            st = h.stats()
            assert st["forged"] == 1                             # no such (socket, ID)
            assert st["upstreams"][0]["forged"] == 3             # question, port, address
        run_with([s], body)


def test_timeout_on_first_upstream_fails_over():
    with TestDNSServer() as dead, TestDNSServer(ZONE) as good:
        dead.silent = True
        async def body(h):
            replies = await asyncio.gather(*(h.ask(make_query(f"n{i}.local", qid=i))
                                             for i in range(12)))
            assert [answers(r) for r in replies] == [[f"10.1.0.{i}"] for i in range(12)]
            st = h.stats()
            assert st["upstreams"][0]["timeouts"] >= 1          # C sent some to the dead one
            # Python did not re-ask it (a health check, `. NS`, is no client query).
            assert client_queries(dead) == st["upstreams"][0]["queries"]
        run_with([dead, good], body, try_timeout=0.3)


def test_truncated_reply_retried_over_tcp():
    with TestDNSServer(ZONE) as s:
        s.truncate = True
        async def body(h):
            reply = await h.ask(make_query("widget.local", qid=5, edns=1232))
            assert answers(reply) == ["3.3.3.3"] and not DNSRecord.parse(reply).header.tc
            assert (s.udp_queries, s.tcp_queries) == (1, 1)     # C's UDP try, Python's TCP
            assert h.forwarder.tcp_retries == 1
        run_with([s], body)


def test_identical_questions_coalesced_in_c():
    with TestDNSServer(ZONE) as s:
        s.delay = 0.2
        async def body(h):
            replies = await asyncio.gather(*(h.ask(make_query("WIDGET.local", qid=100 + i))
                                             for i in range(3)))
            assert sorted(r[:2] for r in replies) == [struct.pack("!H", 100 + i)
                                                      for i in range(3)]
            assert all(answers(r) == ["3.3.3.3"] for r in replies)
            assert s.udp_queries == 1 and h.stats()["coalesced"] == 2
        run_with([s], body)


def test_inflight_bound_counts_compiled_queries():
    with TestDNSServer(ZONE) as s:
        s.delay = 0.3
        async def body(h):
            replies = await asyncio.gather(*(h.ask(make_query(f"n{i}.local", qid=i))
                                             for i in range(3)))
            rcodes = sorted(DNSRecord.parse(r).header.rcode for r in replies)
            assert rcodes == [0, 0, 5]                           # third: REFUSED
            assert h.forwarder.refused_inflight == 1
        run_with([s], body, max_inflight=2)


def test_stub_domains_stay_in_python():
    with TestDNSServer(ZONE) as s, TestDNSServer({"abc.acme.local.": ["A 1.1.1.1"]}) as stub:
        async def body(h):
            assert answers(await h.ask(make_query("abc.acme.local"))) == ["1.1.1.1"]
            assert h.stats()["relayed"] == 0 and s.udp_queries == 0
            assert answers(await h.ask(make_query("widget.local"))) == ["3.3.3.3"]
            assert h.stats()["relayed"] == 1
        run_with([s], body, stubs={"acme.local": [up(stub)]})


@pytest.mark.parametrize("name,qtype,edns,do", [
    ("widget.local", "A", None, False),
    ("WIDGET.local", "A", 1232, True),
    ("big.local", "A", None, False),          # cut to 512 with TC
    ("big.local", "A", 700, False),           # cut to 700 with TC
    ("big.local", "A", 4096, False),          # whole (1232 cap)
    ("missing.local", "A", 1232, False),      # NXDOMAIN + SOA
    ("widget.local", "AAAA", None, False),    # NODATA + SOA
])
def test_same_bytes_as_the_python_forwarder(name, qtype, edns, do):
    """The relayed reply is byte-for-byte what Forwarder._from_upstream + fit produce."""
    with TestDNSServer(ZONE) as s:
        async def body(h):
            q = make_query(name, qtype, qid=0x3131, edns=edns, do=do)
            got = await h.ask(q)
            ref = Forwarder([up(s)], cache=Cache())
            want = await ref.resolve(q, "udp")
            assert got == want
            assert h.stats()["relayed"] == 1
        run_with([s], body)


def test_servfail_handed_back_and_relayed():
    with TestDNSServer(ZONE) as s:
        s.rcode = 2
        async def body(h):
            reply = await h.ask(make_query("widget.local"))
            assert DNSRecord.parse(reply).header.rcode == 2
            assert h.stats()["relayed"] == 0
        run_with([s], body)


@pytest.mark.parametrize("name,qtype", [("widget.local", "A"), ("missing.local", "A"),
                                        ("widget.local", "AAAA"), ("n3.local", "A")])
def test_c_cache_store_matches_python_cache(name, qtype):
    """C stores relayed replies in the compiled cache with cache.Cache.put's rules and form:
    the next hit renders the same bytes as Python's Cache would."""
    with TestDNSServer(ZONE) as s:
        async def body(h):
            await h.ask(make_query(name, qtype, qid=1, edns=1232))
            assert h.stats()["cached"] == 1 and len(h.cache) == 1 and not h.cache.entries
            again = make_query(name.upper(), qtype, qid=2, edns=1232)
            action, got = h.fast.answer(again)
            ref = Forwarder([up(s)], cache=Cache())
            await ref.resolve(make_query(name, qtype, qid=1, edns=1232), "udp")
            want = await ref.resolve(again, "udp")
            assert action == engine.SEND and got == want
        run_with([s], body)


def test_tcp_client_gets_what_c_cached_for_a_udp_client():
    """One cache: the reply C relayed and stored answers the Forwarder's TCP client, with
    no second upstream query (each side once kept its own copy and asked again)."""
    with TestDNSServer(ZONE) as s:
        async def body(h):
            await h.ask(make_query("widget.local", qid=1))
            assert h.stats()["cached"] == 1
            reply = await h.forwarder.resolve(make_query("widget.local", qid=2), "tcp")
            assert answers(reply) == ["3.3.3.3"] and reply[:2] == b"\x00\x02"
            assert (s.udp_queries, s.tcp_queries) == (1, 0) and h.cache.hits == 1
        run_with([s], body)


def test_serve_stale_reads_the_entry_c_stored():
    """RFC 8767: with every upstream silent, an expired entry in the compiled table is
    served stale by the Forwarder (the compiled path never serves an expired entry)."""
    with TestDNSServer(ZONE) as s:
        async def body(h):
            await h.ask(make_query("widget.local", qid=1))
            q = h.forwarder
            key = (b"\x06widget\x05local\x00", 1, 1, 0, 0)
            e = h.cache.get(key)
            # The same entry, stored long enough ago to have expired.
            h.fast.put(key_bytes(key), e.wire, e.qend, e.ttl_offs, e.ttls, e.ttl,
                       e.stored - e.ttl - 1)
            s.silent = True
            reply = await h.ask(make_query("widget.local", qid=3))
            assert answers(reply) == ["3.3.3.3"] and q.stale_served == 1
            assert DNSRecord.parse(reply).rr[0].ttl == 30          # RFC 8767 §4
        run_with([s], body, serve_stale=True, try_timeout=0.2)


def test_a_burst_spread_over_sockets_is_sent_and_matched_exactly():
    """Many queries in one receive batch: each goes out once, on its own socket and ID
    (regression: regrouped send headers once pointed at another query's buffer)."""
    names = {f"b{i}.local.": [f"A 10.2.{i >> 8}.{i & 255}"] for i in range(200)}
    with TestDNSServer(names) as s:
        async def body(h):
            for _ in range(3):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                    c.setblocking(False)
                    c.connect(h.addr)
                    base = len(s.raw)
                    for i in range(64):
                        c.send(make_query(f"b{base + i}.local", qid=i))
                    got = {}
                    while len(got) < 64:
                        r = await asyncio.wait_for(h.loop.sock_recv(c, 65535), 5)
                        got[struct.unpack_from("!H", r)[0]] = answers(r)
                for i in range(64):
                    n = base + i
                    assert got[i] == [f"10.2.{n >> 8}.{n & 255}"]
            st = h.stats()
            assert st["forged"] == 0 and st["relayed"] == 192 and s.udp_queries == 192
        run_with([s], body)


def test_both_forwarders_count_into_the_workers_page():
    """The compiled forwarder and the Python Forwarder count into the same rows of the
    worker's page as they go (nothing copies counters later): what the upstream received
    is what the page says was sent."""
    with TestDNSServer(ZONE) as s:
        async def body(h):
            await h.ask(make_query("n1.local", qid=1))                  # C: miss, relay, store
            await h.forwarder.resolve(make_query("n2.local", qid=2), "tcp")   # Python: same
            await h.forwarder.resolve(make_query("n1.local", qid=3), "tcp")   # Python: hit
            page = C.forward_totals(h.page, 1)
            (row,) = page["upstreams"]
            assert row["to"] == f"{s.host}:{s.port}"
            assert row["requests"] == s.udp_queries == 2
            assert row["rcodes"]["NOERROR"] == 2 and sum(row["latency"]) == 2
            assert row["latency_sum_ns"] > 0 and row["failures"] == 0
            assert (page["cache_misses"], page["cache_hits"]) == (2, 1)
            assert (page["cache_inserts"], page["cache_entries"]) == (2, 2)
            assert page["cache_capacity"] == 1024
        run_with([s], body)


def test_compiled_timeouts_are_failures_on_the_page():
    with TestDNSServer() as dead, TestDNSServer(ZONE) as good:
        dead.silent = True
        async def body(h):
            await asyncio.gather(*(h.ask(make_query(f"n{i}.local", qid=i)) for i in range(8)))
            rows = {r["to"]: r for r in C.forward_totals(h.page, 1)["upstreams"]}
            failed = rows[f"{dead.host}:{dead.port}"]
            assert failed["requests"] == client_queries(dead) >= 1
            # Each C timeout is a failure, and so is each health check of the dead one
            # that has timed out (one may still be waiting).
            timeouts = h.stats()["upstreams"][0]["timeouts"]
            checks = dead.udp_queries - client_queries(dead)
            assert timeouts >= 1 and timeouts <= failed["failures"] <= timeouts + checks
            assert rows[f"{good.host}:{good.port}"]["requests"] == good.udp_queries
        run_with([dead, good], body, try_timeout=0.3)


# bad.example.org A whose answer owner is a pointer to 0x3fff, past the message's end.
BAD_POINTER = bytes.fromhex("43218180000100010000000003626164076578616d706c65036f72670000010001"
                            "ffff000100010000012c000401020304")


def test_reply_with_a_pointer_out_of_the_message_is_dropped_not_cached():
    """RFC 1035 §4.1.4: C hands it back, Python drops it too; SERVFAIL, nothing cached."""
    with TestDNSServer() as s:
        s.reply_bytes = BAD_POINTER
        async def body(h):
            h.forwarder.deadline = 1.0
            reply = await h.ask(make_query("bad.example.org"))
            assert DNSRecord.parse(reply).header.rcode == 2
            assert h.stats()["relayed"] == 0
            got = h.fast.lookup(key_bytes((b"\x03bad\x07example\x03org\x00", 1, 1, 0, 0)))
            # At most the resolution failure (RFC 9520), never the reply's bytes.
            assert got is None or (got[0][3] & 0xF == 2 and got[0][6:12] == bytes(6))
        run_with([s], body)


def test_bad_pointer_reply_fails_over_to_the_next_upstream():
    with TestDNSServer() as bad, TestDNSServer({"bad.example.org.": ["A 5.6.7.8"]},
                                               host="127.0.0.2") as good:
        bad.reply_bytes = BAD_POINTER
        async def body(h):
            h.forwarder.random_start = False
            h.compiled.engine.set_routes([bad.address], [], [h.forwarder.stats_for(up(bad)).row])
            h.compiled.routes = [up(bad)]
            reply = await h.ask(make_query("bad.example.org"))
            assert answers(reply) == ["5.6.7.8"]
        run_with([bad, good], body)


def test_closed_port_is_handed_back_on_the_icmp_error_not_the_timeout():
    """RFC 1122 §4.1.3.3: the ICMP port unreachable ends C's try at once (IP_RECVERR);
    with 60 s tries only that can answer the client within the test's limit."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = Upstream("127.0.0.1", s.getsockname()[1])

    class Dead:                      # what Harness reads of a server
        host, port = dead

    async def body(h):
        reply = await h.ask(make_query("gone.example"), timeout=10)
        assert DNSRecord.parse(reply).header.rcode == 2
        st = h.forwarder.stats_for(dead)
        assert st.unreachable >= 1 and st.timeouts == 0 and h.forwarder.timeouts == 0
    run_with([Dead], body, try_timeout=60)



def test_python_verdicts_reach_the_compiled_pick():
    """A try the Forwarder saw fail marks the upstream down in C too: new queries go to
    the other; its answer marks it live again."""
    with TestDNSServer(ZONE) as a, TestDNSServer(ZONE) as b:
        async def body(h):
            st = h.forwarder.stats_for(up(a))
            st.failed(up(a), "timeout")
            assert h.compiled.engine.down() == [True, False]
            for i in range(32):
                assert answers(await h.ask(make_query(f"n{i}.local", qid=i))) == [f"10.1.0.{i}"]
            assert a.udp_queries == 0 and b.udp_queries == 32
            st.answered(up(a))
            assert h.compiled.engine.down() == [False, False]
        run_with([a, b], body)


def test_every_upstream_down_still_tries_them_sequential_the_first():
    with TestDNSServer(ZONE) as a, TestDNSServer(ZONE) as b:
        async def body(h):
            h.forwarder.policy = "sequential"
            h.compiled.apply_routes()
            for u in (a, b):
                h.forwarder.stats_for(up(u)).failed(up(u), "timeout")
            assert h.compiled.engine.down() == [True, True]
            for i in range(8):
                assert answers(await h.ask(make_query(f"n{i}.local", qid=i))) == [f"10.1.0.{i}"]
            assert (a.udp_queries, b.udp_queries) == (8, 0)
            assert h.compiled.engine.down() == [False, True]      # a's replies: live again
            # The first query found both down (CoreDNS's healthcheck_broken); a's reply
            # brought it back before the second.
            assert C.forward_totals(h.page, 1)["all_down"] == 1
            h.forwarder.stats_for(up(a)).failed(up(a), "timeout")
            h.forwarder.stats_for(up(b)).answered(up(b))
            await h.ask(make_query("n9.local", qid=9))
            assert (a.udp_queries, b.udp_queries) == (8, 1)       # the first live one
        run_with([a, b], body)


def test_a_sporadic_loss_is_no_health_check_failure(monkeypatch):
    """CoreDNS's meaning of coredns_forward_healthcheck_failures_total: one lost query
    marks the upstream down, its health check answers, and nothing is counted as a failed
    health check (the failed try is, on its own word); the alert on that series does not
    fire on ordinary timeouts."""
    monkeypatch.setattr(settings, "HEALTH_CHECK_MIN", 0.05)
    with TestDNSServer(ZONE) as a, TestDNSServer(ZONE) as b:
        a.drop_next = 1
        async def body(h):
            h.forwarder.policy = "sequential"
            h.compiled.apply_routes()
            assert answers(await h.ask(make_query("n1.local", qid=1))) == ["10.1.0.1"]
            assert h.compiled.engine.down() == [True, False]
            await until(lambda: h.compiled.engine.down() == [False, False])
            row = {r["to"]: r for r in C.forward_totals(h.page, 1)["upstreams"]}[
                f"{a.host}:{a.port}"]
            assert (row["failures"], row["health_check_failures"]) == (1, 0)
            assert C.forward_totals(h.page, 1)["all_down"] == 0
        run_with([a, b], body, try_timeout=0.2)


def test_a_down_upstream_gets_health_checks_and_comes_back(monkeypatch):
    """Down, it gets no client query but `. NS` health checks, which are no requests on
    its row but failures while it is silent; once it answers one it is used again."""
    monkeypatch.setattr(settings, "HEALTH_CHECK_MIN", 0.05)
    with TestDNSServer(ZONE) as a, TestDNSServer(ZONE) as b:
        a.silent = True
        async def body(h):
            h.forwarder.policy = "sequential"
            h.compiled.apply_routes()
            assert answers(await h.ask(make_query("n1.local", qid=1))) == ["10.1.0.1"]
            assert h.compiled.engine.down() == [True, False]      # C's own timeout
            await until(lambda: sum(q[:2] == (".", "NS") for q in a.queries) >= 2)
            row = {r["to"]: r for r in C.forward_totals(h.page, 1)["upstreams"]}[
                f"{a.host}:{a.port}"]
            # The client query's try failed once; the silent checks are health-check
            # failures (coredns_forward_healthcheck_failures_total), not tries or requests.
            assert row["requests"] == 1 and row["failures"] == 1
            assert row["health_check_failures"] >= 1
            assert [q[0] for q in a.queries if q[1] != "NS"] == ["n1.local."]
            a.silent = False
            await until(lambda: h.compiled.engine.down() == [False, False])
            assert not h.forwarder.stats_for(up(a)).failing
            assert answers(await h.ask(make_query("n2.local", qid=2))) == ["10.1.0.2"]
            assert [q[0] for q in a.queries if q[1] != "NS"] == ["n1.local.", "n2.local."]
        run_with([a, b], body, try_timeout=0.2)


# ---- a real kdns: the compiled path learns a blackholed upstream ----------------------------

from serverutil import Kdns  # noqa: E402


def _names(server: TestDNSServer, prefix: str) -> list[str]:
    """The test's own names this upstream was asked (health checks have other names)."""
    return [q[0] for q in list(server.queries) if q[0].startswith(prefix)]


def _ask_all(k: Kdns, names: list[str], timeout: float = 15.0) -> dict[str, list[str]]:
    """Every name asked at once from one socket (so one worker: SO_REUSEPORT hashes the
    4-tuple); the addresses of each reply, by name."""
    import dns.message
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(timeout)
        c.connect((k.host, k.port))
        for i, n in enumerate(names):
            q = dns.message.make_query(n, "A", id=i)
            c.send(q.to_wire())
        got: dict[str, list[str]] = {}
        while len(got) < len(names):
            m = dns.message.from_wire(c.recv(65535))
            got[names[m.id]] = sorted(r.to_text() for rr in m.answer for r in rr)
        return got


def _learn(k: Kdns, dead: TestDNSServer, prefix: str) -> None:
    """Ask distinct names one at a time until a try at the dead upstream has failed (its
    failed-tries counter, which the worker counts as it marks it down; a query only handed
    back by a reconfiguration is no failure) and the query was answered after the failover."""
    key = ("kdns_forward_failed_tries_total",
           frozenset({("to", f"{dead.host}:{dead.port}")}))
    for i in range(64):
        name = f"{prefix}{i}.fwd.example."
        assert _ask_all(k, [name]) == {name: [f"192.0.2.{i}"]}
        if k.metrics().get(key, 0) >= 1:
            return
    raise AssertionError("no try at the dead upstream failed")


FWD_ZONE = {**{f"learn{i}.fwd.example.": [f"A 192.0.2.{i}"] for i in range(64)},
            **{f"after{i}.fwd.example.": [f"A 198.51.100.{i}"] for i in range(64)},
            **{f"back{i}.fwd.example.": [f"A 203.0.113.{i}"] for i in range(200)}}


@pytest.mark.parametrize("policy", ["random", "sequential"])
def test_a_blackholed_upstream_is_skipped_by_the_compiled_path(tmp_path, policy):
    """A dead upstream that drops packets (no ICMP: only the try timeout tells) is marked
    down after its first failed try, and the compiled path sends it nothing more while the
    other answers: no query pays a try timeout again. ``sequential`` with the dead one
    first goes to the second."""
    with TestDNSServer() as dead, TestDNSServer(FWD_ZONE) as good:
        dead.silent = True
        ups = f"{dead.host}:{dead.port},{good.host}:{good.port}"     # the dead one first
        k = Kdns(tmp_path, image=sample_image(), workers=1,
                 args=("--nameservers", ups, "--forward-policy", policy))
        k.start()
        try:
            _learn(k, dead, "learn")
            names = [f"after{i}.fwd.example." for i in range(48)]
            got = _ask_all(k, names)
            assert got == {n: [f"198.51.100.{i}"] for i, n in enumerate(names)}
            assert _names(dead, "after") == []                    # nothing more to the dead one
            assert sorted(_names(good, "after")) == sorted(names)  # each asked once, by C
        finally:
            k.stop()
