"""Health and readiness the way kube-dns's pod and CoreDNS report them.

Why: liveness must mean "the workers answer DNS", not "the supervisor's HTTP thread runs".
So a probe thread in the supervisor sends the query kube-dns's sidecar sends
(``kubernetes.default.svc.<domain>`` SRV, dns-rules §3.4) to kdns's own DNS port every 5 s, and
every health endpoint reports that cached result: an HTTP request never sends a query.

- ``/healthcheck/kubedns`` (sidecar port): the sidecar's JSON; fails on no reply, an error
  rcode or zero answer RRs, exactly as the sidecar's probe does; 503 until the first probe.
- ``/health`` (health port, CoreDNS): 200 ``OK`` when the last probe got any reply at all
  (SERVFAIL before the first sync still proves the workers answer).
- ``/readiness`` (healthz port, kube-dns) and ``/ready`` (ready port, CoreDNS): first sync
  done (a synced image published and every worker serving it) and not in lameduck.

What it must not do: sit on the packet path, or answer a probe from anything but a real
reply from the workers.
"""
from __future__ import annotations

import datetime
import json
import logging
import secrets
import socket
import struct
import threading
import time
from typing import Callable

from kdns.observe.metrics import LATENCY_MS_BOUNDS

log = logging.getLogger("kdns.observe.health")

PROBE_INTERVAL = 5.0         # the sidecar's default probe interval (dns-rules §3.4)
PROBE_RETRY = 0.5            # until the first good probe, so liveness settles quickly
PROBE_TIMEOUT = 2.0
SRV = 33

Route = Callable[[], tuple[int, str, bytes]]


def probe_target(bind: str, port: int) -> tuple[str, int]:
    """Where the probe goes: the bound address, loopback for a wildcard bind (IPv4's for
    ``::``, which serves both families and needs no ::1 on the node)."""
    if bind in ("0.0.0.0", "", "::"):
        return "127.0.0.1", port
    return bind, port


def build_query(qid: int, name: str, qtype: int) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode("ascii")
                     for label in name.strip(".").split(".") if label) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


class ProbeResult:
    __slots__ = ("replied", "ok", "latency", "err", "at")

    def __init__(self, replied: bool, ok: bool, latency: float, err: str, at: float):
        self.replied, self.ok, self.latency, self.err, self.at = replied, ok, latency, err, at


RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


class Prober:
    """Sends the sidecar's SRV probe to kdns's DNS port; keeps the last result and the
    sidecar's latency histogram and error count."""

    def __init__(self, target: tuple[str, int], name: str, *, interval: float = PROBE_INTERVAL,
                 timeout: float = PROBE_TIMEOUT, label: str = "kubedns"):
        self.target, self.name, self.label = target, name, label
        # The names the sidecar's endpoints and metrics report this probe under.
        self.labels = SIDECAR_PROBE_LABELS
        self.interval, self.timeout = interval, timeout
        self.last: ProbeResult | None = None
        self.answered_once = False      # readiness: the workers have answered at least once
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_MS_BOUNDS) + 1)
        self.latency_ms_sum = 0.0
        self.stop_event = threading.Event()
        self.kick_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="dns-probe", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Probe now (the supervisor calls this when the workers first serve an image)."""
        self.kick_event.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.kick_event.clear()
            self.probe_once()
            good = self.last is not None and self.last.ok
            self.kick_event.wait(self.interval if good else min(self.interval, PROBE_RETRY))

    def close(self) -> None:
        self.stop_event.set()
        self.kick_event.set()
        if self.thread.is_alive():
            self.thread.join(self.timeout + 1)

    def probe_once(self) -> ProbeResult:
        t0 = time.monotonic()
        replied, ok, err = self.exchange()
        latency = time.monotonic() - t0
        if ok:
            ms = latency * 1000
            self.latency_ms_sum += ms
            self.buckets[next((i for i, b in enumerate(LATENCY_MS_BOUNDS) if ms <= b),
                              len(LATENCY_MS_BOUNDS))] += 1
        else:
            self.errors += 1
            if self.last is None or self.last.ok:
                log.warning("DNS probe %s SRV to %s port %d failed: %s", self.name,
                            *self.target, err)
        if ok and self.last is not None and not self.last.ok:
            log.info("DNS probe %s SRV answered again", self.name)
        self.last = ProbeResult(replied, ok, latency, err, time.time())
        self.answered_once = self.answered_once or replied
        return self.last

    def exchange(self) -> tuple[bool, bool, str]:
        """(got a reply, the sidecar would call it healthy, error text)."""
        host, port = self.target
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        qid = secrets.randbits(16)
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect((host, port))
                s.send(build_query(qid, self.name, SRV))
                deadline = time.monotonic() + self.timeout
                while True:
                    s.settimeout(max(0.001, deadline - time.monotonic()))
                    data = s.recv(4096)
                    if len(data) >= 12 and struct.unpack_from("!H", data)[0] == qid:
                        break
            except OSError as e:          # timeout, refused, unreachable
                return False, False, f"no reply ({e.strerror or e})"
        flags, _, ancount = struct.unpack_from("!HHH", data, 2)
        rcode = flags & 0xF
        if rcode:
            name = RCODES[rcode] if rcode < len(RCODES) else f"RCODE{rcode}"
            return True, False, f"rcode {name}"
        if not ancount:
            return True, False, "no answer records"     # the sidecar fails on zero RRs
        return True, True, ""

    # ---- what the endpoints report
    def sidecar_json(self) -> tuple[int, bytes]:
        r = self.last
        if r is None:
            body = {"IsOk": False, "LatencySeconds": 0, "Err": "waiting for first probe"}
        else:
            body = {"IsOk": r.ok, "LatencySeconds": round(r.latency, 9), "Err": r.err}
        return (200 if body["IsOk"] else 503), json.dumps(body, separators=(",", ":")).encode()

    def answering(self) -> bool:
        return self.last is not None and self.last.replied


SIDECAR_PROBE_LABELS = ("kubedns", "dnsmasq")


def readiness_text(ready: bool, synced: bool, lameduck: bool) -> str:
    if ready:
        return ""
    if lameduck:
        return "shutting down (lameduck)"
    return "kubernetes" if not synced else "workers"


def routes(*, prober: Prober | None, ready: Callable[[], bool],
           why_not_ready: Callable[[], str],
           zone_text: Callable[[], str | None] | None = None) -> dict[str, dict[str, Route]]:
    """Routes per listener kind: healthz (kube-dns), health/ready (CoreDNS), sidecar."""
    def readiness():
        return (200, "text/plain", b"ok") if ready() else (503, "text/plain", b"not ready")

    def ready_route():
        # CoreDNS ready plugin: 200 OK, or 503 and the plugins that are not ready.
        return (200, "text/plain", b"OK") if ready() else \
            (503, "text/plain", why_not_ready().encode())

    def health(ok_text: bytes = b"OK") -> Route:
        def route():
            if prober is None or prober.answering():
                return 200, "text/plain", ok_text
            err = prober.last.err if prober.last is not None else "waiting for first probe"
            return 503, "text/plain", f"workers do not answer DNS: {err}".encode()
        return route

    def healthcheck():
        status, body = prober.sidecar_json()
        return status, "application/json", body

    def healthz():
        now = datetime.datetime.now(datetime.timezone.utc)
        return 200, "text/plain", f"ok ({now:%Y-%m-%d %H:%M:%S.%f %z} UTC)".encode()

    def cache():
        # kube-dns's /cache listed its record tree; this lists the served zone image as a
        # master file (what `kdns records` prints for a file), read back from the published
        # bytes on each request: what the workers answer, never a copy kept for it.
        text = zone_text() if zone_text is not None else None
        if text is None:
            return 503, "text/plain", b"no zone image published yet"
        return 200, "text/plain; charset=utf-8", text.encode()

    out = {
        "healthz": {"/readiness": readiness, "/health": health(b"ok"), "/healthz": health(b"ok"),
                    "/cache": cache},
        "health": {"/health": health()},
        "ready": {"/ready": ready_route},
        "sidecar": {"/healthz": healthz},
    }
    if prober is not None:
        # kube-dns's sidecar probed kubedns (:10053) and dnsmasq (:53) separately; in kdns
        # both are the one server on --dns-port, so one probe reports under both names.
        for label in prober.labels:
            out["sidecar"][f"/healthcheck/{label}"] = healthcheck
    return out


# --------------------------------------------------------------------------- listeners


class PortError(Exception):
    """An HTTP listener cannot start; one sentence naming the flag."""


# Listener kind -> the flag that sets its port (the CLI's names, for error messages).
PORT_FLAGS = (("healthz", "--healthz-port", "healthz_port"),
              ("metrics", "--metrics-port", "metrics_port"),
              ("health", "--health-port", "health_port"),
              ("ready", "--ready-port", "ready_port"),
              ("sidecar", "--sidecar-port", "sidecar_port"),
              ("prometheus", "PROMETHEUS_PORT", "prometheus_port"))


def start_listeners(sup):
    """(prober or None, [HttpListener]) for the supervisor's config: one listener per port,
    kinds that share a port share its listener unless they serve the same path."""
    from kdns.observe import http
    from kdns.observe import metrics
    cfg = sup.cfg
    ports = {kind: (flag, getattr(cfg, attr, 0)) for kind, flag, attr in PORT_FLAGS}
    prober = None
    if any(ports[k][1] for k in ("healthz", "health", "ready", "sidecar")):
        prober = Prober(probe_target(cfg.dns_bind_address, sup.dns_port()),
                        f"kubernetes.default.svc.{cfg.domain.rstrip('.')}")
    kinds = routes(prober=prober, ready=sup.is_ready,
                   why_not_ready=lambda: readiness_text(
                       sup.is_ready(), sup.ready, sup.lameduck_until is not None),
                   zone_text=sup.zone_text)
    for kind, more in getattr(sup, "extra_routes", dict)().items():
        kinds[kind] = {**kinds.get(kind, {}), **more}
    for kind, more in metrics.routes(sup, prober).items():
        kinds[kind] = {**kinds.get(kind, {}), **more}
    by_port: dict[int, tuple[list[str], dict]] = {}
    for kind, (flag, port) in ports.items():
        if not port:
            continue
        flags, merged = by_port.setdefault(port, ([], {}))
        for path in kinds[kind]:
            if path in merged:
                raise PortError(f"{flag} {port} is also {flags[0]}'s port and both serve "
                                f"{path}; choose another port.")
        flags.append(flag)
        merged.update(kinds[kind])
    listeners = []
    try:
        for port, (flags, merged) in by_port.items():
            try:
                listeners.append(http.HttpListener(cfg.dns_bind_address, port, merged))
            except OSError as e:
                raise PortError(f"cannot listen for HTTP on {cfg.dns_bind_address} port {port} "
                                f"({e.strerror or e}); choose another {' or '.join(flags)}, "
                                f"or 0 to disable it.") from None
    except PortError:
        for listener in listeners:
            listener.close()
        raise
    return prober, listeners
