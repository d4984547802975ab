"""CoreDNS cache ``prefetch AMOUNT [DURATION] [PERCENTAGE%]``: an entry asked AMOUNT times
with no gap of DURATION whose remaining TTL is at most PERCENTAGE of its lifetime is
refreshed upstream in the background (plugin/cache handler.go shouldPrefetch, freq.go).
The Python cache and the compiled table count hits alike (an injected clock, or entries
stored in the past); end to end, an upstream the test starts sees the refresh before the
entry expires and the clients are answered from the cache throughout."""
from __future__ import annotations

import time

import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import require_fastpath

from kdns.forward.cache import Cache, CompiledCache, key_bytes, key_tuple
from test_cache import KEY, Clock, reply

A100 = reply(answer=["a.test. 100 IN A 192.0.2.1"])


def test_popular_entry_close_to_expiry_is_queued_once():
    clock = Clock()
    c = Cache(clock=clock)
    c.set_prefetch(3, 60.0, 10)
    e = c.put(KEY, A100)
    assert e.ttl == 100
    clock.now += 80                       # 20 s left: above 10% of 100
    for _ in range(5):
        assert not c.hit(KEY, c.get(KEY))
    clock.now += 10                       # 10 s left: at 10%, and hits >= 3
    assert c.hit(KEY, c.get(KEY))
    assert not c.hit(KEY, c.get(KEY))     # queued once until the refresh lands
    assert c.take_due() == [KEY] and c.take_due() == []
    # The refreshed entry keeps its popularity and may be queued again near its expiry.
    c.put(KEY, A100)
    clock.now += 50
    assert not c.hit(KEY, c.get(KEY))     # 50 s left
    clock.now += 45
    assert c.hit(KEY, c.get(KEY))         # 5 s left, still popular (no gap of 60 s)


def test_a_gap_of_duration_starts_the_count_again():
    clock = Clock()
    c = Cache(clock=clock)
    c.set_prefetch(2, 5.0, 90)
    c.put(KEY, A100)
    clock.now += 20                        # 80 s left <= 90 s: only popularity is missing
    assert not c.hit(KEY, c.get(KEY))      # 1
    clock.now += 6                         # a gap of more than 5 s: back to 1
    assert not c.hit(KEY, c.get(KEY))
    clock.now += 1
    assert c.hit(KEY, c.get(KEY))          # 2 within 5 s


def test_off_by_default():
    c = Cache(clock=Clock())
    c.put(KEY, A100)
    assert not any(c.hit(KEY, c.get(KEY)) for _ in range(100))


def test_the_compiled_table_counts_hits_as_the_python_cache():
    fast_mod = require_fastpath()
    fast = fast_mod.PacketCache(capacity=64, edns_size=1232)
    c = CompiledCache(fast, 100)
    c.set_prefetch(3, 60.0, 10)
    e = c.entry(A100)
    # Stored 92 s ago by the monotonic clock the table stamps with: 8 s of 100 left.
    now = time.monotonic()
    assert fast.put(key_bytes(KEY), e.wire, e.qend, e.ttl_offs, e.ttls, e.ttl, now - 92)
    q = dns.message.make_query("a.test", "A")
    q.flags = 0x0100
    wire = q.to_wire()
    for i in range(3):
        action, out = fast.answer(wire)   # the packet path's hit
        assert action == 1 and dns.message.from_wire(out).answer
        assert fast.due_count == (1 if i == 2 else 0)
    assert c.take_due() == [KEY] and fast.due_count == 0
    assert key_tuple(key_bytes(KEY)) == KEY
    # Hits served by Python count in the same table: no second queueing while it refreshes.
    assert not c.hit(KEY, c.get(KEY))
    c.unmark(KEY)
    assert c.hit(KEY, c.get(KEY))


@pytest.mark.parametrize("text, expect", [
    ("10", (10, 60.0, 10)), ("5,30s", (5, 30.0, 10)), ("2,1m,50", (2, 60.0, 50)),
    ("2,1m,50%", (2, 60.0, 50)),
])
def test_flag(text, expect):
    from kdns.cli import _prefetch
    assert _prefetch(text) == expect


@pytest.mark.parametrize("text", ["x", "2,1m,5", "2,1m,95", "2,0s", "1,2,3,4"])
def test_bad_flag(text):
    import argparse
    from kdns.cli import _prefetch
    with pytest.raises(argparse.ArgumentTypeError):
        _prefetch(text)


@pytest.mark.parametrize("option, expect", [
    ("prefetch 10", (10, 60.0, 10)), ("prefetch 3 10m", (3, 600.0, 10)),
    ("prefetch 3 1m 25%", (3, 60.0, 25)),
])
def test_corefile_option(tmp_path, option, expect):
    from kdns.forward import corefile as cf
    p = tmp_path / "Corefile"
    p.write_text(".:53 {\n kubernetes cluster.local\n forward . 1.1.1.1\n cache 30 {\n"
                 f"  {option}\n }}\n}}\n")
    got = cf.parse(str(p), env={})
    assert got.unsupported == [] and got.flags["cache_prefetch"] == expect
    assert got.forward_options()["cache_prefetch"] == expect


@pytest.mark.parametrize("option, words", [
    ("prefetch 3 1m 25", "ends with %"), ("prefetch 3 1m 95%", "is not a percentage"),
    ("prefetch 3 soon", "is not a duration"),
])
def test_corefile_bad_option_names_the_line(tmp_path, option, words):
    from kdns.forward import corefile as cf
    p = tmp_path / "Corefile"
    p.write_text(".:53 {\n kubernetes cluster.local\n forward . 1.1.1.1\n cache 30 {\n"
                 f"  {option}\n }}\n}}\n")
    with pytest.raises(cf.CorefileError) as e:
        cf.parse(str(p), env={})
    assert str(e.value).startswith(f"{p}:5: ") and words in str(e.value)


# --------------------------------------------------------------------------- end to end

COREFILE = """.:53 {
    kubernetes cluster.local {
       ttl 30
    }
    forward . %(up)s
    cache 30 {
       prefetch 2 1m 90%%
    }
}
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ["compiled", "pure"])
def test_upstream_sees_the_refresh_before_expiry_and_clients_no_miss(tmp_path, engine):
    """A 1 s record is cached 5 s (the floor): 90% of 5 s is every second of its life, so the
    second hit queues its refresh; the upstream, whose answer changed meanwhile, is asked
    again before the entry expires, and the clients get the new address from the cache,
    every one of them a hit but the first."""
    import os
    from dnslib import RR
    from serverutil import ROOT, Kdns
    from upstream import TestDNSServer
    up = TestDNSServer({"pop.example.": ["1 A 198.51.100.1"]}, host="127.0.0.43")
    with up:
        corefile = tmp_path / "Corefile"
        corefile.write_text(COREFILE % {"up": f"{up.host}:{up.port}"})
        k = Kdns(tmp_path, zone_file=os.path.join(ROOT, "examples", "cluster.yaml"),
                 workers=1, env={"KDNS_PURE": "1"} if engine == "pure" else None,
                 args=("--corefile", str(corefile))).start()
        try:
            assert f"{engine} engine" in k.logs()

            def ask() -> list[str]:
                q = dns.message.make_query("pop.example", "A")
                r = dns.query.udp(q, k.host, port=k.port, timeout=3)
                assert r.rcode() == dns.rcode.NOERROR
                return [rd.to_text() for rrset in r.answer for rd in rrset]

            assert ask() == ["198.51.100.1"]                  # the miss: upstream asked
            started = time.monotonic()
            up.records = RR.fromZone("pop.example. 1 IN A 198.51.100.2")
            assert ask() == ["198.51.100.1"]                  # hit 1
            assert ask() == ["198.51.100.1"]                  # hit 2: the refresh is queued
            deadline = started + 4.0                          # the entry lives 5 s

            def asked() -> int:
                return sum(q[0] == "pop.example." for q in up.queries)

            while asked() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert asked() == 2, up.queries
            assert time.monotonic() - started < 5.0           # before the entry expired
            got = ask()
            while got != ["198.51.100.2"] and time.monotonic() < deadline:
                got = ask()
            assert got == ["198.51.100.2"]                    # the refreshed entry
            m = k.metrics()
            misses = sum(v for (name, _), v in m.items() if name == "coredns_cache_misses_total")
            assert misses == 1
            assert sum(v for (name, _), v in m.items()
                       if name == "coredns_cache_prefetch_total") >= 1
        finally:
            k.stop()


@pytest.mark.parametrize("silent", [False, True])
def test_a_prefetch_replaces_the_entry_only_with_an_answer(silent):
    """The Python path's hit queues the refresh; an upstream that answers replaces the
    entry (its popularity kept), one that does not leaves the fresh entry serving and the
    entry may be queued again (CoreDNS stores no failed prefetch)."""
    import asyncio
    from kdns.forward.forwarder import Forwarder, Upstream
    from upstream import TestDNSServer
    up = TestDNSServer({"pop.example.": ["100 A 198.51.100.2"]}, host="127.0.0.44")
    with up:
        up.silent = silent
        clock = Clock()
        cache = Cache(clock=clock)
        cache.set_prefetch(2, 60.0, 10)
        key = (b"\x03pop\x07example\x00", 1, 1, 0, 0)
        cache.put(key, reply("pop.example", answer=["pop.example. 100 IN A 198.51.100.1"]))
        clock.now += 95
        fw = Forwarder([Upstream(up.host, up.port)], cache=cache, try_timeout=0.2,
                       deadline=0.5)
        q = dns.message.make_query("pop.example", "A", use_edns=False)
        q.flags = 0x0100

        async def run():
            replies = [await fw.resolve(q.to_wire(), "udp") for _ in range(2)]
            assert len(fw._inflight) == 1                 # the refresh, in the background
            await asyncio.gather(*fw._inflight.values())
            return replies

        replies = asyncio.run(run())
        for r in replies:
            assert [rd.to_text() for rrset in dns.message.from_wire(r).answer
                    for rd in rrset] == ["198.51.100.1"]
        assert cache.prefetches == 1
        # Asked by the refresh only (the clients were answered from the cache); a silent
        # upstream is asked again on the retry within the deadline.
        asked = sum(q[0] == "pop.example." for q in up.queries)
        assert asked == 1 if not silent else asked >= 1
        e = cache.get(key)
        assert e is not None
        got = dns.message.from_wire(bytes(e.render(1, e.wire[12:e.qend], 0x100, clock())))
        assert [rd.to_text() for rrset in got.answer for rd in rrset] == \
            ["198.51.100.1" if silent else "198.51.100.2"]
        assert e.refreshing is False
