"""Queries at the edges of what clients send, end to end over loopback, on both packet paths:
UDP queries larger than a batch slot (RFC 6891 options of kilobytes), QTYPE=ANY (RFC 8482,
dns-rules §2.1), other classes (RFC 6895 §3.2, dns-rules §2.5), and objects with one bad part
(one port, one address) that must cost exactly that part (dns-rules §1.14)."""
from __future__ import annotations

import importlib.metadata
import socket
import textwrap

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from conftest import unavailable
from serverutil import Kdns
from upstream import TestDNSServer
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local."
ENGINES = ["compiled", "pure"]


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tmp_path_factory):
    """A kdns on the sample image, on one packet path, with an upstream it must not need."""
    if request.param == "compiled":
        try:
            from kdns.packet import _fastpath  # noqa: F401
        except ImportError:
            unavailable("kdns.packet._fastpath is not built; `make install` builds it")
    tmp = tmp_path_factory.mktemp(f"edges-{request.param}")
    up = TestDNSServer({"www.example.com.": ["A 192.0.2.80"],
                        "version.bind.": ["TXT upstream"]})
    with up:
        k = Kdns(tmp, image=sample_image(), workers=1,
                 args=("--nameservers", f"{up.host}:{up.port}"),
                 env={"KDNS_PURE": "1" if request.param == "pure" else "0"})
        k.start()
        try:
            yield k, up
        finally:
            k.stop()


def udp(k: Kdns, q: dns.message.Message, timeout: float = 3) -> dns.message.Message:
    """One datagram each way; the query may be as large as UDP allows (dnspython's own
    ``query.udp`` renders at most the advertised payload size)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.to_wire(max_size=65535), (k.host, k.port))
        data = s.recv(65535)
    return dns.message.from_wire(data)


def tcp(k: Kdns, q: dns.message.Message) -> dns.message.Message:
    return dns.query.tcp(q, k.host, port=k.port, timeout=3)


def upstream_saw(up: TestDNSServer, name: str) -> list:
    return [q for q in up.queries if q[0].rstrip(".").lower() == name.rstrip(".").lower()]


# --------------------------------------------------------------------------- big UDP queries


# 5,000 bytes (the reported case), and the largest an IPv4 UDP datagram can carry (65,507
# bytes) minus the header, question and OPT around the option.
@pytest.mark.parametrize("option_len", [5000, 65507 - 12 - len(K) - 1 - 4 - 11 - 4])
def test_a_udp_query_larger_than_a_batch_slot_is_answered(served, option_len):
    k, _ = served
    q = dns.message.make_query(K, "A", use_edns=0, payload=1232,
                               options=[dns.edns.GenericOption(65001, b"x" * option_len)])
    assert len(q.to_wire(max_size=65535)) > 4096
    r = udp(k, q)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rd.address for rr in r.answer for rd in rr] == ["10.96.0.1"]
    assert r.flags & dns.flags.AA


def test_a_big_udp_query_the_image_does_not_answer_is_handed_off_whole(served):
    """A CH query goes to the worker's Python side (the hand-off area), 5,000 bytes of it."""
    k, up = served
    q = dns.message.make_query("version.bind.", "TXT", "CH", use_edns=0,
                               options=[dns.edns.GenericOption(65001, b"y" * 5000)])
    r = udp(k, q)
    assert r.rcode() == dns.rcode.NOERROR
    assert txt(r) == [f"kdns {importlib.metadata.version('kdns')}"]


# --------------------------------------------------------------------------- QTYPE=ANY


@pytest.mark.parametrize("send", [udp, tcp])
def test_any_at_a_name_with_data_is_one_synthesised_hinfo(served, send):
    """RFC 8482 §4.2: not NODATA (which would claim the name has no data)."""
    k, _ = served
    for name in (K, "dual.default.svc.cluster.local.", "cluster.local.",
                 "1.0.96.10.in-addr.arpa.", "1-2-3-4.default.pod.cluster.local."):
        r = send(k, dns.message.make_query(name, "ANY"))
        assert r.rcode() == dns.rcode.NOERROR, name
        assert r.flags & dns.flags.AA
        assert len(r.answer) == 1, (name, r.answer)
        rr = r.answer[0]
        assert (rr.rdtype, rr.rdclass, rr.name.to_text()) == (
            dns.rdatatype.HINFO, dns.rdataclass.IN, name)
        assert [(rd.cpu, rd.os) for rd in rr] == [(b"RFC8482", b"")]
        assert rr.ttl == 30                      # the zone's TTL, as every cluster record
        assert not r.authority


def test_any_at_a_cname_answers_the_cname(served):
    """A CNAME owner has no other data (RFC 1034 §3.6.2): its one RRset is the answer
    (RFC 8482 §4.1), followed as for every type."""
    k, _ = served
    r = udp(k, dns.message.make_query("ext.default.svc.cluster.local.", "ANY"))
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in r.answer][0] == dns.rdatatype.CNAME


def test_any_at_a_name_without_data_or_without_existence_keeps_its_negative(served):
    k, _ = served
    r = udp(k, dns.message.make_query("default.svc.cluster.local.", "ANY"))
    assert (r.rcode(), r.answer, len(r.authority)) == (dns.rcode.NOERROR, [], 1)
    r = udp(k, dns.message.make_query("nope.default.svc.cluster.local.", "ANY"))
    assert (r.rcode(), r.answer, len(r.authority)) == (dns.rcode.NXDOMAIN, [], 1)


# --------------------------------------------------------------------------- classes


def txt(r: dns.message.Message) -> list[str]:
    return [b"".join(rd.strings).decode() for rr in r.answer for rd in rr]


@pytest.mark.parametrize("send", [udp, tcp])
def test_qclass_any_for_a_cluster_name_is_answered_from_the_zone(served, send):
    k, up = served
    r = send(k, dns.message.make_query(K, "A", "ANY"))
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    assert [(rr.rdclass, rd.address) for rr in r.answer for rd in rr] == [
        (dns.rdataclass.IN, "10.96.0.1")]
    assert r.question[0].rdclass == dns.rdataclass.ANY      # the question is echoed as asked
    r = send(k, dns.message.make_query("nope.default.svc.cluster.local.", "A", "ANY"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert not upstream_saw(up, K) and not upstream_saw(up, "nope.default.svc.cluster.local")


@pytest.mark.parametrize("send", [udp, tcp])
def test_chaos_names_are_answered_locally(served, send):
    """CoreDNS's chaos plugin's names: version.bind / version.server the version,
    hostname.bind / id.server the host's name; TXT in class CH, never forwarded."""
    k, up = served
    version = f"kdns {importlib.metadata.version('kdns')}"
    for name, want in (("version.bind.", version), ("version.server.", version),
                       ("hostname.bind.", socket.gethostname()),
                       ("id.server.", socket.gethostname())):
        r = send(k, dns.message.make_query(name, "TXT", "CH"))
        assert r.rcode() == dns.rcode.NOERROR, name
        assert txt(r) == [want], name
        assert r.answer[0].rdclass == dns.rdataclass.CH
        assert r.answer[0].name.to_text() == name
    assert not upstream_saw(up, "version.bind") and not upstream_saw(up, "id.server")


@pytest.mark.parametrize("send", [udp, tcp])
def test_other_classes_are_refused_never_forwarded(served, send):
    k, up = served
    asked = [("version.bind.", "A", "CH"), ("www.example.com.", "TXT", "CH"), (K, "A", "CH"),
             ("www.example.com.", "A", "HS"), (K, "TXT", "HS"), ("www.example.com.", "A", 254)]
    for name, qtype, qclass in asked:
        r = send(k, dns.message.make_query(name, qtype, qclass))
        assert r.rcode() == dns.rcode.REFUSED, (name, qtype, qclass)
        assert not r.answer
    assert not upstream_saw(up, "www.example.com") and not upstream_saw(up, K)


def test_qclass_any_for_an_outside_name_is_forwarded(served):
    """dns-rules §2.5: outside names are the upstream's in class ANY as in class IN."""
    k, up = served
    r = udp(k, dns.message.make_query("www.example.com.", "A", "ANY"))
    assert upstream_saw(up, "www.example.com")
    assert r.rcode() == dns.rcode.NOERROR


# --------------------------------------------------------------------------- one bad part

CLUSTER = textwrap.dedent("""\
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Namespace
      metadata: {name: default}
    - apiVersion: v1
      kind: Service
      metadata: {name: web, namespace: default}
      spec:
        clusterIP: 10.96.5.5
        ports:
        - {name: http, port: 80, protocol: TCP}
        - {name: admin, port: 8443, protocol: TCP}
        - {name: broken, port: 70000, protocol: TCP}
    - apiVersion: v1
      kind: Service
      metadata: {name: db, namespace: default}
      spec:
        clusterIP: None
        ports:
        - {name: sql, port: 5432, protocol: TCP}
    - apiVersion: discovery.k8s.io/v1
      kind: EndpointSlice
      metadata:
        name: db-abc
        namespace: default
        labels: {kubernetes.io/service-name: db}
      addressType: IPv4
      ports:
      - {name: sql, port: 5432, protocol: TCP}
      - {name: bad, port: -1, protocol: TCP}
      endpoints:
      - addresses: [10.1.0.1]
        conditions: {ready: true}
      - addresses: [10.1.0.300]
        conditions: {ready: true}
      - addresses: [10.1.0.3]
        conditions: {ready: true}
    - apiVersion: v1
      kind: Endpoints
      metadata: {name: legacy, namespace: default}
      subsets:
      - addresses:
        - {ip: 10.2.0.1}
        - {ip: not-an-ip}
        ports:
        - {name: p, port: 99999, protocol: TCP}
        - {name: q, port: 9000, protocol: TCP}
    - apiVersion: v1
      kind: Service
      metadata: {name: legacy, namespace: default}
      spec:
        clusterIP: None
        ports:
        - {name: q, port: 9000, protocol: TCP}
    """)


@pytest.fixture(scope="module")
def bad_parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badparts")
    f = tmp / "cluster.yaml"
    f.write_text(CLUSTER)
    k = Kdns(tmp, zone_file=str(f), workers=1)
    k.start()
    try:
        yield k
    finally:
        k.stop()


def answers(k, name, qtype="A") -> list[str]:
    r = udp(k, dns.message.make_query(name, qtype))
    assert r.rcode() == dns.rcode.NOERROR, (name, qtype, r)
    return sorted(rd.to_text() for rr in r.answer for rd in rr if rr.rdtype ==
                  dns.rdatatype.from_text(qtype))


def test_one_invalid_port_costs_that_port_only(bad_parts):
    k = bad_parts
    assert answers(k, "web.default.svc.cluster.local.") == ["10.96.5.5"]
    assert answers(k, "_http._tcp.web.default.svc.cluster.local.", "SRV") == [
        "0 100 80 web.default.svc.cluster.local."]
    assert answers(k, "web.default.svc.cluster.local.", "SRV") == [
        "0 50 80 web.default.svc.cluster.local.", "0 50 8443 web.default.svc.cluster.local."]
    r = udp(k, dns.message.make_query("_broken._tcp.web.default.svc.cluster.local.", "SRV"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert "Service default/web: spec.ports[2].port: 70000 is not a valid port" in k.logs()


def test_one_invalid_address_costs_that_endpoint_only(bad_parts):
    k = bad_parts
    assert answers(k, "db.default.svc.cluster.local.") == ["10.1.0.1", "10.1.0.3"]
    assert len(answers(k, "_sql._tcp.db.default.svc.cluster.local.", "SRV")) == 2
    logs = k.logs()
    assert ("EndpointSlice default/db-abc: endpoints[1].addresses[0]: '10.1.0.300' is not an "
            "IP address") in logs
    assert "EndpointSlice default/db-abc: ports[1].port: -1 is not a valid port" in logs
    assert answers(k, "legacy.default.svc.cluster.local.") == ["10.2.0.1"]
    assert answers(k, "_q._tcp.legacy.default.svc.cluster.local.", "SRV") == [
        "0 100 9000 10-2-0-1.legacy.default.svc.cluster.local."]
    assert ("Endpoints default/legacy: subsets[0].addresses[1].ip: 'not-an-ip' is not an IP "
            "address") in logs
    assert "Endpoints default/legacy: subsets[0].ports[0].port: 99999 is not a valid port" in logs
