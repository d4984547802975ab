"""A UDP answer too big for the client keeps every whole record that fits (TC set), so a
resolver without TCP fallback (musl before 1.2.4) still gets addresses: a headless service
with 40 ready endpoints, whose 40 A records pass 512 bytes.

The cut points are the compiler's (kdns/zone/layout.py, CUT_EVERY_RR_OVER); both packet
paths and both compilers must agree byte for byte, and the replies are checked as clients
parse them: dig, dnspython, and a parser that does what musl does with a reply (walk the
answer section record by record and use the A records it finds).
"""
from __future__ import annotations

import ipaddress
import struct
import subprocess

import dns.flags
import dns.message
import dns.rdatatype
import pytest

from conftest import require_tool, unavailable
from kdns.kube import records
from kdns.kube.model import ClusterModel
from kdns.zone import image as I
from kdns.zone import refpath as P
from serverutil import HOST, running

NAME = "web.default.svc.cluster.local."
SRV_NAME = "_http._tcp." + NAME
ENDPOINTS = [f"10.244.{i // 200}.{i % 200 + 1}" for i in range(40)]


def model() -> ClusterModel:
    m = ClusterModel()
    m.apply({"kind": "Namespace", "metadata": {"name": "default"}})
    m.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
             "spec": {"clusterIP": "None",
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    m.apply({"kind": "EndpointSlice",
             "metadata": {"namespace": "default", "name": "web-abc",
                          "labels": {"kubernetes.io/service-name": "web"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}
                           for ip in ENDPOINTS],
             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    return m


@pytest.fixture(scope="module")
def image() -> bytes:
    zd = records.zone_data(model(), serial=1)
    rrsets, zones, exists = list(zd.rrsets), list(zd.zones), list(zd.exists)
    core = I.compile_image(rrsets, zones, exists=exists, serial=1)
    assert core == I.ReferenceCompiler(zones, True, 1).build(rrsets, exists)
    return core


def query(name: str, rdtype: str = "A", edns: int = -1, payload: int = 1232) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    m.id = 0x4242
    return m.to_wire()


try:
    from kdns.packet import _fastpath as F
except ImportError:
    F = None


def answer(image: bytes, q: bytes) -> bytes:
    """The reply of both packet paths, which must be the same bytes."""
    if F is None:
        unavailable("the compiled packet path is not built")
    ref = P.answer(P.Image(image), q, edns_max=1232)
    assert F.answer(F.Image(image), q, edns_max=1232) == ref
    action, reply = ref
    assert action == P.ACTION_SEND
    return reply


def musl_like_addresses(reply: bytes) -> list[str]:
    """What a stub resolver without TCP fallback does with a reply: read the header counts,
    skip the question, then walk each answer record (owner, type, class, TTL, rdlength,
    rdata; RFC 1035 §4.1.3) and keep the A records' addresses. A record that runs past the
    end of the datagram is an error, as in musl's dns_parse."""
    qd, an = struct.unpack_from("!HH", reply, 4)
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            ln = reply[p]
            if ln >= 0xC0:
                return p + 2
            p += 1 + ln
            if ln == 0:
                return p

    for _ in range(qd):
        pos = skip_name(pos) + 4
    out = []
    for _ in range(an):
        pos = skip_name(pos)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", reply, pos)
        pos += 10
        if pos + rdlen > len(reply):
            raise ValueError("record runs past the end of the reply")
        if rtype == 1 and rdlen == 4:
            out.append(str(ipaddress.IPv4Address(reply[pos:pos + 4])))
        pos += rdlen
    return out


@pytest.mark.parametrize("edns,payload", [(-1, 512), (0, 512)])
def test_truncated_reply_keeps_every_whole_record_that_fits(image, edns, payload):
    reply = answer(image, query(NAME, edns=edns, payload=payload))
    m = dns.message.from_wire(reply)                  # parses: every record is whole
    assert m.flags & dns.flags.TC and len(reply) <= 512
    (rrset,) = m.answer
    got = sorted(rd.address for rd in rrset)
    assert got and set(got) <= set(ENDPOINTS)
    # As many as fit: one more A record (16 bytes) would pass the limit.
    assert len(reply) + 16 > 512
    assert (m.edns >= 0) == (edns >= 0)               # OPT kept when the query had EDNS
    assert musl_like_addresses(reply) == [rd.address for rd in rrset]


@pytest.mark.parametrize("payload", [1232, 4096])
def test_what_fits_whole_is_sent_whole(image, payload):
    m = dns.message.from_wire(answer(image, query(NAME, edns=0, payload=payload)))
    assert not m.flags & dns.flags.TC and len(m.answer[0]) == 40


@pytest.mark.parametrize("edns,payload,limit", [(-1, 512, 512), (0, 1232, 1232),
                                                (0, 4096, 1232)])
def test_truncated_srv_keeps_whole_srv_records_and_no_cut_glue(image, edns, payload, limit):
    reply = answer(image, query(SRV_NAME, "SRV", edns=edns, payload=payload))
    m = dns.message.from_wire(reply)
    assert m.flags & dns.flags.TC and len(reply) <= limit
    (srv,) = m.answer
    # The answer is cut, so nothing follows it: the glue comes after every SRV record.
    assert 0 < len(srv) < 40 and [r.rdtype for r in m.additional] == []
    assert (m.edns >= 0) == (edns >= 0)


def test_whole_answer_over_tcp(image):
    for name, rdtype in ((NAME, "A"), (SRV_NAME, "SRV")):
        action, reply = P.answer(P.Image(image), query(name, rdtype), tcp=True)
        m = dns.message.from_wire(reply)
        assert not m.flags & dns.flags.TC and len(m.answer[0]) == 40
        assert len(m.additional) == (40 if rdtype == "SRV" else 0)


def record_ends(data: bytes, pos: int) -> list[int]:
    """The offsets at which the records from ``pos`` on end (RFC 1035 §4.1.3)."""
    ends = []
    while pos < len(data):
        while data[pos] and data[pos] < 0xC0:
            pos += 1 + data[pos]
        pos += 2 if data[pos] >= 0xC0 else 1
        pos += 10 + struct.unpack_from("!H", data, pos + 8)[0]
        ends.append(pos)
    return ends


@pytest.mark.parametrize("name,rdtype", [(NAME, "A"), (SRV_NAME, "SRV")])
def test_each_size_gets_the_longest_whole_prefix(image, name, rdtype):
    """At every client size the reply is the longest run of whole records that fits (answer
    first, then the additional glue) and TC says whether answer records were left out
    (RFC 2181 §9: dropping additional data alone does not set TC)."""
    plain = query(name, rdtype)
    full = P.answer(P.Image(image), plain, tcp=True)[1]
    ends = record_ends(full, len(plain))
    n_an = struct.unpack_from("!H", full, 6)[0]
    for size in range(512, 1233, 3):
        reply = answer(image, query(name, rdtype, edns=0, payload=size))
        body = reply[len(plain):-11]                  # between the question and OPT
        assert full[len(plain):].startswith(body)
        kept = ends.index(len(plain) + len(body)) + 1 if body else 0
        assert kept == len(ends) or ends[kept] - len(plain) + len(plain) + 11 > size
        assert struct.unpack_from("!HHH", reply, 6) == (
            min(kept, n_an), 0, max(kept - n_an, 0) + 1)     # + OPT
        assert bool(reply[2] & 0x02) == (kept < n_an)


@pytest.fixture(scope="module")
def server(image, tmp_path_factory):
    with running(tmp_path_factory.mktemp("kdns-tc"), image=image, workers=1) as s:
        yield s


def test_dig_without_edns_gets_addresses_and_tc(server):
    dig = require_tool("dig")
    out = subprocess.run([dig, "@" + HOST, "-p", str(server.port), NAME, "A", "+noedns",
                          "+ignore", "+time=2", "+tries=1"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    header = next(line for line in out.stdout.splitlines() if line.startswith(";; flags:"))
    flags = header.split(";")[2].split(":")[1].split()
    counts = dict(kv.strip().split(": ") for kv in header.split(";")[3].split(","))
    assert "tc" in flags and int(counts["ANSWER"]) > 0, out.stdout
    lines = [ln.split() for ln in out.stdout.splitlines() if ln and not ln.startswith(";")]
    addrs = [f[4] for f in lines if len(f) == 5 and f[3] == "A"]
    assert len(addrs) == int(counts["ANSWER"]) and set(addrs) <= set(ENDPOINTS)


@pytest.mark.parametrize("payload", [512, 1232])
def test_dnspython_over_udp_gets_whole_records(server, payload):
    import dns.query
    q = dns.message.make_query(NAME, "A", use_edns=0, payload=payload)
    r = dns.query.udp(q, HOST, port=server.port, timeout=2)
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.A and {rd.address for rd in rrset} <= set(ENDPOINTS)
    if payload == 512:
        assert r.flags & dns.flags.TC and 0 < len(rrset) < 40
    else:                                               # 40 A records fit in 1232 bytes
        assert not r.flags & dns.flags.TC and len(rrset) == 40
    q = dns.message.make_query(SRV_NAME, "SRV", use_edns=0, payload=payload)
    r = dns.query.udp(q, HOST, port=server.port, timeout=2)
    assert r.flags & dns.flags.TC and len(r.to_wire()) <= payload
    (srv,) = r.answer
    assert srv.rdtype == dns.rdatatype.SRV and 0 < len(srv) < 40
