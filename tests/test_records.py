"""The Kubernetes DNS rules, one table row per rule (docs/dns-rules.md).

Each row is a question and the whole expected reply: rcode, answer, authority, additional,
AA and TTLs. ``check(message, row)`` / ``check_wire(reply, row)`` compare a reply with a row,
so the same table can be sent to a running server over UDP and TCP; here every row runs
in-process through both packet paths (``refpath`` and, when built, ``_fastpath``, which must
also agree byte for byte) on an image compiled from ``examples/cluster.yaml`` plus the
edge-case objects below.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import NamedTuple

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from conftest import unavailable
import yaml

from kdns import settings
from kdns.dns.names import reverse_name
from kdns.zone import image as I
from kdns.kube import records
from kdns.serve import build
from kdns.zone import refpath
from kdns.kube.model import ClusterModel
from kdns.kube.file import read_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cluster.yaml")
SERIAL = 4242
Z = "cluster.local."

# Edge cases the example cluster does not need to show a newcomer.
EXTRA = """
- {kind: Service, metadata: {name: legacy, namespace: default},
   spec: {clusterIP: None, ports: [{name: web, port: 8000}]}}
- kind: Endpoints            # v1 fallback: this service has no EndpointSlice (dns-rules §1.13)
  metadata: {name: legacy, namespace: default}
  subsets:
  - addresses: [{ip: 10.244.9.1, hostname: legacy-0}, {ip: 10.244.9.2}]
    notReadyAddresses: [{ip: 10.244.9.3, hostname: legacy-3}]
    ports: [{name: web, port: 8000, protocol: TCP}]
- {kind: Service, metadata: {name: nohosts, namespace: default}, spec: {clusterIP: None}}
- {kind: Service, metadata: {name: notready, namespace: default},
   spec: {clusterIP: None, ports: [{name: http, port: 80}]}}
- kind: EndpointSlice
  metadata: {name: notready-1, namespace: default, labels: {kubernetes.io/service-name: notready}}
  endpoints: [{addresses: [10.244.7.1], conditions: {ready: false}}]
  ports: [{name: http, port: 80, protocol: TCP}]
- kind: Endpoints            # ignored: notready has a slice, and slices win
  metadata: {name: notready, namespace: default}
  subsets: [{addresses: [{ip: 10.244.7.9}], ports: [{name: http, port: 80}]}]
- {kind: Service, metadata: {name: six, namespace: prod},
   spec: {clusterIP: None, clusterIPs: [None], ports: [{name: http, port: 80}]}}
- kind: EndpointSlice
  metadata: {name: six-a, namespace: prod, labels: {kubernetes.io/service-name: six}}
  addressType: IPv6
  endpoints:
  - addresses: ["2001:db8:3333:4444:5555:6666::"]
  - addresses: ["5678:abcd::1"]
  ports: [{name: http, port: 8080, protocol: TCP}]
- kind: EndpointSlice        # the same address again in a second slice: de-duplicated
  metadata: {name: six-b, namespace: prod, labels: {kubernetes.io/service-name: six}}
  addressType: IPv6
  endpoints: [{addresses: ["5678:ABCD:0::1"]}]
  ports: [{name: http, port: 8080, protocol: TCP}]
- {kind: Service, metadata: {name: twins, namespace: default},
   spec: {clusterIP: None, ports: [{name: http, port: 80}]}}
- kind: EndpointSlice
  metadata: {name: twins-1, namespace: default, labels: {kubernetes.io/service-name: twins}}
  endpoints:
  - {addresses: [10.244.5.1], hostname: shared}
  - {addresses: [10.244.5.2], hostname: shared}
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
- {kind: Service, metadata: {name: portless, namespace: default}, spec: {clusterIP: None}}
- kind: EndpointSlice
  metadata: {name: portless-1, namespace: default, labels: {kubernetes.io/service-name: portless}}
  endpoints: [{addresses: [10.244.6.1]}]
- {kind: Service, metadata: {name: noports, namespace: default}, spec: {clusterIP: 10.96.8.8}}
- {kind: Service, metadata: {name: unnamed, namespace: default},
   spec: {clusterIP: 10.96.8.9, ports: [{port: 8080, protocol: TCP}]}}
- {kind: Service, metadata: {name: ghost, namespace: default},
   spec: {type: ExternalName, externalName: nope.default.svc.cluster.local}}
- {kind: Service, metadata: {name: alias2, namespace: default},
   spec: {type: ExternalName, externalName: api-alias.prod.svc.cluster.local.}}
- {kind: Service, metadata: {name: ipext, namespace: default},
   spec: {type: ExternalName, externalName: 1.2.3.4}}
- {kind: Service, metadata: {name: Bad_Name, namespace: default}, spec: {clusterIP: 10.96.8.10}}
- {kind: Service, metadata: {name: badip, namespace: default}, spec: {clusterIP: 10.96.999.1}}
- {kind: Service, metadata: {name: shared-ip, namespace: kube-system},
   spec: {clusterIP: 10.96.8.20, ports: [{name: http, port: 80}]}}
- kind: EndpointSlice        # 10.244.0.2 is also kube-dns's endpoint: two PTR targets
  metadata: {name: shared-ip-1, namespace: kube-system, labels: {kubernetes.io/service-name: shared-ip}}
  endpoints: [{addresses: [10.244.0.2], hostname: dns-a}]
  ports: [{name: http, port: 80, protocol: TCP}]
- {kind: Service, metadata: {name: udp, namespace: default},
   spec: {clusterIP: 10.96.8.30, ports: [{name: syslog, port: 514, protocol: UDP},
                                         {name: sctp-x, port: 9, protocol: SCTP}]}}
- {kind: EndpointSlice, metadata: {name: orphan, namespace: default}, endpoints: []}
"""


def build_model() -> ClusterModel:
    objs, _ = read_objects(EXAMPLE)
    model = ClusterModel()
    for obj in objs + yaml.safe_load(EXTRA):
        model.apply(obj)
    return model


def build_image(**options) -> bytes:
    zd = records.zone_data(build_model(), serial=SERIAL, **options)
    return I.compile_image(zd.rrsets, zd.zones, exists=zd.exists, serial=zd.serial)


class Row(NamedTuple):
    qname: str
    qtype: str
    rcode: str = "NOERROR"         # or "HANDOFF": not ours, the forwarder's
    answer: tuple = ()             # "owner ttl TYPE rdata" (owner exactly as expected)
    authority: tuple = ()          # "SOA" = the zone's SOA, owner echoing the question
    additional: tuple = ()
    aa: bool = True


def soa_line(row: Row, ttl: int = 30, minimum: int = 30, serial: int = SERIAL) -> str:
    """The negative-answer SOA: owner is the apex as spelt in the question (dns-rules §2.4)."""
    low = row.qname.lower().rstrip(".")
    apex = next(z for z in (Z.rstrip("."), "in-addr.arpa", "ip6.arpa")
                if low == z or low.endswith("." + z))
    owner = row.qname.rstrip(".")[len(low) - len(apex):] + "."
    # MNAME and RNAME compress against the apex in the question, so they echo its case too.
    return (f"{owner} {ttl} SOA ns.dns.{owner} hostmaster.{owner} {serial} 7200 1800 86400 "
            f"{minimum}")


def section_lines(rrsets) -> list[str]:
    out = []
    for rrset in rrsets:
        for rd in rrset:
            out.append(f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} "
                       f"{rd.to_text()}")
    return out


def check(msg: dns.message.Message, row: Row, **soa) -> None:
    """Compare a reply with a row: usable on replies from refpath or from a real server."""
    assert dns.rcode.to_text(msg.rcode()) == row.rcode, msg
    assert bool(msg.flags & dns.flags.AA) == row.aa
    assert not msg.flags & dns.flags.TC
    assert msg.question[0].name.to_text() == row.qname   # case echoed (DNS 0x20)
    answer = section_lines(msg.answer)
    assert sorted(answer) == sorted(row.answer), msg
    # CNAMEs come before the data they lead to (dns-rules §2.4 "Order").
    kinds = [line.split()[2] for line in answer]
    assert kinds == sorted(kinds, key=lambda k: k != "CNAME")
    authority = [soa_line(row, **soa) if a == "SOA" else a for a in row.authority]
    assert sorted(section_lines(msg.authority)) == sorted(authority), msg
    assert sorted(section_lines(msg.additional)) == sorted(row.additional), msg


def check_wire(wire: bytes, row: Row, **soa) -> None:
    """``check`` plus what parsing hides: dnspython merges duplicate RRs, so compare the
    header's counts with the distinct records (RFC 2181 §5: no duplicates in an RRset)."""
    msg = dns.message.from_wire(wire)
    counts = struct.unpack_from("!HHH", wire, 6)
    opt = 1 if msg.opt is not None else 0
    assert counts == (len(section_lines(msg.answer)), len(section_lines(msg.authority)),
                      len(section_lines(msg.additional)) + opt), (counts, msg)
    check(msg, row, **soa)


class Impl(NamedTuple):
    """One packet path: how to map an image, and its answer function."""
    image: object
    answer: object


IMPLS = {"refpath": Impl(refpath.Image, refpath.answer)}
try:
    from kdns.packet import _fastpath
    IMPLS["fastpath"] = Impl(_fastpath.Image, _fastpath.answer)
except ImportError:                      # not built: the reference path still runs every row
    pass


class Mapped(NamedTuple):
    impl: Impl
    image: object

    def answer(self, query: bytes, tcp: bool = False):
        return self.impl.answer(self.image, query, tcp=tcp, edns_max=settings.EDNS_UDP_SIZE)


def mapped(buf: bytes, impl: str = "refpath") -> Mapped:
    return Mapped(IMPLS[impl], IMPLS[impl].image(buf))


def ask(img: Mapped, row: Row, tcp: bool = False) -> tuple[int, bytes]:
    q = dns.message.make_query(row.qname, row.qtype, use_edns=False)
    return img.answer(q.to_wire(), tcp=tcp)


def run(img: Mapped, row: Row, **soa) -> None:
    action, wire = ask(img, row)
    if row.rcode == "HANDOFF":
        assert action == refpath.ACTION_HANDOFF
        return
    assert action == refpath.ACTION_SEND
    check_wire(wire, row, **soa)


K = "kubernetes.default.svc.cluster.local."
KDNS = "kube-dns.kube-system.svc.cluster.local."
API = "api.development.svc.cluster.local."
FE = "frontend.prod.svc.cluster.local."
DB = "db.prod.svc.cluster.local."
CACHE = "cache.prod.svc.cluster.local."
SIX = "six.prod.svc.cluster.local."
TWINS = "twins.default.svc.cluster.local."
LEGACY = "legacy.default.svc.cluster.local."
NX, NODATA = "NXDOMAIN", ("SOA",)
SOA_ANSWER = f"cluster.local. 30 SOA ns.dns.cluster.local. hostmaster.cluster.local. {SERIAL} 7200 1800 86400 30"

ROWS = [
    # ---- apex, name-server name, schema version (dns-rules §1.9, §1.10, §2.2)
    Row("cluster.local.", "SOA", answer=(SOA_ANSWER,)),
    Row("CLUSTER.local.", "SOA", answer=(SOA_ANSWER.replace("cluster.local.", "CLUSTER.local."),)),
    Row("cluster.local.", "NS", answer=("cluster.local. 30 NS ns.dns.cluster.local.",),
        additional=("ns.dns.cluster.local. 30 A 10.96.0.10",)),
    Row("cluster.local.", "A", authority=NODATA),
    Row("cluster.local.", "AAAA", authority=NODATA),
    Row("cluster.local.", "TXT", authority=NODATA),
    Row("cluster.local.", "MX", authority=NODATA),
    Row("ns.dns.cluster.local.", "A", answer=("ns.dns.cluster.local. 30 A 10.96.0.10",)),
    Row("ns.dns.cluster.local.", "AAAA", authority=NODATA),
    Row("dns.cluster.local.", "A", authority=NODATA),         # ENT above ns.dns (RFC 8020)
    Row("dns-version.cluster.local.", "TXT", answer=('dns-version.cluster.local. 30 TXT "1.1.0"',)),
    Row("DNS-Version.Cluster.Local.", "TXT", answer=('DNS-Version.Cluster.Local. 30 TXT "1.1.0"',)),
    Row("dns-version.cluster.local.", "A", authority=NODATA),
    # ---- fixed empty non-terminals and the name grammar (dns-rules §1.1, §1.11)
    Row("svc.cluster.local.", "A", authority=NODATA),
    Row("svc.cluster.local.", "TXT", authority=NODATA),       # R: ENT TXT is NODATA
    Row("pod.cluster.local.", "A", authority=NODATA),
    Row("pod.cluster.local.", "SRV", authority=NODATA),
    Row("foo.cluster.local.", "A", NX, authority=NODATA),
    Row("google.com.cluster.local.", "A", NX, authority=NODATA),
    Row("Foo.Cluster.Local.", "AAAA", NX, authority=NODATA),
    Row("default.svc.cluster.local.", "A", authority=NODATA),
    Row("default.svc.cluster.local.", "TXT", authority=NODATA),
    Row("empty.svc.cluster.local.", "A", authority=NODATA),   # namespace without services
    Row("kube-system.svc.cluster.local.", "SRV", authority=NODATA),
    Row("nons.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("x.nons.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("a.b.c.kubernetes.default.svc.cluster.local.", "A", NX, authority=NODATA),
    # ---- no wildcards: '*' is a literal label (dns-rules §1.12:)
    Row("*.default.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("kubernetes.*.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("kubernetes.default.*.cluster.local.", "A", NX, authority=NODATA),
    Row("_https._tcp.*.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    Row("any.default.svc.cluster.local.", "A", NX, authority=NODATA),
    # ---- ClusterIP services (dns-rules §1.2, §1.5, §2.1)
    Row(K, "A", answer=(f"{K} 30 A 10.96.0.1",)),
    Row("KuBeRnEtEs.DeFaUlT.sVc.ClUsTeR.lOcAl.", "A",
        answer=("KuBeRnEtEs.DeFaUlT.sVc.ClUsTeR.lOcAl. 30 A 10.96.0.1",)),
    Row(K, "AAAA", authority=NODATA),
    Row(K, "SRV", answer=(f"{K} 30 SRV 0 100 443 {K}",), additional=(f"{K} 30 A 10.96.0.1",)),
    Row("KUBERNETES.default.svc.cluster.local.", "SRV",   # glue owner = qname: echoes it
        answer=(f"KUBERNETES.default.svc.cluster.local. 30 SRV 0 100 443 {K}",),
        additional=("KUBERNETES.default.svc.cluster.local. 30 A 10.96.0.1",)),
    Row(K, "CNAME", authority=NODATA),
    Row(K, "TXT", authority=NODATA),
    Row(K, "MX", authority=NODATA),
    Row(K, "PTR", authority=NODATA),
    Row(K, "NS", authority=NODATA),
    Row(K, "SOA", authority=NODATA),
    # RFC 8482 §4.2: a name with data answers ANY with one synthesised HINFO (dns-rules §2.1).
    Row(K, "ANY", answer=(f'{K} 30 HINFO "RFC8482" ""',)),
    Row(K, "HINFO", authority=NODATA),
    Row(K, "CAA", authority=NODATA),
    Row("_https._tcp." + K, "SRV", answer=(f"_https._tcp.{K} 30 SRV 0 100 443 {K}",),
        additional=(f"{K} 30 A 10.96.0.1",)),
    Row("_HTTPS._TCP." + K, "SRV", answer=(f"_HTTPS._TCP.{K} 30 SRV 0 100 443 {K}",),
        additional=(f"{K} 30 A 10.96.0.1",)),
    Row("_https._tcp." + K, "A", authority=NODATA),
    Row("_https._udp." + K, "SRV", NX, authority=NODATA),
    Row("_http._tcp." + K, "SRV", NX, authority=NODATA),
    Row("https._tcp." + K, "SRV", NX, authority=NODATA),      # the '_' is part of the name
    Row("_tcp." + K, "SRV", authority=NODATA),                 # ENT (RFC 8020; C: NXDOMAIN)
    Row("_x._y._https._tcp." + K, "SRV", NX, authority=NODATA),
    Row(API, "A", answer=(f"{API} 30 A 10.96.5.6",)),              # NodePort = ClusterIP
    Row(API, "SRV", answer=(f"{API} 30 SRV 0 50 8080 {API}", f"{API} 30 SRV 0 50 9090 {API}"),
        additional=(f"{API} 30 A 10.96.5.6",)),
    Row("_grpc._tcp." + API, "SRV", answer=(f"_grpc._tcp.{API} 30 SRV 0 100 9090 {API}",),
        additional=(f"{API} 30 A 10.96.5.6",)),
    Row("_http._tcp." + API, "SRV", answer=(f"_http._tcp.{API} 30 SRV 0 100 8080 {API}",),
        additional=(f"{API} 30 A 10.96.5.6",)),
    # kube-dns: dns/UDP and dns-tcp/TCP on 53 -> N=2, one SRV after de-dup (dns-rules §1.5)
    Row(KDNS, "A", answer=(f"{KDNS} 30 A 10.96.0.10",)),
    Row(KDNS, "SRV", answer=(f"{KDNS} 30 SRV 0 50 53 {KDNS}",), additional=(f"{KDNS} 30 A 10.96.0.10",)),
    Row("_dns._udp." + KDNS, "SRV", answer=(f"_dns._udp.{KDNS} 30 SRV 0 100 53 {KDNS}",),
        additional=(f"{KDNS} 30 A 10.96.0.10",)),
    Row("_dns-tcp._tcp." + KDNS, "SRV", answer=(f"_dns-tcp._tcp.{KDNS} 30 SRV 0 100 53 {KDNS}",),
        additional=(f"{KDNS} 30 A 10.96.0.10",)),
    Row("_dns._tcp." + KDNS, "SRV", NX, authority=NODATA),
    # dual-stack: N=2 -> weight 50, glue A and AAAA (dns-rules §1.5 consequences)
    Row(FE, "A", answer=(f"{FE} 30 A 10.96.7.7",)),
    Row(FE, "AAAA", answer=(f"{FE} 30 AAAA fd00:10:96::7",)),
    Row(FE, "SRV", answer=(f"{FE} 30 SRV 0 50 80 {FE}",),
        additional=(f"{FE} 30 A 10.96.7.7", f"{FE} 30 AAAA fd00:10:96::7")),
    Row("_http._tcp." + FE, "SRV", answer=(f"_http._tcp.{FE} 30 SRV 0 50 80 {FE}",),
        additional=(f"{FE} 30 A 10.96.7.7", f"{FE} 30 AAAA fd00:10:96::7")),
    Row("noports.default.svc.cluster.local.", "A",
        answer=("noports.default.svc.cluster.local. 30 A 10.96.8.8",)),
    Row("noports.default.svc.cluster.local.", "SRV", authority=NODATA),
    Row("unnamed.default.svc.cluster.local.", "SRV",
        answer=("unnamed.default.svc.cluster.local. 30 SRV 0 100 8080 unnamed.default.svc.cluster.local.",),
        additional=("unnamed.default.svc.cluster.local. 30 A 10.96.8.9",)),
    Row("_8080._tcp.unnamed.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    Row("_syslog._udp.udp.default.svc.cluster.local.", "SRV",
        answer=("_syslog._udp.udp.default.svc.cluster.local. 30 SRV 0 100 514 udp.default.svc.cluster.local.",),
        additional=("udp.default.svc.cluster.local. 30 A 10.96.8.30",)),
    Row("_sctp-x._sctp.udp.default.svc.cluster.local.", "SRV",
        answer=("_sctp-x._sctp.udp.default.svc.cluster.local. 30 SRV 0 100 9 udp.default.svc.cluster.local.",),
        additional=("udp.default.svc.cluster.local. 30 A 10.96.8.30",)),
    Row("_syslog._tcp.udp.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    # endpoint names of a ClusterIP service (C: dns-rules §1.2 last bullet); not-ready ones absent
    Row("10-244-1-10." + API, "A", answer=(f"10-244-1-10.{API} 30 A 10.244.1.10",)),
    Row("10-244-1-11." + API, "A", NX, authority=NODATA),
    Row("192-168-0-10." + K, "A", answer=(f"192-168-0-10.{K} 30 A 192.168.0.10",)),
    # ---- headless (dns-rules §1.3, §1.4, §1.5)
    Row(DB, "A", answer=(f"{DB} 30 A 10.244.2.10", f"{DB} 30 A 10.244.2.11")),
    Row(DB, "AAAA", answer=(f"{DB} 30 AAAA fd00:10:244:2::10",)),
    Row("Db.Prod.Svc.Cluster.Local.", "A", answer=("Db.Prod.Svc.Cluster.Local. 30 A 10.244.2.10",
                                                    "Db.Prod.Svc.Cluster.Local. 30 A 10.244.2.11")),
    Row(DB, "SRV", answer=(f"{DB} 30 SRV 0 33 5432 db-0.{DB}", f"{DB} 30 SRV 0 33 5432 db-1.{DB}"),
        additional=(f"db-0.{DB} 30 A 10.244.2.10", f"db-0.{DB} 30 AAAA fd00:10:244:2::10",
                    f"db-1.{DB} 30 A 10.244.2.11")),
    Row("_postgres._tcp." + DB, "SRV",
        answer=(f"_postgres._tcp.{DB} 30 SRV 0 33 5432 db-0.{DB}",
                f"_postgres._tcp.{DB} 30 SRV 0 33 5432 db-1.{DB}"),
        additional=(f"db-0.{DB} 30 A 10.244.2.10", f"db-0.{DB} 30 AAAA fd00:10:244:2::10",
                    f"db-1.{DB} 30 A 10.244.2.11")),
    Row("_postgres._udp." + DB, "SRV", NX, authority=NODATA),
    Row(DB, "TXT", authority=NODATA),
    Row(DB, "CNAME", authority=NODATA),
    Row("db-0." + DB, "A", answer=(f"db-0.{DB} 30 A 10.244.2.10",)),
    Row("db-0." + DB, "AAAA", answer=(f"db-0.{DB} 30 AAAA fd00:10:244:2::10",)),
    Row("DB-0." + DB, "A", answer=(f"DB-0.{DB} 30 A 10.244.2.10",)),
    Row("db-1." + DB, "AAAA", authority=NODATA),
    Row("db-1." + DB, "SRV", authority=NODATA),
    Row("db-2." + DB, "A", NX, authority=NODATA),              # not ready
    Row("10-244-2-10." + DB, "A", NX, authority=NODATA),       # hostname wins over the IP
    Row("x.db-0." + DB, "A", NX, authority=NODATA),
    Row(CACHE, "SRV", answer=(f"{CACHE} 30 SRV 0 100 6379 10-244-3-5.{CACHE}",),
        additional=(f"10-244-3-5.{CACHE} 30 A 10.244.3.5",)),
    Row("10-244-3-5." + CACHE, "A", answer=(f"10-244-3-5.{CACHE} 30 A 10.244.3.5",)),
    Row("cache-6b9f-ccccc." + CACHE, "A", NX, authority=NODATA),  # pod names only with option
    # IPv6 dashed labels and de-duplication across slices (dns-rules §1.4)
    Row(SIX, "AAAA", answer=(f"{SIX} 30 AAAA 2001:db8:3333:4444:5555:6666::",
                             f"{SIX} 30 AAAA 5678:abcd::1")),
    Row(SIX, "A", authority=NODATA),
    Row("2001-db8-3333-4444-5555-6666--0." + SIX, "AAAA",
        answer=(f"2001-db8-3333-4444-5555-6666--0.{SIX} 30 AAAA 2001:db8:3333:4444:5555:6666::",)),
    Row("5678-abcd--1." + SIX, "AAAA", answer=(f"5678-abcd--1.{SIX} 30 AAAA 5678:abcd::1",)),
    Row("_http._tcp." + SIX, "SRV",
        answer=(f"_http._tcp.{SIX} 30 SRV 0 33 8080 2001-db8-3333-4444-5555-6666--0.{SIX}",
                f"_http._tcp.{SIX} 30 SRV 0 33 8080 5678-abcd--1.{SIX}"),
        additional=(f"2001-db8-3333-4444-5555-6666--0.{SIX} 30 AAAA 2001:db8:3333:4444:5555:6666::",
                    f"5678-abcd--1.{SIX} 30 AAAA 5678:abcd::1")),
    # one hostname on two endpoints: both addresses; one SRV per (target, port), N before de-dup
    Row("shared." + TWINS, "A", answer=(f"shared.{TWINS} 30 A 10.244.5.1", f"shared.{TWINS} 30 A 10.244.5.2")),
    Row("_http._tcp." + TWINS, "SRV", answer=(f"_http._tcp.{TWINS} 30 SRV 0 50 80 shared.{TWINS}",),
        additional=(f"shared.{TWINS} 30 A 10.244.5.1", f"shared.{TWINS} 30 A 10.244.5.2")),
    Row("_dns._udp." + TWINS, "SRV", answer=(f"_dns._udp.{TWINS} 30 SRV 0 50 53 shared.{TWINS}",),
        additional=(f"shared.{TWINS} 30 A 10.244.5.1", f"shared.{TWINS} 30 A 10.244.5.2")),
    Row(TWINS, "SRV", answer=(f"{TWINS} 30 SRV 0 25 80 shared.{TWINS}", f"{TWINS} 30 SRV 0 25 53 shared.{TWINS}"),
        additional=(f"shared.{TWINS} 30 A 10.244.5.1", f"shared.{TWINS} 30 A 10.244.5.2")),
    # headless without ports: A yes, bare SRV NODATA, port SRV NXDOMAIN (dns-rules §1.3)
    Row("portless.default.svc.cluster.local.", "A",
        answer=("portless.default.svc.cluster.local. 30 A 10.244.6.1",)),
    Row("portless.default.svc.cluster.local.", "SRV", authority=NODATA),
    Row("_http._tcp.portless.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    # headless without ready endpoints: NXDOMAIN for every type (dns-rules §1.3, §1.13)
    Row("nohosts.default.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("nohosts.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    Row("notready.default.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("notready.default.svc.cluster.local.", "AAAA", NX, authority=NODATA),
    Row("_http._tcp.notready.default.svc.cluster.local.", "SRV", NX, authority=NODATA),
    # v1 Endpoints fallback (dns-rules §1.13): ready addresses only
    Row(LEGACY, "A", answer=(f"{LEGACY} 30 A 10.244.9.1", f"{LEGACY} 30 A 10.244.9.2")),
    Row("legacy-0." + LEGACY, "A", answer=(f"legacy-0.{LEGACY} 30 A 10.244.9.1",)),
    Row("10-244-9-2." + LEGACY, "A", answer=(f"10-244-9-2.{LEGACY} 30 A 10.244.9.2",)),
    Row("legacy-3." + LEGACY, "A", NX, authority=NODATA),
    Row("_web._tcp." + LEGACY, "SRV",
        answer=(f"_web._tcp.{LEGACY} 30 SRV 0 50 8000 legacy-0.{LEGACY}",
                f"_web._tcp.{LEGACY} 30 SRV 0 50 8000 10-244-9-2.{LEGACY}"),
        additional=(f"legacy-0.{LEGACY} 30 A 10.244.9.1", f"10-244-9-2.{LEGACY} 30 A 10.244.9.2")),
    # ---- ExternalName (dns-rules §1.6)
    Row("search.prod.svc.cluster.local.", "CNAME",
        answer=("search.prod.svc.cluster.local. 30 CNAME search.example.com.",)),
    # Target outside the cluster: the forwarder adds the target's records, so
    # the image hands off every type but CNAME.
    Row("search.prod.svc.cluster.local.", "A", "HANDOFF"),
    Row("Search.Prod.svc.cluster.local.", "AAAA", "HANDOFF"),
    Row("x.search.prod.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("_http._tcp.search.prod.svc.cluster.local.", "SRV", NX, authority=NODATA),
    Row("api-alias.prod.svc.cluster.local.", "A",
        answer=(f"api-alias.prod.svc.cluster.local. 30 CNAME {API}", f"{API} 30 A 10.96.5.6")),
    Row("api-alias.prod.svc.cluster.local.", "AAAA",
        answer=(f"api-alias.prod.svc.cluster.local. 30 CNAME {API}",), authority=NODATA),
    Row("api-alias.prod.svc.cluster.local.", "SRV",
        answer=(f"api-alias.prod.svc.cluster.local. 30 CNAME {API}",
                f"{API} 30 SRV 0 50 8080 {API}", f"{API} 30 SRV 0 50 9090 {API}"),
        additional=(f"{API} 30 A 10.96.5.6",)),
    Row("alias2.default.svc.cluster.local.", "A",
        answer=("alias2.default.svc.cluster.local. 30 CNAME api-alias.prod.svc.cluster.local.",
                f"api-alias.prod.svc.cluster.local. 30 CNAME {API}", f"{API} 30 A 10.96.5.6")),
    Row("ghost.default.svc.cluster.local.", "A", NX,      # RFC 6604: rcode of the last name
        answer=("ghost.default.svc.cluster.local. 30 CNAME nope.default.svc.cluster.local.",),
        authority=NODATA),
    Row("ipext.default.svc.cluster.local.", "A", NX, authority=NODATA),   # C: IP target
    # ---- invalid objects are skipped, the rest is served
    Row("bad_name.default.svc.cluster.local.", "A", NX, authority=NODATA),
    Row("badip.default.svc.cluster.local.", "A", NX, authority=NODATA),
    # ---- PTR (dns-rules §1.7)
    Row("1.0.96.10.in-addr.arpa.", "PTR", answer=(f"1.0.96.10.in-addr.arpa. 30 PTR {K}",)),
    Row("1.0.96.10.IN-ADDR.ARPA.", "PTR", answer=(f"1.0.96.10.IN-ADDR.ARPA. 30 PTR {K}",)),
    Row("1.0.96.10.in-addr.arpa.", "A", authority=NODATA),
    Row("10.0.96.10.in-addr.arpa.", "PTR", answer=(f"10.0.96.10.in-addr.arpa. 30 PTR {KDNS}",)),
    Row("7.7.96.10.in-addr.arpa.", "PTR", answer=(f"7.7.96.10.in-addr.arpa. 30 PTR {FE}",)),
    Row("7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa.", "PTR",
        answer=(f"7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa. 30 PTR {FE}",)),
    Row("7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.D.F.ip6.arpa.", "PTR",
        answer=(f"7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.D.F.ip6.arpa. 30 PTR {FE}",)),
    Row("10.2.244.10.in-addr.arpa.", "PTR", answer=(f"10.2.244.10.in-addr.arpa. 30 PTR db-0.{DB}",)),
    Row("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa.", "PTR",
        answer=(f"0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa. 30 PTR db-0.{DB}",)),
    Row(reverse_name("5678:abcd::1"), "PTR",
        answer=(f"{reverse_name('5678:abcd::1')} 30 PTR 5678-abcd--1.{SIX}",)),
    Row("10.1.244.10.in-addr.arpa.", "PTR",             # ClusterIP endpoint (C)
        answer=(f"10.1.244.10.in-addr.arpa. 30 PTR 10-244-1-10.{API}",)),
    Row("2.0.244.10.in-addr.arpa.", "PTR",              # one PTR per distinct target
        answer=(f"2.0.244.10.in-addr.arpa. 30 PTR 10-244-0-2.{KDNS}",
                "2.0.244.10.in-addr.arpa. 30 PTR dns-a.shared-ip.kube-system.svc.cluster.local.")),
    Row("1.9.244.10.in-addr.arpa.", "PTR", answer=(f"1.9.244.10.in-addr.arpa. 30 PTR legacy-0.{LEGACY}",)),
    Row("11.1.244.10.in-addr.arpa.", "PTR", "HANDOFF"),   # not ready: not ours
    Row("9.9.9.9.in-addr.arpa.", "PTR", "HANDOFF"),       # misses go upstream (dns-rules §2.6)
    Row("96.10.in-addr.arpa.", "PTR", "HANDOFF"),
    Row("8.8.96.10.in-addr.arpa.", "PTR", answer=("8.8.96.10.in-addr.arpa. 30 PTR noports.default.svc.cluster.local.",)),
    # ---- pods, insecure (dns-rules §1.8)
    Row("10-1-2-3.default.pod.cluster.local.", "A", answer=("10-1-2-3.default.pod.cluster.local. 30 A 10.1.2.3",)),
    Row("10-1-2-3.DEFAULT.pod.cluster.local.", "A", answer=("10-1-2-3.DEFAULT.pod.cluster.local. 30 A 10.1.2.3",)),
    Row("10-1-2-3.default.pod.cluster.local.", "AAAA", authority=NODATA),
    Row("fd00-10-244-1--5.prod.pod.cluster.local.", "AAAA",
        answer=("fd00-10-244-1--5.prod.pod.cluster.local. 30 AAAA fd00:10:244:1::5",)),
    Row("fd00-10-244-1--5.prod.pod.cluster.local.", "A", authority=NODATA),
    Row("10-1-2-3.empty.pod.cluster.local.", "A", answer=("10-1-2-3.empty.pod.cluster.local. 30 A 10.1.2.3",)),
    Row("10-1-2-3.nons.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("1-2-3.default.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("300-1-2-3.default.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("default.pod.cluster.local.", "A", authority=NODATA),
    Row("nons.pod.cluster.local.", "A", NX, authority=NODATA),
    # ---- outside every zone: the forwarder's
    Row("google.com.", "A", "HANDOFF"),
    Row("local.", "SOA", "HANDOFF"),
    Row("cluster.local.example.com.", "A", "HANDOFF"),
]


@pytest.fixture(scope="module")
def image_bytes():
    return build_image()


@pytest.fixture(scope="module", params=sorted(IMPLS))
def img(request, image_bytes):
    return mapped(image_bytes, request.param)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.qname}/{r.qtype}" for r in ROWS])
def test_rule(img, row):
    run(img, row)


def test_table_is_large():
    assert len(ROWS) > 100


def test_tcp_gives_the_same_reply(img):
    for row in ROWS[:40]:
        q = dns.message.make_query(row.qname, row.qtype, use_edns=False).to_wire()
        assert img.answer(q, tcp=True) == img.answer(q)


def test_fastpath_gives_the_reference_bytes(image_bytes):
    if "fastpath" not in IMPLS:
        unavailable("kdns.packet._fastpath is not built (make install builds it)")
    ref, fast = mapped(image_bytes, "refpath"), mapped(image_bytes, "fastpath")
    for row in ROWS:
        for edns in (False, True):
            q = dns.message.make_query(row.qname, row.qtype, use_edns=edns).to_wire()
            assert fast.answer(q) == ref.answer(q), row


# ---- option variants: each changes the rules, so each gets its own image


VERIFIED = [
    Row("10-244-1-10.development.pod.cluster.local.", "A",
        answer=("10-244-1-10.development.pod.cluster.local. 30 A 10.244.1.10",)),
    Row("10-244-1-11.development.pod.cluster.local.", "A",     # Pending still counts (C)
        answer=("10-244-1-11.development.pod.cluster.local. 30 A 10.244.1.11",)),
    Row("10-244-1-12.development.pod.cluster.local.", "A", NX, authority=NODATA),  # Succeeded
    Row("10-244-2-12.prod.pod.cluster.local.", "A", NX, authority=NODATA),  # being deleted
    Row("10-244-1-10.prod.pod.cluster.local.", "A", NX, authority=NODATA),  # other namespace
    Row("10-1-2-3.default.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("10-244-0-2.kube-system.pod.cluster.local.", "A",
        answer=("10-244-0-2.kube-system.pod.cluster.local. 30 A 10.244.0.2",)),
    Row("prod.pod.cluster.local.", "A", authority=NODATA),
]

DISABLED = [
    Row("10-1-2-3.default.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("default.pod.cluster.local.", "A", NX, authority=NODATA),
    Row("pod.cluster.local.", "A", authority=NODATA),
    Row(K, "A", answer=(f"{K} 30 A 10.96.0.1",)),
]

POD_NAMES = [
    Row("cache-6b9f-ccccc." + CACHE, "A", answer=(f"cache-6b9f-ccccc.{CACHE} 30 A 10.244.3.5",)),
    Row("10-244-3-5." + CACHE, "A", NX, authority=NODATA),
    Row("db-0." + DB, "A", answer=(f"db-0.{DB} 30 A 10.244.2.10",)),   # hostname still first
    Row(CACHE, "SRV", answer=(f"{CACHE} 30 SRV 0 100 6379 cache-6b9f-ccccc.{CACHE}",),
        additional=(f"cache-6b9f-ccccc.{CACHE} 30 A 10.244.3.5",)),
]


@pytest.mark.parametrize("options,rows", [
    ({"pods": "verified"}, VERIFIED), ({"pods": "disabled"}, DISABLED),
    ({"endpoint_pod_names": True}, POD_NAMES)], ids=["verified", "disabled", "pod-names"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_option_rules(options, rows, impl):
    img = mapped(build_image(**options), impl)
    for row in rows:
        run(img, row)


def test_ttl_applies_everywhere_and_soa_ttl_is_capped():
    """dns-rules §2.2/§2.3: every record TTL = ttl; SOA TTL min(ttl, 300); SOA MINIMUM = ttl."""
    img = mapped(build_image(ttl=600))
    run(img, Row(K, "A", answer=(f"{K} 600 A 10.96.0.1",)))
    run(img, Row(K, "AAAA", authority=NODATA), ttl=300, minimum=600)
    run(img, Row("nope.cluster.local.", "A", NX, authority=NODATA), ttl=300, minimum=600)
    run(img, Row("10-1-2-3.default.pod.cluster.local.", "A",
                 answer=("10-1-2-3.default.pod.cluster.local. 600 A 10.1.2.3",)))


def test_other_domain():
    img = mapped(I.compile_image(*_zd_args(domain="Example.Test")))
    q = dns.message.make_query("kubernetes.default.svc.example.test.", "A", use_edns=False)
    action, wire = img.answer(q.to_wire())
    assert section_lines(dns.message.from_wire(wire).answer) == [
        "kubernetes.default.svc.example.test. 30 A 10.96.0.1"]
    q = dns.message.make_query(K, "A", use_edns=False)
    assert img.answer(q.to_wire())[0] == refpath.ACTION_HANDOFF


def _zd_args(**options):
    zd = records.zone_data(build_model(), serial=SERIAL, **options)
    return zd.rrsets, zd.zones


def test_invalid_objects_warn_once_each(caplog):
    with caplog.at_level(logging.WARNING):
        zd = records.zone_data(build_model(), serial=SERIAL)
    text = "\n".join(caplog.messages)
    for needle in ("Service default/Bad_Name", "Service default/ipext", "Service default/badip",
                   "EndpointSlice default/orphan"):
        assert text.count(needle) == 1, text
    assert len(zd.warnings) == len(set(zd.warnings))


def test_serial_follows_the_model():
    model = build_model()
    first = records.zone_data(model).serial
    model.apply({"kind": "Service", "metadata": {"name": "new", "namespace": "default"},
                 "spec": {"clusterIP": "10.96.9.9"}})
    assert records.zone_data(model).serial > first


def test_identical_input_gives_identical_image():
    assert build_image() == build_image()


def test_compile_file_and_master_file(tmp_path):
    img = build.compile_file(EXAMPLE, serial=7)
    zd = records.zone_data(records.model_from_file(EXAMPLE), serial=7)
    assert img == I.compile_image(zd.rrsets, zd.zones, exists=zd.exists, serial=7)
    text = records.master_file(EXAMPLE, serial=7)
    lines = [line for line in text.splitlines() if not line.startswith(";")]
    assert f"{K}\t30\tIN\tA\t10.96.0.1" in lines
    assert "dns-version.cluster.local.\t30\tIN\tTXT\t\"1.1.0\"" in lines
    assert len(lines) == sum(len(s.rdatas) for s in zd.rrsets)
    # master-file order: grouped by name, names in reversed-label order
    keys = [tuple(reversed(line.split("\t")[0].rstrip(".").split("."))) for line in lines]
    assert keys == sorted(keys)


def test_compile_file_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: List\nitems: [\n")
    with pytest.raises(records.InputError, match="bad.yaml"):
        build.compile_file(str(bad))
    with pytest.raises(records.InputError, match="no such file"):
        records.master_file(str(tmp_path / "missing.yaml"))


def test_unknown_pods_mode_is_refused():
    with pytest.raises(ValueError, match="pods"):
        records.zone_data(ClusterModel(), pods="sometimes")


def test_identical_input_gives_identical_image_across_processes():
    """Set and dict order of bytes keys changes with PYTHONHASHSEED; the image must not
    (workers and tests compare images by bytes). This caught reverse-table blob order."""
    import hashlib
    import subprocess
    import sys
    code = ("import hashlib, sys; sys.path.insert(0, 'tests'); import test_records as t; "
            "print(hashlib.sha256(t.build_image()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
               for seed in ("1", "2", "3")}
    assert len(digests) == 1 and hashlib.sha256(build_image()).hexdigest() + "\n" in digests


def test_names_too_long_for_the_domain_are_skipped_not_fatal(caplog):
    """Each part is a valid label, yet with a long --domain a name can exceed 255 bytes
    (RFC 1035 §2.3.4): that name is skipped with a warning, the rest of the zone compiles."""
    model = ClusterModel()
    ns, svc = "b" * 63, "a" * 63
    model.apply({"kind": "Service", "metadata": {"name": svc, "namespace": ns},
                 "spec": {"clusterIP": "None", "ports": [{"name": "c" * 15, "port": 1}]}})
    model.apply({"kind": "EndpointSlice",
                 "metadata": {"name": "s", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
                 "endpoints": [{"addresses": ["10.0.0.1"], "hostname": "h" * 63}],
                 "ports": [{"name": "c" * 15, "port": 1}]})
    model.apply({"kind": "Service", "metadata": {"name": "ok", "namespace": "default"},
                 "spec": {"clusterIP": "10.96.0.1"}})
    domain = "x" * 60 + ".example"
    with caplog.at_level(logging.WARNING):
        zd = records.zone_data(model, domain=domain, serial=1)
    img = refpath.Image(I.compile_image(zd.rrsets, zd.zones, exists=zd.exists, serial=1))
    assert any("longer than 255 bytes" in m for m in caplog.messages)
    q = dns.message.make_query(f"ok.default.svc.{domain}.", "A", use_edns=False)
    assert section_lines(dns.message.from_wire(refpath.answer(img, q.to_wire())[1]).answer) == [
        f"ok.default.svc.{domain}. 30 A 10.96.0.1"]
    q = dns.message.make_query(f"{svc}.{ns}.svc.{domain}.", "A", use_edns=False)
    assert section_lines(dns.message.from_wire(refpath.answer(img, q.to_wire())[1]).answer) == [
        f"{svc}.{ns}.svc.{domain}. 30 A 10.0.0.1"]


def test_compile_model_before_sync_is_servfail_not_nxdomain():
    img = mapped(build.compile_model(build_model(), synced=False, serial=SERIAL))
    for name in (K, "nope.default.svc.cluster.local."):
        action, wire = img.answer(dns.message.make_query(name, "A", use_edns=False).to_wire())
        assert dns.message.from_wire(wire).rcode() == dns.rcode.SERVFAIL
    synced = mapped(build.compile_model(build_model(), serial=SERIAL))
    run(synced, Row(K, "A", answer=(f"{K} 30 A 10.96.0.1",)))
