"""Queries in classes other than IN: answered here, in the worker, and never forwarded.

Why: the zone and the upstreams are class IN (QCLASS ANY is answered as IN by the packet
path, RFC 6895 §3.2). A CHAOS query asks about this server, so an upstream's answer would be
a lie about kdns, and forwarding one leaks the name asked. CoreDNS's ``chaos`` plugin answers
TXT in class CH for ``version.bind`` / ``version.server`` (its version) and
``hostname.bind`` / ``id.server`` (the host's name); kdns answers the same names the same
way, TTL 0. Every other query in CH, HS or another class is REFUSED (RFC 1035 §4.1.1: the
server declines by policy), dns-rules §2.5.

What it must not do: send anything upstream, or answer class IN or ANY (``answer`` returns
None for those: they are the forwarder's).
"""
from __future__ import annotations

import socket
import struct

from kdns.dns.wire import CLASS_ANY, CLASS_CH, CLASS_IN, EDNS_MIN, QR, REFUSED, T_TXT, TCP_MAX
from kdns.zone import refpath

VERSION_NAMES = {("version", "bind"), ("version", "server")}
HOST_NAMES = {("hostname", "bind"), ("id", "server")}
_version: str | None = None


def kdns_version() -> str:
    """``kdns <version>`` as ``kdns --version`` prints it (once: it reads package metadata)."""
    global _version
    if _version is None:
        try:
            from importlib.metadata import version
            _version = f"kdns {version('kdns')}"
        except Exception:  # noqa: BLE001 -- run from a checkout without metadata
            _version = "kdns"
    return _version


def txt_rdata(text: str) -> bytes:
    """One TXT RDATA: the text as character-strings of at most 255 bytes (RFC 1035 §3.3.14)."""
    raw = text.encode("utf-8", "replace")
    parts = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return b"".join(bytes([len(p)]) + p for p in parts)


def answer(query: bytes, proto: str, edns_max: int) -> bytes | None:
    """The reply to a query in a class other than IN and ANY; None for IN and ANY (and for
    a packet that is no query: the packet path already answered or dropped those)."""
    query = bytes(query)
    try:
        if len(query) < 12 or query[2] & (QR >> 8):
            return None
        labels, qend = refpath.parse_name(query, 12)
        if qend + 4 > len(query):
            return None
        qtype, qclass = struct.unpack_from("!HH", query, qend)
        if qclass in (CLASS_IN, CLASS_ANY):
            return None
        qend += 4
        an, ns, ar = struct.unpack_from("!HHH", query, 6)
        opt = refpath.parse_edns(query, qend, an, ns, ar)
    except (refpath.Malformed, struct.error):
        return None
    edns = None
    if opt is not None:
        edns = (max(EDNS_MIN, min(opt[0], edns_max)), opt[2], 0)
    limit = TCP_MAX if proto == "tcp" else (edns[0] if edns else refpath.UDP_PLAIN)
    key = tuple(label.lower().decode("latin-1") for label in labels)
    text = None
    if qclass == CLASS_CH and qtype == T_TXT:
        if key in VERSION_NAMES:
            text = kdns_version()
        elif key in HOST_NAMES:
            text = socket.gethostname()
    if text is None:
        return refpath.reply(query, qend, 0, REFUSED, None, edns, limit)
    rdata = txt_rdata(text)
    rr = struct.pack("!HHHIH", 0xC00C, T_TXT, CLASS_CH, 0, len(rdata)) + rdata
    return refpath.reply(query, qend, 0, 0, None, edns, limit, synth=rr)
