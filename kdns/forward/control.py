"""Forwarding wired into the running server: the supervisor owns the kube-dns config, the
workers each run a Forwarder as their hand-off.

Why: every worker must apply the same configuration at the same moment, without restart and
without dropping queries (issue 5). The supervisor reads and validates the kube-dns ConfigMap
(``kubedns_config``), works out the effective upstreams (``upstreamNameservers``, else the
resolv.conf nameservers, else ``--nameservers``: spec §3.2), runs loop detection at start and
on every change, and sends the result to each worker as one JSON datagram over a per-worker
SEQPACKET socketpair (a second control channel next to ``publish``'s image channel, so the
image protocol stays untouched). A worker swaps routes between two queries
(``Forwarder.configure`` is one assignment per field); queries in flight finish on the routes
they started with.

Cache hits skip Python: each worker mirrors every entry its ``Cache`` stores into a
``_fastpath.PacketCache``, which ``UdpServer`` consults for the packets the image hands off.
Plain cache misses skip Python too: ``CompiledForward`` runs a ``_fastpath.FwdEngine`` that
sends them upstream and relays the replies from C; timeouts, TC, SERVFAIL/REFUSED, stub
domains and TCP clients stay with the ``Forwarder`` (``KDNS_FWD_COMPILED=0`` turns it off).

What it must not do: contain DNS packet rules (they are in ``forward``/``cache``/
``_fastpath``) or know the Kubernetes record rules.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

from kdns.packet import engine
from kdns.forward.cache import Cache
from kdns.forward.external import ExternalNames
from kdns.forward.forwarder import Forwarder, Retry, Upstream, encode_name, parse_query
from kdns.forward.kubedns_config import (DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_PERIOD, ConfigDirWatcher,
                             ConfigError, KubeDNSConfig, effective_upstreams, parse_configmap,
                             parse_resolv_conf)
from kdns.zone.refpath import Malformed

log = logging.getLogger("kdns.forward.control")

MESSAGE_MAX = 1 << 20        # a config datagram (3 upstreams + stub domains) is far below
FAST_SLOTS = 4096            # compiled cache slots per worker (~1.8 KB each, allocated once)
FWD_SOCKETS = 64             # upstream sockets per worker for the compiled forwarder
FWD_PUMP_BUDGET_US = 2000    # longest stay in the compiled pump before the event loop runs
FWD_SWEEP = 0.1              # seconds between timeout sweeps (and one port rotation each)


@dataclass
class ForwardingOptions:
    """The kube-dns flags that decide where outside names go (cli.py fills it)."""
    config_dir: str | None = DEFAULT_CONFIG_DIR
    config_period: float = DEFAULT_CONFIG_PERIOD
    resolv_conf: str = "/etc/resolv.conf"
    nameservers: tuple[Upstream, ...] = ()
    cache_size: int = 10000
    try_timeout: float = 2.0
    config_map: str = ""                 # --config-map: read through the API instead
    config_map_namespace: str = "kube-system"
    kubecfg_file: str = ""
    kube_master_url: str = ""


# --------------------------------------------------------------------------- the message


def encode_config(token: str, upstreams, stubs: dict, looping=()) -> bytes:
    return json.dumps({
        "token": token,
        "upstreams": [list(u) for u in upstreams],
        "stubs": {d: [list(u) for u in s] for d, s in sorted(stubs.items())},
        "looping": [list(u) for u in looping],
    }, sort_keys=True).encode()


def decode_config(data: bytes) -> tuple[str, tuple, dict, set]:
    m = json.loads(data)
    ups = tuple(Upstream(h, p) for h, p in m["upstreams"])
    stubs = {d: tuple(Upstream(h, p) for h, p in s) for d, s in m["stubs"].items()}
    return m["token"], ups, stubs, {Upstream(h, p) for h, p in m["looping"]}


# --------------------------------------------------------------------------- supervisor side


class ForwardingControl:
    """Supervisor side: config dir polling, loop checks, one config channel per worker.

    Not thread-safe except for the loop check, which runs in a thread (it waits on the
    network) and hands its result back through ``_check_result``; ``poll`` applies it."""

    def __init__(self, opts: ForwardingOptions, configmap=None):
        self.opts = opts
        self.token = secrets.token_hex(8)       # one per instance, shared by every worker
        self.resolv = parse_resolv_conf(opts.resolv_conf)
        self.config = KubeDNSConfig()
        self.watcher = (ConfigDirWatcher(opts.config_dir, self._on_change,
                                         period=opts.config_period)
                        if opts.config_dir else None)
        # --config-map: a poller with fetch(), take() -> (version, data) | None, start() and a
        # stop event (kdns.kube.configmap.ConfigMapPoller), given by the supervisor.
        self.configmap = configmap
        self._cm_version: str | None = None
        self.rejected = 0
        self.own: list[tuple[str, int]] = []
        self.looping: tuple[Upstream, ...] = ()
        self.loop_errors: list[str] = []
        self.message = b""
        self._channels: dict[int, socket.socket] = {}
        self._next_poll = 0.0
        self._check_seq = 0
        self._check_result: tuple | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """False while an upstream loops back to us (readiness says why: ``loop_errors``)."""
        return not self.loop_errors

    def upstreams(self) -> tuple[Upstream, ...]:
        return effective_upstreams(self.config, self.resolv, self.opts.nameservers)

    def start(self, own: list[tuple[str, int]]) -> None:
        self.own = own
        if self.watcher is not None:
            self.watcher.poll_once()
        if self.configmap is not None:
            self.configmap.fetch()           # the first read before any worker starts
            self._take_configmap()
            self.configmap.start()
        self._next_poll = time.monotonic() + self.opts.config_period
        self._publish()
        log.info("forwarding to %s; stub domains: %s",
                 ", ".join(map(str, self.upstreams())) or "nobody (outside names: REFUSED)",
                 ", ".join(sorted(self.config.stub_domains)) or "none")
        self._start_loop_check()

    def poll(self, now: float) -> None:
        with self._lock:
            result, self._check_result = self._check_result, None
        if result is not None and result[0] == self._check_seq:
            self._apply_check(result[1], result[2])
        if self.watcher is not None and now >= self._next_poll:
            self._next_poll = now + self.opts.config_period
            self.watcher.poll_once()
        if self.configmap is not None:
            self._take_configmap()

    def _take_configmap(self) -> None:
        """Apply the ConfigMap the poller fetched last, as ConfigDirWatcher does a directory:
        an unchanged version is ignored, an invalid one rejected with one line, once."""
        got = self.configmap.take()
        if got is None or got[0] == self._cm_version:
            return
        self._cm_version = got[0]
        try:
            config = parse_configmap(got[1])
        except ConfigError as exc:
            self.rejected += 1
            log.error("%s (ConfigMap %s/%s); keeping the previous configuration", exc,
                      self.opts.config_map_namespace, self.opts.config_map)
            return
        self._on_change(config)

    def _on_change(self, config: KubeDNSConfig) -> None:
        old = self.config
        self.config = config
        if self.message:             # not the first read: say what changed
            log.info("kube-dns config changed: upstreams %s, stub domains %s",
                     ", ".join(map(str, self.upstreams())) or "none",
                     ", ".join(sorted(config.stub_domains)) or "none")
            self.looping = ()        # re-checked below; the new servers start trusted
            self._publish()
            if config != old:
                self._start_loop_check()

    def _apply_check(self, looping: tuple, errors: list[str]) -> None:
        if errors != self.loop_errors:
            if errors:
                for why in errors:
                    log.error("%s; kdns reports not ready until this is fixed", why)
            elif self.loop_errors:
                log.info("forwarding loop gone; ready again")
        self.looping, self.loop_errors = looping, errors
        self._publish()

    def _start_loop_check(self) -> None:
        """Probe every upstream in a thread (RFC-less but CoreDNS ``loop`` plugin's idea: a
        query only this instance answers must not come back to it)."""
        self._check_seq += 1
        seq, ups, stubs = self._check_seq, self.upstreams(), dict(self.config.stub_domains)

        def run():
            fw = Forwarder(ups, stubs, probe_token=self.token, try_timeout=self.opts.try_timeout)
            try:
                errors = asyncio.run(fw.check_loop(self.own))
            except Exception as e:          # a probe bug must not take the supervisor down
                log.warning("loop check failed: %r", e)
                return
            with self._lock:
                self._check_result = (seq, tuple(fw.looping), errors)

        threading.Thread(target=run, name="kdns-loop-check", daemon=True).start()

    def _publish(self) -> None:
        self.message = encode_config(self.token, self.upstreams(), self.config.stub_domains,
                                     self.looping)
        for slot in list(self._channels):
            self._send(slot)

    def _send(self, slot: int) -> None:
        try:
            self._channels[slot].send(self.message)
        except OSError as e:
            # A full channel (a worker stuck for many reloads) or a dead worker: the
            # supervisor replaces dead ones, and a new channel starts with the latest config.
            log.warning("could not send the forwarding config to worker %d: %s", slot, e)

    def attach(self, slot: int) -> socket.socket:
        """A new channel for ``slot``; returns the worker's end, the config already queued."""
        self.detach(slot)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self._channels[slot] = ours
        if self.message:
            self._send(slot)
        return theirs

    def detach(self, slot: int) -> None:
        sock = self._channels.pop(slot, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for slot in list(self._channels):
            self.detach(slot)
        if self.configmap is not None:
            self.configmap.stop.set()


# --------------------------------------------------------------------------- worker side


def cache_key_bytes(key: tuple) -> bytes:
    """forward.py's cache key (name, qtype, qclass, DO, CD) as PacketCache's flat bytes."""
    name, qtype, qclass, do, cd = key
    return bytes(name) + struct.pack("!HHBB", qtype, qclass, do, cd)


class LinkedCache(Cache):
    """The forwarder's Cache, mirroring every stored entry into the compiled PacketCache."""

    def __init__(self, *args, fast=None, **kw):
        super().__init__(*args, **kw)
        self.fast = fast

    def put(self, key, reply):
        e = super().put(key, reply)
        if e is not None:
            self._mirror(key, e)
        return e

    def get(self, key):
        # A fresh hit here means the compiled table lost the entry (evicted by a burst of
        # other names, or asked over TCP): put it back so the next UDP ask stays in C.
        e = super().get(key)
        if e is not None:
            self._mirror(key, e)
        return e

    def _mirror(self, key, e) -> None:
        if self.fast is not None:
            self.fast.put(cache_key_bytes(key), e.wire, e.qend, e.ttl_offs, e.ttls, e.ttl,
                          e.stored)

    def clear(self) -> None:
        self.entries.clear()
        if self.fast is not None:
            self.fast.clear()


def compiled_forward_enabled() -> bool:
    return (engine.IMPLEMENTATION == "compiled"
            and os.environ.get("KDNS_FWD_COMPILED", "1") != "0")


class CompiledForward:
    """A worker's compiled forwarder: the ``_fastpath.FwdEngine`` plus its Python chores.

    It opens the upstream sockets (kernel-chosen ephemeral ports; one is replaced every
    sweep when nothing waits on it, so ports keep moving: RFC 5452 §9.2), tells the engine
    the routes it may take (IPv4 upstreams; stub-domain names stay in Python), watches the
    engine's epoll fd, sweeps timeouts every ``FWD_SWEEP`` seconds, hands queries the engine
    gives back to the Forwarder (with a ``Retry``), stores relayed replies in the Cache
    (its rules; one batch per drain) and copies the engine's counters into the Forwarder's."""

    def __init__(self, handoff: "ForwardingHandoff", loop, udp_server, worker, *,
                 nsockets: int = FWD_SOCKETS, sweep: float = FWD_SWEEP):
        from kdns.packet import _fastpath
        fw = handoff.forwarder
        self.handoff, self.forwarder, self.cache = handoff, fw, handoff.cache
        self.loop, self.worker, self.period = loop, worker, sweep
        self.socks = [self._socket() for _ in range(nsockets)]
        self.engine = _fastpath.FwdEngine(worker.udp.fileno(), [s.fileno() for s in self.socks],
                                          capacity=fw.max_inflight, try_timeout=fw.try_timeout,
                                          edns_size=fw.edns_size)
        self.routes: list[Upstream] = []
        self.rotate_next = 0
        self.folded: dict = {"forged": 0, "relayed": 0, "coalesced": 0, "taken": 0,
                             "cached": 0, "upstreams": {}}
        fw.extra_inflight = lambda: self.engine.inflight
        c = self.cache
        if c is not None and getattr(c, "fast", None) is not None and not c.serve_stale:
            # C stores replies in the compiled cache itself (Cache.put there costs more than
            # the whole compiled forward). Python's Cache then does not hold them: TCP asks
            # for those names go upstream again. Serve-stale needs Python's copy: off then.
            self.engine.set_cache(c.fast, c.min_ttl, c.max_ttl, c.max_neg_ttl)
        self.apply_routes()
        loop.add_reader(self.engine.fileno(), self.on_readable)
        self.timer = loop.call_later(sweep, self.sweep)
        udp_server.set_forwarder(self.engine)
        self.udp_server = udp_server
        worker.serve_udp = self.pump

    def pump(self) -> int:
        """The worker's UDP drain: client queries and upstream replies in one compiled loop
        (``UdpServer.pump``); then Python's share."""
        n = self.udp_server.pump(self.worker.img, self.worker.counters, FWD_PUMP_BUDGET_US)
        self.take()
        return n

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("0.0.0.0", 0))        # the kernel picks a random ephemeral port
        return s

    def apply_routes(self) -> None:
        """The Forwarder's current routes, as far as C can take them (else: all Python)."""
        self.fold()
        fw = self.forwarder
        ups = [u for u in fw.upstreams if u not in fw.looping]
        if not all(_is_ipv4(u.host) for u in ups):
            ups = []                  # names or IPv6: the Forwarder handles everything
        self.routes = ups
        self.folded["upstreams"] = {}
        self.engine.set_routes([(u.host, u.port) for u in ups],
                               [encode_name(d) for d in fw.stubs])
        self.take()

    def on_readable(self) -> None:
        if self.worker.img is not None and self.engine_pumping():
            self.worker.drain_udp()     # the pump drains both sides
            return
        nhb, ndone = self.engine.drain(self.worker.counters)
        if nhb or ndone:
            self.take()

    def engine_pumping(self) -> bool:
        return getattr(self.worker, "serve_udp", None) == self.pump

    def sweep(self) -> None:
        try:
            self.engine.sweep()
            self.take()
            self.rotate()
        except Exception:   # noqa: BLE001 -- the sweep must keep running
            log.exception("compiled forwarder sweep failed")
        self.timer = self.loop.call_later(self.period, self.sweep)

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
        """Python's share after a drain or sweep: cache inserts, then handbacks."""
        for key, raw in self.engine.cacheable():
            name, tail = key[:-6], key[-6:]
            qtype, qclass, do, cd = struct.unpack("!HHBB", tail)
            self.cache.put((name, qtype, qclass, do, cd), raw)
        for query, addr, reason, up, started in self.engine.handbacks():
            upstream = self.routes[up] if up < len(self.routes) else None
            retry = Retry(reason, upstream, started) if upstream is not None else None
            self.worker.udp_retry(query, addr, retry)

    def fold(self) -> None:
        """Add the engine's counters since the last fold to the Forwarder's (issue 6; the
        worker calls it right before copying the Forwarder's counters to its page)."""
        fw, st, old = self.forwarder, self.engine.stats(), self.folded
        fw.requests += st["relayed"] - old["relayed"]
        fw.coalesced += st["coalesced"] - old["coalesced"]
        fw.forged += st["forged"] - old["forged"]
        if self.cache is not None:
            self.cache.misses += st["taken"] - old["taken"]
            self.cache.inserts += st["cached"] - old["cached"]
        for up, now in zip(self.routes, st["upstreams"]):
            before = old["upstreams"].get(up)
            s = fw.stats_for(up)
            d = {k: now[k] - (before[k] if before else 0)
                 for k in ("queries", "replies", "forged", "timeouts", "latency_sum_ns")}
            s.queries += d["queries"]
            s.replies += d["replies"]
            s.forged += d["forged"]
            fw.forged += d["forged"]
            s.timeouts += d["timeouts"]
            s.latency_sum_ns += d["latency_sum_ns"]
            for rc, n in enumerate(now["rcodes"]):
                delta = n - (before["rcodes"][rc] if before else 0)
                if delta:
                    s.rcodes[rc] = s.rcodes.get(rc, 0) + delta
                    fw.responses[rc] = fw.responses.get(rc, 0) + delta
            for b, n in enumerate(now["latency"][:len(s.latency_buckets)]):
                s.latency_buckets[b] += n - (before["latency"][b] if before else 0)
            if d["replies"]:
                s.answered(up)
            old["upstreams"][up] = now
        old.update(forged=st["forged"], relayed=st["relayed"], coalesced=st["coalesced"],
                   taken=st["taken"], cached=st["cached"])

    def close(self) -> None:
        self.timer.cancel()
        self.udp_server.set_forwarder(None)
        self.loop.remove_reader(self.engine.fileno())
        self.engine.reset()
        self.take()
        for s in self.socks:
            s.close()


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class ForwardingHandoff:
    """A worker's hand-off: the Forwarder, configured from the supervisor's channel."""

    def __init__(self, control: socket.socket, *, edns_max: int = 1232,
                 cache_size: int = 10000):
        self.control = control
        self.control.setblocking(False)
        fast = None
        if engine.IMPLEMENTATION == "compiled":
            from kdns.packet import _fastpath
            fast = _fastpath.PacketCache(capacity=min(_pow2(cache_size), FAST_SLOTS),
                                         edns_size=edns_max)
        self.fast = fast
        self.cache = LinkedCache(cache_size, fast=fast)
        self.forwarder = Forwarder(cache=self.cache, edns_size=edns_max)
        self.edns_max = edns_max
        self.configured = False
        self.worker = None
        self.external = ExternalNames(self.forwarder, edns_max)
        self.compiled: CompiledForward | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, udp_server=None, worker=None) -> None:
        """Apply the queued config now (it was sent before this worker started), then
        follow the channel; let ``udp_server`` serve cache hits itself."""
        self.on_control()
        loop.add_reader(self.control.fileno(), self.on_control)
        if udp_server is not None and self.fast is not None and hasattr(udp_server, "set_cache"):
            udp_server.set_cache(self.fast)
        self._loop = loop
        self.worker = worker
        if (compiled_forward_enabled() and worker is not None
                and hasattr(udp_server, "set_forwarder")):
            self.compiled = CompiledForward(self, loop, udp_server, worker)

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
                self.apply(*decode_config(latest))
            except (ValueError, KeyError, TypeError) as e:
                log.error("malformed forwarding config from the supervisor (%s); ignored", e)

    def apply(self, token: str, ups: tuple, stubs: dict, looping: set) -> None:
        fw = self.forwarder
        if self.configured and (ups, stubs) != (fw.upstreams, fw.stubs):
            self.cache.clear()          # new routes: answers from the old ones may not hold
        fw.probe_token = token
        fw.configure(ups, stubs)
        fw.looping = looping
        self.configured = True
        if self.compiled is not None:
            self.compiled.apply_routes()

    def sync_counters(self) -> None:
        """Bring the Forwarder's counters up to date with the compiled forwarder's."""
        if self.compiled is not None:
            self.compiled.fold()

    async def resolve(self, query: bytes, proto: str, retry: Retry | None = None) -> bytes | None:
        fw = self.forwarder
        if retry is not None:
            return await fw.resolve(query, proto, retry)
        if not fw.upstreams and not fw.stubs:
            # Nobody to ask (no ConfigMap upstreams, resolv.conf or --nameservers): refuse,
            # as before forwarding existed, rather than SERVFAIL after a timeout.
            try:
                q = parse_query(query)
            except Malformed:
                q = None
            probe = q is not None and fw.probe_token in q.labels
            if not probe:
                return engine.refused(query, self.edns_max)
        if self.worker is not None and self.worker.img is not None:
            # An ExternalName to an outside name: CNAME + the target's records (spec §1.6).
            reply = await self.external.answer(self.worker.img, query, proto)
            if reply is not None:
                return reply
        return await fw.resolve(query, proto)


def _pow2(n: int) -> int:
    p = 8
    while p < n:
        p <<= 1
    return p
