"""Layout of the per-worker shared counters: the one definition both packet paths follow.

Why: metrics must cost the packet path nothing, so each worker increments plain uint64 slots
in its own page of shared memory (one writer per slot, no atomics needed), and the supervisor
sums the pages when Prometheus scrapes. ``_fastpath.pxd`` mirrors these indices as C
constants; ``tests/test_counters.py`` checks that the two agree.

Histograms are stored as per-bucket counts (not cumulative) plus a sum; the renderer
accumulates them. Bucket bounds follow CoreDNS so dashboards keep working.
"""
from __future__ import annotations

import struct

PROTOS = ("udp", "tcp")
# Query types counted by name; everything else is "other" (a bounded label set).
QTYPES = (("A", 1), ("AAAA", 28), ("SRV", 33), ("PTR", 12), ("TXT", 16), ("SOA", 6),
          ("NS", 2), ("CNAME", 5), ("MX", 15), ("ANY", 255), ("AXFR", 252), ("IXFR", 251),
          ("HTTPS", 65), ("SVCB", 64), ("other", 0))
NRCODES = 17          # rcodes 0..15 from the header, 16 = BADVERS (RFC 6891)
# Size buckets in bytes (CoreDNS dns.ResponseSizeBuckets); a final +Inf bucket follows.
SIZE_BOUNDS = (0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000, 48000, 64000)
# Latency buckets in seconds (CoreDNS plugin.TimeBuckets: 0.00025 * 2**k); +Inf follows.
LATENCY_BOUNDS = tuple(0.00025 * 2 ** k for k in range(16))
SLOT_WORDS = 1024     # uint64 words per worker page (room to grow without a format change)

GAUGES = ("image_generation",)
# nodata: NOERROR replies with no answer (kube-dns's skydns error cause "nodata"); do:
# queries with the EDNS DO bit (RFC 3225), CoreDNS's coredns_dns_do_requests_total;
# cache_hit_denial: the cache hits that were NXDOMAIN, NODATA or SERVFAIL; autopath: replies
# answered from a later step of the client's search path, behind autopath's CNAME (CoreDNS's
# coredns_autopath_success_total).
EVENTS = ("truncated", "handoff", "dropped", "formerr", "send_failed", "cache_hit", "cache_miss",
          "nodata", "do", "cache_hit_denial", "autopath")


def _layout() -> dict[str, int]:
    names: list[str] = list(GAUGES)
    for p in PROTOS:
        names += [f"queries_{p}_{t}" for t, _ in QTYPES]
    for p in PROTOS:
        names += [f"rcode_{p}_{r}" for r in range(NRCODES)]
    for kind in ("request_size", "response_size"):
        for p in PROTOS:
            names += [f"{kind}_{p}_bucket_{i}" for i in range(len(SIZE_BOUNDS) + 1)]
            names.append(f"{kind}_{p}_sum")
    for p in PROTOS:
        names += [f"latency_{p}_bucket_{i}" for i in range(len(LATENCY_BOUNDS) + 1)]
        names.append(f"latency_{p}_sum_ns")
    for p in PROTOS:
        names += [f"{e}_{p}" for e in EVENTS]
    # Queries by the client's family (coredns_dns_requests_total's family label): queries_*
    # count IPv4 clients, v6queries_* IPv6 ones, each query in one of the two, so both stay
    # monotonic when a scrape reads them apart. An IPv4 client of a dual-stack socket
    # arrives IPv4-mapped (RFC 4291 §2.5.5.2) and counts as IPv4.
    for p in PROTOS:
        names += [f"v6queries_{p}_{t}" for t, _ in QTYPES]
    # The request duration by query type (coredns_dns_request_duration_seconds's type
    # label), both protocols together: the same samples as latency_*.
    for t, _ in QTYPES:
        names += [f"tlatency_{t}_bucket_{i}" for i in range(len(LATENCY_BOUNDS) + 1)]
        names.append(f"tlatency_{t}_sum_ns")
    assert len(names) <= SLOT_WORDS
    return {n: i for i, n in enumerate(names)}


LAYOUT = _layout()


def qtype_index(qtype: int) -> int:
    for i, (_, code) in enumerate(QTYPES):
        if code == qtype:
            return i
    return len(QTYPES) - 1


def size_bucket(n: int) -> int:
    for i, bound in enumerate(SIZE_BOUNDS):
        if n <= bound:
            return i
    return len(SIZE_BOUNDS)


def latency_bucket(ns: int) -> int:
    for i, bound in enumerate(LATENCY_BOUNDS):
        if ns <= bound * 1e9:
            return i
    return len(LATENCY_BOUNDS)


def sum_slots(buf, nslots: int) -> list[int]:
    """Sum the pages of ``nslots`` workers (memoryview of uint64) into one list."""
    words = memoryview(buf).cast("B").cast("Q")
    total = [0] * len(LAYOUT)
    for s in range(nslots):
        base = s * SLOT_WORDS
        for i in range(len(LAYOUT)):
            total[i] += words[base + i]
    return total


# ------------------------------------------------------------------ forwarder
# The forwarder's counters (coredns_forward_* / coredns_cache_*), counted straight into this
# region of the worker's page where the counting happens: the Python Forwarder and Cache
# through ForwardCounters, the compiled forwarder and cache from C at the word indices
# ForwardCounters gives them. One thread per worker runs both, so each word still has one
# writer at a time. The region sits at the top of the page, outside LAYOUT, so
# _fastpath.pxd does not mirror it: C gets its indices at run time.
FWD_UPSTREAMS = 8         # per-worker upstream rows; further upstreams share the last row
FWD_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other")
# *_denial: the share of the count before it that is NXDOMAIN, NODATA or SERVFAIL (CoreDNS's
# cache type "denial"; the rest is "success").
# all_down: queries that found every upstream of their route marked down (CoreDNS's
# coredns_forward_healthcheck_broken_total); failures: queries given up on (SERVFAIL).
FWD_GLOBALS = ("cache_hits", "cache_misses", "cache_entries", "cache_evictions",
               "cache_inserts", "cache_capacity", "stale_served", "failures", "refused_inflight",
               "cache_hits_denial", "cache_entries_denial", "cache_evictions_denial",
               "all_down", "cache_prefetches", "autopath_success")
FWD_GAUGES = ("cache_entries", "cache_capacity", "cache_entries_denial")
# Row: address (16 bytes, IPv4-mapped for IPv4), port (0: unused row), requests, failures
# (failed tries: timeouts, network errors), rcodes, latency buckets (LATENCY_BOUNDS + Inf),
# latency sum in ns, failed health checks (coredns_forward_healthcheck_failures_total).
FWD_ROW = 2 + 1 + 1 + 1 + len(FWD_RCODES) + len(LATENCY_BOUNDS) + 1 + 1 + 1
FWD_WORDS = len(FWD_GLOBALS) + FWD_UPSTREAMS * FWD_ROW
FWD_BASE = SLOT_WORDS - FWD_WORDS
assert len(LAYOUT) <= FWD_BASE

# When the worker last swapped images (CLOCK_MONOTONIC, ns), written by Python next
# to the forwarder region (so not mirrored by _fastpath.pxd either): DNS programming latency
# ends when the last worker serves a change, not when the controller next looks.
SWAPPED_NS_WORD = FWD_BASE - 1
assert len(LAYOUT) <= SWAPPED_NS_WORD

# The worker's heartbeat: a count its event loop raises every settings.WORKER_HEARTBEAT
# seconds, written by Python (so not mirrored by _fastpath.pxd). A worker that is alive but
# makes no progress (stopped, deadlocked, spinning) keeps its sockets' queues unserved; the
# supervisor replaces one whose count stands still (0: no beat yet, the worker is starting).
HEARTBEAT_WORD = FWD_BASE - 2
assert len(LAYOUT) <= HEARTBEAT_WORD


def _row(u: int) -> int:
    return FWD_BASE + len(FWD_GLOBALS) + u * FWD_ROW


def forward_totals(buf, nslots: int) -> dict:
    """Sum the forwarder region of ``nslots`` pages: globals by name, and one dict per
    upstream address seen (requests, failures, rcodes, latency buckets, latency_sum_ns)."""
    import ipaddress
    words = memoryview(buf).cast("B").cast("Q")
    out = {name: 0 for name in FWD_GLOBALS}
    ups: dict[str, dict] = {}
    nlat = len(LATENCY_BOUNDS) + 1
    for s in range(nslots):
        base = s * SLOT_WORDS
        for i, name in enumerate(FWD_GLOBALS):
            out[name] += words[base + FWD_BASE + i]
        for u in range(FWD_UPSTREAMS):
            r = base + _row(u)
            port = words[r + 2]
            if not port:
                continue
            raw = words[r].to_bytes(8, "little") + words[r + 1].to_bytes(8, "little")
            ip = ipaddress.IPv6Address(raw)
            host = str(ip.ipv4_mapped) if ip.ipv4_mapped else f"[{ip}]"
            to = "other" if port == OTHER_PORT else f"{host}:{port}"
            up = ups.setdefault(to, {"to": to, "requests": 0, "failures": 0,
                                     "rcodes": dict.fromkeys(FWD_RCODES, 0),
                                     "latency": [0] * nlat, "latency_sum_ns": 0,
                                     "health_check_failures": 0})
            up["requests"] += words[r + 3]
            up["failures"] += words[r + 4]
            for k, rc in enumerate(FWD_RCODES):
                up["rcodes"][rc] += words[r + 5 + k]
            lat = r + 5 + len(FWD_RCODES)
            for k in range(nlat):
                up["latency"][k] += words[lat + k]
            up["latency_sum_ns"] += words[lat + nlat]
            up["health_check_failures"] += words[lat + nlat + 1]
    out["upstreams"] = sorted(ups.values(), key=lambda u: u["to"])
    return out


FWD_WORD = {name: FWD_BASE + i for i, name in enumerate(FWD_GLOBALS)}
# Offsets inside an upstream row.
ROW_PORT, ROW_REQUESTS, ROW_FAILURES, ROW_RCODES = 2, 3, 4, 5
ROW_LATENCY = ROW_RCODES + len(FWD_RCODES)
ROW_LATENCY_SUM = ROW_LATENCY + len(LATENCY_BOUNDS) + 1
ROW_HEALTH_CHECK_FAILURES = ROW_LATENCY_SUM + 1
assert ROW_HEALTH_CHECK_FAILURES == FWD_ROW - 1
OTHER_PORT = 0xFFFF_FFFF        # the last row's port when it stands for "other"


def rcode_slot(rcode: int) -> int:
    """The FWD_RCODES index of an rcode: named ones, else "other"."""
    return rcode if rcode < len(FWD_RCODES) - 1 else len(FWD_RCODES) - 1


class ForwardCounters:
    """The forwarder region of one worker's page, as words to add to.

    ``page``: the worker's page (counting adds to what a predecessor in the same slot left,
    so Prometheus counters never go down); None: a private page (the supervisor's loop
    check, tests). ``self[name]`` reads and ``self[name] = v`` writes a FWD_GLOBALS word;
    ``row(to)`` is the first word of the upstream row for ``to`` ("host:port"), claimed on
    first use."""

    def __init__(self, page=None):
        self.page = page if page is not None else bytearray(PAGE_BYTES)
        self.words = memoryview(self.page).cast("B").cast("Q")

    def __getitem__(self, name: str) -> int:
        return self.words[FWD_WORD[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self.words[FWD_WORD[name]] = value

    def row(self, to: str) -> int:
        import ipaddress
        host, _, port = to.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            port = int(port)
        except ValueError:
            ip, port = None, 0
        packed = (ipaddress.IPv6Address(f"::ffff:{ip}") if ip is not None and ip.version == 4
                  else ip)
        raw = packed.packed if packed is not None else b"\0" * 16
        lo, hi = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        w = self.words
        for u in range(FWD_UPSTREAMS - 1 if port else 0):
            r = _row(u)
            if w[r + ROW_PORT] == 0:
                w[r], w[r + 1], w[r + ROW_PORT] = lo, hi, port
            if (w[r], w[r + 1], w[r + ROW_PORT]) == (lo, hi, port):
                return r
        r = _row(FWD_UPSTREAMS - 1)
        w[r + ROW_PORT] = OTHER_PORT      # upstreams beyond the rows, or given by name
        return r


class Counted:
    """An attribute that is FWD_GLOBALS word ``name`` of the owner's ``counters`` (a
    ForwardCounters): ``obj.failures += 1`` adds one to the page word itself."""

    def __init__(self, name: str):
        self.index = FWD_WORD[name]

    def __get__(self, obj, cls=None):
        return self if obj is None else obj.counters.words[self.index]

    def __set__(self, obj, value: int) -> None:
        obj.counters.words[self.index] = value


# Accessors of a page's two gauges the supervisor polls: which image a worker serves, and when
# it swapped to it.
PAGE_BYTES = SLOT_WORDS * 8
GENERATION_WORD = LAYOUT["image_generation"]
_WORD = struct.Struct("<Q")


def page_generation(buf, slot: int) -> int:
    """The generation the worker in ``slot`` serves (0: none yet)."""
    return _WORD.unpack_from(buf, slot * PAGE_BYTES + GENERATION_WORD * 8)[0]


def set_page_generation(page, generation: int, swapped_ns: int | None = None) -> None:
    """Record the generation served; ``swapped_ns`` (time.monotonic_ns) first, so a reader
    that sees the generation sees a swap time at least as late."""
    if swapped_ns is not None:
        _WORD.pack_into(page, SWAPPED_NS_WORD * 8, swapped_ns)
    _WORD.pack_into(page, GENERATION_WORD * 8, generation)


def page_swapped_ns(buf, slot: int) -> int:
    """When the worker in ``slot`` last swapped images (time.monotonic_ns; 0: never)."""
    return _WORD.unpack_from(buf, slot * PAGE_BYTES + SWAPPED_NS_WORD * 8)[0]


def page_heartbeat(buf, slot: int) -> int:
    """The heartbeat count of the worker in ``slot`` (0: none yet)."""
    return _WORD.unpack_from(buf, slot * PAGE_BYTES + HEARTBEAT_WORD * 8)[0]


def set_page_heartbeat(page, beats: int) -> None:
    _WORD.pack_into(page, HEARTBEAT_WORD * 8, beats)
