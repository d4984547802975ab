"""The zone image: its single definition, and the compiler from RRsets to image bytes.

Why: the packet path must answer with no allocation and no Python, so everything that can be
decided before a query arrives is decided here, once per zone change, and frozen into one flat,
position-independent byte string (offsets only, no pointers) that all workers map read-only.

What it must not do: know about Kubernetes (that is ``records.py``) or sockets.

Layout (all integers little-endian; every offset is from the start of the image)::

  header (64 bytes)
    0  8s  magic b"KDNSIMG1"
    8  I   total length           12 I  flags (FLAG_SYNCED)
    16 I   nodes_off              20 I  nnodes     (node 0 is the root)
    24 I   zones_off              28 I  nzones
    32 I   rev_off                36 I  nrev
    40 I   servfail_blob          44 I  reserved
    48 Q   serial (informational) 56 I  crc32 of bytes [64, length)   60 I reserved

  node (24 bytes): label_off I, first_child I, nchild I, rr_off I, nrr H, flags H, extra I
    label_off -> [u8 len][lower-case bytes]; children are contiguous and sorted by
    (length, bytes) so a walk binary-searches them. ZONE_APEX nodes carry their zone index in
    ``extra``; POD_NS nodes (a namespace under pod.<zone>) synthesise pod answers and, with
    POD_VERIFIED, ``extra`` points at [u32 count][count x 16-byte IPs, sorted].
  rr entry (8 bytes): qtype H, pad H, blob I. qtype 0 is the default for any other type
    (a CNAME owner answers every type with its chain).
  zone (16 bytes): apex_node I, neg_blob I, ttl I, apex_wire_len H, kind H (ZONE_AUTH or
    ZONE_REVERSE: reverse-zone misses are handed to the forwarder, not denied).
  reverse entry (28 bytes): family B, pad 3x, ip 16s (IPv4 in the first 4 bytes), rr_off I,
    nrr H, zone H. Sorted by (family, ip).
  blob: hdr H (AA bit and rcode to OR into the reply), an H, ns H, ar H, nfix H, nseg H,
    len I, fix H*nfix, pad to 4, seg (end I, an H, ns H, ar H, tc H) * nseg, data[len].
    ``data`` is the answer, authority and additional sections as they follow the question.
    Positive blobs are encoded for the exact owner name, whose question sits at offset 12,
    so the owner is always pointer 0xC00C and every other pointer is baked in. The zone's
    negative (SOA) blob is shared by every name in the zone: each ``fix`` position receives
    the pointer 0xC000 | (12 + qname_len - apex_wire_len), i.e. the apex inside the
    question, echoing its case. Segments are RRset boundaries, cumulative; the reply uses
    the longest that fits and sets TC when ``tc`` says answer or authority data was cut
    (RFC 2181 §9: dropping additional data alone does not set TC).
"""
from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable

from . import rr as R

MAGIC = b"KDNSIMG1"
HEADER = struct.Struct("<8sIIIIIIIIII Q II")
NODE = struct.Struct("<IIIIHHI")
RRENT = struct.Struct("<HHI")
ZONE = struct.Struct("<IIIHH")
REV = struct.Struct("<B3x16sIHH")
BLOBHDR = struct.Struct("<HHHHHHI")
SEG = struct.Struct("<IHHHH")
assert (HEADER.size, NODE.size, RRENT.size, ZONE.size, REV.size, BLOBHDR.size, SEG.size) == \
    (64, 24, 8, 16, 28, 16, 12)

FLAG_SYNCED = 1

NODE_EXISTS = 1        # has data or was declared to exist
NODE_ZONE_APEX = 2
NODE_POD_NS = 4
NODE_POD_VERIFIED = 8

ZONE_AUTH = 0
ZONE_REVERSE = 1

HDR_AA = 0x0400
RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 0, 1, 2, 3
RCODE_NOTIMP, RCODE_REFUSED = 4, 5

DEFAULT_QTYPE = 0
QUESTION_OFFSET = 12


class CompileError(ValueError):
    """The compiler's input is inconsistent; the message names the offending name."""


@dataclass(frozen=True)
class Zone:
    """A zone kdns answers for.

    ``pods``: 'disabled', 'insecure' or 'verified' (only for an authoritative zone);
    ``pod_namespaces`` maps each namespace to None (any IP, insecure) or the set of pod IPs
    that exist in it (verified). The zone's SOA RRset must be among the compiled RRsets.
    """
    apex: str
    kind: int = ZONE_AUTH
    ttl: int = 30
    pods: str = "disabled"
    pod_namespaces: dict = field(default_factory=dict)


def compile_image(rrsets: Iterable[R.RRset], zones: Iterable[Zone], *,
                  exists: Iterable[str] = (), synced: bool = True, serial: int = 0) -> bytes:
    """RRsets -> image bytes. Identical input gives identical bytes."""
    return _Compiler(list(zones), synced, serial).build(rrsets, exists)


# --------------------------------------------------------------------------- compiler


class _Compiler:
    def __init__(self, zones: list[Zone], synced: bool, serial: int):
        self.zones = sorted(zones, key=lambda z: R.name_labels(z.apex)[::-1])
        self.zone_labels = [R.name_labels(z.apex) for z in self.zones]
        self.synced = synced
        self.serial = serial
        self.data: dict[tuple, dict[int, R.RRset]] = {}   # labels -> rtype -> RRset
        self.explicit: set[tuple] = set()
        self.blobs = bytearray()
        self.blob_cache: dict[bytes, int] = {}

    # ---- input
    def zone_of(self, labels: tuple) -> int:
        best = -1
        for i, apex in enumerate(self.zone_labels):
            if R.is_subdomain(labels, apex) and (best < 0 or len(apex) > len(self.zone_labels[best])):
                best = i
        return best

    def add(self, rrsets: Iterable[R.RRset], exists: Iterable[str]) -> None:
        for s in rrsets:
            labels = R.name_labels(s.name)
            if self.zone_of(labels) < 0:
                raise CompileError(f"{s.name} is outside every served zone")
            byname = self.data.setdefault(labels, {})
            if s.rtype in byname:
                raise CompileError(f"duplicate RRset {s.name} {R.TYPE_NAMES.get(s.rtype, s.rtype)}")
            byname[s.rtype] = s
        for name in exists:
            labels = R.name_labels(name)
            if self.zone_of(labels) < 0:
                raise CompileError(f"{name} is outside every served zone")
            self.explicit.add(labels)
        for labels, byname in self.data.items():
            if R.CNAME in byname and len(byname) > 1:
                # RFC 2181 §10.1: a CNAME owner has no other data.
                raise CompileError(f"{'.'.join(l.decode() for l in labels)}. has a CNAME and other data")

    # ---- blobs
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
                        w.rr(ptr, owner, s.rtype, s.ttl, rd)
                    counts[si] += len(s.rdatas)
                    segs.append((len(w.buf), *counts))
            data, fix = bytes(w.buf), []
        essential = counts[0] + counts[1]
        seg_bytes = b"".join(SEG.pack(end, an, ns, ar, 1 if an + ns < essential else 0)
                             for end, an, ns, ar in segs)
        head = BLOBHDR.pack(hdr, counts[0], counts[1], counts[2], len(fix), len(segs), len(data))
        fixb = b"".join(struct.pack("<H", f) for f in fix)
        fixb += b"\0" * (-len(fixb) % 4)
        blob = head + fixb + seg_bytes + data
        blob += b"\0" * (-len(blob) % 4)
        off = self.blob_cache.get(blob)
        if off is None:
            off = len(self.blobs)
            self.blobs += blob
            self.blob_cache[blob] = off
        return off

    def negative_blob(self, zi: int) -> int:
        """The zone's SOA for the authority section, with its apex written as fixups."""
        apex = self.zone_labels[zi]
        soa = self.data.get(apex, {}).get(R.SOA)
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
        for t in targets:
            for rtype in (R.A, R.AAAA):
                s = self.data.get(t, {}).get(rtype)
                if s is not None:
                    out.append((t, None, s))
        return out

    def chase(self, labels: tuple, qtype: int):
        """Answer sections and rcode for (labels, qtype), following in-image CNAMEs (≤10)."""
        answer, seen = [], set()
        cur, ptr = labels, QUESTION_OFFSET
        for _ in range(11):
            byname = self.data.get(cur)
            zi = self.zone_of(cur)
            if byname is None:
                exists = cur in self.explicit or cur in self.enclosers
                if zi < 0 or self.zones[zi].kind == ZONE_REVERSE:
                    return answer, [], [], RCODE_NOERROR     # outside: CNAME alone
                return answer, [(self.zone_labels[zi], None, self.data[self.zone_labels[zi]][R.SOA])], \
                    [], RCODE_NOERROR if exists else RCODE_NXDOMAIN
            cname = byname.get(R.CNAME)
            if cname is not None and qtype != R.CNAME:
                if cur in seen:
                    break
                seen.add(cur)
                answer.append((cur, ptr, cname))
                ptr = None
                cur = R.name_labels(cname.rdatas[0].target)
                continue
            s = byname.get(qtype)
            if s is None:
                return answer, [(self.zone_labels[zi], None, self.data[self.zone_labels[zi]][R.SOA])], \
                    [], RCODE_NOERROR
            answer.append((cur, ptr, s))
            extra = []
            if qtype in (R.SRV, R.NS):
                extra = self.glue([R.name_labels(rd.target) for rd in s.rdatas])
            return answer, [], extra, RCODE_NOERROR
        return answer, [], [], RCODE_SERVFAIL   # CNAME loop or chain too long

    def rr_entries(self, labels: tuple) -> list[tuple[int, int]]:
        byname = self.data.get(labels, {})
        qtypes = set(byname)
        if R.CNAME in byname:
            # Every type the chain can answer gets its own blob; 0 covers the rest.
            cur = R.name_labels(byname[R.CNAME].rdatas[0].target)
            for _ in range(10):
                nxt = self.data.get(cur, {})
                qtypes |= set(nxt)
                if R.CNAME not in nxt:
                    break
                cur = R.name_labels(nxt[R.CNAME].rdatas[0].target)
            qtypes.discard(R.CNAME)
            qtypes = {q for q in qtypes if q not in (R.SOA, R.NS)} | {R.CNAME, DEFAULT_QTYPE}
        entries = []
        for qtype in sorted(qtypes):
            an, ns, ar, rcode = self.chase(labels, qtype if qtype else 0xFFFF - 1)
            if not an and rcode == RCODE_NOERROR:
                continue                        # plain NODATA: the zone blob answers it
            entries.append((qtype, self.blob(HDR_AA | rcode, [an, ns, ar], labels)))
        return entries

    # ---- trie
    def build(self, rrsets, exists) -> bytes:
        self.add(rrsets, exists)
        names = set(self.data) | self.explicit
        for apex in self.zone_labels:
            names.add(apex)
        # Every ancestor of a name inside its zone is an empty non-terminal (it exists).
        self.enclosers = set()
        fwd_names, rev_names = [], []
        for labels in names:
            zi = self.zone_of(labels)
            if self.zones[zi].kind == ZONE_REVERSE and labels != self.zone_labels[zi]:
                rev_names.append(labels)
                continue
            fwd_names.append(labels)
            apex_len = len(self.zone_labels[zi])
            for i in range(1, len(labels) - apex_len + 1):
                self.enclosers.add(labels[i:])
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns in z.pod_namespaces:
                    pn = (ns.encode().lower(), b"pod") + apex
                    fwd_names.append(pn)
                    self.enclosers.add((b"pod",) + apex)

        # Tree of dicts keyed by label, walked from the root.
        tree: dict = {}
        for labels in fwd_names:
            node = tree
            for label in reversed(labels):
                node = node.setdefault(label, {})
        # Breadth-first numbering keeps each node's children contiguous.
        order = [((), tree)]
        nodes_meta = []
        i = 0
        while i < len(order):
            labels, sub = order[i]
            kids = sorted(sub, key=lambda l: (len(l), l))
            first = len(order)
            for k in kids:
                order.append(((k,) + labels, sub[k]))
            nodes_meta.append((labels, first if kids else 0, len(kids)))
            i += 1

        self.zone_negs = [self.negative_blob(zi) for zi in range(len(self.zones))]
        servfail = self.blob(RCODE_SERVFAIL, [], prebuilt=(b"", [0, 0, 0], [(0, 0, 0, 0)], []))

        labels_pool = bytearray()
        label_offs: dict[bytes, int] = {}
        rrtab = bytearray()
        node_recs = []
        pod_lists = bytearray()
        apex_index = {apex: zi for zi, apex in enumerate(self.zone_labels)}
        pod_info = {}
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns, ips in z.pod_namespaces.items():
                    pod_info[(ns.encode().lower(), b"pod") + apex] = (z.pods, ips)
        for idx, (labels, first, nchild) in enumerate(nodes_meta):
            label = labels[0] if labels else b""
            if label not in label_offs:
                label_offs[label] = len(labels_pool)
                labels_pool.append(len(label))
                labels_pool += label
            flags, extra = 0, 0
            if labels in self.data or labels in self.explicit:
                flags |= NODE_EXISTS
            if labels in apex_index:
                flags |= NODE_ZONE_APEX | NODE_EXISTS
                extra = apex_index[labels]
            if labels in pod_info:
                mode, ips = pod_info[labels]
                flags |= NODE_POD_NS | NODE_EXISTS
                if mode == "verified":
                    flags |= NODE_POD_VERIFIED
                    packed = sorted(ipaddress.ip_address(ip).packed.ljust(16, b"\0") for ip in (ips or ()))
                    extra = len(pod_lists)
                    pod_lists += struct.pack("<I", len(packed)) + b"".join(packed)
            entries = self.rr_entries(labels) if labels in self.data else []
            node_recs.append([label_offs[label], first, nchild, len(rrtab), len(entries), flags, extra])
            for qtype, boff in entries:
                rrtab += RRENT.pack(qtype, 0, boff)

        rev_recs = []
        for labels in rev_names:
            zi = self.zone_of(labels)
            fam, ip = reverse_to_ip(labels)
            if fam == 0:
                raise CompileError(f"{'.'.join(l.decode() for l in labels)}. is not a full reverse name")
            entries = self.rr_entries(labels) if labels in self.data else []
            rev_recs.append((fam, ip, entries, zi))
        rev_recs.sort(key=lambda r: (r[0], r[1]))

        # Lay out sections; offsets are absolute.
        off = HEADER.size
        nodes_off = off
        off += NODE.size * len(node_recs)
        zones_off = off
        off += ZONE.size * len(self.zones)
        rev_off = off
        off += REV.size * len(rev_recs)
        rrtab_off = off
        rev_rrtab = bytearray()
        for fam, ip, entries, zi in rev_recs:
            for qtype, boff in entries:
                rev_rrtab += RRENT.pack(qtype, 0, boff)
        off += len(rrtab) + len(rev_rrtab)
        labels_off = off
        off += len(labels_pool)
        off += -off % 4
        pods_off = off
        off += len(pod_lists)
        blobs_off = off
        total = blobs_off + len(self.blobs)

        out = bytearray(total)
        p = nodes_off
        for rec in node_recs:
            rec[0] += labels_off
            rec[3] += rrtab_off
            if rec[5] & NODE_POD_VERIFIED:
                rec[6] += pods_off
            NODE.pack_into(out, p, *rec)
            p += NODE.size
        # Blob offsets inside rr entries are relative to the blob pool: rebase them.
        rebased = bytearray()
        for tab in (rrtab, rev_rrtab):
            for j in range(0, len(tab), RRENT.size):
                qtype, _, boff = RRENT.unpack_from(tab, j)
                rebased += RRENT.pack(qtype, 0, boff + blobs_off)
        out[rrtab_off:rrtab_off + len(rebased)] = rebased
        p = zones_off
        for zi, (z, apex) in enumerate(zip(self.zones, self.zone_labels)):
            apex_node = next(i for i, m in enumerate(nodes_meta) if m[0] == apex) \
                if z.kind == ZONE_AUTH else 0
            ZONE.pack_into(out, p, apex_node, self.zone_negs[zi] + blobs_off, z.ttl,
                           R.wire_length(apex), z.kind)
            p += ZONE.size
        p = rev_off
        rr_cursor = rrtab_off + len(rrtab)
        for fam, ip, entries, zi in rev_recs:
            REV.pack_into(out, p, fam, ip, rr_cursor, len(entries), zi)
            rr_cursor += RRENT.size * len(entries)
            p += REV.size
        out[labels_off:labels_off + len(labels_pool)] = labels_pool
        out[pods_off:pods_off + len(pod_lists)] = pod_lists
        out[blobs_off:] = self.blobs
        crc = zlib.crc32(memoryview(out)[HEADER.size:])
        HEADER.pack_into(out, 0, MAGIC, total, FLAG_SYNCED if self.synced else 0,
                         nodes_off, len(node_recs), zones_off, len(self.zones), rev_off,
                         len(rev_recs), servfail + blobs_off, 0, self.serial, crc, 0)
        return bytes(out)


def reverse_to_ip(labels: tuple) -> tuple[int, bytes]:
    """Full reverse name (RFC 1035 §3.5, RFC 3596 §2.5) -> (family, 16-byte key); (0, b'') if not.

    Only canonical spellings match (decimal without leading zeros, single hex nibbles), the
    same rule the packet path applies.
    """
    if labels[-2:] == (b"in-addr", b"arpa") and len(labels) == 6:
        octets = []
        for label in labels[3::-1]:
            if not label.isdigit() or len(label) > 3 or (len(label) > 1 and label[0:1] == b"0"):
                return 0, b""
            v = int(label)
            if v > 255:
                return 0, b""
            octets.append(v)
        return 4, bytes(octets).ljust(16, b"\0")
    if labels[-2:] == (b"ip6", b"arpa") and len(labels) == 34:
        nibbles = []
        for label in labels[31::-1]:
            if len(label) != 1 or label not in b"0123456789abcdef":
                return 0, b""
            nibbles.append(int(label, 16))
        return 6, bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, 32, 2))
    return 0, b""


def reverse_name(ip: str) -> str:
    """IP text -> its PTR owner name (RFC 1035 §3.5, RFC 3596 §2.5)."""
    return ipaddress.ip_address(ip).reverse_pointer + "."
