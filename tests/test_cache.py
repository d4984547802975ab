"""Cache of forwarded answers: lifetimes (RFC 2308), countdown, caps, eviction, serve-stale
(RFC 8767) and the stored wire form the packet path will serve from. Time is a fake clock."""
from __future__ import annotations

import struct

import pytest
from dnslib import RCODE, RR, DNSRecord, EDNS0

from kdns.forward.cache import STALE_TTL, Cache, scan

SOA = "test. {ttl} IN SOA ns.test. host.test. 1 7200 1800 86400 {minimum}"
KEY = (b"\x01a\x04test\x00", 1, 1, 0, 0)


class Clock:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


def reply(name="a.test", qtype="A", answer=(), auth=(), extra=(), rcode=0, tc=False,
          edns=False) -> bytes:
    rec = DNSRecord.question(name, qtype).reply()
    rec.header.id, rec.header.rcode, rec.header.tc = 999, rcode, int(tc)
    for text in answer:
        rec.add_answer(*RR.fromZone(text))
    for text in auth:
        rec.add_auth(*RR.fromZone(text))
    for text in extra:
        rec.add_ar(*RR.fromZone(text))
    if edns:
        rec.add_ar(EDNS0(udp_len=1232))
    return bytes(rec.pack())


def serve(e, clock, name=b"\x01A\x04TeSt\x00", qid=7, stale=False) -> DNSRecord:
    return DNSRecord.parse(bytes(e.render(qid, name + b"\x00\x01\x00\x01", 0x0100, clock(),
                                          stale=stale)))


def test_positive_ttl_is_min_rr_ttl_and_counts_down_per_rr():
    clock = Clock()
    c = Cache(clock=clock)
    e = c.put(KEY, reply(answer=["a.test. 100 IN CNAME b.test.", "b.test. 40 IN A 1.2.3.4"]))
    assert e.ttl == 40
    clock.now += 15
    got = c.get(KEY)
    rec = serve(got, clock)
    assert [r.ttl for r in rec.rr] == [25, 25]       # min(rr ttl, entry ttl) - age
    assert rec.header.id == 7 and str(rec.q.qname) == "A.TeSt." and rec.header.rd
    assert not rec.header.aa
    clock.now += 25
    assert c.get(KEY) is None and c.hits == 1 and c.misses == 1


@pytest.mark.parametrize("rr_ttl, min_ttl, max_ttl, expect", [
    (1, 5, 3600, 5),          # floor (CoreDNS min TTL 5)
    (86400, 5, 3600, 3600),   # cap
    (30, 0, 30, 30),
])
def test_min_and_max_ttl_caps(rr_ttl, min_ttl, max_ttl, expect):
    c = Cache(min_ttl=min_ttl, max_ttl=max_ttl, clock=Clock())
    assert c.put(KEY, reply(answer=[f"a.test. {rr_ttl} IN A 1.2.3.4"])).ttl == expect


def test_served_ttl_never_exceeds_the_cap():
    clock = Clock()
    c = Cache(max_ttl=60, clock=clock)
    c.put(KEY, reply(answer=["a.test. 86400 IN A 1.2.3.4"]))
    clock.now += 10
    assert serve(c.get(KEY), clock).rr[0].ttl == 50


@pytest.mark.parametrize("rcode, answer", [(RCODE.NXDOMAIN, []), (RCODE.NOERROR, [])])
@pytest.mark.parametrize("soa_ttl, minimum, expect", [(300, 60, 60), (20, 60, 20)])
def test_negative_ttl_from_soa(rcode, answer, soa_ttl, minimum, expect):
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM), for NXDOMAIN and NODATA alike."""
    clock = Clock()
    c = Cache(clock=clock)
    e = c.put(KEY, reply(rcode=rcode, auth=[SOA.format(ttl=soa_ttl, minimum=minimum)]))
    assert e.ttl == expect
    clock.now += expect - 1
    assert c.get(KEY) is not None
    clock.now += 1
    assert c.get(KEY) is None


def test_negative_ttl_capped_separately():
    c = Cache(max_neg_ttl=10, clock=Clock())
    assert c.put(KEY, reply(rcode=3, auth=[SOA.format(ttl=300, minimum=300)])).ttl == 10


def test_negative_without_soa_not_cached():
    c = Cache(clock=Clock())
    assert c.put(KEY, reply(rcode=RCODE.NXDOMAIN)) is None and len(c) == 0
    assert c.put(KEY, reply(rcode=RCODE.NOERROR)) is None


def test_servfail_cached_five_seconds_and_never_stale():
    clock = Clock()
    c = Cache(clock=clock, serve_stale=True)
    assert c.put(KEY, reply(rcode=RCODE.SERVFAIL)).ttl == 5
    clock.now += 4.9
    assert c.get(KEY) is not None
    clock.now += 0.1
    assert c.get(KEY) is None and c.get_stale(KEY) is None


@pytest.mark.parametrize("kwargs", [dict(tc=True, answer=["a.test. 30 IN A 1.2.3.4"]),
                                    dict(rcode=RCODE.REFUSED), dict(rcode=RCODE.FORMERR),
                                    dict(rcode=RCODE.NOTIMP)])
def test_not_cached(kwargs):
    c = Cache(clock=Clock())
    assert c.put(KEY, reply(**kwargs)) is None and len(c) == 0


def test_malformed_not_cached():
    c = Cache(clock=Clock())
    assert c.put(KEY, reply(answer=["a.test. 30 IN A 1.2.3.4"])[:-3]) is None


def test_lru_eviction_keeps_recently_used():
    c = Cache(capacity=2, clock=Clock())
    keys = [(b"\x01%d\x00" % i, 1, 1, 0, 0) for i in range(3)]
    c.put(keys[0], reply(answer=["a.test. 30 IN A 1.2.3.4"]))
    c.put(keys[1], reply(answer=["a.test. 30 IN A 1.2.3.4"]))
    assert c.get(keys[0]) is not None               # 0 is now the most recent
    c.put(keys[2], reply(answer=["a.test. 30 IN A 1.2.3.4"]))
    assert len(c) == 2 and c.evictions == 1
    assert c.get(keys[1]) is None and c.get(keys[0]) is not None and c.get(keys[2]) is not None


def test_serve_stale_window():
    """RFC 8767: expired entries are kept up to max_stale and served with TTL 30."""
    clock = Clock()
    c = Cache(clock=clock, serve_stale=True, max_stale=100)
    c.put(KEY, reply(answer=["a.test. 60 IN A 1.2.3.4"]))
    clock.now += 61
    assert c.get(KEY) is None                       # never served stale by the normal path
    e = c.get_stale(KEY)
    assert e is not None and serve(e, clock, stale=True).rr[0].ttl == STALE_TTL
    clock.now += 100
    assert c.get_stale(KEY) is None
    assert c.get(KEY) is None and len(c) == 0       # dropped once past the stale window


def test_serve_stale_off_drops_expired():
    clock = Clock()
    c = Cache(clock=clock)
    c.put(KEY, reply(answer=["a.test. 60 IN A 1.2.3.4"]))
    clock.now += 61
    assert c.get_stale(KEY) is None and c.get(KEY) is None and len(c) == 0


def test_stored_form_is_canonical_and_offsets_point_at_ttls():
    """The form the compiled path will serve: ID 0, lowercase question, no OPT, and one TTL
    offset per RR (names compressed or not)."""
    raw = reply(name="A.TEST", answer=["A.TEST. 30 IN A 1.2.3.4", "A.TEST. 40 IN A 1.2.3.5"],
                auth=["test. 50 IN NS ns.test."], extra=["ns.test. 60 IN A 5.6.7.8"], edns=True)
    e = Cache(clock=Clock()).put(KEY, raw)
    assert e.wire[:2] == b"\0\0" and b"\x01a\x04test\x00" in e.wire[12:e.qend]
    assert struct.unpack_from("!H", e.wire, 10)[0] == 1 and len(e.ttl_offs) == 4   # OPT gone
    assert [struct.unpack_from("!I", e.wire, o)[0] for o in e.ttl_offs] == [30, 40, 50, 60]
    assert e.ttls == (30, 40, 50, 60) and e.ttl == 30
    assert len(scan(e.wire).records) == 4


def test_records_after_opt_are_dropped_not_moved():
    rec = DNSRecord.question("a.test", "A").reply()
    rec.add_answer(*RR.fromZone("a.test. 30 IN A 1.2.3.4"))
    rec.add_ar(EDNS0(udp_len=1232))
    rec.add_ar(*RR.fromZone("x.test. 30 IN A 1.2.3.4"))
    e = Cache(clock=Clock()).put(KEY, bytes(rec.pack()))
    parsed = DNSRecord.parse(e.wire)
    assert len(parsed.rr) == 1 and parsed.ar == []


def test_bytes_after_the_last_record_are_not_stored():
    """Bytes after the last RR belong to no record: the stored form ends with the last one,
    as the compiled forwarder stores it (fwd.pxi fw_cache_store), so a hit from either
    cache serves the same bytes (found by tests/fuzz/fuzz_scan.py)."""
    raw = reply(answer=["a.test. 30 IN A 1.2.3.4"])
    e = Cache(clock=Clock()).put(KEY, raw + b"\xff" * 7)
    assert e.wire == b"\0\0" + raw[2:]


def test_extended_rcode_not_cached():
    rec = DNSRecord.question("a.test", "A").reply()
    rec.add_ar(EDNS0(udp_len=1232, ext_rcode=1))
    assert Cache(clock=Clock()).put(KEY, bytes(rec.pack())) is None


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Cache(capacity=0)


# The one name walker (kdns.dns.names.name_end) that the cache's scan, the reference path
# and ExternalName chasing share: end offset, or -1 (RFC 1035 §4.1.4).
HDR = bytes(12)


@pytest.mark.parametrize("msg,off,end", [
    (HDR + b"\x01a\x00", 12, 15),                              # plain
    (HDR + b"\x01a\x00" + b"\x01b\xc0\x0c", 15, 19),           # label then pointer back
    (HDR + b"\xc0\x0e\x01a\x00", 12, -1),                      # pointer forwards
    (HDR + b"\x01a\xc0\x0c", 12, -1),                          # pointer to itself: a loop
    (HDR + b"\xc0\x05", 12, -1),                               # pointer into the header
    (HDR + b"\x01", 12, -1),                                   # runs off the end
    (HDR + b"\x40" + bytes(64) + b"\x00", 12, -1),             # label over 63
    (HDR + b"\x3f" + bytes(63) + b"\x3f" + bytes(63) + b"\x3f" + bytes(63)
     + b"\x3f" + bytes(63) + b"\x00", 12, -1),                 # 257 bytes: over MAX_NAME
])
def test_name_end_contract(msg, off, end):
    from kdns.dns.names import name_end, rr_at
    assert name_end(msg, off) == end
    rr = msg + b"\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x04" + bytes(4)
    if end < 0:
        assert rr_at(rr, off) is None
    else:                                   # every valid name above ends its message
        assert rr_at(rr, off) == (1, 1, 30, end + 10, end + 14)   # A, IN, 30 s, RDATA, end
        assert rr_at(rr[:-1], off) is None                        # RDATA cut short


def cache_kinds():
    """Both stores, the Python LRU and the worker's compiled table behind CompiledCache."""
    from kdns.forward.cache import CompiledCache
    from kdns.packet import _fastpath
    yield "python", lambda capacity: Cache(capacity)
    yield "compiled", lambda capacity: CompiledCache(_fastpath.PacketCache(8, 1232), capacity)


def key(name: str, qtype: int = 1) -> tuple:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return (wire, qtype, 1, 0, 0)


@pytest.mark.parametrize("kind", ["python", "compiled"])
def test_hits_entries_and_evictions_are_split_success_and_denial(kind):
    """CoreDNS's coredns_cache_* type label: NXDOMAIN and NODATA (RFC 2308) and SERVFAIL
    (RFC 9520) entries are "denial", NOERROR with an answer "success"; the counters keep
    the total and its denial share, whichever store holds the entry."""
    make = dict(cache_kinds())[kind]
    c = make(2)
    soa = [SOA.format(ttl=300, minimum=60)]
    c.put(key("a.test"), reply(answer=["a.test. 30 IN A 1.2.3.4"]))
    c.put(key("n.test"), reply("n.test", rcode=RCODE.NXDOMAIN, auth=soa))
    words = c.counters
    assert (words["cache_entries"], words["cache_entries_denial"]) == (2, 1)
    assert c.get(key("a.test")) is not None and c.get(key("n.test")) is not None
    assert c.get(key("n.test")) is not None
    assert (c.hits, c.hits_denial) == (3, 2)
    # Replacing an entry moves it between the shares; nothing is counted twice.
    c.put(key("a.test"), reply(answer=[], auth=soa))                      # now NODATA
    assert (words["cache_entries"], words["cache_entries_denial"]) == (2, 2)
    c.put_failure(key("s.test"), reply("s.test", rcode=RCODE.SERVFAIL), 5)
    c.put(key("b.test"), reply("b.test", answer=["b.test. 30 IN A 1.2.3.5"]))
    if kind == "python":
        # An LRU of two: the two denials stored first were evicted for s.test and b.test.
        assert (c.evictions, c.evictions_denial) == (2, 2)
        assert (words["cache_entries"], words["cache_entries_denial"]) == (2, 1)
    else:
        # The compiled table (8 slots) holds all four; its evictions are the table's own.
        assert (words["cache_entries"], words["cache_entries_denial"]) == (4, 3)
        # Five more fill it and evict the entry stored longest ago: n.test, a denial.
        for i in range(5):
            c.put(key(f"x{i}.test"), reply(f"x{i}.test", answer=[f"x{i}.test. 30 IN A 1.2.3.9"]))
        assert (c.evictions, c.evictions_denial) == (1, 1)
        assert (words["cache_entries"], words["cache_entries_denial"]) == (8, 2)
    c.clear()
    assert (words["cache_entries"], words["cache_entries_denial"]) == (0, 0)
