"""Health and readiness as kube-dns's pod and CoreDNS report them: /readiness,
/health, /ready, and the sidecar's /healthcheck/kubedns and /healthz, each on its own port;
health is a real DNS query to the workers, sent by a probe thread, cached, and never sent
per HTTP request."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT
from kdns.observe import health
from serverutil import HOST, Kdns, Port
from zonefixtures import sample_image


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def ports():
    """The listeners' ports, filled in by start() once kdns holds them (drawn at start)."""
    return {}


def start(tmp_path, ports, *extra):
    k = Kdns(tmp_path, image=sample_image(), workers=2,
             args=("--health-port", Port("health"), "--ready-port", Port("ready"),
                   "--sidecar-port", Port("sidecar"), *extra))
    k.start()
    ports.update(k.ports)
    return k


def test_every_endpoint_on_its_own_port(tmp_path, ports):
    k = start(tmp_path, ports)
    try:
        assert get(k.http_port, "/readiness") == (200, "ok")
        assert get(ports["health"], "/health") == (200, "OK")
        assert get(ports["ready"], "/ready") == (200, "OK")
        status, body = get(ports["sidecar"], "/healthcheck/kubedns")
        assert status == 200
        doc = json.loads(body)
        # The sidecar's JSON: exactly these keys (dns-rules §3.4).
        assert list(doc) == ["IsOk", "LatencySeconds", "Err"]
        assert doc["IsOk"] is True and doc["Err"] == "" and 0 < doc["LatencySeconds"] < 2
        status, body = get(ports["sidecar"], "/healthz")
        assert status == 200 and body.startswith("ok (")
        # Each path only where its peer serves it.
        assert get(ports["health"], "/ready")[0] == 404
        assert get(ports["ready"], "/health")[0] == 404
        assert get(ports["sidecar"], "/readiness")[0] == 404
    finally:
        assert k.stop() == 0


def test_health_is_a_cached_probe_not_a_query_per_request(tmp_path, ports):
    k = start(tmp_path, ports)
    try:
        key = ("coredns_dns_requests_total",
               frozenset({"server": f"dns://{HOST}:{k.port}", "zone": ".", "view": "",
                          "proto": "udp", "family": "1", "type": "SRV"}.items()))
        before, started = k.metrics()[key], time.monotonic()
        for _ in range(30):
            assert get(ports["sidecar"], "/healthcheck/kubedns")[0] == 200
            assert get(ports["health"], "/health")[0] == 200
        # One probe per PROBE_INTERVAL (the sidecar's 5 s), not one per request: at most one
        # more than the intervals begun in this time (two on a quick machine), far under 60.
        intervals = int((time.monotonic() - started) // health.PROBE_INTERVAL) + 1
        assert k.metrics()[key] - before <= intervals + 1
    finally:
        k.stop()


def test_sidecar_probe_fails_without_answer_records_but_health_passes(tmp_path, ports):
    # With another --domain, kubernetes.default.svc.example.org is outside the image: the
    # workers answer (REFUSED: no upstream in tests), so /health passes, but the sidecar's
    # probe needs answer RRs and fails with 503 and IsOk false (dns-rules §3.4).
    k = Kdns(tmp_path, image=sample_image(), workers=1,
             args=("--domain", "example.org", "--health-port", Port("health"),
                   "--sidecar-port", Port("sidecar")))
    k.start()
    ports.update(k.ports)
    try:
        deadline = time.monotonic() + 5
        while get(ports["health"], "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get(ports["health"], "/health") == (200, "OK")
        status, body = get(ports["sidecar"], "/healthcheck/kubedns")
        doc = json.loads(body)
        assert status == 503 and doc["IsOk"] is False and doc["Err"], body
    finally:
        k.stop()


def test_readiness_waits_for_a_real_answer(tmp_path):
    """Ready needs the probe's reply: with the workers' socket silent it never comes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        p = health.Prober(silent.getsockname(), "kubernetes.default.svc.cluster.local",
                          timeout=0.2)
        assert p.sidecar_json() == (503, b'{"IsOk":false,"LatencySeconds":0,'
                                         b'"Err":"waiting for first probe"}')
        r = p.probe_once()
        assert not r.replied and not p.answering() and p.errors == 1
        status, body = p.sidecar_json()
        assert status == 503 and json.loads(body)["Err"].startswith("no reply")


def test_lameduck_makes_ready_fail_at_once_and_health_stay(tmp_path, ports):
    k = start(tmp_path, ports, "--lameduck", "3s")
    try:
        k.proc.send_signal(15)
        deadline = time.monotonic() + 1
        while get(ports["ready"], "/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get(ports["ready"], "/ready")[0] == 503
        assert get(k.http_port, "/readiness")[0] == 503
        assert get(ports["health"], "/health") == (200, "OK")     # still answering
        assert k.udp("kubernetes.default.svc.cluster.local").answer
        assert k.proc.wait(10) == 0
    finally:
        k.stop()


def test_cache_lists_the_served_zone_as_kdns_records_prints_it(tmp_path):
    """kube-dns's /cache on the healthz port: the live zone, read back from the published
    image, so a change shows once it is served."""
    src = tmp_path / "cluster.yaml"
    shutil.copy(os.path.join(ROOT, "examples", "cluster.yaml"), src)

    def records_lines() -> list[str]:
        out = subprocess.run([sys.executable, "-m", "kdns", "records", "--from-file", str(src)],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        return [line for line in out.splitlines() if not line.startswith(";")]

    k = Kdns(tmp_path, zone_file=str(src), workers=1).start()
    try:
        status, text = k.http_get("/cache")
        assert status == 200
        assert text.splitlines() == records_lines()
        assert "kubernetes.default.svc.cluster.local.\t30\tIN\tA\t10.96.0.1" in text
        with open(src, "a") as f:
            f.write("- {apiVersion: v1, kind: Service, metadata: {name: added, namespace: "
                    "default}, spec: {type: ClusterIP, clusterIP: 10.96.9.9}}\n")
        os.kill(k.proc.pid, signal.SIGHUP)                   # reload now
        k.wait_generation(2)
        status, text = k.http_get("/cache")
        assert "added.default.svc.cluster.local.\t30\tIN\tA\t10.96.9.9" in text
        assert text.splitlines() == records_lines()
    finally:
        k.stop()
