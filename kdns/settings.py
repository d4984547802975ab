"""Every default kdns has, and every KDNS_* environment switch, in one place.

Why: a default written in two places drifts (the EDNS size once stood in 24 places), and an
environment variable read in the module that happens to need it is invisible to whoever
reads the flags. Flags (``kdns.cli``) take their defaults from here; code that needs a
default when it is not given one takes it from here; nothing else hard-codes them.

The environment is read once, when this module is first imported (``ENV``). Tests that need
another switch replace ``ENV`` with ``from_env({...})`` rather than setting os.environ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# --------------------------------------------------------------------------- the zone
DOMAIN = "cluster.local"
TTL = 30                       # kube-dns's record TTL, and kubeadm's Corefile `ttl 30`
PODS = "insecure"              # kubeadm's Corefile `pods insecure`
# Rotate A, AAAA and SRV answers (kubeadm's Corefile `loadbalance`; kube-dns's SkyDNS
# rotated too): clients that use the first address (glibc) spread over the endpoints.
LOADBALANCE = True

# --------------------------------------------------------------------------- listening
# Both families on one socket per worker (IPV6_V6ONLY off), so dual-stack clusters work
# without a flag; a node without IPv6 falls back to 0.0.0.0 (kube-dns's default).
DNS_BIND_ADDRESS = "::"
DNS_PORT = 53
# The largest UDP reply kdns sends and the size it advertises upstream: the DNS Flag Day
# 2020 value, which fits the IPv6 minimum MTU (RFC 8200 §5) without fragments.
EDNS_UDP_SIZE = 1232
UDP_BATCH = 64                 # datagrams per recvmmsg/sendmmsg call
TCP_IDLE_TIMEOUT = 10.0        # seconds a TCP connection may sit idle (RFC 7766 §6.2.3)
TCP_MAX_CONNECTIONS = 1000     # TCP connections per worker
# RFC 7766 §10: one source must not take every connection, or no other client can retry a
# truncated UDP answer over TCP. A node's pods share no source address (each pod has its
# own), so a fifth of the cap is plenty for any one client.
TCP_MAX_PER_SOURCE = 200       # TCP connections per source address per worker
# RFC 7766 §6.2.3: under pressure the idle timeout shortens, from TCP_IDLE_TIMEOUT at half
# the cap down to this at the cap.
TCP_IDLE_TIMEOUT_MIN = 0.5

# --------------------------------------------------------------------------- workers
# Worker processes hosting the --workers slots unless --worker-processes says otherwise
# (never more than the slots): each process runs its slots as threads
# (kdns/serve/worker.py serve_slots). One: a second process costs its own pages and the
# zygote's (7-9.5 MiB summed PSS from 1 to 2 workers, against ~0.5 for a second slot
# thread; docs/sizing.md), while the supervisor holding every slot's sockets already keeps
# a crash from losing queued packets. --worker-processes 2 or more buys per-process
# isolation. kdns node-local has no such flag: its slots are threads of one process.
DEFAULT_WORKER_PROCESSES = 1
WORKER_HEARTBEAT = 0.1         # seconds between a worker's heartbeats (its counter page)
# A worker whose heartbeat stands still this long is killed and replaced: its socket's
# queue is served by nobody meanwhile (the other workers' sockets take only their share).
WORKER_STALL_TIMEOUT = 1.0
# After a wake-up that found fewer queries than a batch, a worker sleeps this long before
# it waits again (kdns/packet/_fastpath.pyx UdpServer.wait): at everyday load the cost of a
# query is the wake-up (the worker's and, through the reply, the client's), and this lets
# one wake-up answer several. A query waits at most this much longer (plus the kernel's
# timer slack, 50 us by default); 0 turns it off. Off by default: it trades latency for CPU,
# and the latency it adds is spent in the socket buffer, before kdns's request-duration
# histogram starts, so dashboards would not show it. Measured on this project's 2-core
# machine at 20,000 q/s (bench/load.py --fixed-rates, against NSD in the same run): hold 0
# 0.95x NSD's CPU per query with p99 equal; 100 us 0.79x with p99 1.7x; 200 us 0.64x with
# p99 2.0x. KDNS_UDP_HOLD_US sets it for a pod that prefers the CPU.
UDP_HOLD_US = 0

# --------------------------------------------------------------------------- HTTP ports
HEALTHZ_PORT = 8081            # kube-dns's /readiness
METRICS_PORT = 9153            # CoreDNS's prometheus plugin
HEALTH_PORT = 8080             # CoreDNS's health plugin
READY_PORT = 8181              # CoreDNS's ready plugin
SIDECAR_PORT = 10054           # kube-dns's sidecar
LAMEDUCK = 5.0                 # kubeadm's Corefile `health { lameduck 5s }`

# --------------------------------------------------------------------------- the API
INITIAL_SYNC_TIMEOUT = 60.0    # kube-dns's --initial-sync-timeout

# --------------------------------------------------------------------------- forwarding
CONFIG_DIR = "/kube-dns-config"    # where kube-dns's manifest mounts its ConfigMap
CONFIG_PERIOD = 10.0               # kube-dns's --config-period
CONFIG_MAP_NAMESPACE = "kube-system"
RESOLV_CONF = "/etc/resolv.conf"
# Where CoreDNS's manifests mount the coredns ConfigMap: a Corefile read through the API
# resolves its imports (k3s's and AKS's custom/*.server) against this directory.
COREFILE_DIR = "/etc/coredns"
COREFILE_CONFIGMAP = "coredns"
CACHE_SIZE = 10000             # forwarded answers kept per worker (CoreDNS: 9984 per class)
FAST_CACHE_SLOTS = 4096        # slots of the compiled packet cache per worker
# The forwarder's choices (--forward-*, the Corefile's forward options): CoreDNS's defaults.
FORWARD_POLICY = "random"      # which upstream first: random, round_robin or sequential
FORWARD_MAX_CONCURRENT = 1000  # queries in flight per worker; beyond it REFUSED (CoreDNS)
FORWARD_FORCE_TCP = False
# The cache's TTL caps and floor (CoreDNS cache: 3600 s success, 1800 s denial, 5 s floor).
CACHE_SUCCESS_TTL = 3600
CACHE_DENIAL_TTL = 1800
CACHE_MIN_TTL = 5
SERVE_STALE = 0.0              # seconds past expiry an answer may be served stale; 0: never
SERVE_STALE_DURATION = 3600.0  # --serve-stale without a value, and CoreDNS's serve_stale
# CoreDNS cache ``prefetch AMOUNT [DURATION] [PERCENTAGE%]``: (AMOUNT, DURATION s, PERCENT);
# AMOUNT 0 is off (the default). DURATION and PERCENT default as CoreDNS's: 1m and 10%.
CACHE_PREFETCH = (0, 60.0, 10)
PREFETCH_DURATION = 60.0
PREFETCH_PERCENT = 10
# RFC 8767 §5 client response timer: with a stale answer at hand, a refresh that has not
# answered in this long is answered stale.
STALE_ANSWER_TIMEOUT = 1.8
TRY_TIMEOUT = 2.0              # seconds per upstream try (kube-dns and CoreDNS: 2 s)
# RFC 9520 §3.2: a resolution failure is cached at least 1 s, backing off on repeats up
# to at most 5 minutes; kdns doubles from 1 s and stops at 30 s.
FAILURE_TTL_MIN = 1
FAILURE_TTL_MAX = 30
# An upstream marked down (its last try failed) gets a health check (`. IN NS`, CoreDNS
# forward's) this long after, doubling while it stays silent, so one that is back is used
# again even while the others answer; CoreDNS checks every 0.5 s.
HEALTH_CHECK_MIN = 0.5
HEALTH_CHECK_MAX = 8.0


@dataclass(frozen=True)
class Env:
    """The KDNS_* switches (escape hatches and references for benchmarks, all off by default)
    and kube-dns's PROMETHEUS_* variables, as the environment gave them."""
    pure: bool = False             # KDNS_PURE=1: the pure-Python packet path and compiler
    pure_compile: bool = False     # KDNS_PURE_COMPILE=1: the reference compiler only
    full_compile: bool = False     # KDNS_FULL_COMPILE=1: no incremental compile after a change
    fwd_compiled: bool = True      # KDNS_FWD_COMPILED=0: cache misses forwarded from Python
    # KDNS_FORK_WORKERS=0: each worker a fresh interpreter instead of a fork of the zygote
    # (kdns/serve/zygote.py); the reference for what the zygote saves.
    fork_workers: bool = True
    # KDNS_WATCH_SETTINGS: the API watchers' timings as JSON (kdns.kube.api.WatchSettings),
    # so a test can shorten the backoff of a kdns it starts.
    watch_settings: str | None = None
    # kube-dns's PROMETHEUS_PORT/PROMETHEUS_PATH, unparsed: kdns.cli checks them and says
    # what is wrong in the operator's words.
    prometheus_port: str = ""
    prometheus_path: str = ""
    # KDNS_UDP_LOOP=asyncio: workers drain UDP from an event-loop reader callback instead of
    # inside the loop's wait in C (the reference for what the wait in C saves).
    udp_loop: str = "c"
    # KDNS_UDP_HOLD_US: replaces settings.UDP_HOLD_US (benchmarks try other holds).
    udp_hold_us: int | None = None


def from_env(environ) -> Env:
    return Env(pure=environ.get("KDNS_PURE") == "1",
               pure_compile=environ.get("KDNS_PURE_COMPILE") == "1",
               full_compile=environ.get("KDNS_FULL_COMPILE") == "1",
               fwd_compiled=environ.get("KDNS_FWD_COMPILED", "1") != "0",
               fork_workers=environ.get("KDNS_FORK_WORKERS", "1") != "0",
               watch_settings=environ.get("KDNS_WATCH_SETTINGS") or None,
               prometheus_port=environ.get("PROMETHEUS_PORT", ""),
               prometheus_path=environ.get("PROMETHEUS_PATH", ""),
               udp_loop=environ.get("KDNS_UDP_LOOP", "c"),
               udp_hold_us=_int_or_none(environ.get("KDNS_UDP_HOLD_US")))


def _int_or_none(text):
    try:
        return max(0, int(text)) if text else None
    except ValueError:
        return None


ENV = from_env(os.environ)
