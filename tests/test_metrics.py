"""Prometheus exposition: CoreDNS names and labels on --metrics-port, kube-dns's
SkyDNS names on PROMETHEUS_PORT, the sidecar's kubedns_* on --sidecar-port, all rendered
from the shared counters when scraped; `promtool check metrics` passes on each, and the series
the common CoreDNS alert rules use are present."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_tool
from serverutil import HOST, Kdns, Port, children
from upstream import TestDNSServer
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local"


def scrape(port, path="/metrics") -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=3) as r:
        return r.read().decode()


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def find(m: dict, name: str, **labels) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in m.items() if n == name and want <= set(ls)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One kdns with every metrics listener, an upstream, and some traffic of each kind."""
    tmp = tmp_path_factory.mktemp("metrics")
    with TestDNSServer({"www.example.": ["A 192.0.2.1"]}) as up:
        # Two worker processes: the per-process series are labelled by each one's first slot.
        k = Kdns(tmp, image=sample_image(), workers=2,
                 args=("--sidecar-port", Port("sidecar"), "--health-port",
                       Port("health"), "--nameservers", f"{HOST}:{up.port}",
                       "--worker-processes", "2"),
                 env={"PROMETHEUS_PORT": Port("prometheus"), "PROMETHEUS_PATH": "/skydns"})
        k.start()
        ports = k.ports
        try:
            for _ in range(5):
                k.udp(K, "SRV")
                k.udp("www.example.", "A")          # forwarded, then from the cache
                k.udp("gone.example.", "A")         # NXDOMAIN with its SOA: cached too
            k.tcp(K, "A")
            k.udp("nope.default.svc.cluster.local", "A")
            k.udp(K, "TXT")                          # NODATA: the name has no TXT
            k.udp(K, "A", want_dnssec=True)          # DO set (RFC 3225)
            k.tcp(K, "A", want_dnssec=True)
            # No wait: the workers count forwarder numbers into their pages before replying.
            yield k, ports, up
        finally:
            assert k.stop() == 0


def promtool_check(text: str, allowed: tuple = ()) -> None:
    """Valid exposition, and no lint finding but the ``allowed`` ones (promtool exits 3 for
    lint findings, 1 for a parse error)."""
    promtool = require_tool("promtool")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    findings = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode in (0, 3) and all(f in allowed for f in findings), findings
    assert r.returncode == 0 or findings


def test_coredns_metrics_pass_promtool(served):
    k, _, _ = served
    promtool_check(scrape(k.http_port))


def test_skydns_metrics_pass_promtool(served):
    _, ports, _ = served
    promtool_check(scrape(ports["prometheus"], "/skydns"))


def test_sidecar_metrics_pass_promtool(served):
    _, ports, _ = served
    # The sidecar's own name (dns-rules §3.4) breaks one lint rule; kept so dashboards still work.
    promtool_check(scrape(ports["sidecar"]), allowed=(
        "kubedns_probe_kubedns_latency_ms metric names should not contain abbreviated units",
        "kubedns_probe_dnsmasq_latency_ms metric names should not contain abbreviated units",
        *(f'kubedns_dnsmasq_{name} counter metrics should have "_total" suffix'
          for name in ("hits", "misses", "evictions", "insertions", "max_size", "errors"))))


def test_coredns_names_and_labels(served):
    k, _, _ = served
    m = samples(scrape(k.http_port))
    server = f"dns://{HOST}:{k.port}"
    base = {"server": server, "zone": ".", "view": ""}
    assert find(m, "coredns_dns_requests_total", **base, proto="udp", family="1", type="SRV")[0] >= 5
    assert find(m, "coredns_dns_requests_total", **base, proto="tcp", family="1", type="A")[0] >= 1
    assert find(m, "coredns_dns_responses_total", **base, rcode="NXDOMAIN", plugin="")[0] >= 1
    # The request duration by query type, as CoreDNS labels it.
    assert sum(find(m, "coredns_dns_request_duration_seconds_count", **base)) >= 12
    assert find(m, "coredns_dns_request_duration_seconds_count", **base, type="SRV")[0] >= 5
    assert find(m, "coredns_dns_request_duration_seconds_count", **base, type="TXT") == [1.0]
    # The two queries the fixture sent with DO (RFC 3225); nothing else sets it.
    assert find(m, "coredns_dns_do_requests_total", **base) == [2.0]
    for kind in ("request", "response"):
        for proto in ("udp", "tcp"):
            assert find(m, f"coredns_dns_{kind}_size_bytes_count", **base, proto=proto)[0] >= 1
    assert find(m, "coredns_build_info", version="0.1.0") == [1.0]
    assert find(m, "coredns_panics_total") == [0.0]
    # Bounded label sets: qtypes are a fixed list, whatever clients ask.
    types = {dict(ls)["type"] for (n, ls) in m if n == "coredns_dns_requests_total"}
    assert len(types) <= 15 and "other" in types


def test_forward_and_cache_metrics_from_the_workers(served):
    k, _, up = served
    m = samples(scrape(k.http_port))
    to = f"{HOST}:{up.port}"
    # The workers' queries (the supervisor's loop probe at start is not a forwarded query).
    sent = sum(1 for name, _, _ in up.queries
               if name.rstrip(".") in ("www.example", "gone.example"))
    assert sent >= 2
    assert find(m, "coredns_forward_requests_total", to=to)[0] == sent
    assert sum(find(m, "coredns_forward_responses_total", to=to)) == sent
    assert find(m, "coredns_forward_request_duration_seconds_count", to=to)[0] == sent
    # CoreDNS 1.11's names for the same numbers, with the forwarding plugin's name.
    assert find(m, "coredns_proxy_requests_total", to=to, proxy_name="forward")[0] == sent
    assert find(m, "coredns_proxy_request_duration_seconds_count", to=to,
                proxy_name="forward")[0] == sent
    # Five asks, one upstream query per worker at most: the rest are cache hits, of the
    # answer ("success") and of the NXDOMAIN ("denial": CoreDNS's cache type label).
    gone = sum(1 for name, _, _ in up.queries if name.rstrip(".") == "gone.example")
    assert 1 <= gone <= 2
    www = sent - gone
    assert find(m, "coredns_cache_hits_total", type="success")[0] >= 5 - www
    assert find(m, "coredns_cache_hits_total", type="denial")[0] >= 5 - gone
    assert find(m, "coredns_cache_entries", type="success")[0] >= 1
    assert find(m, "coredns_cache_entries", type="denial")[0] >= 1
    assert find(m, "coredns_cache_evictions_total", type="denial") == [0.0]
    assert find(m, "coredns_cache_misses_total")[0] >= 1
    hits = sum(find(m, "coredns_cache_hits_total"))
    assert find(m, "coredns_cache_requests_total")[0] == hits + find(m, "coredns_cache_misses_total")[0]


ALERT_SERIES = [
    # coredns-mixin / kube-prometheus alerts: CoreDNSLatencyHigh, CoreDNSErrorsHigh,
    # CoreDNSForwardLatencyHigh, CoreDNSForwardErrorsHigh, CoreDNSForwardHealthcheckFailureCount.
    ("coredns_dns_request_duration_seconds_bucket", {}),
    ("coredns_dns_responses_total", {"rcode": "SERVFAIL"}),
    ("coredns_forward_request_duration_seconds_bucket", {}),
    ("coredns_forward_responses_total", {"rcode": "SERVFAIL"}),
    ("coredns_forward_healthcheck_failures_total", {}),
]


@pytest.mark.parametrize("name,labels", ALERT_SERIES, ids=[n for n, _ in ALERT_SERIES])
def test_alert_rule_series_are_present(served, name, labels):
    k, _, _ = served
    assert find(samples(scrape(k.http_port)), name, **labels), f"{name} {labels} missing"


def test_kdns_own_series(served):
    k, _, _ = served
    m = samples(scrape(k.http_port))
    assert find(m, "kdns_image_published_generation") == [1.0]
    assert find(m, "kdns_image_generation", worker="0") == [1.0]
    assert find(m, "kdns_image_bytes")[0] == len(sample_image())
    assert 0 <= find(m, "kdns_image_age_seconds")[0] < 120
    assert find(m, "kdns_worker_restarts_total") == [0.0]
    assert find(m, "kdns_ready") == [1.0]
    assert find(m, "kdns_api_staleness_seconds") == [0.0]
    assert find(m, "kdns_api_relists_total") == [0.0]
    assert find(m, "process_cpu_seconds_total")
    # A worker forked from the zygote has done almost nothing yet: zero clock ticks is a
    # true reading; the series must be there for each worker.
    assert [v >= 0 for v in find(m, "kdns_worker_cpu_seconds_total", worker="1")] == [True]
    assert find(m, "kdns_worker_resident_memory_bytes", worker="0")[0] > 1 << 20


def test_skydns_names(served):
    _, ports, _ = served
    m = samples(scrape(ports["prometheus"], "/skydns"))
    p = "skydns_skydns_dns_"
    assert find(m, p + "request_count_total", system="auth")[0] >= 7
    assert find(m, p + "request_count_total", system="recursive")[0] >= 1
    assert find(m, p + "request_duration_seconds_count", system="auth")
    assert find(m, p + "response_size_bytes_count", system="auth")
    assert find(m, p + "error_count_total", system="auth", cause="nxdomain")[0] >= 1
    # kube-dns's cause values (skydns metrics): "servfail", not "fail".
    assert find(m, p + "error_count_total", system="auth", cause="servfail")
    assert not find(m, p + "error_count_total", cause="fail")
    assert find(m, p + "error_count_total", system="auth", cause="nodata")[0] >= 1
    assert find(m, p + "cachemiss_count_total", cache="response")


def test_sidecar_names(served):
    _, ports, _ = served
    text = scrape(ports["sidecar"])
    m = samples(text)
    # The kube-dns manifest's sidecar probes both kubedns and dnsmasq; both are kdns here.
    for probe in ("kubedns", "dnsmasq"):
        assert find(m, f"kubedns_probe_{probe}_latency_ms_count")[0] >= 1, probe
        assert find(m, f"kubedns_probe_{probe}_errors") is not None, probe
    # The sidecar's client_golang counters: TYPE counter under their own names (no _total).
    for name in ("hits", "misses", "evictions", "insertions", "max_size", "errors"):
        assert f"# TYPE kubedns_dnsmasq_{name} counter\n" in text, name
        assert re.search(rf"^kubedns_dnsmasq_{name} [0-9.e+]+$", text, re.M), name
    assert "kubedns_dnsmasq_hits_total" not in text


def test_sidecar_dnsmasq_healthcheck(served):
    _, ports, _ = served
    with urllib.request.urlopen(f"http://{HOST}:{ports['sidecar']}/healthcheck/dnsmasq",
                                timeout=3) as r:
        body = json.loads(r.read())
    assert body["IsOk"] is True and body["Err"] == ""


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def test_process_series_are_the_whole_pods(tmp_path):
    """process_* sums the supervisor and its workers (the workers do the DNS work); the CPU
    counter keeps what a replaced worker used."""
    k = Kdns(tmp_path, image=sample_image(), workers=2,
             args=("--worker-processes", "2")).start()      # and so a zygote
    try:
        for _ in range(50):
            k.udp(K, "A")
        assert len(k.worker_pids()) == 2
        pids = {k.proc.pid} | children(k.proc.pid)        # the workers and their zygote
        m = samples(scrape(k.http_port))
        summed = sum(_pss(pid) for pid in pids)
        mem = find(m, "process_resident_memory_bytes")[0]
        assert 0.8 * summed <= mem <= 1.25 * summed, (mem, summed)
        assert mem > 1.5 * _pss(k.proc.pid)              # not the supervisor alone
        workers_cpu = sum(find(m, "kdns_worker_cpu_seconds_total"))
        cpu = find(m, "process_cpu_seconds_total")[0]
        # A worker forked from the zygote may not have used a clock tick yet.
        assert cpu >= workers_cpu >= 0 and cpu > 0
        open_fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
        assert find(m, "process_open_fds")[0] >= open_fds - 5
        # A worker dies and is replaced: its CPU stays in the pod's counter.
        victim = min(k.worker_pids())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while victim in k.worker_pids() or len(k.worker_pids()) < 2:
            assert time.monotonic() < deadline, "worker not replaced"
            time.sleep(0.05)
        after = find(samples(scrape(k.http_port)), "process_cpu_seconds_total")[0]
        assert after >= cpu
    finally:
        k.stop()
