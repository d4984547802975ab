"""The Corefile's ``hosts`` plugin: hosts lines (good and bad, errors naming file:line), the
directive's options, the zones its records get, and the image they compile into: the
compiled and reference compilers and packet paths agree byte for byte, CoreDNS's answers
(NODATA without SOA, fallthrough or SERVFAIL), hosts before the cluster for a name or an
address both have, and the incremental compiler giving the full compile's bytes while the
records change.
"""
from __future__ import annotations

import random

import dns.message
import dns.rcode
import pytest

from kdns.dns import rr as R
from kdns.forward import corefile as cf
from kdns.forward import hosts as H
from kdns.kube import records
from kdns.kube.model import ClusterModel
from kdns.packet import _fastpath as F
from kdns.serve import build
from kdns.serve.incremental import IncrementalCompiler
from kdns.zone import image as I
from kdns.zone import refpath as P
from kdns.zone.oracle import ReferenceCompiler
from test_incremental import ZONE, step

SPEC = H.HostsSpec(where="Corefile:3", fallthrough=())


def parse(text: str, spec: H.HostsSpec = SPEC, domain: str = "cluster.local"):
    return H.records(spec, text, "NodeHosts", domain)


# --------------------------------------------------------------------------- hosts lines


@pytest.mark.parametrize("text, v4, v6, ptr", [
    ("10.0.0.1 a\n", {"a": ("10.0.0.1",)}, {}, {"10.0.0.1": ("a",)}),
    # Names are case-folded and absolute; comments run to the end of the line.
    ("10.0.0.1\tA.Example.  b # c d\n", {"a.example": ("10.0.0.1",), "b": ("10.0.0.1",)}, {},
     {"10.0.0.1": ("a.example", "b")}),
    ("# only a comment\n\n   \n", {}, {}, {}),
    ("::1 localhost ip6-localhost\n", {}, {"localhost": ("::1",), "ip6-localhost": ("::1",)},
     {"::1": ("localhost", "ip6-localhost")}),
    # An IPv6 zone is dropped; an IPv4-mapped address is an A record (Go's To4()).
    ("fe80::1%eth0 link\n::ffff:10.0.0.5 mapped\n", {"mapped": ("10.0.0.5",)},
     {"link": ("fe80::1",)}, {"fe80::1": ("link",), "10.0.0.5": ("mapped",)}),
    # Several lines for one name: their addresses in order, each once (RFC 2181 §5).
    ("10.0.0.2 n\n10.0.0.1 n\n10.0.0.2 n m\n", {"n": ("10.0.0.2", "10.0.0.1"),
                                                "m": ("10.0.0.2",)}, {},
     {"10.0.0.2": ("n", "m"), "10.0.0.1": ("n",)}),
])
def test_good_lines(text, v4, v6, ptr):
    got = parse(text)
    assert (got.v4, got.v6, got.ptr) == (v4, v6, ptr)


@pytest.mark.parametrize("text, line, words", [
    ("10.0.0.1 a\n10.0.0.300 b\n", 2, "'10.0.0.300' is not an IP address"),
    ("node1 10.0.0.1\n", 1, "'node1' is not an IP address"),
    ("\n10.0.0.1\n", 2, "the address 10.0.0.1 has no names"),
    ("10.0.0.1 10.0.0.2 x\n", 1, None),
    ("10.0.0.1 *.example.org\n", 1, "wildcard and empty names are not supported"),
    ("10.0.0.1 " + "a" * 64 + "\n", 1, "is not a domain name (label longer than 63"),
    ("10.0.0.1 a..b\n", 1, "is not a domain name (empty label"),
    ("10.0.0.1 naïve\n", 1, "is not a domain name"),
    ("10.0.0.1 1.0.0.10.in-addr.arpa\n", 1, "lies under a reverse zone"),
    ("10.0.0.1 cluster.local\n", 1, "is the cluster domain's apex"),
])
def test_bad_lines_name_file_and_line(text, line, words):
    if words is None:                  # a name that looks like an address is still a name
        assert parse(text).v4 == {"10.0.0.2": ("10.0.0.1",), "x": ("10.0.0.1",)}
        return
    with pytest.raises(H.HostsError) as e:
        parse(text)
    assert str(e.value).startswith(f"NodeHosts:{line}: ") and words in str(e.value), str(e.value)


def test_zones_no_reverse_and_inline_after_the_file():
    spec = H.HostsSpec(where="Corefile:3", zones=("example.org",), reverse=False,
                       inline=(("Corefile:4", "10.9.9.9 a.example.org"),
                               ("Corefile:5", "fd00::9 a.example.org"),))
    got = H.records(spec, "10.0.0.1 a.example.org\n10.0.0.2 outside.example.net\n",
                    "NodeHosts", "cluster.local")
    # A name outside the plugin's zones is ignored (CoreDNS: "not in Origins").
    assert got.v4 == {"a.example.org": ("10.0.0.1", "10.9.9.9")}
    assert got.v6 == {"a.example.org": ("fd00::9",)} and got.ptr == {}
    with pytest.raises(H.HostsError, match="^Corefile:4: "):
        H.records(H.HostsSpec(where="x", inline=(("Corefile:4", "10.0.0.300 x"),)), None,
                  "f")


@pytest.mark.parametrize("zones, fall, want", [
    ((".",), (), [(".", R.ZONE_HOSTS)]),
    (("example.org",), None, [("example.org.", R.ZONE_HOSTS_FINAL)]),
    (("example.org", "cluster.local"), ("sub.example.org",),
     [("example.org.", R.ZONE_HOSTS_FINAL), ("sub.example.org.", R.ZONE_HOSTS)]),
    (("example.org",), (".",), [("example.org.", R.ZONE_HOSTS)]),
    # The cluster domain's and the reverse zones' names are answered by their own zones.
    (("svc.cluster.local", "in-addr.arpa"), (), []),
])
def test_zones_of_the_records(zones, fall, want):
    spec = H.HostsSpec(where="x", zones=zones, fallthrough=fall, ttl=77)
    got = H.records(spec, None, "f").zones("cluster.local")
    assert [(z.apex, z.kind) for z in got] == want and all(z.ttl == 77 for z in got)


# --------------------------------------------------------------------------- the directive

BASE = """.:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    forward . 10.0.0.53
    %s
}
"""


def corefile(tmp_path, snippet: str) -> str:
    p = tmp_path / "Corefile"
    p.write_text(BASE % snippet)
    return str(p)


def test_directive_defaults(tmp_path):
    path = corefile(tmp_path, "hosts {\n        fallthrough\n    }")
    got = cf.parse(path, env={})
    assert got.unsupported == []
    assert got.hosts == H.HostsSpec(where=f"{path}:7", path="/etc/hosts", zones=(".",),
                                    inline=(), ttl=3600, reverse=True, reload=5.0,
                                    fallthrough=())


def test_directive_options_and_inline_lines(tmp_path):
    path = corefile(tmp_path, "hosts custom.hosts example.org Example.NET. {\n"
                              "        10.0.0.1 a.example.org  # inline\n"
                              "        ttl 60\n        no_reverse\n        reload 0\n"
                              "        fallthrough example.org\n    }")
    got = cf.parse(path, env={})
    assert got.unsupported == []
    # A relative file is the Corefile's directory's (kdns has no ``root`` plugin).
    assert got.hosts == H.HostsSpec(
        where=f"{path}:7", path=str(tmp_path / "custom.hosts"),
        zones=("example.org", "example.net"), inline=((f"{path}:8", "10.0.0.1 a.example.org"),),
        ttl=60, reverse=False, reload=0.0, fallthrough=("example.org",))


@pytest.mark.parametrize("snippet, line, words", [
    ("hosts {\n ttl 0\n fallthrough\n}", 8, "'0' is not a TTL (1 to 65535)"),
    ("hosts {\n ttl\n}", 8, "hosts ttl takes one number"),
    ("hosts {\n reload soon\n}", 8, "'soon' is not a duration"),
    ("hosts {\n fallthrough\n 10.0.0.1 late.example\n}", 9, "after fallthrough"),
    ("hosts {\n 10.0.0.1 a.example\n 10.0.0.256 b.example\n fallthrough\n}", 9,
     "'10.0.0.256' is not an IP address"),
])
def test_directive_errors_name_the_line(tmp_path, snippet, line, words):
    path = corefile(tmp_path, snippet)
    with pytest.raises(cf.CorefileError) as e:
        cf.parse(path, env={})
    assert str(e.value).startswith(f"{path}:{line}: ") and words in str(e.value), str(e.value)


@pytest.mark.parametrize("snippet, line, words", [
    # hosts runs before kubernetes: without fallthrough CoreDNS answers every cluster name
    # the hosts lack SERVFAIL.
    ("hosts {\n 10.0.0.1 a.example\n}", 7, "hosts for . without fallthrough for cluster.local"),
    ("hosts {\n fallthrough example.org\n}", 7, "without fallthrough for cluster.local"),
    ("hosts /h svc.cluster.local\n", 7, "hosts for svc.cluster.local without fallthrough"),
    ("hosts {\n fallthrough\n fallthrough_unsupported\n}", 9,
     "the hosts option fallthrough_unsupported"),
])
def test_refused_hosts(tmp_path, snippet, line, words):
    path = corefile(tmp_path, snippet)
    got = cf.parse(path, env={})
    assert len(got.unsupported) == 1 and got.unsupported[0].startswith(f"{path}:{line}: ")
    assert words in got.unsupported[0] and "is not supported by kdns" in got.unsupported[0]


def test_a_second_hosts_is_refused_and_a_block_of_only_hosts_ends_there(tmp_path):
    p = tmp_path / "Corefile"
    p.write_text(BASE % "hosts {\n fallthrough\n }" + "example.org:53 {\n hosts {\n"
                 "  10.0.0.1 a.example.org\n }\n}\nexample.net:53 {\n hosts {\n"
                 "  fallthrough\n }\n}\n")
    got = cf.parse(str(p), env={})
    assert [u.split(" is not")[0] for u in got.unsupported] == \
        [f"{p}:12: a second hosts plugin", f"{p}:17: a second hosts plugin"]
    # Nothing after hosts in a block: what would fall through is SERVFAIL, as CoreDNS
    # with no next plugin (a stub domain without servers).
    assert got.forwarding.stub_domains == {"example.org": (), "example.net": ()}


# --------------------------------------------------------------------------- the image


def image(spec, text, *, synced=True, cluster="examples/cluster.yaml"):
    model = records.model_from_file(cluster)
    rec = H.records(spec, text, "NodeHosts", "cluster.local")
    zd = build.with_hosts(records.zone_data(model), rec, "cluster.local")
    compiled = I.compile_image(list(zd.rrsets), zd.zones, exists=zd.exists, synced=synced,
                               serial=1)
    reference = ReferenceCompiler(list(zd.zones), synced, 1).build(list(zd.rrsets), zd.exists)
    assert compiled == reference
    return compiled


NODE_HOSTS = ("10.0.0.1 k3s-server\nfd00::1 k3s-server v6only.example.org\n"
              "10.96.0.1 api.example.org\n")


def answers(buf, name, qtype, edns=-1):
    """(action, reply) of both packet paths, held equal; the reply parsed."""
    q = dns.message.make_query(name, qtype, use_edns=edns)
    q.id = 7
    wire = q.to_wire()
    ref = P.answer(P.Image(buf), wire, edns_max=1232)
    fast = F.answer(F.Image(buf), wire, edns_max=1232)
    assert ref == fast, (name, qtype)
    return ref[0], (dns.message.from_wire(ref[1]) if ref[1] else None)


def texts(r):
    return [line for rrset in r.answer for line in rrset.to_text().split("\n")]


@pytest.mark.parametrize("synced", [True, False])
def test_fallthrough_image_answers_as_coredns(synced):
    buf = image(H.HostsSpec(where="x", ttl=60, fallthrough=()), NODE_HOSTS, synced=synced)
    act, r = answers(buf, "K3S-Server", "A")
    assert act == P.ACTION_SEND and texts(r) == ["K3S-Server. 60 IN A 10.0.0.1"]
    assert r.flags & dns.flags.AA
    for name, qtype in (("v6only.example.org", "A"), ("k3s-server", "MX"),
                        ("k3s-server", "TXT")):
        act, r = answers(buf, name, qtype)
        assert (r.rcode(), r.answer, r.authority) == (dns.rcode.NOERROR, [], [])
    # kdns's RFC 8482 answer to ANY at a name with records (CoreDNS's hosts: NODATA).
    assert texts(answers(buf, "k3s-server", "ANY")[1]) == ['k3s-server. 60 IN HINFO "RFC8482" ""']
    for name in ("example.org", "nothere.example.org", "www.google.com", "k3s-server.lan"):
        assert answers(buf, name, "A")[0] == P.ACTION_HANDOFF, name
    # Hosts first: their PTR for an address the cluster has too (the kubernetes Service).
    assert texts(answers(buf, "1.0.96.10.in-addr.arpa", "PTR")[1]) == \
        ["1.0.96.10.in-addr.arpa. 60 IN PTR api.example.org."]
    v6 = "1" + ".0" * 29 + ".d.f.ip6.arpa"
    assert texts(answers(buf, v6, "PTR")[1]) == \
        [f"{v6}. 60 IN PTR k3s-server.", f"{v6}. 60 IN PTR v6only.example.org."]
    act, r = answers(buf, "kubernetes.default.svc.cluster.local", "A")
    assert r.rcode() == (dns.rcode.NOERROR if synced else dns.rcode.SERVFAIL)


def test_final_zone_answers_servfail_for_a_name_it_lacks():
    buf = image(H.HostsSpec(where="x", zones=("example.org",), fallthrough=None), NODE_HOSTS)
    assert texts(answers(buf, "api.example.org", "A")[1]) == ["api.example.org. 3600 IN A 10.96.0.1"]
    for name in ("nothere.example.org", "example.org"):
        act, r = answers(buf, name, "A", edns=0)
        assert act == P.ACTION_SEND and r.rcode() == dns.rcode.SERVFAIL and r.answer == []
    # Outside its zones (k3s-server was ignored): the next plugin's.
    assert answers(buf, "k3s-server", "A")[0] == P.ACTION_HANDOFF


def test_a_custom_name_in_the_cluster_domain_replaces_the_clusters():
    buf = image(H.HostsSpec(where="x", fallthrough=()),
                "192.0.2.1 kubernetes.default.svc.cluster.local\n")
    assert texts(answers(buf, "kubernetes.default.svc.cluster.local", "A")[1]) == \
        ["kubernetes.default.svc.cluster.local. 3600 IN A 192.0.2.1"]
    act, r = answers(buf, "kubernetes.default.svc.cluster.local", "SRV")
    assert r.answer == [] and r.rcode() == dns.rcode.NOERROR


# --------------------------------------------------------------------------- incremental

VARIANTS = [None,
            "10.1.0.3 a.example.org\n10.96.0.4 b.example.org c\nfd00::1 a.example.org\n",
            "10.1.0.3 a.example.org\n10.1.0.7 d.example.org\n",
            "10.96.0.4 b.example.org\n",
            # inside the cluster domain: the incremental compiler compiles in full
            "10.1.0.3 x.s1.default.svc.cluster.local\n"]


@pytest.mark.parametrize("seed", range(3))
def test_incremental_with_changing_hosts_gives_the_full_compile_bytes(seed):
    rng = random.Random(seed)
    model = ClusterModel(clock=lambda: 1_700_000_000)
    box = H.HostsBox()
    inc = IncrementalCompiler(domain=ZONE, pods="insecure", hosts=box)
    spec = H.HostsSpec(where="x", fallthrough=(), ttl=60)
    for n in range(80):
        changed = step(rng, model)
        if rng.random() < 0.25:
            text = rng.choice(VARIANTS)
            box.records = None if text is None else H.records(spec, text, "h", ZONE)
        got = inc.compile(model, synced=True, changed=changed)
        want = build.compile_model(model, synced=True, domain=ZONE, pods="insecure",
                                   hosts=box.records)
        assert got == want, f"seed {seed} step {n}"


@pytest.mark.parametrize("synced", [True, False])
def test_both_packet_paths_agree_over_the_hosts_sample(synced):
    """Every sample name and custom name, every type, both paths, UDP and TCP, with and
    without EDNS (tests/zonefixtures.py's hosts image, which the fuzz target uses too)."""
    from zonefixtures import HOSTS_NAMES, SAMPLE_NAMES, hosts_image
    buf = hosts_image(synced=synced)
    ref, fast = P.Image(buf), F.Image(buf)
    for name in SAMPLE_NAMES + HOSTS_NAMES:
        for qtype in ("A", "AAAA", "PTR", "MX", "ANY", "CNAME", "SRV", "AXFR"):
            for edns in (-1, 0):
                q = dns.message.make_query(name, qtype, use_edns=edns).to_wire()
                for tcp in (False, True):
                    assert P.answer(ref, q, tcp=tcp, edns_max=1232) == \
                        F.answer(fast, q, tcp=tcp, edns_max=1232), (name, qtype, edns, tcp)
    # Custom records answer before the sync; a final zone's miss is SERVFAIL either way.
    assert texts(answers(buf, "node.final.example", "A")[1]) == \
        ["node.final.example. 60 IN A 192.0.2.9", "node.final.example. 60 IN A 192.0.2.10"]
    assert answers(buf, "miss.final.example", "A")[1].rcode() == dns.rcode.SERVFAIL
    if synced:
        # A chain into a hosts name is answered whole; into a hosts zone's miss, handed off.
        act, r = answers(buf, "tohost.default.svc.cluster.local", "A")
        assert act == P.ACTION_SEND and texts(r)[-1] == "k3s-server. 60 IN A 10.0.0.9"
        assert answers(buf, "tomiss.default.svc.cluster.local", "A")[0] == P.ACTION_HANDOFF
    # A rewrite alias's zone: its A answered; a type it lacks and names below it handed off.
    assert texts(answers(buf, "ALIAS.example", "A")[1]) == ["ALIAS.example. 30 IN A 10.96.0.1"]
    assert answers(buf, "alias.example", "MX")[0] == P.ACTION_HANDOFF
    assert answers(buf, "x.alias.example", "A")[0] == P.ACTION_HANDOFF


# --------------------------------------------------------------------------- the source


def test_the_file_is_re_read_each_reload_period_and_a_bad_version_keeps_the_last(tmp_path,
                                                                                 caplog):
    path = tmp_path / "NodeHosts"
    path.write_text("10.0.0.1 a\n")
    src = H.HostsSource(H.HostsSpec(where="Corefile:3", path=str(path), reload=15.0,
                                    fallthrough=()), "cluster.local")
    assert src.load_first().v4 == {"a": ("10.0.0.1",)}
    path.write_text("10.0.0.2 a\n")
    assert src.poll(0.0).v4 == {"a": ("10.0.0.2",)}
    path.write_text("10.0.0.3 a\n")
    assert src.poll(14.0) is None                  # not yet: every 15 s
    assert src.poll(15.0).v4 == {"a": ("10.0.0.3",)}
    path.write_text("10.0.0.4 a\nbad line\n")
    with caplog.at_level("ERROR"):
        assert src.poll(30.0) is None and src.poll(45.0) is None
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == \
        [f"{path}:2: 'bad' is not an IP address; a hosts line is an address and its names, "
         f"e.g. 10.0.0.1 node1. Keeping the last good hosts records."]      # once
    assert src.current.v4 == {"a": ("10.0.0.3",)} and src.rejected == 1
    path.unlink()                                  # gone: CoreDNS keeps what it has too
    assert src.poll(60.0) is None and src.current.v4 == {"a": ("10.0.0.3",)}
    path.write_text("10.0.0.3 a\n# the same records\n")
    assert src.poll(75.0) is None                  # a new file, the same records
    assert H.HostsSource(H.HostsSpec(where="x", path=str(path), reload=0.0), "").poll(1e9) \
        is None                                    # reload 0: never re-read


def test_a_missing_file_serves_the_inline_lines_and_the_configmap_key(tmp_path, caplog):
    spec = H.HostsSpec(where="Corefile:3", path=str(tmp_path / "nothere"), fallthrough=(),
                       inline=(("Corefile:4", "10.9.0.1 inline"),))
    with caplog.at_level("WARNING"):
        assert H.HostsSource(spec, "cluster.local").load_first().v4 == {"inline": ("10.9.0.1",)}
    assert "does not exist (Corefile:3)" in caplog.text
    src = H.HostsSource(spec, "cluster.local", configmap_key="configmap/kube-system/coredns:NodeHosts")
    assert src.load_first("10.0.0.1 k3s-server\n").v4 == {"k3s-server": ("10.0.0.1",),
                                                          "inline": ("10.9.0.1",)}
    assert src.offer_key({"NodeHosts": "10.0.0.1 k3s-server\n"}) is None    # unchanged
    assert src.offer_key({"NodeHosts": "10.0.0.2 k3s-server\n"}).v4["k3s-server"] == ("10.0.0.2",)
    assert src.offer_key({"NodeHosts": "10.0.0.2\n"}) is None
    assert "configmap/kube-system/coredns:NodeHosts:1: the address 10.0.0.2 has no names" \
        in caplog.text
    assert src.offer_key({}).v4 == {"inline": ("10.9.0.1",)}                # key removed
