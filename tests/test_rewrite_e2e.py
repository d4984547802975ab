"""``rewrite name`` end to end: a real kdns serving examples/cluster.yaml from a Corefile with
rewrite rules, asked with dig and dnspython. Exact aliases of cluster names are answered
from the image; the other rules by the worker, before the image lookup or the forward to a
loopback upstream the test starts, the reply rewritten back as CoreDNS rewrites it. The
compiled and the reference packet paths send the same bytes."""
from __future__ import annotations

import os
import socket
import subprocess

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import require_tool
from serverutil import ROOT, Kdns
from upstream import TestDNSServer

pytestmark = pytest.mark.timeout(90)
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")

COREFILE = """.:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    rewrite name exact api.example.org api.development.svc.cluster.local
    rewrite name exact gone.example.org nothere.prod.svc.cluster.local
    rewrite name exact db.example.org db.prod.svc.cluster.local
    rewrite name exact www.alias.example www.outside.example
    rewrite stop {
        name suffix .corp.example. .svc.cluster.local.
        answer auto
    }
    rewrite name suffix .plain.example. .outside.example.
    rewrite name regex (.*)-west\\.example\\.net {1}.outside.example answer auto
    loadbalance
    forward . %(up)s
    cache 30
}
"""


def ask(k: Kdns, name: str, qtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, k.host, port=k.port, timeout=3)


def dig(k: Kdns, *args: str) -> list[str]:
    tool = require_tool("dig")
    out = subprocess.run([tool, "@" + k.host, "-p", str(k.port), *args, "+noall", "+answer",
                          "+time=2", "+tries=1"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    return [" ".join(line.split()) for line in out.stdout.splitlines()]


@pytest.fixture
def upstream():
    up = TestDNSServer({"www.outside.example.": ["A 198.51.100.8"],
                        "ftp.outside.example.": ["CNAME files.outside.example."],
                        "files.outside.example.": ["A 198.51.100.9"]}, host="127.0.0.42")
    with up:
        yield up


def start(tmp_path, upstream, env=None):
    corefile = tmp_path / "Corefile"
    corefile.write_text(COREFILE % {"up": f"{upstream.host}:{upstream.port}"})
    return Kdns(tmp_path, zone_file=CLUSTER, workers=1, env=env,
                args=("--corefile", str(corefile))).start()


def answers(r: dns.message.Message) -> list[str]:
    return [line for rr in r.answer for line in rr.to_text().split("\n")]


def test_rewrite_rules_answer_as_coredns(tmp_path, upstream):
    k = start(tmp_path, upstream)
    try:
        # An exact alias of a cluster name, from the image: the client's name owns the
        # target's records (CoreDNS reverts an exact rule's answer always).
        assert dig(k, "api.example.org", "A") == ["api.example.org. 30 IN A 10.96.5.6"]
        r = ask(k, "Api.Example.Org", "SRV", tcp=True)
        assert r.question[0].name.to_text() == "Api.Example.Org."
        assert {rr.target.to_text() for rr in r.answer[0]} == {"api.example.org."}
        # A type the target lacks: its NODATA, with the cluster zone's SOA (RFC 2308 §2.2).
        r = ask(k, "api.example.org", "MX")
        assert (r.rcode(), r.answer) == (dns.rcode.NOERROR, [])
        assert [rr.name.to_text() for rr in r.authority] == ["cluster.local."]
        # A headless service's alias: its addresses from the image; its SRV, whose targets
        # (the endpoints) are reverted under the alias, from the worker's path, with their
        # addresses as additional records owned by the reverted names, as CoreDNS has them.
        assert sorted(rd.to_text() for rrset in ask(k, "db.example.org").answer
                      for rd in rrset) == ["10.244.2.10", "10.244.2.11"]
        r = ask(k, "db.example.org", "SRV")
        assert {rd.target.to_text() for rd in r.answer[0]} >= {"db-0.db.example.org.",
                                                               "db-1.db.example.org."}
        assert {rr.name.to_text() for rr in r.additional} >= {"db-0.db.example.org.",
                                                              "db-1.db.example.org."}
        # An alias whose target does not exist: the target's NXDOMAIN, with its zone's SOA,
        # for the client's question.
        r = ask(k, "gone.example.org")
        assert r.rcode() == dns.rcode.NXDOMAIN and r.question[0].name.to_text() == \
            "gone.example.org."
        assert r.authority[0].name.to_text() == "cluster.local."
        # An exact alias of an outside name: forwarded as the target, answered as the alias.
        assert dig(k, "www.alias.example", "A") == ["www.alias.example. 30 IN A 198.51.100.8"]
        assert ("www.outside.example.", "A", "udp") in upstream.queries
        assert not [q for q in upstream.queries if q[0] == "www.alias.example."]
        # A suffix onto the cluster domain with answer auto: the image answers the rewritten
        # name, the suffix goes back in owners and targets.
        assert dig(k, "api.development.corp.example", "A") == \
            ["api.development.corp.example. 30 IN A 10.96.5.6"]
        r = ask(k, "api.development.corp.example", "SRV")
        assert {rr.target.to_text() for rr in r.answer[0]} == {"api.development.corp.example."}
        assert [rr.name.to_text() for rr in r.additional] == ["api.development.corp.example."]
        r = ask(k, "nothere.prod.corp.example")
        assert r.rcode() == dns.rcode.NXDOMAIN
        # A headless service's two addresses rotate through the rewrite (loadbalance) as
        # they do when asked directly: each comes first.
        firsts = {ask(k, "db.prod.corp.example").answer[0][0].to_text() for _ in range(4)}
        assert firsts == {"10.244.2.10", "10.244.2.11"}
        # Without answer auto only the question is the client's: the records keep the name
        # that was asked (a mismatch dig shows, as with CoreDNS).
        r = ask(k, "www.plain.example")
        assert r.question[0].name.to_text() == "www.plain.example."
        assert answers(r) == ["www.outside.example. 30 IN A 198.51.100.8"]
        # A regex with answer auto: the asked name, and names under it, go back; a CNAME's
        # target elsewhere stays.
        r = ask(k, "ftp-west.example.net", "CNAME")
        assert answers(r) == ["ftp-west.example.net. 30 IN CNAME files.outside.example."]
        assert dig(k, "files-west.example.net", "A") == \
            ["files-west.example.net. 30 IN A 198.51.100.9"]
        # Names no rule matches are served as before.
        assert dig(k, "kubernetes.default.svc.cluster.local", "A") == \
            ["kubernetes.default.svc.cluster.local. 30 IN A 10.96.0.1"]
        assert dig(k, "www.outside.example", "A") == ["www.outside.example. 30 IN A 198.51.100.8"]
        assert ask(k, "x.api.example.org").rcode() == dns.rcode.NXDOMAIN   # the upstream's
    finally:
        k.stop()


def test_compiled_and_reference_paths_send_the_same_bytes(tmp_path, upstream):
    (tmp_path / "fast").mkdir()
    (tmp_path / "pure").mkdir()
    fast = start(tmp_path / "fast", upstream)
    pure = start(tmp_path / "pure", upstream, env={"KDNS_PURE": "1"})
    try:
        assert "pure engine" in pure.logs() and "compiled engine" in fast.logs()
        for name, qtype in (("api.example.org", "A"), ("API.example.org", "SRV"),
                            ("api.example.org", "TXT"), ("api.example.org", "MX"),
                            ("gone.example.org", "A"), ("db.example.org", "SRV"),
                            ("api.development.corp.example", "A"),
                            ("api.development.corp.example", "SRV"),
                            ("www.alias.example", "A"), ("ftp-west.example.net", "CNAME")):
            for edns in (-1, 0):
                q = dns.message.make_query(name, qtype, use_edns=edns)
                q.id = 0x4242
                wire = q.to_wire()
                got = []
                for k in (fast, pure):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.settimeout(3)
                        s.sendto(wire, (k.host, k.port))
                        got.append(s.recv(65535))
                assert got[0] == got[1], (name, qtype, edns)
    finally:
        fast.stop()
        pure.stop()
