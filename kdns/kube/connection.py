"""How kdns talks to the Kubernetes API: the connection flags resolved by the official client
in a short-lived child process, then plain urllib3 in this one.

Why: kube-dns users pass ``--kubecfg-file`` and ``--kube-master-url`` (or nothing, in a pod),
and kdns must take the same and get kubeconfig contexts, the in-cluster service account,
exec/OIDC credential plugins and client certificates from the official ``kubernetes``
client rather than re-implementing them. But importing that package costs a process about
24 MiB resident for its whole life, for code that runs once at start. So the supervisor runs
``python -m kdns.kube.kubeconfig`` (``resolve_in_child``): the child applies the client's
loaders and prints a description of the connection (``ConnectionInfo``: server, TLS
material, the Authorization header, a token file to follow, when the credentials expire)
and exits. This process then makes its requests with urllib3, the library the client itself
sends them through, configured as the client would configure it (``ApiConnection``).

Credentials for a process that runs for months:

- a token file (the in-cluster service account's, a kubeconfig ``tokenFile``) is re-read
  when its size, mtime or inode change: a stat per request, and requests are rare (list
  pages, watch starts), so a token rotated by the kubelet is used by the very next request;
- credentials that expire (exec and OIDC plugins say when) are resolved again, by a new
  child, five minutes before they do (the client's own margin), and after any 401, so a
  plugin's rotated or revoked credentials are picked up. A failed re-resolve keeps the
  current ones; re-resolves are at least ``refresh_interval`` apart.

Retries are left to the watch loop (``api.py``): urllib3's are off, so there is exactly one
retry policy (backoff with jitter, Retry-After) and an overloaded API server never sees
requests multiplied behind its back. Redirects are not followed either, as before.

What it must not do: import the ``kubernetes`` package (only the child does), build DNS
names, or import anything from kdns outside ``kdns.kube``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from urllib.parse import urlencode, urlsplit

import urllib3

log = logging.getLogger("kdns.kube.connection")

USER_AGENT = "kdns/0.1 (cluster DNS)"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The kubernetes client treats credentials as expired this long before they say they are
# (kube_config.EXPIRY_SKEW_PREVENTION_DELAY): a request in flight must not outlive them.
EXPIRY_SKEW = 300.0
REFRESH_INTERVAL = 10.0          # at least this long between two re-resolves
RESOLVE_TIMEOUT = 60.0           # an exec plugin that waits for a human never returns
# Connections kept per pool: one per watcher (services, slices, namespaces, pods) and the
# ConfigMap poll, so no stream closes a connection another could reuse.
POOL_SIZE = 8


class ConnectionConfigError(ValueError):
    """The connection flags or files cannot be used; the message says which and what to do."""


def expand_env(value: str, environ=os.environ) -> str:
    """$VAR and ${VAR} replaced like Go's os.ExpandEnv (kube-dns applies it to both flags):
    unset variables become empty."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: environ.get(m.group(1) or m.group(2), ""), value)


def check_master_url(url: str) -> str:
    """The URL itself, or ConnectionConfigError: kube-dns requires a scheme and a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectionConfigError(
            f"--kube-master-url={url!r} needs a scheme and a host, "
            "for example https://10.96.0.1:443")
    return url.rstrip("/")


@dataclass(frozen=True)
class ConnectionInfo:
    """What the child resolved: everything this process needs to reach the API server."""
    server: str                                 # e.g. https://10.96.0.1:443
    verify: bool = True                         # False: insecure-skip-tls-verify
    ca_pem: str | None = None                   # None: the system's CAs (when verifying)
    tls_server_name: str | None = None          # name to send (SNI) and to check instead
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    authorization: str | None = None            # the Authorization header, "Bearer …"
    token_file: str | None = None               # re-read when it changes; wins when readable
    expires_at: float | None = None             # Unix time the credentials expire at
    proxy: str | None = None                    # proxy URL the client would use for server

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, doc: dict) -> "ConnectionInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def same_transport(self, other: "ConnectionInfo") -> bool:
        """Whether ``other`` can reuse this one's connections (only credentials differ)."""
        return replace(self, authorization=None, token_file=None, expires_at=None) == replace(
            other, authorization=None, token_file=None, expires_at=None)


def resolve_in_child(kubecfg_file: str = "", kube_master_url: str = "", *,
                     service_account_dir: str | None = None,
                     timeout: float = RESOLVE_TIMEOUT) -> ConnectionInfo:
    """Run ``python -m kdns.kube.kubeconfig`` for these flags and parse what it prints.

    ConnectionConfigError carries the child's own message (which flag or file, what to do);
    what the client logs there (a failed exec plugin, say) is logged here as a warning."""
    argv = [sys.executable, "-m", "kdns.kube.kubeconfig",
            "--kubecfg-file", kubecfg_file, "--kube-master-url", kube_master_url]
    if service_account_dir is not None:
        argv += ["--service-account-dir", service_account_dir]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        raise ConnectionConfigError(
            f"resolving the API connection (--kubecfg-file={kubecfg_file!r}) took over "
            f"{timeout:g}s; an exec credential plugin may be waiting for input") from None
    except OSError as e:
        raise ConnectionConfigError(f"cannot run {argv[0]} to resolve the API connection: "
                                    f"{e}") from None
    for line in done.stderr.splitlines():
        if line.strip():
            log.warning("resolving the API connection: %s", line)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionConfigError(f"resolving the API connection failed (exit status "
                                    f"{done.returncode}: {last})")
    if "error" in doc:
        raise ConnectionConfigError(str(doc["error"]))
    return ConnectionInfo.from_dict(doc)


class ApiConnection:
    """GET requests to the API server described by a ``ConnectionInfo``, with its
    credentials kept current (see the module docstring). Thread-safe: the watchers and the
    ConfigMap poll share one.

    ``resolve`` gives fresh ``ConnectionInfo`` (None: credentials are never re-resolved);
    ``clock`` is the wall clock the expiry is compared with, ``monotonic`` spaces re-resolves.
    """

    def __init__(self, info: ConnectionInfo, *, resolve=None, clock=time.time,
                 monotonic=time.monotonic, refresh_interval: float = REFRESH_INTERVAL):
        self._resolve, self._clock, self._monotonic = resolve, clock, monotonic
        self._refresh_interval = refresh_interval
        self._lock = threading.Lock()
        self._last_refresh: float | None = None
        self._rejected = False                  # a 401 since the last resolve
        self._generation = 0
        self.resolves = 1                       # how many times the flags were resolved
        self._pool = None
        self._install(info)

    @property
    def info(self) -> ConnectionInfo:
        return self._info

    @property
    def server(self) -> str:
        return self._info.server

    def _install(self, info: ConnectionInfo) -> None:
        old = getattr(self, "_info", None)
        if old is None or not old.same_transport(info):
            pool, self._pool = self._pool, _pool_manager(info)   # may raise: nothing changed
            if pool is not None:
                pool.clear()       # idle connections only: open streams finish on their own
        self._info = info
        self._token_stamp, self._file_token = None, None
        self._generation += 1
        self._rejected = False

    def get(self, path: str, query=(), *, timeout: tuple[float, float],
            accept: str = "application/json"):
        """The open response (``preload_content=False``: the caller streams and releases
        it). Raises urllib3's HTTPError or OSError when the connection fails."""
        with self._lock:
            self._refresh_if_due()
            pool, info, generation = self._pool, self._info, self._generation
            headers = {"Accept": accept, "User-Agent": USER_AGENT}
            authorization = self._authorization()
        if authorization:
            headers["Authorization"] = authorization
        query = [(k, v) for k, v in query if v is not None]
        url = info.server + path + ("?" + urlencode(query) if query else "")
        resp = pool.request("GET", url, headers=headers, retries=False, redirect=False,
                            preload_content=False,
                            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
        if resp.status == 401 and self._resolve is not None:
            with self._lock:
                if generation == self._generation:
                    self._rejected = True     # the next request resolves the flags again
        return resp

    def close(self) -> None:
        self._pool.clear()

    # ---- credentials, under self._lock ----------------------------------------------------
    def _refresh_if_due(self) -> None:
        if self._resolve is None:
            return
        info = self._info
        expired = (info.expires_at is not None
                   and self._clock() >= info.expires_at - EXPIRY_SKEW)
        if not (expired or self._rejected):
            return
        now = self._monotonic()
        if self._last_refresh is not None and now - self._last_refresh < self._refresh_interval:
            return
        self._last_refresh = now
        why = "the credentials expire" if expired else "the API server rejected the credentials"
        try:
            new = self._resolve()
            self._install(new)
        except ConnectionConfigError as e:
            self._rejected = False        # retried after refresh_interval, on the next 401
            log.warning("%s, but resolving the connection again failed (%s); keeping the "
                        "current ones", why, e)
            return
        self.resolves += 1
        log.info("%s: resolved the connection again (%s)", why, new.server)

    def _authorization(self) -> str | None:
        info = self._info
        if info.token_file:
            try:
                st = os.stat(info.token_file)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != self._token_stamp:
                    with open(info.token_file, encoding="utf-8") as f:
                        token = f.read().strip()
                    if token:                  # a half-written file: keep the last good token
                        self._token_stamp, self._file_token = stamp, token
            except OSError:
                pass                           # briefly absent during an atomic swap
            if self._file_token:
                return "Bearer " + self._file_token
        return info.authorization


def _pool_manager(info: ConnectionInfo):
    """A urllib3 pool manager set up as ``kubernetes.client.rest.RESTClientObject`` would set
    one up for the same configuration (retries off: see the module docstring)."""
    kw: dict = {"retries": False, "maxsize": POOL_SIZE}
    if urlsplit(info.server).scheme == "https":
        kw["ssl_context"] = ssl_context(info)
        if not info.verify:
            kw["cert_reqs"] = "CERT_NONE"
        if info.tls_server_name:
            kw["server_hostname"] = info.tls_server_name
    if info.proxy:
        if urlsplit(info.proxy).scheme.startswith("socks"):
            from urllib3.contrib.socks import SOCKSProxyManager   # needs PySocks, as before
            return SOCKSProxyManager(info.proxy, **kw)
        return urllib3.ProxyManager(info.proxy, **kw)
    return urllib3.PoolManager(**kw)


def ssl_context(info: ConnectionInfo) -> ssl.SSLContext:
    """Verification against ``ca_pem`` (or the system's CAs when there is none), and the
    client certificate when there is one."""
    try:
        ctx = ssl.create_default_context(cadata=info.ca_pem or None)
        if not info.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if info.client_cert_pem and info.client_key_pem:
            _load_cert_chain(ctx, info.client_cert_pem, info.client_key_pem)
    except (ssl.SSLError, ValueError) as e:
        raise ConnectionConfigError(f"the API connection's TLS material cannot be used "
                                    f"({e}); check the kubeconfig's certificate fields") from None
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` takes only paths: give it anonymous memory files, never written
    to disk, closed as soon as OpenSSL has read them."""
    fds = []
    try:
        for pem in (cert_pem, key_pem):
            fd = os.memfd_create("kdns-client-cert", os.MFD_CLOEXEC)
            fds.append(fd)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(pem.encode())
        ctx.load_cert_chain(*(f"/proc/self/fd/{fd}" for fd in fds))
    finally:
        for fd in fds:
            os.close(fd)


_shared: dict[tuple[str, str], ApiConnection] = {}
_shared_lock = threading.Lock()


def connect(kubecfg_file: str = "", kube_master_url: str = "") -> ApiConnection:
    """The process's connection for these flags, resolved once (ConnectionConfigError at
    start, naming the flag): the watchers and the ConfigMap poll share it, and so its
    re-resolves."""
    key = (kubecfg_file or "", kube_master_url or "")
    with _shared_lock:
        conn = _shared.get(key)
        if conn is None:
            resolve = lambda: resolve_in_child(*key)   # noqa: E731
            conn = _shared[key] = ApiConnection(resolve(), resolve=resolve)
        return conn
