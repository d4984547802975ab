"""The packet-path engine the workers call: the compiled ``_fastpath`` or its pure twin.

Why: workers must not care which implementation answers. ``_fastpath`` (Cython) is used
unless ``KDNS_PURE=1`` or it fails to import; otherwise this module supplies pure-Python
classes with the same API, built on ``refpath`` (the oracle), which also count into the
worker's shared counter page so metrics work in pure mode (aiohttp's ``_http_parser`` /
``http_parser`` pattern).

The API (§5):

- ``Image(buffer)`` checks magic and length; ``.verify()`` checks the CRC; ``.serial``,
  ``.synced``.
- ``answer(img, query, tcp=False, *, edns_max, ra=False, rotation=0) -> (action, reply)``;
  actions ``DROP``, ``SEND``, ``HANDOFF``; ``rotation`` a ``Rotation`` or a fixed counter.
- ``Rotation()``: one worker's answer-rotation counters (kdns/zone/layout.py, Rotation).
- ``Counters(buffer)`` over one worker's page (``counters.SLOT_WORDS`` uint64 words).
- ``UdpServer(fd, edns_max, batch=64)``: ``.serve(img, counters, max_batches=16)``
  drains the non-blocking socket and returns how many packets it handed off;
  ``.handoff_packet(i)``, ``.handoff_addr(i)``, ``.handoff_received_ns(i)``;
  ``.set_rotation(rotation)`` (None: the compiled order).
- ``tcp_answer(img, counters, msg, edns_max, ra=False, v6=False, rotation=None) -> (action,
  reply)`` (counted as tcp; ``ra``: set RA, the worker forwards; ``v6``: an IPv6 client).

Plus two helpers the worker uses for hand-offs in either mode: ``refused(query, edns_max)``
and ``count_reply(page, proto, reply)``.

What it must not do: import the control plane (sources, records, server).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
import zlib

from kdns import settings
from kdns.packet import counters as C
from kdns.zone import refpath
from kdns.zone.encode import ip_key
from kdns.zone.layout import FLAG_SYNCED, HEADER

log = logging.getLogger("kdns.packet.engine")

DROP, SEND, HANDOFF = refpath.ACTION_DROP, refpath.ACTION_SEND, refpath.ACTION_HANDOFF
_OPT_EXT_RCODE_FROM_END = 6      # OPT (no options) is last: ext-rcode sits 6 bytes from the end


# --------------------------------------------------------------------------- counting


def _page_words(buffer) -> memoryview:
    words = memoryview(buffer).cast("B").cast("Q")
    if len(words) < C.SLOT_WORDS:
        raise ValueError(f"a counter page holds {C.SLOT_WORDS} words, got {len(words)}")
    return words


def _qtype(query: bytes) -> int:
    """The question's type, or 0 ("other") when the path does not read the question: as in
    ``refpath.answer``, a short packet, a response (QR) or QDCOUNT != 1 stop before it."""
    if len(query) < 12 or query[2] & 0x80 or query[4:6] != b"\0\1":
        return 0
    try:
        _, end = refpath.parse_name(query, 12)
    except refpath.Malformed:
        return 0
    if end + 4 > len(query):
        return 0
    return struct.unpack_from("!H", query, end)[0]


def _question_type(reply: bytes) -> int:
    """QTYPE of a reply's question (0 when it has none that parses)."""
    if len(reply) < 12 or reply[4:6] != b"\0\1":
        return 0
    try:
        _, end = refpath.parse_name(reply, 12)
    except refpath.Malformed:
        return 0
    return struct.unpack_from("!H", reply, end)[0] if end + 4 <= len(reply) else 0


def _rcode(reply: bytes) -> int:
    rcode = reply[3] & 0x0F
    # RFC 6891 §6.1.3: BADVERS is extended rcode 1 with header rcode 0; our replies put a
    # bare OPT last, so its extended-rcode byte is at a fixed distance from the end.
    arcount = struct.unpack_from("!H", reply, 10)[0]
    if rcode == 0 and arcount and len(reply) >= 12 + refpath.OPT_LEN \
            and reply[-refpath.OPT_LEN:-refpath.OPT_LEN + 3] == b"\0\0\x29" \
            and reply[-_OPT_EXT_RCODE_FROM_END] == refpath.BADVERS_EXT:
        return 16
    return rcode


def _do_bit(query: bytes) -> int:
    """The EDNS DO bit (RFC 3225) of a standard query with one question that parses, else 0
    (as _fastpath.answer_query, which reads the OPT only of those)."""
    if len(query) < 12 or query[2] & 0x78 or query[4:6] != b"\0\1":
        return 0
    try:
        _, qend = refpath.parse_name(query, 12)
        an, ns, ar = struct.unpack_from("!HHH", query, 6)
        opt = refpath.parse_edns(query, qend + 4, an, ns, ar)
    except (refpath.Malformed, struct.error, IndexError):
        return 0
    return opt[2] if opt is not None else 0


def client_is_ipv6(addr) -> bool:
    """A socket-module address of an IPv6 client; an IPv4 client of a dual-stack socket
    arrives IPv4-mapped (RFC 4291 §2.5.5.2) and is IPv4."""
    return len(addr) == 4 and not addr[0].lower().startswith("::ffff:")


def _count_query(words, proto: str, query: bytes, v6: bool = False) -> None:
    L = C.LAYOUT
    qtype = C.QTYPES[C.qtype_index(_qtype(query))][0]
    words[L[f"{'v6queries' if v6 else 'queries'}_{proto}_{qtype}"]] += 1
    words[L[f"request_size_{proto}_bucket_{C.size_bucket(len(query))}"]] += 1
    words[L[f"request_size_{proto}_sum"]] += len(query)
    if _do_bit(query):
        words[L[f"do_{proto}"]] += 1


def _count_sent(words, proto: str, reply: bytes) -> None:
    L = C.LAYOUT
    rcode = _rcode(reply)
    words[L[f"rcode_{proto}_{rcode}"]] += 1
    if rcode == refpath.FORMERR:
        words[L[f"formerr_{proto}"]] += 1
    if reply[2] & 0x02:                          # TC
        words[L[f"truncated_{proto}"]] += 1
    elif rcode == 0 and reply[6:8] == b"\0\0":    # NODATA (RFC 2308 §2.2)
        words[L[f"nodata_{proto}"]] += 1
    words[L[f"response_size_{proto}_bucket_{C.size_bucket(len(reply))}"]] += 1
    words[L[f"response_size_{proto}_sum"]] += len(reply)


def _count_latency(words, proto: str, qtype: int, started_ns: int) -> None:
    """A reply's request duration, by protocol and by query type."""
    elapsed = max(0, time.monotonic_ns() - started_ns)
    bucket = C.latency_bucket(elapsed)
    words[C.LAYOUT[f"latency_{proto}_bucket_{bucket}"]] += 1
    words[C.LAYOUT[f"latency_{proto}_sum_ns"]] += elapsed
    t = C.QTYPES[C.qtype_index(qtype)][0]
    words[C.LAYOUT[f"tlatency_{t}_bucket_{bucket}"]] += 1
    words[C.LAYOUT[f"tlatency_{t}_sum_ns"]] += elapsed


def pure_autopath(img: PureImage, query: bytes, tcp: bool, edns_max: int, client,
                  action: int, reply: bytes) -> bool:
    """Whether the pure path's reply came from a later step of the client's search path:
    an answer behind a CNAME where the asked name alone is NXDOMAIN (the compiled path
    knows it as it builds the reply; this path asks again without the client)."""
    if client is None or action != SEND or len(reply) < 12 or reply[3] & 0xF \
            or reply[6:8] == b"\0\0":
        return False
    alone = pure_answer(img, query, tcp, edns_max=edns_max, client=None)
    return alone[0] == SEND and len(alone[1]) >= 12 and alone[1][3] & 0xF == refpath.NXDOMAIN


def _count(words, proto: str, query: bytes, action: int, reply: bytes, started_ns: int,
           v6: bool = False, autopath: bool = False) -> None:
    """As ``_fastpath.count_packet`` + ``count_latency``: every received packet counts as a
    request (type, size, DO); then what became of it. A reply sent now is a latency sample;
    a hand-off's sample is taken when its reply is sent (count_reply)."""
    _count_query(words, proto, query, v6)
    if action == SEND:
        _count_sent(words, proto, reply)
        if autopath:
            words[C.LAYOUT[f"autopath_{proto}"]] += 1
        _count_latency(words, proto, _qtype(query), started_ns)
    elif action == HANDOFF:
        # The reply's rcode and time are counted when the worker sends it (count_reply).
        words[C.LAYOUT[f"handoff_{proto}"]] += 1
    else:
        words[C.LAYOUT[f"dropped_{proto}"]] += 1


def count_reply(page, proto: str, reply: bytes, received_ns: int | None = None) -> None:
    """Count a reply the worker sent for a handed-off query (either engine): its rcode and
    size, and its request duration since ``received_ns`` (time.monotonic_ns() when the query
    arrived), so that forwarded queries are timed to their final reply as CoreDNS times
    them. The query itself was counted by the engine when it handed the packet off."""
    if len(reply) >= 12:
        words = _page_words(page)
        _count_sent(words, proto, reply)
        if received_ns is not None:
            _count_latency(words, proto, _question_type(reply), received_ns)


def refused(query: bytes, edns_max: int = settings.EDNS_UDP_SIZE) -> bytes | None:
    """REFUSED for a query the image does not cover and nobody to forward it to."""
    return rcode_reply(query, refpath.REFUSED, edns_max)


def rcode_reply(query: bytes, rcode: int, edns_max: int = settings.EDNS_UDP_SIZE) -> bytes | None:
    """``rcode`` with no records (REFUSED, or SERVFAIL when the hand-off broke). Echoes the question and, when the query had one, an OPT
    (RFC 6891 §6.1.1). None when the query cannot be echoed (the engine had parsed it, so
    this only happens for a caller's mistake)."""
    try:
        _, qend = refpath.parse_name(query, 12)
        qend += 4
        if qend > len(query):
            return None
        qd, an, ns, ar = struct.unpack_from("!HHHH", query, 4)
        opt = refpath.parse_edns(query, qend, an, ns, ar)
    except (refpath.Malformed, struct.error):
        return None
    edns = None
    if opt is not None:
        edns = (max(refpath.EDNS_MIN, min(opt[0], edns_max)), opt[2], 0)
    return refpath.reply(query, qend, 0, rcode, None, edns)


# --------------------------------------------------------------------------- pure engine


class PureImage:
    """``refpath.Image`` with the ``_fastpath.Image`` surface."""

    __slots__ = ("_buffer", "ref")

    def __init__(self, buffer):
        self._buffer = buffer
        self.ref = refpath.Image(buffer)      # ValueError on bad magic or length

    def verify(self) -> bool:
        """True, or ValueError when the CRC does not match (as ``_fastpath``)."""
        crc = HEADER.unpack_from(self._buffer, 0)[12]
        data = zlib.crc32(memoryview(self._buffer)[HEADER.size:])
        if data != crc:
            raise ValueError(f"kdns image crc32 mismatch: header {crc:#x}, data {data:#x}; "
                             f"the image is corrupt")
        return True

    @property
    def serial(self) -> int:
        return self.ref.serial

    @property
    def synced(self) -> bool:
        return bool(self.ref.flags & FLAG_SYNCED)

    @property
    def autopath(self) -> bool:
        return bool(self.ref.autopath)


def client_key(addr) -> bytes | None:
    """A socket address's 16-byte key for autopath (``encode.ip_key``), or None."""
    try:
        return ip_key(addr[0])
    except (TypeError, ValueError, IndexError, OSError):
        return None


def pure_answer(img: PureImage, query: bytes, tcp: bool = False, *, edns_max: int,
                ra: bool = False, rotation=0, client=None):
    try:
        return refpath.answer(img.ref, bytes(query), tcp=tcp, edns_max=edns_max, ra=ra,
                              rotation=0 if rotation is None else rotation, client=client)
    except Exception:   # noqa: BLE001 -- bad input never crashes a worker (docs/architecture.md)
        log.debug("pure path raised on a %d-byte query; dropped", len(query), exc_info=True)
        return DROP, b""


class PureCounters:
    """One worker's counter page as uint64 words."""

    __slots__ = ("words",)

    def __init__(self, buffer):
        self.words = _page_words(buffer)


def pure_tcp_answer(img: PureImage, counters: PureCounters, msg: bytes, edns_max: int,
                    ra: bool = False, v6: bool = False, rotation=None, client=None):
    started = time.monotonic_ns()
    action, reply = pure_answer(img, msg, tcp=True, edns_max=edns_max, ra=ra,
                                rotation=rotation, client=client)
    _count(counters.words, "tcp", msg, action, reply, started, v6,
           pure_autopath(img, msg, True, edns_max, client, action, reply))
    return action, reply


class PureUdpServer:
    """Drains a non-blocking UDP socket one ``recvfrom`` at a time (the compiled one batches
    with ``recvmmsg``/``sendmmsg``); same results, same counters."""

    def __init__(self, fd: int, edns_max: int, batch: int = 64):
        self.sock = socket.socket(fileno=os.dup(fd))   # our own fd: the caller keeps theirs
        self.sock.setblocking(False)
        self.edns_max = edns_max
        self.batch = batch
        self.ra = False           # set RA on the image's replies: this worker forwards
        self.rotation = None
        self._handoffs: list[tuple[bytes, tuple, int]] = []

    def set_rotation(self, rotation) -> None:
        self.rotation = rotation

    def serve(self, img: PureImage, counters: PureCounters, max_batches: int = 16) -> int:
        self._handoffs.clear()
        words = counters.words
        for _ in range(self.batch * max_batches):
            try:
                query, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue          # e.g. an ICMP error queued on the socket; keep draining
            started = time.monotonic_ns()
            client = client_key(addr) if img.autopath else None
            action, reply = pure_answer(img, query, tcp=False, edns_max=self.edns_max,
                                        ra=self.ra, rotation=self.rotation, client=client)
            if action == SEND:
                try:
                    self.sock.sendto(reply, addr)
                except OSError:
                    words[C.LAYOUT["send_failed_udp"]] += 1
            elif action == HANDOFF:
                self._handoffs.append((query, addr, started))
            _count(words, "udp", query, action, reply, started, client_is_ipv6(addr),
                   pure_autopath(img, query, False, self.edns_max, client, action, reply))
        return len(self._handoffs)

    def handoff_packet(self, i: int) -> bytes:
        return self._handoffs[i][0]

    def handoff_addr(self, i: int) -> tuple:
        return self._handoffs[i][1]

    def handoff_received_ns(self, i: int) -> int:
        return self._handoffs[i][2]

    def close(self) -> None:
        self.sock.close()


def _select():
    if settings.ENV.pure:
        return None
    try:
        from kdns.packet import _fastpath
        return (_fastpath.Image, _fastpath.answer, _fastpath.Counters, _fastpath.UdpServer,
                _fastpath.tcp_answer, _fastpath.Rotation)
    except (ImportError, AttributeError) as e:
        log.info("compiled packet path unavailable (%s); using the pure-Python one", e)
        return None


_fast = _select()
PURE = _fast is None
if PURE:
    Image, answer, Counters, UdpServer, tcp_answer, Rotation = (
        PureImage, pure_answer, PureCounters, PureUdpServer, pure_tcp_answer, refpath.Rotation)
else:
    Image, answer, Counters, UdpServer, tcp_answer, Rotation = _fast
IMPLEMENTATION = "pure" if PURE else "compiled"
