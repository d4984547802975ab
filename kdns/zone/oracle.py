"""The reference compiler: the whole compile in plain Python, the oracle the compiled core is
held to byte for byte (tests/test_compile_compiled.py), and the compiler only where the core
is not: the pure mode (``KDNS_PURE=1``, ``KDNS_PURE_COMPILE=1``) or the extension not built.

Speed still matters here (a cluster of 10,000 services and 100,000 endpoints is ~250,000
names): every name is parsed once and its labels, zone, wire form and packed addresses are
cached; the common answers (address RRsets, single PTRs, SRV with glue) are encoded directly;
tables are packed in bulk. The generic encoder (``encode.Encoder``) handles the rest and is
the definition the direct encoders must match byte for byte (tests/test_records.py holds
them to it through the reference packet path).
"""
from __future__ import annotations

import array
import socket
import struct
import sys
import zlib
from typing import Iterable

from kdns.dns import rr as R
from kdns.dns.rr import ZONE_AUTH, Zone
from kdns.dns.wire import SERVFAIL as RCODE_SERVFAIL
from kdns.zone.encode import CompileError, Encoder, cut_at_every_rr, of_type, reverse_to_ip
from kdns.zone.layout import (BLOB_AN, BLOBHDR, CUT_EVERY_RR_OVER, FLAG_SYNCED, HDR_AA, HEADER, MAGIC, NODE, NODE_EXISTS,
                              NODE_EXTRA, NODE_LABEL_OFF, NODE_POD_VERIFIED, NODE_RR_OFF,
                              NODE_SIZE, NODE_ZONE_APEX, QUESTION_OFFSET, REV, RRENT, SEG,
                              ZONE)

_LITTLE = sys.byteorder == "little"
_RR_FIXED = struct.Struct("!HHIH")      # type, class, TTL, rdlength (RFC 1035 §4.1.3)
_OWNER_Q = b"\xc0\x0c"                  # the owner is the question name at offset 12
_SEG0 = SEG.pack(0, 0, 0, 0, 1)         # "nothing fits": the answer was cut, so TC
_NODE_WORDS = NODE_SIZE // 4            # a node as u32 words (``_pack_u32``)


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


def _rtype(s: R.RRset) -> int:
    return s.rtype


def _child_key(labels: tuple) -> tuple:
    return len(labels[0]), labels[0]


class ReferenceCompiler(Encoder):
    def __init__(self, zones: list[Zone], synced: bool, serial: int):
        super().__init__(zones, synced, serial)
        # labels -> that name's RRsets, in input order. A tuple, not a dict by type: nearly
        # every name has one RRset, and a one-entry dict costs 224 bytes to a tuple's 48
        # (40 MB at the compile's memory peak for 232,000 names).
        self.data: dict[tuple, tuple] = {}
        self.fwd_names: list[tuple] = []                  # names of the trie
        self.rev_names: list[tuple] = []                  # (labels, zone) of reverse names
        self.explicit: set[tuple] = set()
        self.cname_owners: list[tuple] = []
        self.blobs: list[bytes] = []      # the same objects as blob_cache's keys: one copy
        self.blobs_len = 0
        self.blob_cache: dict[bytes, int] = {}
        self.tree_nodes: dict[tuple, list] = {}
        self.prefix_cache: dict[tuple, tuple] = {}

    # ---- names
    def rrsets_of(self, labels: tuple) -> tuple | None:
        return self.data.get(labels)

    def name_exists(self, labels: tuple) -> bool:
        return labels in self.explicit or labels in self.tree_nodes

    # ---- input
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
            elif of_type(byname, s.rtype) is not None:
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
        # Long blobs are cut after every record; so are those that may rotate (two or more
        # answer records; cut_at_every_rr decides).
        if len(blob) > BLOBHDR.size + CUT_EVERY_RR_OVER or (blob[BLOB_AN] | blob[BLOB_AN + 1] << 8) >= 2:
            blob = cut_at_every_rr(blob)
        blob += b"\0" * (-len(blob) % 4)
        off = self.blob_cache.setdefault(blob, self.blobs_len)
        if off == self.blobs_len:               # new: it goes at the end of the pool
            self.blobs.append(blob)
            self.blobs_len += len(blob)
        return off

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
                    BLOBHDR.pack(HDR_AA, n, 0, 0, 0, 2, dlen, 0, 0) + _SEG0 + SEG.pack(dlen, n, 0, 0, 0),
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
            return self.intern(BLOBHDR.pack(HDR_AA, 1, 0, 0, 0, 2, len(data), 0, 0) + _SEG0
                               + SEG.pack(len(data), 1, 0, 0, 0) + data)
        return -1

    def srv_blob(self, qname: tuple, s: R.RRset) -> int:
        """SRV answer plus A/AAAA glue, encoded directly; same bytes as ``blob`` (the
        generic encoder) for this shape, or -1 when pointers would not reach (>16 KiB).

        As in ``Wire``: the question's suffixes are remembered from offset 12; SRV targets
        are written whole (RFC 2782) and never pointed at (they rotate, layout.py); a glue
        owner compresses against the question and the glue owners before it, and its own
        suffixes are remembered where it writes them."""
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
            name = bytearray()
            for i, label in enumerate(owner):       # ``Wire.name``
                ptr = where.get(owner[i:])
                if ptr is not None:
                    name += struct.pack("!H", 0xC000 | ptr)
                    break
                where.setdefault(owner[i:], base + size + len(name))
                name.append(len(label))
                name += label
            else:
                name.append(0)
            fixed = struct.pack("!HHI", glue.rtype, R.CLASS_IN, glue.ttl)
            head = bytes(name) + fixed
            for rd in glue.rdatas:
                ip = self.packed(rd.address)
                rr = head + struct.pack("!H", len(ip)) + ip
                parts.append(rr)
                size += len(rr)
                # The owner's next records point at the whole name just written.
                head = struct.pack("!H", 0xC000 | where[owner]) + fixed
            n_ar += len(glue.rdatas)
            segs.append(SEG.pack(size, n_an, 0, n_ar, 0))
        if base + size > R.MAX_POINTER:
            return -1                       # positions past 0x3FFF are not remembered
        data = b"".join(parts)
        return self.intern(BLOBHDR.pack(HDR_AA, n_an, 0, n_ar, 0, len(segs), size, 0, 0)
                           + b"".join(segs) + data)

    def rr_entries(self, labels: tuple) -> list[tuple[int, int]]:
        byname = self.data[labels]
        if of_type(byname, R.CNAME) is not None:
            return self.chain_entries(labels, byname)
        entries = []
        for s in sorted(byname, key=_rtype):
            off = self.answer_only_blob(labels, s)
            entries.append((s.rtype, off if off >= 0 else self.generic_blob(labels, s.rtype)))
        return entries

    # ---- trie and tables
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

    def reverse_key(self, labels: tuple) -> tuple[int, bytes]:
        key = _fast_reverse_key(labels) or reverse_to_ip(labels)
        if key[0] == 0:
            raise CompileError(f"{'.'.join(l.decode() for l in labels)}. is not a full reverse name")
        return key

    def build(self, rrsets, exists, autopath: bytes = b"") -> bytes:
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
        # The autopath section last, 4-aligned; its offsets are its own (layout.py).
        ap_pad = -total % 4 if autopath else 0
        ap_off = total + ap_pad if autopath else 0
        total += ap_pad + len(autopath)

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
                 b"\0" * pad, pod_lists, blob_data, b"\0" * ap_pad, autopath]
        del node_flat, rr_flat, blob_data
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        header = HEADER.pack(MAGIC, total, FLAG_SYNCED if self.synced else 0,
                             nodes_off, nnodes, zones_off, len(self.zones), rev_off,
                             nrev, servfail + blobs_off, ap_off, self.serial, crc, 0)
        return b"".join([header, *parts])

    def release(self) -> None:
        """Drop everything only encoding needs (names, caches, the blob pool's pieces) before
        the image is assembled: their big dict tables go straight back to the OS."""
        self.data = self.blob_cache = self.label_cache = self.wire_cache = None
        self.tree_nodes = self.prefix_cache = self.explicit = None
        self.blobs = self.fwd_names = self.rev_names = self.cname_owners = None


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
