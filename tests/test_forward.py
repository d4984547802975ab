"""Forwarder against real DNS servers started by the tests on loopback (tests/upstream.py).

Nothing here talks to the machine's resolvers: every Forwarder gets explicit loopback
upstreams. Timeouts are shortened through parameters so each test takes well under 5 s.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import struct
import time

import pytest

from conftest import unavailable
from dnslib import QTYPE, RCODE, DNSRecord

from kdns.forward.cache import Cache
from kdns.forward.forwarder import PROBE_ZONE, Forwarder, Upstream, random_port_socket
from kdns.forward.kubedns_config import ConfigDirWatcher, effective_upstreams, parse_resolv_conf
from tests.upstream import TestDNSServer, make_query

pytestmark = pytest.mark.timeout(20)

FAST = dict(try_timeout=0.3, deadline=0.9, random_start=False)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Guard: the forwarder under test may only ever talk to loopback addresses."""
    for name in ("_udp", "_tcp"):
        original = getattr(Forwarder, name)

        def guarded(self, host, port, *args, _original=original):
            assert ipaddress.ip_address(host).is_loopback, f"test sent to {host}"
            return _original(self, host, port, *args)
        monkeypatch.setattr(Forwarder, name, guarded)


def run(coro, limit: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


def up(server: TestDNSServer) -> Upstream:
    return Upstream(*server.address)


def parse(reply: bytes) -> DNSRecord:
    return DNSRecord.parse(reply)


def answers(reply: bytes) -> list[str]:
    return [str(r.rdata) for r in parse(reply).rr]


async def ask(fwd: Forwarder, name: str, qtype: str = "A", proto: str = "udp", **kw) -> DNSRecord:
    return parse(await fwd.resolve(make_query(name, qtype, **kw), proto))


# ---- kube-dns conformance scenarios ------------------------------------------------

def test_conformance_stub_domain_upstreams_and_ptr(tmp_path):
    """The three kube-dns e2e scenarios, configured the kube-dns way: a ConfigMap directory."""
    acme = TestDNSServer({"abc.acme.local.": ["A 1.1.1.1"], "def.acme.local.": ["A 2.2.2.2"]},
                         host="127.0.0.2")
    upstream = TestDNSServer({"widget.local.": ["A 3.3.3.3"],
                              "123.2.0.192.in-addr.arpa.": ["PTR my.test."]}, host="127.0.0.3")
    with acme, upstream:
        (tmp_path / "stubDomains").write_text(
            '{"acme.local": ["%s:%d"]}' % acme.address)
        (tmp_path / "upstreamNameservers").write_text('["%s:%d"]' % upstream.address)
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.9\n")        # must lose to upstreamNameservers

        async def main():
            fwd = Forwarder(**FAST)

            def apply(cfg):
                fwd.configure(effective_upstreams(cfg, parse_resolv_conf(str(resolv)), ()),
                              cfg.stub_domains)
            assert ConfigDirWatcher(str(tmp_path), apply).poll_once()
            abc = await ask(fwd, "abc.acme.local")
            dfn = await ask(fwd, "def.acme.local")
            widget = await ask(fwd, "widget.local")
            ptr = await ask(fwd, "123.2.0.192.in-addr.arpa", "PTR")
            return abc, dfn, widget, ptr
        abc, dfn, widget, ptr = run(main())
        assert [str(r.rdata) for r in abc.rr] == ["1.1.1.1"]
        assert [str(r.rdata) for r in dfn.rr] == ["2.2.2.2"]
        assert [str(r.rdata) for r in widget.rr] == ["3.3.3.3"]
        assert [str(r.rdata) for r in ptr.rr] == ["my.test."]
        assert acme.udp_queries == 2 and upstream.udp_queries == 2


# ---- routing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expect", [
    ("x.deep.acme.local", "deep"),          # longest suffix wins
    ("x.acme.local", "acme"),
    ("acme.local", "acme"),                 # the domain itself
    ("x.notacme.local", "default"),         # suffix match is by whole labels
    ("X.DEEP.ACME.LOCAL", "deep"),          # case-insensitive
    ("example.com", "default"),
])
def test_stub_domain_routing_and_precedence(name, expect):
    servers = {k: TestDNSServer({f"{name}.": [f"TXT {k}"]}, host=h)
               for k, h in (("deep", "127.0.0.4"), ("acme", "127.0.0.5"), ("default", "127.0.0.6"))}
    with contextlib.ExitStack() as stack:
        for s in servers.values():
            stack.enter_context(s)
        fwd = Forwarder([up(servers["default"])], {"acme.local": [up(servers["acme"])],
                                                   "deep.acme.local.": [up(servers["deep"])]},
                        **FAST)
        rec = run(ask(fwd, name, "TXT"))
        assert [str(r.rdata) for r in rec.rr] == [f'"{expect}"']
        assert [k for k, s in servers.items() if s.udp_queries] == [expect]


def test_reconfigure_swaps_routes():
    with TestDNSServer({"a.test.": ["A 1.0.0.1"]}) as one, \
            TestDNSServer({"a.test.": ["A 1.0.0.2"]}, host="127.0.0.2") as two:
        async def main():
            fwd = Forwarder([up(one)], **FAST)
            first = answers(await fwd.resolve(make_query("a.test"), "udp"))
            fwd.configure([up(two)], {})
            return first, answers(await fwd.resolve(make_query("a.test"), "udp"))
        assert run(main()) == (["1.0.0.1"], ["1.0.0.2"])


# ---- failover, deadline ------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["silent", "slow"])
def test_failover_when_first_upstream_dead_or_slow(failure):
    with TestDNSServer({"a.test.": ["A 9.9.9.1"]}) as bad, \
            TestDNSServer({"a.test.": ["A 9.9.9.2"]}, host="127.0.0.2") as good:
        if failure == "silent":
            bad.silent = True
        else:
            bad.delay = 0.6          # longer than the 0.3 s per-try timeout
        fwd = Forwarder([up(bad), up(good)], **FAST)
        rec = run(ask(fwd, "a.test"))
        assert [str(r.rdata) for r in rec.rr] == ["9.9.9.2"]
        # One per-try timeout, then success (counted, not timed: a loaded machine is slow).
        assert bad.udp_queries == 1 and good.udp_queries == 1
        assert fwd.timeouts == 1 and fwd.per_upstream[str(up(bad))].timeouts == 1


def test_random_start_spreads_load_over_upstreams():
    with TestDNSServer({"a.test.": ["A 9.9.9.1"]}) as a, \
            TestDNSServer({"a.test.": ["A 9.9.9.1"]}, host="127.0.0.2") as b:
        fwd = Forwarder([up(a), up(b)], try_timeout=0.3, deadline=0.9)

        async def main():
            for i in range(40):
                await fwd.resolve(make_query("a.test", qid=i), "udp")
        run(main())
        assert a.udp_queries + b.udp_queries == 40 and a.udp_queries and b.udp_queries


def test_servfail_from_one_upstream_moves_to_the_next():
    with TestDNSServer() as broken, \
            TestDNSServer({"a.test.": ["A 9.9.9.2"]}, host="127.0.0.2") as good:
        broken.rcode = RCODE.SERVFAIL
        fwd = Forwarder([up(broken), up(good)], **FAST)
        assert answers(run(fwd.resolve(make_query("a.test"), "udp"))) == ["9.9.9.2"]


def test_servfail_relayed_when_every_upstream_says_so():
    with TestDNSServer() as broken:
        broken.rcode = RCODE.SERVFAIL
        fwd = Forwarder([up(broken)], **FAST)
        assert parse(run(fwd.resolve(make_query("a.test"), "udp"))).header.rcode == RCODE.SERVFAIL


def test_overall_deadline_gives_servfail():
    with TestDNSServer() as a, TestDNSServer(host="127.0.0.2") as b:
        a.silent = b.silent = True
        fwd = Forwarder([up(a), up(b)], try_timeout=0.3, deadline=0.8, random_start=False)
        t0 = time.monotonic()
        rec = run(ask(fwd, "a.test", qid=77))
        elapsed = time.monotonic() - t0
        assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 77 and rec.header.ra
        # Not given up before the deadline (a lower bound: load only adds to it) ...
        assert elapsed >= 0.8 - 0.05
        # ... and the deadline ends it, not 2 rounds × 2 upstreams × try_timeout: a third try
        # (due 0.6 s in, later on a loaded machine) is cut short and no fourth is sent.
        assert a.udp_queries + b.udp_queries in (2, 3), (a.udp_queries, b.udp_queries)
        assert fwd.failures == 1 and fwd.timeouts >= 2 and fwd.responses == {2: 1}


def test_default_deadline_is_under_five_seconds():
    fwd = Forwarder()
    assert fwd.deadline < 5 and fwd.try_timeout == 2.0 and fwd.edns_size == 1232


def test_no_upstreams_gives_servfail():
    fwd = Forwarder(**FAST)
    assert parse(run(fwd.resolve(make_query("a.test"), "udp"))).header.rcode == RCODE.SERVFAIL


# ---- spoofing resistance (RFC 5452) ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["id", "question", "port"])
def test_forged_replies_are_dropped_and_counted(kind):
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        s.forge = {kind}
        fwd = Forwarder([up(s)], **FAST)
        rec = run(ask(fwd, "a.test"))
        assert [str(r.rdata) for r in rec.rr] == ["9.9.9.9"]
        assert fwd.forged == 1 and fwd.per_upstream[str(up(s))].forged == 1


def test_only_forged_replies_means_servfail():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        s.forge, s.forge_only = {"id", "question", "port"}, True
        fwd = Forwarder([up(s)], **FAST)
        rec = run(ask(fwd, "a.test"))
        assert rec.header.rcode == RCODE.SERVFAIL and not rec.rr
        assert fwd.forged >= 3


def test_each_try_uses_a_fresh_port_and_id_and_edns_1232():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        fwd = Forwarder([up(s)], **FAST)

        async def main():
            for i in range(6):
                await fwd.resolve(make_query(f"n{i}.test", qid=5), "udp")
        run(main())
        ports = {addr[1] for _, addr in s.raw}
        ids = {struct.unpack_from("!H", q)[0] for q, _ in s.raw}
        assert len(ports) == 6 and len(ids) >= 5       # the client's ID 5 is not reused
        for q, _ in s.raw:
            rec = DNSRecord.parse(q)
            assert rec.header.rd and [o.edns_len for o in rec.ar if o.rtype == QTYPE.OPT] == [1232]


def test_random_port_socket_binds_high_ports():
    ports = set()
    for _ in range(5):
        s = random_port_socket(2)
        ports.add(s.getsockname()[1])
        s.close()
    assert all(p >= 1024 for p in ports) and len(ports) > 1


# ---- transports and sizes ----------------------------------------------------------------------

BIG = {"big.test.": [f"A 10.0.{i // 250}.{i % 250}" for i in range(100)],    # ~1.6 kB
       "mid.test.": [f"A 10.1.0.{i}" for i in range(50)]}                     # ~0.8 kB


def test_truncated_upstream_reply_retried_over_tcp():
    with TestDNSServer(BIG) as s:
        s.truncate = True
        fwd = Forwarder([up(s)], **FAST)
        rec = run(ask(fwd, "mid.test", proto="tcp"))
        assert len(rec.rr) == 50 and not rec.header.tc
        assert s.udp_queries == 1 and s.tcp_queries == 1 and fwd.tcp_retries == 1


def test_tcp_client_gets_the_whole_answer_udp_client_gets_tc():
    with TestDNSServer(BIG) as s:
        fwd = Forwarder([up(s)], cache=Cache(), **FAST)

        async def main():
            tcp = await fwd.resolve(make_query("big.test", qid=1), "tcp")
            udp = await fwd.resolve(make_query("big.test", qid=2), "udp")
            edns = await fwd.resolve(make_query("big.test", qid=3, edns=1232), "udp")
            return tcp, udp, edns
        tcp, udp, edns = run(main())
        assert len(parse(tcp).rr) == 100 and not parse(tcp).header.tc and len(tcp) > 1232
        assert len(udp) <= 512 and parse(udp).header.tc and 0 < len(parse(udp).rr) < 100
        assert len(edns) <= 1232 and parse(edns).header.tc
        assert [o.edns_len for o in parse(edns).ar] == [1232]
        # The upstream's UDP answer was truncated (over 1232), so the forwarder used TCP once;
        # the later clients were answered from the cache.
        assert s.udp_queries == 1 and s.tcp_queries == 1


def test_reply_keeps_client_id_case_and_rd():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        fwd = Forwarder([up(s)], **FAST)
        q = DNSRecord.question("A.TeSt", "A")
        q.header.id, q.header.rd = 4242, 0
        rec = parse(run(fwd.resolve(bytes(q.pack()), "udp")))
        assert rec.header.id == 4242 and rec.header.rd == 0 and str(rec.q.qname) == "A.TeSt."
        assert [str(r.rdata) for r in rec.rr] == ["9.9.9.9"]
        assert not rec.ar                 # no OPT for a client that sent none (RFC 6891 §7)


def test_non_in_class_is_forwarded():
    with TestDNSServer() as s:
        s.rcode = RCODE.NOERROR
        fwd = Forwarder([up(s)], **FAST)
        rec = run(ask(fwd, "version.bind", "TXT", qclass="CH"))
        assert rec.header.rcode == RCODE.NOERROR and s.queries[0][:2] == ("version.bind.", "TXT")


@pytest.mark.parametrize("qtype, opcode, rcode", [("AXFR", 0, RCODE.REFUSED),
                                                  ("IXFR", 0, RCODE.REFUSED),
                                                  ("A", 2, RCODE.NOTIMP)])
def test_not_relayed(qtype, opcode, rcode):
    with TestDNSServer() as s:
        fwd = Forwarder([up(s)], **FAST)
        q = DNSRecord.question("example.test", qtype)
        q.header.opcode = opcode
        assert parse(run(fwd.resolve(bytes(q.pack()), "tcp"))).header.rcode == rcode
        assert s.udp_queries == s.tcp_queries == 0


def test_malformed_and_responses():
    fwd = Forwarder(**FAST)
    bad = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x05ab"
    assert parse(run(fwd.resolve(bad, "udp"))).header.rcode == RCODE.FORMERR
    resp = bytearray(make_query("a.test"))
    resp[2] |= 0x80
    assert run(fwd.resolve(bytes(resp), "udp")) is None       # never answer a response
    assert run(fwd.resolve(b"\x00", "udp")) is None


# ---- in-flight bound and coalescing --------------------------------------------------------------

def test_inflight_bound_refuses_beyond_it():
    with TestDNSServer({f"n{i}.test.": ["A 9.9.9.9"] for i in range(4)}) as s:
        s.delay = 0.3
        fwd = Forwarder([up(s)], max_inflight=2, try_timeout=1.0, deadline=2.0)

        async def main():
            return await asyncio.gather(*(fwd.resolve(make_query(f"n{i}.test"), "udp")
                                          for i in range(4)))
        rcodes = sorted(parse(r).header.rcode for r in run(main()))
        assert rcodes == [RCODE.NOERROR, RCODE.NOERROR, RCODE.REFUSED, RCODE.REFUSED]
        assert fwd.refused_inflight == 2 and s.udp_queries == 2


def test_identical_concurrent_queries_coalesced():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        s.delay = 0.2
        fwd = Forwarder([up(s)], max_inflight=1, try_timeout=1.0, deadline=2.0)
        names = ["a.test", "A.TEST", "a.TeSt", "A.test", "a.tesT"] * 2

        async def main():
            return await asyncio.gather(*(fwd.resolve(make_query(n, qid=100 + i), "udp")
                                          for i, n in enumerate(names)))
        replies = [parse(r) for r in run(main())]
        assert s.udp_queries == 1 and fwd.coalesced == 9 and fwd.refused_inflight == 0
        for i, (n, rec) in enumerate(zip(names, replies)):
            assert rec.header.id == 100 + i and str(rec.q.qname) == n + "."
            assert [str(r.rdata) for r in rec.rr] == ["9.9.9.9"]


def test_coalescing_survives_a_client_going_away():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        # The upstream holds its answer long enough for the steps below, each of which
        # waits for what the previous one caused instead of sleeping.
        s.delay = 1.0
        fwd = Forwarder([up(s)], try_timeout=3.0, deadline=4.0)

        async def main():
            first = asyncio.ensure_future(fwd.resolve(make_query("a.test", qid=1), "udp"))
            while s.udp_queries == 0:           # the first client's query is upstream
                await asyncio.sleep(0.005)
            second = asyncio.ensure_future(fwd.resolve(make_query("a.test", qid=2), "udp"))
            while fwd.coalesced == 0:           # the second client joined it
                await asyncio.sleep(0.005)
            first.cancel()
            return await second
        assert answers(run(main())) == ["9.9.9.9"] and s.udp_queries == 1


# ---- cache through the forwarder ----------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_ttl_counts_down_and_expires():
    with TestDNSServer({"a.test.": ["100 A 9.9.9.9"]}) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock), **FAST)

        async def main():
            out = [await ask(fwd, "a.test")]
            clock.now += 40
            out.append(await ask(fwd, "a.test"))
            clock.now += 61
            out.append(await ask(fwd, "a.test"))
            return out
        first, second, third = run(main())
        assert [r.rr[0].ttl for r in (first, second, third)] == [100, 60, 100]
        assert s.udp_queries == 2 and fwd.cache.hits == 1


def test_negative_answer_cached_from_soa():
    soa = "test. 300 IN SOA ns.test. host.test. 1 7200 1800 86400 20"
    with TestDNSServer({}, soa=soa) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock), **FAST)

        async def main():
            out = [await ask(fwd, "nope.test")]
            clock.now += 15
            out.append(await ask(fwd, "nope.test"))
            clock.now += 6
            out.append(await ask(fwd, "nope.test"))
            return out
        recs = run(main())
        assert all(r.header.rcode == RCODE.NXDOMAIN for r in recs)
        assert [r.auth[0].ttl for r in recs] == [300, 5, 300]   # cached for min(300, 20) s
        assert s.udp_queries == 2


def test_upstream_servfail_cached_briefly():
    with TestDNSServer() as s:
        s.rcode = RCODE.SERVFAIL
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock), **FAST)

        async def main():
            await ask(fwd, "a.test")
            await ask(fwd, "a.test")
            clock.now += 5
            await ask(fwd, "a.test")
        run(main())
        assert s.udp_queries == 2


@pytest.mark.parametrize("stale", [True, False])
def test_serve_stale_when_every_upstream_fails(stale):
    with TestDNSServer({"a.test.": ["60 A 9.9.9.9"]}) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock, serve_stale=stale, max_stale=600),
                        **FAST)

        async def main():
            await ask(fwd, "a.test")
            clock.now += 120
            s.silent = True
            out = [await ask(fwd, "a.test")]
            clock.now += 600
            out.append(await ask(fwd, "a.test"))
            return out
        old, too_old = run(main())
        if stale:
            assert [(str(r.rdata), r.ttl) for r in old.rr] == [("9.9.9.9", 30)]   # RFC 8767 §4
            assert fwd.stale_served == 1
        else:
            assert old.header.rcode == RCODE.SERVFAIL
        assert too_old.header.rcode == RCODE.SERVFAIL


def test_stale_answer_after_client_response_timer_while_refresh_continues():
    """RFC 8767 §5: a slow upstream does not hold the client past the timer; the refresh
    still lands in the cache for the next client."""
    with TestDNSServer({"a.test.": ["60 A 9.9.9.9"]}) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock, serve_stale=True),
                        stale_answer_timeout=0.1, try_timeout=2.0, deadline=3.0)

        async def main():
            await ask(fwd, "a.test")
            clock.now += 120
            s.delay = 1.0                       # ten times the client's timer
            stale = await ask(fwd, "a.test")
            # Served stale (TTL 30) while the refresh was still waiting on the upstream,
            # which is how the client was not held past the timer. The refresh then lands.
            assert stale.rr[0].ttl == 30 and fwd.inflight == 1
            while fwd.inflight:                 # bounded by the forwarder's deadline
                await asyncio.sleep(0.01)
            return await ask(fwd, "a.test")
        fresh = run(main())
        assert fresh.rr[0].ttl == 60 and s.udp_queries == 2


def test_refreshed_answer_replaces_stale_entry():
    with TestDNSServer({"a.test.": ["60 A 9.9.9.9"]}) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock, serve_stale=True), **FAST)

        async def main():
            await ask(fwd, "a.test")
            clock.now += 120
            return await ask(fwd, "a.test")
        rec = run(main())
        assert rec.rr[0].ttl == 60 and s.udp_queries == 2 and fwd.stale_served == 0


# ---- loop protection -----------------------------------------------------------------------------

class Front(asyncio.DatagramProtocol):
    """Stands in for a kdns worker: each UDP query goes to Forwarder.resolve."""

    def __init__(self, fwd: Forwarder):
        self.fwd, self.tasks = fwd, set()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        async def one():
            reply = await self.fwd.resolve(data, "udp")
            if reply is not None:
                self.transport.sendto(reply, addr)
        t = asyncio.ensure_future(one())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)


def test_loop_detected_when_upstream_forwards_back_to_kdns():
    with TestDNSServer() as looper, TestDNSServer({"a.test.": ["A 9.9.9.9"]},
                                                  host="127.0.0.2") as honest:
        async def main():
            fwd = Forwarder([up(looper)], {"corp.test": [up(honest)]}, **FAST)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: Front(fwd),
                                                               local_addr=("127.0.0.1", 0))
            try:
                looper.forward_to = transport.get_extra_info("sockname")
                errors = await fwd.check_loop([transport.get_extra_info("sockname")])
                before = looper.udp_queries
                rec = await ask(fwd, "google.example")
                return fwd, errors, before, rec
            finally:
                transport.close()
        fwd, errors, before, rec = run(main())
        assert len(errors) == 1 and str(up(looper)) in errors[0] and "loop" in errors[0]
        assert not fwd.ready and fwd.loop_probes_seen == 1
        # The probe came back once and stopped there: no amplification.
        assert looper.udp_queries == 1 and before == 1
        # The looping upstream is out of routing: SERVFAIL instead of another lap.
        assert rec.header.rcode == RCODE.SERVFAIL and looper.udp_queries == 1
        probe = looper.queries[0][0]
        assert probe.endswith(f".{fwd.probe_token}.{PROBE_ZONE}.")


def test_loop_detected_when_upstream_is_own_address():
    with TestDNSServer(host="127.0.0.7") as other:
        fwd = Forwarder([Upstream("127.0.0.1", 53), up(other)], **FAST)
        errors = run(fwd.check_loop([("0.0.0.0", 53)]))
    assert len(errors) == 1 and "127.0.0.1:53" in errors[0] and "own listening" in errors[0]
    assert not fwd.ready and fwd.looping == {Upstream("127.0.0.1", 53)}
    assert other.udp_queries == 1          # probed, answered NXDOMAIN: not a loop


def test_no_loop_with_honest_upstream_and_ready():
    with TestDNSServer() as s:
        fwd = Forwarder([up(s)], **FAST)
        assert run(fwd.check_loop([("127.0.0.1", 10053)])) == [] and fwd.ready


def test_foreign_probe_is_forwarded_not_answered():
    """Another kdns's probe passing through us is not our loop: forward it."""
    with TestDNSServer() as s:
        fwd = Forwarder([up(s)], **FAST)
        rec = run(ask(fwd, f"abc.0123456789abcdef.{PROBE_ZONE}", "TXT"))
        assert rec.header.rcode == RCODE.NXDOMAIN and s.udp_queries == 1


def test_stub_server_given_as_name_resolved_through_hook():
    with TestDNSServer({"a.corp.": ["A 9.9.9.9"]}) as s:
        async def resolver(name):
            assert name == "ns.corp.example"
            return [s.host]
        fwd = Forwarder([], {"corp": [Upstream("ns.corp.example", s.port)]},
                        host_resolver=resolver, **FAST)
        assert answers(run(fwd.resolve(make_query("a.corp"), "udp"))) == ["9.9.9.9"]


def test_stub_server_given_as_name_resolved_through_upstreams():
    with TestDNSServer({"a.corp.": ["A 9.9.9.9"]}, host="127.0.0.2") as stub, \
            TestDNSServer({"ns.corp.example.": ["A 127.0.0.2"]}) as default:
        fwd = Forwarder([up(default)], {"corp": [Upstream("ns.corp.example", stub.port)]},
                        **FAST)
        assert answers(run(fwd.resolve(make_query("a.corp"), "udp"))) == ["9.9.9.9"]
        assert stub.udp_queries == 1


def test_ipv6_loopback_upstream():
    if not os.path.exists("/proc/net/if_inet6"):
        unavailable("no IPv6 on this machine")
    try:
        server = TestDNSServer({"a.test.": ["AAAA 2001:db8::1"]}, host="::1")
    except OSError:
        unavailable("::1 not usable here")
    with server:
        fwd = Forwarder([up(server)], **FAST)
        assert answers(run(fwd.resolve(make_query("a.test", "AAAA"), "udp"))) == ["2001:db8::1"]


# ---- failures on the hand-off path answer SERVFAIL ---------------------------------------------

# NOERROR whose only answer RR is TYPE 41 (OPT) for x.example.com A.
OPT_ANSWER = bytes.fromhex("1234810000010001000000000178076578616d706c6503636f6d0000010001"
                           "c00c002900010000012c000401020304")


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_reply_with_only_an_opt_answer_gets_an_answer(proto):
    with TestDNSServer() as s:
        s.reply_bytes = OPT_ANSWER
        fwd = Forwarder([up(s)], cache=Cache(), **FAST)
        reply = run(fwd.resolve(make_query("x.example.com"), proto))
        # RFC 6891 §6.1.1: OPT only in the additional section, so this reply is malformed.
        assert parse(reply).header.rcode == RCODE.SERVFAIL and parse(reply).header.id == 1234


def test_exception_while_forwarding_answers_servfail_and_counts(monkeypatch):
    def broken(self, key, reply):
        raise RuntimeError("cache broke")
    monkeypatch.setattr(Cache, "put", broken)
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        fwd = Forwarder([up(s)], cache=Cache(), **FAST)
        rec = run(ask(fwd, "a.test", proto="tcp"))
        assert rec.header.rcode == RCODE.SERVFAIL and fwd.failures == 1


def test_exception_in_the_handoff_answers_servfail():
    import socket
    from kdns.forward.handoff import ForwardingHandoff
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        h = ForwardingHandoff(a)
        h.forwarder.configure([Upstream("127.0.0.1", 9)], {})

        async def broken(*args, **kw):
            raise RuntimeError("forwarder broke")
        h.forwarder.resolve = broken
        rec = parse(run(h.resolve(make_query("a.test", edns=1232), "tcp")))
        assert rec.header.rcode == RCODE.SERVFAIL and h.forwarder.failures == 1
        assert rec.q.qname == "a.test." and rec.ar        # question and OPT echoed


# ---- malformed upstream replies (RFC 1035 §4.1.4) ---------------------------------------------

BAD_POINTER = bytes.fromhex("43218180000100010000000003626164076578616d706c65036f72670000010001"
                            "ffff000100010000012c000401020304")
QNAME = "03626164076578616d706c65036f726700"          # bad.example.org.


def reply_with(rr_hex: str, an: int = 1, ns: int = 0) -> bytes:
    return bytes.fromhex(f"43218180 0001 {an:04x} {ns:04x} 0000 {QNAME} 00010001 {rr_hex}"
                         .replace(" ", ""))


@pytest.mark.parametrize("reply", [
    BAD_POINTER,
    reply_with("c00d 0001 0001 0000012c 0004 01020304"),              # owner: forward pointer
    reply_with("c021 0001 0001 0000012c 0004 01020304"),              # owner: points at itself
    reply_with("c000 0001 0001 0000012c 0004 01020304"),              # into the header
    reply_with("c00c 0005 0001 0000012c 0002 ffff"),                  # CNAME target out
    reply_with("c00c 0005 0001 0000012c 0004 0161c02d"),              # CNAME target loops
    reply_with("c00c 000f 0001 0000012c 0004 000a c0ff"),             # MX exchange out
    reply_with("c00c 0001 0001 0000012c 0004 01020304 "
               "c00c 0029 0001 0000012c 0000", an=2),                 # OPT in the answer
], ids=["0x3fff", "forward", "self", "header", "cname", "cname-loop", "mx", "opt-answer"])
def test_malformed_reply_is_dropped_never_relayed_or_cached(reply):
    with TestDNSServer() as s:
        s.reply_bytes = reply
        cache = Cache()
        fwd = Forwarder([up(s)], cache=cache, **FAST)
        for proto in ("udp", "tcp"):
            rec = run(ask(fwd, "bad.example.org", proto=proto))
            assert rec.header.rcode == RCODE.SERVFAIL and not rec.rr
        # Only the resolution failure is remembered (RFC 9520), never the reply's bytes.
        assert all(e.wire[3] & 0xF == RCODE.SERVFAIL and e.wire[6:12] == bytes(6)
                   for e in cache.entries.values())


def test_malformed_reply_moves_on_to_the_next_upstream():
    with TestDNSServer() as bad, TestDNSServer({"bad.example.org.": ["A 5.6.7.8"]},
                                               host="127.0.0.2") as good:
        bad.reply_bytes = BAD_POINTER
        fwd = Forwarder([up(bad), up(good)], cache=Cache(), **FAST)
        assert answers(run(fwd.resolve(make_query("bad.example.org"), "udp"))) == ["5.6.7.8"]


def test_valid_compression_still_accepted():
    ok = reply_with("c00c 0005 0001 0000012c 0006 03777777c00c "
                    "c02d 0001 0001 0000012c 0004 01020304", an=2)
    with TestDNSServer() as s:
        s.reply_bytes = ok
        fwd = Forwarder([up(s)], cache=Cache(), **FAST)
        rec = run(ask(fwd, "bad.example.org"))
        assert [str(r.rdata) for r in rec.rr] == ["www.bad.example.org.", "1.2.3.4"]


# ---- failing upstreams: learnt fast, remembered, tried last ------------------------------------

def closed_port(host: str = "127.0.0.1") -> Upstream:
    """A loopback UDP port nobody listens on: the kernel answers ICMP port unreachable."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return Upstream(host, s.getsockname()[1])


def test_closed_port_fails_on_the_icmp_error_not_the_timeout():
    dead = closed_port()
    # Timeouts far beyond the run limit: only the ICMP error can end the tries in time.
    fwd = Forwarder([dead], try_timeout=60, deadline=60, random_start=False)
    rec = run(ask(fwd, "a.test"), limit=10)
    assert rec.header.rcode == RCODE.SERVFAIL
    st = fwd.per_upstream[str(dead)]
    assert st.unreachable >= 1 and fwd.unreachable == st.unreachable and st.timeouts == 0


def test_resolution_failure_is_cached_and_backs_off():
    """RFC 9520 §3.2: at least 1 s, longer on repeats; the retry of a client (glibc asks
    twice) is answered from memory without asking the dead upstream again."""
    dead = closed_port()
    clock = Clock()
    fwd = Forwarder([dead], cache=Cache(clock=clock), **FAST)
    st = fwd.stats_for(dead)

    async def main():
        seen = []
        for step in (0, 0.5, 0.6, 1.5, 0.6):     # at 0, .5, 1.1, 2.6, 3.2 s
            clock.now += step
            rec = await ask(fwd, "a.test")
            assert rec.header.rcode == RCODE.SERVFAIL
            seen.append(st.queries)
        return seen
    q = run(main())
    # asked at 0; cached 1 s (hit at .5); asked at 1.1; cached 2 s (hit at 2.6); asked at 3.2
    assert q[0] == q[1] and q[2] > q[1] and q[3] == q[2] and q[4] > q[3]


def test_failure_is_forgotten_once_the_upstream_answers():
    with TestDNSServer({"a.test.": ["A 9.9.9.9"]}) as s:
        clock = Clock()
        fwd = Forwarder([up(s)], cache=Cache(clock=clock), **FAST)
        s.rcode = None
        s.silent = True
        assert run(ask(fwd, "a.test")).header.rcode == RCODE.SERVFAIL
        s.silent = False
        clock.now += 1.1
        assert answers_of(run(ask(fwd, "a.test"))) == ["9.9.9.9"]


def answers_of(rec: DNSRecord) -> list[str]:
    return [str(r.rdata) for r in rec.rr]


def test_dead_upstream_is_marked_down_and_tried_last(caplog):
    dead = closed_port()
    with TestDNSServer({"a.test.": ["A 9.9.9.9"], "b.test.": ["A 8.8.8.8"]}) as s:
        fwd = Forwarder([dead, up(s)], **FAST)            # random_start=False: dead first
        st = fwd.stats_for(dead)
        assert answers_of(run(ask(fwd, "a.test"))) == ["9.9.9.9"]
        assert st.queries == 1 and st.failing
        assert answers_of(run(ask(fwd, "b.test"))) == ["8.8.8.8"]
        assert st.queries == 1                               # the live one was asked first
        assert "trying others" in caplog.text


def test_log_does_not_promise_other_upstreams_when_there_are_none(caplog):
    fwd = Forwarder([closed_port()], **FAST)
    assert run(ask(fwd, "a.test")).header.rcode == RCODE.SERVFAIL
    assert "failed" in caplog.text and "trying others" not in caplog.text
