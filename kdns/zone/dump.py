"""The records a zone image answers with, read back from the image, as a master file.

Why: an operator asking "what is kdns serving right now" (kube-dns's ``/cache`` on the
healthz port) wants the live zone, not the input it was compiled from: this reads the
published bytes, so what it prints is what the packet path answers. It runs in the
supervisor on request, never on the packet path.

How: every node's answers are complete DNS reply sections, encoded for a question naming
that node at offset 12 (layout.py); rebuilding that question in front of a blob gives a
message whose compression pointers resolve, and the answer section's records owned by the
node are its records. Synthesised pod names and negative answers hold no records and are
not listed; the lines are sorted as ``kdns records`` sorts them.
"""
from __future__ import annotations

import ipaddress
import struct

from kdns.dns import rr as R
from kdns.dns.names import reverse_name
from kdns.zone import layout as L

_MAX_HOPS = 64               # compression pointers followed per name (RFC 1035 §4.1.4)


def master_text(image) -> str:
    """Every record of ``image`` (bytes, mmap or memoryview) as RFC 1035 §5 lines."""
    with memoryview(image) as buf:      # released on return: the caller may close an mmap
        return _master_text(buf)


def _master_text(buf: memoryview) -> str:
    head = L.HEADER.unpack_from(buf, 0)
    if head[0] != L.MAGIC or head[1] != len(buf):
        raise ValueError("not a kdns zone image")
    nodes_off, nnodes, rev_off, nrev = head[3], head[4], head[7], head[8]
    lines: set[tuple] = set()

    def node_at(i: int) -> tuple:
        return L.NODE.unpack_from(buf, nodes_off + i * L.NODE_SIZE)

    # Depth-first from the root (node 0); children are contiguous.
    stack = [(0, ())]
    while stack:
        i, labels = stack.pop()
        label_off, first, nchild, rr_off, nrr, flags, _ = node_at(i)
        if i:
            n = buf[label_off]
            labels = (bytes(buf[label_off + 1:label_off + 1 + n]),) + labels
        _collect(buf, labels, rr_off, nrr, lines)
        for c in range(first, first + nchild) if nchild else ():
            if c < nnodes:
                stack.append((c, labels))
    for k in range(nrev):
        fam, ip, rr_off, nrr, _ = L.REV.unpack_from(buf, rev_off + k * L.REV_SIZE)
        addr = ipaddress.ip_address(ip[:4] if fam == 4 else ip)
        _collect(buf, R.name_labels(reverse_name(str(addr))), rr_off, nrr, lines)
    return "".join(text + "\n" for _, text in sorted(lines))


def _collect(buf, labels: tuple, rr_off: int, nrr: int, out: set) -> None:
    qname = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    for j in range(nrr):
        qtype, _, blob = L.RRENT.unpack_from(buf, rr_off + j * L.RRENT_SIZE)
        hdr, an, _, _, nfix, nseg, length, _, _ = L.BLOBHDR.unpack_from(buf, blob)
        if not an:
            continue
        data_off = blob + L.BLOBHDR_SIZE + 2 * nfix
        data_off += -data_off % 4
        data_off += nseg * L.SEG_SIZE
        msg = bytes(12) + qname + struct.pack("!HH", qtype, 1) + bytes(buf[data_off:data_off + length])
        pos = 12 + len(qname) + 4
        for _ in range(an):
            owner, pos = _name(msg, pos)
            rtype, _, ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            if owner == labels:
                text = _rdata_text(msg, pos, rtype, rdlen)
                name = _text(owner)
                out.add(((owner[::-1], rtype, text),
                         f"{name}\t{ttl}\tIN\t{R.TYPE_NAMES.get(rtype, f'TYPE{rtype}')}\t{text}"))
            pos += rdlen


def _name(msg: bytes, pos: int) -> tuple[tuple, int]:
    labels, end, hops = [], None, 0
    while True:
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = pos + 2
            hops += 1
            if hops > _MAX_HOPS:
                raise ValueError("compression loop in a zone image blob")
            pos = (n & 0x3F) << 8 | msg[pos + 1]
            continue
        if n == 0:
            return tuple(labels), (pos + 1 if end is None else end)
        labels.append(msg[pos + 1:pos + 1 + n].lower())
        pos += 1 + n


def _text(labels: tuple) -> str:
    return ".".join(x.decode("ascii", "backslashreplace") for x in labels) + "."


def _rdata_text(msg: bytes, pos: int, rtype: int, rdlen: int) -> str:
    rd = msg[pos:pos + rdlen]
    if rtype == R.A:
        return str(ipaddress.IPv4Address(rd))
    if rtype == R.AAAA:
        return str(ipaddress.IPv6Address(rd))
    if rtype in (R.CNAME, R.PTR, R.NS):
        return _text(_name(msg, pos)[0])
    if rtype == R.SRV:
        prio, weight, port = struct.unpack_from("!HHH", msg, pos)
        return f"{prio} {weight} {port} {_text(_name(msg, pos + 6)[0])}"
    if rtype == R.SOA:
        mname, p = _name(msg, pos)
        rname, p = _name(msg, p)
        serial, refresh, retry, expire, minimum = struct.unpack_from("!IIIII", msg, p)
        return f"{_text(mname)} {_text(rname)} {serial} {refresh} {retry} {expire} {minimum}"
    if rtype == R.TXT:
        parts, p = [], 0
        while p < len(rd):
            n = rd[p]
            s = rd[p + 1:p + 1 + n].decode("ascii", "backslashreplace")
            s = s.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{s}"')
            p += 1 + n
        return " ".join(parts)
    return f"\\# {rdlen} {rd.hex()}"      # RFC 3597 §5: an unknown type's rdata
