"""The central kdns's side of the image stream: its sealed image over HTTP, for node-locals.

Why: a node-local must answer exactly what the central kdns answers, without watching the
API itself (thousands of watches on the API server is what this mode avoids). So the
central kdns, with ``--serve-image``, serves ``/image`` on its healthz port, RBAC-free
(what it gives is what DNS gives anyone):

- ``GET /image``: the current image, zlib-compressed, with ``ETag`` (the image's serial,
  crc and length: equal images of two replicas have equal tags), ``X-Kdns-Image-Length``
  and ``X-Kdns-Image-Crc32`` (the header's own crc, kdns/zone/layout.py).
- ``If-None-Match: <etag>`` with ``?wait=SECONDS`` (at most ``MAX_WAIT``): a long-poll. While
  the tag is current the request waits for the next generation, then answers 304 when none
  came. A tag this server still knows as an older generation is answered with the deltas
  from it to the current one (``X-Kdns-Transfer: delta``; kdns/serve/delta.py), when
  they are smaller than the full transfer; any other tag gets the full image.

The deltas and the compressed image are made once per generation on this module's thread,
never on a request or on the supervisor's loop, and the image is read from the sealed
memfd the workers serve (a read-only map: no copy of the 30 MiB).

Body of a delta transfer: ``count`` times ``[length I][delta]`` (little-endian), applied in
order. What it must not do: block the supervisor, or hold more than ``KEEP`` deltas and
one previous image.
"""
from __future__ import annotations

import logging
import struct
import threading
import time
import urllib.parse
import zlib

from kdns.serve import delta as D
from kdns.observe.http import with_request
from kdns.zone.layout import HEADER_SERIAL

log = logging.getLogger("kdns.serve.stream")

KEEP = 16            # deltas kept: a node-local this many generations behind still gets deltas
MAX_WAIT = 300.0     # longest long-poll a request may ask for, in seconds
PART = struct.Struct("<I")
CONTENT_TYPE = "application/vnd.kdns.image"


def etag_of(image) -> str:
    serial = struct.unpack_from("<Q", image, HEADER_SERIAL)[0]
    return f'"{serial:x}-{D.image_crc(image):08x}-{D.image_length(image):x}"'


class Generation:
    __slots__ = ("number", "etag", "map", "full", "length", "crc")

    def __init__(self, number, etag, mapping, full):
        self.number, self.etag, self.map, self.full = number, etag, mapping, full
        self.length, self.crc = D.image_length(mapping), D.image_crc(mapping)


class ImageStream:
    """Follows a ``publish.Publisher``; answers ``/image`` requests from HTTP threads."""

    def __init__(self, publisher):
        self.publisher = publisher
        self.cond = threading.Condition()
        self.current: Generation | None = None
        self.chain: list[tuple[str, bytes]] = []     # (from etag, delta to the next), oldest first
        self.pending = threading.Event()
        self.sent = {"full": 0, "delta": 0, "not_modified": 0}
        self.sent_bytes = {"full": 0, "delta": 0}
        self.waiting = 0                 # long-polls waiting for the next generation
        publisher.listeners.append(lambda generation: self.pending.set())
        self.thread = threading.Thread(target=self._run, name="kdns-image-stream", daemon=True)
        self.thread.start()

    # ---- the generations
    def _run(self) -> None:
        while True:
            self.pending.wait()
            self.pending.clear()
            try:
                self._take()
            except Exception:       # noqa: BLE001 -- the next publish tries again
                log.exception("image stream: could not prepare the new generation")

    def _take(self) -> None:
        got = self.publisher.current_image()
        if got is None:
            return
        number, mapping = got
        old = self.current
        if old is not None and old.number == number:
            mapping.close()
            return
        t0 = time.monotonic()
        etag = etag_of(mapping)
        step = None
        if old is not None and old.etag != etag:
            step = (old.etag, D.make(old.map, mapping))
        # The delta first: the nodes that follow (nearly all) take it at once; the full
        # image, for nodes that start or fell behind, is compressed after.
        new = Generation(number, etag, mapping, None)
        with self.cond:
            if step is not None:
                self.chain.append(step)
                del self.chain[:-KEEP]
            self.current = new
            self.cond.notify_all()
        if old is not None:
            old.map.close()
        full = zlib.compress(mapping, 6)
        with self.cond:
            new.full = full
            self.cond.notify_all()
        log.info("image stream: generation %d ready (%s; full %d bytes zlib%s) in %.3fs",
                 number, etag, len(full),
                 f", delta {len(step[1])} bytes" if step else "", time.monotonic() - t0)

    def full_of(self, gen: Generation, timeout: float = 60.0) -> bytes | None:
        with self.cond:
            self.cond.wait_for(lambda: gen.full is not None, timeout)
            return gen.full

    def wait_for(self, etag: str | None, timeout: float) -> Generation | None:
        """The current generation, after waiting up to ``timeout`` for one whose tag is not
        ``etag``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.waiting += 1
            try:
                while self.current is None or (etag is not None and self.current.etag == etag):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                return self.current
            finally:
                self.waiting -= 1

    def deltas_from(self, etag: str, current: Generation) -> list[bytes] | None:
        with self.cond:
            for i, (base, _) in enumerate(self.chain):
                if base == etag:
                    parts = [d for _, d in self.chain[i:]]
                    break
            else:
                return None
        # The chain may have grown past ``current`` meanwhile; it ends at self.current,
        # which is what the headers must then describe.
        return parts

    # ---- HTTP
    def routes(self) -> dict:
        return {"/image": with_request(self.handle)}

    def handle(self, req):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        try:
            wait = min(MAX_WAIT, max(0.0, float(query.get("wait", ["0"])[0])))
        except ValueError:
            return 400, "text/plain", b"wait must be a number of seconds\n", {}
        have = req.headers.get("If-None-Match")
        gen = self.wait_for(have, wait if have else 0.0)
        if gen is None:
            return 503, "text/plain", b"no zone image published yet\n", {}
        with self.cond:
            gen = self.current           # the newest, with the chain that ends at it
            parts = self.deltas_from(have, gen) if have and have != gen.etag else None
        headers = {"ETag": gen.etag, "X-Kdns-Generation": str(gen.number),
                   "X-Kdns-Image-Length": str(gen.length),
                   "X-Kdns-Image-Crc32": f"{gen.crc:08x}", "Cache-Control": "no-cache"}
        if have == gen.etag:
            with self.cond:
                self.sent["not_modified"] += 1
            return 304, CONTENT_TYPE, b"", headers
        full_size = len(gen.full) if gen.full is not None else gen.length
        if parts is not None and sum(len(p) for p in parts) < full_size:
            body = b"".join(PART.pack(len(p)) + p for p in parts)
            headers.update({"X-Kdns-Transfer": "delta", "X-Kdns-Delta-Base": have,
                            "X-Kdns-Deltas": str(len(parts))})
            kind = "delta"
        else:
            body = self.full_of(gen)
            if body is None:
                return 503, "text/plain", b"the image is still being compressed\n", {}
            headers["X-Kdns-Transfer"] = "full"
            kind = "full"
        with self.cond:
            self.sent[kind] += 1
            self.sent_bytes[kind] += len(body)
        return 200, CONTENT_TYPE, body, headers

    def collector(self):
        return StreamCollector(self)


class StreamCollector:
    """The central's side of the stream in /metrics (kdns serve --serve-image)."""

    def __init__(self, stream: ImageStream):
        self.stream = stream

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        st = self.stream
        with st.cond:
            sent, sent_bytes, waiting = dict(st.sent), dict(st.sent_bytes), st.waiting
            chain = len(st.chain)
        c = CounterMetricFamily("kdns_image_stream_responses", "Image stream answers to "
                                "node-locals by kind (full image, delta, not modified).",
                                labels=["transfer"])
        for kind, n in sent.items():
            c.add_metric([kind], n)
        yield c
        c = CounterMetricFamily("kdns_image_stream_bytes", "Bytes of image stream answers by "
                                "kind.", labels=["transfer"])
        for kind, n in sent_bytes.items():
            c.add_metric([kind], n)
        yield c
        g = GaugeMetricFamily("kdns_image_stream_waiting", "Long-polls waiting for the next "
                              "image generation (node-locals following this server).")
        g.add_metric([], waiting)
        yield g
        g = GaugeMetricFamily("kdns_image_stream_deltas_kept", "Generations back from the "
                              "current one a node-local still gets deltas for.")
        g.add_metric([], chain)
        yield g
