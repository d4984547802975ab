"""Cache of forwarded answers (names outside the cluster zones only).

Why: pods resolve the same outside names over and over (every ``google.com`` lookup costs
three in-zone misses of the resolver's search list and then one forward); answering repeats from memory saves
the upstream round trip and shields upstreams from bursts.

What it must not do: hold cluster-zone answers (those always come from the live image, so
a change is served at once), know about Kubernetes or sockets, or serve an entry past its TTL except through the
explicit serve-stale path (RFC 8767).

Two implementations of one interface: ``CompiledCache`` keeps the entries in the worker's
compiled ``_fastpath.PacketCache``, the one store that the UDP packet path (hits, and the
replies the compiled forwarder relays) and the Python Forwarder (TCP clients, retries, stub
domains) both read and fill; ``Cache`` keeps them in Python, for the pure engine
(``KDNS_PURE=1``) and as the tests' oracle.

Stored form (chosen so the compiled packet path serves hits without Python): an
entry is the upstream reply as wire bytes in a canonical shape (ID 0, question name
lowercased, the OPT RR removed: it is hop-by-hop, RFC 6891 §6.1.1) plus the byte offset of
every RR's TTL field and that RR's original TTL. Serving a hit is then: copy the bytes;
patch the ID; copy the client's question bytes over the stored question (same length, only
the case can differ: DNS 0x20); patch RD/CD from the query and clear AA; write each TTL as
``max(0, min(ttl, entry_ttl) - age)``; append an OPT if the client sent one; cut to the
client's size with TC (record ends follow from the TTL offsets: TTL, RDLENGTH, RDATA are
adjacent, so ``forwarder.fit`` needs no name parsing). No parsing and no allocation beyond
the output buffer, which is what ``_fastpath``'s ``pc_render`` does in C.

Key: (lowercased qname, qtype, qclass, DO, CD) like CoreDNS ``cache`` (DO and CD change the
answer: RFC 4035 §3.2).
Lifetimes: positive = min RR TTL; negative (NXDOMAIN / NODATA) = min(SOA TTL, SOA MINIMUM)
(RFC 2308 §5); both clamped to [min_ttl, max_ttl] / [min_ttl, max_neg_ttl]; SERVFAIL kept 5 s
(RFC 2308 §7.1 allows up to 5 minutes; CoreDNS uses 5 s); TC replies and other rcodes are
never stored; negative answers without an SOA are not stored (RFC 2308 §5: no SOA, no
negative caching).
"""
from __future__ import annotations

import struct
import time
from collections import OrderedDict
from typing import Callable, NamedTuple

from kdns import settings
from kdns.packet import counters as C
from kdns.zone.refpath import Malformed, skip_name, skip_rr

from kdns.dns.wire import (AA, CD, NOERROR, NXDOMAIN, RD, SERVFAIL, T_CNAME, T_MX,  # noqa: F401
                           T_NS, T_OPT, T_PTR, T_SOA, T_SRV, TC)
STALE_TTL = 30              # RFC 8767 §4: "a TTL of 30 seconds is recommended"
SERVFAIL_TTL = 5            # RFC 2308 §7.1 caps it at 5 minutes; CoreDNS uses 5 s


class Record(NamedTuple):
    """One RR in a message: where it is and what the caller needs to know about it."""
    start: int
    end: int
    rtype: int
    ttl_off: int
    ttl: int
    section: int            # 0 answer, 1 authority, 2 additional


class Scanned(NamedTuple):
    qend: int               # offset just past the question (12 + name + 4)
    records: list[Record]


def scan(msg: bytes) -> Scanned:
    """Find every RR boundary in a one-question message; Malformed if it does not parse."""
    if len(msg) < 12:
        raise Malformed
    qd, an, ns, ar = struct.unpack_from("!HHHH", msg, 4)
    if qd != 1:
        raise Malformed
    off = skip_name(msg, 12) + 4
    if off > len(msg):
        raise Malformed
    qend, records = off, []
    for i in range(an + ns + ar):
        start = off
        rtype, _, ttl, rdata, end = skip_rr(msg, off)
        section = 0 if i < an else 1 if i < an + ns else 2
        if rtype == T_OPT and section != 2:
            raise Malformed      # RFC 6891 §6.1.1: OPT only in the additional section
        check_rdata_names(msg, rtype, rdata, end)
        records.append(Record(start, end, rtype, rdata - 6, ttl, section))
        off = end
    return Scanned(qend, records)


# Where the names start in the RDATA of the types whose names may be compressed (RFC 3597
# §4: the RFC 1035 types; SRV too, which senders compress although RFC 2782 says not to).
RDATA_NAME_AT = {T_NS: 0, T_CNAME: 0, T_PTR: 0, T_MX: 2, T_SRV: 6}


def check_rdata_names(msg: bytes, rtype: int, start: int, end: int) -> None:
    """Malformed unless the names in this RDATA are valid (skip_name) and end with it.
    Every name a relayed or cached reply carries is checked: a client must never get a
    pointer out of the message or into a loop (RFC 1035 §4.1.4)."""
    if rtype == T_SOA:
        off = skip_name(msg, skip_name(msg, start)) + 20     # MNAME RNAME, then 5 numbers
    elif rtype in RDATA_NAME_AT:
        off = skip_name(msg, start + RDATA_NAME_AT[rtype])
    else:
        return
    if off != end:
        raise Malformed


def strip_opt(msg: bytes, sc: Scanned) -> tuple[bytes, Scanned]:
    """The message without its OPT RR and whatever follows it in the additional section.

    RFC 6891 §6.1.1: OPT is per hop, so ours is rebuilt for each client. Records after the
    OPT are dropped rather than moved (moving would break compression pointers into them);
    additional data is optional, so dropping it needs no TC (RFC 2181 §9)."""
    for i, r in enumerate(sc.records):
        if r.rtype == T_OPT:
            kept = sc.records[:i]
            counts = [sum(1 for k in kept if k.section == s) for s in range(3)]
            head = msg[:6] + struct.pack("!HHH", *counts)
            return head + msg[12:r.start], Scanned(sc.qend, kept)
    return msg, sc


def soa_negative_ttl(msg: bytes, sc: Scanned) -> int | None:
    """RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM) of the authority SOA."""
    for r in sc.records:
        if r.section == 1 and r.rtype == T_SOA and r.end - 4 >= r.ttl_off + 6:
            (minimum,) = struct.unpack_from("!I", msg, r.end - 4)
            return min(r.ttl, minimum)
    return None


class Entry:
    """A stored reply in the canonical wire form described in the module docstring."""
    __slots__ = ("wire", "qend", "ttl_offs", "ttls", "ttl", "stored", "rcode", "hits",
                 "last_hit", "refreshing")

    def __init__(self, wire, qend, ttl_offs, ttls, ttl, stored, rcode):
        self.wire, self.qend, self.ttl_offs, self.ttls = wire, qend, ttl_offs, ttls
        self.ttl, self.stored, self.rcode = ttl, stored, rcode
        # CoreDNS cache prefetch's popularity (freq) and whether a refresh is queued.
        self.hits, self.last_hit, self.refreshing = 0, 0.0, False

    def expires(self) -> float:
        return self.stored + self.ttl

    def render(self, qid: int, question: bytes, qflags: int, now: float,
               stale: bool = False) -> bytearray:
        """The stored reply for one client: its ID, its question case, RD/CD from its query,
        TTLs counted down (RFC 1035 §4.1.3 / RFC 2181 §8: remaining time), or STALE_TTL when
        served stale (RFC 8767 §4)."""
        out = bytearray(self.wire)
        # AA cleared: an answer from our memory is not authoritative (RFC 1035 §4.1.1).
        flags = struct.unpack_from("!H", out, 2)[0] & ~(AA | RD | CD)
        struct.pack_into("!HH", out, 0, qid, flags | (qflags & (RD | CD)))
        out[12:self.qend] = question
        age = int(now - self.stored)
        for off, ttl in zip(self.ttl_offs, self.ttls):
            left = STALE_TTL if stale else max(0, min(ttl, self.ttl) - age)
            struct.pack_into("!I", out, off, left)
        return out


class Cache:
    """Bounded LRU of forwarded replies. All times come from ``clock`` (monotonic seconds) so
    tests can move time instead of sleeping.

    ``hits``, ``misses``, ``inserts``, ``evictions`` and the entry count and capacity are
    words of ``counters`` (the worker's page, counters.ForwardCounters; None: a private
    one), counted there as they happen."""

    hits = C.Counted("cache_hits")
    misses = C.Counted("cache_misses")
    inserts = C.Counted("cache_inserts")
    evictions = C.Counted("cache_evictions")
    # The denial share of hits, entries and evictions (CoreDNS's cache type "denial").
    hits_denial = C.Counted("cache_hits_denial")
    evictions_denial = C.Counted("cache_evictions_denial")
    # Refreshes started by prefetch (CoreDNS's coredns_cache_prefetch_total).
    prefetches = C.Counted("cache_prefetches")

    def __init__(self, capacity: int = settings.CACHE_SIZE, *, min_ttl: int = 5, max_ttl: int = 3600,
                 max_neg_ttl: int = 1800, servfail_ttl: int = SERVFAIL_TTL,
                 serve_stale: bool = False, max_stale: int = 3600,
                 clock: Callable[[], float] = time.monotonic,
                 counters: C.ForwardCounters | None = None):
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity, self.min_ttl, self.max_ttl = capacity, min_ttl, max_ttl
        self.max_neg_ttl, self.servfail_ttl = max_neg_ttl, servfail_ttl
        self.serve_stale, self.max_stale, self.clock = serve_stale, max_stale, clock
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.counters = counters if counters is not None else C.ForwardCounters()
        self.counters["cache_capacity"] = capacity
        self.counters["cache_entries"] = 0        # a new worker's cache starts empty
        self.counters["cache_entries_denial"] = 0
        self.stale_hits = 0
        # CoreDNS ``prefetch AMOUNT DURATION PERCENTAGE%`` (amount 0: off); ``due`` holds the
        # keys whose refresh is queued, for the forwarder to take (``take_due``).
        self.prefetch_amount, self.prefetch_duration, self.prefetch_percent = \
            settings.CACHE_PREFETCH
        self.due: list = []

    def __len__(self) -> int:
        return len(self.entries)

    def set_prefetch(self, amount: int, duration: float, percent: int) -> None:
        self.prefetch_amount, self.prefetch_duration = amount, duration
        self.prefetch_percent = percent

    def hit(self, key: tuple, e: Entry) -> bool:
        """Count a hit of the fresh entry ``e`` (CoreDNS freq.Update: a hit after a gap of
        DURATION or more starts the count again at 1) and queue its refresh when it is
        popular and close to expiry (CoreDNS shouldPrefetch: hits >= AMOUNT and the whole
        seconds left <= ceil(PERCENTAGE% of its lifetime)); True when it was queued. The
        compiled table counts its own hits the same way (pktcache.pxi pc_hit)."""
        if not self.prefetch_amount:
            return False
        now = self.clock()
        if e.hits == 0 or e.last_hit < now - self.prefetch_duration:
            e.hits = 1
        else:
            e.hits += 1
        e.last_hit = now
        if e.refreshing or e.hits < self.prefetch_amount:
            return False
        left = int(e.ttl - (now - e.stored))
        if left > -(-self.prefetch_percent * e.ttl // 100):
            return False
        e.refreshing = True
        self.due.append(key)
        return True

    def take_due(self) -> list:
        """The keys whose refresh is due (each once)."""
        due, self.due = self.due, []
        return due

    def unmark(self, key: tuple) -> None:
        """A refresh that could not be made: the entry may be queued again."""
        e = self.entries.get(key)
        if e is not None:
            e.refreshing = False

    def get(self, key: tuple) -> Entry | None:
        """A fresh entry, or None (expired entries stay for serve-stale until evicted)."""
        e = self._find(key)
        if e is None or self.clock() >= e.expires():
            self.misses += 1
            if e is not None and not self._stale_usable(e):
                self._forget(key)
            return None
        self._touch(key)
        self.hits += 1
        self.hits_denial += denial(e)
        return e

    def get_stale(self, key: tuple, count: bool = True) -> Entry | None:
        """RFC 8767: an expired positive or negative entry no older than ``max_stale`` past its
        expiry, for use only when upstreams fail or are too slow (the forwarder decides)."""
        e = self._find(key)
        if e is None or self.clock() < e.expires() or not self._stale_usable(e):
            return None
        self.stale_hits += count
        return e

    def _stale_usable(self, e: Entry) -> bool:
        # SERVFAIL is never served stale: it is the failure serve-stale exists to hide.
        return (self.serve_stale and e.rcode != SERVFAIL
                and self.clock() < e.expires() + self.max_stale)

    def put(self, key: tuple, reply: bytes) -> Entry | None:
        """Store an upstream reply if the rules allow; returns the entry or None."""
        e = self.entry(reply)
        if e is not None:
            self._store(key, e)
        return e

    def put_failure(self, key: tuple, wire: bytes, ttl: int) -> Entry:
        """A resolution failure (RFC 9520 §3.2): our SERVFAIL (ID 0, no records) for ``ttl``
        seconds; get() serves it like an upstream SERVFAIL, and it is never served stale."""
        e = Entry(wire, len(wire), (), (), ttl, self.clock(), SERVFAIL)
        self._store(key, e)
        return e

    def entry(self, reply: bytes) -> Entry | None:
        """The stored form of an upstream reply, or None when the rules keep it out."""
        try:
            sc = scan(reply)
        except Malformed:
            return None
        flags = struct.unpack_from("!H", reply, 2)[0]
        ttl = self._lifetime(reply, sc, flags)
        if ttl is None:
            return None
        wire, sc = strip_opt(reply, sc)
        # Bytes after the last RR belong to no record (RFC 1035 §4.1): not kept, so both
        # caches serve the same bytes (the compiled one stores up to the last RR's end).
        wire = bytearray(wire[:sc.records[-1].end if sc.records else sc.qend])
        struct.pack_into("!H", wire, 0, 0)
        wire[12:sc.qend - 4] = bytes(wire[12:sc.qend - 4]).lower()
        return Entry(bytes(wire), sc.qend, tuple(r.ttl_off for r in sc.records),
                     tuple(r.ttl for r in sc.records), ttl, self.clock(), flags & 0xF)

    def clear(self) -> None:
        self.counters["cache_entries"] -= len(self.entries)
        self.counters["cache_entries_denial"] -= sum(map(denial, self.entries.values()))
        self.entries.clear()

    # The store itself; CompiledCache keeps entries elsewhere.
    def _find(self, key: tuple) -> Entry | None:
        return self.entries.get(key)

    def _touch(self, key: tuple) -> None:
        self.entries.move_to_end(key)

    def _forget(self, key: tuple) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.counters["cache_entries"] -= 1
            self.counters["cache_entries_denial"] -= denial(old)

    def _store(self, key: tuple, e: Entry) -> None:
        old = self.entries.get(key)
        if old is None:
            self.counters["cache_entries"] += 1
        else:
            self.counters["cache_entries_denial"] -= denial(old)
            # A refreshed entry keeps its popularity (CoreDNS resets the freq with its hits).
            e.hits, e.last_hit = old.hits, old.last_hit
        self.counters["cache_entries_denial"] += denial(e)
        self.entries[key] = e
        self.entries.move_to_end(key)
        self.inserts += 1
        while len(self.entries) > self.capacity:
            _, gone = self.entries.popitem(last=False)
            self.evictions += 1
            self.evictions_denial += denial(gone)
            self.counters["cache_entries"] -= 1
            self.counters["cache_entries_denial"] -= denial(gone)

    def _lifetime(self, reply: bytes, sc: Scanned, flags: int) -> int | None:
        rcode = flags & 0xF
        if flags & TC:
            return None          # a partial answer must not be replayed as if complete
        if any(r.rtype == T_OPT and (r.ttl >> 24) for r in sc.records):
            return None          # extended rcode (RFC 6891 §6.1.3): not a plain answer
        if rcode == SERVFAIL:
            return self.servfail_ttl
        has_answer = any(r.section == 0 for r in sc.records)
        if rcode == NOERROR and has_answer:
            ttls = [r.ttl for r in sc.records if r.rtype != T_OPT]
            if not ttls:
                return None      # nothing but OPT records: no lifetime to take
            return max(self.min_ttl, min(min(ttls), self.max_ttl))
        if rcode in (NOERROR, NXDOMAIN):
            neg = soa_negative_ttl(reply, sc)
            if neg is None:
                return None
            return max(self.min_ttl, min(neg, self.max_neg_ttl))
        return None


def denial(e: Entry) -> bool:
    """CoreDNS's cache type of an entry: "denial" for NXDOMAIN and NODATA (RFC 2308) and a
    cached SERVFAIL (RFC 9520), "success" for NOERROR with an answer (False)."""
    return not (e.rcode == NOERROR and e.wire[6:8] != b"\0\0")


def key_bytes(key: tuple) -> bytes:
    """A cache key (name, qtype, qclass, DO, CD) as the compiled cache's flat bytes: the
    name's wire form, qtype and qclass (network order), DO, CD (_fastpath pc_prepare)."""
    name, qtype, qclass, do, cd = key
    return bytes(name) + struct.pack("!HHBB", qtype, qclass, do, cd)


def key_tuple(raw: bytes) -> tuple:
    """``key_bytes``'s inverse: the flat key back as (name, qtype, qclass, DO, CD)."""
    off = 0
    while raw[off]:
        off += raw[off] + 1
    qtype, qclass, do, cd = struct.unpack_from("!HHBB", raw, off + 1)
    return (raw[:off + 1], qtype, qclass, do, cd)


class CompiledCache(Cache):
    """The Cache whose entries live in the worker's compiled PacketCache (``fast``).

    Every entry is in one place: the compiled table, or, when it does not fit a compiled slot
    (a long answer fetched over TCP after TC), the inherited Python LRU. The packet path
    answers UDP hits and stores what the compiled forwarder relays straight in the table;
    this class gives the Python Forwarder the same entries. Its clock is time.monotonic,
    the CLOCK_MONOTONIC the compiled table stamps entries with.

    Differences from ``Cache``, both the compiled table's: a full probe window evicts the
    entry stored longest ago, not the one used longest ago; and an expired entry's slot is
    reused first, so under pressure serve-stale finds fewer expired entries."""

    def __init__(self, fast, capacity: int = settings.CACHE_SIZE, **kw):
        kw.pop("clock", None)
        super().__init__(capacity, clock=time.monotonic, **kw)
        self.fast = fast
        # The compiled table counts its inserts, evictions and entries into the same words.
        w = C.FWD_WORD
        fast.count_into(self.counters.page, w["cache_inserts"], w["cache_evictions"],
                        w["cache_entries"], w["cache_entries_denial"],
                        w["cache_evictions_denial"])
        self.counters["cache_entries"] = len(fast)

    def __len__(self) -> int:
        return len(self.fast) + len(self.entries)

    def _find(self, key: tuple) -> Entry | None:
        got = self.fast.lookup(key_bytes(key))
        if got is None:
            return self.entries.get(key)
        wire, qend, ttl_offs, ttls, ttl, stored = got
        return Entry(wire, qend, ttl_offs, ttls, ttl, stored, wire[3] & 0xF)

    def _touch(self, key: tuple) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def set_prefetch(self, amount: int, duration: float, percent: int) -> None:
        super().set_prefetch(amount, duration, percent)
        self.fast.set_prefetch(amount, duration, percent)

    def hit(self, key: tuple, e: Entry) -> bool:
        if key in self.entries:
            return super().hit(key, e)
        # The compiled table's entry: counted where the packet path counts its hits.
        return bool(self.prefetch_amount) and self.fast.hit(key_bytes(key), self.clock())

    def take_due(self) -> list:
        due = super().take_due()
        if self.fast.due_count:
            due += [key_tuple(k) for k in self.fast.take_due()]
        return due

    def unmark(self, key: tuple) -> None:
        super().unmark(key)
        self.fast.unmark(key_bytes(key))

    def _store(self, key: tuple, e: Entry) -> None:
        if self.fast.put(key_bytes(key), e.wire, e.qend, e.ttl_offs, e.ttls, e.ttl, e.stored):
            self._forget(key)         # counted by the compiled table; one place per entry
        else:
            super()._store(key, e)

    def clear(self) -> None:
        self.fast.clear()             # its share of the entry count goes to 0
        self.entries.clear()
        self.counters["cache_entries"] = 0
        self.counters["cache_entries_denial"] = 0
