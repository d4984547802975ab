"""Forwarding, worker side: the hand-off a worker sends the queries its image cannot answer.

Why: names outside the cluster zones go to the upstreams (or stub-domain servers) the
supervisor's ``control`` decides; a worker applies each configuration between two queries
(``Forwarder.configure`` is one assignment per field), so queries in flight finish on the
routes they started with.

One cache per worker, a ``_fastpath.PacketCache`` (``cache.CompiledCache``): ``UdpServer``
answers UDP hits from it without Python, the compiled forwarder stores what it relays in it,
and the ``Forwarder`` reads and fills the same entries, so a TCP client gets what a UDP
client cached and the other way round. Plain cache misses skip Python too:
``CompiledForward`` runs a ``_fastpath.FwdEngine`` that sends them upstream and relays the
replies from C; timeouts, TC, SERVFAIL/REFUSED, stub domains and TCP clients stay with the
``Forwarder`` (``KDNS_FWD_COMPILED=0`` turns it off). The pure engine uses ``cache.Cache``.

What it must not do: contain DNS packet rules (they are in ``forwarder``/``cache``/
``_fastpath``), know the Kubernetes record rules, or read the kube-dns config itself.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

from kdns import settings
from kdns.dns.wire import SERVFAIL
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.forward import chaos
from kdns.forward.cache import Cache, CompiledCache
from kdns.forward.control import MESSAGE_MAX, decode_config, decode_tuning
from kdns.forward.autopath import AutoPath
from kdns.forward.external import ExternalNames
from kdns.forward.forwarder import (IP_RECVERR, Forwarder, Retry, Upstream, encode_name,
                                    parse_query)
from kdns.forward.rewrite import (NameRule, Rewriter, revert_reply, rewrite as rewrite_name,
                                  rewrite_query)
from kdns.zone.refpath import Malformed

log = logging.getLogger("kdns.forward.handoff")

FWD_SOCKETS = 64             # upstream sockets per worker for the compiled forwarder
FWD_PUMP_BUDGET_US = 2000    # longest stay in the compiled pump before the event loop runs
FWD_SWEEP = 0.1              # seconds between timeout sweeps (and one port rotation each)


def compiled_forward_enabled() -> bool:
    return engine.IMPLEMENTATION == "compiled" and settings.ENV.fwd_compiled


class CompiledForward:
    """A worker's compiled forwarder: the ``_fastpath.FwdEngine`` plus its Python chores.

    It opens the upstream sockets (kernel-chosen ephemeral ports; one is replaced every
    sweep when nothing waits on it, so ports keep moving: RFC 5452 §9.2), tells the engine
    the routes it may take (IPv4 upstreams; stub-domain names stay in Python), watches the
    engine's epoll fd, sweeps timeouts every ``FWD_SWEEP`` seconds, hands queries the engine
    gives back to the Forwarder (with a ``Retry``). The engine stores relayed replies in the
    worker's one cache and counts into the rows of the worker's page the Forwarder counts
    into, itself.

    Down marks: the engine marks an upstream down on its own failed tries and live on a
    reply; the Forwarder's verdicts on its tries are passed on (``mark``). New queries skip
    a down upstream while another is live, so nothing but a health check reaches it:
    the sweep sends one ``settings.HEALTH_CHECK_MIN`` after it went down, backing off to
    ``HEALTH_CHECK_MAX`` while it stays silent, and an answer puts it back in use."""

    def __init__(self, handoff: "ForwardingHandoff", loop, worker, *,
                 nsockets: int = FWD_SOCKETS, sweep: float = FWD_SWEEP):
        from kdns.packet import _fastpath
        fw = handoff.forwarder
        self.handoff, self.forwarder, self.cache = handoff, fw, handoff.cache
        self.loop, self.worker, self.period = loop, worker, sweep
        self.udp_server = worker.udp_server
        self.pumping = False          # the worker drains UDP through pump() (it called it)
        self.socks = [self._socket() for _ in range(nsockets)]
        self.engine = _fastpath.FwdEngine(worker.udp.fileno(), [s.fileno() for s in self.socks],
                                          capacity=fw.max_inflight, try_timeout=fw.try_timeout,
                                          edns_size=fw.edns_size)
        self.routes: list[Upstream] = []
        self.route_index: dict[Upstream, list[int]] = {}
        self.replies_seen: list[int] = []     # per route: the engine's replies at the last sweep
        self.health: list[_Health] = []       # per route: its next health check
        fw.on_mark = self.mark
        self.rotate_next = 0
        w = C.FWD_WORD
        self.engine.set_counters(fw.counters.page, w["cache_misses"], w["all_down"],
                                 C.ROW_REQUESTS,
                                 C.ROW_FAILURES, C.ROW_RCODES, len(C.FWD_RCODES),
                                 C.ROW_LATENCY, C.ROW_LATENCY_SUM)
        fw.extra_inflight = lambda: self.engine.inflight
        c = self.cache
        if isinstance(c, CompiledCache):
            # C stores what it relays in the worker's one cache, with Cache.put's rules.
            self.engine.set_cache(c.fast, c.min_ttl, c.max_ttl, c.max_neg_ttl)
        self.apply_routes()
        loop.add_reader(self.engine.fileno(), self.on_readable)
        self.timer = loop.call_later(sweep, self.sweep)
        self.udp_server.set_forwarder(self.engine)

    def pump(self, img, counters) -> int:
        """The worker's UDP drain (what ``ForwardingHandoff.attach`` gives the worker):
        client queries and upstream replies in one compiled loop (``UdpServer.pump``), then
        Python's share. Returns the hand-off packets left in the UdpServer, as serve()."""
        self.pumping = True
        n = self.udp_server.pump(img, counters, FWD_PUMP_BUDGET_US)
        self.take()
        self.handoff.after_udp()
        return n

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        # ICMP unreachable reported on the unconnected socket: the engine hands the queries
        # to that upstream back at once (fwd.pxi fw_unreachable) instead of timing out.
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        s.bind(("0.0.0.0", 0))        # the kernel picks a random ephemeral port
        return s

    def apply_routes(self) -> None:
        """The Forwarder's current routes, as far as C can take them (else: all Python)."""
        fw = self.forwarder
        ups = [u for u in fw.upstreams if u not in fw.looping]
        stubs = [encode_name(d) for d in fw.stubs]
        rewriter = getattr(self.handoff, "rewriter", None)
        if rewriter:
            # Names a rewrite rule may match are the Python side's (forward.rewrite): an
            # exact or suffix rule's zone like a stub domain's; a rule that may match any
            # name leaves every forward to Python.
            zones = rewriter.python_zones()
            if zones is None:
                ups = []
            else:
                stubs += [encode_name(z) for z in zones]
        if not all(_is_ipv4(u.host) for u in ups):
            ups = []                  # names or IPv6: the Forwarder handles everything
        if fw.force_tcp or fw.policy == "round_robin":
            ups = []                  # C picks a random or the first live one, over UDP
        # sequential: C tries the first live one; a timeout hands the query back and the
        # Forwarder goes on with the next ones in order (the failed one last).
        if not self.engine.set_routes([(u.host, u.port) for u in ups], stubs,
                                      [fw.stats_for(u).row for u in ups],
                                      sequential=fw.policy == "sequential"):
            ups = []                  # more than C holds: the Forwarder handles everything
        self.routes = ups
        self.route_index = {}
        for i, u in enumerate(ups):
            self.route_index.setdefault(u, []).append(i)
        self.replies_seen = [0] * len(ups)
        self.health = [_Health() for _ in ups]
        for i, u in enumerate(ups):
            if fw.stats_for(u).failing:
                self.engine.set_down(i, True)     # what the Forwarder knows survives a reload
        self.take()

    def mark(self, up: Upstream, down: bool) -> None:
        """The Forwarder's verdict on a try to ``up`` (Forwarder.on_mark)."""
        for i in self.route_index.get(up, ()):
            if i < len(self.routes) and self.routes[i] == up:
                self.engine.set_down(i, down)

    def on_readable(self) -> None:
        if self.pumping and self.worker.img is not None:
            self.worker.drain_udp()     # the pump drains both sides
            return
        if self.engine.drain(self.worker.counters):
            self.take()

    def sweep(self) -> None:
        try:
            self.engine.sweep()
            self.take()
            self.note_answers()
            self.check_health()
            self.rotate()
        except Exception:   # noqa: BLE001 -- the sweep must keep running
            log.exception("compiled forwarder sweep failed")
        self.timer = self.loop.call_later(self.period, self.sweep)

    def note_answers(self) -> None:
        """An upstream the Forwarder marked failing that answered C since: log that it
        answers again (UpstreamStats.answered), as a Python reply would."""
        fw = self.forwarder
        for i, st in enumerate(self.engine.stats()["upstreams"][:len(self.routes)]):
            up = self.routes[i]
            if st["replies"] > self.replies_seen[i]:
                self.replies_seen[i] = st["replies"]
                if not st["down"]:        # down again since: that try's handback says so
                    fw.stats_for(up).answered(up)

    def check_health(self) -> None:
        """Health-check the upstreams marked down whose turn has come (one check at a time
        each); the check's verdict reaches the engine through ``mark``."""
        now = self.loop.time()
        for i, down in enumerate(self.engine.down()[:len(self.routes)]):
            h = self.health[i]
            if not down:
                h.wait, h.at = settings.HEALTH_CHECK_MIN, None
            elif h.task is None:
                if h.at is None:
                    h.at = now + h.wait
                elif now >= h.at:
                    h.task = self.loop.create_task(self._health_check(self.routes[i], h))

    async def _health_check(self, up: Upstream, h: "_Health") -> None:
        try:
            ok = await self.forwarder.health_check(up)
        except Exception:   # noqa: BLE001 -- a broken check must not stop the next ones
            log.exception("health check of %s failed", up)
            ok = False
        finally:
            h.task = None
        if ok:
            h.wait, h.at = settings.HEALTH_CHECK_MIN, None
        else:
            h.wait = min(h.wait * 2, settings.HEALTH_CHECK_MAX)
            h.at = self.loop.time() + h.wait

    def rotate(self) -> None:
        i = self.rotate_next
        self.rotate_next = (i + 1) % len(self.socks)
        if self.engine.sock_pending(i):
            return                    # busy: its turn comes again
        new = self._socket()
        if self.engine.replace_socket(i, new.fileno()):
            self.socks[i].close()
            self.socks[i] = new
        else:
            new.close()

    def take(self) -> None:
        """Python's share after a drain or sweep: the queries the engine handed back."""
        for query, addr, reason, up, started in self.engine.handbacks():
            upstream = self.routes[up] if up < len(self.routes) else None
            retry = Retry(reason, upstream, started) if upstream is not None else None
            self.worker.udp_retry(query, addr, retry, received_ns=int(started * 1e9))

    def close(self) -> None:
        self.timer.cancel()
        self.forwarder.on_mark = None
        for h in self.health:
            if h.task is not None:
                h.task.cancel()
        self.udp_server.set_forwarder(None)
        self.loop.remove_reader(self.engine.fileno())
        self.engine.reset()
        self.take()
        for s in self.socks:
            s.close()


class _Health:
    """One route's health checks: the next one's time (None: not yet due), the wait
    before the one after a failure, the check running."""
    __slots__ = ("at", "wait", "task")

    def __init__(self):
        self.at: float | None = None
        self.wait = settings.HEALTH_CHECK_MIN
        self.task: asyncio.Task | None = None


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class ForwardingHandoff:
    """A worker's hand-off: the Forwarder, configured from the supervisor's channel."""

    def __init__(self, control: socket.socket, *, edns_max: int = settings.EDNS_UDP_SIZE,
                 cache_size: int = settings.CACHE_SIZE, page=None):
        self.control = control
        self.control.setblocking(False)
        # The worker's counter page (None: a private one): the Forwarder, the cache and the
        # compiled forwarder all count into its forwarder region as they go.
        self.counters = C.ForwardCounters(page)
        fast = None
        if engine.IMPLEMENTATION == "compiled":
            from kdns.packet import _fastpath
            fast = _fastpath.PacketCache(capacity=min(_pow2(cache_size), settings.FAST_CACHE_SLOTS),
                                         edns_size=edns_max)
            self.cache = CompiledCache(fast, cache_size, counters=self.counters)
        else:
            self.cache = Cache(cache_size, counters=self.counters)
        self.fast = fast
        self.forwarder = Forwarder(cache=self.cache, edns_size=edns_max, counters=self.counters)
        self.edns_max = edns_max
        self.configured = False
        self.worker = None
        self.external = ExternalNames(self.forwarder, edns_max)
        self.autopath = AutoPath(self.forwarder, self.external, edns_max)
        self.compiled: CompiledForward | None = None
        self.rewriter = Rewriter(())

    def attach(self, loop: asyncio.AbstractEventLoop, worker=None):
        """The worker's ``Handoff.attach``: apply the queued config now (it was sent before
        this worker started), then follow the channel; let the worker's UdpServer serve cache
        hits itself. Returns the compiled forwarder's UDP pump for the worker to drain UDP
        with, or None (then the worker's own ``UdpServer.serve``)."""
        self._loop = loop
        self.on_control()
        loop.add_reader(self.control.fileno(), self.on_control)
        self.worker = worker
        udp_server = getattr(worker, "udp_server", None)
        self._set_recursion()
        if self.fast is not None and hasattr(udp_server, "set_cache"):
            udp_server.set_cache(self.fast)
        if compiled_forward_enabled() and hasattr(udp_server, "set_forwarder"):
            self.compiled = CompiledForward(self, loop, worker)
            return self.compiled.pump
        return None

    def after_udp(self) -> None:
        """After a UDP drain: the prefetches the packet path's cache hits queued."""
        fast = self.fast
        if fast is not None and fast.due_count:
            self.forwarder.prefetch_due()

    def take_handbacks(self) -> None:
        """The worker's wait in C (worker.UdpSelector) left handbacks: Python's share."""
        if self.compiled is not None:
            self.compiled.take()

    def on_control(self) -> None:
        latest = None
        while True:
            try:
                data = self.control.recv(MESSAGE_MAX)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                # The supervisor went away; the worker's image channel stops the worker.
                try:
                    self._loop.remove_reader(self.control.fileno())
                except (AttributeError, ValueError):
                    pass
                break
            latest = data
        if latest is not None:
            try:
                self.apply(*decode_config(latest), tuning=decode_tuning(latest))
            except (ValueError, KeyError, TypeError) as e:
                log.error("malformed forwarding config from the supervisor (%s); ignored", e)

    def apply(self, token: str, ups: tuple, stubs: dict, looping: set,
              tuning: dict | None = None) -> None:
        fw = self.forwarder
        if tuning:
            self.tune(tuning)
        if self.configured and (ups, stubs) != (fw.upstreams, fw.stubs):
            self.cache.clear()          # new routes: answers from the old ones may not hold
        fw.probe_token = token
        fw.configure(ups, stubs)
        fw.looping = looping
        self.configured = True
        self._set_recursion()
        if self.compiled is not None:
            self.compiled.apply_routes()

    def tune(self, t: dict) -> None:
        """The forward and cache options (ForwardingOptions.tuning) on this worker's
        Forwarder and cache, and on the compiled forwarder's copy of the cache rules."""
        fw, c = self.forwarder, self.cache
        fw.policy, fw.force_tcp = t["policy"], t["force_tcp"]
        # The compiled forwarder's table is sized once, from the first configuration (it
        # is built after it); the Python bound counts the compiled queries in flight too.
        fw.max_inflight = t["max_concurrent"]
        fw.stale_answer_timeout = (fw.deadline if t["stale_timeout"] is None
                                   else t["stale_timeout"])
        c.max_ttl, c.max_neg_ttl, c.min_ttl = t["success_ttl"], t["denial_ttl"], t["min_ttl"]
        c.serve_stale, c.max_stale = t["serve_stale"] > 0, t["serve_stale"]
        if "prefetch" in t:
            c.set_prefetch(*t["prefetch"])
        if self.compiled is not None and isinstance(c, CompiledCache):
            self.compiled.engine.set_cache(c.fast, c.min_ttl, c.max_ttl, c.max_neg_ttl)
        rules = tuple(NameRule.from_list(r) for r in t.get("rewrite") or ())
        old = getattr(self, "rewriter", None)
        if old is None or rules != old.rules:
            self.rewriter = Rewriter(rules)
            if self.compiled is not None:
                self.compiled.apply_routes()

    def _set_recursion(self) -> None:
        """RA on the image's own replies exactly when this worker forwards: with upstreams
        (or stub domains) recursion is available (RFC 1035 §4.1.1), and nslookup stops
        warning "Got recursion not available" as with kube-dns."""
        udp_server = getattr(self.worker, "udp_server", None)
        if udp_server is not None and hasattr(udp_server, "ra"):
            fw = self.forwarder
            udp_server.ra = bool(fw.upstreams or fw.stubs)

    async def resolve(self, query: bytes, proto: str, retry: Retry | None = None,
                      client=None) -> bytes | None:
        """The worker's seam: the reply for a handed-off query. A failure on the way answers
        SERVFAIL (RFC 1035 §4.1.1: "unable to process ... due to a problem with the name
        server") and is counted as one, never left without an answer. ``client``: the
        sender's address (text), which autopath's hand-offs need."""
        try:
            return await self._resolve(query, proto, retry, client)
        except Exception:       # noqa: BLE001 -- the client gets an answer whatever broke
            log.exception("hand-off failed")
            self.forwarder.failures += 1
            return engine.rcode_reply(query, SERVFAIL, self.edns_max)

    async def _resolve(self, query: bytes, proto: str, retry: Retry | None,
                       client=None) -> bytes | None:
        local = chaos.answer(query, proto, self.edns_max)
        if local is not None:
            return local                # CH, HS...: answered or refused here, never forwarded
        fw = self.forwarder
        if retry is not None:
            return await fw.resolve(query, proto, retry)
        if self.rewriter:
            rewritten = await self._rewritten(query, proto)
            if rewritten is not None:
                return rewritten[0]
        return await self._unrewritten(query, proto, client)

    async def _rewritten(self, query: bytes, proto: str):
        """CoreDNS ``rewrite name``: (the reply,) when a rule matches the query's name, else
        None. The rewritten question is answered as any query (the image, the hand-off's
        ExternalNames or the forwarder), then its reply is rewritten back: the client's
        question, the records' names reverted as the rules say (forward.rewrite)."""
        try:
            q = parse_query(query)
        except Malformed:
            return None
        if q is None or q.qtype in (251, 252):
            return None
        name = ".".join(q.labels) + "."
        res = rewrite_name(self.rewriter.rules, name)
        if res is None:
            return None
        asked, back = res
        if not asked:
            # CoreDNS: "invalid name after rewrite" answers SERVFAIL.
            return (engine.rcode_reply(query, SERVFAIL, self.edns_max),)
        qend = 12 + len(q.name)
        new = rewrite_query(query, qend, asked)
        img = self.worker.img if self.worker is not None else None
        reply = None
        if img is not None:
            udp = getattr(self.worker, "udp_server", None)
            # The worker's rotation (loadbalance): a rewritten answer turns as any other.
            rot = getattr(self.worker, "rotation", None)
            action, out = engine.answer(img, new, proto == "tcp", edns_max=self.edns_max,
                                        ra=bool(getattr(udp, "ra", False)),
                                        rotation=rot if rot is not None else 0)
            if action == engine.SEND:
                reply = out
            elif action == engine.DROP:
                return (None,)
        if reply is None:
            reply = await self._unrewritten(new, proto)
        if reply is None:
            return (None,)
        limit = 65535 if proto == "tcp" else max(512, min(q.edns[0], self.edns_max)) \
            if q.edns else 512
        try:
            return (revert_reply(reply, q.qbytes, back, limit),)
        except (ValueError, struct.error):
            log.debug("a rewritten reply for %s did not parse; SERVFAIL", name)
            return (engine.rcode_reply(query, SERVFAIL, self.edns_max),)

    async def _unrewritten(self, query: bytes, proto: str, client=None) -> bytes | None:
        """After ``rewrite`` (CoreDNS runs it before autopath): autopath's steps for
        ``client``, the ExternalNames, the forwarder."""
        fw = self.forwarder
        img = self.worker.img if self.worker is not None else None
        if client is not None and img is not None:
            # Autopath: the pod's remaining search steps, asked of the upstreams here.
            reply = await self.autopath.answer(img, query, proto, client)
            if reply is not None:
                return reply
        if not fw.upstreams and not fw.stubs:
            # Nobody to ask (no ConfigMap upstreams, resolv.conf or --nameservers): refuse,
            # as before forwarding existed, rather than SERVFAIL after a timeout.
            try:
                q = parse_query(query)
            except Malformed:
                q = None
            probe = q is not None and fw.probe_token in q.labels
            if not probe:
                # An ExternalName to an outside name still has its CNAME here: answer
                # with it alone (RFC 1034 §3.6.2: the client follows it), else REFUSED.
                img = self.worker.img if self.worker is not None else None
                cname = self.external.cname_only(img, query, proto) if img is not None else None
                return cname if cname is not None else engine.refused(query, self.edns_max)
        if self.worker is not None and self.worker.img is not None:
            # An ExternalName to an outside name: CNAME + the target's records, as CoreDNS
            # answers it (RFC 1034 §3.6.2: a resolver follows the CNAME for the client).
            reply = await self.external.answer(self.worker.img, query, proto)
            if reply is not None:
                return reply
        return await fw.resolve(query, proto)


def _pow2(n: int) -> int:
    p = 8
    while p < n:
        p <<= 1
    return p
