"""Layout of the per-worker shared counters: the one definition both packet paths follow.

Why: metrics must cost the packet path nothing, so each worker increments plain uint64 slots
in its own page of shared memory (one writer per slot, no atomics needed), and the supervisor
sums the pages when Prometheus scrapes. ``_fastpath.pxd`` mirrors these indices as C
constants; ``tests/test_counters.py`` checks that the two agree.

Histograms are stored as per-bucket counts (not cumulative) plus a sum; the renderer
accumulates them. Bucket bounds follow CoreDNS so dashboards keep working (issue 6).
"""
from __future__ import annotations

PROTOS = ("udp", "tcp")
# Query types counted by name; everything else is "other" (bounded label set, issue 6).
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
EVENTS = ("truncated", "handoff", "dropped", "formerr", "send_failed", "cache_hit", "cache_miss")


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
