"""Fuzz target: RFC 7766 framing of the worker's TCP connections, fed arbitrary chunks.

Input: one byte of options (image, RA, how the stream is cut into chunks), then the byte
stream a client sends. A ``serve.worker.TcpConnection`` with a recording transport must
write exactly one length-prefixed reply per complete message the stream frames (the
engine's answer, or the hand-off's for the ones it hands off), whatever the chunking, and
keep the incomplete tail buffered; the compiled ``tcp_answer`` must equal the pure one.
Hand-offs finish after ``data_received`` returns, as on the event loop, so replies may
be out of order (RFC 7766 §7): they are compared as multisets.
"""
from __future__ import annotations

import sys

import common

with common.instrumented():
    from kdns.packet import counters as C
    from kdns.packet import engine
    from kdns.packet import _fastpath as F
    from kdns.serve import worker as W
    import zonefixtures as Z

CHUNKS = (None, (1,), (2, 1), (3, 5, 7), (64,), (300, 1), (2,), (1000,))
STATE: dict = {}


class Loop:
    def time(self) -> float:
        return 1000.0

    def call_later(self, delay, fn, *args):
        return Handle()


class Handle:
    def cancel(self) -> None:
        pass


class Transport:
    def __init__(self):
        self.out = bytearray()
        self.paused = False
        self.closed = False

    def write(self, data) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False

    def get_extra_info(self, key, default=None):
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    abort = close


class Worker:
    """The attributes of serve.worker.Worker that a TcpConnection reads."""

    def __init__(self, img, page, ra: bool):
        self.loop = Loop()
        self.img = img
        self.page = page
        self.counters = engine.Counters(page)
        self.edns_max = 1232
        self.log_queries = False
        self.handoff = W.RefuseHandoff(1232)
        self.udp_server = type("U", (), {"ra": ra})()
        self.rotation = None            # the compiled order, as ``expected`` answers
        self.connections: dict = {}
        self.by_source: dict = {}
        self.max_connections = 1000
        self.max_per_source = 100
        self.queued: list = []

    def spawn(self, coro) -> None:
        self.queued.append(coro)

    def run_queued(self) -> None:
        while self.queued:
            coro = self.queued.pop(0)
            try:
                coro.send(None)
            except StopIteration:
                continue
            raise AssertionError("a hand-off waited on something")

    def tcp_idle_timeout(self) -> float:
        return 10.0

    def close_oldest_idle(self, conns) -> bool:
        return False


def setup() -> None:
    buf = Z.sample_image()
    STATE["fast"] = F.Image(buf)
    STATE["pure"] = engine.PureImage(buf)
    STATE["page"] = bytearray(C.SLOT_WORDS * 8)


def frames(stream: bytes) -> tuple[list[bytes], int]:
    """The reference deframer: complete messages, and where the incomplete tail starts."""
    msgs, i = [], 0
    while len(stream) - i >= 2:
        n = int.from_bytes(stream[i:i + 2], "big")
        if len(stream) - i - 2 < n:
            break
        msgs.append(stream[i + 2:i + 2 + n])
        i += 2 + n
    return msgs, i


def expected(msgs: list[bytes], ra: bool) -> list[bytes]:
    page = STATE["page"]
    out = []
    for m in msgs:
        fa = F.tcp_answer(STATE["fast"], F.Counters(page), m, 1232, ra)
        pa = engine.pure_tcp_answer(STATE["pure"], engine.PureCounters(page), m, 1232, ra)
        if (fa[0], bytes(fa[1])) != (pa[0], bytes(pa[1])):
            raise Mismatch(f"tcp_answer {m.hex()}: compiled {fa[0]}:{bytes(fa[1]).hex()} "
                           f"pure {pa[0]}:{bytes(pa[1]).hex()}")
        if fa[0] == engine.SEND:
            out.append(bytes(fa[1]))
        elif fa[0] == engine.HANDOFF:
            r = engine.refused(m, 1232)
            if r is not None:
                out.append(r)
    return sorted(out)


class Mismatch(Exception):
    pass


def split(stream: bytes, sizes) -> list[bytes]:
    if sizes is None:
        return [stream]
    out, i, k = [], 0, 0
    while i < len(stream):
        n = sizes[k % len(sizes)]
        out.append(stream[i:i + n])
        i += n
        k += 1
    return out


def TestOneInput(data: bytes) -> None:
    if not STATE:
        setup()
    common.executed()
    if not data:
        return
    opts, stream = data[0], bytes(data[1:])
    ra = bool(opts & 0x80)
    msgs, tail = frames(stream)
    try:
        want = expected(msgs, ra)
    except Mismatch as e:
        common.mismatch("tcp", data, str(e))
        return
    w = Worker(STATE["fast"], STATE["page"], ra)
    t = Transport()
    conn = W.TcpConnection(w)
    conn.connection_made(t)
    for chunk in split(stream, CHUNKS[opts & 7]):
        conn.data_received(chunk)
        w.run_queued()
    w.run_queued()
    got, rest = frames(bytes(t.out))
    problems = []
    if rest != len(t.out):
        problems.append(f"{len(t.out) - rest} stray bytes after the replies")
    if sorted(got) != want:
        problems.append(f"{len(got)} replies, {len(want)} expected, or different bytes")
    if bytes(conn.buf) != stream[tail:]:
        problems.append(f"buffered {len(conn.buf)} bytes, the tail is {len(stream) - tail}")
    if t.paused:
        problems.append("reading left paused with nothing in flight")
    if problems:
        common.mismatch("tcp", data, f"chunks={CHUNKS[opts & 7]}: " + "; ".join(problems))
    conn.connection_lost(None)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
