"""DNS names: as text, the facts both the record rules and the zone compiler need; on the
wire, the one walker over compressed names and the records they own.
"""
from __future__ import annotations

import socket
import struct

from kdns.dns.wire import HEADER_LEN, MAX_LABEL, MAX_NAME

_RR = struct.Struct("!HHIH")


def reverse_name(ip: str) -> str:
    """PTR owner name of an IP in canonical text form (RFC 1035 §3.5, RFC 3596 §2.5).

    Written out rather than through ``ipaddress``: at 100,000 endpoints its objects cost more
    than the rest of a PTR's rules."""
    if ":" not in ip:
        a, b, c, d = ip.split(".")
        return f"{d}.{c}.{b}.{a}.in-addr.arpa."
    return ".".join(socket.inet_pton(socket.AF_INET6, ip).hex()[::-1]) + ".ip6.arpa."


# A name has at most 127 labels (RFC 1035 §2.3.4: 255 bytes), so a name with more pointers
# than that loops.
MAX_HOPS = MAX_NAME // 2
RR_FIXED = 10            # TYPE, CLASS, TTL, RDLENGTH after the owner (RFC 1035 §4.1.3)


def name_end(msg: bytes, off: int) -> int:
    """The offset just past the (possibly compressed) name at ``off``, or -1 if it is not
    a valid name of ``msg``.

    Valid means: every pointer goes strictly backwards (RFC 1035 §4.1.4: to a "prior
    occurrence") to a point past the header, at most MAX_HOPS of them, no label over
    MAX_LABEL (0x40 and 0x80 label types are not DNS names, RFC 6891 §5), and the name with
    its pointers followed is at most MAX_NAME bytes. Backwards-only means a chain of
    pointers cannot loop; the length bound stops labels that run into the pointer leading
    back to them."""
    end, total, hops, size = -1, 1, 0, len(msg)
    while True:
        if off >= size:
            return -1
        n = msg[off]
        if n == 0:
            return end if end >= 0 else off + 1
        if n & 0xC0 == 0xC0:
            if off + 2 > size:
                return -1
            ptr = (n & 0x3F) << 8 | msg[off + 1]
            hops += 1
            if ptr < HEADER_LEN or ptr >= off or hops > MAX_HOPS:
                return -1
            if end < 0:
                end = off + 2
            off = ptr
            continue
        if n > MAX_LABEL:
            return -1
        total += n + 1
        if total > MAX_NAME:
            return -1
        off += 1 + n


def rr_at(msg: bytes, off: int) -> tuple[int, int, int, int, int] | None:
    """The resource record at ``off`` as (type, class, ttl, rdata offset, end offset), or
    None if its owner name is not valid (name_end) or the record runs past the message."""
    at = name_end(msg, off)
    if at < 0 or at + RR_FIXED > len(msg):
        return None
    rtype, rclass, ttl, rdlen = _RR.unpack_from(msg, at)
    end = at + RR_FIXED + rdlen
    if end > len(msg):
        return None
    return rtype, rclass, ttl, at + RR_FIXED, end
