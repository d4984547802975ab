"""ExternalName services whose target is outside the cluster: CNAME + the target's records.

Why: CoreDNS answers ``ext.ns.svc.cluster.local A`` for ``externalName: www.example.com``
with the CNAME followed by the target's A records, resolved upstream; a client
that only gets the CNAME must ask again. The image marks such chains (``HDR_HANDOFF``) and
the packet paths hand them off; here the worker asks ``refpath`` for the CNAME part (the
same bytes the image would send), asks the forwarder (and so its cache) for the target with
the client's type, and appends the upstream's records, uncompressed (their compression
pointers point into the upstream's message, not ours: RFC 1035 §4.1.4).

What it must not do: cache the composed answer (the CNAME is cluster data and comes from the
live image every time; only the target's records are cached, under the target's name).
"""
from __future__ import annotations

import struct

from kdns import settings
from kdns.zone import refpath
from kdns.forward.forwarder import Forwarder, opt_rr, parse_query
from kdns.zone.refpath import Malformed

from kdns.dns.wire import (CD, QR, RA, RD, T_CNAME, T_MX, T_NS, T_PTR, T_SOA, TC,  # noqa: F401
                           TCP_MAX, UDP_PLAIN)
MAX_POINTERS = 64


def read_name(msg: bytes, off: int) -> tuple[bytes, int]:
    """A possibly compressed name -> (uncompressed wire form, offset after it where it was)."""
    out, end, jumps = bytearray(), None, 0
    while True:
        if off >= len(msg):
            raise Malformed
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 2 > len(msg) or jumps >= MAX_POINTERS:
                raise Malformed
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            continue
        if n > 63 or off + 1 + n > len(msg):
            raise Malformed
        out += msg[off:off + 1 + n]
        if len(out) > 255:
            raise Malformed
        if n == 0:
            return bytes(out), end if end is not None else off + 1
        off += 1 + n


def read_rr(msg: bytes, off: int) -> tuple[bytes, int, int]:
    """One RR -> (its bytes with every name uncompressed, its type, the offset after it).

    Names inside RDATA are expanded only for the RFC 1035 types that may compress them
    (RFC 3597 §4: no other type may)."""
    owner, off = read_name(msg, off)
    if off + 10 > len(msg):
        raise Malformed
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
    start, end = off + 10, off + 10 + rdlen
    if end > len(msg):
        raise Malformed
    if rtype in (T_NS, T_CNAME, T_PTR):
        rdata = read_name(msg, start)[0]
    elif rtype == T_MX:
        rdata = msg[start:start + 2] + read_name(msg, start + 2)[0]
    elif rtype == T_SOA:
        mname, o = read_name(msg, start)
        rname, o = read_name(msg, o)
        rdata = mname + rname + msg[o:o + 20]
    else:
        rdata = msg[start:end]
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata, rtype, end


def sections(msg: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """(end of question, [(section, start, end)] of every RR)."""
    an, ns, ar = struct.unpack_from("!HHH", msg, 6)
    off = refpath.skip_name(msg, 12) + 4
    qend, out = off, []
    for i in range(an + ns + ar):
        start = off
        off = refpath.skip_rr(msg, off)[4]
        out.append((0 if i < an else 1 if i < an + ns else 2, start, off))
    return qend, out



def reply_limit(q, proto: str, edns_max: int) -> int:
    """How long the reply to ``q`` may be: 65535 over TCP, else the client's EDNS size capped
    by ours (RFC 6891 §6.2.5), else 512 (RFC 1035 §2.3.4)."""
    return TCP_MAX if proto == "tcp" else (
        max(UDP_PLAIN, min(q.edns[0], edns_max)) if q.edns else UDP_PLAIN)


def fit(body: bytearray, records, opt: bytes, limit: int) -> tuple[int, bool]:
    """Append whole ``records`` to ``body`` while the reply (header, body, ``opt``) stays
    within ``limit``: (how many fit, whether one was cut: the reply's TC, RFC 2181 §9)."""
    kept = 0
    for rr in records:
        if 12 + len(body) + len(rr) + len(opt) > limit:
            return kept, True
        body += rr
        kept += 1
    return kept, False

class ExternalNames:
    """Completes the CNAME answers the image hands off (see the module docstring)."""

    def __init__(self, forwarder: Forwarder, edns_max: int = settings.EDNS_UDP_SIZE):
        self.forwarder, self.edns_max = forwarder, edns_max
        self._img = self._ref = None

    def ref_image(self, img) -> refpath.Image | None:
        if img is not self._img:
            buf = getattr(img, "buffer", None)
            if buf is None:
                buf = getattr(img, "_buffer", None)
            self._img, self._ref = img, refpath.Image(buf) if buf is not None else None
        return self._ref

    def cname_only(self, img, query: bytes, proto: str) -> bytes | None:
        """The image's CNAME answer alone (nobody to resolve the target with), or None when
        the query is not an external CNAME."""
        ref = self.ref_image(img)
        if ref is None:
            return None
        action, reply = refpath.answer(ref, query, tcp=proto == "tcp", edns_max=self.edns_max,
                                       external_cname=True)
        return reply if action == refpath.ACTION_SEND else None

    async def answer(self, img, query: bytes, proto: str) -> bytes | None:
        """The composed reply, or None when the query is not an external CNAME."""
        ref = self.ref_image(img) if img is not None else None
        if ref is None:
            return None
        action, cname = refpath.answer(ref, query, tcp=True, edns_max=self.edns_max,
                                       external_cname=True)
        if action != refpath.ACTION_SEND:
            return None
        try:
            q = parse_query(query)
            qend, rrs = sections(cname)
            cut = max((e for s, _, e in rrs if s == 0), default=qend)
            target = self._last_target(cname, rrs)
        except (Malformed, struct.error, IndexError):
            return None
        if target is None or q is None:
            return None
        sub = self._subquery(q, target, query)
        up = await self.forwarder.resolve(sub, "tcp")
        return self._compose(cname, cut, up, q, proto)

    @staticmethod
    def _last_target(msg: bytes, rrs) -> bytes | None:
        target = None
        for sec, start, _ in rrs:
            if sec != 0:
                continue
            rr, rtype, _ = read_rr(msg, start)
            if rtype == T_CNAME:
                owner_len = len(read_name(msg, start)[0])
                target = rr[owner_len + 10:]
        return target

    def _subquery(self, q, target: bytes, query: bytes) -> bytes:
        # The client's type, class, CD and DO; a fresh question for the target.
        flags = RD | (q.flags & CD)
        opt = opt_rr(q.edns[0], q.edns[1]) if q.edns else b""
        head = struct.pack("!HHHHHH", q.qid, flags, 1, 0, 0, 1 if opt else 0)
        return head + target + query[12 + len(q.qbytes) - 4:12 + len(q.qbytes)] + opt

    def _compose(self, cname: bytes, cut: int, up: bytes | None, q, proto: str) -> bytes:
        ncname = struct.unpack_from("!H", cname, 6)[0]
        flags = struct.unpack_from("!H", cname, 2)[0] & ~(0xF | TC)
        extra, rcode, nauth = [], 0, 0
        if up is not None and len(up) >= 12:
            rcode = up[3] & 0xF
            try:
                _, rrs = sections(up)
                answers = [read_rr(up, s)[0] for sec, s, _ in rrs if sec == 0]
                # RFC 2308 §2: a negative answer carries the SOA in the authority section.
                auth = [] if answers else [read_rr(up, s)[0] for sec, s, _ in rrs if sec == 1]
            except (Malformed, struct.error):
                answers, auth, rcode = [], [], 2          # SERVFAIL: unusable upstream reply
            extra, nauth = answers + auth, len(auth)
        else:
            rcode = 2
        opt = cname[cut:]          # refpath's OPT for this client (or nothing)
        body = bytearray(cname[12:cut])
        kept, cut_off = fit(body, extra, opt, reply_limit(q, proto, self.edns_max))
        if cut_off:
            flags |= TC
        nans = min(kept, len(extra) - nauth)
        head = struct.pack("!HHHHHH", q.qid, flags | RA | rcode, 1, ncname + nans, kept - nans,
                           1 if opt else 0)
        return head + bytes(body) + opt
