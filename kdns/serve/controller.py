"""The controller: API events -> cluster model -> records -> compiled image -> published image.

Why: kdns must keep its zone equal to the API's state with a small delay, never a
wrong answer, whatever the API server does. This is the one place that wires the pieces:
the watchers (``sources/api.py``) hand every object to ``ModelSink``; one compiler thread
owns the ``ClusterModel``, applies the events in order, and after a short debounce compiles
a new image and hands it to the supervisor, which publishes it through its usual path
(``publish.Publisher`` on its main thread). The controller owns "synced": until every
watcher has listed once, the image is compiled with ``synced=False`` (cluster names answer
SERVFAIL, never a false NXDOMAIN) and /readiness stays 503; afterwards it is ready and stays
ready through API outages, serving the last good image while the watchers reconnect.

Threads: watcher threads only enqueue (cheap, stamped with the time the event was seen); the
compiler thread is the model's only reader and writer, so no lock guards the model and a
compile never sees half an update. Compiling off the supervisor's main thread keeps it
supervising workers and answering probes while a large cluster compiles.

Coalescing: a change makes the model dirty; the compile starts once ``settle`` seconds have
passed since the first pending change and the events paused for ``quiet`` seconds, or at
the latest ``max_delay`` after the first one. Events that arrive during a compile wait for
the next one, so a rolling update of hundreds of EndpointSlices costs a handful of compiles,
and one change costs ``settle`` plus one compile.

Programming latency (CoreDNS's ``coredns_kubernetes_dns_programming_duration_seconds``):
from the moment a watcher handed us the event to the moment every worker serves an image
containing it (the workers' ``image_generation`` reached that image's generation).

The compiler is pluggable (``Compiler``): it receives the model and the keys changed since
the last compile. The API controller uses ``incremental.IncrementalCompiler``, which
re-derives only the services those keys touch (about 40 ms a compile at 10,000 services and
100,000 endpoints, against about a second for ``FullCompiler``) and makes the same bytes.

What it must not do: touch sockets or the packet path, parse DNS, talk HTTP itself (the
watchers do), or publish from its own thread (the supervisor's main thread publishes).
"""
from __future__ import annotations

import bisect
import collections
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from kdns import settings as kdns_settings
from kdns.packet import engine
from kdns.serve import publish
from kdns.serve.memory import release_memory
from kdns.serve import build
from kdns.kube.model import NAMESPACE, ClusterModel

log = logging.getLogger("kdns.serve.controller")

# CoreDNS plugin/kubernetes/metrics.go: ExponentialBuckets(0.001, 2, 20), 1 ms to ~9 min.
LATENCY_BUCKETS = tuple(0.001 * 2 ** i for i in range(20))
# Watchers block (back-pressure on their HTTP stream) when this many events wait unapplied,
# so a compiler that falls behind cannot make raw API dicts pile up (no two copies).
MAX_PENDING = 5_000         # ten list pages of the watchers' default 500
# After a compile, once the events have paused this long, give its transient memory back
# (the PSS budget) without costing a busy stream any latency.
TRIM_AFTER_IDLE = 1.0

SERVICE_KINDS = ("cluster_ip", "headless_with_selector", "headless_without_selector")
# Latency stamps kept per compile; a relist touching 100,000 objects is one observation each
# up to this many, the rest are dropped rather than held.
MAX_STAMPS = 50_000


@dataclass(frozen=True, kw_only=True)
class Debounce:
    settle: float = 0.005      # wait at least this long after the first pending change
    quiet: float = 0.005       # ... and for the events to pause this long
    max_delay: float = 0.1     # ... but never longer than this after the first change


# --------------------------------------------------------------------------- compilers


class Compiler(Protocol):
    def compile(self, model: ClusterModel, *, synced: bool, changed: set) -> bytes:
        """Image bytes for ``model``; ``changed`` holds (kind, namespace, name) of every object
        changed since the previous call (empty on the first), for incremental compilers."""


class FullCompiler:
    """The whole zone from the whole model on every change (the reference for
    ``IncrementalCompiler``, and what it falls back to)."""

    def __init__(self, *, domain: str = kdns_settings.DOMAIN, ttl: int = kdns_settings.TTL,
                 pods: str = kdns_settings.PODS, endpoint_pod_names: bool = False, hosts=None,
                 rewrites=(), autopath=None):
        self.options = {"domain": domain, "ttl": ttl, "pods": pods,
                        "endpoint_pod_names": endpoint_pod_names, "autopath": autopath}
        self.hosts = hosts              # forward.hosts.HostsBox or None
        self.rewrites = tuple(rewrites)  # forward.rewrite.NameRule

    def compile(self, model: ClusterModel, *, synced: bool, changed: set) -> bytes:
        return build.compile_model(model, synced=synced, hosts=self.hosts and self.hosts.records,
                                   rewrites=self.rewrites,
                                   **self.options)


# --------------------------------------------------------------------------- latency histogram


class Histogram:
    """Cumulative-bucket histogram read by the metrics code (Prometheus shape, no labels):
    ``snapshot()`` -> (bucket upper bounds, cumulative counts, sum, count)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)     # last one: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        self.recent: collections.deque = collections.deque(maxlen=100_000)   # for bench/tests

    def observe_many(self, values) -> None:
        with self._lock:
            for v in values:
                self._counts[bisect.bisect_left(self.buckets, v)] += 1
                self._sum += v
                self.recent.append(v)

    def prometheus_pairs(self) -> tuple[list, float]:
        """([(le text, cumulative count)... ending with +Inf], sum) as prometheus_client's
        HistogramMetricFamily.add_metric takes them."""
        buckets, cumulative, total, count = self.snapshot()
        return [(repr(b), c) for b, c in zip(buckets, cumulative)] + [("+Inf", count)], total

    def snapshot(self) -> tuple[tuple, list, float, int]:
        with self._lock:
            cumulative, total = [], 0
            for c in self._counts:
                total += c
                cumulative.append(total)
            return self.buckets, cumulative[:-1], self._sum, total


# --------------------------------------------------------------------------- the sink


class _Inbox:
    """Events from watcher threads to the compiler thread, in order, stamped on arrival."""

    def __init__(self, limit: int = MAX_PENDING):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._limit = limit
        self.closed = False

    def put(self, item: tuple) -> None:
        with self._cond:
            while len(self._items) >= self._limit and not self.closed:
                self._cond.wait(0.5)
            self._items.append(item)
            self._cond.notify_all()

    def nudge(self) -> None:
        """Wake the compiler thread without ever blocking (the supervisor's thread calls it)."""
        with self._cond:
            self._items.append(("nudge", None, None, 0.0))
            self._cond.notify_all()

    def take(self, timeout: float) -> list:
        with self._cond:
            if not self._items and timeout > 0 and not self.closed:
                self._cond.wait(timeout)
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class ModelSink:
    """``sources.api.EventSink`` for the controller: every call is queued for the compiler
    thread with the monotonic time it was seen (the start of its programming latency)."""

    def __init__(self, inbox: _Inbox, clock: Callable[[], float] = time.monotonic):
        self._inbox, self._clock = inbox, clock

    def relist_begin(self, kind: str) -> None:
        self._inbox.put(("begin", kind, None, self._clock()))

    def apply(self, kind: str, obj: dict) -> None:
        self._inbox.put(("apply", kind, obj, self._clock()))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._inbox.put(("delete", kind, (namespace, name), self._clock()))

    def relist_end(self, kind: str) -> None:
        self._inbox.put(("end", kind, None, self._clock()))

    def synced(self, kind: str) -> None:
        self._inbox.put(("synced", kind, None, self._clock()))


def object_key(kind: str, obj: dict) -> tuple[str, str]:
    """The model's key of an API object (cluster.py keys Namespaces by ("", name) and gives
    namespaced objects without one the default namespace, as kubectl omits it)."""
    meta = obj.get("metadata") or {}
    if kind == NAMESPACE:
        return "", meta.get("name") or ""
    return meta.get("namespace") or "default", meta.get("name") or ""


# --------------------------------------------------------------------------- the controller


class Controller:
    """Owns the model, the compiler thread, "synced", and the hand-off to the supervisor.

    ``needed``: how many ``synced`` calls mean "every watcher listed once" (one per watcher).
    The supervisor side is ``poll`` / ``published`` / ``bind`` / ``ready_generation``.
    """

    path = "the Kubernetes API"     # how the supervisor's log lines name this source
    push = True                     # we wake the supervisor's loop; it polls us every iteration
    # Controller.freeze: only in a process that is kdns (the server sets it), never in a
    # process that embeds a controller among other objects (tests).
    freeze_after_sync = False

    def __init__(self, *, compiler: Compiler, needed: int, debounce: Debounce = Debounce(),
                 initial_sync_timeout: float = kdns_settings.INITIAL_SYNC_TIMEOUT, model: ClusterModel | None = None,
                 describe_waiting: Callable[[], str] = lambda: "",
                 clock: Callable[[], float] = time.monotonic):
        self.model = model or ClusterModel()
        self.compiler = compiler
        self.needed = needed
        self.debounce = debounce
        self.initial_sync_timeout = initial_sync_timeout
        self.describe_waiting = describe_waiting
        self.clock = clock
        self.inbox = _Inbox()
        self.sink = ModelSink(self.inbox, clock)
        self.latency = Histogram()                 # every change
        # CoreDNS's service_kind label; Namespace and Pod changes are only in ``latency``.
        self.latency_by_kind = {k: Histogram() for k in SERVICE_KINDS}
        # -- compiler thread state
        self._synced_kinds: list[str] = []
        self._seen: dict[str, set] = {}            # kind -> keys applied since relist_begin
        self._slice_service: dict = {}             # EndpointSlice key -> its service's name
        self._dirty_since: float | None = None     # first pending change
        self._last_event = 0.0
        self._changed: set = set()
        self._stamps: list[tuple[float, str | None]] = []   # (seen at, service_kind)
        self._started = clock()
        self._trim_at: float | None = None
        self._next_sync_warning = self._started + initial_sync_timeout
        # -- shared with the supervisor's thread, under _lock
        self._lock = threading.Lock()
        self._outbox: tuple | None = None          # (image, synced, stamps)
        self._handed: tuple | None = None          # (synced, stamps) of the image poll returned
        self._awaiting: list[tuple[int, list]] = []
        self._ready_generation = 0
        self._wake: Callable[[], None] = lambda: None
        self._served: Callable[[], int] | None = None
        self._served_at: Callable[[], float] | None = None
        # -- counters for metrics and tests (read without a lock: plain ints and floats)
        self.compiles = 0
        self.compile_seconds_last = 0.0
        self.compile_seconds_total = 0.0
        self.events = 0
        self.synced_at: float | None = None
        self.last_published_at: float | None = None
        self.steps = 0          # compiler-thread passes done: tests wait on it, never sleep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- supervisor side ------------------------------------------------------------------
    def first(self) -> bytes:
        """The image to start with (nothing synced yet: SERVFAIL for cluster names); starts
        the compiler thread."""
        image = self.compiler.compile(self.model, synced=False, changed=set())
        self.start()
        return image

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kdns-compiler", daemon=True)
        self._thread.start()

    def bind(self, *, wake: Callable[[], None], served_generation: Callable[[], int],
             served_at: Callable[[], float] | None = None) -> None:
        """``wake``: make the supervisor poll soon; ``served_generation``: the lowest image
        generation any worker serves (latency ends when it reaches an image's);
        ``served_at``: when a worker last swapped (monotonic seconds), the end of the latency
        when it is earlier than the moment this thread looks (it may be busy compiling)."""
        with self._lock:
            self._wake, self._served = wake, served_generation
            self._served_at = served_at
            if self._outbox is not None:
                wake()

    def poll(self, force: bool = False) -> bytes | None:
        """A new image to publish, or None (cheap: the loop calls it every iteration)."""
        with self._lock:
            if self._outbox is None:
                return None
            image, synced, stamps = self._outbox
            self._outbox = None
            if self._handed is not None:       # the last one was not published (identical)
                stamps = self._handed[1] + stamps
            self._handed = (synced, stamps)
            return image

    def published(self, generation: int) -> None:
        """The supervisor published the image ``poll`` returned as ``generation``."""
        with self._lock:
            if self._handed is None:
                return
            synced, stamps = self._handed
            self._handed = None
            self._awaiting.append((generation, stamps))
            first = synced and not self._ready_generation
            if first:
                self._ready_generation = generation
        if first:
            self.freeze()
        self.last_published_at = self.clock()
        self.inbox.nudge()      # the compiler thread watches the workers switch (latency)

    def freeze(self) -> None:
        """Move what the first sync built (the cluster model, the compiler's state: hundreds
        of thousands of objects that live as long as kdns) out of the cyclic collector's
        generations (gc.freeze). A full collection otherwise walks all of them, 0.1-0.3 s
        with every thread stopped at 100,000 endpoints, several times a minute under churn,
        and finds almost nothing: these objects are freed by reference counting when the
        cluster drops them. Objects made after this are collected as before."""
        if self.freeze_after_sync:
            gc.freeze()

    @property
    def ready_generation(self) -> int:
        """0 until the first synced image is published; then its generation (/readiness once
        every worker serves it, and for good: outages keep the last good image)."""
        return self._ready_generation

    @property
    def changes_pending(self) -> bool:
        """A change the compiler thread took in is not compiled yet (read-only; for tests and
        debugging: with ``image_waiting`` it says a burst has been compiled)."""
        return self._dirty_since is not None

    @property
    def image_waiting(self) -> bool:
        """A compiled image waits for the supervisor's ``poll`` (read-only; tests)."""
        return self._outbox is not None

    def hosts_changed(self) -> None:
        """The custom records (the compiler's HostsBox) changed: compile them in, after the
        debounce as any change (the supervisor's thread calls it; it never blocks long)."""
        self.inbox.put(("hosts", None, None, self.clock()))

    def stop(self, timeout: float = 1.0) -> None:
        # A compile in progress cannot be interrupted; the thread is a daemon, so shutdown
        # (and the end of a lameduck) waits at most ``timeout`` for it.
        self._stop.set()
        self.inbox.close()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- compiler thread ------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return len(self._synced_kinds) >= self.needed

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:       # a bug must not freeze the zone for good; log and go on
                log.exception("controller: unexpected error; continuing")
                self._stop.wait(0.5)

    def _step(self) -> None:
        for op in self.inbox.take(self._timeout()):
            self._apply(*op)
        self._observe_served()
        now = self.clock()
        if not self.synced and now >= self._next_sync_warning:
            self._warn_not_synced(now)
        if self._due(now):
            self._compile()
            self._trim_at = self.clock() + TRIM_AFTER_IDLE
        elif self._trim_at is not None and self._dirty_since is None and now >= self._trim_at \
                and now >= self._last_event + TRIM_AFTER_IDLE:
            self._trim_at = None
            idle = getattr(self.compiler, "idle", None)
            if idle is not None:
                idle()
            release_memory()
        self.steps += 1

    def _timeout(self) -> float:
        now = self.clock()
        if self._dirty_since is not None and self.synced:
            due = max(self._dirty_since + self.debounce.settle, self._last_event + self.debounce.quiet)
            due = min(due, self._dirty_since + self.debounce.max_delay)
            return max(0.0, due - now)
        if self._awaiting:
            return 0.001            # watching for the workers to switch: the latency's end
        if self._trim_at is not None:
            return max(0.0, min(0.5, max(self._trim_at, self._last_event + TRIM_AFTER_IDLE) - now))
        return 0.5

    def _due(self, now: float) -> bool:
        if self._dirty_since is None or not self.synced:
            return False
        if now >= self._dirty_since + self.debounce.max_delay:
            return True
        return (now >= self._dirty_since + self.debounce.settle
                and now >= self._last_event + self.debounce.quiet)

    def _apply(self, op: str, kind, arg, seen_at: float) -> None:
        model = self.model
        if op == "apply":
            key = object_key(kind, arg)
            if kind == "EndpointSlice":       # for the latency label (_service_kind)
                labels = (arg.get("metadata") or {}).get("labels") or {}
                self._slice_service[key] = labels.get("kubernetes.io/service-name", "")
            if kind in self._seen:
                self._seen[kind].add(key)
            self._changed_if(model.apply(arg), kind, key, seen_at)
        elif op == "delete":
            self._changed_if(model.delete(kind, *arg), kind, arg, seen_at)
        elif op == "begin":
            # A begin without an end (a list failed half-way) restarts the set: objects applied
            # before are current data and the new list will apply them again.
            self._seen[kind] = set()
        elif op == "end":
            # A relist drops what it did not see (deleted while we were away) without
            # holding a second copy of the list: only the keys seen since relist_begin.
            seen = self._seen.pop(kind, set())
            for key in [k for k in model.keys(kind) if k not in seen]:
                self._changed_if(model.delete(kind, *key), kind, key, seen_at)
        elif op == "synced":
            self._synced_kinds.append(kind)
            if self.synced:
                self.synced_at = self.clock()
                log.info("synced: every watched resource listed once (%.2fs after start); "
                         "%d services, %d endpoint slices, %d namespaces, %d pods",
                         self.synced_at - self._started, model.count("Service"),
                         model.count("EndpointSlice"), model.count("Namespace"),
                         model.count("Pod"))
                self._mark_dirty(seen_at)     # the first synced image, even for an empty cluster
        elif op == "hosts":
            self._mark_dirty(seen_at)         # the custom records changed: compile them in

    def _changed_if(self, changed: bool, kind: str, key, seen_at: float) -> None:
        if not changed:
            return
        self.events += 1
        self._changed.add((kind, *key))
        # Before the first sync there is nothing to program (CoreDNS, too, starts measuring
        # after its initial list); afterwards every change is one latency observation.
        if self.synced and len(self._stamps) < MAX_STAMPS:
            self._stamps.append((seen_at, self._service_kind(kind, key)))
        self._mark_dirty(seen_at)

    def _mark_dirty(self, seen_at: float) -> None:
        now = self.clock()
        if self._dirty_since is None:
            self._dirty_since = now
        self._last_event = now

    def _compile(self) -> None:
        changed, stamps = self._changed, self._stamps
        self._changed, self._stamps, self._dirty_since = set(), [], None
        started = self.clock()
        try:
            image = self.compiler.compile(self.model, synced=True, changed=changed)
            # The layout is checked (bad magic, length or any offset outside raise), as each
            # worker checks it again before swapping. The crc32, which guards image files in
            # transit, is not recomputed over bytes made right here: ~8 ms of a 30 MiB image
            # on every change's latency.
            engine.Image(image.map if isinstance(image, publish.ImageMemfd) else image)
        except Exception:
            # Keep serving the last good image; the next change retries (the model is fine).
            log.exception("controller: compile failed; still serving the last good image")
            return
        took = self.clock() - started
        self.compiles += 1
        self.compile_seconds_last = took
        self.compile_seconds_total += took
        log.debug("compiled %d bytes in %.3fs (%d changes)", len(image), took, len(changed))
        with self._lock:
            if self._outbox is not None:         # not taken yet: this one replaces it
                stamps = self._outbox[2] + stamps
                if isinstance(self._outbox[0], publish.ImageMemfd):
                    self._outbox[0].close()
            self._outbox = (image, True, stamps)
            wake = self._wake
        wake()

    def _observe_served(self) -> None:
        with self._lock:
            if not self._awaiting or self._served is None:
                return
            try:
                served = self._served()
            except (ValueError, OSError, TypeError):    # counters unmapped at shutdown
                return
            done = [a for a in self._awaiting if a[0] <= served]
            self._awaiting = [a for a in self._awaiting if a[0] > served]
            served_at = self._served_at
        if done:
            now = self.clock()
            if served_at is not None:
                # Every worker switched to these images after they were published, so after
                # their events were seen: the last swap bounds the end from above.
                try:
                    swapped = served_at()
                except (ValueError, OSError, TypeError):     # counters unmapped at shutdown
                    swapped = 0.0
                if swapped > 0:
                    now = min(now, swapped)
            observed = [(now - t, k) for _, stamps in done for t, k in stamps]
            self.latency.observe_many(v for v, _ in observed)
            for kind, hist in self.latency_by_kind.items():
                hist.observe_many(v for v, k in observed if k == kind)

    def _service_kind(self, kind: str, key) -> str | None:
        """CoreDNS's label for a change of this object (service_kind); None for kinds CoreDNS
        does not measure. The slim model keeps no selector: a headless service counts as
        ``headless_with_selector`` (EndpointSlices managed by Kubernetes imply one)."""
        if kind == "Service":
            svc = self.model.service(*key)
        elif kind in ("EndpointSlice", "Endpoints"):
            svc = self.model.service(key[0], self._slice_service.get(key, key[1]))
        else:
            return None
        return "headless_with_selector" if svc is not None and svc.headless else "cluster_ip"

    def _warn_not_synced(self, now: float) -> None:
        # --initial-sync-timeout logs loudly and keeps trying; a crash loop would only
        # add restarts to whatever keeps the API unreachable.
        log.error("not synced with the Kubernetes API %.0fs after start (waiting for: %s); "
                  "not ready, cluster names answer SERVFAIL. Still trying; check "
                  "--kubecfg-file/--kube-master-url, the network to the API server, and "
                  "RBAC (deploy/rbac.yaml).", now - self._started,
                  self.describe_waiting() or "the first list")
        self._next_sync_warning = now + max(self.initial_sync_timeout, 1.0)

    # ---- metrics getters (rendered by kdns/observe/metrics.py through the supervisor) ----------------
    def programming_histograms(self) -> dict:
        """{service_kind: ([(le, cumulative count)..., ("+Inf", count)], sum)} for
        coredns_kubernetes_dns_programming_duration_seconds."""
        return {kind: h.prometheus_pairs() for kind, h in self.latency_by_kind.items()}

    def staleness_seconds(self) -> float:
        return 0.0

    def relists(self) -> int:
        return 0

    def status(self) -> dict:
        """Plain numbers for kdns_* metrics: see ``ApiController.status``."""
        return {"synced": self.synced, "compiles": self.compiles,
                "compile_seconds_last": self.compile_seconds_last,
                "compile_seconds_total": self.compile_seconds_total,
                "changes": self.events, "ready_generation": self._ready_generation,
                "objects": {k: self.model.count(k) for k in
                            ("Service", "EndpointSlice", "Endpoints", "Namespace", "Pod")}}


class ApiController(Controller):
    """The controller fed by the Kubernetes API (``kdns serve`` without --from-file)."""

    def __init__(self, *, connection, pods: str = kdns_settings.PODS,
                 domain: str = kdns_settings.DOMAIN, ttl: int = kdns_settings.TTL,
                 initial_sync_timeout: float = kdns_settings.INITIAL_SYNC_TIMEOUT,
                 debounce: Debounce = Debounce(), settings=None,
                 endpoint_pod_names: bool = False, hosts=None, rewrites=(), autopath=None):
        from kdns.kube import api as source
        from kdns.serve.incremental import IncrementalCompiler
        if kdns_settings.ENV.full_compile:
            # The reference compile on every change: an escape hatch, and the "before" of
            # bench/bench_api_scale.py --full-compile.
            compiler = FullCompiler(domain=domain, ttl=ttl, pods=pods,
                                    endpoint_pod_names=endpoint_pod_names, hosts=hosts,
                                    rewrites=rewrites, autopath=autopath)
        else:
            compiler = IncrementalCompiler(domain=domain, ttl=ttl, pods=pods, into_memfd=True,
                                           endpoint_pod_names=endpoint_pod_names, hosts=hosts,
                                           rewrites=rewrites, autopath=autopath)
        super().__init__(compiler=compiler, needed=0,
                         debounce=debounce, initial_sync_timeout=initial_sync_timeout,
                         describe_waiting=self._waiting)
        self.source = source.ApiSource(connection=connection, sink=self.sink,
                                       pods=pods == "verified" or autopath is not None,
                                       settings=settings)
        self.needed = len(self.source.watchers)

    @classmethod
    def from_config(cls, cfg) -> "ApiController":
        from kdns.kube.connection import ConnectionConfigError, connect
        try:
            # Resolved by the kubernetes client in a child process: its package never
            # stays imported here (kdns/kube/connection.py).
            conn = connect(cfg.kubecfg_file or "", cfg.kube_master_url or "")
        except ConnectionConfigError as e:
            hint = "" if cfg.kubecfg_file or cfg.kube_master_url else (
                " (or serve objects from a file with --from-file)")
            raise ConnectionConfigError(f"{e}{hint}") from None
        from kdns.kube.api import WatchSettings
        try:
            watch = WatchSettings.from_text(kdns_settings.ENV.watch_settings)
        except ValueError as e:
            raise ConnectionConfigError(str(e)) from None
        return cls(connection=conn, pods=cfg.pods, domain=cfg.domain, ttl=cfg.ttl,
                   initial_sync_timeout=cfg.initial_sync_timeout, settings=watch,
                   endpoint_pod_names=getattr(cfg, "endpoint_pod_names", False),
                   hosts=getattr(cfg, "hosts", None), rewrites=getattr(cfg, "rewrites", ()),
                   autopath=getattr(cfg, "autopath", None))

    def start(self) -> None:
        super().start()
        self.source.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.source.stop(timeout=timeout)
        super().stop(min(timeout, 1.0))

    def _waiting(self) -> str:
        parts = []
        for st in self.source.status():
            if not st["synced"]:
                parts.append(st["kind"] + (f" (last error: {st['last_error']})"
                                           if st["last_error"] else ""))
        return ", ".join(parts)

    # ---- metrics getters -------------------------------------------------------------------
    def staleness_seconds(self) -> float:
        """Seconds the served data may lag the API: for a watcher failing since its last good
        contact, the time since that contact (an outage serves the last good image
        and says how stale it is); 0 while every watcher is connected, and before the first
        sync (nothing from the API is served yet)."""
        if not self.ready_generation:
            return 0.0
        now, worst = time.monotonic(), 0.0
        for st in self.source.status():
            contact, failed = st["last_contact"], st.get("last_error_at")
            if contact is not None and failed is not None and failed > contact:
                worst = max(worst, now - contact)
        return worst

    def relists(self) -> int:
        """Lists done by all watchers, the first ones included (410 Gone, fallbacks)."""
        return sum(w.relists for w in self.source.watchers)

    def status(self) -> dict:
        """For kdns_* metrics and debugging: the controller's numbers, ``staleness`` and
        ``relists``, plus per watched kind ``synced``, ``last_contact`` (monotonic),
        ``since_contact`` (seconds since the API last answered it), ``relists``, ``rejected``
        and ``last_error``."""
        out = super().status()
        now = time.monotonic()
        watchers = []
        for st in self.source.status():
            contact = st["last_contact"]
            watchers.append({**st, "since_contact": None if contact is None else now - contact})
        out["watchers"] = watchers
        out["relists"] = self.relists()
        out["staleness"] = self.staleness_seconds()
        return out
