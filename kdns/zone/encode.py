"""The reference compiler's answer encoder: RRsets to answer blobs with RFC 1035 name
compression, CNAME chains, the zones' negative answers and the special nodes' flags.

This is the definition of the answers' bytes in plain Python. The compiled core
(kdns/zone/_compile.pyx) encodes the same answers in C, each of its encoders naming the
method here it restates, and tests/test_compile_compiled.py holds the two byte for byte.
The names are the subclass's (oracle.py): it answers ``rrsets_of`` and ``name_exists`` from
its own name table.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from kdns.dns import rr as R
from kdns.dns.rr import ZONE_AUTH, ZONE_REVERSE, Zone
from kdns.dns.wire import (NOERROR as RCODE_NOERROR, NXDOMAIN as RCODE_NXDOMAIN,
                           SERVFAIL as RCODE_SERVFAIL)
from kdns.zone.layout import (BLOBHDR, CUT_EVERY_RR_OVER, DEFAULT_QTYPE, HDR_AA,
                              HDR_HANDOFF, NODE_EXISTS,
                              NODE_POD_NS, NODE_POD_VERIFIED, NODE_ZONE_APEX, QUESTION_OFFSET,
                              ROTATE_TYPES, SEG)


class CompileError(ValueError):
    """The compiler's input is inconsistent; the message names the offending name."""


def _fast_labels(name: str) -> tuple:
    """``rr.name_labels`` in one pass for well-formed names; it re-does odd ones (and raises)."""
    text = name[:-1] if name.endswith(".") else name
    try:
        b = text.encode("ascii").lower()
    except UnicodeEncodeError:
        return R.name_labels(name)
    labels = tuple(b.split(b"."))
    if not text or len(b) + 2 > R.MAX_NAME or b"" in labels or max(map(len, labels)) > R.MAX_LABEL:
        return R.name_labels(name)
    return labels


def of_type(rrsets: tuple, rtype: int):
    """The RRset of ``rtype`` among one name's (rarely more than two), or None."""
    for s in rrsets:
        if s.rtype == rtype:
            return s
    return None


class Encoder:
    """The zones, the name caches and the generic answer encoder of one compile."""

    def __init__(self, zones: list[Zone], synced: bool, serial: int):
        self.zones, self.zone_labels, self.zone_reverse = self.zone_tables(zones)
        self.apex_index = {apex: zi for zi, apex in enumerate(self.zone_labels)}
        # Longest apex first, so the deepest zone wins (a delegated sub-zone, 0.10.in-addr.arpa).
        self.apex_lengths = sorted({len(a) for a in self.zone_labels}, reverse=True)
        self.apex_len = [len(a) for a in self.zone_labels]
        self.synced = synced
        self.serial = serial
        self.label_cache: dict[str, tuple] = {}
        self.wire_cache: dict[tuple, bytes] = {}

    @staticmethod
    def zone_tables(zones) -> tuple[list, list, list]:
        """The zones in image order (by reversed apex labels), their apexes' labels, and
        which are reverse zones."""
        zones = sorted(zones, key=lambda z: R.name_labels(z.apex)[::-1])
        return (zones, [R.name_labels(z.apex) for z in zones],
                [z.kind == ZONE_REVERSE for z in zones])

    def intern(self, blob: bytes) -> int:
        """The blob's offset in the image's blob pool (each distinct blob once)."""
        raise NotImplementedError

    def rrsets_of(self, labels: tuple) -> tuple | None:
        """The name's RRsets in input order, or None when it has none."""
        raise NotImplementedError

    def name_exists(self, labels: tuple) -> bool:
        """A name without data exists if declared, or if it is a node of the forward tree
        (an ancestor of a name with data: an empty non-terminal, RFC 8020)."""
        raise NotImplementedError

    # ---- cached conversions
    # ---- cached conversions
    def labels(self, name: str) -> tuple:
        labels = self.label_cache.get(name)
        if labels is None:
            labels = self.label_cache[name] = self.parse_name(name)
        return labels

    def parse_name(self, name: str) -> tuple:
        """Labels of a name, built on its parent's cached labels: the endpoints of a service
        then share every label object but their first (memory, not only time: a quarter of a
        million names). Same result as ``rr.name_labels``, which handles the odd cases."""
        head, dot, rest = name.partition(".")
        if not dot or not rest or len(name) > R.MAX_NAME - 2 or not 0 < len(head) <= R.MAX_LABEL:
            return _fast_labels(name)
        try:
            first = head.encode("ascii").lower()
        except UnicodeEncodeError:
            return R.name_labels(name)
        return (first,) + self.labels(rest)

    def wire(self, labels: tuple) -> bytes:
        """Uncompressed wire form (RFC 1035 §3.1), built on the cached form of the parent:
        the endpoints of one service share everything but their first label."""
        w = self.wire_cache.get(labels)
        if w is None:
            w = self.wire_cache[labels] = (bytes((len(labels[0]),)) + labels[0]
                                           + self.wire(labels[1:])) if labels else b"\0"
        return w

    @staticmethod
    def packed(address: str) -> bytes:
        # Not cached: most addresses are seen once or twice, and inet_pton costs about what
        # a dictionary lookup does.
        try:
            return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        except OSError:
            return ipaddress.ip_address(address).packed   # forms inet_pton refuses

    def zone_of(self, labels: tuple) -> int:
        n = len(labels)
        for length in self.apex_lengths:
            if length <= n:
                zi = self.apex_index.get(labels[n - length:])
                if zi is not None:
                    return zi
        return -1

    # ---- answers
    def put_rr(self, w: R.Wire, ptr, owner: tuple, rtype: int, ttl: int, rd) -> None:
        """``Wire.rr`` with the compiler's cached name and address conversions."""
        buf = w.buf
        if ptr is not None:
            buf += struct.pack("!H", 0xC000 | ptr)
        else:
            w.name(owner)
        buf += struct.pack("!HHI", rtype, R.CLASS_IN, ttl)
        len_at = len(buf)
        buf += b"\0\0"
        if rtype == R.A or rtype == R.AAAA:
            buf += self.packed(rd.address)
        elif rtype == R.SRV:
            buf += struct.pack("!HHH", rd.priority, rd.weight, rd.port)
            # RFC 2782: "name compression is not to be used for this field"; and no later
            # name points into it, as SRV records rotate (layout.py: rot_n).
            w.name(self.labels(rd.target), compress=False, remember=False)
        elif rtype in (R.CNAME, R.PTR, R.NS):
            w.name(self.labels(rd.target))
        else:
            rd.write(w)
        struct.pack_into("!H", buf, len_at, len(buf) - len_at - 2)

    def blob(self, hdr: int, sections: list[list[tuple]], qname: tuple = (),
             prebuilt: tuple | None = None) -> int:
        """Encode sections of (owner_labels, owner_pointer, RRset); returns the blob's offset.

        ``qname`` is the exact question name: it stands at offset 12 in every reply that uses
        this blob, so names compress against it and all offsets are known now.
        """
        if prebuilt is not None:
            data, counts, segs, fix = prebuilt
        else:
            w = R.Wire(base=QUESTION_OFFSET + R.wire_length(qname) + 4)
            w.seed(qname, QUESTION_OFFSET)
            segs = [(0, 0, 0, 0)]
            counts = [0, 0, 0]
            for si, section in enumerate(sections):
                for owner, ptr, s in section:
                    for rd in s.rdatas:
                        self.put_rr(w, ptr, owner, s.rtype, s.ttl, rd)
                    counts[si] += len(s.rdatas)
                    segs.append((len(w.buf), *counts))
            data, fix = bytes(w.buf), []
        essential = counts[0] + counts[1]
        seg_bytes = b"".join(SEG.pack(end, an, ns, ar, 1 if an + ns < essential else 0)
                             for end, an, ns, ar in segs)
        head = BLOBHDR.pack(hdr, counts[0], counts[1], counts[2], len(fix), len(segs), len(data),
                            0, 0)
        fixb = b"".join(struct.pack("<H", f) for f in fix)
        fixb += b"\0" * (-len(fixb) % 4)
        return self.intern(head + fixb + seg_bytes + data)

    def negative_blob(self, zi: int) -> int:
        """The zone's SOA for the authority section, with its apex written as fixups. A
        hosts zone has no SOA: its NODATA carries no records (as CoreDNS's hosts answers)."""
        if self.zones[zi].kind not in (ZONE_AUTH, ZONE_REVERSE):
            return self.blob(HDR_AA, [], prebuilt=(b"", [0, 0, 0], [(0, 0, 0, 0)], []))
        apex = self.zone_labels[zi]
        soa = of_type(self.rrsets_of(apex) or (), R.SOA)
        if soa is None:
            raise CompileError(f"zone {self.zones[zi].apex} has no SOA RRset")
        rd = soa.rdatas[0]
        buf = bytearray()
        fix = []

        def name_under_apex(labels):
            if R.is_subdomain(labels, apex):
                for label in labels[:len(labels) - len(apex)]:
                    buf.append(len(label))
                    buf.extend(label)
                fix.append(len(buf))
                buf.extend(b"\xc0\x00")
            else:
                for label in labels:
                    buf.append(len(label))
                    buf.extend(label)
                buf.append(0)

        fix.append(0)
        buf += b"\xc0\x00"
        buf += struct.pack("!HHI", R.SOA, R.CLASS_IN, soa.ttl)
        len_at = len(buf)
        buf += b"\0\0"
        name_under_apex(R.name_labels(rd.mname))
        name_under_apex(R.name_labels(rd.rname))
        buf += struct.pack("!IIIII", rd.serial & 0xFFFFFFFF, rd.refresh, rd.retry, rd.expire,
                           rd.minimum)
        struct.pack_into("!H", buf, len_at, len(buf) - len_at - 2)
        return self.blob(HDR_AA, [], prebuilt=(bytes(buf), [0, 1, 0],
                                               [(0, 0, 0, 0), (len(buf), 0, 1, 0)], fix))

    def glue(self, targets: list[tuple]) -> list[tuple]:
        """A/AAAA of in-image targets, for the additional section (RFC 2782, RFC 1035 §3.3.11)."""
        out = []
        # Several SRVs may share a target (one per port): its glue goes in once (RFC 2181 §5).
        for t in dict.fromkeys(targets):
            byname = self.rrsets_of(t)
            if byname is None:
                continue
            for rtype in (R.A, R.AAAA):
                s = of_type(byname, rtype)
                if s is not None:
                    out.append((t, None, s))
        return out

    def soa_authority(self, zi: int) -> list[tuple]:
        if self.zones[zi].kind not in (ZONE_AUTH, ZONE_REVERSE):
            return []                  # a hosts zone has no SOA (``negative_blob``)
        apex = self.zone_labels[zi]
        return [(apex, None, of_type(self.rrsets_of(apex), R.SOA))]

    def chase(self, labels: tuple, qtype: int):
        """Answer sections and rcode for (labels, qtype), following in-image CNAMEs (≤10)."""
        answer, seen = [], set()
        cur, ptr = labels, QUESTION_OFFSET
        for _ in range(11):
            byname = self.rrsets_of(cur)
            if byname is None:
                zi = self.zone_of(cur)
                if zi < 0 or self.zones[zi].kind != ZONE_AUTH:
                    # Outside, or a reverse or hosts name without records (the forwarder's):
                    # the CNAME alone.
                    return answer, [], [], RCODE_NOERROR
                rcode = RCODE_NOERROR if self.name_exists(cur) else RCODE_NXDOMAIN
                return answer, self.soa_authority(zi), [], rcode
            cname = of_type(byname, R.CNAME)
            if cname is not None and qtype != R.CNAME:
                if cur in seen:
                    break
                seen.add(cur)
                answer.append((cur, ptr, cname))
                ptr = None
                cur = self.labels(cname.rdatas[0].target)
                continue
            s = of_type(byname, qtype)
            if s is None:
                return answer, self.soa_authority(self.zone_of(cur)), [], RCODE_NOERROR
            answer.append((cur, ptr, s))
            extra = []
            if qtype in (R.SRV, R.NS):
                extra = self.glue([self.labels(rd.target) for rd in s.rdatas])
            return answer, [], extra, RCODE_NOERROR
        return answer, [], [], RCODE_SERVFAIL   # CNAME loop or chain too long

    def generic_blob(self, labels: tuple, qtype: int) -> int:
        an, ns, ar, rcode = self.chase(labels, qtype)
        return self.blob(HDR_AA | rcode, [an, ns, ar], labels)

    def chain_entries(self, labels: tuple, byname: tuple) -> list[tuple[int, int]]:
        # Every type the chain can answer gets its own blob; 0 covers the rest.
        qtypes = {s.rtype for s in byname}
        cur = self.labels(of_type(byname, R.CNAME).rdatas[0].target)
        for _ in range(10):
            nxt = self.rrsets_of(cur) or ()
            qtypes |= {s.rtype for s in nxt}
            cname = of_type(nxt, R.CNAME)
            if cname is None:
                break
            cur = self.labels(cname.rdatas[0].target)
        qtypes.discard(R.CNAME)
        qtypes = {q for q in qtypes if q not in (R.SOA, R.NS)} | {R.CNAME, DEFAULT_QTYPE}
        outside = self.chain_leaves_cluster(cur)
        entries = []
        for qtype in sorted(qtypes):
            an, ns, ar, rcode = self.chase(labels, qtype if qtype else 0xFFFF - 1)
            if not an and rcode == RCODE_NOERROR:
                continue                        # plain NODATA: the zone blob answers it
            # A CNAME query is answered by the CNAME alone (RFC 1034 §3.6.2); any other
            # type of a chain ending outside needs the target's records: hand off.
            handoff = HDR_HANDOFF if outside and qtype != R.CNAME else 0
            entries.append((qtype, self.blob(HDR_AA | rcode | handoff, [an, ns, ar], labels)))
        return entries

    def chain_leaves_cluster(self, last: tuple) -> bool:
        """Does the chain's last target lie outside every served zone (or in a reverse
        or hosts zone without data: the forwarder's too)?"""
        if self.rrsets_of(last) is not None:
            return False
        zi = self.zone_of(last)
        return zi < 0 or self.zones[zi].kind != ZONE_AUTH

    def special_node(self, labels: tuple, flags: int, pod_info: dict,
                     pod_lists: bytearray) -> tuple[int, int]:
        """Flags and ``extra`` of a zone apex or a pod namespace node (see the layout)."""
        extra = 0
        if labels in self.apex_index:
            flags |= NODE_ZONE_APEX | NODE_EXISTS
            extra = self.apex_index[labels]
        if labels in pod_info:
            mode, ips = pod_info[labels]
            flags |= NODE_POD_NS | NODE_EXISTS
            if mode == "verified":
                flags |= NODE_POD_VERIFIED
                packed = ips if isinstance(ips, bytes) else pod_list(ips or ())
                extra = len(pod_lists)       # relative to the pod lists; rebased later
                pod_lists += struct.pack("<I", len(packed) // 16) + packed
        return flags, extra


def _skip_owner(data: bytes, pos: int) -> int:
    """The end of the name at ``pos``: labels ending in the root or a pointer (RFC 1035
    §4.1.4)."""
    while True:
        c = data[pos]
        if c >= 0xC0:
            return pos + 2
        pos += 1 + c
        if c == 0:
            return pos


def rotation_of(data: bytes, an: int, nfix: int) -> tuple[int, int]:
    """(rot_at, rot_n) of a blob's data (layout.py, Rotation): the run of answer records that
    closes the answer section, of one rotating type with the same owner bytes, when it holds
    two or more; (0, 0) otherwise, and always for a blob with fixups. The data is the
    compiler's own, so it is walked, not checked (RFC 1035 §4.1.3)."""
    if an < 2 or nfix:
        return 0, 0
    keys, pos = [], 0
    for _ in range(an):
        start = pos
        pos = _skip_owner(data, pos)
        keys.append((data[start:pos], data[pos:pos + 2]))
        pos += 10 + int.from_bytes(data[pos + 8:pos + 10], "big")
    last = keys[-1]
    if int.from_bytes(last[1], "big") not in ROTATE_TYPES:
        return 0, 0
    j = an - 1
    while j > 0 and keys[j - 1] == last:
        j -= 1
    return (j, an - j) if an - j >= 2 else (0, 0)


def cut_at_every_rr(blob: bytes) -> bytes:
    """The blob with its rotation (``rotation_of``) and a segment after every record when it
    rotates or its data may not fit a 512-byte reply (layout.py: CUT_EVERY_RR_OVER); as it
    is otherwise. The data is the compiler's own, so it is walked, not checked: owner
    (labels ending in the root or a pointer, RFC 1035 §4.1.4), type, class, TTL, rdlength,
    rdata (§4.1.3)."""
    hdr, an, ns, ar, nfix, nseg, dlen, _, _ = BLOBHDR.unpack_from(blob, 0)
    seg_off = BLOBHDR.size + ((2 * nfix + 3) & ~3)
    data = blob[seg_off + nseg * SEG.size:]
    rot_at, rot_n = rotation_of(data, an, nfix)
    if dlen <= CUT_EVERY_RR_OVER and not rot_n:
        return blob
    total, essential = an + ns + ar, an + ns
    if total + 1 > 0xFFFF:
        raise CompileError(f"{total} records in one answer: at most 65534")
    segs = [SEG.pack(0, 0, 0, 0, 1 if essential else 0)]
    pos = 0
    for k in range(1, total + 1):
        pos = _skip_owner(data, pos)
        pos += 10 + int.from_bytes(data[pos + 8:pos + 10], "big")
        n_an, n_ns, n_ar = min(k, an), min(max(k - an, 0), ns), max(k - essential, 0)
        segs.append(SEG.pack(pos, n_an, n_ns, n_ar, 1 if n_an + n_ns < essential else 0))
    if pos != dlen:
        raise AssertionError("blob data does not end at its last record")
    return (BLOBHDR.pack(hdr, an, ns, ar, nfix, total + 1, dlen, rot_at, rot_n)
            + blob[BLOBHDR.size:seg_off] + b"".join(segs) + data)


def pod_list(ips) -> bytes:
    """A verified namespace's pod IPs as the image stores them: sorted 16-byte keys (IPv4 in
    the first 4 bytes), each once. ``Zone.pod_namespaces`` may hold this already (the
    incremental compiler keeps it between compiles instead of re-packing 100,000 pods)."""
    keys = set()
    for ip in ips:
        try:
            keys.add(socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
                     .ljust(16, b"\0"))
        except OSError:
            keys.add(ipaddress.ip_address(ip).packed.ljust(16, b"\0"))
    return b"".join(sorted(keys))


def ipv4_key(parts) -> tuple[int, bytes]:
    """Four decimal octets -> (4, 16-byte key), or (0, b'') unless each is canonical: 1-3
    digits, no leading zero (Go's net.ParseIP, which CoreDNS uses, rejects those), at most 255."""
    octets = []
    for p in parts:
        if not p.isdigit() or len(p) > 3 or (len(p) > 1 and p[:1] == b"0") or int(p) > 255:
            return 0, b""
        octets.append(int(p))
    return 4, bytes(octets).ljust(16, b"\0")


def reverse_to_ip(labels: tuple) -> tuple[int, bytes]:
    """Full reverse name (RFC 1035 §3.5, RFC 3596 §2.5) -> (family, 16-byte key); (0, b'') if not.

    Only canonical spellings match (decimal without leading zeros, single hex nibbles), the
    same rule the packet path applies.
    """
    if labels[-2:] == (b"in-addr", b"arpa") and len(labels) == 6:
        return ipv4_key(labels[3::-1])
    if labels[-2:] == (b"ip6", b"arpa") and len(labels) == 34:
        nibbles = []
        for label in labels[31::-1]:
            if len(label) != 1 or label not in b"0123456789abcdef":
                return 0, b""
            nibbles.append(int(label, 16))
        return 6, bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, 32, 2))
    return 0, b""


def ip_key(ip: str) -> bytes:
    """An address as the image keys pods: 16 bytes, IPv4 in the first 4 (``pod_list``); an
    IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2, a dual-stack socket's view of an IPv4
    client) is the IPv4 address."""
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        packed = ipaddress.ip_address(ip).packed
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
        packed = packed[12:]
    return packed.ljust(16, b"\0")


def autopath_section(pods, search=(), keys: dict | None = None) -> bytes:
    """The image's autopath section (layout.py): ``pods`` is (IP text, namespace) pairs,
    ``search`` the server's search domains (names, in order). One entry per IP: an IP two
    live pods claim (a restart racing its predecessor's deletion) keeps the namespace that
    sorts first, so the bytes depend on the set of pairs only. ``keys``: IP text -> key,
    kept by a caller between builds (150,000 conversions are a third of the time)."""
    from kdns.zone.layout import APHDR, APENT
    names: dict[str, bytes] = {}
    best: dict[bytes, bytes] = {}
    if keys is None:
        keys = {}
    for ip, ns in pods:
        n = names.get(ns)
        if n is None:
            n = names[ns] = ns.encode("ascii").lower()
        k = keys.get(ip)
        if k is None:
            k = keys[ip] = ip_key(ip)
        old = best.get(k)
        if old is None or n < old:
            best[k] = n
    pool_off = APHDR.size + APENT.size * len(best)
    offs, pool = {}, bytearray()
    for n in sorted(set(best.values())):
        offs[n] = struct.pack("<I", pool_off + len(pool))
        pool += bytes((len(n),)) + n
    # APENT is the key then the offset: concatenated, not packed one by one.
    entries = b"".join([k + offs[best[k]] for k in sorted(best)])
    wires = b"".join(_wire(s) for s in search)
    search_off = pool_off + len(pool)
    return APHDR.pack(len(best), len(search), search_off, 0) + entries + bytes(pool) + wires


def _wire(name: str) -> bytes:
    labels = R.name_labels(name)
    return b"".join(bytes((len(x),)) + x for x in labels) + b"\0"
