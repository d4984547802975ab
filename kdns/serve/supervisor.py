"""The supervisor: sockets, workers, zone updates, signals, HTTP.

Why: one small pure-Python process owns everything that outlives a worker. It opens, per
worker slot, one UDP and one TCP SO_REUSEPORT socket and keeps them open for as long as it
runs, so a worker that dies loses no queued packets: its replacement inherits the very same
sockets. The slots are hosted by ``--worker-processes`` processes (``Host``: slot i in
process i % P, one thread per slot, kdns/serve/worker.py ``serve_slots``); a process is
replaced with all its slots. Worker processes are forked with the fds passed from the
zygote (kdns/serve/zygote.py, a single-threaded pre-imported process started by fork+exec:
the supervisor has HTTP threads, and forking a threaded process is unsafe), and reparented
to the supervisor, a child subreaper, which waits for them as for its own children. Should
the zygote fail twice in a row, with one worker process (nothing to share), or with
KDNS_FORK_WORKERS=0, one is a fresh ``python -m kdns.serve.worker``. Zone images go to
workers through ``publish`` (sealed memfds, no file system).

Signals: SIGTERM stops (after ``--lameduck``, not ready meanwhile), SIGINT stops at once,
SIGHUP re-reads the input now instead of at the next one-second poll. A dead worker process is
replaced at once (the loop wakes on SIGCHLD), with a back-off only if it keeps dying young.

What it must not do: contain DNS rules or answer queries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from kdns import settings
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.observe import http
from kdns.serve import publish
from kdns.serve.memory import release_memory, tune_malloc

log = logging.getLogger("kdns.serve.supervisor")


def image_digest(data: bytes) -> bytes:
    """What the supervisor remembers of the image it published: comparing digests finds an
    unchanged image without keeping a private copy of it (30 MiB at 10k services/100k
    endpoints; the workers' shared mapping is the one copy that must exist)."""
    return hashlib.blake2b(data, digest_size=32).digest()


def forwarding_control(opts):
    """The supervisor side of forwarding for ``opts`` (a ForwardingOptions), with the
    ConfigMap poller when ``--config-map`` names one (read through the API)."""
    from kdns.forward import control as forwarding
    poller = None
    if opts.config_map:
        from kdns.kube import configmap
        poller = configmap.ConfigMapPoller(
            opts.config_map, opts.config_map_namespace, opts.config_period,
            configmap.connection_for(opts.kubecfg_file, opts.kube_master_url))
    return forwarding.ForwardingControl(opts, poller)


TICK = 0.1                  # main-loop wake-up: a dead worker is noticed within this
FILE_POLL = 1.0             # The input file is re-read when it changes
STOP_GRACE = 5.0            # seconds workers get to exit after SIGTERM before SIGKILL
RESPAWN_FAST = 1.0          # a worker that dies younger than this is crash-looping
RESPAWN_MAX_DELAY = 5.0


class StartError(Exception):
    """kdns cannot start; the message is one sentence saying what to change."""


class LoadError(Exception):
    """An input file could not be turned into an image; one sentence naming the file."""


class EmptyInput(LoadError):
    """The input held no objects; ``data`` is its (empty cluster) image. Whether to publish
    it is the source's call: a file being rewritten is empty for a moment (``kubectl get …
    > f.yaml`` truncates it first), and publishing that would turn every cluster name into
    an authoritative NXDOMAIN that resolvers cache for the SOA minimum (RFC 2308 §5)."""

    def __init__(self, message: str, data: bytes):
        super().__init__(message)
        self.data = data


@dataclass
class ServeConfig:
    from_file: str | None = None
    from_image: str | None = None
    domain: str = settings.DOMAIN
    dns_bind_address: str = settings.DNS_BIND_ADDRESS
    dns_port: int = settings.DNS_PORT
    ttl: int = settings.TTL
    workers: int = 1
    # --worker-processes: how many processes host the worker slots (None: the default,
    # settings.DEFAULT_WORKER_PROCESSES, at most ``workers``).
    worker_processes: int | None = None
    workers_why: str = "--workers"          # what decided the count (logged at start)
    workers_warning: str | None = None      # e.g. a cgroup quota file that made no sense
    healthz_port: int = settings.HEALTHZ_PORT
    metrics_port: int = settings.METRICS_PORT
    pods: str = settings.PODS
    # CoreDNS kubernetes ``endpoint_pod_names``: a headless endpoint without a hostname is
    # named after its pod (dns-rules §1.4).
    endpoint_pod_names: bool = False
    edns_udp_size: int = settings.EDNS_UDP_SIZE
    tcp_idle_timeout: float = settings.TCP_IDLE_TIMEOUT
    tcp_max_connections: int = settings.TCP_MAX_CONNECTIONS
    tcp_max_per_source: int = settings.TCP_MAX_PER_SOURCE
    lameduck: float = 0.0
    # Join another process's SO_REUSEPORT group on the DNS port (a rolling hand-over on one
    # network namespace); without it, kdns refuses a port someone else serves.
    share_dns_port: bool = False
    # The kube-dns pod's and CoreDNS's listeners (0 disables one), SkyDNS metrics
    # on kube-dns's PROMETHEUS_PORT (0: off), query logging.
    health_port: int = 0
    ready_port: int = 0
    sidecar_port: int = 0
    prometheus_port: int = 0
    prometheus_path: str = "/metrics"
    log_queries: bool = False
    # CoreDNS loadbalance: A, AAAA and SRV answers rotate (kdns/zone/layout.py, Rotation).
    loadbalance: bool = settings.LOADBALANCE
    log_level: str = "info"
    log_format: str = "klog"        # kdns/observe/logs.py LOG_FORMATS
    # Where outside names go (control.ForwardingOptions); None = REFUSED.
    forwarding: object = None
    # Neither --from-file nor --from-image means the Kubernetes API (kube-dns flags).
    kubecfg_file: str = ""
    kube_master_url: str = ""
    initial_sync_timeout: float = settings.INITIAL_SYNC_TIMEOUT
    # The Corefile's custom records (forward.hosts.HostsBox), compiled into every image.
    hosts: object = None
    # Its ``rewrite name`` rules (forward.rewrite.NameRule): exact aliases compiled into
    # every image, the rest applied by the workers (they reach them with the forwarding).
    rewrites: tuple = ()
    # --serve-image: the sealed image over HTTP on the healthz port, for node-locals.
    serve_image: bool = False
    # Autopath (CoreDNS ``autopath @kubernetes``): None, or the server's search domains.
    autopath: tuple | None = None


# --------------------------------------------------------------------------- image sources


def checked_image(data: bytes, where: str) -> bytes:
    """Refuse bytes the workers would refuse, before they are published."""
    try:
        ok = engine.Image(data).verify() is not False
    except ValueError as e:
        raise LoadError(f"{where} is not a valid kdns zone image ({e}); rebuild it.") from None
    if not ok:
        raise LoadError(f"{where} is not a valid kdns zone image (bad checksum); rebuild it.")
    return data


def zone_file_loader(cfg: ServeConfig) -> Callable[[str], bytes]:
    def load(path: str) -> bytes:
        try:
            from kdns.kube import records  # lazily: the record rules are another module's job
            from kdns.serve import build
        except ImportError as e:
            raise LoadError(f"--from-file needs kdns.kube.records, which failed to import ({e}).") from None
        try:
            data, objects = build.compile_file_counted(
                path, domain=cfg.domain, ttl=cfg.ttl, pods=cfg.pods,
                endpoint_pod_names=cfg.endpoint_pod_names,
                hosts=cfg.hosts.records if cfg.hosts is not None else None,
                rewrites=cfg.rewrites, autopath=cfg.autopath)
        except records.InputError as e:
            raise LoadError(f"--from-file {path}: {e}") from None
        except OSError as e:
            raise LoadError(f"cannot read --from-file {path}: {e.strerror or e}; "
                            f"check the path and its permissions.") from None
        # At once, before anything else allocates: a few objects made between the compile
        # and the release would each pin an otherwise empty arena (measured at 10k services
        # and 100k endpoints: supervisor RSS 86 MiB when released after start, 35 at once).
        release_memory()
        data = checked_image(data, f"the image compiled from {path}")
        if objects == 0:
            raise EmptyInput(f"--from-file {path} holds no Services, Endpoints, "
                             f"EndpointSlices, Namespaces or Pods.", data)
        return data
    return load


def image_file_loader(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LoadError(f"cannot read --from-image {path}: {e.strerror or e}; "
                        f"check the path and its permissions.") from None
    return checked_image(data, f"--from-image {path}")


class WatchedFile:
    """An input file re-read when its inode, size, mtime or ctime changes.

    ctime too: ``cp -p`` and ``rsync -t`` write new content under the old mtime, and a
    same-size edit would otherwise never be seen; ctime cannot be set back by the writer.

    An input with no objects is not published while the last one had some (EmptyInput):
    it is far likelier a file caught mid-rewrite than a cluster that lost every Service.
    An empty input after an empty one (or as the first) is published: that is deliberate."""

    def __init__(self, path: str, load: Callable[[str], bytes]):
        self.path = path
        self.load = load
        self.stamp = None
        self.failed_stamp = None
        self.empty = False          # whether the image last published came from no objects

    # The supervisor's source protocol, shared with the API controller (kdns/serve/controller.py,
    # the API): a push source wakes the loop itself and is polled every iteration; /readiness
    # waits until every worker serves ready_generation.
    push = False
    ready_generation = 1

    def bind(self, *, wake, served_generation, served_at=None) -> None:
        """Nothing to wake: the loop polls a file once a second."""

    def published(self, generation: int) -> None:
        """Nothing to track for a file."""

    def stop(self) -> None:
        """Nothing runs in the background."""

    def _stat(self):
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def first(self) -> bytes:
        try:
            self.stamp = self._stat()
        except OSError as e:
            raise LoadError(f"cannot read {self.path}: {e.strerror}; check the path.") from None
        try:
            return self.load(self.path)
        except EmptyInput as e:
            log.warning("%s Serving an empty cluster.", e)
            self.empty = True
            return e.data

    def poll(self, force: bool = False) -> bytes | None:
        """New image bytes when the file changed (or ``force``), else None; a bad update
        logs one line and keeps the last good image."""
        try:
            stamp = self._stat()
        except OSError as e:
            if self.failed_stamp != "missing":
                log.error("cannot stat %s (%s); still serving the last good image",
                          self.path, e.strerror)
                self.failed_stamp = "missing"
            return None
        if stamp == self.stamp and not force:
            return None
        if stamp == self.failed_stamp and not force:
            return None
        empty = False
        try:
            data = self.load(self.path)
        except EmptyInput as e:
            if not self.empty:
                log.error("%s Not publishing an empty cluster over a non-empty one (a file "
                          "being rewritten is empty for a moment); still serving the last "
                          "good image.", e)
                self.failed_stamp = stamp
                return None
            data, empty = e.data, True
        except LoadError as e:
            log.error("%s Still serving the last good image.", e)
            self.failed_stamp = stamp
            return None
        self.stamp, self.failed_stamp, self.empty = stamp, None, empty
        return data


def make_source(cfg: ServeConfig) -> WatchedFile:
    if cfg.from_image:
        return WatchedFile(cfg.from_image, image_file_loader)
    if cfg.from_file:
        return WatchedFile(cfg.from_file, zone_file_loader(cfg))
    from kdns.kube.connection import ConnectionConfigError
    from kdns.serve import controller
    try:
        source = controller.ApiController.from_config(cfg)
    except ConnectionConfigError as e:
        raise StartError(str(e)) from None
    # This process is kdns and nothing else: what the first sync built may leave the
    # collector's generations (Controller.freeze).
    source.freeze_after_sync = True
    return source


# --------------------------------------------------------------------------- sockets


def dual_stack(host: str) -> bool:
    """``::`` serves both families on one socket (IPV6_V6ONLY off, RFC 4291 §2.5.5.2's
    IPv4-mapped addresses): dual-stack clusters need no second listener."""
    return host == "::"


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


def _v6only_off(sock: socket.socket, host: str) -> None:
    if dual_stack(host):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` is served by someone else already (the OS's reason), or None.

    Why: SO_REUSEPORT lets any process of the same user bind a port that is already in a
    group, and the kernel then splits the traffic between unrelated servers (``make run``
    twice). A bind without SO_REUSEPORT fails if any socket holds the port, so one probe of
    each protocol tells a free port from a taken one; the probes are closed at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(family, kind)
        try:
            _v6only_off(probe, host)        # a dual-stack bind also finds IPv4 holders
            if kind == socket.SOCK_STREAM:
                # TIME_WAIT remains of an earlier kdns are not a server (RFC 793 §3.5).
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
        finally:
            probe.close()
    return None


def listening_sockets(host: str, port: int, n: int,
                      share: bool = False) -> list[tuple[socket.socket, socket.socket]]:
    """n pairs of SO_REUSEPORT (UDP, TCP) sockets on host:port; port 0 picks one for all.
    A port another process serves is refused unless ``share`` (--share-dns-port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port and not share:
        taken = port_in_use(host, port)
        if taken is not None:
            raise StartError(f"cannot listen for DNS on {host} port {port} ({taken}): another "
                             f"process serves it; stop it, choose another --dns-port, or pass "
                             f"--share-dns-port to split the traffic with it on purpose.")
    pairs = []
    try:
        for _ in range(n):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            pairs.append((udp, None))
            _v6only_off(udp, host)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            udp.bind((host, port))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            pairs[-1] = (udp, tcp)
            _v6only_off(tcp, host)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            tcp.bind((host, port))
            tcp.listen(1024)       # worker.LISTEN_BACKLOG
    except OSError as e:
        for pair in pairs:
            for s in pair:
                if s is not None:
                    s.close()
        raise StartError(f"cannot listen for DNS on {host} port {port} ({e.strerror or e}); "
                         f"choose another --dns-port or --dns-bind-address.") from None
    return pairs


# --------------------------------------------------------------------------- supervisor


def worker_args(cfg: ServeConfig, slots, fds) -> list[str]:
    """A worker process's arguments: ``slots`` are the slot indices it serves, ``fds`` one
    (UDP, TCP, control[, forwarding]) group per slot then the counters fd, as numbers or,
    for the zygote, placeholders."""
    per_slot = [list(group) for group in fds[:-1]]
    column = lambda k: ",".join(str(group[k]) for group in per_slot)
    args = ["--slot", ",".join(str(i) for i in slots), "--udp-fd", column(0),
            "--tcp-fd", column(1), "--control-fd", column(2), "--counters-fd", str(fds[-1]),
            "--edns-udp-size", str(cfg.edns_udp_size),
            "--tcp-idle-timeout", str(cfg.tcp_idle_timeout),
            "--tcp-max-connections", str(cfg.tcp_max_connections),
            "--tcp-max-per-source", str(cfg.tcp_max_per_source),
            "--log-level", cfg.log_level, "--log-format", cfg.log_format] + (
                ["--log-queries"] if cfg.log_queries else []) + (
                [] if cfg.loadbalance else ["--no-loadbalance"])
    if len(per_slot[0]) > 3:
        args += ["--forward-fd", column(3), "--cache-size", str(cfg.forwarding.cache_size)]
    return args


def process_count(workers: int, processes: int | None) -> int:
    """How many worker processes host ``workers`` slots: ``processes`` (--worker-processes)
    when given, else DEFAULT_WORKER_PROCESSES, never more than the slots."""
    return max(1, min(workers, processes or settings.DEFAULT_WORKER_PROCESSES))


PR_SET_CHILD_SUBREAPER = 36
ZYGOTE_MAX_FDS = 253            # fds one request to the zygote carries (zygote.MAX_FDS)
ZYGOTE_REPLY_TIMEOUT = 10.0     # seconds a fork may take before the zygote counts as stuck


def become_subreaper() -> bool:
    """Orphaned descendants (workers the zygote forked) become this process's children,
    so it can wait for them and read their exit status (prctl(2))."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ForkedWorker:
    """The part of subprocess.Popen the supervisor uses, for a worker the zygote forked
    (reparented to this subreaper, so waitpid works as for any child)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -255         # reaped elsewhere: it is gone all the same
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            if self.returncode is not None and self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            if self.pidfd >= 0:
                select.select([self.pidfd], [], [], left)   # readable once it exited
            else:
                time.sleep(0.01 if left is None else min(0.01, left))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The process workers are forked from (kdns/serve/zygote.py)."""

    def __init__(self, env: dict, log_level: str, log_format: str = "klog", stderr=None):
        self.env = env
        self.log_level, self.log_format = log_level, log_format
        self.stderr = stderr            # the workers' stderr: they inherit the zygote's
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kdns.serve.zygote", "--control-fd", str(theirs.fileno()),
                 "--log-level", self.log_level, "--log-format", self.log_format],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=self.stderr,
                env=self.env)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.settimeout(ZYGOTE_REPLY_TIMEOUT)
        self.sock = mine

    def _ask(self, args: list[str], fds) -> int:
        if self.sock is None:
            self.start()
        socket.send_fds(self.sock, [json.dumps(args).encode()], list(fds))
        reply = self.sock.recv(4096)
        if not reply:
            raise EOFError("the zygote exited")
        got = json.loads(reply)
        if "pid" not in got:
            raise OSError(got.get("error", "no pid"))
        return got["pid"]

    def spawn(self, args: list[str], fds) -> ForkedWorker | None:
        """A worker forked with ``args`` and ``fds``; a zygote that died or is stuck is
        replaced once; None if that one fails too (the caller starts it another way)."""
        for attempt in (1, 2):
            try:
                return ForkedWorker(self._ask(args, fds))
            except (OSError, EOFError, ValueError) as e:
                log.warning("worker zygote: %s%s", e, "; restarting it" if attempt == 1 else "")
                self.close()
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()           # the zygote exits on EOF
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Slot:
    """One serving slot: its sockets and counter page are the supervisor's for as long as
    it runs; the process hosting it (``host``) comes and goes."""
    __slots__ = ("index", "udp", "tcp", "host", "beat", "beat_at")

    def __init__(self, index, udp, tcp):
        self.index, self.udp, self.tcp = index, udp, tcp
        self.host: Host | None = None
        self.beat = 0               # the worker's heartbeat count last seen, and when
        self.beat_at = 0.0

    @property
    def proc(self):
        """The process serving this slot now, or None."""
        return self.host.proc if self.host is not None else None


class Host:
    """One worker process and the slots it serves, one thread each (kdns/serve/worker.py
    serve_slots). It lives and dies as one: a death or any of its slots' heartbeat standing
    still replaces it with all its slots."""
    __slots__ = ("index", "slots", "proc", "started", "fast_deaths", "respawn_at")

    def __init__(self, index: int, slots: list[Slot]):
        self.index, self.slots = index, slots
        for slot in slots:
            slot.host = self
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.fast_deaths = 0
        self.respawn_at = 0.0

    def name(self) -> str:
        """What log lines call it: "worker 3", or "workers 0,2,4" for a process of several."""
        if len(self.slots) == 1:
            return f"worker {self.slots[0].index}"
        return "workers " + ",".join(str(s.index) for s in self.slots)


class Supervisor:
    def __init__(self, cfg: ServeConfig, source: WatchedFile):
        self.cfg = cfg
        self.source = source
        self.publisher = publish.Publisher()
        self.slots: list[Slot] = []
        self.hosts: list[Host] = []
        self.http: list[http.HttpListener] = []
        self.counters_fd = -1
        self.counters = None
        self.ready = False
        self.stopping = False
        self.lameduck_until: float | None = None
        self.published = b""
        self.reload_requested = False
        self.wake_r = self.wake_w = -1
        self.forwarding = None
        # Health probe, metrics and logs.
        self.prober = None
        self.query_summary = None
        self.log_relay = None           # logs.WorkerLogRelay, False, or None until the first spawn
        self.worker_deaths = 0
        self.image_bytes = 0
        self.published_at = 0.0
        self.zygote: Zygote | None = None
        if cfg.forwarding is not None:
            self.forwarding = forwarding_control(cfg.forwarding)
            self.forwarding.on_hosts = self.hosts_changed

    def hosts_changed(self, records) -> None:
        """New custom records (a hosts file or ConfigMap key changed): the next image has
        them, compiled and published as any change is."""
        if self.cfg.hosts is None:
            return
        self.cfg.hosts.records = records
        if self.source.push:
            self.source.hosts_changed()      # the API controller compiles on its thread
        else:
            self.reload_requested = True     # the file source: compile again now

    # ---- start
    def start(self, first_image: bytes) -> None:
        """Everything that can fail for a user-fixable reason, before any worker exists."""
        cfg = self.cfg
        if dual_stack(cfg.dns_bind_address) and not ipv6_available():
            log.warning("IPv6 is not available on this node; listening on 0.0.0.0 (IPv4) "
                        "instead of ::")
            cfg.dns_bind_address = "0.0.0.0"
        pairs = self.listen()
        self.slots = [Slot(i, u, t) for i, (u, t) in enumerate(pairs)]
        # Slot i is served by process i % P: consecutive slots (node-local's addresses are
        # consecutive runs of them) land in different processes, so a process that dies
        # leaves every address served.
        nprocs = process_count(len(self.slots), cfg.worker_processes)
        self.hosts = [Host(k, self.slots[k::nprocs]) for k in range(nprocs)]
        self.counters_fd, self.counters = publish.counters_memfd(cfg.workers)
        try:
            self.start_http()
        except OSError as e:
            self.close()
            raise StartError(f"cannot listen for HTTP on {cfg.dns_bind_address} "
                             f"({e.strerror or e}); choose another --healthz-port or "
                             f"--metrics-port, or 0 to disable it.") from None
        size = len(first_image)
        if not self.source.push:
            self.published = image_digest(first_image)
        self.source.published(self.publisher.publish(first_image))
        if self.forwarding is not None:
            self.forwarding.start([(cfg.dns_bind_address, self.slots[0].udp.getsockname()[1])])
        if cfg.workers_warning:
            log.warning("%s", cfg.workers_warning)
        log.info("listening on %s port %d (udp+tcp) with %d workers (%s) in %d %s, "
                 "%s engine", cfg.dns_bind_address, self.slots[0].udp.getsockname()[1],
                 cfg.workers, cfg.workers_why, len(self.hosts),
                 "process" if len(self.hosts) == 1 else "processes", engine.IMPLEMENTATION)
        # One worker process shares its imports with nobody: the zygote would only add its
        # own pages (measured +4.5 MiB summed PSS at 1 worker, -9 at 2).
        if settings.ENV.fork_workers and len(self.hosts) > 1 and become_subreaper():
            self.zygote = Zygote(self.worker_env(), cfg.log_level, cfg.log_format,
                                 stderr=self.worker_stderr())
        for host in self.hosts:
            self.spawn(host)
        for listener in self.http:
            listener.start()
        if self.prober is not None:
            self.prober.start()
        self.image_bytes, self.published_at = size, time.time()

    def extra_routes(self) -> dict:
        """HTTP routes beyond health and metrics, by listener kind: with --serve-image, the
        sealed image for node-locals on the healthz port (kdns/serve/stream.py)."""
        if not self.cfg.serve_image:
            return {}
        from kdns.serve.stream import ImageStream
        self.image_stream = ImageStream(self.publisher)
        self.extra_collectors = (self.image_stream.collector(),)
        return {"healthz": self.image_stream.routes()}

    def listen(self) -> list:
        """One (UDP, TCP) socket pair per worker slot (node-local mode listens on more
        than one address: kdns/nodelocal/run.py)."""
        cfg = self.cfg
        return listening_sockets(cfg.dns_bind_address, cfg.dns_port, cfg.workers,
                                 share=cfg.share_dns_port)

    def start_http(self) -> None:
        # Listeners, probe and metrics are kdns/observe/health.py's and kdns/observe/metrics.py's.
        from kdns.observe import health
        from kdns.observe import logs
        try:
            self.prober, self.http = health.start_listeners(self)
        except health.PortError as e:
            self.close()
            raise StartError(str(e)) from None
        if self.cfg.log_queries:
            self.query_summary = logs.QuerySummary(self.counters, self.cfg.workers)

    def worker_env(self) -> dict:
        # The worker must import this very kdns even when it is not installed.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def worker_stderr(self):
        """The workers' stderr: ours, or the relay's pipe when we write a log file."""
        if self.log_relay is None:
            from kdns.observe import logs
            self.log_relay = logs.worker_log_relay() or False
        return self.log_relay.write_fd if self.log_relay else None

    def spawn(self, host: Host) -> None:
        cfg = self.cfg
        channels, groups = [], []
        try:
            for slot in host.slots:
                control = self.publisher.attach(slot.index)
                channels.append(control)
                # No beat until the new worker serves: a predecessor's count must not look
                # alive.
                C.set_page_heartbeat(memoryview(self.counters)[
                    slot.index * C.PAGE_BYTES:(slot.index + 1) * C.PAGE_BYTES], 0)
                group = [slot.udp.fileno(), slot.tcp.fileno(), control.fileno()]
                if self.forwarding is not None:
                    fwd = self.forwarding.attach(slot.index)
                    channels.append(fwd)
                    group.append(fwd.fileno())
                groups.append(group)
            fds = [fd for group in groups for fd in group] + [self.counters_fd]
            indices = [slot.index for slot in host.slots]
            host.proc = None
            if self.zygote is not None and len(fds) <= ZYGOTE_MAX_FDS:
                # Placeholders in the zygote's order of fds: the groups, then the counters.
                names, k = [], 0
                for group in groups:
                    names.append([f"{{{k + j}}}" for j in range(len(group))])
                    k += len(group)
                host.proc = self.zygote.spawn(
                    worker_args(cfg, indices, names + [f"{{{k}}}"]), fds)
                if host.proc is None:
                    log.warning("the worker zygote failed; starting workers as fresh "
                                "interpreters from now on")
                    self.zygote.close()
                    self.zygote = None
            if host.proc is None:
                argv = [sys.executable, "-m", "kdns.serve.worker"] + worker_args(
                    cfg, indices, groups + [self.counters_fd])
                host.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL,
                                             stderr=self.worker_stderr(), env=self.worker_env())
        finally:
            for channel in channels:
                channel.close()
        host.started = time.monotonic()
        for slot in host.slots:
            slot.beat, slot.beat_at = 0, host.started
        log.debug("%s started as pid %d", host.name(), host.proc.pid)

    # ---- run
    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.on_stop_signal)
        signal.signal(signal.SIGINT, self.on_stop_signal)
        signal.signal(signal.SIGHUP, self.on_reload_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # only to wake the loop
        self.source.bind(wake=self.wake, served_generation=self.served_generation,
                         served_at=self.served_at)
        next_poll = time.monotonic() + FILE_POLL
        try:
            while not self.stopping:
                select.select([self.wake_r], [], [], TICK)
                self.drain_wakeups()
                self.supervise()
                self.publisher.retry()
                self.check_ready()
                if self.query_summary is not None:
                    self.query_summary.tick(time.monotonic())
                if self.forwarding is not None:
                    self.forwarding.poll(time.monotonic())
                now = time.monotonic()
                if self.lameduck_until is not None and now >= self.lameduck_until:
                    break
                if self.reload_requested or now >= next_poll or self.source.push:
                    self.reload(force=self.reload_requested)
                    self.reload_requested = False
                    next_poll = now + FILE_POLL
        finally:
            self.shutdown()
        return 0

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 256):
                pass
        except BlockingIOError:
            pass

    def on_stop_signal(self, signum, frame) -> None:
        # SIGTERM is a lameduck (not ready at once, still answering while the
        # endpoints controller takes the pod out of the Service, then stop); a second
        # signal, or SIGINT, stops now.
        if signum == signal.SIGTERM and self.cfg.lameduck > 0 and self.lameduck_until is None:
            self.lameduck_until = time.monotonic() + self.cfg.lameduck
            log.info("SIGTERM: not ready; answering for %.1fs more (--lameduck)", self.cfg.lameduck)
            return
        self.stopping = True

    def on_reload_signal(self, signum, frame) -> None:
        self.reload_requested = True

    def supervise(self) -> None:
        """Replace dead worker processes: at once, unless one keeps dying young (then back
        off)."""
        now = time.monotonic()
        for host in self.hosts:
            if host.proc is not None:
                status = host.proc.poll()
                if status is None:
                    for slot in host.slots:
                        if self.check_heartbeat(host, slot, now):
                            break
                    continue
                age = now - host.started
                host.fast_deaths = host.fast_deaths + 1 if age < RESPAWN_FAST else 0
                delay = 0.0 if host.fast_deaths < 2 else \
                    min(RESPAWN_MAX_DELAY, 0.1 * 2 ** host.fast_deaths)
                log.warning("%s (pid %d) exited with status %s after %.1fs; replacing it%s",
                            host.name(), host.proc.pid, status, age,
                            f" in {delay:.1f}s" if delay else "")
                for slot in host.slots:
                    self.publisher.detach(slot.index)
                    if self.forwarding is not None:
                        self.forwarding.detach(slot.index)
                    # Nobody serves this slot now: say so (the page has no other writer
                    # until the replacement starts), so generation == current means "the
                    # new one serves".
                    C.set_page_generation(memoryview(self.counters)[
                        slot.index * C.PAGE_BYTES:(slot.index + 1) * C.PAGE_BYTES], 0)
                host.proc = None
                host.respawn_at = now + delay
                self.worker_deaths += 1
            if host.proc is None and now >= host.respawn_at and not self.stopping:
                self.spawn(host)

    def check_heartbeat(self, host: Host, slot: Slot, now: float) -> bool:
        """Kill a worker process one of whose slots' heartbeat stood still for
        WORKER_STALL_TIMEOUT: alive but stopped or stuck, that slot leaves its socket's
        queue unserved, and nothing else would notice (it never exits). SIGKILL works on a
        stopped process too; the next loop reaps it and its replacement serves the packets
        queued on the kept sockets. True when it killed."""
        beat = C.page_heartbeat(self.counters, slot.index)
        if beat != slot.beat:
            slot.beat, slot.beat_at = beat, now
        elif beat and now - slot.beat_at > settings.WORKER_STALL_TIMEOUT:
            others = len(host.slots) - 1
            log.error("worker %d (pid %d) made no progress for %.1fs; killing it%s",
                      slot.index, host.proc.pid, now - slot.beat_at,
                      f" with the {others} other slot{'s' if others > 1 else ''} of its "
                      f"process" if others else "")
            host.proc.kill()
            for s in host.slots:
                s.beat_at = now         # once; the next loop sees it exit
            return True
        return False

    def check_ready(self) -> None:
        """Ready once every worker has mapped the first image (/readiness)."""
        need = self.source.ready_generation     # 0: the API is not synced yet
        if not self.ready and need and all(C.page_generation(self.counters, s.index) >= need
                                  for s in self.slots):
            self.ready = True
            if self.prober is not None:
                self.prober.kick()      # health and readiness need a real answer
            log.info("ready: all %d workers serve image generation %d",
                     len(self.slots), self.publisher.generation)

    def reload(self, force: bool = False) -> None:
        t0 = time.monotonic()
        data = self.source.poll(force=force)
        took = time.monotonic() - t0
        # A file can change and compile to the same image; the API controller's images never
        # repeat (the SOA serial moves with every change), and hashing 30 MiB would cost
        # ~45 ms of every publish (the programming latency), so only files are hashed.
        if data is not None and not self.source.push:
            digest = image_digest(data)
            # Also after SIGHUP (``force`` re-reads even an unchanged stamp): the workers serve
            # these bytes already, and a second publish of them would only churn generations
            # (a poll that saw the new file just before the signal publishes it once).
            if digest == self.published:
                log.debug("%s re-read: the same image as the one served; nothing to publish",
                          self.source.path)
                return
            self.published = digest
        if data is not None:
            size = len(data)
            gen = self.publisher.publish(data)
            self.source.published(gen)
            log.info("published image generation %d from %s (%d bytes, built in %.3fs)",
                     gen, self.source.path, size, took)
            self.image_bytes, self.published_at = size, time.time()
            # No release_memory() here: with the API controller the model stays alive and a
            # full collection over it takes 150-300 ms of this loop per publish (the
            # latency budget); the file loader releases right after its own compile.

    # ---- what health and metrics read (kdns/observe/health.py, kdns/observe/metrics.py)
    def is_ready(self) -> bool:
        """First sync served by every worker, a real DNS answer seen, not in lameduck. Only
        the first answer gates readiness: a slow probe under load must not flap it (a
        failing probe is liveness's business, /health)."""
        answering = self.prober is None or self.prober.answered_once
        return (self.ready and answering and not self.stopping and self.lameduck_until is None)

    def zone_text(self) -> str | None:
        """The served zone as a master file, read back from the published image (the
        healthz listener's /cache); None before the first publish."""
        from kdns.zone import dump
        current = self.publisher.current_image()
        if current is None:
            return None
        _, view = current
        try:
            return dump.master_text(view)
        finally:
            view.close()

    def looping_upstreams(self) -> int:
        """Upstreams found sending our queries back (out of routing; readiness unaffected)."""
        return 0 if self.forwarding is None else self.forwarding.looping_upstreams()

    def dns_port(self) -> int:
        return self.slots[0].udp.getsockname()[1] if self.slots else self.cfg.dns_port

    def _source_stat(self, name: str, default):
        get = getattr(self.source, name, None)
        return get() if callable(get) else default

    def staleness_seconds(self) -> float:
        return self._source_stat("staleness_seconds", 0.0)

    def relists(self) -> int:
        return self._source_stat("relists", 0)

    def programming_histograms(self) -> dict:
        """{service_kind: ([(le, cumulative count)...], sum)} from the controller."""
        return self._source_stat("programming_histograms", {})

    # ---- stop
    def wake(self) -> None:
        """Make the main loop run now (from another thread: the controller has an image)."""
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass            # already pending, or shutting down

    def served_generation(self) -> int:
        """The oldest image generation any worker serves (0: a slot has no worker)."""
        return min(C.page_generation(self.counters, s.index) for s in self.slots)

    def served_at(self) -> float:
        """When a worker last swapped images (time.monotonic seconds): once every worker
        serves a generation, the last of them switched no later than this."""
        return max(C.page_swapped_ns(self.counters, s.index) for s in self.slots) / 1e9

    def leave_reuseport_group(self) -> None:
        """Lameduck's last step: connect each UDP socket to its own address. Since
        Linux 5.7 a connected socket is no longer picked for other flows of its SO_REUSEPORT
        group, so another kdns on the same port gets every new packet, while the packets
        already queued here stay readable for the workers' last drain: none is lost."""
        for slot in self.slots:
            try:
                slot.udp.connect(slot.udp.getsockname())
            except OSError as e:
                log.debug("worker %d: cannot leave the SO_REUSEPORT group (%s)", slot.index, e)

    def shutdown(self) -> None:
        self.ready = False
        self.leave_reuseport_group()
        self.source.stop()
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for host in self.hosts:
            if host.proc is None:
                continue
            try:
                host.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it",
                            host.name(), host.proc.pid)
                host.proc.kill()
                host.proc.wait()
            if host.proc.returncode:
                log.warning("%s exited with status %s", host.name(), host.proc.returncode)
        self.close()
        log.info("stopped")
        if self.log_relay:
            self.log_relay.close()

    def close(self) -> None:
        if self.prober is not None:
            self.prober.close()
            self.prober = None
        for listener in self.http:
            listener.close()
        self.http = []
        self.publisher.close()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        if self.forwarding is not None:
            self.forwarding.close()
        for slot in self.slots:
            slot.udp.close()
            slot.tcp.close()
        if self.counters is not None:
            self.counters.close()
            self.counters = None
        if self.counters_fd >= 0:
            os.close(self.counters_fd)
            self.counters_fd = -1
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1


def serve(cfg: ServeConfig) -> int:
    """Load the first image, start, and run until SIGTERM/SIGINT. StartError/LoadError
    escape before any worker was started."""
    tune_malloc()               # before the model and the first compile allocate
    source = make_source(cfg)
    first = source.first()
    sup = Supervisor(cfg, source)
    sup.start(first)
    del first                   # the workers' shared mapping is the copy that serves
    release_memory()
    return sup.run()
