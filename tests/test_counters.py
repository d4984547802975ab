"""The packet path counts what kdns/packet/counters.py says, where it says.

The expected counts are worked out here from the oracle's replies and the helpers in
kdns/packet/counters.py (an independent statement of the buckets), then compared word by word with
the page the C code filled while serving real loopback queries.
"""
import collections
import mmap
import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest

from kdns import settings
from kdns.packet import _fastpath as F
from kdns.packet import counters as K
from kdns.zone import refpath as P
from tests import zonefixtures as Z
from tests.test_udpserver import Loopback, client, receive, wire

S = "kubernetes.default.svc.cluster.local."


def test_layout_is_the_one_in_counters_py():
    assert F.counter_layout() == K.LAYOUT


def test_counter_page_must_be_writable_whole_and_aligned():
    with pytest.raises((TypeError, ValueError, BufferError)):
        F.Counters(bytes(K.SLOT_WORDS * 8))                 # read-only
    with pytest.raises(ValueError, match="needs"):
        F.Counters(bytearray(K.SLOT_WORDS * 8 - 8))
    with mmap.mmap(-1, K.SLOT_WORDS * 8 + 8) as mm:
        with pytest.raises(ValueError, match="aligned"):
            F.Counters(memoryview(mm)[1:])
    page = bytearray(K.SLOT_WORDS * 8)
    c = F.Counters(page)
    c[K.LAYOUT["image_generation"]] = 7                      # the worker's gauge
    assert struct.unpack_from("=Q", page, 8 * K.LAYOUT["image_generation"])[0] == 7
    assert len(c) == K.SLOT_WORDS


def qtype_of(q: bytes):
    """The question's type as the counters see it; None when no question can be read."""
    try:
        if len(q) < 12 or q[2] & 0x80 or struct.unpack_from("!H", q, 4)[0] != 1:
            return None
        _, end = P.parse_name(q, 12)
        return struct.unpack_from("!H", q, end)[0] if end + 4 <= len(q) else None
    except P.Malformed:
        return None


def do_bit(q: bytes) -> bool:
    """The DO bit of a standard query with one question that dnspython reads (RFC 3225)."""
    if len(q) < 12 or q[2] & 0x78 or struct.unpack_from("!H", q, 4)[0] != 1:
        return False
    try:
        return bool(dns.message.from_wire(q).ednsflags & dns.flags.DO)
    except Exception:   # noqa: BLE001 -- whatever dnspython refuses, the engines skip too
        return False


def expected_counts(ref, sent, proto, tcp=False, edns_max=settings.EDNS_UDP_SIZE):
    """Counter name -> value for queries ``sent`` (each delivered whole), per counters.py."""
    exp = collections.Counter()
    for q in sent:
        qt = qtype_of(q)
        exp[f"queries_{proto}_{K.QTYPES[K.qtype_index(qt)][0] if qt is not None else 'other'}"] += 1
        exp[f"request_size_{proto}_bucket_{K.size_bucket(len(q))}"] += 1
        exp[f"request_size_{proto}_sum"] += len(q)
        exp[f"do_{proto}"] += do_bit(q)
        action, reply = P.answer(ref, q, tcp=tcp, edns_max=edns_max)
        if action == P.ACTION_SEND:
            m = dns.message.from_wire(reply) if len(reply) > 12 else None
            rcode = 16 if m is not None and m.rcode() == dns.rcode.BADVERS else reply[3] & 0xF
            exp[f"rcode_{proto}_{rcode}"] += 1
            exp[f"response_size_{proto}_bucket_{K.size_bucket(len(reply))}"] += 1
            exp[f"response_size_{proto}_sum"] += len(reply)
            exp[f"truncated_{proto}"] += bool(reply[2] & 0x02)
            exp[f"formerr_{proto}"] += rcode == 1
            # NODATA (RFC 2308 §2.2): NOERROR, no answer, not truncated.
            exp[f"nodata_{proto}"] += (rcode == 0 and not reply[2] & 0x02
                                       and reply[6:8] == b"\0\0")
        else:
            exp[f"{'handoff' if action == P.ACTION_HANDOFF else 'dropped'}_{proto}"] += 1
    return exp


def typed_latency(counter) -> dict:
    """{qtype name: samples} of the request duration by type (both protocols)."""
    out = {}
    for t, _ in K.QTYPES:
        n = sum(counter(f"tlatency_{t}_bucket_{i}") for i in range(len(K.LATENCY_BOUNDS) + 1))
        if n:
            out[t] = n
    return out


def replied_types(ref, sent, tcp=False) -> dict:
    """{qtype name: replies} the engine sent at once (not handed off, not dropped)."""
    out = collections.Counter()
    for q in sent:
        if P.answer(ref, q, tcp=tcp)[0] == P.ACTION_SEND:
            qt = qtype_of(q)
            out[K.QTYPES[K.qtype_index(qt)][0] if qt is not None else "other"] += 1
    return dict(out)


def mixed_queries():
    formerr = bytearray(wire(S, qid=20))
    formerr[5] = 2                                               # two questions
    badvers = wire(S, qid=21, edns=1)
    notimp = bytearray(wire(S, qid=22))
    notimp[2] |= 0x20                                            # opcode 4, NOTIFY
    return [wire(S, qid=1), wire(S, "AAAA", qid=2), wire("_https._tcp." + S, "SRV", qid=3),
            wire("nope.default.svc.cluster.local.", qid=4), wire(S, "TXT", qid=5),
            wire("1.0.96.10.in-addr.arpa.", "PTR", qid=6), wire("cluster.local.", "AXFR", qid=7),
            wire("dual.default.svc.cluster.local.", "CAA", qid=8),
            wire("big.default.svc.cluster.local.", qid=9),                     # TC at 512
            wire("big.default.svc.cluster.local.", qid=10, edns=0, payload=4096),
            wire("google.com.", qid=11), wire("2.0.96.10.in-addr.arpa.", "PTR", qid=12),
            bytes(formerr), badvers, bytes(notimp), b"\x00\x01\x02",             # short: drop
            dnssec_ok(S, qid=23), dnssec_ok("dual.default.svc.cluster.local.", "CAA", qid=24)]


def dnssec_ok(name, rdtype="A", qid=7):
    m = dns.message.make_query(name, rdtype, want_dnssec=True)
    m.id = qid
    return m.to_wire()


def test_udp_counts_after_real_queries():
    lo = Loopback(edns_max=4096)
    c = client()
    # Larger than a reply slot (4096): read whole all the same, and FORMERR (no question).
    sent = mixed_queries() + [b"\0" * 5000]
    for q in sent:
        c.sendto(q, lo.addr)
    lo.pump()
    answered = sum(P.answer(lo.ref, q)[0] == P.ACTION_SEND for q in sent)
    receive(c, answered)
    exp = expected_counts(lo.ref, sent, "udp", edns_max=4096)
    # The mix covers every kind of event once at least (the big RRset over plain UDP is the
    # one truncation; at 4096 it fits).
    assert (exp["rcode_udp_16"], exp["formerr_udp"], exp["handoff_udp"], exp["truncated_udp"],
            exp["rcode_udp_4"], exp["rcode_udp_5"], exp["rcode_udp_3"], exp["do_udp"],
            exp["nodata_udp"]) == (1, 2, 2, 1, 1, 1, 1, 2, 4)
    for name in K.LAYOUT:
        if name.startswith(("latency_", "tlatency_")):
            continue
        assert lo.counter(name) == exp.get(name, 0), name
    # Every reply of a batch gets that batch's recvmmsg -> sendmmsg time; hand-offs are
    # timed when their reply is sent (engine.count_reply), drops never.
    buckets = sum(lo.counter(f"latency_udp_bucket_{i}") for i in range(len(K.LATENCY_BOUNDS) + 1))
    assert buckets == answered
    assert typed_latency(lo.counter) == replied_types(lo.ref, sent)
    assert lo.counter("latency_udp_sum_ns") > 0
    assert sum(lo.counter(f"latency_tcp_bucket_{i}") for i in range(17)) == 0
    total = K.sum_slots(lo.page, 1)                   # the supervisor's view of the page
    assert total[K.LAYOUT["queries_udp_A"]] == lo.counter("queries_udp_A") > 0
    c.close()
    lo.close()


def test_tcp_answer_counts_under_tcp():
    buf = Z.sample_image()
    img, ref = F.Image(buf), P.Image(buf)
    page = bytearray(K.SLOT_WORDS * 8)
    counters = F.Counters(page)
    sent = mixed_queries()
    for q in sent:
        assert F.tcp_answer(img, counters, q, settings.EDNS_UDP_SIZE) == P.answer(ref, q, tcp=True)
    exp = expected_counts(ref, sent, "tcp", tcp=True)
    assert exp["truncated_tcp"] == 0                  # TCP carries the whole big RRset
    for name, index in K.LAYOUT.items():
        if name.startswith(("latency_", "tlatency_")):
            continue
        assert counters[index] == exp.get(name, 0), name
    actions = [P.answer(ref, q, tcp=True)[0] for q in sent]
    assert (actions.count(P.ACTION_HANDOFF), actions.count(P.ACTION_DROP)) == (2, 1)
    # Timed: what was answered at once (hand-offs are timed at their reply, drops never).
    assert sum(counters[K.LAYOUT[f"latency_tcp_bucket_{i}"]] for i in range(17)) == \
        actions.count(P.ACTION_SEND)
    assert typed_latency(lambda name: counters[K.LAYOUT[name]]) == \
        replied_types(ref, sent, tcp=True)


@pytest.mark.parametrize("ns", [0, 250_000, 250_001, 500_000, 8_192_000_000, 8_192_000_001])
def test_latency_bucket_edges(ns):
    """The C buckets (250000 << k ns) agree with counters.latency_bucket at the edges."""
    page = bytearray(K.SLOT_WORDS * 8)
    F._count_latency_for_test(F.Counters(page), ns)
    words = struct.unpack_from(f"={K.SLOT_WORDS}Q", page)
    assert words[K.LAYOUT[f"latency_udp_bucket_{K.latency_bucket(ns)}"]] == 1
    assert words[K.LAYOUT["latency_udp_sum_ns"]] == ns


def test_every_named_qtype_and_size_edge_lands_in_its_word():
    """The C tables restate counters.QTYPES and SIZE_BOUNDS; every entry and edge is hit."""
    buf = Z.sample_image()
    img = F.Image(buf)
    page = bytearray(K.SLOT_WORDS * 8)
    counters = F.Counters(page)
    for name, code in K.QTYPES:
        before = counters[K.LAYOUT[f"queries_tcp_{name}"]]
        F.tcp_answer(img, counters, wire(S, code if code else 999), settings.EDNS_UDP_SIZE)
        assert counters[K.LAYOUT[f"queries_tcp_{name}"]] == before + 1, name
    q = wire(S)
    for bound in K.SIZE_BOUNDS:
        for n in (bound, bound + 1):
            # Trailing bytes after the question are ignored, so any length >= len(q) is a
            # query; shorter ones are garbage, still counted as requests of that size.
            packet = q + bytes(n - len(q)) if n >= len(q) else bytes(n)
            bucket = K.LAYOUT[f"request_size_tcp_bucket_{K.size_bucket(n)}"]
            before = counters[bucket]
            F.tcp_answer(img, counters, packet, settings.EDNS_UDP_SIZE)
            assert counters[bucket] == before + 1, n


def test_forward_counters_are_page_words_a_successor_keeps_adding_to():
    """The Forwarder's and Cache's counters are the page's words: a replacement worker in
    the same slot finds its upstream's row by address and keeps the totals growing."""
    from kdns.forward.cache import Cache
    from kdns.forward.forwarder import Forwarder, Upstream
    page = bytearray(K.PAGE_BYTES)
    up = Upstream("192.0.2.1", 53)
    for _ in range(2):                                   # a worker, then its replacement
        ctr = K.ForwardCounters(page)
        fw = Forwarder([up], cache=Cache(10, counters=ctr), counters=ctr)
        st = fw.stats_for(up)
        st.sent()
        st.observe(3, 0.001)
        st.try_failed()
        fw.failures += 1
        fw.cache.misses += 1
    tot = K.forward_totals(page, 1)
    (row,) = tot["upstreams"]
    assert row["to"] == "192.0.2.1:53" and row["requests"] == 2 and row["failures"] == 2
    assert row["rcodes"]["NXDOMAIN"] == 2 and row["latency"][K.latency_bucket(10 ** 6)] == 2
    assert tot["failures"] == 2 and tot["cache_misses"] == 2 and tot["cache_capacity"] == 10
    other = Forwarder([], counters=K.ForwardCounters(page)).stats_for(Upstream("dns.example"))
    other.sent()                                          # a name: the shared "other" row
    assert [u["to"] for u in K.forward_totals(page, 1)["upstreams"]] == ["192.0.2.1:53", "other"]
