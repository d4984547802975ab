"""Tiny threaded HTTP listeners in the supervisor: health, readiness and metrics.

Why: Kubernetes probes and Prometheus need HTTP, and neither may ever sit on the packet
path: these threads run in the supervisor only, and metrics are read from the workers'
shared counter pages when Prometheus scrapes (DESIGN.md "What makes it fast").

What it must not do: touch DNS sockets or call into the workers. The listeners kdns serve
starts, their routes and the full metrics set are kdns/health.py's and kdns/metrics.py's
(issue 6); CounterCollector and probe_routes here are issue 2's minimal set.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import counters as C
from . import publish

log = logging.getLogger("kdns.http")

# RFC 1035 §4.1.1, RFC 2136, RFC 6891: the names CoreDNS uses for rcode labels.
RCODE_NAMES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN",
               "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13",
               "RCODE14", "RCODE15", "BADVERS")
assert len(RCODE_NAMES) == C.NRCODES

Route = Callable[[], tuple[int, str, bytes]]


class CounterCollector:
    """Sums the worker pages at scrape time (never per query)."""

    def __init__(self, pages, nslots: int, published: Callable[[], int]):
        self.pages = pages
        self.nslots = nslots
        self.published = published

    def collect(self):
        total = C.sum_slots(self.pages, self.nslots)
        L = C.LAYOUT
        req = CounterMetricFamily("coredns_dns_requests", "DNS requests by protocol and type.",
                                  labels=["server", "zone", "proto", "type"])
        resp = CounterMetricFamily("coredns_dns_responses", "DNS responses by rcode.",
                                   labels=["server", "zone", "rcode"])
        for proto in C.PROTOS:
            for qtype, _ in C.QTYPES:
                req.add_metric(["dns://", ".", proto, qtype], total[L[f"queries_{proto}_{qtype}"]])
        for rcode, name in enumerate(RCODE_NAMES):
            n = sum(total[L[f"rcode_{p}_{rcode}"]] for p in C.PROTOS)
            resp.add_metric(["dns://", ".", name], n)
        trunc = CounterMetricFamily("kdns_truncated_responses", "UDP/TCP replies with TC set.",
                                    labels=["proto"])
        drops = CounterMetricFamily("kdns_dropped_queries", "Packets dropped unanswered.",
                                    labels=["proto"])
        for proto in C.PROTOS:
            trunc.add_metric([proto], total[L[f"truncated_{proto}"]])
            drops.add_metric([proto], total[L[f"dropped_{proto}"]])
        pub = GaugeMetricFamily("kdns_image_published_generation",
                                "Generation of the newest zone image the supervisor published.")
        pub.add_metric([], self.published())
        served = GaugeMetricFamily("kdns_image_generation",
                                   "Generation of the zone image each worker serves (0: none).",
                                   labels=["worker"])
        for slot in range(self.nslots):
            served.add_metric([str(slot)], publish.page_generation(self.pages, slot))
        return [req, resp, trunc, drops, pub, served]


def metrics_route(collector: CounterCollector) -> Route:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


def probe_routes(ready: Callable[[], bool]) -> dict[str, Route]:
    def readiness():
        return (200, "text/plain", b"ok") if ready() else (503, "text/plain", b"not ready")
    return {"/readiness": readiness, "/health": lambda: (200, "text/plain", b"ok"),
            "/healthz": lambda: (200, "text/plain", b"ok")}


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}

    def do_GET(self):
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            status, ctype, body = 404, "text/plain", b"not found"
        else:
            try:
                status, ctype, body = route()
            except Exception:  # noqa: BLE001 -- a broken scrape must not kill the listener
                log.exception("HTTP handler for %s failed", self.path)
                status, ctype, body = 500, "text/plain", b"internal error"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("http: " + fmt, *args)


class HttpListener:
    """One ThreadingHTTPServer on its own daemon thread."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]):
        handler = type("Handler", (_Handler,), {"routes": routes})
        server_class = ThreadingHTTPServer
        if ":" in host:
            import socket
            server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = server_class((host, port), handler)   # OSError when the port is taken
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"http-{port}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
