"""The zone compiler: RRsets in, zone image bytes out.

Why: the packet path must answer with no allocation and no Python, so everything that can be
decided before a query arrives is decided here, once per zone change, and frozen into one flat,
position-independent byte string (offsets only, no pointers) that all workers map read-only.

What it must not do: know about Kubernetes (that is ``records.py``) or sockets.

The image's layout is defined in ``layout.py``; this module writes it.
"""
from __future__ import annotations

import array
import gc
import ipaddress
import os
import socket
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Iterable

from kdns.dns import rr as R
from kdns.dns.rr import ZONE_AUTH, ZONE_REVERSE, Zone
from kdns.dns.wire import (FORMERR as RCODE_FORMERR, NOERROR as RCODE_NOERROR,  # noqa: F401
                           NOTIMP as RCODE_NOTIMP, NXDOMAIN as RCODE_NXDOMAIN,
                           REFUSED as RCODE_REFUSED, SERVFAIL as RCODE_SERVFAIL)
from kdns.zone.layout import (BLOBHDR, DEFAULT_QTYPE, FLAG_SYNCED, HDR_AA,  # noqa: F401
                              HDR_HANDOFF, HEADER, MAGIC, NODE, NODE_EXISTS, NODE_EXTRA,
                              NODE_LABEL_OFF, NODE_POD_NS, NODE_POD_VERIFIED, NODE_RR_OFF,
                              NODE_SIZE, NODE_ZONE_APEX, QUESTION_OFFSET, REV, RRENT, SEG, ZONE)


class CompileError(ValueError):
    """The compiler's input is inconsistent; the message names the offending name."""




def compile_image(rrsets: Iterable[R.RRset], zones: Iterable[Zone], *,
                  exists: Iterable[str] = (), synced: bool = True, serial: int = 0,
                  consume: bool = False) -> bytes:
    """RRsets -> image bytes. Identical input gives identical bytes.

    ``consume=True`` with a list of RRsets: the compiled core empties the list once every
    answer is encoded, so that (when the caller holds no other reference) the RRsets' memory
    is free before the image is assembled. Issue 3: the first build's peak sets the memory
    limit a pod needs."""
    # The compiler makes ~10 container objects per name and frees none until it returns;
    # the cyclic GC would rescan them all again and again (a third of the time at 250,000
    # names) and can find nothing to free, so it is paused for the duration.
    paused = gc.isenabled()
    gc.disable()
    try:
        zones = list(zones)
        core = _compiled_core()
        if core is not None:
            # Materialised once: the reference compiler may have to run on the same input.
            rrsets = rrsets if isinstance(rrsets, (list, tuple)) else list(rrsets)
            exists = exists if isinstance(exists, (list, tuple)) else list(exists)
            try:
                return _CoreCompiler(zones, synced, serial, core, consume).build(rrsets, exists)
            except _CoreUnsupported:
                pass          # input the core does not model exactly: the reference decides
        return _Compiler(zones, synced, serial).build(rrsets, exists)
    finally:
        if paused:
            gc.enable()


def _compiled_core():
    """``kdns.zone._compile.ZoneCore`` unless the extension is missing, ``KDNS_PURE=1``, or
    ``KDNS_PURE_COMPILE=1`` (the reference compiler with the compiled packet path: an
    escape hatch, and the "before" of bench/bench_scale.py's memory figures)."""
    if os.environ.get("KDNS_PURE") == "1" or os.environ.get("KDNS_PURE_COMPILE") == "1":
        return None
    try:
        from kdns.zone._compile import ZoneCore
    except ImportError:
        return None
    return ZoneCore


# --------------------------------------------------------------------------- compiler
#
# Speed matters here: the controller rebuilds the whole image on every (debounced) change, and
# a cluster of 10,000 services and 100,000 endpoints is ~250,000 names (issue 3 asks for a
# compile under a second). So: every name is parsed once and its labels, zone, wire form and
# packed addresses are cached; the common answers (address RRsets, single PTRs) are encoded
# directly; tables are packed in bulk. The generic Wire-based encoder handles the rest (SRV
# with glue, CNAME chains, SOA, NS) and is the definition the fast paths must match byte for
# byte (tests/test_records.py holds them to it through the reference packet path).

_LITTLE = sys.byteorder == "little"
_RR_FIXED = struct.Struct("!HHIH")      # type, class, TTL, rdlength (RFC 1035 §4.1.3)
_OWNER_Q = b"\xc0\x0c"                  # the owner is the question name at offset 12
_SEG0 = SEG.pack(0, 0, 0, 0, 1)         # "nothing fits": the answer was cut, so TC
_NODE_WORDS = NODE_SIZE // 4            # a node as u32 words (``_pack_u32``)


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


def _fast_reverse_key(labels: tuple):
    """``reverse_to_ip`` for canonical names via C-implemented conversions; None when unsure
    (then the careful version decides, so the two cannot disagree)."""
    try:
        if len(labels) == 6 and labels[4] == b"in-addr" and labels[5] == b"arpa":
            text = b".".join(labels[3::-1]).decode()
            ip = socket.inet_pton(socket.AF_INET, text)
            if socket.inet_ntop(socket.AF_INET, ip) == text:      # no leading zeros
                return 4, ip + bytes(12)
        elif len(labels) == 34 and labels[32] == b"ip6" and labels[33] == b"arpa":
            nibbles = b"".join(labels[31::-1])
            if len(nibbles) == 32 and nibbles.isalnum():          # one char per label
                return 6, bytes.fromhex(nibbles.decode())
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return None


def _of_type(rrsets: tuple, rtype: int):
    """The RRset of ``rtype`` among one name's (rarely more than two), or None."""
    for s in rrsets:
        if s.rtype == rtype:
            return s
    return None


def _rtype(s: R.RRset) -> int:
    return s.rtype


def _child_key(labels: tuple) -> tuple:
    return len(labels[0]), labels[0]


class _Compiler:
    def __init__(self, zones: list[Zone], synced: bool, serial: int):
        self.zones = sorted(zones, key=lambda z: R.name_labels(z.apex)[::-1])
        self.zone_labels = [R.name_labels(z.apex) for z in self.zones]
        self.apex_index = {apex: zi for zi, apex in enumerate(self.zone_labels)}
        # Longest apex first, so the deepest zone wins (a delegated sub-zone, 0.10.in-addr.arpa).
        self.apex_lengths = sorted({len(a) for a in self.zone_labels}, reverse=True)
        self.synced = synced
        self.serial = serial
        # labels -> that name's RRsets, in input order. A tuple, not a dict by type: nearly
        # every name has one RRset, and a one-entry dict costs 224 bytes to a tuple's 48
        # (40 MB at the compile's memory peak for 232,000 names, issue 3).
        self.data: dict[tuple, tuple] = {}
        self.fwd_names: list[tuple] = []                  # names of the trie
        self.rev_names: list[tuple] = []                  # (labels, zone) of reverse names
        self.zone_reverse = [z.kind == ZONE_REVERSE for z in self.zones]
        self.apex_len = [len(a) for a in self.zone_labels]
        self.explicit: set[tuple] = set()
        self.cname_owners: list[tuple] = []
        self.blobs: list[bytes] = []      # the same objects as blob_cache's keys: one copy
        self.blobs_len = 0
        self.blob_cache: dict[bytes, int] = {}
        self.label_cache: dict[str, tuple] = {}
        self.wire_cache: dict[tuple, bytes] = {}
        self.tree_nodes: dict[tuple, list] = {}
        self.prefix_cache: dict[tuple, tuple] = {}

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

    # ---- input
    def zone_of(self, labels: tuple) -> int:
        n = len(labels)
        for length in self.apex_lengths:
            if length <= n:
                zi = self.apex_index.get(labels[n - length:])
                if zi is not None:
                    return zi
        return -1

    def _place(self, labels: tuple, what: str) -> None:
        """File a new name: forward names go into the trie, full reverse names into the
        reverse table (with their zone)."""
        zi = self.zone_of(labels)
        if zi < 0:
            raise CompileError(f"{what} is outside every served zone")
        if self.zone_reverse[zi] and len(labels) != self.apex_len[zi]:
            self.rev_names.append((labels, zi))
        else:
            self.fwd_names.append(labels)

    def add(self, rrsets: Iterable[R.RRset], exists: Iterable[str]) -> None:
        data, label_cache = self.data, self.label_cache
        for s in rrsets:
            labels = label_cache.get(s.name)
            if labels is None:
                labels = label_cache[s.name] = self.parse_name(s.name)
            byname = data.get(labels)
            if byname is None:
                self._place(labels, s.name)
                data[labels] = (s,)
            elif _of_type(byname, s.rtype) is not None:
                raise CompileError(f"duplicate RRset {s.name} {R.TYPE_NAMES.get(s.rtype, s.rtype)}")
            else:
                data[labels] = byname + (s,)
            if s.rtype == R.CNAME:
                self.cname_owners.append(labels)
        for name in exists:
            labels = self.labels(name)
            if labels not in data and labels not in self.explicit:
                self._place(labels, name)
            self.explicit.add(labels)
        for labels in self.cname_owners:
            if len(data[labels]) > 1:
                # RFC 2181 §10.1: a CNAME owner has no other data.
                raise CompileError(f"{'.'.join(l.decode() for l in labels)}. has a CNAME and other data")

    # ---- blobs
    def intern(self, blob: bytes) -> int:
        blob += b"\0" * (-len(blob) % 4)
        off = self.blob_cache.setdefault(blob, self.blobs_len)
        if off == self.blobs_len:               # new: it goes at the end of the pool
            self.blobs.append(blob)
            self.blobs_len += len(blob)
        return off

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
            # RFC 2782: "name compression is not to be used for this field".
            w.name(self.labels(rd.target), compress=False)
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
        head = BLOBHDR.pack(hdr, counts[0], counts[1], counts[2], len(fix), len(segs), len(data))
        fixb = b"".join(struct.pack("<H", f) for f in fix)
        fixb += b"\0" * (-len(fixb) % 4)
        return self.intern(head + fixb + seg_bytes + data)

    def answer_only_blob(self, qname: tuple, s: R.RRset) -> int:
        """The common case encoded directly: one RRset owned by the question, no name in its
        rdata that could compress (addresses; a PTR whose target shares no suffix with the
        question). Returns -1 when the generic encoder must be used. Same bytes as ``blob``."""
        rtype = s.rtype
        if rtype == R.A or rtype == R.AAAA:
            n = len(s.rdatas)
            key = (rtype, s.ttl, n)
            pre = self.prefix_cache.get(key)
            if pre is None:
                size = 4 if rtype == R.A else 16
                dlen = n * (12 + size)
                pre = self.prefix_cache[key] = (
                    BLOBHDR.pack(HDR_AA, n, 0, 0, 0, 2, dlen) + _SEG0 + SEG.pack(dlen, n, 0, 0, 0),
                    _OWNER_Q + _RR_FIXED.pack(rtype, R.CLASS_IN, s.ttl, size))
            head, rr = pre
            packed = self.packed
            if n == 1:
                return self.intern(head + rr + packed(s.rdatas[0].address))
            return self.intern(head + b"".join([rr + packed(rd.address) for rd in s.rdatas]))
        if rtype == R.SRV:
            return self.srv_blob(qname, s)
        if rtype == R.PTR and len(s.rdatas) == 1:
            target = self.labels(s.rdatas[0].target)
            if target and qname and target[-1] == qname[-1]:
                return -1
            rd = self.wire(target)
            data = _OWNER_Q + _RR_FIXED.pack(rtype, R.CLASS_IN, s.ttl, len(rd)) + rd
            return self.intern(BLOBHDR.pack(HDR_AA, 1, 0, 0, 0, 2, len(data)) + _SEG0
                               + SEG.pack(len(data), 1, 0, 0, 0) + data)
        return -1

    def srv_blob(self, qname: tuple, s: R.RRset) -> int:
        """SRV answer plus A/AAAA glue, encoded directly; same bytes as ``blob`` (the
        generic encoder) for this shape, or -1 when pointers would not reach (>16 KiB).

        As in ``Wire``: SRV targets are written whole (RFC 2782) but every suffix of each is
        remembered at its first position, as are the question's suffixes from offset 12; a
        glue owner is then a pointer to where its name first stands."""
        base = QUESTION_OFFSET + len(self.wire(qname)) + 4
        where: dict[tuple, int] = {}
        off = QUESTION_OFFSET
        for i, label in enumerate(qname):
            where.setdefault(qname[i:], off)
            off += len(label) + 1
        ttl, labels_of = s.ttl, self.labels
        rr_head = _OWNER_Q + struct.pack("!HHI", R.SRV, R.CLASS_IN, ttl)
        parts, size, targets = [], 0, []
        for rd in s.rdatas:
            target = labels_of(rd.target)
            targets.append(target)
            tw = self.wire(target)
            pos = base + size + 18          # after owner, fixed part, rdlength, prio/weight/port
            for i, label in enumerate(target):
                where.setdefault(target[i:], pos)
                pos += len(label) + 1
            rr = rr_head + struct.pack("!HHHH", 6 + len(tw), rd.priority, rd.weight, rd.port) + tw
            parts.append(rr)
            size += len(rr)
        if base + size > R.MAX_POINTER:
            # Positions past 0x3FFF are not remembered (and glue pointers to them would not
            # even pack): the generic encoder decides. Glue only makes it bigger.
            return -1
        n_an, segs = len(parts), [SEG.pack(0, 0, 0, 0, 1), SEG.pack(size, len(parts), 0, 0, 0)]
        n_ar = 0
        for owner, _, glue in self.glue(targets):
            ptr = where[owner]
            head = struct.pack("!H", 0xC000 | ptr) + struct.pack("!HHI", glue.rtype, R.CLASS_IN, glue.ttl)
            for rd in glue.rdatas:
                ip = self.packed(rd.address)
                rr = head + struct.pack("!H", len(ip)) + ip
                parts.append(rr)
                size += len(rr)
            n_ar += len(glue.rdatas)
            segs.append(SEG.pack(size, n_an, 0, n_ar, 0))
        if base + size > R.MAX_POINTER:
            return -1                       # positions past 0x3FFF are not remembered
        data = b"".join(parts)
        return self.intern(BLOBHDR.pack(HDR_AA, n_an, 0, n_ar, 0, len(segs), size)
                           + b"".join(segs) + data)

    def negative_blob(self, zi: int) -> int:
        """The zone's SOA for the authority section, with its apex written as fixups."""
        apex = self.zone_labels[zi]
        soa = _of_type(self.data.get(apex, ()), R.SOA)
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
            byname = self.data.get(t)
            if byname is None:
                continue
            for rtype in (R.A, R.AAAA):
                s = _of_type(byname, rtype)
                if s is not None:
                    out.append((t, None, s))
        return out

    def soa_authority(self, zi: int) -> list[tuple]:
        apex = self.zone_labels[zi]
        return [(apex, None, _of_type(self.data[apex], R.SOA))]

    def name_exists(self, labels: tuple) -> bool:
        """A name without data exists if declared, or if it is a node of the forward tree
        (an ancestor of a name with data: an empty non-terminal, RFC 8020)."""
        return labels in self.explicit or labels in self.tree_nodes

    def chase(self, labels: tuple, qtype: int):
        """Answer sections and rcode for (labels, qtype), following in-image CNAMEs (≤10)."""
        answer, seen = [], set()
        cur, ptr = labels, QUESTION_OFFSET
        for _ in range(11):
            byname = self.data.get(cur)
            if byname is None:
                zi = self.zone_of(cur)
                if zi < 0 or self.zones[zi].kind == ZONE_REVERSE:
                    return answer, [], [], RCODE_NOERROR     # outside: CNAME alone
                rcode = RCODE_NOERROR if self.name_exists(cur) else RCODE_NXDOMAIN
                return answer, self.soa_authority(zi), [], rcode
            cname = _of_type(byname, R.CNAME)
            if cname is not None and qtype != R.CNAME:
                if cur in seen:
                    break
                seen.add(cur)
                answer.append((cur, ptr, cname))
                ptr = None
                cur = self.labels(cname.rdatas[0].target)
                continue
            s = _of_type(byname, qtype)
            if s is None:
                return answer, self.soa_authority(self.zone_of(cur)), [], RCODE_NOERROR
            answer.append((cur, ptr, s))
            extra = []
            if qtype in (R.SRV, R.NS):
                extra = self.glue([self.labels(rd.target) for rd in s.rdatas])
            return answer, [], extra, RCODE_NOERROR
        return answer, [], [], RCODE_SERVFAIL   # CNAME loop or chain too long

    def rr_entries(self, labels: tuple) -> list[tuple[int, int]]:
        byname = self.data[labels]
        if _of_type(byname, R.CNAME) is not None:
            return self.chain_entries(labels, byname)
        entries = []
        for s in sorted(byname, key=_rtype):
            off = self.answer_only_blob(labels, s)
            entries.append((s.rtype, off if off >= 0 else self.generic_blob(labels, s.rtype)))
        return entries

    def generic_blob(self, labels: tuple, qtype: int) -> int:
        an, ns, ar, rcode = self.chase(labels, qtype)
        return self.blob(HDR_AA | rcode, [an, ns, ar], labels)

    def chain_entries(self, labels: tuple, byname: tuple) -> list[tuple[int, int]]:
        # Every type the chain can answer gets its own blob; 0 covers the rest.
        qtypes = {s.rtype for s in byname}
        cur = self.labels(_of_type(byname, R.CNAME).rdatas[0].target)
        for _ in range(10):
            nxt = self.data.get(cur, ())
            qtypes |= {s.rtype for s in nxt}
            cname = _of_type(nxt, R.CNAME)
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
        zone without data: the forwarder's too)?"""
        if last in self.data:
            return False
        zi = self.zone_of(last)
        return zi < 0 or self.zones[zi].kind == ZONE_REVERSE

    # ---- trie
    def split_names(self) -> tuple[list, list]:
        """Forward names (trie: with every apex and pod namespace) and full reverse names."""
        fwd = self.fwd_names
        fwd.extend(a for a in self.zone_labels if a not in self.data and a not in self.explicit)
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                fwd.extend((ns.encode().lower(), b"pod") + apex for ns in z.pod_namespaces)
        return fwd, self.rev_names

    def grow_tree(self, names: list) -> dict:
        """Children of every node of the forward trie, by the node's labels (root ``()``).
        Every suffix is remembered, so a name whose parent exists costs one lookup."""
        kids: dict[tuple, list | None] = {(): None}
        for labels in names:
            if labels in kids:
                continue
            i = 1
            while labels[i:] not in kids:
                i += 1
            # Leaves (most nodes) keep None instead of an empty list: a list each would cost
            # tens of MB at 10k services.
            parent = labels[i:]
            for j in range(i - 1, -1, -1):
                child = labels[j:]
                siblings = kids[parent]
                if siblings is None:
                    kids[parent] = [child]
                else:
                    siblings.append(child)
                kids[child] = None
                parent = child
        self.tree_nodes = kids
        return kids

    @staticmethod
    def number_nodes(kids: dict) -> list[tuple]:
        """Breadth-first numbering keeps each node's children contiguous and sorted by
        (length, bytes), the order the packet path binary-searches."""
        order = [()]
        meta = []
        i = 0
        while i < len(order):
            labels = order[i]
            ks = kids[labels]
            if ks:
                if len(ks) > 1:
                    ks.sort(key=_child_key)
                meta.append((labels, len(order), len(ks)))
                order += ks
            else:
                meta.append((labels, 0, 0))
            i += 1
        return meta

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

    def reverse_key(self, labels: tuple) -> tuple[int, bytes]:
        key = _fast_reverse_key(labels) or reverse_to_ip(labels)
        if key[0] == 0:
            raise CompileError(f"{'.'.join(l.decode() for l in labels)}. is not a full reverse name")
        return key

    def build(self, rrsets, exists) -> bytes:
        self.add(rrsets, exists)
        fwd_names, rev_names = self.split_names()
        nodes_meta = self.number_nodes(self.grow_tree(fwd_names))

        self.zone_negs = [self.negative_blob(zi) for zi in range(len(self.zones))]
        servfail = self.blob(RCODE_SERVFAIL, [], prebuilt=(b"", [0, 0, 0], [(0, 0, 0, 0)], []))

        pod_info = {}
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns, ips in z.pod_namespaces.items():
                    pod_info[(ns.encode().lower(), b"pod") + apex] = (z.pods, ips)

        labels_pool = bytearray()
        label_offs: dict[bytes, int] = {}
        # u32 arrays, not lists: 1.4 million Python ints would cost ~50 MB at 10k services.
        rr_flat = array.array("I")       # qtype, blob offset (pool-relative), pairwise
        node_flat = array.array("I")     # six u32 per node, offsets section-relative
        pod_lists = bytearray()
        verified_nodes = []              # node indexes whose ``extra`` is pod-list-relative
        data, explicit, special = self.data, self.explicit, set(self.apex_index) | set(pod_info)
        # Tuples do not cache their hash: test the few special names by length first.
        special_len = max(map(len, special), default=-1)
        answer_only, apex_nodes = self.answer_only_blob, {}
        for idx, (labels, first, nchild) in enumerate(nodes_meta):
            label = labels[0] if labels else b""
            pool_len = len(labels_pool)
            loff = label_offs.setdefault(label, pool_len)
            if loff == pool_len:
                labels_pool.append(len(label))
                labels_pool += label
            rr_start = len(rr_flat)
            byname = data.get(labels)
            if byname is None:
                flags = NODE_EXISTS if labels in explicit else 0
            elif len(byname) == 1 and byname[0].rtype != R.CNAME:
                # The common node: one RRset (rr_entries' loop, unrolled).
                flags = NODE_EXISTS
                rrset, = byname
                qtype = rrset.rtype
                off = answer_only(labels, rrset)
                rr_flat.extend((qtype, off if off >= 0 else self.generic_blob(labels, qtype)))
            else:
                flags = NODE_EXISTS
                for qtype, boff in self.rr_entries(labels):
                    rr_flat.extend((qtype, boff))
            extra = 0
            if len(labels) <= special_len and labels in special:
                flags, extra = self.special_node(labels, flags, pod_info, pod_lists)
                if flags & NODE_ZONE_APEX:
                    apex_nodes[labels] = idx
                if flags & NODE_POD_VERIFIED:
                    verified_nodes.append(idx)
            node_flat.extend((loff, first, nchild, rr_start * 4, (len(rr_flat) - rr_start) // 2
                              | flags << 16, extra))

        del nodes_meta
        # Sections before the rr table have sizes known now (one reverse entry per reverse
        # name), so reverse entries are packed with absolute offsets as they are made: a
        # tuple per entry would cost ~30 MB at 110,000 reverse names, at the memory peak.
        nnodes = len(node_flat) // _NODE_WORDS
        nodes_off = HEADER.size
        zones_off = nodes_off + NODE.size * nnodes
        rev_off = zones_off + ZONE.size * len(self.zones)
        rrtab_off = rev_off + REV.size * len(rev_names)
        rev_table = bytearray(REV.size * len(rev_names))
        # Sorted before encoding: blobs are laid out in encoding order, and set order varies
        # between processes (hash randomisation); identical input must give identical bytes.
        # (Keys are unique, so the sort never compares the labels or zones.)
        p = 0
        for (fam, ip), labels, zi in sorted((self.reverse_key(labels), labels, zi)
                                            for labels, zi in rev_names):
            byname = data.get(labels)
            rr_cursor = rrtab_off + 4 * len(rr_flat)
            if byname is None:
                nrr = 0
            elif len(byname) == 1 and byname[0].rtype == R.PTR:     # the common reverse name
                off = answer_only(labels, byname[0])
                rr_flat.extend((R.PTR, off if off >= 0 else self.generic_blob(labels, R.PTR)))
                nrr = 1
            else:
                entries = self.rr_entries(labels)
                for qtype, boff in entries:
                    rr_flat.extend((qtype, boff))
                nrr = len(entries)
            REV.pack_into(rev_table, p, fam, ip, rr_cursor, nrr, zi)
            p += REV.size
        nrev = len(rev_names)
        blob_data = b"".join(self.blobs)
        # Every blob is made: what only encoding needed goes before the compile's peak.
        del data, explicit, label_offs, fwd_names, rev_names
        self.release()

        labels_off = rrtab_off + 4 * len(rr_flat)
        pods_off = labels_off + len(labels_pool)
        pad = -pods_off % 4
        pods_off += pad
        blobs_off = pods_off + len(pod_lists)
        total = blobs_off + len(blob_data)

        # Rebase the section-relative offsets, then pack each table in one go.
        for k in range(0, len(node_flat), _NODE_WORDS):
            node_flat[k + NODE_LABEL_OFF // 4] += labels_off
            node_flat[k + NODE_RR_OFF // 4] += rrtab_off
        for idx in verified_nodes:
            node_flat[_NODE_WORDS * idx + NODE_EXTRA // 4] += pods_off
        for k in range(1, len(rr_flat), 2):
            rr_flat[k] += blobs_off
        zone_table = bytearray(ZONE.size * len(self.zones))
        for zi, (z, apex) in enumerate(zip(self.zones, self.zone_labels)):
            apex_node = apex_nodes.get(apex, 0) if z.kind == ZONE_AUTH else 0
            ZONE.pack_into(zone_table, ZONE.size * zi, apex_node, self.zone_negs[zi] + blobs_off,
                           z.ttl, R.wire_length(apex), z.kind)

        # The sections in order, joined once: no bytearray of the whole image and then its
        # bytes() copy (two image-sized buffers at the peak instead of one).
        parts = [_pack_u32(node_flat), zone_table, rev_table, _pack_u32(rr_flat), labels_pool,
                 b"\0" * pad, pod_lists, blob_data]
        del node_flat, rr_flat, blob_data
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        header = HEADER.pack(MAGIC, total, FLAG_SYNCED if self.synced else 0,
                             nodes_off, nnodes, zones_off, len(self.zones), rev_off,
                             nrev, servfail + blobs_off, 0, self.serial, crc, 0)
        return b"".join([header, *parts])

    def release(self) -> None:
        """Drop everything only encoding needs (names, caches, the blob pool's pieces) before
        the image is assembled: their big dict tables go straight back to the OS."""
        self.data = self.blob_cache = self.label_cache = self.wire_cache = None
        self.tree_nodes = self.prefix_cache = self.explicit = None
        self.blobs = self.fwd_names = self.rev_names = self.cname_owners = None


class _CoreUnsupported(Exception):
    """Raised by the compiled core for input it does not model exactly."""


class _CoreData:
    """``_Compiler.data`` (labels -> RRsets) answered by the compiled core's name table."""

    __slots__ = ("core",)

    def __init__(self, core):
        self.core = core

    def get(self, labels, default=None):
        found = self.core.rrsets_of(labels)
        return default if found is None else found

    def __contains__(self, labels) -> bool:
        return self.core.rrsets_of(labels) is not None

    def __getitem__(self, labels):
        found = self.core.rrsets_of(labels)
        if found is None:
            raise KeyError(labels)
        return found


class _CoreNames:
    """``_Compiler.explicit`` (which=0) or ``tree_nodes`` (which=1), membership only."""

    __slots__ = ("core", "which")

    def __init__(self, core, which: int):
        self.core, self.which = core, which

    def __contains__(self, labels) -> bool:
        return self.core.has_flag(labels, self.which)


class _CoreCompiler(_Compiler):
    """The same compile with the hot phases in ``ZoneCore`` (kdns/zone/_compile.pyx):
    names, trie, common answers (A/AAAA, SRV with glue, single PTR), reverse table and
    assembly. This class keeps the rest: the zones, negative and SERVFAIL blobs, CNAME
    chains and the rare RRsets, through the reference methods above, which see the core's
    names through ``_CoreData``/``_CoreNames``. Same bytes as ``_Compiler`` (tests hold it)."""

    def __init__(self, zones, synced, serial, core_type, consume: bool = False, core=None):
        super().__init__(zones, synced, serial)
        self.consume = consume
        if core is None:
            core = self.new_core(core_type, self.zone_labels, self.zone_reverse)
        else:
            core.begin()        # a persistent core (kdns/serve/incremental.py) starts a compile
        self.core = core
        self.data = _CoreData(self.core)
        self.explicit = _CoreNames(self.core, 0)
        self.tree_nodes = _CoreNames(self.core, 1)

    @classmethod
    def new_core(cls, core_type, zone_labels, zone_reverse, persistent: bool = False):
        """A ``ZoneCore``; a ``persistent`` one keeps encoded answers (``ZoneCore.apply``)
        across compiles: the names given answers there are compiled without RRsets, with
        the same bytes as if their RRsets were given (issue 4's incremental compiler)."""
        return core_type(zone_labels, zone_reverse, error=CompileError,
                         unsupported=_CoreUnsupported, name_labels=R.name_labels,
                         packed_fallback=cls.packed, type_names=R.TYPE_NAMES,
                         persistent=persistent)

    def intern(self, blob: bytes) -> int:
        return self.core.intern(bytes(blob))

    def build(self, rrsets, exists, into=None):
        """The image bytes; with ``into`` (size -> a writable buffer of that size, such as
        ``publish.ImageMemfd``, or None for bytes), the image is written into it, which is
        returned."""
        core = self.core
        core.add(rrsets, exists)
        pod_info = {}
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns, ips in z.pod_namespaces.items():
                    pod_info[(ns.encode().lower(), b"pod") + apex] = (z.pods, ips)
        for apex in self.zone_labels:
            core.mark(apex, True, True)
        for labels in pod_info:
            core.mark(labels, True, True)
        nnodes = core.grow()

        self.zone_negs = [self.negative_blob(zi) for zi in range(len(self.zones))]
        servfail = self.blob(RCODE_SERVFAIL, [], prebuilt=(b"", [0, 0, 0], [(0, 0, 0, 0)], []))

        pod_lists = bytearray()
        apex_nodes, verified_nodes = {}, []

        def special(labels, flags, idx):
            flags, extra = self.special_node(labels, flags, pod_info, pod_lists)
            if flags & NODE_ZONE_APEX:
                apex_nodes[labels] = idx
            if flags & NODE_POD_VERIFIED:
                verified_nodes.append(idx)
            return flags, extra

        chain = self._chain_entries
        core.encode_nodes(chain, self.generic_blob, special)
        nrev = core.encode_reverse(chain, self.generic_blob)
        # Every answer is encoded: from here on nothing can send the input back to the
        # reference compiler, so the RRsets may go before the image is assembled.
        core.drop_rrsets()
        if self.consume and isinstance(rrsets, list):
            rrsets.clear()
        nnodes, nrev, rr_bytes, labels_len, pool_len = core.sizes()

        nodes_off = HEADER.size
        zones_off = nodes_off + NODE.size * nnodes
        rev_off = zones_off + ZONE.size * len(self.zones)
        rrtab_off = rev_off + REV.size * nrev
        labels_off = rrtab_off + rr_bytes
        pods_off = labels_off + labels_len
        pods_off += -pods_off % 4
        blobs_off = pods_off + len(pod_lists)
        total = blobs_off + pool_len
        zone_table = bytearray(ZONE.size * len(self.zones))
        for zi, (z, apex) in enumerate(zip(self.zones, self.zone_labels)):
            apex_node = apex_nodes.get(apex, 0) if z.kind == ZONE_AUTH else 0
            ZONE.pack_into(zone_table, ZONE.size * zi, apex_node, self.zone_negs[zi] + blobs_off,
                           z.ttl, R.wire_length(apex), z.kind)

        def header(crc: int) -> bytes:
            return HEADER.pack(MAGIC, total, FLAG_SYNCED if self.synced else 0,
                               nodes_off, nnodes, zones_off, len(self.zones), rev_off,
                               nrev, servfail + blobs_off, 0, self.serial, crc, 0)

        args = (bytes(zone_table), bytes(pod_lists), verified_nodes, labels_off, rrtab_off,
                pods_off, blobs_off, total, header)
        out = None if into is None else into(total)
        if out is None:
            return core.assemble(*args)
        try:
            core.assemble(*args, out=out.map)
        except BaseException:
            out.close()
            raise
        return out

    def _chain_entries(self, labels: tuple) -> list:
        return self.chain_entries(labels, self.data[labels])

    def export(self, rrsets, groups: list) -> list:
        """Encode ``rrsets`` (no zone apex data, no CNAME) and return their answers as
        ``ZoneCore.apply`` records, one bytes per name in ``groups``: each name with
        data goes to its nearest ancestor-or-self in ``groups``. The blobs are the ones a
        full compile makes for the same names, so an image assembled from them is the
        same bytes, as long as each group's answers depend only on its own names (a
        Kubernetes service's names do: its SRV glue points inside it)."""
        core = self.core
        core.add(rrsets, ())
        core.grow()

        def special(labels, flags, idx):
            raise CompileError("export: zone apexes are not exported")

        core.encode_nodes(self._chain_entries, self.generic_blob, special)
        core.encode_reverse(self._chain_entries, self.generic_blob)
        return core.export(groups)


def pod_list(ips) -> bytes:
    """A verified namespace's pod IPs as the image stores them: sorted 16-byte keys (IPv4 in
    the first 4 bytes), each once. ``Zone.pod_namespaces`` may hold this already (issue 4's
    incremental compiler keeps it between compiles instead of re-packing 100,000 pods)."""
    keys = set()
    for ip in ips:
        try:
            keys.add(socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
                     .ljust(16, b"\0"))
        except OSError:
            keys.add(ipaddress.ip_address(ip).packed.ljust(16, b"\0"))
    return b"".join(sorted(keys))


def _pack_u32(values) -> bytes:
    """Little-endian u32s. NODE is six of them (nrr and flags share one: nrr | flags << 16)
    and RRENT two (qtype with its zero pad, blob); the asserts below keep that true."""
    arr = array.array("I", values) if not isinstance(values, array.array) else values
    if not _LITTLE:
        arr = array.array("I", arr)
        arr.byteswap()
    return arr.tobytes()


assert array.array("I").itemsize == 4
assert NODE.pack(1, 2, 3, 4, 5, 6, 7) == _pack_u32([1, 2, 3, 4, 5 | 6 << 16, 7])
assert RRENT.pack(28, 0, 9) == _pack_u32([28, 9])


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


