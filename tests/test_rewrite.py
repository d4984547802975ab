"""``rewrite name`` without a server: Corefile snippets → rules, CoreDNS's matching and
answer rules (plugin/rewrite name.go, reverter.go), the compiled aliases (the compiled and
the reference packet paths send the same bytes; the incremental compile equals the full one
as the target changes), and the reply reverting of the worker's path."""
from __future__ import annotations

import os

import dns.message
import dns.rcode
import dns.rrset
import pytest

from conftest import require_fastpath

from kdns.forward import corefile as cf
from kdns.forward import rewrite as RW
from kdns.kube import records
from kdns.serve import build
from kdns.zone import refpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")
BASE = """.:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    %s
    forward . 1.1.1.1
}
"""


def rules_of(tmp_path, snippet: str):
    p = tmp_path / "Corefile"
    p.write_text(BASE % snippet)
    got = cf.parse(str(p), env={})
    assert got.unsupported == []
    return got.rewrites


@pytest.mark.parametrize("snippet, rules", [
    ("rewrite name foo.example.org api.development.svc.cluster.local",
     [("exact", "foo.example.org.", "api.development.svc.cluster.local.", True, False, ())]),
    ("rewrite continue name exact FOO.example.org. api.development.svc.cluster.local",
     [("exact", "foo.example.org.", "api.development.svc.cluster.local.", False, False, ())]),
    ("rewrite name suffix .corp.example .svc.cluster.local answer auto",
     [("suffix", ".corp.example.", ".svc.cluster.local.", True, True, ())]),
    ("rewrite name prefix foo bar", [("prefix", "foo.", "bar.", True, False, ())]),
    ("rewrite name substring service svc answer auto",
     [("substring", "service.", "svc.", True, True, ())]),
    ("rewrite stop {\n name regex (.*)-west\\.example\\.net {1}.outside.example\n"
     " answer name (.*)\\.outside\\.example {1}-west.example.net\n}",
     [("regex", r"(.*)-west\.example\.net", "{1}.outside.example.", True, False,
       (("name", r"(.*)\.outside\.example", "{1}-west.example.net."),))]),
    ("rewrite name regex (.*)\\.x\\.example {1}.y.example answer value (.*)\\.y\\.example "
     "{1}.x.example",
     [("regex", r"(.*)\.x\.example", "{1}.y.example.", True, False,
       (("value", r"(.*)\.y\.example", "{1}.x.example."),))]),
])
def test_snippets_map_to_rules(tmp_path, snippet, rules):
    got = rules_of(tmp_path, snippet)
    assert [(r.kind, r.frm, r.to, r.stop, r.auto, r.answers) for r in got] == rules
    assert got[0].where.endswith("Corefile:6")


@pytest.mark.parametrize("snippet, line, words", [
    ("rewrite name", 6, "needs FROM and TO"),
    ("rewrite name fuzzy a b", 6, "'fuzzy' is no rewrite name type"),
    ("rewrite name regex ([a-z b", 6, "is not a regular expression"),
    ("rewrite name regex (.*)\\.a {1}{2}.b", 6, "uses more groups"),
    ("rewrite name exact a.example b.example extra", 6, "'extra' is no answer rule"),
    ("rewrite name suffix .a. .b. answer auto answer name x y", 6, "cannot be combined"),
])
def test_bad_rules_name_the_line(tmp_path, snippet, line, words):
    p = tmp_path / "Corefile"
    p.write_text(BASE % snippet)
    with pytest.raises(cf.CorefileError) as e:
        cf.parse(str(p), env={})
    assert str(e.value).startswith(f"{p}:{line}: ") and words in str(e.value), str(e.value)


def test_rewrite_outside_the_kubernetes_block_is_refused(tmp_path):
    p = tmp_path / "Corefile"
    p.write_text(BASE % "" + "corp.example:53 {\n    rewrite name a.corp.example b.example\n"
                 "    forward . 10.0.0.1\n}\n")
    got = cf.parse(str(p), env={})
    assert got.unsupported == [f"{p}:10: rewrite outside the server block of kubernetes is "
                               f"not supported by kdns (kdns applies rewrite rules to the names "
                               f"of its main block)."]


def R(kind, frm, to, stop=True, auto=False, answers=()):
    return RW.parse_rule(([] if stop else ["continue"]) + ["name", kind, frm, to]
                         + (["answer", "auto"] if auto else [])
                         + [w for a in answers for w in ("answer", *a)], "Corefile:1")


@pytest.mark.parametrize("rules, name, asked", [
    ([R("exact", "a.example", "b.example")], "a.example.", "b.example."),
    ([R("exact", "a.example", "b.example")], "x.a.example.", None),
    ([R("prefix", "foo", "bar")], "foo.example.com.", "bar.example.com."),
    ([R("prefix", "foo", "bar")], "coredns.foo.", None),         # CoreDNS's name_test.go
    ([R("suffix", ".schmoogle.com.", ".google.com.")], "www.schmoogle.com.", "www.google.com."),
    ([R("substring", "service.us-west-1.example.org", "service.us-west-1.consul")],
     "ftp.service.us-west-1.example.org.", "ftp.service.us-west-1.consul."),
    ([R("regex", r"(.*)-(us-west-1)\.example\.org", "{1}.service.{2}.consul")],
     "ftp-us-west-1.example.org.", "ftp.service.us-west-1.consul."),
    # stop (the default) ends the rules; continue goes on, every rule matching the client's
    # name, the last match deciding the question (CoreDNS's state.Name() is the first read).
    ([R("exact", "a.example", "b.example"), R("exact", "a.example", "c.example")],
     "a.example.", "b.example."),
    ([R("exact", "a.example", "b.example", stop=False), R("exact", "a.example", "c.example")],
     "a.example.", "c.example."),
    ([R("exact", "a.example", "b.example", stop=False), R("exact", "b.example", "c.example")],
     "a.example.", "b.example."),
])
def test_rules_match_as_coredns(rules, name, asked):
    got = RW.rewrite(rules, name)
    assert (got[0] if got else None) == asked


def test_a_rule_that_makes_no_domain_name_answers_servfail():
    assert RW.rewrite([R("regex", "(.*)", "{1}" + "x" * 70)], "a.example.") == ("", ())


def rrset(text: str) -> dns.rrset.RRset:
    """"OWNER TYPE RDATA" at TTL 30."""
    owner, rtype, rdata = text.split(" ", 2)
    return dns.rrset.from_text(owner, 30, "IN", rtype, rdata)


def reply_for(question: str, qtype: str, records: list[str], authority=()) -> bytes:
    r = dns.message.make_response(dns.message.make_query(question, qtype))
    r.answer += [rrset(t) for t in records]
    r.authority += [rrset(t) for t in authority]
    return r.to_wire()


def revert(rules, client: str, qtype: str, upstream_records, limit=4096, authority=()):
    asked, back = RW.rewrite(rules, client.lower())
    cq = dns.message.make_query(client, qtype).to_wire()
    qend = cq.index(b"\0", 12) + 1
    reply = reply_for(asked, qtype, upstream_records, authority)
    out = dns.message.from_wire(RW.revert_reply(reply, cq[12:qend + 4], back, limit))
    return out


def test_exact_reverts_owner_and_targets_under_the_name():
    r = revert([R("exact", "a.example", "b.cluster.local")], "A.Example.", "SRV",
               ["b.cluster.local. SRV 0 10 80 x.b.cluster.local.",
                "b.cluster.local. SRV 0 10 80 other.example."])
    assert r.question[0].name.to_text() == "A.Example."          # the client's case
    # Owners point at the question (the client's case, as the image's answers do).
    assert sorted(line.lower() for rr in r.answer for line in rr.to_text().split("\n")) == [
        "a.example. 30 in srv 0 10 80 other.example.",
        "a.example. 30 in srv 0 10 80 x.a.example."]


def test_without_answer_auto_only_the_question_is_restored():
    r = revert([R("suffix", ".corp.example.", ".outside.example.")], "www.corp.example.", "A",
               ["www.outside.example. A 192.0.2.1"])
    assert r.question[0].name.to_text() == "www.corp.example."
    assert [rr.to_text() for rr in r.answer] == ["www.outside.example. 30 IN A 192.0.2.1"]


def test_suffix_auto_reverts_the_suffix_in_names_and_values():
    r = revert([R("suffix", ".corp.example.", ".outside.example.", auto=True)],
               "www.corp.example.", "A",
               ["www.outside.example. CNAME web.outside.example.",
                "web.outside.example. A 192.0.2.1"],
               authority=["outside.example. SOA ns.outside.example. h.example. 1 2 3 4 5"])
    assert [rr.to_text() for rr in r.answer] == [
        "www.corp.example. 30 IN CNAME web.corp.example.",
        "web.corp.example. 30 IN A 192.0.2.1"]
    # The SOA's owner does not end with the suffix (no leading label); its primary does.
    assert [rr.to_text() for rr in r.authority] == [
        "outside.example. 30 IN SOA ns.corp.example. h.example. 1 2 3 4 5"]


def test_answer_name_regex_reverts_owners():
    rule = R("regex", r"(.*)-west\.example\.net", "{1}.outside.example",
             answers=[("name", r"(.*)\.outside\.example\.", "{1}-west.example.net")])
    r = revert([rule], "ftp-west.example.net.", "A", ["ftp.outside.example. A 192.0.2.9"])
    assert [rr.to_text() for rr in r.answer] == ["ftp-west.example.net. 30 IN A 192.0.2.9"]


def test_a_reverted_reply_too_long_for_udp_is_cut_with_tc():
    recs = [f"b.example. A 192.0.2.{i}" for i in range(1, 40)]
    r = revert([R("exact", "a" * 60 + ".example", "b.example")], "a" * 60 + ".example.", "A",
               recs, limit=512)
    assert r.flags & dns.flags.TC and 0 < len(r.answer[0]) < 39
    assert len(r.to_wire()) <= 512


# --------------------------------------------------------------------------- compiled


def alias_rules():
    return (R("exact", "api.example.org", "api.development.svc.cluster.local"),
            R("exact", "db.cluster.local", "db.prod.svc.cluster.local"),
            R("exact", "gone.example.org", "nothere.prod.svc.cluster.local"),
            R("exact", "db.example.org", "db.prod.svc.cluster.local"))


QUERIES = [("api.example.org", "A"), ("API.EXAMPLE.org", "SRV"), ("api.example.org", "MX"),
           ("api.example.org", "AAAA"), ("x.api.example.org", "A"), ("db.cluster.local", "A"),
           ("db.cluster.local", "SRV"), ("db.cluster.local", "TXT"), ("gone.example.org", "A"),
           ("db.example.org", "A"), ("db.example.org", "SRV")]


def test_aliases_answer_like_their_target_with_the_clients_name():
    img = refpath.Image(build.compile_file_counted(CLUSTER, rewrites=alias_rules())[0])
    plain = refpath.Image(build.compile_file(CLUSTER))

    def ask(image, name, qtype):
        action, out = refpath.answer(image, dns.message.make_query(name, qtype).to_wire())
        return action, dns.message.from_wire(out) if out else None

    _, a = ask(img, "api.example.org", "A")
    _, t = ask(plain, "api.development.svc.cluster.local", "A")
    assert a.flags == t.flags and [rr.to_text().split(" ", 1)[1] for rr in a.answer] == \
        [rr.to_text().split(" ", 1)[1] for rr in t.answer]
    assert a.answer[0].name.to_text() == "api.example.org."
    # The SRV targets were the target's own name: reverted to the alias, with its glue.
    _, s = ask(img, "API.EXAMPLE.org", "SRV")
    assert s.question[0].name.to_text() == "API.EXAMPLE.org."
    assert {rr.target.to_text() for rr in s.answer[0]} == {"api.example.org."}
    assert [rr.to_text() for rr in s.additional] == ["API.EXAMPLE.org. 30 IN A 10.96.5.6"]
    # Inside the cluster domain: the alias's NODATA is the zone's (SOA), as the target's.
    _, n = ask(img, "db.cluster.local", "TXT")
    assert n.rcode() == dns.rcode.NOERROR and not n.answer and n.authority
    # Names below an alias outside the zones, an alias whose target has no records, and a
    # type the alias lacks (whose NODATA is the target zone's, with its SOA) are not the
    # image's: the worker's rules take them (handed off).
    assert ask(img, "x.api.example.org", "A")[0] == refpath.ACTION_HANDOFF
    assert ask(img, "api.example.org", "MX")[0] == refpath.ACTION_HANDOFF
    # SRV targets reverted under an alias of its own zone: the worker's (with their glue).
    assert ask(img, "db.example.org", "A")[0] == refpath.ACTION_SEND
    assert ask(img, "db.example.org", "SRV")[0] == refpath.ACTION_HANDOFF
    assert ask(img, "gone.example.org", "A")[0] == refpath.ACTION_HANDOFF


def test_compiled_and_reference_paths_send_the_same_alias_bytes():
    fast = require_fastpath()
    data = build.compile_file_counted(CLUSTER, rewrites=alias_rules())[0]
    ref, img = refpath.Image(data), fast.Image(data)
    for name, qtype in QUERIES:
        for tcp in (False, True):
            q = dns.message.make_query(name, qtype, use_edns=0).to_wire()
            assert refpath.answer(ref, q, tcp=tcp, edns_max=1232) == \
                fast.answer(img, q, tcp, edns_max=1232), (name, qtype)


def test_reference_compiler_builds_the_same_alias_image():
    from kdns.zone import image as I
    core = I._compiled_core()
    if core is None:
        from conftest import unavailable
        unavailable("the compiled compiler core is not built (or KDNS_PURE=1)")
    zd = build.with_rewrites(records.zone_data(records.model_from_file(CLUSTER)), alias_rules())
    assert any(s.name == "api.example.org." for s in zd.rrsets)
    compiled = I.CoreCompiler(list(zd.zones), True, 7, core).build(list(zd.rrsets),
                                                                   list(zd.exists))
    reference = I.ReferenceCompiler(list(zd.zones), True, 7).build(list(zd.rrsets),
                                                                   list(zd.exists))
    assert compiled == reference


def test_mangled_replies_raise_only_what_the_worker_turns_into_servfail():
    """The worker answers SERVFAIL when a reply cannot be rewritten back (ValueError or
    struct.error): any other exception would be a bug on bad input."""
    import random
    import struct
    rng = random.Random(7)
    rules = [R("exact", "a.example", "b.cluster.local")]
    asked, back = RW.rewrite(rules, "a.example.")
    base = reply_for(asked, "SRV", ["b.cluster.local. SRV 0 10 80 x.b.cluster.local.",
                                    "b.cluster.local. SRV 0 10 80 other.example."],
                     authority=["cluster.local. SOA ns.cluster.local. h.cluster.local. 1 2 3 4 5"])
    cq = dns.message.make_query("a.example", "SRV").to_wire()
    question = cq[12:]
    for _ in range(3000):
        m = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            m[rng.randrange(12, len(m))] = rng.randrange(256)
        if rng.random() < 0.3:
            m = m[:rng.randrange(12, len(m))]
        try:
            out = RW.revert_reply(bytes(m), question, back, 512)
        except (ValueError, struct.error):
            continue
        assert len(out) <= 512 and out[12:12 + len(question)] == question


def test_a_changed_rule_waits_for_the_next_start(tmp_path, caplog):
    import logging
    p = tmp_path / "Corefile"
    p.write_text(BASE % "rewrite name api.example.org api.development.svc.cluster.local")
    first = cf.parse(str(p), env={})
    seen = []
    w = cf.CorefileWatcher(str(p), seen.append, env={}, first=first)
    p.write_text(BASE % "rewrite name api.example.org db.prod.svc.cluster.local")
    with caplog.at_level(logging.WARNING, logger="kdns.forward.corefile"):
        assert w.poll_once()
    assert seen and seen[0].rewrites[0].to == "db.prod.svc.cluster.local."
    assert "Corefile changed rewrite; kdns applies it at its next start" in caplog.text
