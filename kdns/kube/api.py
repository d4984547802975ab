"""Kubernetes objects from the API server: list, then watch, forever, through every failure.

Why: kdns must keep its zone equal to the API's state for months, across API restarts,
upgrades, throttling, compacted history and dropped connections, without ever serving a
false answer. This module keeps a local copy of each resource the DNS needs in step with the
API and hands every change to a sink (the controller's adapter to the cluster model) as soon
as it is parsed.

Shape (after kopf's ``watching.py``): three nested loops per resource —
``ResourceWatcher.run`` (forever: survive anything, back off) → ``_list_then_watch`` (one
consistent list, then watches resuming from the last seen resourceVersion) →
``_watch_once`` (one HTTP stream of events). A 410 Gone/Expired anywhere means "your version
is no longer in the API's history": relist, and let the sink drop what the relist did not
see (objects deleted while we were away).

Transport: ``connection.ApiConnection`` (urllib3, with the credentials the official
``kubernetes`` client's loaders resolved, kept current); this module only builds the query
and parses the JSON itself, streaming, so a relist of 100,000 objects never exists twice in
memory (pages of ``page_size`` objects go to the sink one by one).

Sink contract (``EventSink``), calls serialised by ``ApiSource`` (never concurrent):

- ``relist_begin(kind)`` … ``apply(kind, obj)`` for every listed object … ``relist_end(kind)``:
  at ``relist_end`` the sink removes every object of ``kind`` not applied since the matching
  ``relist_begin``. A ``relist_begin`` may be followed by another ``relist_begin`` without an
  end (the list failed half-way and restarts); objects applied in between are current data.
- ``apply(kind, obj)``: object added or changed (a parsed API dict with ``kind`` and
  ``apiVersion`` set, also for list items, which the API sends without them).
- ``delete(kind, namespace, name)``: object deleted (namespace is "" for Namespaces).
- ``synced(kind)``: called once per watcher, after its first complete list. The EndpointSlice
  watcher reports ``"Endpoints"`` instead when it fell back to v1 Endpoints, so "ready" means
  one ``synced`` per entry of ``ApiSource.watchers``.

``kind`` is the API kind: Service, EndpointSlice, Endpoints, Namespace, Pod. The sink owns
each dict it is given (the source keeps no reference). An exception from ``apply``/``delete``
is logged and that object skipped: one object the model rejects must not stall every other
update. When the EndpointSlice watcher falls back, it first empties the EndpointSlice kind
(``relist_begin`` + ``relist_end`` with nothing in between).

What it must not do: build DNS names, slim or judge objects (the cluster model does), import
the compiler or anything of the packet path, or retry without backing off.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import urllib3

log = logging.getLogger("kdns.kube.api")


class EventSink(Protocol):
    """Where the API's objects go; see the module docstring for the contract."""

    def relist_begin(self, kind: str) -> None: ...

    def apply(self, kind: str, obj: dict) -> None: ...

    def delete(self, kind: str, namespace: str, name: str) -> None: ...

    def relist_end(self, kind: str) -> None: ...

    def synced(self, kind: str) -> None: ...


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    path: str           # cluster-wide collection path
    api_version: str


SERVICES = Resource("Service", "services", "/api/v1/services", "v1")
ENDPOINT_SLICES = Resource("EndpointSlice", "endpointslices",
                           "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1")
ENDPOINTS = Resource("Endpoints", "endpoints", "/api/v1/endpoints", "v1")
NAMESPACES = Resource("Namespace", "namespaces", "/api/v1/namespaces", "v1")
PODS = Resource("Pod", "pods", "/api/v1/pods", "v1")


@dataclass(frozen=True, kw_only=True)
class WatchSettings:
    page_size: int = 500
    # Jittered per stream so that many kdns replicas do not reconnect in lock-step after an
    # API server restart (client-go's reflector uses 5-10 min; kube-apiserver caps at 30).
    watch_timeout: tuple[float, float] = (240.0, 360.0)
    # A stream silent for timeoutSeconds + this long is dead (half-open TCP, stuck proxy):
    # the server would have ended it by now.
    read_slack: float = 30.0
    connect_timeout: float = 10.0
    list_read_timeout: float = 60.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 120.0
    # A watch that ends cleanly this fast having delivered nothing counts as a failure, so a
    # proxy closing every stream at once cannot turn the loop hot.
    min_stream_seconds: float = 1.0
    # Stream the initial state as watch events (WatchList: sendInitialEvents=true) when the
    # API server supports it: served from its watch cache, one object at a time, instead of
    # list pages. Servers without it are detected on the first try and listed instead.
    watch_list: bool = True

    @classmethod
    def from_text(cls, text: str | None) -> "WatchSettings":
        """Defaults, overridden by ``KDNS_WATCH_SETTINGS`` (``settings.ENV.watch_settings``: a
        JSON object of these fields, in seconds) when set. A hook for tests and experiments: a
        test that stops the fake API sets a small backoff so reconnects land within a bound it
        can derive from the same numbers, instead of racing a jittered 30 s cap. ValueError
        names a bad field."""
        if not text:
            return cls()
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            if "watch_timeout" in fields:
                fields["watch_timeout"] = tuple(fields["watch_timeout"])
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"KDNS_WATCH_SETTINGS={text!r} is not valid ({e}); "
                             f"fix or unset it.") from None


class ApiError(Exception):
    """A non-2xx answer or an ERROR watch event, with the API's Status fields."""

    def __init__(self, status: int, reason: str = "", message: str = "", *,
                 retry_after: float | None = None):
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class Gone(ApiError):
    """410: the version we hold is older than the API's history; only a relist helps."""


_EXPIRED_MESSAGES = ("too old resource version", "required revision has been compacted")


class TransportError(Exception):
    """The connection failed, broke, or went silent (read timeout)."""


def _api_error(status: int, body: bytes, headers) -> ApiError:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    cls = Gone if status == 410 else ApiError
    return cls(status, str(doc.get("reason", "")), str(doc.get("message", body[:200])),
               retry_after=_retry_after(headers.get("Retry-After") if headers else None))


def _retry_after(value) -> float | None:
    # RFC 9110 §10.2.3 also allows an HTTP-date; the API server only sends delta-seconds.
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class Backoff:
    """Exponential backoff with jitter; ``reset`` after progress."""

    def __init__(self, *, base: float, cap: float, retry_after_cap: float,
                 rng: random.Random):
        self._base, self._cap, self._ra_cap, self._rng = base, cap, retry_after_cap, rng
        self.failures = 0

    def next_delay(self, *, retry_after: float | None = None) -> float:
        ceiling = min(self._cap, self._base * (2 ** min(self.failures, 30)))
        self.failures += 1
        # Half fixed, half random: spreads replicas apart but keeps a floor that grows.
        delay = self._rng.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            # 429/503: the server said when; never sooner, but keep growing if it repeats.
            delay = max(delay, min(retry_after, self._ra_cap))
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Fallback(Exception):
    """Internal: the primary resource is not readable here; switch to the fallback."""


class ResourceWatcher:
    """Keeps one resource in step with the API, delivering to ``sink``; runs in its thread."""

    def __init__(self, *, connection, resource: Resource, sink: EventSink,
                 stop: threading.Event, settings: WatchSettings | None = None,
                 fallback: Resource | None = None, rng: random.Random | None = None):
        self.connection = connection
        self.resource = resource
        self.fallback = fallback
        self.sink = sink
        self.stop = stop
        self.settings = settings or WatchSettings()
        self.rng = rng or random.Random()
        self.backoff = Backoff(base=self.settings.backoff_base, cap=self.settings.backoff_cap,
                               retry_after_cap=self.settings.retry_after_cap, rng=self.rng)
        self.resource_version: str | None = None
        self.synced = False
        self.last_contact: float | None = None     # monotonic time of the last good response
        self.last_error: str | None = None
        self.last_error_at: float | None = None    # monotonic; after last_contact = failing now
        self.relists = 0
        self.rejected = 0                          # objects the sink raised on
        self._events_since_list = 0
        self._listed: set[str] = set()             # kinds this watcher has ever listed
        # None until tried; False once the server showed it does not stream initial events.
        self.watch_list_supported: bool | None = None if self.settings.watch_list else False
        self._initial: bool = False                # inside a WatchList's initial events
        self._response = None
        self._response_lock = threading.Lock()

    # ---- loop 1: forever --------------------------------------------------------------------
    def run(self, *, iterations: int | None = None) -> None:
        """Until ``stop`` is set (or ``iterations`` list-then-watch cycles, for tests)."""
        while not self.stop.is_set() and (iterations is None or iterations > 0):
            iterations = None if iterations is None else iterations - 1
            try:
                self._list_then_watch()
            except _Fallback:
                self._switch_to_fallback()
            except Gone as e:
                # Relist at once after watching made progress; a 410 with no event since the
                # list means the API cannot serve our versions yet: back off, or we would
                # list in a tight loop.
                log.info("%s: %s; relisting", self.resource.kind, e)
                if not self._events_since_list:
                    self._pause(e)
            except (ApiError, TransportError) as e:
                self._pause(e)
            except Exception as e:      # a bug or a surprise must not end the watch for good
                log.exception("%s: unexpected error in the watch loop", self.resource.kind)
                self._pause(e)

    def interrupt(self) -> None:
        """Unblock a read in progress (used with ``stop`` for a prompt shutdown)."""
        with self._response_lock:
            resp = self._response
        if resp is not None:
            try:
                resp.shutdown()     # urllib3 >= 2.3: shuts the socket, so a blocked read returns
            except Exception:       # already closed, or an older urllib3: the read timeout ends it
                pass

    # ---- loop 2: list, then watch from the list's version ---------------------------------
    def _list_then_watch(self) -> None:
        if self.watch_list_supported is False or not self._watch_list():
            self._relist()
        while not self.stop.is_set():
            try:
                started, delivered = time.monotonic(), self._watch_once()
            except Gone:
                raise
            except (ApiError, TransportError) as e:
                self._pause(e)          # resume from the last version: no relist needed
                continue
            if self.stop.is_set():
                return
            if delivered or time.monotonic() - started >= self.settings.min_stream_seconds:
                self.backoff.reset()
            else:
                self._pause(TransportError("watch ended at once without events"))

    def _watch_list(self) -> bool:
        """The initial state as a watch stream (WatchList), then changes on the same stream.
        True once the initial events were delivered (the caller goes on watching from
        ``resource_version``, on a new stream); False when the server does not support it
        or the stream broke before the end of its initial events, so the caller lists. ``resourceVersion=""`` with NotOlderThan: the current state, from the watch
        cache; the server ends the initial events with a bookmark annotated
        ``k8s.io/initial-events-end``."""
        lo, hi = self.settings.watch_timeout
        timeout = max(1, round(self.rng.uniform(lo, hi)))
        query = [("watch", "true"), ("sendInitialEvents", "true"),
                 ("allowWatchBookmarks", "true"), ("resourceVersionMatch", "NotOlderThan"),
                 ("resourceVersion", ""), ("timeoutSeconds", timeout)]
        try:
            resp = self._request(query, read_timeout=self.settings.list_read_timeout)
        except ApiError as e:
            if e.status in (401, 429) or e.status >= 500:
                raise               # not an answer about WatchList: retry it later
            self._no_watch_list(f"the API server refused it ({e.status} {e.message})")
            return False
        kind = self.resource.kind
        self._events_since_list = 0
        self.sink.relist_begin(kind)
        self._listed.add(kind)
        self._initial = True
        deadline = time.monotonic() + self.settings.list_read_timeout
        try:
            for line in self._lines(resp, deadline=deadline):
                self._handle_event(line)
                if self._initial is None:       # a bookmark without the end annotation
                    self._no_watch_list("the API server sent no initial-events-end bookmark")
                    return False
                if not self._initial:
                    # Initial events done. The read timeout and deadline of a list do not
                    # suit a watch, so the caller watches afresh from this version.
                    self.backoff.reset()
                    return True
            why = "the stream ended before its initial-events-end bookmark"
        except TransportError as e:
            why = str(e)
        finally:
            self._release(resp)
            self._initial = False
        # Objects delivered so far stay until the list's relist_end settles them.
        log.info("%s: streaming the initial state failed (%s); listing instead",
                 self.resource.kind, why)
        return False

    def _no_watch_list(self, why: str) -> None:
        self.watch_list_supported = False
        log.info("%s: streaming the initial state (WatchList) is not available: %s; listing "
                 "from the watch cache instead", self.resource.kind, why)

    def _initial_events_end(self, meta: dict) -> None:
        kind = self.resource.kind
        self._initial = False
        self.watch_list_supported = True
        self.sink.relist_end(kind)
        self.resource_version = meta.get("resourceVersion") or self.resource_version
        self.relists += 1
        if not self.synced:
            self.synced = True
            self.sink.synced(kind)

    def _relist(self) -> None:
        kind, begun = self.resource.kind, False
        self._events_since_list = 0
        rv, token = None, None
        # From the API server's watch cache, never older than what we have seen: a quorum
        # read from etcd per list is what API server operators page about. Continue pages
        # carry no resourceVersion (the token holds the list's), as the API requires.
        since = self.resource_version or "0"
        while True:
            query = [("limit", self.settings.page_size)]
            if token:
                query.append(("continue", token))
            else:
                query += [("resourceVersion", since), ("resourceVersionMatch", "NotOlderThan")]
            try:
                page = self._get_json(query, read_timeout=self.settings.list_read_timeout)
            except ApiError as e:
                if token or since == "0" or "too large resource version" not in e.message.lower():
                    raise
                # A server behind what we saw (restored etcd, another cluster behind the
                # same address): its own current state, whatever its version.
                log.warning("%s: the API server is behind resourceVersion %s (%s); listing "
                            "its current state", kind, since, e.message)
                since = "0"
                continue
            if not begun:
                self.sink.relist_begin(kind)
                self._listed.add(kind)
                begun = True
            meta = page.get("metadata") or {}
            rv = rv or meta.get("resourceVersion")
            for obj in page.get("items") or ():
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", self.resource.api_version)
                self._deliver(self.sink.apply, kind, obj)
            del page                    # only one page of raw objects alive at a time
            token = meta.get("continue")
            if not token:
                break
        self.sink.relist_end(kind)
        self.resource_version = rv
        self.relists += 1
        if not self.synced:
            self.synced = True
            self.sink.synced(kind)

    # ---- loop 3: one watch stream ----------------------------------------------------------
    def _watch_once(self) -> int:
        """Stream events from ``resource_version`` until the server ends the stream; the
        number of events delivered. Raises Gone, ApiError or TransportError."""
        lo, hi = self.settings.watch_timeout
        timeout = max(1, round(self.rng.uniform(lo, hi)))
        query = [("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("resourceVersion", self.resource_version), ("timeoutSeconds", timeout)]
        read_timeout = timeout + self.settings.read_slack
        resp = self._request(query, read_timeout=read_timeout)
        deadline = time.monotonic() + read_timeout
        delivered = 0
        try:
            for line in self._lines(resp, deadline=deadline):
                self._handle_event(line)
                if not delivered:
                    # Progress: a break after this is a fresh failure, not the next step
                    # of an outage.
                    self.backoff.reset()
                delivered += 1
                self._events_since_list += 1
        finally:
            self._release(resp)
        return delivered

    def _handle_event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind_of_event, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError):
            raise TransportError(f"unparsable watch event: {line[:200]!r}") from None
        if kind_of_event == "ERROR":
            code, message = int(obj.get("code") or 500), str(obj.get("message", ""))
            # Old API servers report a compacted etcd revision as a 500; it means 410.
            expired = code == 410 or any(m in message for m in _EXPIRED_MESSAGES)
            raise (Gone if expired else ApiError)(code, str(obj.get("reason", "")), message)
        meta = obj.get("metadata") or {}
        kind = self.resource.kind
        if kind_of_event in ("ADDED", "MODIFIED"):
            obj.setdefault("kind", kind)
            obj.setdefault("apiVersion", self.resource.api_version)
            self._deliver(self.sink.apply, kind, obj)
        elif kind_of_event == "DELETED":
            self._deliver(self.sink.delete, kind, meta.get("namespace", ""),
                          meta.get("name", ""))
        elif kind_of_event != "BOOKMARK":
            log.warning("%s: ignoring watch event of unknown type %r", kind, kind_of_event)
            return
        elif self._initial:
            annotations = meta.get("annotations") or {}
            if annotations.get("k8s.io/initial-events-end") == "true":
                self._initial_events_end(meta)
            else:
                self._initial = None    # a server that ignored sendInitialEvents
            self.last_contact = time.monotonic()
            return
        # Resume point: a bookmark exists only to move it forward without an object change.
        self.resource_version = meta.get("resourceVersion") or self.resource_version
        self.last_contact = time.monotonic()

    def _deliver(self, method, kind: str, *args) -> None:
        # One object the sink cannot take (malformed, or a bug in the model) must not stop the
        # stream: it would come back in every relist and the watcher would never progress.
        try:
            method(kind, *args)
        except Exception as e:
            self.rejected += 1
            meta = args[0].get("metadata", {}) if isinstance(args[0], dict) else {}
            where = "/".join(filter(None, (meta.get("namespace"), meta.get("name")))) or (
                "/".join(filter(None, args)))
            log.warning("%s %s skipped: the sink rejected it (%s: %s)", kind, where,
                        type(e).__name__, e)

    def status(self) -> dict:
        """What the controller needs to report staleness and readiness."""
        return {"kind": self.resource.kind, "synced": self.synced,
                "resource_version": self.resource_version, "last_contact": self.last_contact,
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "relists": self.relists,
                "rejected": self.rejected}

    # ---- HTTP -------------------------------------------------------------------------------
    def _request(self, query: list, *, read_timeout: float):
        """GET the collection with the connection's auth/TLS; the open response or raise."""
        if self.stop.is_set():
            raise TransportError("stopping")
        try:
            resp = self.connection.get(self.resource.path, query,
                                       timeout=(self.settings.connect_timeout, read_timeout))
        except (urllib3.exceptions.HTTPError, OSError) as e:   # TLS errors included
            raise TransportError(f"{self.resource.path}: {e}") from None
        with self._response_lock:
            self._response = resp
        if self.stop.is_set():          # stop() ran while we were connecting: nothing to wait
            self._release(resp)
            raise TransportError("stopping")
        if resp.status != 200:
            try:
                body = resp.read(64 * 1024)
            except (urllib3.exceptions.HTTPError, OSError):
                body = b""
            self._release(resp)
            if resp.status in (403, 404) and self.fallback is not None:
                raise _Fallback
            raise _api_error(resp.status, body, resp.headers)
        self.last_contact = time.monotonic()
        return resp

    def _get_json(self, query: list, *, read_timeout: float) -> dict:
        resp = self._request(query, read_timeout=read_timeout)
        try:
            body = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransportError(f"{self.resource.path}: list broken: {e}") from None
        finally:
            self._release(resp)
        try:
            doc = json.loads(body)
        except ValueError:
            raise TransportError(f"{self.resource.path}: list body is not JSON") from None
        if not isinstance(doc, dict):
            raise TransportError(f"{self.resource.path}: list body is not an object")
        return doc

    def _lines(self, resp, *, deadline: float) -> Iterator[bytes]:
        """Newline-delimited JSON lines of a watch body as they arrive. A silent stream ends
        by urllib3's per-read timeout; a trickling one by ``deadline``."""
        buf = b""
        try:
            for chunk in resp.stream(64 * 1024):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line
                if time.monotonic() > deadline:
                    raise TransportError(f"{self.resource.path}: watch outlived its timeout")
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            if self.stop.is_set():
                return
            raise TransportError(f"{self.resource.path}: watch broken: {e}") from None
        if buf.strip():
            yield buf

    def _release(self, resp) -> None:
        with self._response_lock:
            if self._response is resp:
                self._response = None
        try:
            if not resp.isclosed():
                # Not read to its end (a stream we abandon): the connection cannot be reused,
                # so close it; draining a watch could block for minutes.
                resp.close()
        finally:
            resp.release_conn()

    # ---- failure handling -------------------------------------------------------------------
    def _pause(self, error: Exception) -> None:
        delay = self.backoff.next_delay(retry_after=getattr(error, "retry_after", None))
        self.last_error = str(error)
        self.last_error_at = time.monotonic()
        level = logging.WARNING if self.backoff.failures >= 3 else logging.INFO
        log.log(level, "%s: %s; retrying in %.1fs%s", self.resource.kind, error, delay,
                _hint(error, self.resource))
        self.stop.wait(delay)

    def _switch_to_fallback(self) -> None:
        old, self.resource, self.fallback = self.resource, self.fallback, None
        log.warning("%s are not readable (RBAC or API not served); using %s instead, which "
                    "loses dual-stack and endpoints beyond 1000 per service. Grant list/watch "
                    "on %s (deploy/rbac.yaml) to use them.", old.plural, self.resource.plural,
                    old.plural)
        if old.kind in self._listed:
            # Objects of the old kind are no longer watched: drop them rather than serve them
            # stale forever.
            self.sink.relist_begin(old.kind)
            self.sink.relist_end(old.kind)
        self.resource_version = None


def _hint(error: Exception, resource: Resource) -> str:
    status = getattr(error, "status", None)
    if status == 403:
        return (f" (kdns needs list and watch on {resource.plural}: apply deploy/rbac.yaml "
                "or bind the ServiceAccount to an equivalent ClusterRole)")
    if status == 401:
        return " (the API rejected the credentials: check the token or kubeconfig)"
    return ""


class _SerialSink:
    """One lock around the sink: watcher threads never call it concurrently."""

    def __init__(self, sink: EventSink):
        self._sink, self._lock = sink, threading.Lock()

    def relist_begin(self, kind: str) -> None:
        with self._lock:
            self._sink.relist_begin(kind)

    def apply(self, kind: str, obj: dict) -> None:
        with self._lock:
            self._sink.apply(kind, obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._sink.delete(kind, namespace, name)

    def relist_end(self, kind: str) -> None:
        with self._lock:
            self._sink.relist_end(kind)

    def synced(self, kind: str) -> None:
        with self._lock:
            self._sink.synced(kind)


class ApiSource:
    """All the watchers kdns needs, one thread each: Services, EndpointSlices (falling back
    to v1 Endpoints), Namespaces, and Pods only when ``pods`` (``--pods verified``)."""

    def __init__(self, *, connection, sink: EventSink, pods: bool = False,
                 settings: WatchSettings | None = None, rng: random.Random | None = None):
        self.stop_event = threading.Event()
        serial = _SerialSink(sink)
        rng = rng or random.Random()
        plan = [(SERVICES, None), (ENDPOINT_SLICES, ENDPOINTS), (NAMESPACES, None)]
        if pods:
            plan.append((PODS, None))
        self.watchers = [
            ResourceWatcher(connection=connection, resource=res, fallback=fb, sink=serial,
                            stop=self.stop_event, settings=settings,
                            rng=random.Random(rng.random()))
            for res, fb in plan]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for w in self.watchers:
            t = threading.Thread(target=w.run, name=f"kdns-watch-{w.resource.plural}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, timeout: float = 5.0) -> None:
        self.stop_event.set()
        for w in self.watchers:
            w.interrupt()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def synced(self) -> bool:
        return all(w.synced for w in self.watchers)

    @property
    def alive(self) -> bool:
        """Any watcher thread still running (read-only; tests check that stop ends them)."""
        return any(t.is_alive() for t in self._threads)

    def status(self) -> list[dict]:
        return [w.status() for w in self.watchers]
