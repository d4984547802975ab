"""kdns's metrics through a real Prometheus server: every expression of the coredns-mixin's
alerts and dashboard returns series, and chosen ones return what the test drove."""
from __future__ import annotations

import dns.message
import dns.query
import dns.rcode
import pytest

import coredns_mixin as mixin
from conftest import ROOT
from promserver import PrometheusServer
from serverutil import Kdns
from upstream import TestDNSServer

pytestmark = pytest.mark.timeout(120)

K = "kubernetes.default.svc.cluster.local"
LABELS = {"k8s_app": "kube-dns", "pod": "kdns-0"}


def ask(k: Kdns, name: str, qtype: str = "A", tcp: bool = False):
    q = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, k.host, port=k.port, timeout=3)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """kdns on the example cluster forwarding to an upstream the test owns, driven with a
    known mix, and a Prometheus that has scraped it since before the first query."""
    tmp = tmp_path_factory.mktemp("prom")
    with TestDNSServer({"outside.example.": ["300 A 192.0.2.1"]}) as up:
        k = Kdns(tmp, zone_file=f"{ROOT}/examples/cluster.yaml", workers=2,
                 args=("--nameservers", f"{up.host}:{up.port}"))
        k.start()
        try:
            with PrometheusServer(tmp, [f"{k.host}:{k.http_port}"], LABELS) as prom:
                prom.wait_scrapes(1)
                sent = {"A": 0, "SRV": 0, "nx": 0, "fwd": 0}
                for i in range(20):
                    assert ask(k, K, tcp=i % 4 == 0).rcode() == dns.rcode.NOERROR
                    sent["A"] += 1
                for _ in range(7):
                    ask(k, "_https._tcp." + K, "SRV")
                    sent["SRV"] += 1
                for i in range(5):
                    assert ask(k, f"nope{i}.default.svc.cluster.local").rcode() == \
                        dns.rcode.NXDOMAIN
                    sent["nx"] += 1
                for _ in range(4):                 # one upstream query, then cache hits
                    assert ask(k, "outside.example").rcode() == dns.rcode.NOERROR
                    sent["fwd"] += 1
                up.rcode = dns.rcode.SERVFAIL      # and a failure, for the error ratios
                ask(k, "broken.example")
                sent["servfail"] = 1
                prom.wait_scrapes(3)
                yield prom, sent, up
        finally:
            k.stop()


@pytest.mark.parametrize("name", sorted(mixin.ALERTS))
def test_mixin_alert_expressions_return_series(scraped, name):
    prom, _, _ = scraped
    assert prom.query(mixin.ALERTS[name]), mixin.ALERTS[name]


@pytest.mark.parametrize("name", sorted(mixin.DASHBOARD))
def test_mixin_dashboard_expressions_return_series(scraped, name):
    prom, _, _ = scraped
    assert prom.query(mixin.DASHBOARD[name]), mixin.DASHBOARD[name]


def test_the_down_alert_is_quiet_while_kdns_is_up(scraped):
    prom, _, _ = scraped
    assert prom.query(f"absent(up{{{mixin.SEL}}} == 1)") == []


def test_requests_by_type_and_rcode_are_what_was_sent(scraped):
    prom, sent, _ = scraped
    sel = mixin.SEL
    # kdns's own health probe asks kubernetes.default SRV too: SRV is ours and the probe's,
    # A queries are exactly ours.
    assert prom.value(f'sum(coredns_dns_requests_total{{{sel},type="SRV"}})') >= sent["SRV"]
    assert prom.value(f'sum(coredns_dns_requests_total{{{sel},type="A"}})') == \
        sent["A"] + sent["nx"] + sent["fwd"] + sent["servfail"]
    assert prom.value(f'sum(coredns_dns_responses_total{{{sel},rcode="NXDOMAIN"}})') == \
        sent["nx"]
    assert prom.value(f'sum(coredns_dns_responses_total{{{sel},rcode="SERVFAIL"}})') == \
        sent["servfail"]
