"""A fake Kubernetes API server that speaks the real list/watch protocol, for tests.

Why: the API source (``kdns/kube/api.py``) must survive what a real API server does —
paginated lists, watch streams, bookmarks, compacted history (410 Gone), throttling, RBAC
refusals, dropped and stalled connections. Mocking the client would test our assumptions
about the protocol, not the protocol; this server lets the real ``kubernetes`` client talk
HTTP/1.1 to it over loopback, and lets a test reshape its state and inject faults.

What it is: a threaded HTTP/1.1 server on 127.0.0.1 (HTTPS with ``tls``, optionally asking
for client certificates) serving cluster-wide list and
watch for ``/api/v1/{services,endpoints,namespaces,pods}`` and
``/apis/discovery.k8s.io/v1/endpointslices``, plus the discovery documents. Semantics follow
https://kubernetes.io/docs/reference/using-api/api-concepts/:

- one global resourceVersion, bumped by every create/update/delete;
- lists carry ``metadata.resourceVersion`` (the snapshot) and ``metadata.continue``; pages of
  ``limit`` items come from a snapshot taken at the first page, so a paginated list is
  consistent; a continue token whose snapshot was compacted away gets 410 Expired;
- ``watch=true`` streams newline-delimited JSON events with chunked encoding: events after
  ``resourceVersion`` (synthetic ADDED for everything when it is absent or "0"), BOOKMARKs
  when ``allowWatchBookmarks=true``, an ERROR event carrying a 410 Status when the version is
  older than the compacted history, and a clean end after ``timeoutSeconds``;
- ``resourceVersion`` on a list with ``resourceVersionMatch=NotOlderThan`` (served "from the
  watch cache": at least that version, 504 "Too large resource version" beyond the current
  one); ``resourceVersion`` together with ``continue`` is a 400, as the API requires;
- WatchList (``watch=true&sendInitialEvents=true``, logged as verb ``watchlist``), per
  ``watch_list``: "on" streams the current state as ADDED events, then a BOOKMARK annotated
  ``k8s.io/initial-events-end: "true"``, then changes; "off" (the default, a server with the
  feature gate off) answers 422; "ignore" (a server that drops the parameter) serves a plain
  watch.

What it must not do: know anything about DNS or kdns; listen beyond loopback.
"""
from __future__ import annotations

import base64
import bisect
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    plural: str
    path: str
    kind: str
    api_version: str
    namespaced: bool


RESOURCES = {r.plural: r for r in (
    Resource("services", "/api/v1/services", "Service", "v1", True),
    Resource("endpoints", "/api/v1/endpoints", "Endpoints", "v1", True),
    Resource("namespaces", "/api/v1/namespaces", "Namespace", "v1", False),
    Resource("pods", "/api/v1/pods", "Pod", "v1", True),
    Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice",
             "discovery.k8s.io/v1", True),
)}
_BY_PATH = {r.path: r for r in RESOURCES.values()}


# ---- faults ---------------------------------------------------------------------------------
# Each fault is consumed by one request of the verb it was injected for ("list" or "watch").

@dataclass(frozen=True)
class HttpError:
    """Answer with this status and a Status body (e.g. 500, or 429 with Retry-After)."""
    code: int
    retry_after: int | None = None
    message: str = ""                   # the Status message; "injected <code>" when empty


@dataclass(frozen=True)
class Reset:
    """Watch: send ``after_events`` events, then drop the TCP connection (no chunk end).
    List: reset before any response byte."""
    after_events: int = 0


@dataclass(frozen=True)
class Gone:
    """Watch: send ``after_events`` events, then an ERROR event with a 410 Expired Status, as
    an API server does when its watch cache can no longer serve the stream."""
    after_events: int = 0


@dataclass(frozen=True)
class ErrorEvent:
    """Watch: send ``after_events`` events, then an ERROR event carrying ``status`` (the
    Status object's fields: code, reason, message), then end the stream."""
    status: dict
    after_events: int = 0


@dataclass(frozen=True)
class Stall:
    """Send the response headers, then nothing for ``seconds`` (or until the server closes),
    then drop the connection: a half-dead stream."""
    seconds: float = 30.0


@dataclass(frozen=True)
class Slow:
    """List: wait ``seconds`` before each page."""
    seconds: float


@dataclass
class Request:
    """One request as the server saw it, for tests that count calls or check parameters."""
    at: float
    verb: str            # "list", "watch", "watchlist", "discovery", "other"
    resource: str | None
    query: dict
    status: int = 0
    authorization: str | None = None
    client_cn: str | None = None        # the verified client certificate's CN, with TLS
    user_agent: str | None = None


@dataclass(frozen=True)
class Tls:
    """Serve HTTPS with this certificate and key (PEM files). With ``client_ca``, ask for a
    client certificate: one signed by that CA whose CN is ``client_cn`` authenticates the
    request instead of the token; an unsigned one fails the handshake."""
    cert: str
    key: str
    client_ca: str | None = None
    client_cn: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


@dataclass
class _History:
    rvs: list = field(default_factory=list)
    events: list = field(default_factory=list)   # (type, object), parallel to rvs


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_REASONS = {400: "BadRequest", 422: "Invalid", 504: "Timeout", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


class FakeApiServer:
    """Start with ``with FakeApiServer() as api:``; ``api.url`` is the base URL.

    State changes (``create``/``update``/``delete``) may be called from the test thread while
    clients list and watch; every change bumps the global resourceVersion and wakes watchers.
    """

    def __init__(self, *, token: str | None = None, bookmark_interval: float = 60.0,
                 watch_list: str = "off", tls: "Tls | None" = None):
        assert watch_list in ("on", "off", "ignore")
        self.token = token                      # None: no authentication required
        self.tls = tls
        self.watch_list = watch_list
        self.bookmark_interval = bookmark_interval
        self.forbidden: set[str] = set()        # plurals answered with 403 (RBAC)
        self.not_served: set[str] = set()       # plurals answered with 404 (API not served)
        self.down = False                       # set_down(True): an outage, see set_down
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._rv = 1
        self._compacted = 0                     # versions < this are gone from history
        self._objects: dict[str, dict] = {p: {} for p in RESOURCES}
        self._history: dict[str, _History] = {p: _History() for p in RESOURCES}
        self._snapshots: dict[tuple[str, int], list] = {}
        self._faults: dict[tuple[str, str], list] = {}
        self._bookmark_gen = 0
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self._httpd.ssl_context = tls.context() if tls else None
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="fakeapi")

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._httpd.shutdown()
        self.drop_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def set_down(self, down: bool) -> None:
        """An API outage: while down, open streams are reset and every new request
        is reset before any response byte; state changes still happen (and are in history)."""
        self.down = down
        if down:
            self.drop_connections()

    def drop_connections(self) -> None:
        """Reset every open client connection (an API server restart, seen from the client)."""
        with self._cond:
            conns = list(self._conns)
        for sock in conns:
            _reset(sock)

    # ---- state ------------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def atomically(self):
        """``with api.atomically():`` — changes made inside become visible to watchers at
        once (the state lock is re-entrant), so a test can make a gap no stream straddles."""
        return self._cond

    def create(self, plural: str, obj: dict) -> dict:
        return self._change(plural, obj, "ADDED")

    def update(self, plural: str, obj: dict) -> dict:
        return self._change(plural, obj, "MODIFIED")

    def delete(self, plural: str, namespace: str | None, name: str) -> dict:
        with self._cond:
            key = (namespace or "", name)
            old = self._objects[plural].pop(key)
            self._rv += 1
            gone = _with_rv(old, self._rv)
            self._record(plural, "DELETED", gone)
            return gone

    def create_many(self, plural: str, objs) -> None:
        """Bulk load (scale tests): one lock hold, one wake-up."""
        with self._cond:
            for obj in objs:
                self._put(plural, obj, "ADDED")
            self._cond.notify_all()

    def objects(self, plural: str) -> list[dict]:
        with self._cond:
            return [self._objects[plural][k] for k in sorted(self._objects[plural])]

    def compact(self) -> None:
        """Forget all history: watches and continue tokens from older versions now get 410."""
        with self._cond:
            self._compacted = self._rv
            for h in self._history.values():
                h.rvs.clear()
                h.events.clear()
            self._snapshots = {k: v for k, v in self._snapshots.items() if k[1] >= self._rv}

    def bookmark(self) -> None:
        """Ask every bookmark-enabled watch to send a BOOKMARK now."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def inject(self, plural: str, verb: str, fault, *, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests of ``verb`` ("list"/"watch")."""
        with self._cond:
            self._faults.setdefault((plural, verb), []).extend([fault] * times)

    def count(self, *, verb: str | None = None, resource: str | None = None) -> int:
        with self._cond:
            return sum(1 for r in self.requests
                       if (verb is None or r.verb == verb)
                       and (resource is None or r.resource == resource))

    def calls(self, *, verb: str, resource: str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.verb == verb and r.resource == resource]

    # ---- internals --------------------------------------------------------------------------
    def _change(self, plural: str, obj: dict, kind: str) -> dict:
        with self._cond:
            stored = self._put(plural, obj, kind)
            self._cond.notify_all()
            return stored

    def _put(self, plural: str, obj: dict, event: str) -> dict:
        meta = obj.get("metadata", {})
        key = (meta.get("namespace", "") if RESOURCES[plural].namespaced else "", meta["name"])
        exists = key in self._objects[plural]
        if (event == "ADDED") == exists:
            raise KeyError(f"{plural} {key}: {'exists' if exists else 'not found'}")
        self._rv += 1
        res = RESOURCES[plural]
        stored = _with_rv({**obj, "kind": res.kind, "apiVersion": res.api_version}, self._rv)
        self._objects[plural][key] = stored
        self._record(plural, event, stored)
        return stored

    def _record(self, plural: str, event: str, obj: dict) -> None:
        h = self._history[plural]
        h.rvs.append(self._rv)
        h.events.append((event, obj))
        self._cond.notify_all()

    def _take_fault(self, plural: str, verb: str):
        with self._cond:
            queue = self._faults.get((plural, verb))
            return queue.pop(0) if queue else None

    def _log(self, req: Request) -> None:
        with self._cond:
            self.requests.append(req)


def _with_rv(obj: dict, rv: int) -> dict:
    meta = dict(obj.get("metadata", {}))
    meta["resourceVersion"] = str(rv)
    return {**obj, "metadata": meta}


def _reset(sock: socket.socket) -> None:
    # Drop the flow mid-body like a crashed API server or a load balancer: shutdown() wakes a
    # handler thread blocked on this socket, and SO_LINGER 0 makes the final close() an RST.
    # The client sees a broken chunked body either way.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _encode_continue(rv: int, offset: int) -> str:
    raw = json.dumps({"rv": rv, "start": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, int]:
    data = json.loads(base64.urlsafe_b64decode(token.encode()))
    return int(data["rv"]), int(data["start"])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: FakeApiServer
    ssl_context: ssl.SSLContext | None = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens in the handler's thread (``setup``), never in the
            # accepting one: a client that stalls it must not stop the others.
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address) -> None:
        pass            # a failed handshake (the client refused our certificate, or we its)


class _Aborted(Exception):
    """The handler dropped the connection on purpose (fault injection)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:      # keep pytest output readable
        pass

    def setup(self) -> None:
        self.client_cn = None
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(5)
            self.request.do_handshake()
            self.request.settimeout(None)
            cert = self.request.getpeercert()       # only a verified one is returned
            if cert:
                subject = dict(rdn[0] for rdn in cert.get("subject", ()))
                self.client_cn = subject.get("commonName")
        super().setup()
        with self.server.api._cond:
            self.server.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.api._cond:
            self.server.api._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # ---- routing ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        api = self.server.api
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        res = _BY_PATH.get(parts.path)
        watch = query.get("watch") in ("true", "1")
        initial = watch and query.get("sendInitialEvents") in ("true", "1")
        verb = ("watchlist" if initial else "watch" if watch else "list") if res else (
            "discovery" if parts.path in _DISCOVERY else "other")
        req = Request(time.monotonic(), verb, res.plural if res else None, query,
                      authorization=self.headers.get("Authorization"), client_cn=self.client_cn,
                      user_agent=self.headers.get("User-Agent"))
        api._log(req)
        try:
            self._route(api, req, parts.path, res, query)
        except _Aborted:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _route(self, api, req, path, res, query) -> None:
        if api.down:
            _reset(self.connection)
            raise _Aborted
        by_cert = api.tls is not None and api.tls.client_cn is not None and (
            req.client_cn == api.tls.client_cn)
        if api.token is not None and req.authorization != f"Bearer {api.token}" and not by_cert:
            return self._send_status(req, 401, "Unauthorized")
        if res is None:
            doc = _DISCOVERY.get(path)
            if doc is None:
                return self._send_status(req, 404, f"the server could not find {path}")
            return self._send_json(req, 200, doc)
        if res.plural in api.not_served:
            return self._send_status(req, 404, "the server could not find the requested resource")
        if res.plural in api.forbidden:
            group = res.api_version.rpartition("/")[0]
            return self._send_status(req, 403, (
                f'{res.plural}{"." + group if group else ""} is forbidden: User '
                f'"system:serviceaccount:kube-system:kube-dns" cannot {req.verb} resource '
                f'"{res.plural}" in API group "{group}" at the cluster scope'))
        fault = api._take_fault(res.plural, req.verb)
        if isinstance(fault, HttpError):
            return self._send_status(req, fault.code, fault.message or f"injected {fault.code}",
                                     retry_after=fault.retry_after)
        if req.verb == "watchlist":
            if api.watch_list == "off":
                return self._send_status(req, 422, (
                    "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch "
                    "unless the WatchList feature gate is enabled"))
            if api.watch_list == "on" and query.get("resourceVersionMatch") != "NotOlderThan":
                return self._send_status(req, 422, (
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
                    "resourceVersionMatch to NotOlderThan"))
            return self._watch(api, req, res, query, fault, initial=api.watch_list == "on")
        if req.verb == "watch":
            return self._watch(api, req, res, query, fault)
        return self._list(api, req, res, query, fault)

    # ---- list -------------------------------------------------------------------------------
    def _list(self, api, req, res, query, fault) -> None:
        if isinstance(fault, Reset):
            _reset(self.connection)
            raise _Aborted
        if isinstance(fault, Stall):
            self._stall(req, fault)
        if isinstance(fault, Slow):
            if api._closing.wait(fault.seconds):
                raise _Aborted
        limit = int(query.get("limit") or 0)
        since, match = query.get("resourceVersion", ""), query.get("resourceVersionMatch", "")
        if query.get("continue") and since:
            return self._send_status(req, 400, (
                "specifying resource version is not allowed when using continue"))
        if match and not since:
            return self._send_status(req, 400, (
                "resourceVersionMatch is forbidden unless resourceVersion is provided"))
        if match == "NotOlderThan" and since != "0" and int(since) > api._rv:
            return self._send_status(req, 504, "Too large resource version: "
                                     f"{since}, current: {api._rv}")
        with api._cond:
            if query.get("continue"):
                try:
                    rv, start = _decode_continue(query["continue"])
                except (ValueError, KeyError):
                    return self._send_status(req, 400, "invalid continue token")
                items = api._snapshots.get((res.plural, rv))
                if items is None or rv < api._compacted:
                    return self._send_status(req, 410, (
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue "
                        "parameter."))
            else:
                rv, start = api._rv, 0
                items = [api._objects[res.plural][k] for k in sorted(api._objects[res.plural])]
            end = start + limit if limit else len(items)
            meta: dict = {"resourceVersion": str(rv)}
            if end < len(items):
                # The snapshot lives only while a paginated list is in progress.
                api._snapshots[(res.plural, rv)] = items
                meta["continue"] = _encode_continue(rv, end)
                meta["remainingItemCount"] = len(items) - end
            else:
                api._snapshots.pop((res.plural, rv), None)
            # Items of a real list carry no kind/apiVersion: the List's kind says it.
            page = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                    for o in items[start:end]]
        body = {"kind": res.kind + "List", "apiVersion": res.api_version, "metadata": meta,
                "items": page}
        self._send_json(req, 200, body)

    # ---- watch ------------------------------------------------------------------------------
    def _watch(self, api, req, res, query, fault, initial: bool = False) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        since = query.get("resourceVersion") or "0"
        self._start_chunked(req)
        if isinstance(fault, Stall):
            self._stall(req, fault)
        hist = api._history[res.plural]
        with api._cond:
            if initial:
                # WatchList: the current state, then the bookmark that ends it.
                pending = [("ADDED", o) for _, o in sorted(api._objects[res.plural].items())]
                pos = api._rv
                pending.append(("BOOKMARK", {
                    "kind": res.kind, "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(pos),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}))
            elif since == "0":
                # No version: the current state as synthetic ADDED events, then changes.
                pending = [("ADDED", o) for _, o in sorted(api._objects[res.plural].items())]
                pos = api._rv
            elif int(since) < api._compacted:
                pending = [("ERROR", _status(410, "Expired", (
                    f"too old resource version: {since} ({api._compacted})")))]
                pos = None
            else:
                pending, pos = [], int(since)
            seen_gen = api._bookmark_gen
        sent = 0
        next_bookmark = time.monotonic() + api.bookmark_interval
        while True:
            for ev in pending:
                if isinstance(fault, (Reset, Gone, ErrorEvent)) and sent >= fault.after_events:
                    self._fail(req, res, fault)
                self._send_event(*ev)
                sent += 1
            if pos is None or api._closing.is_set():
                return self._end_chunked()
            if isinstance(fault, (Reset, Gone, ErrorEvent)) and sent >= fault.after_events:
                self._fail(req, res, fault)
            with api._cond:
                i = bisect.bisect_right(hist.rvs, pos)
                if i == len(hist.rvs):
                    now = time.monotonic()
                    if now >= deadline:
                        pending = []
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    if not (bookmarks and seen_gen != api._bookmark_gen
                            or api._closing.is_set()):
                        api._cond.wait(max(0.0, wake - now))
                    i = bisect.bisect_right(hist.rvs, pos)
                pending = hist.events[i:]
                if pending:
                    pos = hist.rvs[-1]
                elif bookmarks and (seen_gen != api._bookmark_gen
                                    or time.monotonic() >= next_bookmark):
                    # Nothing of ours is pending up to the global version: safe to bookmark it.
                    seen_gen = api._bookmark_gen
                    next_bookmark = time.monotonic() + api.bookmark_interval
                    pos = api._rv
                    pending = [("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version,
                                             "metadata": {"resourceVersion": str(pos)}})]
        self._end_chunked()

    def _fail(self, req, res, fault) -> None:
        if isinstance(fault, (Gone, ErrorEvent)):
            status = (_status(410, "Expired", "too old resource version")
                      if isinstance(fault, Gone) else {"kind": "Status", **fault.status})
            self._send_event("ERROR", status)
            self._end_chunked()
            raise _Aborted
        self.wfile.flush()
        _reset(self.connection)
        raise _Aborted

    def _stall(self, req, fault: Stall) -> None:
        self.wfile.flush()
        self.server.api._closing.wait(fault.seconds)
        _reset(self.connection)
        raise _Aborted

    # ---- wire -------------------------------------------------------------------------------
    def _send_json(self, req, code: int, body: dict, *, retry_after: int | None = None) -> None:
        data = json.dumps(body).encode()
        req.status = code
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(data)

    def _send_status(self, req, code: int, message: str, *, retry_after=None) -> None:
        self._send_json(req, code, _status(code, _REASONS.get(code, "Unknown"), message),
                        retry_after=retry_after)

    def _start_chunked(self, req) -> None:
        req.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _send_event(self, kind: str, obj: dict) -> None:
        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _resource_list(group_version: str, plurals: list[str]) -> dict:
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [{"name": p, "singularName": "", "namespaced": RESOURCES[p].namespaced,
                           "kind": RESOURCES[p].kind, "verbs": ["get", "list", "watch"]}
                          for p in plurals]}


_DISCOVERY = {
    "/version": {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]},
    "/api/v1": _resource_list("v1", ["services", "endpoints", "namespaces", "pods"]),
    "/apis/discovery.k8s.io/v1": _resource_list("discovery.k8s.io/v1", ["endpointslices"]),
}
