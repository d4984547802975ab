"""kdns's metrics through a real Prometheus server: every expression of the coredns-mixin's
alerts and dashboard returns series, and chosen ones return what the test drove."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

import coredns_mixin as mixin
from conftest import ROOT, require_tool
from fakeapi import FakeApiServer
from promserver import PrometheusServer
from serverutil import Kdns
from test_api_source import write_kubeconfig
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
                # A slow upstream: one answer 0.3 s late, which the latency alerts must see.
                up.rcode, up.delay = None, 0.3
                assert ask(k, "slow.example").rcode() == dns.rcode.NXDOMAIN
                sent["slow"] = 1
                # A killed upstream: its port closed, so every try fails on the ICMP error.
                # From one socket (one worker): the first query marks it down there, the
                # second finds every upstream down (CoreDNS's healthcheck broken).
                up.__exit__(None, None, None)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((k.host, 0))
                    for i in range(2):
                        q = dns.message.make_query(f"dead{i}.example", "A")
                        got = dns.query.udp(q, k.host, port=k.port, timeout=5, sock=s)
                        assert got.rcode() == dns.rcode.SERVFAIL
                sent["dead"] = 2
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
        sent["A"] + sent["nx"] + sent["fwd"] + sent["servfail"] + sent["slow"] + sent["dead"]
    assert prom.value(f'sum(coredns_dns_responses_total{{{sel},rcode="NXDOMAIN"}})') == \
        sent["nx"] + sent["slow"]
    assert prom.value(f'sum(coredns_dns_responses_total{{{sel},rcode="SERVFAIL"}})') == \
        sent["servfail"] + sent["dead"]


def test_a_slow_upstream_shows_in_the_latency_the_alerts_watch(scraped):
    """CoreDNSLatencyHigh and CoreDNSForwardLatencyHigh read these histograms: the one
    answer the upstream held for 0.3 s lies above the 0.256 s bucket in both."""
    prom, sent, _ = scraped
    sel = mixin.SEL
    for name in ("coredns_dns_request_duration_seconds", "coredns_forward_request_duration_seconds"):
        slow = prom.value(f"sum({name}_count{{{sel}}}) - "
                          f'sum({name}_bucket{{{sel},le="0.256"}})')
        assert slow == sent["slow"], name


def test_a_killed_upstream_shows_in_the_broken_counter(scraped):
    """CoreDNSForwardHealthcheckBrokenCount fires on this counter: the second query to the
    worker that had seen the upstream fail found every upstream down."""
    prom, _, _ = scraped
    sel = mixin.SEL
    assert prom.value(f"sum(coredns_forward_healthcheck_broken_total{{{sel}}})") >= 1
    expr = mixin.ALERTS["CoreDNSForwardHealthcheckBrokenCount"]
    assert prom.query(expr), expr


# --------------------------------------------------------------------------- kdns's own
# deploy/monitoring: the dashboard's queries and the alert rules, against kdns reading the
# (fake) Kubernetes API, so the API and programming-latency series exist too.

MONITORING = os.path.join(ROOT, "deploy", "monitoring")


def rule_groups() -> list:
    with open(os.path.join(MONITORING, "kdns-rules.yaml")) as f:
        return yaml.safe_load(f)["spec"]["groups"]


def dashboard_exprs() -> dict[str, str]:
    with open(os.path.join(MONITORING, "kdns-dashboard.json")) as f:
        dash = json.load(f)
    out = {}
    for p in dash["panels"]:
        for t in p["targets"]:
            out[f"{p['title']} [{t['refId']}]"] = (t["expr"].replace("$pod", ".*")
                                                   .replace("$__rate_interval", "1m"))
    return out


def without_threshold(expr: str) -> str:
    return re.sub(r"\s*(>|<|>=|<=|==|!=)\s*[0-9.]+\s*$", "", expr)


def test_rules_pass_promtool(tmp_path):
    promtool = require_tool("promtool")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def api_scraped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom-api")
    with FakeApiServer(token="secret") as api:
        api.create("namespaces", {"metadata": {"name": "default"}})
        api.create("services", {"metadata": {"namespace": "default", "name": "kubernetes"},
                                "spec": {"clusterIP": "10.96.0.1", "ports": [
                                    {"name": "https", "port": 443, "protocol": "TCP"}]}})
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", api.url, {"token": "secret"})
        k = Kdns(tmp, workers=2, source=["--kubecfg-file", kubeconfig])
        k.start()
        try:
            with PrometheusServer(tmp, [f"{k.host}:{k.http_port}"], LABELS,
                                  rule_groups=rule_groups()) as prom:
                prom.wait_scrapes(1)
                # A change to program: a Service and its endpoints, answered once served.
                api.create("services", {"metadata": {"namespace": "default", "name": "web"},
                                        "spec": {"clusterIP": "10.96.7.7", "ports": [
                                            {"name": "http", "port": 80, "protocol": "TCP"}]}})
                deadline = time.monotonic() + 10
                while not ask(k, "web.default.svc.cluster.local").answer:
                    assert time.monotonic() < deadline, k.logs()
                    time.sleep(0.05)
                for _ in range(10):
                    ask(k, K)
                ask(k, "outside.example")              # handed off (REFUSED: no upstream)
                prom.wait_scrapes(3)
                yield prom
        finally:
            k.stop()


@pytest.mark.parametrize("name", sorted(dashboard_exprs()))
def test_kdns_dashboard_queries_return_series(api_scraped, name):
    expr = dashboard_exprs()[name]
    assert api_scraped.query(expr), expr


@pytest.mark.parametrize("alert", [r["alert"] for g in rule_groups() for r in g["rules"]])
def test_kdns_alerts_evaluate_and_stay_quiet_when_healthy(api_scraped, alert):
    rule, = [r for g in rule_groups() for r in g["rules"] if r["alert"] == alert]
    assert api_scraped.query(without_threshold(rule["expr"])), rule["expr"]
    assert api_scraped.query(rule["expr"]) == [], f"{alert} fires on a healthy kdns"
    # Prometheus loaded the rule and evaluates it.
    loaded = api_scraped.rules()
    assert alert in loaded and loaded[alert]["health"] == "ok", loaded.get(alert)
