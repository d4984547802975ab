"""The packet path in plain Python: the readable statement of the rules and the test oracle.

Same image in, same bytes out as ``_fastpath.answer``; the tests hold the two to byte
equality. It also serves when the extension is not built (or ``KDNS_PURE=1``), slowly.
It must not import the control plane: only the image layout (``layout.py``) and the
reverse-name rules from ``encode.py``. It reads fields by their layout names, as
``_fastpath.pyx`` does.
"""
from __future__ import annotations

import struct

from kdns import settings
from kdns.zone import layout as L
from kdns.zone.encode import ip_key, ipv4_key, reverse_to_ip
from kdns.zone.layout import (BLOBHDR, FLAG_SYNCED, HDR_HANDOFF, HEADER, MAGIC, NODE_POD_NS,
                              NODE_POD_VERIFIED, NODE_ZONE_APEX, SEG, ZONE, ZONE_ALIAS, ZONE_HOSTS,
                              ZONE_HOSTS_FINAL, ZONE_REVERSE)

ACTION_DROP, ACTION_SEND, ACTION_HANDOFF = 0, 1, 2

from kdns.dns.wire import (AA, CD, CLASS_ANY, CLASS_IN, EDNS_MIN, FORMERR, HEADER_LEN,  # noqa: F401
                           MAX_LABEL, MAX_NAME, NOTIMP, NXDOMAIN, QR, RA, RD, REFUSED,
                           RFC8482_HINFO, SERVFAIL, T_A, T_AAAA, T_ANY, T_AXFR, T_HINFO, T_IXFR,
                           T_OPT, TC, TCP_MAX, UDP_PLAIN)
from kdns.dns.names import MAX_HOPS, name_end, rr_at  # noqa: F401
OPT_LEN = 11
BADVERS_EXT = 1         # RFC 6891 §6.1.3: rcode 16 = extended 1, header 0


class Malformed(Exception):
    pass


class Rotation:
    """A worker's rotation state (layout.py, Rotation): one counter per slot, advanced each
    time an answer that rotates is sent from a blob of that slot. The packet paths take
    this, or a plain int: the counter every rotating answer then uses, modulo the run's
    length (0: the order the compiler laid out)."""

    def __init__(self):
        self.slots = [0] * L.ROT_SLOTS

    def take(self, blob: int, n: int) -> int:
        """The turn for the ``n`` records of the run in ``blob``. The slot holds the next
        turn, kept below ``n`` so that the compiled path never divides; a larger value is
        another name's (two blobs that hash alike), taken modulo ``n``."""
        i = L.rot_slot(blob)
        turn = self.slots[i]
        if turn >= n:
            turn %= n
        self.slots[i] = turn + 1 if turn + 1 < n else 0
        return turn


def parse_name(q: bytes, off: int) -> tuple[list[bytes], int]:
    """Question name -> (labels as sent, end offset). No compression (RFC 1035 §4.1.4 allows
    it, but a one-question query has nothing earlier to point at, so a pointer is malformed)."""
    labels, total = [], 1
    while True:
        if off >= len(q):
            raise Malformed
        n = q[off]
        if n == 0:
            return labels, off + 1
        if n > 63:
            raise Malformed
        total += n + 1
        if total > 255 or off + 1 + n > len(q):
            raise Malformed
        labels.append(q[off + 1:off + 1 + n])
        off += 1 + n


def skip_name(q: bytes, off: int) -> int:
    """Skip a possibly compressed name in the other sections; the offset just past it.
    Malformed unless it is valid by ``kdns.dns.names.name_end``'s rules (RFC 1035 §4.1.4)."""
    end = name_end(q, off)
    if end < 0:
        raise Malformed
    return end


def skip_rr(q: bytes, off: int) -> tuple[int, int, int, int, int]:
    """The record at ``off`` as ``kdns.dns.names.rr_at`` gives it; Malformed if it is not one."""
    rr = rr_at(q, off)
    if rr is None:
        raise Malformed
    return rr


def parse_edns(q: bytes, off: int, an: int, ns: int, ar: int) -> tuple[int, int, int] | None:
    """Skip answer/authority records; return (udp_size, version, do_bit) of the OPT, if any."""
    opt = None
    for i in range(an + ns + ar):
        start = off
        rtype, rclass, ttl, _, off = skip_rr(q, off)
        if rtype == T_OPT:
            # RFC 6891 §6.1.1: only in the additional section, owner root, at most one.
            if i < an + ns or q[start] != 0 or opt is not None:
                raise Malformed
            o = start + 11
            while o < off:
                if o + 4 > off:
                    raise Malformed
                o += 4 + struct.unpack_from("!H", q, o + 2)[0]
            if o != off:
                raise Malformed
            opt = (rclass, (ttl >> 16) & 0xFF, (ttl >> 15) & 1)
    return opt


def header_only(q: bytes, rcode: int) -> bytes:
    qid, flags = struct.unpack_from("!HH", q, 0)
    return struct.pack("!HHHHHH", qid, QR | (flags & (0x7800 | RD | CD)) | rcode, 0, 0, 0, 0)


class Image:
    """Read-only view of an image with the accessors the walk needs."""

    def __init__(self, buf: bytes):
        self.buf = memoryview(buf)
        (magic, length, self.flags, self.nodes_off, self.nnodes, self.zones_off, self.nzones,
         self.rev_off, self.nrev, self.servfail, self.autopath, self.serial, _,
         _) = HEADER.unpack_from(buf, 0)
        if magic != MAGIC or length != len(buf):
            raise ValueError("not a kdns image")

    def u16(self, off: int) -> int:
        return self.buf[off] | self.buf[off + 1] << 8

    def u32(self, off: int) -> int:
        return int.from_bytes(self.buf[off:off + 4], "little")

    def node(self, i: int) -> int:
        """Where node ``i`` starts; its fields are at ``L.NODE_*`` from there."""
        return self.nodes_off + i * L.NODE_SIZE

    def label(self, off):
        n = self.buf[off]
        return bytes(self.buf[off + 1:off + 1 + n])

    def child(self, node: int, label: bytes):
        first, nchild = self.u32(node + L.NODE_FIRST_CHILD), self.u32(node + L.NODE_NCHILD)
        key = (len(label), label)
        lo, hi = 0, nchild
        while lo < hi:
            mid = (lo + hi) // 2
            lab = self.label(self.u32(self.node(first + mid) + L.NODE_LABEL_OFF))
            ck = (len(lab), lab)
            if ck == key:
                return first + mid
            if ck < key:
                lo = mid + 1
            else:
                hi = mid
        return -1

    def zone(self, zi):
        return ZONE.unpack_from(self.buf, self.zones_off + zi * ZONE.size)

    def lookup_rr(self, rr_off, nrr, qtype):
        default = 0
        for j in range(nrr):
            e = rr_off + j * L.RRENT_SIZE
            t, blob = self.u16(e + L.RRENT_QTYPE), self.u32(e + L.RRENT_BLOB)
            if t == qtype:
                return blob
            if t == 0:
                default = blob
        return default

    def rev_lookup(self, fam, ip):
        """The reverse entry's offset for (family, 16-byte address), or None."""
        key = (fam, ip)
        lo, hi = 0, self.nrev
        while lo < hi:
            mid = (lo + hi) // 2
            rec = self.rev_off + mid * L.REV_SIZE
            k = (self.buf[rec + L.REV_FAMILY], bytes(self.buf[rec + L.REV_IP:rec + L.REV_IP + 16]))
            if k == key:
                return rec
            if k < key:
                lo = mid + 1
            else:
                hi = mid
        return None


def parse_pod_label(label: bytes) -> tuple[int, bytes]:
    """Pod label -> (family, 16-byte key) or (0, b''). CoreDNS parse.go rules: exactly three
    dashes and no '--' is IPv4 (dashes for dots), anything else IPv6 (dashes for colons)."""
    s = label.lower()
    if s.count(b"-") == 3 and b"--" not in s:
        return ipv4_key(s.split(b"-"))
    return parse_ipv6(s.replace(b"-", b":"))


def parse_ipv6(s: bytes) -> tuple[int, bytes]:
    """RFC 4291 §2.2 text form, hex groups only; '::' must stand for at least one group."""
    if s.count(b"::") > 1:
        return 0, b""
    if b"::" in s:
        head, tail = s.split(b"::")
        hg = head.split(b":") if head else []
        tg = tail.split(b":") if tail else []
        if len(hg) + len(tg) > 7:
            return 0, b""
    else:
        hg, tg = s.split(b":"), []
        if len(hg) != 8:
            return 0, b""
    groups = []
    for g in hg + tg:
        if not 1 <= len(g) <= 4 or any(c not in b"0123456789abcdef" for c in g):
            return 0, b""
        groups.append(int(g, 16))
    fill = 8 - len(hg) - len(tg)
    vals = groups[:len(hg)] + [0] * fill + groups[len(hg):]
    return 6, b"".join(struct.pack("!H", v) for v in vals)


def answer(image: Image, q: bytes, *, tcp: bool = False, edns_max: int = settings.EDNS_UDP_SIZE,
           external_cname: bool = False, ra: bool = False,
           rotation: Rotation | int = 0, client: str | bytes | None = None) -> tuple[int, bytes]:
    """One query -> (action, reply). HANDOFF means: not ours to answer (forwarder's).

    ``external_cname``: answer a chain that leaves the cluster with its CNAMEs alone instead
    of handing it off (the forwarder's first half of such an answer). ``ra``: the worker
    forwards (it has upstreams), so every reply says recursion is available (RFC 1035
    §4.1.1), as kube-dns's did. ``rotation``: the state rotating answers take their order
    from (``Rotation``, or a fixed counter). ``client``: the client's address (text, or
    its 16-byte key, ``encode.ip_key``), which autopath looks up (``autopath``)."""
    if isinstance(client, str):
        client = ip_key(client)
    action, out = _answer(image, q, tcp, edns_max, external_cname, rotation, client)
    if ra and action == ACTION_SEND:
        out = out[:3] + bytes([out[3] | RA]) + out[4:]
    return action, out


def _answer(image: Image, q: bytes, tcp: bool, edns_max: int,
            external_cname: bool, rotation=0, client=None) -> tuple[int, bytes]:
    if len(q) < 12:
        return ACTION_DROP, b""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", q, 0)
    if flags & QR:
        return ACTION_DROP, b""          # a response: never answer it (no reflection loops)
    opcode = (flags >> 11) & 0xF
    if qd != 1:
        return ACTION_SEND, header_only(q, NOTIMP if opcode else FORMERR)
    try:
        labels, qend = parse_name(q, 12)
        if qend + 4 > len(q):
            raise Malformed
    except Malformed:
        return ACTION_SEND, header_only(q, NOTIMP if opcode else FORMERR)
    qtype, qclass = struct.unpack_from("!HH", q, qend)
    qend += 4
    if opcode:
        return ACTION_SEND, reply(q, qend, 0, NOTIMP, None, None, 0)
    try:
        opt = parse_edns(q, qend, an, ns, ar)
    except Malformed:
        return ACTION_SEND, reply(q, qend, 0, FORMERR, None, None, 0)
    if opt is not None:
        size = max(EDNS_MIN, min(opt[0], edns_max))
        if opt[1] > 0:
            return ACTION_SEND, reply(q, qend, 0, 0, None, (size, opt[2], BADVERS_EXT), 0)
        limit = TCP_MAX if tcp else size
        edns = (size, opt[2], 0)
    else:
        limit = TCP_MAX if tcp else UDP_PLAIN
        edns = None
    if qclass != CLASS_IN and qclass != CLASS_ANY:
        # CHAOS, Hesiod and the rest: the worker answers or refuses them, never the image
        # and never an upstream (dns-rules §2.5). QCLASS ANY matches IN (RFC 6895 §3.2), the
        # only class the zone has, so it is answered like IN, its records in class IN.
        return ACTION_HANDOFF, b""
    return resolve(image, q, qend, labels, qtype, limit, edns, external_cname, rotation, client)


def resolve(img: Image, q, qend, labels, qtype, limit, edns, external_cname=False, rotation=0,
            client=None):
    low = [label.lower() for label in labels]
    ni, zone, i, below_apex = 0, -1, len(low) - 1, -1
    node = img.node(0)
    while True:
        if img.u16(node + L.NODE_FLAGS) & NODE_ZONE_APEX:
            zone, below_apex = img.u32(node + L.NODE_EXTRA), i
        if i < 0:
            break
        c = img.child(node, low[i])
        if c < 0:
            break
        ni, node, i = c, img.node(c), i - 1
    if zone < 0:
        return ACTION_HANDOFF, b""
    apex_node, neg_blob, ttl, apex_len, kind = img.zone(zone)
    qlen = qend - 4 - 12
    apex_ptr = 12 + qlen - apex_len
    if kind == ZONE_REVERSE and i >= 0:
        fam, ip = reverse_to_ip(tuple(low))
        rec = img.rev_lookup(fam, ip) if fam else None
        if rec is None:
            return ACTION_HANDOFF, b""
        _, neg_blob, _, rzone_apex_len, _ = img.zone(img.u16(rec + L.REV_ZONE))
        nrr = img.u16(rec + L.REV_NRR)
        blob = img.lookup_rr(img.u32(rec + L.REV_RR_OFF), nrr, qtype)
        if blob:
            return ACTION_SEND, reply(q, qend, blob, 0, img, edns, limit, rotation=rotation)
        if qtype == T_ANY and nrr:
            return ACTION_SEND, reply(q, qend, 0, 0, None, edns, limit,
                                      synth=any_hinfo(img.zone(img.u16(rec + L.REV_ZONE))[2]))
        return ACTION_SEND, reply(q, qend, neg_blob, 0, img, edns, limit, 12 + qlen - rzone_apex_len)
    if kind == ZONE_HOSTS or kind == ZONE_HOSTS_FINAL or kind == ZONE_ALIAS:
        # Custom records (CoreDNS hosts): a name without records is not this zone's to
        # deny. With fallthrough the next plugin (the forwarder) answers it; without,
        # CoreDNS answers SERVFAIL, having no SOA to deny it with. The records do not
        # wait for the cluster's first sync.
        if i >= 0 or not img.u16(node + L.NODE_NRR):
            if kind != ZONE_HOSTS_FINAL:
                return ACTION_HANDOFF, b""
            return ACTION_SEND, reply(q, qend, img.servfail, 0, img, edns, limit)
    elif not img.flags & FLAG_SYNCED:
        return ACTION_SEND, reply(q, qend, img.servfail, 0, img, edns, limit)
    if qtype in (T_AXFR, T_IXFR):
        return ACTION_SEND, reply(q, qend, 0, REFUSED, None, edns, limit)
    if i < 0:
        nrr = img.u16(node + L.NODE_NRR)
        blob = img.lookup_rr(img.u32(node + L.NODE_RR_OFF), nrr, qtype)
        if blob and not external_cname and img.u16(blob + L.BLOB_HDR) & HDR_HANDOFF:
            return ACTION_HANDOFF, b""          # CNAME to outside: the forwarder completes it
        if blob:
            return ACTION_SEND, reply(q, qend, blob, 0, img, edns, limit, rotation=rotation)
        if qtype == T_ANY and nrr:
            # RFC 8482 §4.2: a name with data answers ANY with one synthesised HINFO, not
            # NODATA (which would say it has none); dns-rules §2.1.
            return ACTION_SEND, reply(q, qend, 0, 0, None, edns, limit, synth=any_hinfo(ttl))
        if kind == ZONE_ALIAS:
            return ACTION_HANDOFF, b""      # the target's NODATA, through the rewrite
        return ACTION_SEND, reply(q, qend, neg_blob, 0, img, edns, limit, apex_ptr)
    nflags = img.u16(node + L.NODE_FLAGS)
    if nflags & NODE_POD_NS and i == 0:
        fam, ip = parse_pod_label(low[0])
        if fam and (not nflags & NODE_POD_VERIFIED
                    or pod_ip_known(img, img.u32(node + L.NODE_EXTRA), ip)):
            if (fam, qtype) in ((4, T_A), (6, T_AAAA)):
                rdata = ip[:4] if fam == 4 else ip
                rr = struct.pack("!HHHIH", 0xC00C, qtype, CLASS_IN, ttl, len(rdata)) + rdata
                return ACTION_SEND, reply(q, qend, 0, 0, None, edns, limit, synth=rr)
            if qtype == T_ANY:
                return ACTION_SEND, reply(q, qend, 0, 0, None, edns, limit, synth=any_hinfo(ttl))
            return ACTION_SEND, reply(q, qend, neg_blob, 0, img, edns, limit, apex_ptr)
    if client is not None and img.autopath:
        done = autopath(img, q, qend, low, below_apex, qtype, limit, edns, external_cname,
                        rotation, client, neg_blob, apex_ptr)
        if done is not None:
            return done
    return ACTION_SEND, reply(q, qend, neg_blob, NXDOMAIN, img, edns, limit, apex_ptr)


# ---------------------------------------------------------------------------- autopath
# CoreDNS's autopath with @kubernetes (docs/dns-rules.md §5.3): for a client pod in <ns>, a
# name under the first element of its search path (<ns>.svc.<zone>) that does not exist is
# tried, as the pod's resolver would next, as <base>.svc.<zone>, <base>.<zone>,
# <base>.<each server search domain>, then <base> itself. Steps the image answers are
# answered here; from the first it hands off (outside its zones, an ExternalName) the
# hand-off asks them in order (``autopath_plan``). The first that is not NXDOMAIN answers,
# behind a CNAME from the asked name to it whose TTL is the first record's; a NODATA in the
# asked name's zone answers as that name's NODATA (as CoreDNS's cnamer finds no record to
# point at), and when every step is NXDOMAIN the asked name's own NXDOMAIN is the answer.
NAME_TYPES = {2: 0, 5: 0, 12: 0, 15: 2, 33: 6}     # rdata offset of the one name (RFC 1035)


def client_namespace(img: Image, key: bytes) -> bytes | None:
    """The lower-case namespace of the pod at ``key`` (16 bytes), or None."""
    sec = img.autopath
    count = img.u32(sec + L.AP_COUNT)
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        e = sec + L.AP_SIZE + mid * L.APENT_SIZE
        cand = bytes(img.buf[e:e + 16])
        if cand == key:
            return img.label(sec + img.u32(e + L.APENT_NS))
        if cand < key:
            lo = mid + 1
        else:
            hi = mid
    return None


def search_domains(img: Image) -> list[bytes]:
    """The server's search domains the image carries, as wire names."""
    sec = img.autopath
    n, off = img.u32(sec + L.AP_NSEARCH), sec + img.u32(sec + L.AP_SEARCH_OFF)
    out = []
    for _ in range(n):
        end = name_end(img.buf, off)
        out.append(bytes(img.buf[off:end]))
        off = end
    return out


def autopath_base(img: Image, low, below_apex, client) -> list | None:
    """The base labels when the name is <base>.<client's ns>.svc.<zone>, else None."""
    if below_apex < 2 or low[below_apex] != b"svc":
        return None
    ns = client_namespace(img, client)
    if ns is None or low[below_apex - 1] != ns:
        return None
    return low[:below_apex - 1]


def autopath_candidates(img: Image, low, below_apex, base) -> list[tuple]:
    """The search steps after the asked name, as label tuples: <base>.svc.<zone>,
    <base>.<zone>, <base>.<each server search domain>, <base>; a step longer than a name
    may be (RFC 1035 §2.3.4) is left out."""
    out = [tuple(base) + tuple(low[below_apex:]), tuple(base) + tuple(low[below_apex + 1:])]
    for sd in search_domains(img):
        out.append(tuple(base) + tuple(label_list(sd)))
    out.append(tuple(base))
    return [c for c in out if sum(len(x) + 1 for x in c) + 1 <= MAX_NAME]


def label_list(wire: bytes) -> list[bytes]:
    out, off = [], 0
    while wire[off]:
        out.append(wire[off + 1:off + 1 + wire[off]])
        off += 1 + wire[off]
    return out


def autopath(img, q, qend, low, below_apex, qtype, limit, edns, external_cname, rotation,
             client, neg_blob, apex_ptr):
    """The steps the image answers; (action, reply), or None for today's NXDOMAIN. The
    first step the image hands off (a name outside its zones, an ExternalName) and those
    after it are the hand-off's (``autopath_plan``)."""
    base = autopath_base(img, low, below_apex, client)
    if base is None:
        return None
    olen = qend - 4 - 12
    for step, cand in enumerate(autopath_candidates(img, low, below_apex, base)):
        cwire = b"".join(bytes((len(x),)) + x for x in cand) + b"\0"
        cq = q[:12] + cwire + q[qend - 4:qend]
        action, rep = resolve(img, cq, len(cq), list(cand), qtype, limit - olen - 12, edns,
                              False, rotation)
        if action != ACTION_SEND:
            return ACTION_HANDOFF, b""  # this step and the rest: the hand-off's
        if rep[3] & 0xF:
            continue                    # NXDOMAIN (nothing else: synced, not a transfer)
        an, ns, ar = struct.unpack_from("!HHH", rep, 6)
        if an == 0 and step < 2:
            # NODATA in the asked name's zone: its own NODATA (same SOA), with the
            # candidate's TC, as CoreDNS (its cnamer finds no record to point at).
            out = reply(q, qend, neg_blob, 0, img, edns, limit, apex_ptr)
            return ACTION_SEND, out[:2] + bytes([out[2] | (rep[2] & (TC >> 8))]) + out[3:]
        # An answer, or a NODATA of a further step (maybe another zone's SOA): behind the
        # CNAME (RFC 2308 §2.2 allows a NODATA after a CNAME chain).
        opt = OPT_LEN if edns else 0
        body = bytearray(rep[len(cq):len(rep) - opt])
        ttl = relocate(body, an + ns + ar - (1 if edns else 0), len(cwire), olen)
        if ttl is None:
            return None
        cname = struct.pack("!HHHIH", 0xC00C, 5, CLASS_IN, ttl, len(cwire)) + cwire
        head = rep[:6] + struct.pack("!HHH", an + 1, ns, ar)
        return ACTION_SEND, head + q[12:qend] + cname + bytes(body) + rep[len(rep) - opt:]
    return None                         # every step NXDOMAIN: the asked name's own


def relocate(body: bytearray, nrec: int, clen: int, olen: int) -> int | None:
    """Move the compression pointers of ``body`` (records that followed a question of
    ``clen`` name bytes) to where the records stand behind the asked question (``olen``
    name bytes) and the CNAME whose rdata now holds the candidate name (RFC 1035 §4.1.4:
    a pointer names an earlier offset). Returns the first record's TTL, or None when a
    pointer would not fit in 14 bits."""
    shift_q, shift_b = olen + 16, olen + 12
    off, ttl = 0, None

    def name(off):
        while True:
            n = body[off]
            if n == 0:
                return off + 1
            if n & 0xC0 == 0xC0:
                p = (n & 0x3F) << 8 | body[off + 1]
                p += shift_q if p < 12 + clen else shift_b
                if p > 0x3FFF:
                    raise OverflowError
                body[off], body[off + 1] = 0xC0 | p >> 8, p & 0xFF
                return off + 2
            off += 1 + n

    try:
        for _ in range(nrec):
            off = name(off)
            rtype, _, rttl, rdlen = struct.unpack_from("!HHIH", body, off)
            if ttl is None:
                ttl = rttl
            rd = off + 10
            if rtype in NAME_TYPES:
                name(rd + NAME_TYPES[rtype])
            elif rtype == 6:                        # SOA: MNAME, RNAME
                name(name(rd))
            off = rd + rdlen
    except (OverflowError, IndexError, struct.error):
        return None                     # (or the blob's records do not parse)
    return ttl


def autopath_plan(img: Image, q: bytes, client, answer_fn=None) -> tuple[bytes, list[bytes]] | None:
    """For a query the image handed off in autopath's walk: (base as wire labels without
    the root, every step in order as (its name, whether it is in an authoritative zone):
    the hand-off asks the image for each again, and from the first the image hands off the
    forwarder, or for names of those zones the ExternalName completion), else None. Same checks as ``resolve``. ``answer_fn(query, client) -> action``: the
    packet path to ask (the compiled one in a worker); ``answer`` on ``img`` by default."""
    if not img.autopath or client is None:
        return None
    if isinstance(client, str):
        client = ip_key(client)
    if answer_fn is None:
        answer_fn = lambda query, key: answer(img, query, tcp=True, client=key)[0]  # noqa: E731
    if answer_fn(q, client) != ACTION_HANDOFF or answer_fn(q, None) != ACTION_SEND:
        return None                     # answered, or handed off without autopath too
    labels, _ = parse_name(q, 12)
    low = [x.lower() for x in labels]
    node, i, below_apex = img.node(0), len(low) - 1, -1
    while True:
        if img.u16(node + L.NODE_FLAGS) & NODE_ZONE_APEX:
            below_apex = i
        if i < 0:
            break
        c = img.child(node, low[i])
        if c < 0:
            break
        node, i = img.node(c), i - 1
    base = autopath_base(img, low, below_apex, client)
    if base is None:
        return None
    bwire = b"".join(bytes((len(x),)) + x for x in base)
    return bwire, [(b"".join(bytes((len(x),)) + x for x in c) + b"\0", in_auth_zone(img, c))
                   for c in autopath_candidates(img, low, below_apex, base)]


def in_auth_zone(img: Image, labels) -> bool:
    """Whether the name (lower-case labels) falls in an authoritative zone of the image:
    where a hand-off is an ExternalName's, not the forwarder's."""
    node, i, zone = img.node(0), len(labels) - 1, -1
    while True:
        if img.u16(node + L.NODE_FLAGS) & NODE_ZONE_APEX:
            zone = img.u32(node + L.NODE_EXTRA)
        if i < 0:
            break
        c = img.child(node, labels[i])
        if c < 0:
            break
        node, i = img.node(c), i - 1
    return zone >= 0 and img.zone(zone)[4] == L.ZONE_AUTH


def any_hinfo(ttl: int) -> bytes:
    """The RFC 8482 §4.2 answer to QTYPE=ANY: HINFO "RFC8482" "" at the question name, with
    the zone's TTL as every record there."""
    return struct.pack("!HHHIH", 0xC00C, T_HINFO, CLASS_IN, ttl, len(RFC8482_HINFO)) + RFC8482_HINFO


def pod_ip_known(img: Image, off: int, ip: bytes) -> bool:
    (count,) = struct.unpack_from("<I", img.buf, off)
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        cand = bytes(img.buf[off + 4 + 16 * mid:off + 20 + 16 * mid])
        if cand == ip:
            return True
        if cand < ip:
            lo = mid + 1
        else:
            hi = mid
    return False


def reply(q, qend, blob, rcode, img, edns, limit=UDP_PLAIN, apex_ptr=0, synth=b"", rotation=0):
    """Header + echoed question + (blob or synthesised RR) + OPT, cut to ``limit``."""
    qid, flags = struct.unpack_from("!HH", q, 0)
    hflags = QR | (flags & (0x7800 | RD | CD)) | rcode
    counts = [0, 0, 0]
    body = b""
    room = limit - qend - (OPT_LEN if edns else 0)
    if synth:
        hflags |= AA
        if len(synth) <= room:
            body, counts = synth, [1, 0, 0]
        else:
            hflags |= TC
    elif blob:
        hdr, an, ns, ar, nfix, nseg, dlen, rot_at, rot_n = BLOBHDR.unpack_from(img.buf, blob)
        hflags |= hdr
        fixes = struct.unpack_from(f"<{nfix}H", img.buf, blob + BLOBHDR.size)
        seg_off = blob + BLOBHDR.size + ((2 * nfix + 3) & ~3)
        data_off = seg_off + nseg * SEG.size
        # The compiler's cut points, ends ascending: the last that fits (segment 0 always
        # does), by binary search as the compiled path does it.
        lo, hi = 1, max(nseg, 1)
        while lo < hi:
            k = (lo + hi) // 2
            if SEG.unpack_from(img.buf, seg_off + k * SEG.size)[0] > room:
                hi = k
            else:
                lo = k + 1
        end, counts[0], counts[1], counts[2], tc = SEG.unpack_from(img.buf, seg_off + (lo - 1) * SEG.size)
        data = bytearray(img.buf[data_off:data_off + end])
        if rot_n >= 2:
            turn = rotation % rot_n if isinstance(rotation, int) else rotation.take(blob, rot_n)
            if turn:
                data, end, tc = rotate(img, seg_off, data_off, rot_at, rot_n, turn, room,
                                       data, end, tc, counts)
        if tc:
            hflags |= TC
        for f in fixes:
            if f + 2 <= end:
                struct.pack_into("!H", data, f, 0xC000 | apex_ptr)
        body = bytes(data)
    out = struct.pack("!HHHHHH", qid, hflags, 1, counts[0], counts[1], counts[2] + (1 if edns else 0))
    out += q[12:qend] + body
    if edns:
        size, do, ext = edns
        out += b"\0" + struct.pack("!HHBBHH", T_OPT, size, ext, 0, do << 15, 0)
    return out


def rotate(img, seg_off, data_off, rot_at, rot_n, k, room, data, end, tc, counts):
    """The reply data with the rotating run's records sent from its ``k``-th on, cyclically
    (layout.py, Rotation). The segments hold every record's end. A cut after the run keeps
    it whole, rotated; a cut inside it keeps the most rotated records that fit, with TC, as
    an unrotated cut keeps the most records that fit (RFC 2181 §9). -> (data, end, tc)."""
    def at(i):
        return SEG.unpack_from(img.buf, seg_off + i * SEG.size)[0]

    s0, sk, sn = at(rot_at), at(rot_at + k), at(rot_at + rot_n)
    buf = img.buf
    if end >= sn:
        return (data[:s0] + buf[data_off + sk:data_off + sn] + buf[data_off + s0:data_off + sk]
                + data[sn:end]), end, tc
    if end < s0:
        return data, end, tc                          # the run's start does not fit

    def rlen(m):                                      # bytes of the first m rotated records
        if k + m <= rot_n:
            return at(rot_at + k + m) - sk
        return sn - sk + at(rot_at + k + m - rot_n) - s0

    lo, hi = 0, rot_n - 1                             # all rot_n do not fit: end < sn
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if s0 + rlen(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    m = lo
    if k + m <= rot_n:
        run = buf[data_off + sk:data_off + sk + rlen(m)]
    else:
        run = bytes(buf[data_off + sk:data_off + sn]) + bytes(
            buf[data_off + s0:data_off + at(rot_at + k + m - rot_n)])
    counts[0], counts[1], counts[2] = rot_at + m, 0, 0
    return data[:s0] + run, s0 + rlen(m), 1
