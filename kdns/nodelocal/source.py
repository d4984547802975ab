"""The node-local's image source: the central kdns's image stream, long-polled.

Why: in node-local mode the supervisor and workers are those of ``kdns serve``; only where
the image comes from differs. This is a push source in the supervisor's protocol
(``kdns/serve/supervisor.py``: first, poll, push, ready_generation, bind, published, stop):
a thread long-polls ``/image`` (kdns/serve/stream.py), applies deltas to the image it
holds, and checks the result exactly as a worker checks an image (``engine.Image`` layout
and crc) before handing it over; a delta that does not apply, or an image that does not
check, is dropped and the next request asks for the full image.

Staleness: every answer of the central kdns (a new image, or 304: still current) renews
the image. When none came for ``stale_after`` seconds (central down, link cut), the
node-local stops answering cluster names from an image it can no longer vouch for: it
publishes a fallback image without the cluster zones and ``on_stale(True)`` routes the
cluster domain and the reverse zones to the kube-dns Service over TCP (what NodeLocal
DNSCache always does). The first answer after that publishes the image again, and the
forwarding returns to normal once every worker serves it (``on_stale(False)``).

What it must not do: publish bytes it has not checked, or block the supervisor's loop.
"""
from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.parse
import zlib

from kdns.serve import delta as D
from kdns.serve.stream import PART
from kdns.packet import engine

log = logging.getLogger("kdns.nodelocal.source")

RETRY_MIN, RETRY_MAX = 0.2, 5.0     # back-off between failed requests, seconds
MAX_IMAGE = D.MAX_OUTPUT


class StreamError(Exception):
    """One failed transfer (logged; the next request is a full one)."""


def check(image: bytes, length: int | None = None, crc: int | None = None) -> bytes:
    """``image`` when the workers would map it (layout, crc) and it is what the headers
    announced; StreamError otherwise."""
    try:
        ok = engine.Image(image).verify() is not False
    except ValueError as e:
        raise StreamError(f"not a valid zone image ({e})") from None
    if not ok:
        raise StreamError("the image's crc does not match its bytes")
    if length is not None and len(image) != length:
        raise StreamError(f"{len(image)} bytes, announced {length}")
    if crc is not None and D.image_crc(image) != crc:
        raise StreamError("the image's crc is not the announced one")
    return image


class StreamSource:
    push = True
    ready_generation = 1

    def __init__(self, url: str, *, fallback: bytes, stale_after: float, wait: float,
                 forward_when_stale: bool = True, on_stale=None, clock=time.monotonic, first_timeout: float = 5.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"{url!r} is not an http:// URL of a central kdns's /image")
        self.url, self.host, self.port = url, u.hostname, u.port or 80
        self.path = u.path or "/image"
        self.path_wait = f"{self.path}?wait={wait:g}"
        self.fallback = fallback
        self.stale_after, self.wait = stale_after, wait
        self.first_timeout = first_timeout
        self.on_stale = on_stale or (lambda stale: None)
        self.clock = clock
        self.lock = threading.Lock()
        self.image: bytes | None = None      # the last checked image from the stream
        self.etag: str | None = None
        self.fresh_at = float("-inf")        # when the central kdns last vouched for it
        self.pending: bytes | None = None    # checked, not yet handed to the supervisor
        self.stale = False                   # the fallback is what we publish
        self.leaving_gen = 0                 # generation whose serving ends the fallback
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kdns-image-follow", daemon=True)
        self.stats = {"full": 0, "delta": 0, "not_modified": 0, "errors": 0,
                      "bytes_full": 0, "bytes_delta": 0, "fallbacks": 0}
        self.forward_when_stale = forward_when_stale
        self._leaving = False                # the image was returned to leave the fallback
        self._wake = lambda: None
        self._served = lambda: 0

    # ---- the supervisor's protocol
    def bind(self, *, wake, served_generation, served_at=None) -> None:
        self._wake, self._served = wake, served_generation

    def first(self) -> bytes:
        """The central's image if it answers within ``first_timeout``, else the fallback
        (the node-local starts either way: a node's DNS must not wait for the stream)."""
        try:
            self._fetch(timeout=self.first_timeout, wait=False)
        except (OSError, StreamError, http.client.HTTPException) as e:
            log.warning("image stream %s: no image at start (%s); serving the fallback "
                        "until it answers", self.url, e)
        self.thread.start()
        with self.lock:
            if self.pending is not None:
                data, self.pending = self.pending, None
                return data
        self._enter_stale()
        return self.fallback

    def poll(self, force: bool = False) -> bytes | None:
        now = self.clock()
        with self.lock:
            fresh = now - self.fresh_at <= self.stale_after
            data, self.pending = self.pending, None
            image = self.image
        if not fresh:
            entering = not self.stale
            if entering:
                log.error("image stream %s: no answer for %.0fs (--stale-after); %s",
                          self.url, self.staleness_seconds(),
                          "cluster names are forwarded to the kube-dns Service until it "
                          "answers again" if self.forward_when_stale else
                          "still answering from the last image (no --kube-dns-upstream)")
                self._enter_stale()
            if not self.forward_when_stale and image is not None:
                return None                      # keep serving the last image
            if entering or self.leaving_gen or self._leaving:
                self.leaving_gen, self._leaving = 0, False
                return self.fallback
            return None
        if not self.stale:
            return data
        if not self.forward_when_stale and image is not None:
            self.stale = False
            self.on_stale(False)
            log.info("image stream %s answers again", self.url)
            return data
        if self.leaving_gen:
            if self._served() >= self.leaving_gen:
                self.stale, self.leaving_gen = False, 0
                self.on_stale(False)
                log.info("image stream %s answers again: cluster names from its image",
                         self.url)
            return data
        if image is None or self._leaving:
            return None
        self._leaving = True
        return image

    def published(self, generation: int) -> None:
        if self._leaving:
            self._leaving = False
            self.leaving_gen = generation

    def stop(self) -> None:
        self.stopping.set()

    def staleness_seconds(self) -> float:
        """Seconds since the central kdns last vouched for the served image."""
        with self.lock:
            at = self.fresh_at
        return 0.0 if at == float("-inf") else max(0.0, self.clock() - at)

    def _enter_stale(self) -> None:
        self.stale = True
        self.stats["fallbacks"] += 1
        self.on_stale(True)

    # ---- the stream
    def _run(self) -> None:
        delay = RETRY_MIN
        while not self.stopping.is_set():
            try:
                self._fetch(timeout=self.wait + 10.0, wait=True)
                delay = RETRY_MIN
            except (OSError, StreamError, http.client.HTTPException, zlib.error) as e:
                self.stats["errors"] += 1
                log.warning("image stream %s: %s; retrying in %.1fs", self.url, e, delay)
                self.stopping.wait(delay)
                delay = min(RETRY_MAX, delay * 2)

    def _fetch(self, *, timeout: float, wait: bool) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {"If-None-Match": self.etag} if self.etag and self.image else {}
            conn.request("GET", self.path_wait if wait and headers else self.path,
                         headers=headers)
            r = conn.getresponse()
            body = r.read(MAX_IMAGE + 1)
            if len(body) > MAX_IMAGE:
                raise StreamError("the response is larger than any image")
            if r.status == 304:
                self.stats["not_modified"] += 1
                self._fresh(None, r.getheader("ETag"))
                return
            if r.status != 200:
                raise StreamError(f"HTTP {r.status} {r.reason}")
            length = int(r.getheader("X-Kdns-Image-Length", "-1"))
            crc = int(r.getheader("X-Kdns-Image-Crc32", "0"), 16)
            kind = r.getheader("X-Kdns-Transfer", "full")
            if kind == "delta":
                image = self._apply(body)
            else:
                d = zlib.decompressobj()
                image = d.decompress(body, MAX_IMAGE)
                if d.unconsumed_tail or not d.eof:
                    raise StreamError("the compressed image is truncated or too large")
            try:
                image = check(image, length, crc)
            except StreamError:
                self.etag = None              # ask for the full image next time
                raise
            self.stats[kind] += 1
            self.stats["bytes_" + kind] += len(body)
            log.info("image stream: %s transfer of %d bytes, image %s (%d bytes)", kind,
                     len(body), r.getheader("ETag"), len(image))
            self._fresh(image, r.getheader("ETag"))
        finally:
            conn.close()

    def _apply(self, body: bytes) -> bytes:
        image, at = self.image, 0
        try:
            while at < len(body):
                (n,) = PART.unpack_from(body, at)
                image = D.apply(image, body[at + PART.size:at + PART.size + n])
                at += PART.size + n
        except (D.DeltaError, ValueError, TypeError) as e:      # struct.error is a ValueError
            self.etag = None
            raise StreamError(f"a delta does not apply ({e}); asking for the full image") from None
        return image

    def _fresh(self, image: bytes | None, etag: str | None) -> None:
        with self.lock:
            self.fresh_at = self.clock()
            if image is not None:
                self.image, self.etag, self.pending = image, etag, image
        if image is not None or self.stale:
            self._wake()
