"""Forwarder: answers the queries the packet path hands off, by asking upstream resolvers.

Why: pods send every name through cluster DNS (``google.com``, ``db.corp.example``, reverse
lookups of outside addresses); names the zone image cannot answer come here and are relayed
to the stub-domain servers or the upstream nameservers, with a cache in front, as kube-dns
(dnsmasq) and CoreDNS ``forward`` do.

The worker's seam is ``await Forwarder.resolve(query, proto)``: the client's query bytes
and its transport ('udp' or 'tcp') in, the reply bytes to send back out (None = drop).
``configure()`` swaps routes atomically (a config reload never drops queries in flight);
``check_loop()`` detects upstreams that are kdns itself or lead back to it.

What it must not do: know about Kubernetes (no cluster zone, no ConfigMap: it gets plain
``Upstream`` lists and a domain → servers map), answer names itself (except its own loop
probe), or trust any reply it cannot match to the query it sent (RFC 5452).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
from typing import Awaitable, Callable, Iterable, NamedTuple

import errno

from kdns import settings
from kdns.forward.cache import RD, SERVFAIL, TC, Cache, Entry, scan, strip_opt
from kdns.packet import counters as C
from kdns.zone.refpath import Malformed, parse_edns, parse_name

log = logging.getLogger(__name__)

from kdns.dns.wire import (AA, CD, FORMERR, NOTIMP, QR, RA, REFUSED,  # noqa: F401
                           T_A, T_AXFR, T_IXFR, T_NS, T_OPT, T_TXT, TCP_MAX, UDP_PLAIN)
PROBE_ZONE = "kdns-loop-probe"       # a TLD nobody serves: only a kdns ever answers under it
PROBE_MARKER = b"kdns-loop-probe "

# errnos of an ICMP destination unreachable reported on the socket (RFC 1122 §4.1.3.3).
UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)         # linux/in.h
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)     # linux/in6.h
FAIL_STREAK_MAX = 10000

# Why the compiled forwarder (_fastpath FwdEngine) handed a query back (includes/fwd.pxi).
RETRY_TIMEOUT, RETRY_TC, RETRY_BAD, RETRY_RECONFIG, RETRY_UNREACHABLE = 1, 2, 3, 4, 5


class Retry(NamedTuple):
    """A query the compiled path already sent once: why it came back, to whom it went, and
    when (time.monotonic seconds): the overall deadline counts from then."""
    reason: int
    upstream: "Upstream"
    started: float


class Upstream(NamedTuple):
    """One upstream server. ``host`` is an IP address or (stub domains only) a host name."""
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Question(NamedTuple):
    """The parts of a client query the forwarder needs, parsed once."""
    qid: int
    flags: int
    qbytes: bytes            # question section as sent (name in the client's case + type + class)
    name: bytes              # wire-form name, lowercased (the cache / coalescing key part)
    labels: tuple[str, ...]  # lowercased labels, for routing
    qtype: int
    qclass: int
    edns: tuple[int, int] | None   # (udp size, DO) when the client sent an OPT


class UpstreamStats:
    """Per-upstream counters. What the metrics render (coredns_forward_requests_total,
    _responses_total, _request_duration_seconds, _healthcheck_failures_total) is counted
    straight into this upstream's row of the worker's page (``counters``), the row the
    compiled forwarder counts its tries into as well; the rest are plain ints."""
    __slots__ = ("replies", "timeouts", "errors", "unreachable", "forged", "tcp_retries",
                 "failing", "words", "row", "notify")

    def __init__(self, counters: "C.ForwardCounters | None" = None, to: str = "",
                 notify: "Callable[[Upstream, bool], None] | None" = None):
        counters = counters if counters is not None else C.ForwardCounters()
        self.words, self.row = counters.words, counters.row(to)
        self.replies = self.timeouts = self.errors = self.unreachable = 0
        self.forged = self.tcp_retries = 0
        self.failing = False            # logs once per change, not once per failed try
        # Told every verdict (up, down): the compiled forwarder keeps its own mark per
        # upstream and must skip what Python saw fail (Forwarder.on_mark).
        self.notify = notify

    @property
    def queries(self) -> int:
        """Tries sent to this upstream (by this Forwarder and the compiled one)."""
        return self.words[self.row + C.ROW_REQUESTS]

    def sent(self) -> None:
        self.words[self.row + C.ROW_REQUESTS] += 1

    def try_failed(self) -> None:
        """A client query's try that timed out or met a network error."""
        self.words[self.row + C.ROW_FAILURES] += 1

    def health_check_failed(self) -> None:
        """A health check of an upstream marked down got no answer: what CoreDNS counts in
        coredns_forward_healthcheck_failures_total (a sporadic timeout whose check then
        answers counts none)."""
        self.words[self.row + C.ROW_HEALTH_CHECK_FAILURES] += 1

    def failed(self, up, why: str, others: bool = True) -> None:
        # One log line when an upstream starts failing, one when it answers again. A
        # failing upstream is marked down: the others are tried before it (_exchange).
        if not self.failing:
            self.failing = True
            log.warning("upstream %s failed (%s)%s", up, why,
                        "; trying others" if others else "; no other upstream")
        if self.notify is not None:
            self.notify(up, True)

    def answered(self, up) -> None:
        if self.failing:
            self.failing = False
            log.info("upstream %s answers again", up)
        if self.notify is not None:
            self.notify(up, False)

    def observe(self, rcode: int, seconds: float) -> None:
        """One reply: its rcode, and its latency in counters.LATENCY_BOUNDS buckets."""
        ns = int(seconds * 1e9)
        w, r = self.words, self.row
        w[r + C.ROW_RCODES + C.rcode_slot(rcode)] += 1
        w[r + C.ROW_LATENCY + C.latency_bucket(ns)] += 1
        w[r + C.ROW_LATENCY_SUM] += ns


class TryFailed(Exception):
    """One attempt at one upstream gave nothing usable (timeout, network error, bad reply)."""


def parse_query(query: bytes) -> Question | None:
    """Question, or None for something that is not a query; Malformed if it does not parse."""
    query = bytes(query)
    if len(query) < 12:
        return None
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", query, 0)
    if flags & QR:
        return None          # a response: never answer it (no reflection loops)
    if qd != 1:
        raise Malformed
    labels, end = parse_name(query, 12)
    if end + 4 > len(query):
        raise Malformed
    qtype, qclass = struct.unpack_from("!HH", query, end)
    opt = parse_edns(query, end + 4, an, ns, ar)
    name = query[12:end].lower()
    low = tuple(lab.lower().decode("latin-1") for lab in labels)
    edns = (opt[0], opt[2]) if opt else None
    return Question(qid, flags, query[12:end + 4], name, low, qtype, qclass, edns)


def opt_rr(size: int, do: int, ext_rcode: int = 0) -> bytes:
    """Our own OPT RR (RFC 6891 §6.1.2), version 0, no options."""
    return b"\0" + struct.pack("!HHBBHH", T_OPT, size, ext_rcode, 0, do << 15, 0)


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def fit(buf: bytearray, qend: int, ttl_offs: Iterable[int], limit: int, opt: bytes) -> bytes:
    """Cut a reply to ``limit`` bytes for a UDP client and append ``opt``.

    Record ends are derived from the TTL offsets (TTL, RDLENGTH, RDATA follow each other), so
    this works on cached entries without re-parsing names. Dropping additional records needs
    no TC; dropping answer or authority records sets TC (RFC 2181 §9, RFC 1035 §4.2.1)."""
    an, ns, ar = struct.unpack_from("!HHH", buf, 6)
    room = limit - len(opt)
    if len(buf) <= room:
        struct.pack_into("!H", buf, 10, ar + (1 if opt else 0))
        return bytes(buf) + opt
    ends = [o + 6 + struct.unpack_from("!H", buf, o + 4)[0] for o in ttl_offs]
    k = 0
    while k < len(ends) and ends[k] <= room:
        k += 1
    flags = struct.unpack_from("!H", buf, 2)[0]
    if k < an + ns:
        flags |= TC
    counts = (min(k, an), min(max(k - an, 0), ns), max(k - an - ns, 0) + (1 if opt else 0))
    cut = ends[k - 1] if k else qend
    struct.pack_into("!H", buf, 2, flags)
    struct.pack_into("!HHH", buf, 6, *counts)
    return bytes(buf[:cut]) + opt


class Forwarder:
    """Routes handed-off queries to stub-domain servers or upstreams, through the cache.

    Timing parameters are in seconds; tests pass small ones. ``policy`` orders the tries as
    CoreDNS forward's: ``random`` (a random first server, the rest in turn: kube-dns),
    ``round_robin`` (each query starts one server further), ``sequential`` (always in the
    order given: a primary and its backups; also ``random_start=False``). ``force_tcp``
    asks every upstream over TCP only. ``host_resolver`` (optional,
    async name → list of IPs) resolves stub servers given as names; without it they are
    resolved once per configuration through the default upstreams.

    ``counters``: the worker's page region (counters.ForwardCounters; None: a private one).
    ``failures``, ``refused_inflight``, ``stale_served`` and the per-upstream numbers the
    metrics render are words of it; the rest are plain ints. Counters: ``requests``; ``responses``
    (rcode → count, of replies returned); ``timeouts`` (per-try); ``forged`` (replies
    dropped as not matching, RFC 5452); ``refused_inflight`` (over ``max_inflight``);
    ``coalesced`` (clients that joined a query already in flight); ``tcp_retries``;
    ``failures`` (no usable reply before the deadline → SERVFAIL); ``stale_served``;
    ``loop_probes_seen``; ``per_upstream`` (``str(Upstream)`` → UpstreamStats). Cache
    counters live on the Cache."""

    failures = C.Counted("failures")
    all_down = C.Counted("all_down")
    refused_inflight = C.Counted("refused_inflight")
    stale_served = C.Counted("stale_served")

    def __init__(self, upstreams: Iterable[Upstream] = (),
                 stub_domains: dict[str, Iterable[Upstream]] | None = None, *,
                 cache: Cache | None = None, try_timeout: float = settings.TRY_TIMEOUT, deadline: float = 4.5,
                 max_inflight: int = 1000, edns_size: int = settings.EDNS_UDP_SIZE,
                 probe_token: str | None = None, random_start: bool = True,
                 stale_answer_timeout: float = 1.8,
                 host_resolver: Callable[[str], Awaitable[list[str]]] | None = None,
                 counters: C.ForwardCounters | None = None):
        self.counters = counters if counters is not None else C.ForwardCounters()
        self.cache, self.try_timeout, self.deadline = cache, try_timeout, deadline
        self.max_inflight, self.edns_size = max_inflight, edns_size
        self.host_resolver = host_resolver
        self.policy = settings.FORWARD_POLICY if random_start else "sequential"
        self.force_tcp = settings.FORWARD_FORCE_TCP
        self._next_start = 0              # round_robin: where the next query starts
        self.stale_answer_timeout = stale_answer_timeout
        # One token per kdns instance: the lead creates it before forking so every worker
        # recognises the instance's own probes (a probe may come back to another worker).
        self.probe_token = probe_token or secrets.token_hex(8)
        self.upstreams: tuple[Upstream, ...] = ()
        self.stubs: dict[str, tuple[Upstream, ...]] = {}
        self._host_addrs: dict[str, list[str]] = {}
        self._ip_hosts: set[str] = set()      # hosts known to be IP literals (parsed once)
        self._inflight: dict[tuple, asyncio.Task] = {}
        self.looping: set[Upstream] = set()
        self.loop_errors: list[str] = []
        self.requests = self.timeouts = self.forged = self.unreachable = 0
        self._others = True               # the current exchange has more than one upstream
        # RFC 9520 §3.2: consecutive resolution failures per cache key (the backoff).
        self._fail_streak: dict[tuple, int] = {}
        self.coalesced = self.tcp_retries = 0
        self.loop_probes_seen = 0
        # The compiled forwarder's queries in flight count against max_inflight too.
        self.extra_inflight: Callable[[], int] = lambda: 0
        self.responses: dict[int, int] = {}
        self.per_upstream: dict[str, UpstreamStats] = {}
        # (upstream, down) on every verdict on a try: the compiled forwarder's marks follow.
        self.on_mark: Callable[[Upstream, bool], None] | None = None
        self.configure(upstreams, stub_domains or {})

    @property
    def random_start(self) -> bool:
        return self.policy == "random"

    @random_start.setter
    def random_start(self, on: bool) -> None:
        self.policy = "random" if on else "sequential"

    @property
    def inflight(self) -> int:
        """Upstream queries this (Python) forwarder has in flight, refreshes included
        (read-only; tests wait on it instead of sleeping through a refresh)."""
        return len(self._inflight)

    # ---- configuration -------------------------------------------------------------------

    def configure(self, upstreams: Iterable[Upstream],
                  stub_domains: dict[str, Iterable[Upstream]]) -> None:
        """Swap routes in one assignment each: queries already in flight finish on the routes
        they started with, new ones use the new routes."""
        self.stubs = {d.lower().strip("."): tuple(s) for d, s in stub_domains.items()}
        self.upstreams = tuple(upstreams)
        self._host_addrs = {}

    def route(self, labels: tuple[str, ...]) -> tuple[Upstream, ...]:
        """Longest-suffix stub domain match, else the upstreams (dnsmasq ``--server=/d/``)."""
        for i in range(len(labels)):
            servers = self.stubs.get(".".join(labels[i:]))
            if servers is not None:
                return servers
        return self.upstreams

    @property
    def ready(self) -> bool:
        return not self.loop_errors

    def stats_for(self, up: Upstream) -> UpstreamStats:
        st = self.per_upstream.get(str(up))
        if st is None:
            st = self.per_upstream[str(up)] = UpstreamStats(self.counters, str(up),
                                                            self._mark)
        return st

    def _mark(self, up: Upstream, down: bool) -> None:
        if self.on_mark is not None:
            self.on_mark(up, down)

    async def health_check(self, up: Upstream) -> bool:
        """Does ``up`` answer? ``. IN NS`` over UDP, one try (CoreDNS forward's health
        check): any reply that matches counts, whatever its rcode, and marks it live again
        (``answered``); no reply is a healthcheck failure on its row. Not a client query:
        not in the request counters."""
        st = self.stats_for(up)
        qbytes = b"\0" + struct.pack("!HH", T_NS, 1)
        q = Question(0, RD, qbytes, b"\0", (), T_NS, 1, None)
        qid = secrets.randbits(16)
        try:
            host = await self._address(up)
            await self._udp(host, up.port, self._query(q, qid), qid, q, st, self.try_timeout)
        except (TryFailed, TimeoutError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.debug("health check of %s: %s", up, exc or type(exc).__name__)
            st.health_check_failed()
            st.failed(up, "health check", len(self.upstreams) > 1)
            return False
        st.answered(up)
        return True

    # ---- the seam ------------------------------------------------------------------------

    async def resolve(self, query: bytes, proto: str, retry: Retry | None = None) -> bytes | None:
        """One handed-off query → the reply to send on the client's transport, or None.
        ``retry``: the compiled forwarder tried it once already (see ``Retry``)."""
        self.requests += 1
        try:
            q = parse_query(query)
        except Malformed:
            return self._count(self._error_reply(query, FORMERR))
        if q is None:
            return None
        limit = self._client_limit(q, proto)
        try:
            reply = self._answer_here(q, limit)
            if reply is None:
                reply = await self._answer_forwarded(q, limit, retry)
        except Exception:       # noqa: BLE001 -- a bug must cost one SERVFAIL, not a hung client
            log.exception("forwarding %s failed", ".".join(q.labels))
            self.failures += 1
            reply = self._rcode_reply(q, SERVFAIL)
        return self._count(reply)

    def _client_limit(self, q: Question, proto: str) -> int:
        if proto == "tcp":
            return TCP_MAX       # RFC 7766: a TCP client gets the whole answer
        if q.edns:
            return max(UDP_PLAIN, min(q.edns[0], self.edns_size))   # RFC 6891 §6.2.5
        return UDP_PLAIN         # RFC 1035 §4.2.1

    def _answer_here(self, q: Question, limit: int) -> bytes | None:
        """The few queries the forwarder answers without an upstream, else None."""
        if q.flags & 0x7800:
            return self._rcode_reply(q, NOTIMP)      # only opcode QUERY is relayed
        if q.qtype in (T_AXFR, T_IXFR):
            # A zone transfer is a session with the primary (RFC 5936 §4), not something a
            # forwarder relays message by message.
            return self._rcode_reply(q, REFUSED)
        if len(q.labels) >= 3 and q.labels[-1] == PROBE_ZONE and q.labels[-2] == self.probe_token:
            return self._probe_answer(q, limit)
        return None

    async def _answer_forwarded(self, q: Question, limit: int,
                                retry: Retry | None = None) -> bytes:
        key = (q.name, q.qtype, q.qclass, q.edns[1] if q.edns else 0, 1 if q.flags & CD else 0)
        if self.cache is not None:
            e = self.cache.get(key)
            if e is not None:
                if self.cache.hit(key, e):
                    self.prefetch_due()
                return self._from_entry(e, q, limit, stale=False)
        task = self._join(q, key, retry)
        if task is None:
            self.refused_inflight += 1
            return self._rcode_reply(q, REFUSED)
        if self.cache is not None and not task.done():
            stale = self.cache.get_stale(key, count=False)
            if stale is not None:
                # RFC 8767 §5 client response timer: with a stale answer at hand, do not keep
                # the client waiting longer than 1.8 s; the refresh goes on in the background.
                done, _ = await asyncio.wait({task}, timeout=self.stale_answer_timeout)
                if not done:
                    self.cache.stale_hits += 1
                    return self._from_entry(stale, q, limit, stale=True)
        # shield: a client that goes away must not cancel the query other clients wait on.
        kind, payload = await asyncio.shield(task)
        if kind == "reply":
            return self._from_upstream(payload, q, limit)
        if kind == "stale":
            return self._from_entry(payload, q, limit, stale=True)
        return self._rcode_reply(q, SERVFAIL)

    def prefetch_due(self) -> int:
        """CoreDNS cache prefetch: refresh upstream, in the background, every entry the
        cache queued (popular and close to expiry); the fresh reply replaces it, so its
        clients never wait on a miss. Returns how many refreshes started."""
        started = 0
        for key in self.cache.take_due():
            if key in self._inflight:
                continue                      # its refresh is the query already in flight
            q = self._key_question(key)
            if q is None or self._join(q, key, refresh=True) is None:
                self.cache.unmark(key)        # no room in flight: a later hit asks again
                continue
            self.cache.prefetches += 1
            started += 1
        return started

    @staticmethod
    def _key_question(key: tuple) -> Question | None:
        """The question a cache key stands for, as a client would ask it (RD; CD and DO
        as the key has them)."""
        name, qtype, qclass, do, cd = key
        flags = RD | (CD if cd else 0)
        opt = opt_rr(UDP_PLAIN, 1) if do else b""
        query = struct.pack("!HHHHHH", 0, flags, 1, 0, 0, 1 if opt else 0) + bytes(name) + \
            struct.pack("!HH", qtype, qclass) + opt
        try:
            return parse_query(query)
        except Malformed:
            return None

    def _join(self, q: Question, key: tuple, retry: Retry | None = None,
              refresh: bool = False) -> asyncio.Task | None:
        """The upstream query for ``key`` already in flight, or a new one; None when the
        in-flight bound is reached (CoreDNS max_concurrent: REFUSED beyond it)."""
        task = self._inflight.get(key)
        if task is not None:
            self.coalesced += 1
            return task
        if len(self._inflight) + self.extra_inflight() >= self.max_inflight:
            return None
        task = asyncio.get_running_loop().create_task(self._forward(q, key, retry, refresh))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._inflight.pop(key, None)
                               if self._inflight.get(key) is t else None)
        return task

    def _count(self, reply: bytes | None) -> bytes | None:
        if reply is not None:
            rc = reply[3] & 0xF
            self.responses[rc] = self.responses.get(rc, 0) + 1
        return reply

    # ---- building client replies ---------------------------------------------------------

    def _client_opt(self, q: Question, ext_rcode: int = 0) -> bytes:
        # RFC 6891 §7: no OPT in the reply unless the query had one; DO echoed (RFC 3225 §3).
        return opt_rr(self.edns_size, q.edns[1], ext_rcode) if q.edns else b""

    def _from_upstream(self, raw: bytes, q: Question, limit: int) -> bytes:
        """Relay: sections unchanged, the client's ID and question case, RD copied."""
        sc = scan(raw)
        ext = next((r.ttl >> 24 for r in sc.records if r.rtype == T_OPT), 0)
        wire, sc = strip_opt(raw, sc)
        buf = bytearray(wire)
        flags = struct.unpack_from("!H", buf, 2)[0] & ~RD
        struct.pack_into("!HH", buf, 0, q.qid, flags | (q.flags & RD))
        buf[12:sc.qend] = q.qbytes
        return fit(buf, sc.qend, [r.ttl_off for r in sc.records], limit, self._client_opt(q, ext))

    def _from_entry(self, e: Entry, q: Question, limit: int, stale: bool) -> bytes:
        if stale:
            self.stale_served += 1
        buf = e.render(q.qid, q.qbytes, q.flags, self.cache.clock(), stale=stale)
        return fit(buf, e.qend, e.ttl_offs, limit, self._client_opt(q))

    def _rcode_reply(self, q: Question, rcode: int) -> bytes:
        # RA=1: kdns offers recursion for outside names (RFC 1035 §4.1.1; kube-dns sets it).
        flags = QR | RA | (q.flags & (0x7800 | RD | CD)) | rcode
        opt = self._client_opt(q)
        head = struct.pack("!HHHHHH", q.qid, flags, 1, 0, 0, 1 if opt else 0)
        return head + q.qbytes + opt

    @staticmethod
    def _error_reply(query: bytes, rcode: int) -> bytes | None:
        if len(query) < 12 or query[2] & 0x80:
            return None
        qid, flags = struct.unpack_from("!HH", query, 0)
        return struct.pack("!HHHHHH", qid, QR | (flags & (0x7800 | RD | CD)) | rcode, 0, 0, 0, 0)

    def _probe_answer(self, q: Question, limit: int) -> bytes:
        """Our own loop probe came back: answer it with the marker instead of forwarding it
        again (that is what stops the amplification), so the prober learns of the loop."""
        self.loop_probes_seen += 1
        text = PROBE_MARKER + self.probe_token.encode()
        rdata = bytes([len(text)]) + text
        rr = struct.pack("!HHHIH", 0xC00C, T_TXT, q.qclass, 0, len(rdata)) + rdata
        flags = QR | RA | (q.flags & RD)
        opt = self._client_opt(q)
        head = struct.pack("!HHHHHH", q.qid, flags, 1, 1, 0, 1 if opt else 0)
        return head + q.qbytes + rr + opt

    # ---- talking to upstreams ------------------------------------------------------------

    async def _forward(self, q: Question, key: tuple, retry: Retry | None = None,
                       refresh: bool = False) -> tuple[str, object]:
        """The one upstream exchange shared by every coalesced client. ``refresh``: a
        prefetch of an entry still fresh, which a failure must not replace (CoreDNS
        stores no failed prefetch: the entry serves until it expires); a later hit may
        queue it again."""
        try:
            servers = tuple(s for s in self.route(q.labels) if s not in self.looping)
            raw = await self._exchange(q, servers, retry) if servers else None
        except Exception:       # never let a bug turn into a hung client
            log.exception("forwarding %s failed", ".".join(q.labels))
            raw = None
        failed = raw is None or raw[3] & 0xF == SERVFAIL
        if failed and self.cache is not None:
            e = self.cache.get_stale(key)     # RFC 8767 §4: every upstream failed
            if e is not None:
                return "stale", e
        if refresh and failed:
            if self.cache is not None:
                self.cache.unmark(key)
            return "fail", None
        if raw is None:
            self.failures += 1
            self._remember_failure(q, key)
            return "fail", None
        self._fail_streak.pop(key, None)
        if self.cache is not None:
            self.cache.put(key, raw)
        return "reply", raw

    def _remember_failure(self, q: Question, key: tuple) -> None:
        """RFC 9520 §3.2: cache the resolution failure (at least 1 s, doubling on repeats)
        so a client's retries and the queries behind it do not ask the dead upstreams again."""
        if self.cache is None:
            return
        n = self._fail_streak.get(key, 0)
        if len(self._fail_streak) > FAIL_STREAK_MAX:
            self._fail_streak.clear()           # bounded; a lost streak only restarts at 1 s
        self._fail_streak[key] = n + 1
        ttl = min(settings.FAILURE_TTL_MIN * 2 ** min(n, 16), settings.FAILURE_TTL_MAX)
        wire = struct.pack("!HHHHHH", 0, QR | RA | SERVFAIL, 1, 0, 0, 0) + q.qbytes
        self.cache.put_failure(key, wire, ttl)

    async def _exchange(self, q: Question, servers: tuple[Upstream, ...],
                        retry: Retry | None = None) -> bytes | None:
        """Try the servers in turn from a random start (kube-dns) until one gives a usable
        reply or the overall deadline passes. SERVFAIL/REFUSED move on to the next server
        (dnsmasq) but are relayed if nobody does better. Servers that failed on the network
        get one more round while time is left (CoreDNS: 2 attempts per upstream).

        After a compiled try (``retry``) the deadline counts from that try, a truncated reply
        is asked again over TCP on the same server first, and the server that timed out or
        failed goes last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        start = self._start(len(servers))
        pending = list(servers[start:] + servers[:start])
        # Upstreams marked down (their last try failed) go last: the others first, and a
        # down one is still asked when nobody else answers (it may be back).
        pending.sort(key=lambda s: self.stats_for(s).failing)
        if retry is None and pending and self.stats_for(pending[0]).failing:
            # Every upstream of the route is marked down: CoreDNS forward's "healthcheck
            # broken" (it then tries them anyway, as here). A query the compiled path gave
            # back was counted there, when it picked.
            self.all_down += 1
        self._others = len(pending) > 1
        last_bad = None
        if retry is not None and retry.reason != RETRY_RECONFIG:
            deadline = min(deadline, retry.started + self.deadline)
            raw = await self._after_compiled(q, retry, deadline, pending)
            if raw is not None and raw[3] & 0xF not in (SERVFAIL, REFUSED):
                return raw
            last_bad = raw
        for _ in range(2):
            retry = []
            for up in pending:
                if loop.time() >= deadline:
                    return last_bad
                try:
                    raw = await self._try(up, q, deadline)
                except TryFailed:
                    retry.append(up)
                    continue
                if raw[3] & 0xF not in (SERVFAIL, REFUSED):
                    return raw
                last_bad = raw
            pending = retry
        return last_bad

    def _start(self, n: int) -> int:
        """The index of the first server to try, by ``policy``."""
        if n <= 1 or self.policy == "sequential":
            return 0
        if self.policy == "round_robin":
            self._next_start = (self._next_start + 1) % n
            return self._next_start
        return secrets.randbelow(n)

    async def _after_compiled(self, q: Question, retry: Retry, deadline: float,
                              pending: list[Upstream]) -> bytes | None:
        """Account for the compiled try and order what is left; a TC reply's TCP retry."""
        up = retry.upstream
        st = self.stats_for(up)
        if retry.reason == RETRY_TIMEOUT:
            self.timeouts += 1
            st.failed(up, "timeout", len(pending) > 1)
        elif retry.reason == RETRY_UNREACHABLE:
            self.unreachable += 1
            st.unreachable += 1
            st.failed(up, "unreachable", len(pending) > 1)
        if up in pending and len(pending) > 1:
            pending.remove(up)
            pending.append(up)          # failover: the others first
        if retry.reason != RETRY_TC:
            return None
        try:
            return await self._try(up, q, deadline, tcp_only=True)
        except TryFailed:
            return None

    async def _try(self, up: Upstream, q: Question, deadline: float,
                   tcp_only: bool = False) -> bytes:
        """One attempt: UDP (fresh random port and ID), then TCP on the same server if TC
        (``tcp_only``: the compiled path already got TC over UDP)."""
        loop = asyncio.get_running_loop()
        st = self.stats_for(up)
        st.sent()
        started = loop.time()
        host = await self._address(up)
        qid = secrets.randbits(16)            # RFC 5452 §4.3: unpredictable ID per query
        try:
            timeout = min(self.try_timeout, deadline - loop.time())
            truncated = tcp_only or self.force_tcp
            if not truncated:
                raw = await self._udp(host, up.port, self._query(q, qid), qid, q, st, timeout)
                truncated = bool(struct.unpack_from("!H", raw, 2)[0] & TC)
            if truncated:
                # RFC 7766 §5 / RFC 1035 §4.2.1: truncated over UDP → ask again over TCP.
                if not self.force_tcp:
                    self.tcp_retries += 1
                    st.tcp_retries += 1
                    qid = secrets.randbits(16)
                timeout = min(self.try_timeout, deadline - loop.time())
                raw = await asyncio.wait_for(
                    self._tcp(host, up.port, self._query(q, qid, tcp=True), qid, q, st), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self.timeouts += 1
            st.timeouts += 1
            st.try_failed()
            st.failed(up, "timeout", self._others)
            raise TryFailed from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("upstream %s: %s", up, exc)
            if getattr(exc, "errno", None) in UNREACHABLE:
                # ICMP port/host unreachable (IP_RECVERR): known now, not after the timeout.
                self.unreachable += 1
                st.unreachable += 1
            else:
                st.errors += 1
            st.try_failed()
            st.failed(up, str(exc) or type(exc).__name__, self._others)
            raise TryFailed from None
        st.replies += 1
        st.answered(up)
        st.observe(raw[3] & 0xF, loop.time() - started)
        return raw

    def _query(self, q: Question, qid: int, tcp: bool = False) -> bytes:
        # RD=1: upstreams are recursive resolvers. CD and DO are the client's (they are part of
        # the cache key). EDNS with our buffer size (RFC 6891 §6.2.5), also over TCP.
        flags = RD | (q.flags & CD)
        head = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1)
        return head + q.qbytes + opt_rr(self.edns_size, q.edns[1] if q.edns else 0)

    def _matches(self, data: bytes, qid: int, q: Question) -> bool:
        """RFC 5452 §3: accept only a response with our ID and our question (name compared
        case-insensitively, type, class). Anything else is someone else's packet or forged."""
        n = len(q.qbytes)
        if len(data) < 12 + n:
            return False
        rid, flags, qd = struct.unpack_from("!HHH", data, 0)
        return (rid == qid and flags & QR and qd == 1 and data[12:8 + n].lower() == q.name
                and data[8 + n:12 + n] == q.qbytes[-4:])

    def _reject(self, st: UpstreamStats) -> None:
        self.forged += 1
        st.forged += 1

    async def _udp(self, host: str, port: int, msg: bytes, qid: int, q: Question,
                   st: UpstreamStats, timeout: float) -> bytes:
        """One UDP exchange on a fresh socket; TimeoutError after ``timeout`` seconds.

        Callback style (one reader, one timer, one future) rather than sock_recvfrom under
        wait_for: this runs once per forwarded query, and the extra tasks cost more than
        the syscalls."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = random_port_socket(family)
        # The socket stays unconnected (see readable); IP_RECVERR makes the kernel report an
        # ICMP unreachable for it anyway, so a closed port fails this try at once.
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        fut = loop.create_future()

        def readable() -> None:
            while not fut.done():
                try:
                    data, src = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:          # e.g. ICMP port unreachable: no server there
                    fut.set_exception(e)
                    return
                # The socket is not connected so that replies from elsewhere reach us and can
                # be counted; RFC 5452 §3: the source address and port must be the server's.
                if src[1] != port or (src[0] != host and not same_ip(src[0], host)):
                    self._reject(st)
                elif not self._matches(data, qid, q):
                    self._reject(st)
                else:
                    try:
                        scan(data)   # a reply we cannot parse is no reply
                    except Malformed:
                        fut.set_exception(ValueError("malformed reply"))
                        return
                    fut.set_result(data)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError())

        fd = sock.fileno()
        timer = None
        try:
            sock.sendto(msg, (host, port))       # a datagram socket does not block on send
            loop.add_reader(fd, readable)
            timer = loop.call_later(max(timeout, 0.0), expire)
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
                loop.remove_reader(fd)
            sock.close()

    async def _tcp(self, host: str, port: int, msg: bytes, qid: int, q: Question,
                   st: UpstreamStats) -> bytes:
        """RFC 7766 §8: two-byte length prefix. One query per fresh connection: TC retries are
        rare, so connection reuse is not worth its state here."""
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(msg)) + msg)
            await writer.drain()
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            data = await reader.readexactly(n)
        finally:
            writer.close()
        if not self._matches(data, qid, q):
            self._reject(st)
            raise ValueError("TCP reply does not match the query")
        try:
            scan(data)
        except Malformed:
            raise ValueError("malformed reply") from None
        return data

    async def _address(self, up: Upstream) -> str:
        """IP of an upstream; stub servers given as names are resolved once per config."""
        if up.host in self._ip_hosts:
            return up.host
        try:
            ipaddress.ip_address(up.host)
            self._ip_hosts.add(up.host)
            return up.host
        except ValueError:
            pass
        addrs = self._host_addrs.get(up.host)
        if not addrs:
            if self.host_resolver is not None:
                addrs = await self.host_resolver(up.host)
            else:
                addrs = await self._lookup_a(up.host)
            if not addrs:
                raise TryFailed
            self._host_addrs[up.host] = addrs
        return addrs[0]

    async def _lookup_a(self, name: str) -> list[str]:
        qbytes = encode_name(name) + struct.pack("!HH", T_A, 1)
        labels = tuple(name.lower().strip(".").split("."))
        q = Question(0, RD, qbytes, qbytes[:-4].lower(), labels, T_A, 1, None)
        raw = await self._exchange(q, self.upstreams) if self.upstreams else None
        if raw is None:
            return []
        sc = scan(raw)
        return [socket.inet_ntoa(raw[r.end - 4:r.end]) for r in sc.records
                if r.section == 0 and r.rtype == T_A and r.end - r.ttl_off == 10]

    # ---- loop protection -----------------------------------------------------------------

    def probe_name(self) -> str:
        """``<random>.<instance token>.kdns-loop-probe.``: unique per probe, and a name only a
        kdns answers (any other resolver forwards it or says NXDOMAIN)."""
        return f"{secrets.token_hex(8)}.{self.probe_token}.{PROBE_ZONE}."

    async def check_loop(self, own_addresses: Iterable[tuple[str, int]] = ()) -> list[str]:
        """Find upstreams that are kdns itself or send our queries back to it.

        Call at start and after each configuration change, with the addresses kdns listens
        on. A looping upstream is taken out of routing (no amplification) and ``ready`` turns
        False with ``loop_errors`` saying which upstream and what to do. CoreDNS ``loop``
        exits instead; staying up keeps cluster names answering."""
        own = list(own_addresses)
        servers = list(dict.fromkeys(self.upstreams + tuple(s for ss in self.stubs.values()
                                                            for s in ss)))
        results = await asyncio.gather(*(self._loop_reason(up, own) for up in servers))
        self.looping = {up for up, why in zip(servers, results) if why}
        self.loop_errors = [why for why in results if why]
        for why in self.loop_errors:
            log.error("%s", why)
        return list(self.loop_errors)

    async def _loop_reason(self, up: Upstream, own: list[tuple[str, int]]) -> str | None:
        for host, port in own:
            if is_same_endpoint(up, host, port):
                return (f"forwarding loop: upstream {up} is kdns's own listening address "
                        f"{Upstream(host, port)}; remove it from upstreamNameservers, stubDomains "
                        "or the resolv.conf kdns reads (its pod needs dnsPolicy: Default)")
        name = self.probe_name()
        qbytes = encode_name(name) + struct.pack("!HH", T_TXT, 1)
        labels = tuple(name.strip(".").split("."))
        q = Question(0, RD, qbytes, qbytes[:-4].lower(), labels, T_TXT, 1, None)
        loop = asyncio.get_running_loop()
        try:
            raw = await self._try(up, q, loop.time() + self.try_timeout)
        except TryFailed:
            return None          # silent or dead is not a loop; failover handles it
        if PROBE_MARKER + self.probe_token.encode() in raw:
            return (f"forwarding loop: upstream {up} sends queries back to this kdns (probe "
                    f"{name} came back); point it at a resolver that does not forward to "
                    "cluster DNS")
        return None


def same_ip(a: str, b: str) -> bool:
    """Two textual addresses for the same IP (IPv6 spellings differ; scope ids dropped)."""
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return False


def is_same_endpoint(up: Upstream, host: str, port: int) -> bool:
    """Does ``up`` name the address kdns listens on (a wildcard listener owns loopback)?"""
    if up.port != port:
        return False
    try:
        a, b = ipaddress.ip_address(up.host), ipaddress.ip_address(host)
    except ValueError:
        return False
    return a == b or (b.is_unspecified and a.is_loopback)


def random_port_socket(family: int) -> socket.socket:
    """A UDP socket bound to a port chosen with ``secrets`` (RFC 5452 §9.2: source port
    randomisation multiplies the guesses an off-path spoofer needs by ~64000)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for _ in range(16):
        try:
            sock.bind((wildcard, 1024 + secrets.randbelow(65536 - 1024)))
            return sock
        except OSError:
            continue            # port in use: draw another
    sock.bind((wildcard, 0))     # the kernel's choice, also randomised on Linux
    return sock
