"""Autopath (CoreDNS ``autopath @kubernetes``): the walk of a pod's search path, table by
table on both packet paths and both compilers (tests/test_autopath_e2e.py: through a running
``kdns serve``).

The walk, for a pod of namespace N asking <base>.N.svc.<zone> that does not exist: the
first of <base>.svc.<zone>, <base>.<zone>, <base>.<server search domain>..., <base> that is
not NXDOMAIN answers, behind a CNAME from the asked name (TTL: the first answer record's); a
NODATA answers without one; all NXDOMAIN: the asked name's own NXDOMAIN.
"""
from __future__ import annotations

import os
import random
import struct

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from conftest import unavailable
from kdns.kube import records
from kdns.kube.model import ClusterModel
from kdns.serve import build
from kdns.serve.incremental import IncrementalCompiler
from kdns.zone import encode, refpath
from kdns.zone import image as I
from kdns.zone.layout import APENT, APHDR, HEADER_AUTOPATH

try:
    from kdns.packet import _fastpath
except ImportError:                     # pragma: no cover - `make install` builds it
    unavailable("the compiled packet path is not built: both paths must be compared")

ZONE = "cluster.local"
DEV, PROD, UNKNOWN, KUBE = "127.0.0.21", "127.0.0.22", "127.0.0.99", "127.0.0.23"

CLUSTER = [
    {"kind": "Namespace", "metadata": {"name": n}} for n in ("default", "development", "prod")
] + [
    {"kind": "Service", "metadata": {"namespace": "default", "name": "kubernetes"},
     "spec": {"clusterIP": "10.96.0.1",
              "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}},
    {"kind": "Service", "metadata": {"namespace": "development", "name": "test"},
     "spec": {"clusterIP": "10.96.1.5"}},
    {"kind": "Service", "metadata": {"namespace": "prod", "name": "db"},
     "spec": {"clusterIP": "10.96.2.7",
              "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]}},
    # Headless, many endpoints: a long answer that a 512-byte reply must cut.
    {"kind": "Service", "metadata": {"namespace": "prod", "name": "many"},
     "spec": {"clusterIP": "None"}},
    {"kind": "Endpoints", "metadata": {"namespace": "prod", "name": "many"},
     "subsets": [{"addresses": [{"ip": f"10.244.9.{i}"} for i in range(1, 60)],
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}]},
    {"kind": "Service", "metadata": {"namespace": "prod", "name": "out"},
     "spec": {"type": "ExternalName", "externalName": "www.example.com"}},
] + [
    {"kind": "Pod", "metadata": {"namespace": ns, "name": f"p-{ip.replace('.', '-')}"},
     "status": {"phase": "Running", "podIP": ip}}
    for ns, ip in (("development", DEV), ("prod", PROD), ("development", "fd00::21"),
                   ("kube-system", KUBE))
]


def model() -> ClusterModel:
    m = ClusterModel(clock=lambda: 1_700_000_000)
    for obj in CLUSTER:
        m.apply(obj)
    return m


SEARCH = ("example.org",)


@pytest.fixture(scope="module")
def images():
    img = build.compile_model(model(), domain=ZONE, autopath=SEARCH)
    plain = build.compile_model(model(), domain=ZONE)
    return img, plain


def both(img: bytes, q: bytes, client: str | None, tcp=False):
    """(action, reply) from refpath, asserting the compiled path gives the same bytes."""
    key = encode.ip_key(client) if client else None
    want = refpath.answer(refpath.Image(img), q, tcp=tcp, edns_max=1232, client=key)
    got = _fastpath.answer(_fastpath.Image(img), q, tcp, edns_max=1232, client=key)
    assert got == want, q
    return want


def ask(img, name, qtype="A", client=DEV, tcp=False, edns=True, payload=1232):
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False, payload=payload)
    action, wire = both(img, q.to_wire(), client, tcp)
    return action, (dns.message.from_wire(wire) if wire else None)


def chain(m: dns.message.Message) -> list[str]:
    return [f"{rr.name} {dns.rdatatype.to_text(rr.rdtype)} {r.to_text()}"
            for rr in m.answer for r in rr]


def test_the_first_candidate_is_the_asked_name_itself(images):
    _, m = ask(images[0], "test.development.svc.cluster.local")
    assert chain(m) == ["test.development.svc.cluster.local. A 10.96.1.5"]


def test_service_of_another_namespace_by_its_short_name(images):
    # "db.prod" from a pod in development: the resolver's first try, answered from
    # <base>.svc.<zone> behind a CNAME.
    action, m = ask(images[0], "db.prod.development.svc.cluster.local")
    assert action == refpath.ACTION_SEND and m.rcode() == dns.rcode.NOERROR
    assert chain(m) == ["db.prod.development.svc.cluster.local. CNAME db.prod.svc.cluster.local.",
                        "db.prod.svc.cluster.local. A 10.96.2.7"]
    assert m.answer[0].ttl == m.answer[1].ttl == 30
    assert m.flags & dns.flags.AA
    assert str(m.question[0].name) == "db.prod.development.svc.cluster.local."


def test_third_step_base_under_the_zone(images):
    _, m = ask(images[0], "kubernetes.default.svc.development.svc.cluster.local")
    assert chain(m) == [
        "kubernetes.default.svc.development.svc.cluster.local. CNAME kubernetes.default.svc.cluster.local.",
        "kubernetes.default.svc.cluster.local. A 10.96.0.1"]


def test_srv_with_additional_records_keeps_valid_compression(images):
    _, m = ask(images[0], "_sql._tcp.db.prod.development.svc.cluster.local", "SRV")
    assert chain(m) == [
        "_sql._tcp.db.prod.development.svc.cluster.local. CNAME _sql._tcp.db.prod.svc.cluster.local.",
        "_sql._tcp.db.prod.svc.cluster.local. SRV 0 100 5432 db.prod.svc.cluster.local."]
    assert [f"{rr.name} {r}" for rr in m.additional for r in rr] == [
        "db.prod.svc.cluster.local. 10.96.2.7"]


def test_nodata_answers_without_a_cname(images):
    _, m = ask(images[0], "db.prod.development.svc.cluster.local", "AAAA")
    assert m.rcode() == dns.rcode.NOERROR and m.answer == []
    assert [rr.rdtype for rr in m.authority] == [dns.rdatatype.SOA]
    assert str(m.authority[0].name) == "cluster.local."


def test_a_long_answer_is_cut_to_whole_records_with_tc(images):
    _, m = ask(images[0], "many.prod.development.svc.cluster.local", edns=False)
    assert m.flags & dns.flags.TC
    assert str(m.answer[0].name) == "many.prod.development.svc.cluster.local."
    assert m.answer[0].rdtype == dns.rdatatype.CNAME
    _, full = ask(images[0], "many.prod.development.svc.cluster.local", tcp=True)
    assert not full.flags & dns.flags.TC and len(list(full.answer[1])) == 59


def test_only_the_clients_own_namespace_is_walked(images):
    # A pod in prod asking under development.svc: not its search path.
    _, m = ask(images[0], "db.prod.development.svc.cluster.local", client=PROD)
    assert m.rcode() == dns.rcode.NXDOMAIN


def test_unknown_clients_get_todays_answer(images):
    img, plain = images
    q = dns.message.make_query("db.prod.development.svc.cluster.local", "A").to_wire()
    assert both(img, q, UNKNOWN) == both(img, q, None) == both(plain, q, DEV)
    assert dns.message.from_wire(both(img, q, UNKNOWN)[1]).rcode() == dns.rcode.NXDOMAIN


def test_ipv6_and_mapped_clients(images):
    _, m = ask(images[0], "db.prod.development.svc.cluster.local", client="fd00::21")
    assert len(m.answer) == 2
    assert encode.ip_key("::ffff:127.0.0.21") == encode.ip_key(DEV)
    _, m = ask(images[0], "db.prod.development.svc.cluster.local", client="::ffff:127.0.0.21")
    assert len(m.answer) == 2


def test_names_nowhere_in_the_image_go_to_the_forwarder_steps(images):
    img = images[0]
    action, _ = ask(img, "www.example.com.development.svc.cluster.local")
    assert action == refpath.ACTION_HANDOFF
    q = dns.message.make_query("www.example.com.development.svc.cluster.local", "A").to_wire()
    base, cands = refpath.autopath_plan(refpath.Image(img), q, DEV)
    assert cands == [(b"\x03www\x07example\x03com\x03svc\x07cluster\x05local\x00", True),
                     (b"\x03www\x07example\x03com\x07cluster\x05local\x00", True),
                     (b"\x03www\x07example\x03com\x07example\x03org\x00", False),
                     (b"\x03www\x07example\x03com\x00", False)]
    # Not autopath's: an unknown client, a name that exists, an image without autopath.
    assert refpath.autopath_plan(refpath.Image(img), q, UNKNOWN) is None
    q2 = dns.message.make_query("test.development.svc.cluster.local", "A").to_wire()
    assert refpath.autopath_plan(refpath.Image(img), q2, DEV) is None
    assert refpath.autopath_plan(refpath.Image(images[1]), q, DEV) is None


def test_an_externalname_candidate_is_the_hand_offs(images):
    # Its CNAME leaves the cluster: the hand-off completes it (test_autopath_e2e.py).
    action, _ = ask(images[0], "out.prod.development.svc.cluster.local")
    assert action == refpath.ACTION_HANDOFF


def test_the_asked_base_itself_from_the_image():
    # No server search domains: after <base>.svc.<zone> and <base>.<zone>, <base> alone, a
    # full cluster name the pod wrote without the trailing dot.
    img = build.compile_model(model(), domain=ZONE, autopath=())
    _, m = ask(img, "db.prod.svc.cluster.local.development.svc.cluster.local")
    assert chain(m) == [
        "db.prod.svc.cluster.local.development.svc.cluster.local. CNAME db.prod.svc.cluster.local.",
        "db.prod.svc.cluster.local. A 10.96.2.7"]
    # A NODATA there comes behind the CNAME (RFC 2308 §2.2).
    _, m = ask(img, "db.prod.svc.cluster.local.development.svc.cluster.local", "AAAA")
    assert m.rcode() == dns.rcode.NOERROR and [rr.rdtype for rr in m.answer] == [
        dns.rdatatype.CNAME] and [rr.rdtype for rr in m.authority] == [dns.rdatatype.SOA]
    # Outside every zone: the hand-off's.
    action, _ = ask(img, "www.example.com.development.svc.cluster.local")
    assert action == refpath.ACTION_HANDOFF
    # Every step NXDOMAIN in the image: the asked name's own.
    _, m = ask(img, "nope.prod.svc.cluster.local.development.svc.cluster.local")
    assert m.rcode() == dns.rcode.NXDOMAIN


def test_case_and_edns_variants_agree_on_both_paths(images):
    rng = random.Random(5)
    names = ["db.prod", "kubernetes.default.svc", "_sql._tcp.db.prod", "many.prod", "nope",
             "default", "test", "p-127-0-0-21.development.pod"]
    for _ in range(300):
        base = rng.choice(names)
        name = "".join(c.upper() if rng.random() < 0.5 else c
                       for c in f"{base}.development.svc.cluster.local")
        qtype = rng.choice(["A", "AAAA", "SRV", "ANY", "TXT", "PTR"])
        q = dns.message.make_query(name, qtype, use_edns=rng.choice([False, 0]),
                                   payload=rng.choice([512, 1232, 4096]))
        q.id = rng.randrange(65536)
        both(images[0], q.to_wire(), rng.choice([DEV, PROD, UNKNOWN]),
             tcp=rng.random() < 0.2)


def test_full_and_reference_compilers_agree():
    zd = records.zone_data(model(), domain=ZONE)
    section = build.autopath_image(model(), SEARCH)
    ref = I.ReferenceCompiler(list(zd.zones), True, zd.serial).build(
        list(zd.rrsets), list(zd.exists), section)
    assert ref == build.compile_model(model(), domain=ZONE, autopath=SEARCH)
    assert struct.unpack_from("<I", ref, HEADER_AUTOPATH)[0] > 0


def test_incremental_follows_pod_changes():
    m = model()
    inc = IncrementalCompiler(domain=ZONE, autopath=SEARCH)
    assert inc.compile(m, synced=True, changed=set()) == build.compile_model(
        m, domain=ZONE, autopath=SEARCH)
    pod = {"kind": "Pod", "metadata": {"namespace": "prod", "name": "moved"},
           "status": {"phase": "Running", "podIP": "127.0.0.30"}}
    m.apply(pod)
    got = inc.compile(m, synced=True, changed={("Pod", "prod", "moved")})
    assert got == build.compile_model(m, domain=ZONE, autopath=SEARCH)
    q = dns.message.make_query("test.development.prod.svc.cluster.local", "A").to_wire()
    assert len(dns.message.from_wire(both(got, q, "127.0.0.30")[1]).answer) == 2
    m.delete("Pod", "prod", "moved")
    got = inc.compile(m, synced=True, changed={("Pod", "prod", "moved")})
    assert got == build.compile_model(m, domain=ZONE, autopath=SEARCH)
    assert dns.message.from_wire(both(got, q, "127.0.0.30")[1]).rcode() == dns.rcode.NXDOMAIN


def test_section_bytes_depend_on_the_pairs_only():
    a = encode.autopath_section([("10.0.0.2", "b"), ("10.0.0.1", "a"), ("10.0.0.2", "a")])
    b = encode.autopath_section([("10.0.0.2", "a"), ("10.0.0.1", "a")])
    assert a == b
    count, nsearch, search_off, _ = APHDR.unpack_from(a, 0)
    assert (count, nsearch) == (2, 0) and search_off == len(a)


def test_the_layout_checker_covers_the_section(images):
    img = bytearray(images[0])
    sec = struct.unpack_from("<I", img, HEADER_AUTOPATH)[0]
    first = sec + APHDR.size
    # Keys out of order: the binary search would miss pods.
    bad = bytearray(img)
    k0, k1 = bytes(bad[first:first + 16]), bytes(bad[first + APENT.size:first + APENT.size + 16])
    bad[first:first + 16], bad[first + APENT.size:first + APENT.size + 16] = k1, k0
    with pytest.raises(ValueError, match="autopath entry 1"):
        _fastpath.Image(bytes(bad))
    bad = bytearray(img)
    struct.pack_into("<I", bad, first + 16, len(bad))          # namespace label outside
    with pytest.raises(ValueError, match="autopath entry 0"):
        _fastpath.Image(bytes(bad))
    bad = bytearray(img)
    struct.pack_into("<I", bad, sec, 1 << 30)                  # count past the image
    with pytest.raises(ValueError, match="autopath section"):
        _fastpath.Image(bytes(bad))


def test_flag_and_corefile_turn_it_on_with_the_servers_search_domains(tmp_path):
    from kdns import cli
    from kdns.forward.kubedns_config import parse_resolv_search
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search old.example\nnameserver 10.0.0.1\n"
                      "search Corp.Example. us-west-2.compute.internal # last wins\n")
    assert parse_resolv_search(str(resolv)) == ("corp.example", "us-west-2.compute.internal")
    assert parse_resolv_search(str(tmp_path / "missing")) == ()
    p = cli.build_parser()
    a = p.parse_args(["serve", "--resolv-conf", str(resolv)])
    assert cli._autopath(a) is None                      # off by default
    a = p.parse_args(["serve", "--autopath", "--resolv-conf", str(resolv)])
    assert cli._autopath(a) == ("corp.example", "us-west-2.compute.internal")
    kubeadm = open(os.path.join(os.path.dirname(__file__), "corefiles", "kubeadm.Corefile")).read()
    core = tmp_path / "Corefile"
    core.write_text(kubeadm.replace("    loadbalance\n", "    loadbalance\n    autopath @kubernetes\n"))
    assert "autopath @kubernetes" in core.read_text()
    a = p.parse_args(["serve", "--corefile", str(core), "--resolv-conf", str(resolv)])
    assert cli._apply_corefile(a, cli._serve_parser()) is None
    assert cli._autopath(a) == ("corp.example", "us-west-2.compute.internal")
