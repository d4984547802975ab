"""The forward and cache options (--forward-*, --cache-*, --serve-stale, or the Corefile's
forward and cache blocks) change what the forwarder does, against upstreams the tests start.

Each setting travels as a worker gets it: ForwardingOptions.tuning() in the supervisor's
config message, decoded and applied by ForwardingHandoff.tune.
"""
from __future__ import annotations

import asyncio
import types

import pytest
from dnslib import RCODE, DNSRecord

from kdns.forward.cache import Cache
from kdns.forward.control import ForwardingOptions, decode_tuning, encode_config
from kdns.forward.forwarder import Forwarder, Upstream
from kdns.forward.handoff import ForwardingHandoff
from tests.upstream import TestDNSServer, make_query

pytestmark = pytest.mark.timeout(20)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def tuned(servers, clock=None, **options) -> Forwarder:
    cache = Cache(1000, clock=clock or Clock())
    fw = Forwarder([Upstream(*s.address) for s in servers], cache=cache, try_timeout=0.3,
                   deadline=0.9)
    message = encode_config("tok", fw.upstreams, {}, (), ForwardingOptions(**options).tuning())
    ForwardingHandoff.tune(types.SimpleNamespace(forwarder=fw, cache=cache, compiled=None),
                           decode_tuning(message))
    return fw


def ask(fw, name, qtype="A", proto="udp"):
    return DNSRecord.parse(asyncio.run(fw.resolve(make_query(name, qtype), proto)))


def first_tries(servers, fw, n):
    """Which server saw each of ``n`` distinct queries first (every server answers)."""
    order = []
    for i in range(n):
        before = [s.udp_queries + s.tcp_queries for s in servers]
        ask(fw, f"q{i}.example")
        after = [s.udp_queries + s.tcp_queries for s in servers]
        order.append(next(k for k in range(len(servers)) if after[k] > before[k]))
    return order


def three():
    return [TestDNSServer({f"q{i}.example.": ["A 192.0.2.1"] for i in range(12)},
                          host=f"127.0.0.{k}") for k in (21, 22, 23)]


@pytest.mark.parametrize("policy, expect", [
    ("sequential", [0] * 6),
    ("round_robin", [1, 2, 0, 1, 2, 0]),
])
def test_policy_orders_the_first_try(policy, expect):
    servers = three()
    with servers[0], servers[1], servers[2]:
        assert first_tries(servers, tuned(servers, forward_policy=policy), 6) == expect


def test_policy_random_spreads_the_first_try():
    servers = three()
    with servers[0], servers[1], servers[2]:
        firsts = first_tries(servers, tuned(servers, forward_policy="random"), 12)
    assert len(set(firsts)) > 1          # 3 * (1/3)^12 that all twelve hit one by chance


def test_sequential_fails_over_in_order():
    dead, second, third_ = three()
    dead.silent = True
    with dead, second, third_:
        fw = tuned([dead, second, third_], forward_policy="sequential")
        assert ask(fw, "q1.example").header.rcode == RCODE.NOERROR
        assert (dead.udp_queries, second.udp_queries, third_.udp_queries) == (1, 1, 0)


def test_force_tcp_asks_over_tcp_only():
    s = TestDNSServer({"a.example.": ["A 192.0.2.7"]}, host="127.0.0.24")
    with s:
        r = ask(tuned([s], forward_force_tcp=True), "a.example")
        assert [str(x.rdata) for x in r.rr] == ["192.0.2.7"]
        assert (s.udp_queries, s.tcp_queries) == (0, 1)
        # Without it: UDP.
        ask(tuned([s]), "a.example")
        assert (s.udp_queries, s.tcp_queries) == (1, 1)


def test_max_concurrent_refuses_beyond_the_limit():
    s = TestDNSServer({"a.example.": ["A 192.0.2.1"], "b.example.": ["A 192.0.2.2"]},
                      host="127.0.0.25")
    s.delay = 0.2
    with s:
        fw = tuned([s], forward_max_concurrent=1)

        async def both():
            return await asyncio.gather(fw.resolve(make_query("a.example"), "udp"),
                                        fw.resolve(make_query("b.example"), "udp"))
        a, b = (DNSRecord.parse(x) for x in asyncio.run(both()))
        # CoreDNS max_concurrent: the query over the limit is REFUSED, the other answered.
        assert (a.header.rcode, b.header.rcode) == (RCODE.NOERROR, RCODE.REFUSED)
        fw2 = tuned([s], forward_max_concurrent=2)

        async def both2():
            return await asyncio.gather(fw2.resolve(make_query("a.example"), "udp"),
                                        fw2.resolve(make_query("b.example"), "udp"))
        assert [DNSRecord.parse(x).header.rcode for x in asyncio.run(both2())] == [0, 0]


def test_cache_ttl_caps():
    s = TestDNSServer({"a.example.": ["600 A 192.0.2.1"]}, host="127.0.0.26")
    with s:
        clock = Clock()
        fw = tuned([s], clock, cache_success_ttl=20, cache_denial_ttl=7)
        ask(fw, "a.example")
        ask(fw, "nx.example")                       # NXDOMAIN, SOA minimum 60
        assert ask(fw, "a.example").rr[0].ttl == 20     # from the cache, capped
        assert ask(fw, "nx.example").auth[0].ttl == 7
        n = s.udp_queries
        clock.now += 8                                   # past the denial cap only
        ask(fw, "a.example"), ask(fw, "nx.example")
        assert s.udp_queries == n + 1
        clock.now += 13                                  # past the success cap
        ask(fw, "a.example")
        assert s.udp_queries == n + 2


def test_serve_stale_answers_when_the_upstream_is_down():
    s = TestDNSServer({"a.example.": ["10 A 192.0.2.1"]}, host="127.0.0.27")
    with s:
        for stale, expect in ((0.0, RCODE.SERVFAIL), (3600.0, RCODE.NOERROR)):
            clock = Clock()
            s.silent = False
            fw = tuned([s], clock, serve_stale=stale)
            ask(fw, "a.example")
            s.silent = True
            clock.now += 60                       # expired 50 s ago
            r = ask(fw, "a.example")
            assert r.header.rcode == expect
            if expect == RCODE.NOERROR:
                # RFC 8767 §4: a stale answer carries the recommended 30 s TTL.
                assert [str(x.rdata) for x in r.rr] == ["192.0.2.1"] and r.rr[0].ttl == 30
