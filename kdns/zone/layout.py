"""The zone image layout, defined once: every struct, its size and its fields' offsets by name.

Why: three programs meet in these bytes, the compiler that writes them (``image.py`` and the
compiled core ``_compile.pyx``) and the two packet paths that read them (``refpath.py`` and
``kdns/packet/_fastpath.pyx``). Each names a field by the constant here instead of a number,
and the C side's constants (``layout.pxd``) are held equal to these by
tests/test_layout.py, which also holds every offset to the sizes of the fields before it.

Layout (all integers little-endian; every offset is from the start of the image)::

  header (64 bytes)
    0  8s  magic b"KDNSIMG1"
    8  I   total length           12 I  flags (FLAG_SYNCED)
    16 I   nodes_off              20 I  nnodes     (node 0 is the root)
    24 I   zones_off              28 I  nzones
    32 I   rev_off                36 I  nrev
    40 I   servfail_blob          44 I  autopath_off (0: autopath off)
    48 Q   serial (informational) 56 I  crc32 of bytes [64, length)   60 I reserved

  node (24 bytes): label_off I, first_child I, nchild I, rr_off I, nrr H, flags H, extra I
    label_off -> [u8 len][lower-case bytes]; children are contiguous and sorted by
    (length, bytes) so a walk binary-searches them. ZONE_APEX nodes carry their zone index in
    ``extra``; POD_NS nodes (a namespace under pod.<zone>) synthesise pod answers and, with
    POD_VERIFIED, ``extra`` points at [u32 count][count x 16-byte IPs, sorted].
  rr entry (8 bytes): qtype H, pad H, blob I. qtype 0 is the default for any other type
    (a CNAME owner answers every type with its chain).
  zone (16 bytes): apex_node I, neg_blob I, ttl I, apex_wire_len H, kind H (ZONE_AUTH;
    ZONE_REVERSE: reverse-zone misses are handed to the forwarder, not denied; ZONE_HOSTS:
    a custom-records zone, where only names with records are answered and every other name
    is handed to the forwarder; ZONE_HOSTS_FINAL: the same, other names answered with the
    SERVFAIL blob). A hosts zone's neg_blob holds no records: NOERROR, AA, empty (the
    NODATA of a name that has only other types). ZONE_ALIAS: a rewrite alias's zone,
    answered as ZONE_HOSTS except that a type the alias lacks is handed off too.
  reverse entry (28 bytes): family B, pad 3x, ip 16s (IPv4 in the first 4 bytes), rr_off I,
    nrr H, zone H. Sorted by (family, ip).
  blob: hdr H (AA bit and rcode to OR into the reply; HDR_HANDOFF 0x8000 = chain leaves
    the cluster: hand off), an H, ns H, ar H, nfix H, nseg H,
    len I, rot_at H, rot_n H, fix H*nfix, pad to 4, seg (end I, an H, ns H, ar H, tc H) * nseg,
    data[len].
    ``data`` is the answer, authority and additional sections as they follow the question.
    Positive blobs are encoded for the exact owner name, whose question sits at offset 12,
    so the owner is always pointer 0xC00C and every other pointer is baked in. The zone's
    negative (SOA) blob is shared by every name in the zone: each ``fix`` position receives
    the pointer 0xC000 | (12 + qname_len - apex_wire_len), i.e. the apex inside the
    question, echoing its case. Segments are cut points, cumulative (``end`` bytes of data
    hold that many records of each section); the reply uses the longest that fits and sets
    TC when ``tc`` says answer or authority data was cut (RFC 2181 §9: dropping additional
    data alone does not set TC). A blob whose data is longer than CUT_EVERY_RR_OVER may not
    fit a 512-byte reply, so it can be cut after every record: a truncated reply carries every
    whole record that fits, answer first, then authority, then additional (as CoreDNS's
    Truncate; resolvers without TCP fallback, musl before 1.2.4, use them). Shorter blobs
    always fit whole and are cut at RRset boundaries only, unless they rotate.

    Rotation (CoreDNS ``loadbalance``; clients such as glibc use the first address, so the
    order spreads them over the endpoints): ``rot_n`` >= 2 says the answer records
    [rot_at, rot_at + rot_n) are one A, AAAA or SRV RRset whose records the packet paths may
    send in any cyclic order. The compiler sets it only where that keeps every byte valid:
    the run closes the answer section, its records start with the same owner bytes (a
    pointer to a name before the run), nothing in the blob points into it (SRV targets are
    written whole and never pointed at, RFC 2782) and the blob has no fixups. Such a blob is
    cut after every record, so the segments hold every record's end: the paths find a
    rotated reply's cut points from them, never by parsing, and a truncated rotated reply
    still keeps every whole record that fits.

  autopath section (CoreDNS ``autopath @kubernetes``; only with ``--autopath``), at
  ``autopath_off``, its own offsets relative to its start: count I, nsearch I, search_off I,
  reserved I, then ``count`` pod entries (16-byte IP key as the pod lists store it, IPv4 in
  the first 4 bytes; ns_off I -> [u8 len][lower-case namespace]) sorted by key, the
  namespace labels (each once), and at ``search_off`` the server's own search domains as
  ``nsearch`` uncompressed wire names, which the forwarder tries after the cluster's three.
"""
from __future__ import annotations

import struct

from kdns.dns.rr import ZONE_ALIAS, ZONE_AUTH, ZONE_HOSTS, ZONE_HOSTS_FINAL, ZONE_REVERSE  # noqa: F401  (the zone entry's kinds)

MAGIC = b"KDNSIMG1"

# header
HEADER_MAGIC = 0
HEADER_LENGTH = 8
HEADER_FLAGS = 12
HEADER_NODES_OFF = 16
HEADER_NNODES = 20
HEADER_ZONES_OFF = 24
HEADER_NZONES = 28
HEADER_REV_OFF = 32
HEADER_NREV = 36
HEADER_SERVFAIL = 40
HEADER_AUTOPATH = 44
HEADER_SERIAL = 48
HEADER_CRC = 56
HEADER_SIZE = 64
HEADER = struct.Struct("<8sIIIIIIIIII Q II")

# node
NODE_LABEL_OFF = 0
NODE_FIRST_CHILD = 4
NODE_NCHILD = 8
NODE_RR_OFF = 12
NODE_NRR = 16
NODE_FLAGS = 18
NODE_EXTRA = 20
NODE_SIZE = 24
NODE = struct.Struct("<IIIIHHI")

# rr entry
RRENT_QTYPE = 0
RRENT_BLOB = 4
RRENT_SIZE = 8
RRENT = struct.Struct("<HHI")

# zone entry
ZONE_APEX_NODE = 0
ZONE_NEG_BLOB = 4
ZONE_TTL = 8
ZONE_APEX_WIRE_LEN = 12
ZONE_KIND = 14
ZONE_SIZE = 16
ZONE = struct.Struct("<IIIHH")

# reverse entry
REV_FAMILY = 0
REV_IP = 4
REV_RR_OFF = 20
REV_NRR = 24
REV_ZONE = 26
REV_SIZE = 28
REV = struct.Struct("<B3x16sIHH")

# autopath section header and pod entry
AP_COUNT = 0
AP_NSEARCH = 4
AP_SEARCH_OFF = 8
AP_SIZE = 16
APHDR = struct.Struct("<IIII")
APENT_IP = 0
APENT_NS = 16
APENT_SIZE = 20
APENT = struct.Struct("<16sI")

# blob header, then its fixups (from BLOBHDR_SIZE, padded to 4) and segments
BLOB_HDR = 0
BLOB_AN = 2
BLOB_NS = 4
BLOB_AR = 6
BLOB_NFIX = 8
BLOB_NSEG = 10
BLOB_LEN = 12
BLOB_ROT_AT = 16
BLOB_ROT_N = 18
BLOBHDR_SIZE = 20
BLOBHDR = struct.Struct("<HHHHHHIHH")

# segment
SEG_END = 0
SEG_AN = 4
SEG_NS = 6
SEG_AR = 8
SEG_TC = 10
SEG_SIZE = 12
SEG = struct.Struct("<IHHHH")

# Every struct's fields in order, the pads included, as (offset, struct code): the test holds
# each offset to the sum of the sizes before it, and the struct to their concatenation.
FIELDS = {
    "HEADER": (HEADER, HEADER_SIZE, (
        (HEADER_MAGIC, "8s"), (HEADER_LENGTH, "I"), (HEADER_FLAGS, "I"),
        (HEADER_NODES_OFF, "I"), (HEADER_NNODES, "I"), (HEADER_ZONES_OFF, "I"),
        (HEADER_NZONES, "I"), (HEADER_REV_OFF, "I"), (HEADER_NREV, "I"),
        (HEADER_SERVFAIL, "I"), (HEADER_AUTOPATH, "I"), (HEADER_SERIAL, "Q"), (HEADER_CRC, "I"), (60, "I"))),
    "NODE": (NODE, NODE_SIZE, (
        (NODE_LABEL_OFF, "I"), (NODE_FIRST_CHILD, "I"), (NODE_NCHILD, "I"), (NODE_RR_OFF, "I"),
        (NODE_NRR, "H"), (NODE_FLAGS, "H"), (NODE_EXTRA, "I"))),
    "RRENT": (RRENT, RRENT_SIZE, ((RRENT_QTYPE, "H"), (2, "H"), (RRENT_BLOB, "I"))),
    "ZONE": (ZONE, ZONE_SIZE, (
        (ZONE_APEX_NODE, "I"), (ZONE_NEG_BLOB, "I"), (ZONE_TTL, "I"),
        (ZONE_APEX_WIRE_LEN, "H"), (ZONE_KIND, "H"))),
    "REV": (REV, REV_SIZE, (
        (REV_FAMILY, "B"), (1, "3x"), (REV_IP, "16s"), (REV_RR_OFF, "I"), (REV_NRR, "H"),
        (REV_ZONE, "H"))),
    "APHDR": (APHDR, AP_SIZE, (
        (AP_COUNT, "I"), (AP_NSEARCH, "I"), (AP_SEARCH_OFF, "I"), (12, "I"))),
    "APENT": (APENT, APENT_SIZE, ((APENT_IP, "16s"), (APENT_NS, "I"))),
    "BLOBHDR": (BLOBHDR, BLOBHDR_SIZE, (
        (BLOB_HDR, "H"), (BLOB_AN, "H"), (BLOB_NS, "H"), (BLOB_AR, "H"), (BLOB_NFIX, "H"),
        (BLOB_NSEG, "H"), (BLOB_LEN, "I"), (BLOB_ROT_AT, "H"), (BLOB_ROT_N, "H"))),
    "SEG": (SEG, SEG_SIZE, (
        (SEG_END, "I"), (SEG_AN, "H"), (SEG_NS, "H"), (SEG_AR, "H"), (SEG_TC, "H"))),
}

FLAG_SYNCED = 1                # header flags: the sources were in sync when it was compiled

NODE_EXISTS = 1                # node flags: has data or was declared to exist
NODE_ZONE_APEX = 2
NODE_POD_NS = 4
NODE_POD_VERIFIED = 8

HDR_AA = 0x0400                # blob hdr: the AA bit (RFC 1035 §4.1.1), ORed into the reply
# A CNAME chain that leaves the cluster (an ExternalName to an outside name) is answered as
# CNAME + the target's records from the forwarder. Its blobs carry this bit; the packet paths
# hand such queries off, and the forwarder composes the answer from the blob (CNAME alone)
# and the upstream's records. QR is set in every reply anyway, so ORing the header into the
# flags changes no byte.
HDR_HANDOFF = 0x8000

DEFAULT_QTYPE = 0              # rr entry qtype: answers every type without its own entry
# 512 (RFC 1035 §4.2.1) - the header (12) - the shortest question (5: the root, type, class)
# - OPT (11): a blob with more data than this may not fit a UDP reply whole.
CUT_EVERY_RR_OVER = 484
# The record types whose order rotates (A, AAAA, SRV; RFC 1035 §3.2.2, RFC 2782) and the
# per-worker counter table the packet paths rotate by: one counter per hashed answer blob,
# so names asked in lockstep (a client's A and AAAA) each see every rotation.
ROTATE_TYPES = (1, 28, 33)
ROT_BITS = 12
ROT_SLOTS = 1 << ROT_BITS
# A counter's slot: the top ROT_BITS of (blob offset * ROT_HASH) mod 2**32, multiplicative
# hashing (Knuth 6.4) by an odd constant that fits a C int.
ROT_HASH = 0x045D9F3B


def rot_slot(blob: int) -> int:
    """The counter slot of the answer blob at ``blob``."""
    return ((blob * ROT_HASH) & 0xFFFFFFFF) >> (32 - ROT_BITS)
QUESTION_OFFSET = 12           # where the question name stands in every reply (RFC 1035 §4.1.1)
