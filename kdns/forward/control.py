"""Forwarding, supervisor side: the kube-dns config, loop checks, one channel per worker.

Why: every worker must apply the same configuration at the same moment, without restart and
without dropping queries. The supervisor reads and validates the kube-dns ConfigMap
(``kubedns_config``), works out the effective upstreams (``upstreamNameservers``, else the
resolv.conf nameservers, else ``--nameservers``), runs loop detection at start and on every
change, and sends the result to each worker as one JSON datagram over a per-worker
SEQPACKET socketpair (a second control channel next to ``publish``'s image channel, so the
image protocol stays untouched). The worker side, which applies it, is ``handoff``.

What it must not do: contain DNS packet rules (they are in ``forwarder``/``cache``/
``_fastpath``), know the Kubernetes record rules, or run in a worker.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from kdns import settings
from kdns.forward.forwarder import Forwarder, Upstream
from kdns.forward.kubedns_config import (ConfigDirWatcher, ConfigError, KubeDNSConfig,
                                         effective_upstreams, parse_configmap, parse_resolv_conf)

log = logging.getLogger("kdns.forward.control")

MESSAGE_MAX = 1 << 20        # a config datagram (3 upstreams + stub domains) is far below


@dataclass
class ForwardingOptions:
    """The kube-dns flags that decide where outside names go (cli.py fills it)."""
    config_dir: str | None = settings.CONFIG_DIR
    config_period: float = settings.CONFIG_PERIOD
    resolv_conf: str = settings.RESOLV_CONF
    nameservers: tuple[Upstream, ...] = ()
    cache_size: int = settings.CACHE_SIZE
    try_timeout: float = settings.TRY_TIMEOUT
    config_map: str = ""                 # --config-map: read through the API instead
    config_map_namespace: str = "kube-system"
    kubecfg_file: str = ""
    kube_master_url: str = ""
    # The forwarder's and the cache's choices (--forward-*, --cache-*, --serve-stale, or
    # the Corefile's forward and cache options).
    forward_policy: str = settings.FORWARD_POLICY
    forward_max_concurrent: int = settings.FORWARD_MAX_CONCURRENT
    forward_force_tcp: bool = settings.FORWARD_FORCE_TCP
    cache_success_ttl: int = settings.CACHE_SUCCESS_TTL
    cache_denial_ttl: int = settings.CACHE_DENIAL_TTL
    cache_min_ttl: int = settings.CACHE_MIN_TTL
    serve_stale: float = settings.SERVE_STALE
    # None: RFC 8767's 1.8 s client timer; "immediate": a stale answer at once while the
    # refresh runs; "verify": only when the refresh fails (CoreDNS serve_stale's modes).
    serve_stale_refresh: str | None = None
    # CoreDNS cache prefetch: (AMOUNT, DURATION s, PERCENT); AMOUNT 0 is off.
    cache_prefetch: tuple = settings.CACHE_PREFETCH
    # --corefile: re-read every config_period (CorefileWatcher); ``corefile_first`` is the
    # version the command line was built from, ``pinned`` the settings the command line
    # gave itself (the Corefile does not override them on a reload either).
    corefile: str = ""
    # --corefile-configmap: ``config_map`` names the coredns ConfigMap, whose Corefile key
    # is the Corefile (polled through the API like the kube-dns one).
    corefile_configmap: bool = False
    corefile_strict: bool = True
    corefile_first: object = None
    pinned: frozenset = frozenset()
    # The Corefile's hosts plugin: its source (forward.hosts.HostsSource), already read
    # once; re-read as its ``reload`` says, or with each ConfigMap version.
    hosts_source: object = None
    # Its ``rewrite name`` rules (forward.rewrite.NameRule), which the workers apply to the
    # queries the image leaves to them; fixed at start, as the image's aliases are.
    rewrites: tuple = ()

    def tuning(self) -> dict:
        """What each worker applies to its Forwarder and cache."""
        stale_timeout = {None: settings.STALE_ANSWER_TIMEOUT, "immediate": 0.0,
                         "verify": None}[self.serve_stale_refresh]
        return {"policy": self.forward_policy, "max_concurrent": self.forward_max_concurrent,
                "force_tcp": self.forward_force_tcp, "success_ttl": self.cache_success_ttl,
                "denial_ttl": self.cache_denial_ttl, "min_ttl": self.cache_min_ttl,
                "serve_stale": self.serve_stale, "stale_timeout": stale_timeout,
                "rewrite": [r.as_list() for r in self.rewrites],
                "prefetch": list(self.cache_prefetch)}


# --------------------------------------------------------------------------- the message


def encode_config(token: str, upstreams, stubs: dict, looping=(), tuning=None) -> bytes:
    return json.dumps({
        "token": token,
        "tuning": tuning or {},
        "upstreams": [list(u) for u in upstreams],
        "stubs": {d: [list(u) for u in s] for d, s in sorted(stubs.items())},
        "looping": [list(u) for u in looping],
    }, sort_keys=True).encode()


def decode_config(data: bytes) -> tuple[str, tuple, dict, set]:
    m = json.loads(data)
    ups = tuple(Upstream(h, p) for h, p in m["upstreams"])
    stubs = {d: tuple(Upstream(h, p) for h, p in s) for d, s in m["stubs"].items()}
    return m["token"], ups, stubs, {Upstream(h, p) for h, p in m["looping"]}


def decode_tuning(data: bytes) -> dict:
    """The forwarder and cache settings of a config message ({}: keep the defaults)."""
    return json.loads(data).get("tuning") or {}


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
        self.corefile = None
        if opts.corefile or opts.corefile_configmap:
            from kdns.forward.corefile import CorefileWatcher
            first = opts.corefile_first
            self.corefile = CorefileWatcher(opts.corefile, self._on_corefile,
                                            strict=opts.corefile_strict, first=first)
            # A file is polled like the config dir; a ConfigMap arrives through the poller.
            self.watcher = self.corefile if opts.corefile else None
            if first is not None:
                self.config = first.forwarding
                self._corefile_resolv(first)
        # --config-map: a poller with fetch(), take() -> (version, data) | None, start() and a
        # stop event (kdns.kube.configmap.ConfigMapPoller), given by the supervisor.
        self.configmap = configmap
        self._cm_version: str | None = None
        self.hosts = opts.hosts_source
        self.on_hosts = None            # called with new HostsRecords (the supervisor's)
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

    def looping_upstreams(self) -> int:
        """How many upstreams send our queries back to us; they are out of routing. Not a
        readiness matter: when every replica sees the loop, not ready would empty the
        Service and take the cluster names down with the outside ones."""
        return len(self.loop_errors)

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
        if self.hosts is not None:
            self._hosts_offer(self.hosts.poll(now))

    def _hosts_offer(self, new) -> None:
        if new is not None and self.on_hosts is not None:
            self.on_hosts(new)

    def _take_configmap(self) -> None:
        """Apply the ConfigMap the poller fetched last, as ConfigDirWatcher does a directory:
        an unchanged version is ignored, an invalid one rejected with one line, once."""
        got = self.configmap.take()
        if got is None or got[0] == self._cm_version:
            return
        self._cm_version = got[0]
        if self.opts.corefile_configmap:
            before = self.corefile.rejected
            self.corefile.offer_configmap(got[1], self.configmap_label())
            self.rejected += self.corefile.rejected - before
            if self.hosts is not None and self.hosts.configmap_key is not None:
                self._hosts_offer(self.hosts.offer_key(got[1]))
            return
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

    def configmap_label(self) -> str:
        """How a Corefile read through the API is named in messages (file:line)."""
        return f"configmap/{self.opts.config_map_namespace}/{self.opts.config_map}:Corefile"

    def _corefile_resolv(self, cf) -> None:
        # ``forward . FILE``: that file's nameservers (unless --resolv-conf named another);
        # no ``forward .`` at all: nothing to forward to, as CoreDNS.
        if cf.resolv_conf is None:
            self.resolv = ()
        else:
            path = self.opts.resolv_conf if "resolv_conf" in self.opts.pinned else cf.resolv_conf
            self.resolv = parse_resolv_conf(path)

    def _on_corefile(self, cf) -> None:
        """A new valid Corefile version: its routes and its forward and cache options now
        (the settings the command line pinned stay as given)."""
        from dataclasses import replace
        from kdns.forward.corefile import FORWARD_KEYS
        defaults = ForwardingOptions()
        changes = {k: cf.flags.get(k, getattr(defaults, k)) for k in FORWARD_KEYS
                   if k != "cache_size" and k not in self.opts.pinned}
        if "serve_stale" not in cf.flags and "serve_stale" not in self.opts.pinned:
            changes["serve_stale_refresh"] = None
        self.opts = replace(self.opts, **changes)
        self._corefile_resolv(cf)
        self._on_change(cf.forwarding)      # publishes the new tuning too
        if self.hosts is not None and cf.hosts != self.hosts.spec:
            self._hosts_respec(cf.hosts)
        elif self.hosts is None and cf.hosts is not None:
            log.warning("the Corefile has hosts now (%s); kdns serves them from its next "
                        "start", cf.hosts.where)

    def _hosts_respec(self, spec) -> None:
        """The Corefile's hosts directive changed (inline lines, ttl, zones...): its records
        from the new directive now, as CoreDNS's reload would; a bad version keeps the last
        good records. Adding or removing the plugin waits for the next start."""
        from kdns.forward.hosts import HostsError, HostsSource
        if spec is None:
            log.warning("the Corefile no longer has hosts; kdns drops them at its next start")
            return
        old = self.hosts
        src = HostsSource(spec, old.domain, configmap_key=old.configmap_key)
        try:
            new = src.load_first(old.stamp[1] if old.configmap_key is not None else None)
        except HostsError as e:
            log.error("%s Keeping the last good hosts records.", e)
            return
        self.hosts = src
        log.info("hosts (%s) changed in the Corefile; its records apply now", spec.where)
        if self.on_hosts is not None:
            self.on_hosts(new)

    def _apply_check(self, looping: tuple, errors: list[str]) -> None:
        if errors != self.loop_errors:
            if errors:
                for why in errors:
                    log.error("%s; it is out of routing (what only it serves answers "
                              "SERVFAIL) until this is fixed; cluster names are unaffected", why)
            elif self.loop_errors:
                log.info("forwarding loop gone; every upstream is in routing again")
        self.looping, self.loop_errors = looping, errors
        self._publish()

    def _start_loop_check(self) -> None:
        """Probe every upstream in a thread (RFC-less but CoreDNS ``loop`` plugin's idea: a
        query only this instance answers must not come back to it)."""
        self._check_seq += 1
        seq, ups, stubs = self._check_seq, self.upstreams(), dict(self.config.stub_domains)

        def run():
            fw = Forwarder(ups, stubs, probe_token=self.token, try_timeout=self.opts.try_timeout)
            # The probe travels as the workers' queries do (CoreDNS's loop query goes
            # through forward): an upstream reached only over TCP is probed over TCP.
            fw.force_tcp = self.opts.forward_force_tcp
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
                                     self.looping, self.opts.tuning())
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
