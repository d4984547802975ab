"""Autopath through a running ``kdns serve --autopath``: dnspython from loopback addresses
the cluster file maps to pods (127.0.0.21 in development, 127.0.0.22 in prod), an upstream
started here, the server's resolv.conf with one search domain (example.org).
"""
from __future__ import annotations

import json
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from serverutil import Kdns
from test_autopath import CLUSTER, DEV, PROD, UNKNOWN, chain
from upstream import TestDNSServer


def cluster_yaml(tmp_path, pod_ips) -> str:
    objs = [o for o in CLUSTER if o["kind"] != "Pod"] + [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"namespace": ns, "name": f"p{i}"},
         "status": {"phase": "Running", "podIP": ip}} for i, (ns, ip) in enumerate(pod_ips)]
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autopath")
    up = TestDNSServer({"www.example.com.": ["A 93.184.216.34"],
                        "web.example.org.": ["A 192.0.2.7"],
                        "counted.example.org.": ["A 192.0.2.9"]})
    with up:
        cfg = tmp / "kube-dns-config"
        cfg.mkdir()
        (cfg / "upstreamNameservers").write_text(json.dumps([f"{up.host}:{up.port}"]))
        resolv = tmp / "resolv.conf"
        resolv.write_text("search example.org\n")
        k = Kdns(tmp, zone_file=cluster_yaml(tmp, [("development", DEV), ("prod", PROD)]),
                 workers=1, args=("--autopath", "--config-dir", str(cfg), "--resolv-conf",
                                  str(resolv)))
        k.start()
        try:
            yield k, up
        finally:
            k.stop()


def query(k, name, qtype="A", source=DEV, tcp=False):
    q = dns.message.make_query(name, qtype)
    if tcp:
        return dns.query.tcp(q, k.host, port=k.port, timeout=5, source=source)
    return dns.query.udp(q, k.host, port=k.port, timeout=5, source=source)


def test_served_cluster_step_in_one_round_trip(served):
    k, up = served
    for tcp in (False, True):
        m = query(k, "db.prod.development.svc.cluster.local", tcp=tcp)
        assert chain(m)[0] == ("db.prod.development.svc.cluster.local. CNAME "
                               "db.prod.svc.cluster.local.")
        assert chain(m)[1:] == ["db.prod.svc.cluster.local. A 10.96.2.7"]


def test_served_external_name_behind_a_cname(served):
    k, up = served
    for tcp in (False, True):
        before = len(up.queries)
        m = query(k, "www.example.com.development.svc.cluster.local", tcp=tcp)
        assert m.rcode() == dns.rcode.NOERROR
        assert chain(m) == [
            "www.example.com.development.svc.cluster.local. CNAME www.example.com.",
            "www.example.com. A 93.184.216.34"]
        asked = [q[0] for q in up.queries[before:]]
        if not tcp:     # the second time the forwarder's cache answers both steps
            assert asked == ["www.example.com.example.org.", "www.example.com."]


def test_served_server_search_domain_step(served):
    k, _ = served
    m = query(k, "web.development.svc.cluster.local")
    assert chain(m) == ["web.development.svc.cluster.local. CNAME web.example.org.",
                        "web.example.org. A 192.0.2.7"]


def test_served_every_step_nxdomain_gives_the_asked_names_nxdomain(served):
    k, _ = served
    m = query(k, "nowhere.development.svc.cluster.local")
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert str(m.question[0].name) == "nowhere.development.svc.cluster.local."
    assert str(m.authority[0].name) == "cluster.local."


def test_served_unknown_client_is_not_walked(served):
    k, up = served
    before = len(up.queries)
    m = query(k, "www.example.com.development.svc.cluster.local", source=UNKNOWN)
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert up.queries[before:] == []


def test_served_externalname_step_is_completed_by_the_forwarder(served):
    k, _ = served
    m = query(k, "out.prod.development.svc.cluster.local")
    assert chain(m) == [
        "out.prod.development.svc.cluster.local. CNAME out.prod.svc.cluster.local.",
        "out.prod.svc.cluster.local. CNAME www.example.com.",
        "www.example.com. A 93.184.216.34"]


def test_served_full_cluster_name_after_the_search_domain(served):
    # The server search domain's step goes upstream (NXDOMAIN), then <base> alone is a
    # cluster name: answered from the image by the hand-off.
    k, up = served
    before = len(up.queries)
    m = query(k, "db.prod.svc.cluster.local.development.svc.cluster.local")
    assert chain(m) == [
        "db.prod.svc.cluster.local.development.svc.cluster.local. CNAME db.prod.svc.cluster.local.",
        "db.prod.svc.cluster.local. A 10.96.2.7"]
    assert [q[0] for q in up.queries[before:]] == ["db.prod.svc.cluster.local.example.org."]


def test_served_cached_walk_answers_only_the_namespaces_pods(served):
    # The composed answer is cached under the asked name; only a pod of development is
    # handed off for it (and so reaches the cache): the others keep the image's NXDOMAIN.
    k, up = served
    name = "web.development.svc.cluster.local"
    first = query(k, name)
    before = len(up.queries)
    again = query(k, name)
    assert chain(again) == chain(first) == ["web.development.svc.cluster.local. CNAME web.example.org.",
                                            "web.example.org. A 192.0.2.7"]
    assert up.queries[before:] == []                 # from the cache
    for source in (PROD, UNKNOWN):
        assert query(k, name, source=source).rcode() == dns.rcode.NXDOMAIN


def autopath_successes(k) -> float:
    got = [v for (name, _), v in k.metrics().items() if name == "coredns_autopath_success_total"]
    assert len(got) == 1, got                   # one server
    return got[0]


def wait_successes(k, want: float) -> float:
    """The counter once it reaches ``want`` (the packet path counts a reply as it sends it,
    so a scrape right after the reply may come a moment early), or what it stands at after
    a bounded wait."""
    for _ in range(200):
        got = autopath_successes(k)
        if got >= want:
            return got
        time.sleep(0.01)
    return got


def test_served_successes_counted_as_coredns_counts_them(served):
    """coredns_autopath_success_total: a reply from a later search step, whether the image
    answered it (UDP and TCP) or the hand-off's steps did; not a walk that found nothing, nor
    a client autopath does not walk. And autopath is among the enabled plugins."""
    k, _ = served
    before = autopath_successes(k)
    for tcp in (False, True):
        assert chain(query(k, "db.prod.development.svc.cluster.local", tcp=tcp))[0].endswith(
            "CNAME db.prod.svc.cluster.local.")
    assert chain(query(k, "counted.development.svc.cluster.local")) == [
        "counted.development.svc.cluster.local. CNAME counted.example.org.",
        "counted.example.org. A 192.0.2.9"]
    assert query(k, "nowhere2.development.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert query(k, "db.prod.development.svc.cluster.local",
                 source=UNKNOWN).rcode() == dns.rcode.NXDOMAIN
    assert wait_successes(k, before + 3) == before + 3
    # Nothing more arrives late: the two that must not count did not.
    assert autopath_successes(k) == before + 3
    assert any(name == "coredns_plugin_enabled" and ("name", "autopath") in labels
               for name, labels in k.metrics())
