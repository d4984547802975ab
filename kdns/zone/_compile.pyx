# cython: language_level=3
"""The zone compiler's hot phases in C (compile 10k services / 100k endpoints in under a
second, and in far less memory). It runs in the supervisor, never on the packet path, so it
is its own extension: it holds the GIL, allocates and raises, all of which the packet path
(kdns/packet/_fastpath.pyx) must not do. What the two share, the image layout and its
integer readers and writers, is kdns/zone/layout.pxd.

Why C data: the reference compiler (kdns/zone/oracle.py) spends its time creating and
hashing tuples, dicts and bytes, about ten objects per name. Here a name is an integer id
interned in one open-addressing table of lower-cased wire forms, so its parent, zone, trie
children and RRsets are arrays indexed by id; answer blobs are written into one growing
buffer and de-duplicated by a C hash; the image is assembled into one bytes object.

What it must not decide: the image format and the DNS rules. The format is
kdns/zone/layout.py (the offsets written below are its names); the rules are the reference
compiler's (kdns/zone/oracle.py with kdns/zone/encode.py), which the tests hold this to byte
for byte. The core encodes every answer itself, name compression, CNAME chains, the zones'
negative answers and the special nodes included; the caller hands it plain data (RRsets,
names, per-zone TTLs, pod namespaces) and gets an image back (``compile``), or a service's
answers as records (``export``, for the incremental compiler's ``apply``). Input it cannot
encode (a number out of its field's range, an address of the wrong family, a blob over
4 GiB) raises the caller's ``error`` with a message; there is no second encoder behind it.
Every write is bounds-checked by ``_grow``; nothing here trusts its input.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

from kdns.dns.wire cimport (CLASS_IN, MAX_POINTER, SERVFAIL as RCODE_SERVFAIL, T_A, T_AAAA,
                            T_CNAME, T_NS, T_PTR, T_SOA, T_SRV, T_TXT, ascii_lower, hex_nibble)
from kdns.zone.layout cimport (BLOB_AN, BLOB_AR, BLOB_HDR, BLOB_LEN, BLOB_NFIX, BLOB_NS,
                               BLOB_NSEG, BLOB_ROT_AT, BLOB_ROT_N, BLOBHDR_SIZE, CUT_EVERY_RR_OVER, DEFAULT_QTYPE,
                               FLAG_SYNCED, HDR_AA,
                               HDR_HANDOFF, HEADER_CRC, HEADER_FLAGS, HEADER_LENGTH,
                               HEADER_MAGIC, HEADER_NNODES, HEADER_NODES_OFF, HEADER_NREV,
                               HEADER_NZONES, HEADER_REV_OFF, HEADER_SERIAL, HEADER_SERVFAIL, HEADER_AUTOPATH,
                               HEADER_SIZE, HEADER_ZONES_OFF, NODE_POD_NS, NODE_POD_VERIFIED,
                               NODE_ZONE_APEX, ZONE_APEX_NODE, ZONE_APEX_WIRE_LEN, ZONE_AUTH,
                               ZONE_KIND, ZONE_NEG_BLOB, ZONE_REVERSE, ZONE_SIZE, ZONE_TTL,
                               NODE_EXISTS,
                               NODE_EXTRA, NODE_FIRST_CHILD, NODE_FLAGS, NODE_LABEL_OFF,
                               NODE_NCHILD, NODE_NRR, NODE_RR_OFF, NODE_SIZE, REV_FAMILY, REV_IP,
                               REV_NRR, REV_RR_OFF, REV_SIZE, REV_ZONE, RRENT_BLOB, RRENT_QTYPE,
                               RRENT_SIZE, SEG_AN, SEG_AR, SEG_END, SEG_NS, SEG_SIZE, SEG_TC,
                               le16, le32, put16le, put32le)

import zlib

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef enum:
    # Per-name flags.
    NF_DATA = 1          # owns RRsets
    NF_EXPLICIT = 2      # declared to exist (``exists``)
    NF_FWD = 4           # a name of the forward trie (with its ancestors)
    NF_REV = 8           # a full reverse name: goes to the reverse table
    NF_TREE = 16         # a node of the forward trie
    NF_SPECIAL = 32      # zone apex or pod namespace: image.py decides flags and extra
    NF_CNAME = 64        # owns a CNAME RRset
    NF_ENC = 128         # answers given already encoded (``apply``)


cdef inline void put16be(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32be(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint64_t fnv1a(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef int _grow(void **buf, size_t *cap, size_t need, size_t item) except -1:
    """Make ``*buf`` hold at least ``need`` items of ``item`` bytes (doubling)."""
    cdef size_t ncap
    cdef void *p
    if need <= cap[0]:
        return 0
    ncap = cap[0] * 2 if cap[0] else 64
    while ncap < need:
        ncap *= 2
    p = realloc(buf[0], ncap * item)
    if p == NULL:
        raise MemoryError()
    buf[0] = p
    cap[0] = ncap
    return 0


# qsort comparators need the name buffer; the core holds the GIL throughout, so one
# compile at a time uses these.
cdef const uint8_t *_sort_nbuf = NULL
cdef const uint32_t *_sort_noff = NULL


cdef int _cmp_child(const void *a, const void *b) noexcept nogil:
    # Children sorted by (label length, label bytes), the order the packet path searches.
    cdef const uint8_t *x = _sort_nbuf + _sort_noff[(<const int32_t *>a)[0]]
    cdef const uint8_t *y = _sort_nbuf + _sort_noff[(<const int32_t *>b)[0]]
    if x[0] != y[0]:
        return -1 if x[0] < y[0] else 1
    return memcmp(x + 1, y + 1, x[0])


cdef struct RevKey:
    uint8_t key[17]      # family, then the 16-byte address: the reverse table's order
    int32_t id


cdef int _cmp_rev(const void *a, const void *b) noexcept nogil:
    return memcmp((<const RevKey *>a).key, (<const RevKey *>b).key, 17)


# A blob's offset with this bit set is in the last published image's pool (``rebase``),
# not in the core's own store; the store is kept under 2 GiB so that the bit is free.
cdef uint32_t IN_IMAGE = 0x80000000u


cdef inline const uint8_t *blob_at(const uint8_t *pool, const uint8_t *ipool,
                                   const uint32_t *bref, uint32_t bid) noexcept nogil:
    cdef uint32_t off = bref[2 * bid]
    return ipool + (off & ~IN_IMAGE) if off & IN_IMAGE else pool + off


cdef void copy_placed(uint8_t *o, const uint8_t *pool, const uint8_t *ipool,
                      const uint32_t *bref, const uint32_t *placed,
                      size_t nplaced) noexcept nogil:
    cdef size_t k
    for k in range(nplaced):
        memcpy(o, blob_at(pool, ipool, bref, placed[k]), bref[2 * placed[k] + 1])
        o += bref[2 * placed[k] + 1]


cdef class ZoneCore:
    """One compile's names, trie, blobs and tables. Driven by image.py's ``CoreCompiler``."""

    # names: wire forms in nbuf; per-id arrays
    cdef uint8_t *nbuf
    cdef size_t nbuf_len, nbuf_cap
    cdef uint32_t *noff
    cdef uint16_t *nlen
    cdef int32_t *parent
    cdef uint8_t *nlab
    cdef uint8_t *nflags
    cdef int32_t *first_rr
    cdef int32_t *last_rr
    cdef int16_t *zone
    cdef uint32_t *stamp
    cdef uint32_t *where
    cdef uint32_t *seen
    cdef int32_t *kid_start
    cdef int32_t *rr_at              # first rr-table pair of the name's answers, -1 none yet
    cdef uint16_t *rr_n
    cdef uint32_t *enc_at            # its encoded answers: first pair in ``ents``
    cdef uint8_t *enc_n              # ... and how many (0: none; persistent, see ``apply``)
    cdef int32_t *ghead              # a group's first member (``apply``), -1: not a group
    cdef int32_t *gnext              # the next member of the name's group, -1: last
    cdef int32_t rr_owner[11]        # ``chase``: the owner of each answer RRset
    cdef int32_t n
    cdef size_t cap
    # The per-name arrays only a compile uses (nflags, first_rr, last_rr, stamp, where,
    # seen, rr_at, rr_n: 27 bytes a name) exist from ``begin`` to the end of the compile:
    # a persistent core holds its names between compiles without them (``scratch`` false).
    cdef bint scratch
    # A persistent core that has assembled an image keeps the per-compile arrays and tables
    # for the next compile (``warm``) until ``trim``: each compile would otherwise fault in
    # ~20 MB of fresh pages at 100,000 endpoints. A compile that is not warm (the first, the
    # first after a trim) is ``lean``: it frees them as soon as it is done with each.
    cdef bint warm, lean
    cdef int32_t *fillbuf            # ``grow_trie``'s and ``encode_reverse``'s work arrays,
    cdef RevKey *revkeys             # kept with the tables while warm
    cdef int32_t *ht
    cdef size_t ht_cap
    cdef uint32_t epoch
    # RRsets, by input index
    cdef list rrsets
    cdef int32_t *rr_next
    cdef uint16_t *rr_type
    # zones
    cdef int32_t *apex_id
    cdef bint *zone_rev
    cdef int nzones
    # blob store: every distinct blob once, by id, content-addressed through ``bht``; kept
    # across compiles with a reference count (encoded answers hold one each, a compile's own
    # blobs one until the next ``begin``). A compile lays out the blobs it uses in the order
    # it first uses them (``place_blob``), which is the image's pool.
    cdef uint8_t *pool
    cdef size_t pool_len, pool_cap
    cdef uint32_t *bref              # (offset in the store, length) per blob id
    cdef uint32_t *bcnt              # references
    cdef uint32_t *bplace            # offset in this compile's image pool ...
    cdef uint32_t *bepoch            # ... valid when this equals ``cepoch``
    cdef size_t nblobs, blobs_cap
    cdef int32_t *bht
    cdef size_t bht_cap
    cdef size_t live_bytes, dead_bytes
    cdef uint32_t cepoch
    # ``rebase``: the blobs the last image holds are read from its pool, not kept twice.
    cdef const uint8_t *ipool        # that image's blob pool (NULL: none)
    cdef object ipool_owner          # the read-only buffer ``ipool`` points into
    cdef uint32_t done_epoch         # ``cepoch`` of the last compile assembled whole
    cdef size_t done_total, done_blobs_off
    cdef uint32_t *placed            # blob ids in image pool order
    cdef size_t nplaced, placed_cap, placed_len
    cdef uint32_t *tmp               # blob ids this compile referenced (released by ``begin``)
    cdef size_t ntmp, tmp_cap
    # encoded answers (``apply``): (qtype, blob id) pairs
    cdef uint32_t *ents
    cdef size_t ents_len, ents_cap, ents_dead
    cdef size_t n_enc
    cdef bint persistent
    cdef uint8_t *dat
    cdef size_t dat_cap
    cdef uint8_t *scr
    cdef size_t scr_cap
    cdef uint8_t *segs
    cdef size_t segs_cap
    # labels pool
    cdef uint8_t *lpool
    cdef size_t lpool_len, lpool_cap
    cdef int32_t *lht
    cdef size_t lht_cap, nlabels
    # trie and tables
    cdef int32_t *kids
    cdef int32_t *order
    cdef int32_t nnodes
    cdef uint8_t *nodes              # the node table as the image has it, offsets relative
    cdef uint32_t *rrf
    cdef size_t rrf_len, rrf_cap
    cdef uint8_t *rev
    cdef int32_t nrev
    # Python side
    cdef object error, name_labels, packed_fallback, type_names, magic
    cdef object Srv, Target, Txt, Soa, Address  # rr.py's rdata classes (the layers keep rr out)
    cdef list apex_text                 # each zone's apex as given (for messages)
    cdef uint16_t *zone_kind
    cdef uint16_t *apex_wlen            # per zone: its apex's wire length
    # this compile's pod namespaces and zone apexes: trie nodes whose flags and ``extra``
    # are not the data's (the layout's POD_NS, POD_VERIFIED, ZONE_APEX)
    cdef dict pods                      # name id -> packed pod IPs (verified) or None
    cdef uint8_t *podl                  # the image's pod lists, in node order
    cdef size_t podl_len, podl_cap
    cdef int32_t *verified              # node indexes whose ``extra`` is podl-relative
    cdef size_t nverified, verified_cap
    cdef uint32_t *apex_node            # per zone: its apex's node index
    cdef uint32_t *neg_blob             # per zone: its negative answer's pool offset
    cdef uint32_t servfail_blob

    def __cinit__(self):
        self.ht_cap = 1 << 16
        self.ht = <int32_t *>malloc(self.ht_cap * sizeof(int32_t))
        self.bht_cap = 1 << 14
        self.bht = <int32_t *>malloc(self.bht_cap * sizeof(int32_t))
        self.lht_cap = 1 << 12
        self.lht = <int32_t *>malloc(self.lht_cap * sizeof(int32_t))
        if self.ht == NULL or self.bht == NULL or self.lht == NULL:
            raise MemoryError()
        memset(self.ht, 0xFF, self.ht_cap * sizeof(int32_t))
        memset(self.bht, 0xFF, self.bht_cap * sizeof(int32_t))
        memset(self.lht, 0xFF, self.lht_cap * sizeof(int32_t))
        self.epoch = 0

    def __init__(self, zones, *, error, name_labels, packed_fallback, type_names,
                 rdata_classes, magic, persistent=False):
        """``zones``: (apex text, apex labels as lower-case bytes, kind) per zone, in image
        order. ``rdata_classes``: rr.py's (Srv, Target, Txt, Soa, Address), whose ``write``
        the core does in C. ``magic``: the image header's (layout.py). ``error``: the
        exception bad input raises, with a message naming the offending name.
        ``persistent``: the core outlives one compile (the incremental compiler): names,
        encoded answers (``apply``) and the blob store are kept from one ``compile`` to the
        next; otherwise ``compile`` (or ``export``) frees everything and the core is spent."""
        cdef int zi
        self.persistent = bool(persistent)
        self.error = error
        self.name_labels, self.packed_fallback = name_labels, packed_fallback
        self.type_names = type_names
        self.magic = bytes(magic)
        if len(self.magic) != 8:
            raise ValueError("the image magic is 8 bytes")
        self.Srv, self.Target, self.Txt, self.Soa, self.Address = rdata_classes
        self.rrsets = []
        self.pods = {}
        zones = list(zones)
        self.nzones = len(zones)
        self.apex_text = [z[0] for z in zones]
        self.apex_id = <int32_t *>malloc((self.nzones + 1) * sizeof(int32_t))
        self.zone_rev = <bint *>malloc((self.nzones + 1) * sizeof(bint))
        self.zone_kind = <uint16_t *>malloc((self.nzones + 1) * sizeof(uint16_t))
        self.apex_node = <uint32_t *>malloc((self.nzones + 1) * sizeof(uint32_t))
        self.neg_blob = <uint32_t *>malloc((self.nzones + 1) * sizeof(uint32_t))
        self.apex_wlen = <uint16_t *>malloc((self.nzones + 1) * sizeof(uint16_t))
        if (self.apex_wlen == NULL or self.apex_id == NULL or self.zone_rev == NULL or self.zone_kind == NULL
                or self.apex_node == NULL or self.neg_blob == NULL):
            raise MemoryError()
        self.intern_labels(())            # the root is id 0
        for zi in range(self.nzones):
            self.apex_id[zi] = self.intern_labels(zones[zi][1])
            self.zone_kind[zi] = zones[zi][2]
            self.apex_wlen[zi] = self.nlen[self.apex_id[zi]]
            self.zone_rev[zi] = zones[zi][2] == ZONE_REVERSE
        for zi in range(self.nzones):
            # zone[] is filled lazily by zone_of; apexes mark themselves here.
            self.zone[self.apex_id[zi]] = zi
        self._begin()

    def __dealloc__(self):
        self.release()

    cdef void release(self) noexcept:
        free(self.nbuf); free(self.noff); free(self.nlen); free(self.parent); free(self.nlab)
        free(self.nflags); free(self.first_rr); free(self.last_rr); free(self.zone)
        free(self.stamp); free(self.where); free(self.seen); free(self.kid_start)
        free(self.ht); free(self.rr_next); free(self.rr_type); free(self.apex_id)
        free(self.zone_rev); free(self.pool); free(self.bref); free(self.bht)
        free(self.dat); free(self.scr); free(self.segs); free(self.lpool); free(self.lht)
        free(self.kids); free(self.order); free(self.nodes); free(self.rrf); free(self.rev)
        free(self.fillbuf); free(self.revkeys)
        self.fillbuf = NULL; self.revkeys = NULL
        free(self.rr_at); free(self.rr_n); free(self.enc_at); free(self.enc_n)
        free(self.bcnt); free(self.bplace); free(self.bepoch); free(self.placed); free(self.tmp)
        free(self.ents); free(self.ghead); free(self.gnext)
        free(self.zone_kind); free(self.apex_node); free(self.neg_blob); free(self.podl)
        free(self.verified); free(self.apex_wlen)
        self.apex_wlen = NULL
        self.zone_kind = NULL; self.apex_node = NULL; self.neg_blob = NULL; self.podl = NULL
        self.verified = NULL
        self.ghead = NULL; self.gnext = NULL
        self.rr_at = NULL; self.rr_n = NULL; self.enc_at = NULL; self.enc_n = NULL
        self.bcnt = NULL; self.bplace = NULL; self.bepoch = NULL; self.placed = NULL
        self.tmp = NULL; self.ents = NULL
        self.nbuf = NULL; self.noff = NULL; self.nlen = NULL; self.parent = NULL
        self.nlab = NULL; self.nflags = NULL; self.first_rr = NULL; self.last_rr = NULL
        self.zone = NULL; self.stamp = NULL; self.where = NULL; self.seen = NULL
        self.kid_start = NULL; self.ht = NULL; self.rr_next = NULL; self.rr_type = NULL
        self.apex_id = NULL; self.zone_rev = NULL; self.pool = NULL; self.bref = NULL
        self.bht = NULL; self.dat = NULL; self.scr = NULL; self.segs = NULL
        self.lpool = NULL; self.lht = NULL; self.kids = NULL; self.order = NULL
        self.nodes = NULL; self.rrf = NULL; self.rev = NULL
        self.ipool = NULL
        self.ipool_owner = None
        self.scratch = False

    cdef void release_names(self) noexcept:
        """Free what only encoding needs (names, hashes, scratch), before the image exists:
        the compile's memory peak is the image plus the blob pool, not plus these too."""
        free(self.nbuf); free(self.noff); free(self.nlen); free(self.parent); free(self.nlab)
        free(self.nflags); free(self.first_rr); free(self.last_rr); free(self.zone)
        free(self.stamp); free(self.where); free(self.seen); free(self.kid_start)
        # Kept: the store (``pool``, ``bref``) and ``placed``, which assemble copies from.
        free(self.ht); free(self.rr_next); free(self.rr_type); free(self.bht)
        free(self.dat); free(self.scr); free(self.segs); free(self.lht); free(self.kids)
        free(self.fillbuf); free(self.revkeys)
        self.fillbuf = NULL; self.revkeys = NULL
        free(self.order); free(self.rr_at); free(self.rr_n); free(self.enc_at); free(self.enc_n)
        free(self.bcnt); free(self.bplace); free(self.bepoch); free(self.tmp); free(self.ents)
        free(self.ghead); free(self.gnext)
        self.ghead = NULL; self.gnext = NULL
        self.rr_at = NULL; self.rr_n = NULL; self.enc_at = NULL; self.enc_n = NULL
        self.bcnt = NULL; self.bplace = NULL; self.bepoch = NULL; self.tmp = NULL
        self.ents = NULL; self.ntmp = self.tmp_cap = 0; self.ents_len = self.ents_cap = 0
        self.nbuf = NULL; self.noff = NULL; self.nlen = NULL; self.parent = NULL
        self.nlab = NULL; self.nflags = NULL; self.first_rr = NULL; self.last_rr = NULL
        self.zone = NULL; self.stamp = NULL; self.where = NULL; self.seen = NULL
        self.kid_start = NULL; self.ht = NULL; self.rr_next = NULL; self.rr_type = NULL
        self.bht = NULL; self.dat = NULL; self.scr = NULL; self.segs = NULL
        self.lht = NULL; self.kids = NULL; self.order = NULL
        self.n = 0
        self.cap = self.nbuf_cap = self.nbuf_len = self.ht_cap = 0
        self.bht_cap = self.dat_cap = self.scr_cap = self.segs_cap = 0
        self.lht_cap = 0
        self.scratch = False
        self.rrsets = []

    cdef void release_compile(self) noexcept:
        """A persistent core after a lean compile, or ``trim``: free the per-compile
        tables (the name arrays, the trie, the node, rr and reverse tables, the label pool,
        their work arrays); ``begin`` starts from empty ones."""
        free(self.kids); free(self.order); free(self.kid_start); free(self.nodes)
        free(self.rrf); free(self.rev); free(self.lpool); free(self.rr_next); free(self.rr_type)
        free(self.fillbuf); free(self.revkeys)
        self.fillbuf = NULL; self.revkeys = NULL
        self.kids = NULL; self.order = NULL; self.kid_start = NULL; self.nodes = NULL
        self.rrf = NULL; self.rev = NULL; self.lpool = NULL; self.rr_next = NULL
        self.rr_type = NULL
        free(self.podl); free(self.verified)
        self.podl = NULL; self.verified = NULL
        self.free_scratch()
        self.rrf_cap = self.lpool_cap = self.podl_cap = self.verified_cap = 0
        self.rrf_len = self.lpool_len = self.podl_len = self.nverified = 0
        self.rrsets = []
        self.pods = {}

    def trim(self):
        """Free what a warm core keeps between compiles (the changes stopped): the next
        compile allocates it again, lean."""
        self.check()
        self.release_compile()
        self.warm = False

    cdef int check(self) except -1:
        # A core that is spent (a compile freed its tables) must raise, never touch freed
        # memory.
        if self.ht == NULL:
            raise ValueError("ZoneCore used after its compile (only a persistent core is "
                             "used again)")
        return 0

    # ------------------------------------------------------------------ names

    cdef int grow_names(self) except -1:
        cdef size_t c = self.cap, i
        if <size_t>self.n < c:
            return 0
        c = c * 2 if c else 1024
        self.noff = <uint32_t *>self._re(self.noff, c * 4)
        self.nlen = <uint16_t *>self._re(self.nlen, c * 2)
        self.parent = <int32_t *>self._re(self.parent, c * 4)
        self.nlab = <uint8_t *>self._re(self.nlab, c)
        self.zone = <int16_t *>self._re(self.zone, c * 2)
        self.enc_at = <uint32_t *>self._re(self.enc_at, c * 4)
        self.enc_n = <uint8_t *>self._re(self.enc_n, c)
        self.ghead = <int32_t *>self._re(self.ghead, c * 4)
        self.gnext = <int32_t *>self._re(self.gnext, c * 4)
        if self.scratch:
            self.grow_scratch(c)
        self.cap = c
        return 0

    cdef int grow_scratch(self, size_t c) except -1:
        self.nflags = <uint8_t *>self._re(self.nflags, c)
        self.first_rr = <int32_t *>self._re(self.first_rr, c * 4)
        self.last_rr = <int32_t *>self._re(self.last_rr, c * 4)
        self.stamp = <uint32_t *>self._re(self.stamp, c * 4)
        self.where = <uint32_t *>self._re(self.where, c * 4)
        self.seen = <uint32_t *>self._re(self.seen, c * 4)
        self.rr_at = <int32_t *>self._re(self.rr_at, c * 4)
        self.rr_n = <uint16_t *>self._re(self.rr_n, c * 2)
        return 0

    cdef int alloc_scratch(self) except -1:
        """The per-compile name arrays, for every name there is (``begin``): the stamps
        start at 0, which no epoch of a compile equals."""
        cdef size_t c = self.cap if self.cap else 1
        if self.scratch:
            return 0
        self.grow_scratch(c)
        self.scratch = True
        memset(self.stamp, 0, c * 4)
        memset(self.where, 0, c * 4)
        memset(self.seen, 0, c * 4)
        return 0

    cdef void free_scratch(self) noexcept:
        free(self.nflags); free(self.first_rr); free(self.last_rr); free(self.stamp)
        free(self.where); free(self.seen); free(self.rr_at); free(self.rr_n)
        self.nflags = NULL; self.first_rr = NULL; self.last_rr = NULL; self.stamp = NULL
        self.where = NULL; self.seen = NULL; self.rr_at = NULL; self.rr_n = NULL
        self.scratch = False

    cdef void *_re(self, void *p, size_t size) except NULL:
        cdef void *q = realloc(p, size)
        if q == NULL:
            raise MemoryError()
        return q

    cdef int rehash(self) except -1:
        cdef size_t ncap = self.ht_cap * 2, mask = ncap - 1, j
        cdef int32_t i
        cdef int32_t *t = <int32_t *>malloc(ncap * sizeof(int32_t))
        if t == NULL:
            raise MemoryError()
        memset(t, 0xFF, ncap * sizeof(int32_t))
        for i in range(self.n):
            j = fnv1a(self.nbuf + self.noff[i], self.nlen[i]) & mask
            while t[j] >= 0:
                j = (j + 1) & mask
            t[j] = i
        free(self.ht)
        self.ht = t
        self.ht_cap = ncap
        return 0

    cdef int32_t find(self, const uint8_t *w, Py_ssize_t wl) noexcept:
        cdef size_t mask = self.ht_cap - 1
        cdef size_t j = fnv1a(w, wl) & mask
        cdef int32_t i
        while True:
            i = self.ht[j]
            if i < 0:
                return -1
            if self.nlen[i] == wl and memcmp(self.nbuf + self.noff[i], w, wl) == 0:
                return i
            j = (j + 1) & mask

    cdef int32_t intern_wire(self, const uint8_t *w, Py_ssize_t wl) except -2:
        """Id of the lower-cased wire name ``w`` (which must not point into nbuf), adding it
        and every missing ancestor."""
        cdef int32_t i = self.find(w, wl), par
        cdef size_t mask, j
        if i >= 0:
            return i
        par = -1
        if w[0] != 0:
            par = self.intern_wire(w + 1 + w[0], wl - 1 - w[0])
        if (<size_t>self.n + 1) * 2 > self.ht_cap:
            self.rehash()
        self.grow_names()
        _grow(<void **>&self.nbuf, &self.nbuf_cap, self.nbuf_len + wl, 1)
        i = self.n
        self.n += 1
        memcpy(self.nbuf + self.nbuf_len, w, wl)
        self.noff[i] = self.nbuf_len
        self.nbuf_len += wl
        self.nlen[i] = wl
        self.parent[i] = par
        self.nlab[i] = 0 if par < 0 else self.nlab[par] + 1
        if self.scratch:
            self.nflags[i] = 0
            self.first_rr[i] = -1
            self.last_rr[i] = -1
            self.stamp[i] = 0
            self.where[i] = 0
            self.seen[i] = 0
            self.rr_at[i] = -1
            self.rr_n[i] = 0
        self.zone[i] = -2                 # not looked up yet
        self.enc_at[i] = 0
        self.enc_n[i] = 0
        self.ghead[i] = -1
        self.gnext[i] = -1
        mask = self.ht_cap - 1
        j = fnv1a(w, wl) & mask
        while self.ht[j] >= 0:
            j = (j + 1) & mask
        self.ht[j] = i
        return i

    cdef Py_ssize_t labels_wire(self, labels, uint8_t *w) except -1:
        """Wire form of a labels tuple into ``w`` (256 bytes); -1 without an exception when
        the tuple is not a valid name (it then names nothing in this image)."""
        cdef Py_ssize_t pos = 0, ln
        cdef bytes b
        for label in labels:
            b = label
            ln = len(b)
            if ln == 0 or ln > 63 or pos + ln + 2 > 255:
                return -1
            w[pos] = ln
            memcpy(w + pos + 1, <const char *>b, ln)
            pos += ln + 1
        w[pos] = 0
        return pos + 1

    cdef int32_t intern_labels(self, labels) except -2:
        cdef uint8_t w[256]
        cdef Py_ssize_t wl = self.labels_wire(labels, w)
        if wl < 0:
            raise self.error(f"not a name: {labels!r}")
        return self.intern_wire(w, wl)

    cdef int32_t intern_name(self, name) except -2:
        """``rr.name_labels`` for text names, straight to an id: well-formed ASCII names are
        parsed here, anything else by ``name_labels`` itself (which raises on bad names)."""
        cdef Py_ssize_t n, i, start, pos, ln
        cdef const char *s = PyUnicode_AsUTF8AndSize(name, &n)
        cdef uint8_t w[256]
        cdef uint8_t c
        if n > 0 and s[n - 1] == 46:      # one trailing dot: absolute form
            n -= 1
        if n == 0 or n + 2 > 255:
            return self.intern_labels(self.name_labels(name))
        start = 0
        pos = 0
        for i in range(n + 1):
            if i == n or s[i] == 46:
                ln = i - start
                if ln == 0 or ln > 63:
                    return self.intern_labels(self.name_labels(name))
                w[pos] = ln
                pos += ln + 1
                start = i + 1
            else:
                c = <uint8_t>s[i]
                if c >= 0x80 or c == 0:
                    return self.intern_labels(self.name_labels(name))
                w[pos + 1 + i - start] = ascii_lower(c)
        w[pos] = 0
        return self.intern_wire(w, pos + 1)

    cdef object labels_of(self, int32_t i):
        out = []
        cdef const uint8_t *p
        while i >= 0 and self.nlab[i] > 0:
            p = self.nbuf + self.noff[i]
            out.append(PyBytes_FromStringAndSize(<const char *>p + 1, p[0]))
            i = self.parent[i]
        return tuple(out)

    cdef object text_of(self, int32_t i):
        return ".".join([l.decode("ascii", "replace") for l in self.labels_of(i)]) + "."

    cdef int zone_of(self, int32_t i) noexcept:
        """The deepest zone whose apex is ``i`` or an ancestor of it; -1 if none (cached
        along the way: -2 means not looked up yet, and apexes know their zone)."""
        cdef int32_t j = i
        cdef int z = -1
        while j >= 0:
            if self.zone[j] != -2:
                z = self.zone[j]
                break
            j = self.parent[j]
        j = i
        while j >= 0 and self.zone[j] == -2:
            self.zone[j] = z
            j = self.parent[j]
        return z

    cdef int place(self, int32_t i, what) except -1:
        cdef int zi = self.zone_of(i)
        if zi < 0:
            raise self.error(f"{self.text_of(i) if what is None else what} is outside every "
                             "served zone")
        if self.zone_rev[zi] and self.nlab[i] != self.nlab[self.apex_id[zi]]:
            self.nflags[i] |= NF_REV
        else:
            self.nflags[i] |= NF_FWD
        return 0

    # ------------------------------------------------------------------ input

    cdef int _add(self, rrsets, exists) except -1:
        """oracle.py ``ReferenceCompiler.add``: file every RRset under its name, in input order."""
        cdef Py_ssize_t k, nr
        cdef int32_t i, r
        cdef int rtype
        cdef list cnames = []
        self.rrsets = list(rrsets)
        nr = len(self.rrsets)
        self.rr_next = <int32_t *>self._re(self.rr_next, (nr + 1) * 4)
        self.rr_type = <uint16_t *>self._re(self.rr_type, (nr + 1) * 2)
        for k in range(nr):
            s = self.rrsets[k]
            name = s.name
            rtype = s.rtype
            if not 0 <= rtype <= 0xFFFF:
                raise self.error(f"type {rtype}")
            i = self.intern_name(name)
            self.rr_next[k] = -1
            self.rr_type[k] = rtype
            if self.nflags[i] & NF_ENC:
                raise self.error(f"{name} has encoded answers and RRsets")
            if not self.nflags[i] & NF_DATA:
                self.place(i, name)
                self.nflags[i] |= NF_DATA
                self.first_rr[i] = k
            else:
                r = self.first_rr[i]
                while r >= 0:
                    if self.rr_type[r] == rtype:
                        raise self.error(
                            f"duplicate RRset {name} {self.type_names.get(rtype, rtype)}")
                    r = self.rr_next[r]
                self.rr_next[self.last_rr[i]] = k
            self.last_rr[i] = k
            if rtype == T_CNAME:
                self.nflags[i] |= NF_CNAME
                cnames.append(i)
        for name in exists:
            i = self.intern_name(name)
            if not self.nflags[i] & (NF_DATA | NF_EXPLICIT):
                self.place(i, name)
            self.nflags[i] |= NF_EXPLICIT
        for i in cnames:
            if self.first_rr[i] != self.last_rr[i]:
                # RFC 2181 §10.1: a CNAME owner has no other data.
                raise self.error(f"{self.text_of(i)} has a CNAME and other data")
        return 0

    cdef int _begin(self) except -1:
        """Start a compile: forget the last one's RRsets, trie, tables and pool layout, and
        release the blobs only it used; keep the names, the encoded answers (``apply``) and
        the blob store."""
        cdef size_t k, nn
        cdef int32_t i
        self.check()
        self.alloc_scratch()
        for k in range(self.ntmp):
            self.decref(self.tmp[k])
        self.ntmp = 0
        self.cepoch += 1
        self.nplaced = 0
        self.placed_len = 0
        self.rrsets = []
        self.pods = {}
        self.podl_len = 0
        self.nverified = 0
        self.rrf_len = 0
        self.nrev = 0
        self.nnodes = 0
        self.lpool_len = 0
        self.nlabels = 0
        memset(self.lht, 0xFF, self.lht_cap * sizeof(int32_t))
        nn = self.n
        if nn:
            memset(self.nflags, 0, nn)
            memset(self.first_rr, 0xFF, nn * 4)
            memset(self.last_rr, 0xFF, nn * 4)
            memset(self.rr_at, 0xFF, nn * 4)
            memset(self.rr_n, 0, nn * 2)
        for i in range(self.n):
            if self.enc_n[i]:
                self.nflags[i] = NF_DATA | NF_ENC
                self.place(i, None)
        return 0

    cdef Py_ssize_t record(self, const uint8_t *b, Py_ssize_t total, Py_ssize_t p) except -1:
        """Check the ``export`` record at ``p``: [u8 wire length][wire name][u8 n]
        [n x (u16le qtype, u32le blob length)][blobs, each padded to 4]; its end."""
        cdef Py_ssize_t q, wl, k, nent, body
        cdef uint32_t blen
        wl = b[p]
        if wl < 1 or p + 1 + wl + 1 > total:
            raise ValueError("encoded record: truncated name")
        q = p + 1
        while b[q] != 0:           # labels within the wire length, root label last
            if b[q] > 63 or q + 1 + b[q] >= p + 1 + wl:
                raise ValueError("encoded record: bad name")
            q += 1 + b[q]
        if q != p + wl:
            raise ValueError("encoded record: bad name length")
        nent = b[p + 1 + wl]
        body = p + 2 + wl + 6 * nent
        if nent == 0 or body > total:
            raise ValueError("encoded record: truncated entries")
        for k in range(nent):
            blen = le32(b + p + 2 + wl + 6 * k + 2)
            if blen < 16 or blen % 4 or body + blen > total:
                raise ValueError("encoded record: bad blob length")
            body += blen
        return body

    def apply(self, remove, add):
        """Replace encoded answers between compiles (persistent cores), by group: a group is
        a name (a service's, a reverse name) and the encoded names at or under it given
        with it. ``remove``: group names whose names lose their answers; ``add``: (group
        name, ``export`` records) pairs, every record at or under its group. A group added
        must not be there already, nor a name in it have answers. A name given answers here
        must not also get RRsets in a compile (``add`` refuses). An error leaves the core
        half-changed: the caller then discards it."""
        cdef Py_ssize_t total, p, end, wl, k, nent, body
        cdef const uint8_t *b
        cdef int32_t i, g, j, nxt
        cdef uint32_t blen, bid, e
        cdef bytes recs
        self.check()
        for name in remove:
            g = self.intern_name(name)
            if self.ghead[g] < 0:
                raise self.error(f"encoded group {name} to remove is not there")
            j = self.ghead[g]
            while j >= 0:
                for e in range(self.enc_n[j]):
                    self.decref(self.ents[2 * (self.enc_at[j] + e) + 1])
                self.ents_dead += self.enc_n[j]
                self.enc_n[j] = 0
                self.n_enc -= 1
                nxt = self.gnext[j]
                self.gnext[j] = -1
                j = nxt
            self.ghead[g] = -1
        for name, recs in add:
            g = self.intern_name(name)
            if self.ghead[g] >= 0:
                raise self.error(f"encoded group {name} given twice")
            total = len(recs)
            b = <const uint8_t *>PyBytes_AS_STRING(recs)
            p = 0
            while p < total:
                end = self.record(b, total, p)
                wl = b[p]
                nent = b[p + 1 + wl]
                i = self.intern_wire(b + p + 1, wl)
                if self.enc_n[i]:
                    raise self.error(f"{self.text_of(i)} given encoded answers twice")
                j = i
                while j >= 0 and j != g:
                    j = self.parent[j]
                if j != g:
                    raise self.error(f"{self.text_of(i)} is not in its group {name}")
                if self.zone_of(i) < 0:
                    raise self.error(f"{self.text_of(i)} is outside every served zone")
                _grow(<void **>&self.ents, &self.ents_cap, 2 * (self.ents_len + nent), 4)
                self.enc_at[i] = self.ents_len
                body = p + 2 + wl + 6 * nent
                for k in range(nent):
                    blen = le32(b + p + 2 + wl + 6 * k + 2)
                    _grow(<void **>&self.scr, &self.scr_cap, blen + 4, 1)
                    memcpy(self.scr, b + body, blen)
                    bid = self.store_blob(blen)
                    self.incref(bid)
                    self.ents[2 * self.ents_len] = le16(b + p + 2 + wl + 6 * k)
                    self.ents[2 * self.ents_len + 1] = bid
                    self.ents_len += 1
                    body += blen
                self.enc_n[i] = nent
                self.n_enc += 1
                self.gnext[i] = self.ghead[g]
                self.ghead[g] = i
                p = end
        if self.ents_dead > 4096 and self.ents_dead * 2 > self.ents_len:
            self.compact_ents()

    def dump(self):
        """Every group as ``apply`` takes it: [(group name, records)]. A fresh core loaded
        with these holds the same answers without the garbage (names and blobs no longer
        used) this one accumulated."""
        cdef int32_t g, j
        cdef size_t sz, pos
        cdef uint8_t *o
        cdef uint32_t e, bid
        cdef const uint32_t *en
        out = []
        self.check()
        for g in range(self.n):
            if self.ghead[g] < 0:
                continue
            sz = 0
            j = self.ghead[g]
            while j >= 0:
                sz += 2 + self.nlen[j] + 6 * self.enc_n[j]
                for e in range(self.enc_n[j]):
                    sz += self.bref[2 * self.ents[2 * (self.enc_at[j] + e) + 1] + 1]
                j = self.gnext[j]
            recs = PyBytes_FromStringAndSize(NULL, sz)
            o = <uint8_t *>PyBytes_AS_STRING(recs)
            pos = 0
            j = self.ghead[g]
            while j >= 0:
                o[pos] = self.nlen[j]
                memcpy(o + pos + 1, self.nbuf + self.noff[j], self.nlen[j])
                o[pos + 1 + self.nlen[j]] = self.enc_n[j]
                en = self.ents + 2 * self.enc_at[j]
                pos += 2 + self.nlen[j]
                for e in range(self.enc_n[j]):
                    put16le(o + pos + 6 * e, en[2 * e])
                    put32le(o + pos + 6 * e + 2, self.bref[2 * en[2 * e + 1] + 1])
                pos += 6 * self.enc_n[j]
                for e in range(self.enc_n[j]):
                    bid = en[2 * e + 1]
                    memcpy(o + pos, self.blob(bid), self.bref[2 * bid + 1])
                    pos += self.bref[2 * bid + 1]
                j = self.gnext[j]
            out.append((self.text_of(g), recs))
        return out

    cdef int compact_ents(self) except -1:
        cdef uint32_t *fresh = <uint32_t *>malloc((2 * (self.ents_len - self.ents_dead) + 2) * 4)
        cdef size_t m = 0
        cdef int32_t i
        if fresh == NULL:
            raise MemoryError()
        for i in range(self.n):
            if self.enc_n[i]:
                memcpy(fresh + 2 * m, self.ents + 2 * self.enc_at[i], 8 * self.enc_n[i])
                self.enc_at[i] = m
                m += self.enc_n[i]
        free(self.ents)
        self.ents = fresh
        self.ents_len = self.ents_cap = m
        self.ents_dead = 0
        return 0

    def stats(self):
        """Sizes for the caller's decision to start over with a fresh core (garbage)."""
        return {"names": self.n, "encoded_names": self.n_enc, "blobs": self.nblobs,
                "live_bytes": self.live_bytes, "dead_bytes": self.dead_bytes,
                "entries": self.ents_len, "dead_entries": self.ents_dead,
                "store_bytes": self.pool_len, "in_image": self.ipool != NULL,
                "table_bytes": sum(self.tables().values())}

    def tables(self):
        """Bytes each of the core's C arrays holds allocated (capacities, not lengths): its
        share of the supervisor's memory (docs/sizing.md)."""
        return {"names": self.cap * 26, "scratch": self.cap * 27 if self.scratch else 0,
                "name_text": self.nbuf_cap, "name_hash": 4 * self.ht_cap,
                "blob_hash": 4 * self.bht_cap, "blob_refs": 20 * self.blobs_cap,
                "store": self.pool_cap, "entries": 4 * self.ents_cap,
                "placed": 4 * self.placed_cap, "compile_blobs": 4 * self.tmp_cap,
                "labels": 4 * self.lht_cap + self.lpool_cap,
                "scratch_bufs": self.scr_cap + self.dat_cap + self.segs_cap,
                "trie": 4 * (self.cap + 1) * (self.kids != NULL) + 4 * self.nnodes * (
                    (self.kids != NULL) + (self.order != NULL)),
                "tables": self.rrf_cap * 4 + (NODE_SIZE * self.nnodes if self.nodes != NULL else 0)
                          + (REV_SIZE * self.nrev if self.rev != NULL else 0)}

    def export(self, rrsets, groups):
        """Encode ``rrsets`` (no zone apex data) and return their answers as ``apply``
        records, one bytes per group: each name with data goes to the group of its nearest
        ancestor-or-self among ``groups`` (text names; a service's name, a reverse name).
        The blobs are the ones a full compile makes for the same names. A name in no group,
        or one whose answers follow a CNAME (they depend on other names), raises. A core
        that is not persistent is spent afterwards."""
        self.check()
        self._begin()
        self._add(rrsets, ())
        self._grow_trie()
        self._encode_nodes()
        self._encode_reverse()
        try:
            return self._export(groups)
        finally:
            if not self.persistent:
                self.release()

    cdef object _export(self, groups):
        cdef Py_ssize_t ng = len(groups), g, k, sz
        cdef int32_t i, j, e
        cdef int32_t *gof
        cdef size_t *size
        cdef size_t *pos
        cdef uint8_t *o
        cdef const uint8_t *blob
        cdef uint32_t bid, blen
        ids = [self.intern_name(name) for name in groups]
        gof = <int32_t *>malloc((self.n + 1) * sizeof(int32_t))
        size = <size_t *>calloc(ng + 1, sizeof(size_t))
        pos = <size_t *>calloc(ng + 1, sizeof(size_t))
        if gof == NULL or size == NULL or pos == NULL:
            free(gof); free(size); free(pos)
            raise MemoryError()
        try:
            memset(gof, 0xFF, (self.n + 1) * sizeof(int32_t))
            for g in range(ng):
                gof[<int32_t>ids[g]] = g
            for i in range(self.n):       # pass 1: each name's group and record size
                if not self.nflags[i] & NF_DATA:
                    continue
                if self.nflags[i] & (NF_CNAME | NF_ENC) or self.rr_at[i] < 0:
                    raise self.error(f"{self.text_of(i)} cannot be exported")
                j = i
                while j >= 0 and gof[j] < 0:
                    j = self.parent[j]
                if j < 0:
                    raise self.error(f"{self.text_of(i)} is in no export group")
                gof[i] = gof[j]
                sz = 2 + self.nlen[i] + 6 * self.rr_n[i]
                for e in range(self.rr_n[i]):
                    sz += self.bref[2 * self.bid_at(self.rrf[2 * (self.rr_at[i] + e) + 1]) + 1]
                size[gof[i]] += sz
            out = [PyBytes_FromStringAndSize(NULL, size[g]) for g in range(ng)]
            for i in range(self.n):       # pass 2: write the records
                if not self.nflags[i] & NF_DATA:
                    continue
                g = gof[i]
                o = <uint8_t *>PyBytes_AS_STRING(out[g]) + pos[g]
                o[0] = self.nlen[i]
                memcpy(o + 1, self.nbuf + self.noff[i], self.nlen[i])
                o[1 + self.nlen[i]] = self.rr_n[i]
                k = 2 + self.nlen[i]
                sz = k + 6 * self.rr_n[i]
                for e in range(self.rr_n[i]):
                    bid = self.bid_at(self.rrf[2 * (self.rr_at[i] + e) + 1])
                    blen = self.bref[2 * bid + 1]
                    put16le(o + k, self.rrf[2 * (self.rr_at[i] + e)])
                    put32le(o + k + 2, blen)
                    memcpy(o + sz, self.blob(bid), blen)
                    k += 6
                    sz += blen
                pos[g] += sz
            for g in range(ng):
                if pos[g] != size[g]:
                    raise AssertionError("export: sizes disagree")
            return out
        finally:
            free(gof); free(size); free(pos)

    cdef uint32_t bid_at(self, uint32_t off) except? 0xFFFFFFFF:
        """The id of the blob at ``off`` in this compile's pool (placement is in order)."""
        cdef size_t lo = 0, hi = self.nplaced, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.bplace[self.placed[mid]] < off:
                lo = mid + 1
            else:
                hi = mid
        if lo >= self.nplaced or self.bplace[self.placed[lo]] != off:
            raise ValueError("no blob at that pool offset")
        return self.placed[lo]

    cdef int32_t mark(self, labels) except -2:
        """A zone apex or pod namespace: a node of the trie whose flags the core decides."""
        cdef int32_t i = self.intern_labels(labels)
        self.nflags[i] |= NF_FWD | NF_SPECIAL
        return i

    # ------------------------------------------------------------------ lookups

    cdef int32_t lookup(self, labels) except -2:
        cdef uint8_t w[256]
        cdef Py_ssize_t wl = self.labels_wire(labels, w)
        return -1 if wl < 0 else self.find(w, wl)

    # ------------------------------------------------------------------ blobs

    cdef uint32_t store_blob(self, size_t n) except? 0xFFFFFFFF:
        """Id of the blob in ``scr[0:n]`` (padded to 4 here) in the store, adding it
        (unreferenced) if new."""
        cdef size_t mask, j, k
        cdef int32_t b
        _grow(<void **>&self.scr, &self.scr_cap, n + 4, 1)
        while n % 4:
            self.scr[n] = 0
            n += 1
        if (self.nblobs + 1) * 2 > self.bht_cap:
            self.rehash_blobs()
        mask = self.bht_cap - 1
        j = fnv1a(self.scr, n) & mask
        while True:
            b = self.bht[j]
            if b < 0:
                break
            if self.bref[2 * b + 1] == n and memcmp(self.blob(b), self.scr, n) == 0:
                return b
            j = (j + 1) & mask
        if self.pool_len + n >= IN_IMAGE:
            raise self.error("blob store over 2 GiB")
        _grow(<void **>&self.pool, &self.pool_cap, self.pool_len + n, 1)
        if self.nblobs + 1 > self.blobs_cap:
            _grow(<void **>&self.bref, &self.blobs_cap, self.nblobs + 1, 8)
            self.bcnt = <uint32_t *>self._re(self.bcnt, self.blobs_cap * 4)
            self.bplace = <uint32_t *>self._re(self.bplace, self.blobs_cap * 4)
            self.bepoch = <uint32_t *>self._re(self.bepoch, self.blobs_cap * 4)
        k = self.nblobs
        self.nblobs += 1
        self.bref[2 * k] = self.pool_len
        self.bref[2 * k + 1] = n
        self.bcnt[k] = 0
        self.bepoch[k] = 0
        self.dead_bytes += n
        memcpy(self.pool + self.pool_len, self.scr, n)
        self.pool_len += n
        self.bht[j] = k
        return k

    cdef inline void incref(self, uint32_t bid) noexcept:
        if self.bcnt[bid] == 0:
            self.dead_bytes -= self.bref[2 * bid + 1]
            self.live_bytes += self.bref[2 * bid + 1]
        self.bcnt[bid] += 1

    cdef inline void decref(self, uint32_t bid) noexcept:
        self.bcnt[bid] -= 1
        if self.bcnt[bid] == 0:
            self.live_bytes -= self.bref[2 * bid + 1]
            self.dead_bytes += self.bref[2 * bid + 1]

    cdef uint32_t place_blob(self, uint32_t bid) except? 0xFFFFFFFF:
        """The blob's offset in this compile's image pool, laid out on first use."""
        cdef uint32_t n
        if self.bepoch[bid] == self.cepoch:
            return self.bplace[bid]
        n = self.bref[2 * bid + 1]
        if self.placed_len + n > 0xFFFFFFFF:
            raise self.error("blob pool over 4 GiB")
        _grow(<void **>&self.placed, &self.placed_cap, self.nplaced + 1, 4)
        self.placed[self.nplaced] = bid
        self.nplaced += 1
        self.bepoch[bid] = self.cepoch
        self.bplace[bid] = self.placed_len
        self.placed_len += n
        return self.bplace[bid]

    cdef uint32_t intern_scr(self, size_t n) except? 0xFFFFFFFF:
        """Intern the blob in ``scr[0:n]`` for this compile; its image pool offset."""
        cdef uint32_t bid = self.store_blob(n)
        self.incref(bid)
        _grow(<void **>&self.tmp, &self.tmp_cap, self.ntmp + 1, 4)
        self.tmp[self.ntmp] = bid
        self.ntmp += 1
        return self.place_blob(bid)

    cdef inline const uint8_t *blob(self, uint32_t bid) noexcept:
        return blob_at(self.pool, self.ipool, self.bref, bid)

    cdef int rehash_blobs(self) except -1:
        """A blob hash twice the size, of every blob not dropped."""
        cdef size_t ncap = self.bht_cap * 2, mask = ncap - 1, j, k
        cdef int32_t *t = <int32_t *>malloc(ncap * sizeof(int32_t))
        if t == NULL:
            raise MemoryError()
        memset(t, 0xFF, ncap * sizeof(int32_t))
        for k in range(self.nblobs):
            if self.bref[2 * k + 1] == 0:          # dropped by ``rebase``
                continue
            j = fnv1a(self.blob(k), self.bref[2 * k + 1]) & mask
            while t[j] >= 0:
                j = (j + 1) & mask
            t[j] = k
        free(self.bht)
        self.bht = t
        self.bht_cap = ncap
        return 0

    cdef uint32_t finish_blob(self, uint32_t an, uint32_t ar, size_t nseg, size_t dlen,
                              uint32_t hdr=HDR_AA, uint32_t ns=0, size_t nfix=0,
                              const uint16_t *fix=NULL) except? 0xFFFFFFFF:
        """BLOBHDR + the fixups + the segments in ``segs`` + the data in ``dat`` ->
        interned offset."""
        cdef size_t fixb = (2 * nfix + 3) // 4 * 4, k, n
        cdef uint32_t rot_at = 0, rot_n = 0
        if nfix == 0 and an >= 2:
            self.rotation_of(dlen, an, &rot_at, &rot_n)
        if dlen > CUT_EVERY_RR_OVER or rot_n:
            nseg = self.cut_every_rr(dlen, an, ns, ar)
        n = BLOBHDR_SIZE + fixb + SEG_SIZE * nseg + dlen
        _grow(<void **>&self.scr, &self.scr_cap, n + 4, 1)
        put16le(self.scr + BLOB_HDR, hdr)
        put16le(self.scr + BLOB_AN, an)
        put16le(self.scr + BLOB_NS, ns)
        put16le(self.scr + BLOB_AR, ar)
        put16le(self.scr + BLOB_NFIX, nfix)
        put16le(self.scr + BLOB_NSEG, nseg)
        put32le(self.scr + BLOB_LEN, dlen)
        put16le(self.scr + BLOB_ROT_AT, rot_at)
        put16le(self.scr + BLOB_ROT_N, rot_n)
        memset(self.scr + BLOBHDR_SIZE, 0, fixb)
        for k in range(nfix):
            put16le(self.scr + BLOBHDR_SIZE + 2 * k, fix[k])
        memcpy(self.scr + BLOBHDR_SIZE + fixb, self.segs, SEG_SIZE * nseg)
        if dlen:
            # A blob without data (a hosts zone's NODATA, the first blob of a compile) may
            # meet ``dat`` not allocated yet: memcpy's source must not be NULL even for 0.
            memcpy(self.scr + BLOBHDR_SIZE + fixb + SEG_SIZE * nseg, self.dat, dlen)
        return self.intern_scr(n)

    cdef size_t skip_owner(self, size_t pos, size_t dlen) except? 0:
        """encode.py ``_skip_owner``: the end of the name at ``pos`` in ``dat``."""
        cdef uint8_t c
        while True:
            if pos >= dlen:
                raise AssertionError("blob data ends inside a record")
            c = self.dat[pos]
            if c >= 0xC0:
                return pos + 2
            pos += 1 + c
            if c == 0:
                return pos

    cdef int rotation_of(self, size_t dlen, uint32_t an, uint32_t *rot_at,
                         uint32_t *rot_n) except -1:
        """encode.py ``rotation_of`` over ``dat``: the run of answer records closing the
        answer section, of one rotating type (A, AAAA, SRV) with the same owner bytes, when
        it holds two or more (layout.py, Rotation)."""
        cdef size_t pos = 0, start, oend, last_start = 0, last_len = 0, run_start = 0
        cdef uint32_t k, run = 0, rtype = 0, last_type = 0
        for k in range(an):
            start = pos
            oend = self.skip_owner(pos, dlen)
            if oend + 10 > dlen:
                raise AssertionError("blob data ends inside a record")
            rtype = (<uint32_t>self.dat[oend] << 8) | self.dat[oend + 1]
            if (run and rtype == last_type and oend - start == last_len
                    and memcmp(self.dat + start, self.dat + last_start, last_len) == 0):
                run += 1
            else:
                run = 1
                run_start = k
            last_start, last_len, last_type = start, oend - start, rtype
            pos = oend + 10 + ((<size_t>self.dat[oend + 8] << 8) | self.dat[oend + 9])
        if run >= 2 and (rtype == T_A or rtype == T_AAAA or rtype == T_SRV):
            rot_at[0] = <uint32_t>run_start
            rot_n[0] = run
        return 0

    cdef size_t cut_every_rr(self, size_t dlen, uint32_t an, uint32_t ns,
                             uint32_t ar) except? 0:
        """encode.py ``cut_at_every_rr``: ``segs`` anew, a segment after every record of
        ``dat`` (owner labels ending in the root or a pointer, RFC 1035 §4.1.4, then type,
        class, TTL, rdlength and rdata, §4.1.3); their number."""
        cdef size_t total = an + ns + ar, essential = an + ns, k, pos = 0
        cdef uint32_t n_an, n_ns, n_ar
        cdef uint8_t c
        if total + 1 > 0xFFFF:
            raise self.error(f"{total} records in one answer: at most 65534")
        self.seg(0, 0, 0, 0, 1 if essential else 0)
        for k in range(1, total + 1):
            while True:
                if pos >= dlen:
                    raise AssertionError("blob data ends inside a record")
                c = self.dat[pos]
                if c >= 0xC0:
                    pos += 2
                    break
                pos += 1 + c
                if c == 0:
                    break
            if pos + 10 > dlen:
                raise AssertionError("blob data ends inside a record")
            pos += 10 + ((<size_t>self.dat[pos + 8] << 8) | self.dat[pos + 9])
            n_an = k if k < an else an
            n_ns = 0 if k < an else (k - an if k - an < ns else ns)
            n_ar = 0 if k < essential else k - essential
            self.seg(k, pos, n_an, n_ar, 1 if n_an + n_ns < essential else 0, n_ns)
        if pos != dlen:
            raise AssertionError("blob data does not end at its last record")
        return total + 1

    cdef int put_under_apex(self, int32_t m, int32_t apex, uint16_t *fix, size_t *nfix,
                            size_t *size) except -1:
        """encode.py ``negative_blob``'s names: the labels above the apex, then a fixup
        for the pointer to the apex inside the question; a name outside it whole."""
        cdef int32_t j = m
        cdef uint8_t ln
        while j >= 0 and j != apex:
            j = self.parent[j]
        _grow(<void **>&self.dat, &self.dat_cap, size[0] + self.nlen[m] + 2, 1)
        if j < 0:
            memcpy(self.dat + size[0], self.nbuf + self.noff[m], self.nlen[m])
            size[0] += self.nlen[m]
            return 0
        j = m
        while j != apex:
            ln = self.nbuf[self.noff[j]]
            memcpy(self.dat + size[0], self.nbuf + self.noff[j], ln + 1)
            size[0] += ln + 1
            j = self.parent[j]
        fix[nfix[0]] = size[0]
        nfix[0] += 1
        put16be(self.dat + size[0], 0xC000)
        size[0] += 2
        return 0

    cdef uint32_t negative_blob(self, int zi) except? 0xFFFFFFFF:
        """encode.py ``negative_blob``: the zone's SOA for the authority section, shared by
        every name of the zone, its owner and the apex in its names written as fixups."""
        cdef int32_t apex = self.apex_id[zi], soa
        cdef uint16_t fix[3]
        cdef size_t nfix = 1, size = 0
        if self.zone_kind[zi] != ZONE_AUTH and self.zone_kind[zi] != ZONE_REVERSE:
            # A hosts zone has no SOA: its NODATA carries no records (encode.py).
            self.seg(0, 0, 0, 0, 0)
            return self.finish_blob(0, 0, 1, 0, HDR_AA)
        soa = self.of_type(self.rrs_of(apex), T_SOA)
        if soa < 0:
            raise self.error(f"zone {self.apex_text[zi]} has no SOA RRset")
        s = self.rrsets[soa]
        rd = s.rdatas[0]
        _grow(<void **>&self.dat, &self.dat_cap, 12, 1)
        fix[0] = 0
        put16be(self.dat, 0xC000)
        put16be(self.dat + 2, T_SOA)
        put16be(self.dat + 4, CLASS_IN)
        put32be(self.dat + 6, s.ttl)
        size = 12
        self.put_under_apex(self.intern_name(rd.mname), apex, fix, &nfix, &size)
        self.put_under_apex(self.intern_name(rd.rname), apex, fix, &nfix, &size)
        self.put_soa_numbers(rd, &size)
        put16be(self.dat + 10, size - 12)
        self.seg(0, 0, 0, 0, 1)
        self.seg(1, size, 0, 0, 0, 1)
        return self.finish_blob(0, 0, 2, size, HDR_AA, 1, nfix, fix)

    cdef int seg(self, size_t k, uint32_t end, uint32_t an, uint32_t ar, uint32_t tc,
                 uint32_t ns=0) except -1:
        cdef uint8_t *s
        _grow(<void **>&self.segs, &self.segs_cap, SEG_SIZE * (k + 1), 1)
        s = self.segs + SEG_SIZE * k
        put32le(s + SEG_END, end)
        put16le(s + SEG_AN, an)
        put16le(s + SEG_NS, ns)
        put16le(s + SEG_AR, ar)
        put16le(s + SEG_TC, tc)
        return 0

    cdef int addr(self, rd, uint8_t *out) except -1:
        """Packed address of an A/AAAA rdata into ``out`` (16 bytes); its length."""
        cdef Py_ssize_t n
        cdef const char *s
        text = rd.address
        s = PyUnicode_AsUTF8AndSize(text, &n)
        if <Py_ssize_t>strlen(s) == n:
            if memchr(s, 58, n) != NULL:
                if inet_pton(AF_INET6, s, out) == 1:
                    return 16
            elif inet_pton(AF_INET, s, out) == 1:
                return 4
        packed = self.packed_fallback(text)       # forms inet_pton refuses (it raises)
        n = len(packed)
        if n != 4 and n != 16:
            raise self.error("address length")
        memcpy(out, <const char *>(<bytes>packed), n)
        return n

    cdef int64_t addr_blob(self, s, int rtype) except -2:
        """``answer_only_blob`` for A/AAAA: every address, owner 0xC00C."""
        cdef uint8_t ip[16]
        cdef Py_ssize_t k, nrd, size = 4 if rtype == T_A else 16, ln
        cdef uint8_t *p
        cdef uint32_t ttl = s.ttl
        rdatas = s.rdatas
        nrd = len(rdatas)
        if nrd > 0xFFFF:
            raise self.error("RRset too large")
        _grow(<void **>&self.dat, &self.dat_cap, nrd * (12 + 16), 1)
        for k in range(nrd):
            ln = self.addr(rdatas[k], ip)
            if ln != size:
                raise self.error("address of the other family")
            p = self.dat + k * (12 + size)
            put16be(p, 0xC00C)
            put16be(p + 2, rtype)
            put16be(p + 4, CLASS_IN)
            put32be(p + 6, ttl)
            put16be(p + 10, size)
            memcpy(p + 12, ip, size)
        self.seg(0, 0, 0, 0, 1)
        self.seg(1, nrd * (12 + size), nrd, 0, 0)
        return self.finish_blob(nrd, 0, 2, nrd * (12 + size))

    cdef int32_t top(self, int32_t i) noexcept:
        """The name's last label (its one-label ancestor), or -1 for the root."""
        while i >= 0 and self.nlab[i] > 1:
            i = self.parent[i]
        return i if i >= 0 and self.nlab[i] == 1 else -1

    cdef int64_t ptr_blob(self, int32_t q, s) except -2:
        """``answer_only_blob`` for one PTR whose target cannot compress against the question
        (their last labels differ); -1 otherwise."""
        cdef int32_t t = self.intern_name(s.rdatas[0].target)
        cdef uint32_t ttl = s.ttl
        cdef Py_ssize_t tl
        if self.nlab[t] > 0 and self.nlab[q] > 0 and self.top(t) == self.top(q):
            return -1
        tl = self.nlen[t]
        _grow(<void **>&self.dat, &self.dat_cap, 12 + tl, 1)
        put16be(self.dat, 0xC00C)
        put16be(self.dat + 2, T_PTR)
        put16be(self.dat + 4, CLASS_IN)
        put32be(self.dat + 6, ttl)
        put16be(self.dat + 10, tl)
        memcpy(self.dat + 12, self.nbuf + self.noff[t], tl)
        self.seg(0, 0, 0, 0, 1)
        self.seg(1, 12 + tl, 1, 0, 0)
        return self.finish_blob(1, 0, 2, 12 + tl)

    cdef void remember(self, int32_t i, uint32_t pos) noexcept:
        """Where each suffix of name ``i`` first stands (``Wire.seed``/``setdefault``)."""
        while i >= 0 and self.nlab[i] > 0:
            if self.stamp[i] != self.epoch:
                self.stamp[i] = self.epoch
                self.where[i] = pos
            pos += self.nbuf[self.noff[i]] + 1
            i = self.parent[i]

    cdef int64_t srv_blob(self, int32_t q, s) except -2:
        """oracle.py ``srv_blob``: SRV answer plus A/AAAA glue; -1 past the pointer range."""
        cdef uint32_t ttl = s.ttl, gttl, base, size = 0, n_ar = 0
        cdef size_t grown
        cdef Py_ssize_t k, nrd, tl, m, nseg = 2, ln
        cdef int32_t t, r
        cdef int prio, weight, port, gtype
        cdef uint8_t ip[16]
        cdef uint8_t *p
        rdatas = s.rdatas
        nrd = len(rdatas)
        if nrd > 0xFFFF:
            raise self.error("RRset too large")
        self.epoch += 1
        base = 12 + self.nlen[q] + 4
        self.remember(q, 12)
        targets = []
        for k in range(nrd):
            rd = rdatas[k]
            prio, weight, port = rd.priority, rd.weight, rd.port
            if not (0 <= prio <= 0xFFFF and 0 <= weight <= 0xFFFF and 0 <= port <= 0xFFFF):
                raise self.error("SRV field out of range")
            t = self.intern_name(rd.target)
            targets.append(t)
            tl = self.nlen[t]
            # RFC 2782: the target is never compressed, and never pointed at (it rotates).
            _grow(<void **>&self.dat, &self.dat_cap, size + 18 + tl, 1)
            p = self.dat + size
            put16be(p, 0xC00C)
            put16be(p + 2, T_SRV)
            put16be(p + 4, CLASS_IN)
            put32be(p + 6, ttl)
            put16be(p + 10, 6 + tl)
            put16be(p + 12, prio)
            put16be(p + 14, weight)
            put16be(p + 16, port)
            memcpy(p + 18, self.nbuf + self.noff[t], tl)
            size += 18 + tl
            if base + size > MAX_POINTER:
                return -1               # positions past 0x3FFF are not remembered
        self.seg(0, 0, 0, 0, 1)
        self.seg(1, size, nrd, 0, 0)
        for t in targets:
            # RFC 2181 §5: a target shared by several SRVs gets its glue once.
            if self.seen[t] == self.epoch:
                continue
            self.seen[t] = self.epoch
            if not self.nflags[t] & NF_DATA:
                continue
            for gtype in (T_A, T_AAAA):
                r = self.first_rr[t]
                while r >= 0 and self.rr_type[r] != gtype:
                    r = self.rr_next[r]
                if r < 0:
                    continue
                g = self.rrsets[r]
                gttl = g.ttl
                for rd in g.rdatas:
                    ln = self.addr(rd, ip)
                    # The owner against the question and the glue before it (``Wire.name``).
                    grown = size
                    self.put_name(t, True, base, &grown)
                    size = <uint32_t>grown
                    _grow(<void **>&self.dat, &self.dat_cap, size + 10 + ln, 1)
                    p = self.dat + size
                    put16be(p, gtype)
                    put16be(p + 2, CLASS_IN)
                    put32be(p + 4, gttl)
                    put16be(p + 8, ln)
                    memcpy(p + 10, ip, ln)
                    size += 10 + ln
                    n_ar += 1
                if n_ar > 0xFFFF:
                    raise self.error("too much glue")
                self.seg(nseg, size, nrd, n_ar, 0)
                nseg += 1
        if base + size > MAX_POINTER:
            return -1
        return self.finish_blob(nrd, n_ar, nseg, size)

    cdef int put_name(self, int32_t i, bint compress, uint32_t base, size_t *size,
                      bint remember=True) except -1:
        """rr.py ``Wire.name`` into ``dat`` at ``*size`` (message offset ``base + *size``):
        a pointer to the longest suffix already written (RFC 1035 §4.1.4) when
        ``compress``; every suffix written here is remembered if a pointer can reach it,
        unless not ``remember`` (an SRV target: it rotates)."""
        cdef uint32_t pos
        cdef uint8_t ln
        _grow(<void **>&self.dat, &self.dat_cap, size[0] + self.nlen[i] + 2, 1)
        while i >= 0 and self.nlab[i] > 0:
            if compress and self.stamp[i] == self.epoch:
                put16be(self.dat + size[0], 0xC000 | self.where[i])
                size[0] += 2
                return 0
            pos = base + size[0]
            if remember and pos <= MAX_POINTER and self.stamp[i] != self.epoch:
                self.stamp[i] = self.epoch
                self.where[i] = pos
            ln = self.nbuf[self.noff[i]]
            memcpy(self.dat + size[0], self.nbuf + self.noff[i], ln + 1)
            size[0] += ln + 1
            i = self.parent[i]
        self.dat[size[0]] = 0
        size[0] += 1
        return 0

    cdef int put_rdata(self, int rtype, rd, uint32_t base, size_t *size) except -1:
        """encode.py ``put_rr``'s rdata (RFC 1035 §3.3, RFC 2782): by the RRset's type for
        the types whose rdata has one form (A/AAAA, SRV, the one-name types), by the rdata's
        rr.py class (its ``write``) for every other type."""
        cdef uint8_t ip[16]
        cdef Py_ssize_t ln
        cdef bytes b
        cdef uint8_t *p
        cdef int64_t v
        if rtype == T_A or rtype == T_AAAA:
            ln = self.addr(rd, ip)
            _grow(<void **>&self.dat, &self.dat_cap, size[0] + ln, 1)
            memcpy(self.dat + size[0], ip, ln)
            size[0] += ln
            return 1
        if rtype == T_SRV or type(rd) is self.Srv:
            self.put_srv(rd.priority, rd.weight, rd.port, size)
            # RFC 2782: "name compression is not to be used for this field"; nor is it
            # pointed at, as SRV records rotate (rr.py ``Srv.write``).
            self.put_name(self.intern_name(rd.target), False, base, size, False)
            return 1
        if rtype == T_PTR or rtype == T_NS or rtype == T_CNAME or type(rd) is self.Target:
            self.put_name(self.intern_name(rd.target), True, base, size)
            return 1
        if type(rd) is self.Txt:
            for text in rd.strings:
                b = text.encode()
                ln = len(b)
                if ln > 255:
                    raise self.error("TXT character-string longer than 255 bytes")
                _grow(<void **>&self.dat, &self.dat_cap, size[0] + 1 + ln, 1)
                self.dat[size[0]] = ln
                memcpy(self.dat + size[0] + 1, <const char *>b, ln)
                size[0] += 1 + ln
            return 1
        if type(rd) is self.Soa:
            self.put_name(self.intern_name(rd.mname), True, base, size)
            self.put_name(self.intern_name(rd.rname), True, base, size)
            self.put_soa_numbers(rd, size)
            return 1
        if type(rd) is self.Address:
            ln = self.addr(rd, ip)
            _grow(<void **>&self.dat, &self.dat_cap, size[0] + ln, 1)
            memcpy(self.dat + size[0], ip, ln)
            size[0] += ln
            return 1
        raise self.error(f"rdata {type(rd).__name__} of type {rtype} is not one kdns encodes")

    cdef int put_srv(self, prio, weight, port, size_t *size) except -1:
        cdef uint8_t *p
        if not (0 <= prio <= 0xFFFF and 0 <= weight <= 0xFFFF and 0 <= port <= 0xFFFF):
            raise self.error("SRV priority, weight or port out of range")
        _grow(<void **>&self.dat, &self.dat_cap, size[0] + 6, 1)
        p = self.dat + size[0]
        put16be(p, prio)
        put16be(p + 2, weight)
        put16be(p + 4, port)
        size[0] += 6
        return 0

    cdef int put_soa_numbers(self, rd, size_t *size) except -1:
        """SOA serial, refresh, retry, expire, minimum (RFC 1035 §3.3.13)."""
        cdef uint8_t *p
        cdef int k
        _grow(<void **>&self.dat, &self.dat_cap, size[0] + 20, 1)
        p = self.dat + size[0]
        put32be(p, rd.serial & 0xFFFFFFFF)
        for k, v in enumerate((rd.refresh, rd.retry, rd.expire, rd.minimum)):
            if not 0 <= v <= 0xFFFFFFFF:
                raise self.error("SOA field out of range")
            put32be(p + 4 + 4 * k, v)
        size[0] += 20
        return 0

    cdef int put_rr(self, int32_t owner, int rtype, uint32_t ttl, rd, uint32_t base,
                    size_t *size) except -1:
        """encode.py ``put_rr``: owner (a pointer to the question when ``owner`` < 0),
        fixed part, rdata."""
        cdef size_t len_at
        if owner < 0:
            _grow(<void **>&self.dat, &self.dat_cap, size[0] + 2, 1)
            put16be(self.dat + size[0], 0xC00C)
            size[0] += 2
        else:
            self.put_name(owner, True, base, size)
        _grow(<void **>&self.dat, &self.dat_cap, size[0] + 10, 1)
        put16be(self.dat + size[0], rtype)
        put16be(self.dat + size[0] + 2, CLASS_IN)
        put32be(self.dat + size[0] + 4, ttl)
        len_at = size[0] + 8
        size[0] += 10
        self.put_rdata(rtype, rd, base, size)
        if size[0] - len_at - 2 > 0xFFFF:
            raise self.error("rdata over 64 KiB")
        put16be(self.dat + len_at, size[0] - len_at - 2)
        return 1

    cdef int64_t plain_blob(self, int32_t q, int32_t r) except -2:
        """encode.py ``generic_blob`` for a name without a CNAME: its RRset of this type
        owned by the question, and for SRV and NS the targets' A/AAAA in the additional
        section (RFC 2782, RFC 1035 §3.3.11), each target's once (RFC 2181 §5)."""
        cdef int rtype = self.rr_type[r], gtype
        cdef uint32_t base = 12 + self.nlen[q] + 4, n_an, n_ar = 0
        cdef size_t size = 0
        cdef Py_ssize_t nseg = 2
        cdef int32_t t, g
        s = self.rrsets[r]
        rdatas = s.rdatas
        n_an = len(rdatas)
        if n_an > 0xFFFF:
            raise self.error("RRset too large")
        self.epoch += 1
        self.remember(q, 12)            # ``Wire.seed``: the question at offset 12
        for rd in rdatas:
            self.put_rr(-1, rtype, s.ttl, rd, base, &size)
        self.seg(0, 0, 0, 0, 1)
        self.seg(1, size, n_an, 0, 0)
        if rtype == T_SRV or rtype == T_NS:
            self.put_glue(rdatas, base, &size, n_an, &n_ar, &nseg)
        return self.finish_blob(n_an, n_ar, nseg, size)

    cdef int put_glue(self, rdatas, uint32_t base, size_t *size, uint32_t n_an,
                      uint32_t *n_ar, Py_ssize_t *nseg) except -1:
        """encode.py ``glue``: the in-image A/AAAA of the targets, one segment per RRset
        (RFC 2782, RFC 1035 §3.3.11), a target shared by several records once (RFC 2181
        §5)."""
        cdef int32_t t, g
        cdef int gtype
        targets = [self.intern_name(rd.target) for rd in rdatas]
        for t in targets:
            if self.seen[t] == self.epoch:
                continue
            self.seen[t] = self.epoch
            if self.rrs_of(t) < 0:
                continue
            for gtype in (T_A, T_AAAA):
                g = self.first_rr[t]
                while g >= 0 and self.rr_type[g] != gtype:
                    g = self.rr_next[g]
                if g < 0:
                    continue
                gs = self.rrsets[g]
                for rd in gs.rdatas:
                    self.put_rr(t, gtype, gs.ttl, rd, base, size)
                    n_ar[0] += 1
                if n_ar[0] > 0xFFFF:
                    raise self.error("too much glue")
                self.seg(nseg[0], size[0], n_an, n_ar[0], 0)
                nseg[0] += 1
        return 1

    cdef int32_t rrs_of(self, int32_t i) except -2:
        """``rrsets_of`` in C: the name's first RRset, -1 when it has none."""
        if not self.nflags[i] & NF_DATA:
            return -1
        if self.nflags[i] & NF_ENC:
            raise self.error(f"{self.text_of(i)} is encoded; its RRsets are needed")
        return self.first_rr[i]

    cdef int32_t of_type(self, int32_t r, int rtype) noexcept:
        while r >= 0 and self.rr_type[r] != rtype:
            r = self.rr_next[r]
        return r

    cdef int chase(self, int32_t q, int qtype, int32_t *an, int *nan, int *zi,
                   int32_t *glue) except -1:
        """encode.py ``chase``: the answer's RRsets (``an[:nan]``, at most 11), following
        in-image CNAMEs; the zone whose SOA goes in the authority section (-1: none), the
        RRset whose targets get glue (-1: none); returns the rcode."""
        cdef int32_t cur = q, r, c, k
        cdef int step, z
        nan[0] = 0
        zi[0] = -1
        glue[0] = -1
        for step in range(11):
            r = self.rrs_of(cur)
            if r < 0:
                z = self.zone_of(cur)
                if z < 0 or self.zone_kind[z] != ZONE_AUTH:
                    return 0                      # outside (or reverse, hosts): the CNAME alone
                zi[0] = z
                return 0 if self.nflags[cur] & (NF_EXPLICIT | NF_TREE) else 3
            c = self.of_type(r, T_CNAME)
            if c >= 0 and qtype != T_CNAME:
                for k in range(nan[0]):
                    if self.rr_owner[k] == cur:
                        return 2                  # a CNAME loop: SERVFAIL
                self.rr_owner[nan[0]] = cur
                an[nan[0]] = c
                nan[0] += 1
                cur = self.intern_name(self.rrsets[c].rdatas[0].target)
                continue
            r = self.of_type(r, qtype)
            if r < 0:
                z = self.zone_of(cur)
                # A hosts zone's NODATA has no SOA (encode.py ``soa_authority``).
                zi[0] = z if z < 0 or self.zone_kind[z] == ZONE_AUTH \
                    or self.zone_kind[z] == ZONE_REVERSE else -1
                return 0
            self.rr_owner[nan[0]] = cur
            an[nan[0]] = r
            nan[0] += 1
            if qtype == T_SRV or qtype == T_NS:
                glue[0] = r
            return 0
        return 2                                  # a chain too long: SERVFAIL

    cdef int64_t chain_blob(self, int32_t q, int qtype, uint32_t hdr) except -2:
        """encode.py ``blob`` of ``chase(q, qtype)``; -3 for a plain NODATA (the zone blob
        answers it)."""
        cdef int32_t an[11]
        cdef int nan, zi, rcode, k
        cdef int32_t glue, soa
        cdef uint32_t base = 12 + self.nlen[q] + 4, n_an = 0, n_ns = 0, n_ar = 0
        cdef size_t size = 0
        cdef Py_ssize_t nseg = 1
        rcode = self.chase(q, qtype, an, &nan, &zi, &glue)
        if nan == 0 and rcode == 0:
            return -3
        self.epoch += 1
        self.remember(q, 12)
        self.seg(0, 0, 0, 0, 0)
        for k in range(nan):
            s = self.rrsets[an[k]]
            for rd in s.rdatas:
                self.put_rr(-1 if k == 0 else self.rr_owner[k], s.rtype, s.ttl, rd, base, &size)
            n_an += len(s.rdatas)
            self.seg(nseg, size, n_an, 0, 0)
            nseg += 1
        if zi >= 0:
            soa = self.of_type(self.rrs_of(self.apex_id[zi]), T_SOA)
            if soa < 0:
                raise self.error(f"zone {self.text_of(self.apex_id[zi])} has no SOA RRset")
            s = self.rrsets[soa]
            for rd in s.rdatas:
                self.put_rr(self.apex_id[zi], T_SOA, s.ttl, rd, base, &size)
            n_ns += len(s.rdatas)
            self.seg(nseg, size, n_an, 0, 0, n_ns)
            nseg += 1
        if glue >= 0:
            self.put_glue(self.rrsets[glue].rdatas, base, &size, n_an, &n_ar, &nseg)
        if n_an > 0xFFFF or n_ns > 0xFFFF:
            raise self.error("RRset too large")
        # A cut that drops answer or authority records leaves the reply truncated (TC).
        for k in range(nseg):
            put16le(self.segs + SEG_SIZE * k + SEG_TC,
                    1 if le16(self.segs + SEG_SIZE * k + SEG_AN)
                    + le16(self.segs + SEG_SIZE * k + SEG_NS) < n_an + n_ns else 0)
        return self.finish_blob(n_an, n_ar, nseg, size, hdr | rcode, n_ns)

    cdef int chain_entries(self, int32_t i) except -1:
        """encode.py ``chain_entries``: a blob for every type the chain from ``i`` can
        answer, and for CNAME and DEFAULT_QTYPE (every other type)."""
        cdef int32_t cur = i, r, c
        cdef int step, outside, qtype
        cdef int64_t off
        cdef uint32_t hdr
        qtypes = {T_CNAME, DEFAULT_QTYPE}
        cur = self.intern_name(self.rrsets[self.first_rr[i]].rdatas[0].target)
        for step in range(10):
            r = self.rrs_of(cur)
            c = -1
            while r >= 0:
                qtypes.add(self.rr_type[r])
                if self.rr_type[r] == T_CNAME:
                    c = r
                r = self.rr_next[r]
            if c < 0:
                break
            cur = self.intern_name(self.rrsets[c].rdatas[0].target)
        # SOA and NS answer at the apex, never through a chain into it.
        qtypes.discard(T_SOA)
        qtypes.discard(T_NS)
        outside = self.rrs_of(cur) < 0 and (self.zone_of(cur) < 0
                                            or self.zone_kind[self.zone_of(cur)] != ZONE_AUTH)
        for qtype in sorted(qtypes):
            # A CNAME query is answered by the CNAME alone (RFC 1034 §3.6.2); any other
            # type of a chain ending outside needs the target's records: hand off.
            hdr = HDR_AA | (HDR_HANDOFF if outside and qtype != T_CNAME else 0)
            off = self.chain_blob(i, qtype if qtype else 0xFFFF - 1, hdr)
            if off != -3:
                self.push_rr(qtype, off)
        return 0

    cdef int64_t answer_only(self, int32_t q, int32_t r) except -2:
        cdef int rtype = self.rr_type[r]
        s = self.rrsets[r]
        if rtype == T_A or rtype == T_AAAA:
            return self.addr_blob(s, rtype)
        if rtype == T_SRV:
            return self.srv_blob(q, s)
        if rtype == T_PTR and len(s.rdatas) == 1:
            return self.ptr_blob(q, s)
        return -1

    # ------------------------------------------------------------------ tables

    cdef int push_rr(self, uint32_t qtype, uint32_t off) except -1:
        _grow(<void **>&self.rrf, &self.rrf_cap, self.rrf_len + 2, 4)
        self.rrf[self.rrf_len] = qtype
        self.rrf[self.rrf_len + 1] = off
        self.rrf_len += 2
        return 0

    cdef int entries(self, int32_t i) except -1:
        """oracle.py ``rr_entries`` for name ``i``: (qtype, blob) pairs sorted by type."""
        cdef int32_t rs[64]
        cdef int nr = 0, a, b
        cdef int32_t r, tmp
        cdef int64_t off
        cdef const uint32_t *e
        self.rr_at[i] = self.rrf_len // 2
        if self.nflags[i] & NF_ENC:
            for a in range(self.enc_n[i]):
                e = self.ents + 2 * (self.enc_at[i] + a)
                self.push_rr(e[0], self.place_blob(e[1]))
            self.rr_n[i] = self.enc_n[i]
            return 0
        if self.nflags[i] & NF_CNAME:
            self.chain_entries(i)
            self.rr_n[i] = self.rrf_len // 2 - self.rr_at[i]
            return 0
        r = self.first_rr[i]
        while r >= 0:
            if nr == 64:
                raise self.error("more than 64 RRsets at one name")
            rs[nr] = r
            nr += 1
            r = self.rr_next[r]
        for a in range(1, nr):          # insertion sort: types are unique per name
            b = a
            while b > 0 and self.rr_type[rs[b - 1]] > self.rr_type[rs[b]]:
                tmp = rs[b]
                rs[b] = rs[b - 1]
                rs[b - 1] = tmp
                b -= 1
        for a in range(nr):
            off = self.answer_only(i, rs[a])
            if off < 0:
                off = self.plain_blob(i, rs[a])
            self.push_rr(self.rr_type[rs[a]], off)
        self.rr_n[i] = nr
        return 0

    cdef int _grow_trie(self) except -1:
        """oracle.py ``grow_tree`` + ``number_nodes``: the forward trie, breadth first, each
        node's children contiguous and sorted by (length, bytes)."""
        global _sort_nbuf, _sort_noff
        cdef int32_t i, j, c, head, tail, nk
        cdef int32_t *fill
        for i in range(self.n):
            if self.nflags[i] & NF_FWD:
                j = i
                while j >= 0 and not self.nflags[j] & NF_TREE:
                    self.nflags[j] |= NF_TREE
                    j = self.parent[j]
        self.nflags[0] |= NF_TREE
        self.kid_start = <int32_t *>self._re(self.kid_start, (self.n + 1) * 4)
        memset(self.kid_start, 0, (self.n + 1) * 4)
        nk = 0
        for i in range(1, self.n):
            if self.nflags[i] & NF_TREE:
                self.kid_start[self.parent[i] + 1] += 1
                nk += 1
        for i in range(self.n):
            self.kid_start[i + 1] += self.kid_start[i]
        self.kids = <int32_t *>self._re(self.kids, (nk + 1) * 4)
        self.fillbuf = <int32_t *>self._re(self.fillbuf, (self.n + 1) * 4)
        fill = self.fillbuf
        memcpy(fill, self.kid_start, (self.n + 1) * 4)
        for i in range(1, self.n):
            if self.nflags[i] & NF_TREE:
                self.kids[fill[self.parent[i]]] = i
                fill[self.parent[i]] += 1
        _sort_nbuf = self.nbuf
        _sort_noff = self.noff
        for i in range(self.n):
            c = self.kid_start[i + 1] - self.kid_start[i]
            if c > 1:
                qsort(self.kids + self.kid_start[i], c, sizeof(int32_t), _cmp_child)
        _sort_nbuf = NULL
        _sort_noff = NULL
        self.order = <int32_t *>self._re(self.order, (nk + 1) * 4)
        self.order[0] = 0
        tail = 1
        for head in range(nk + 1):
            i = self.order[head]
            c = self.kid_start[i + 1] - self.kid_start[i]
            if c:
                memcpy(self.order + tail, self.kids + self.kid_start[i], c * 4)
                tail += c
        self.nnodes = nk + 1
        return 0

    cdef uint32_t label_off(self, int32_t i) except? 0xFFFFFFFF:
        """Offset of the name's first label in the labels pool ([u8 len][bytes], each label
        once, in first-use order); the root's label is empty."""
        cdef const uint8_t *lab
        cdef uint8_t empty = 0
        cdef size_t ln, mask, j, ncap, k
        cdef int32_t o
        cdef int32_t *t
        lab = self.nbuf + self.noff[i] if i != 0 else &empty
        ln = lab[0] + 1
        if (self.nlabels + 1) * 2 > self.lht_cap:
            ncap = self.lht_cap * 2
            t = <int32_t *>malloc(ncap * 4)
            if t == NULL:
                raise MemoryError()
            memset(t, 0xFF, ncap * 4)
            for k in range(self.lht_cap):
                o = self.lht[k]
                if o >= 0:
                    j = fnv1a(self.lpool + o, self.lpool[o] + 1) & (ncap - 1)
                    while t[j] >= 0:
                        j = (j + 1) & (ncap - 1)
                    t[j] = o
            free(self.lht)
            self.lht = t
            self.lht_cap = ncap
        mask = self.lht_cap - 1
        j = fnv1a(lab, ln) & mask
        while self.lht[j] >= 0:
            o = self.lht[j]
            if self.lpool[o] + 1 == ln and memcmp(self.lpool + o, lab, ln) == 0:
                return o
            j = (j + 1) & mask
        _grow(<void **>&self.lpool, &self.lpool_cap, self.lpool_len + ln, 1)
        o = self.lpool_len
        memcpy(self.lpool + o, lab, ln)
        self.lpool_len += ln
        self.lht[j] = o
        self.nlabels += 1
        return o

    cdef int _encode_nodes(self) except -1:
        """The node table in trie order, encoding each node's blobs (oracle.py ``build``'s
        node loop), the zone apexes' and pod namespaces' flags and ``extra`` as encode.py
        ``special_node`` decides them."""
        cdef int32_t idx, i, c
        cdef uint32_t flags, extra, loff
        cdef size_t rr_start
        cdef uint8_t *nd
        cdef int32_t nxt = 1
        self.nodes = <uint8_t *>self._re(self.nodes, (self.nnodes + 1) * NODE_SIZE)
        for idx in range(self.nnodes):
            i = self.order[idx]
            loff = self.label_off(i)
            rr_start = self.rrf_len
            if not self.nflags[i] & NF_DATA:
                flags = NODE_EXISTS if self.nflags[i] & NF_EXPLICIT else 0
            else:
                flags = NODE_EXISTS
                self.entries(i)
            extra = 0
            if self.nflags[i] & NF_SPECIAL:
                flags = self.special_node(i, idx, flags, &extra)
            c = self.kid_start[i + 1] - self.kid_start[i]
            # Offsets relative to the labels pool, the rr table and the pod lists (for a
            # verified pod namespace's ``extra``) until ``assemble``; ``rrf`` holds two words
            # per rr entry.
            nd = self.nodes + NODE_SIZE * idx
            put32le(nd + NODE_LABEL_OFF, loff)
            # First child: the breadth-first index of the first of the contiguous children.
            put32le(nd + NODE_FIRST_CHILD, 0)
            put32le(nd + NODE_NCHILD, c)
            put32le(nd + NODE_RR_OFF, rr_start // 2 * RRENT_SIZE)
            put16le(nd + NODE_NRR, (self.rrf_len - rr_start) // 2)
            put16le(nd + NODE_FLAGS, flags)
            put32le(nd + NODE_EXTRA, extra)
        # First-child indexes from a second breadth-first pass (children follow in order).
        for idx in range(self.nnodes):
            i = self.order[idx]
            c = self.kid_start[i + 1] - self.kid_start[i]
            if c:
                put32le(self.nodes + NODE_SIZE * idx + NODE_FIRST_CHILD, nxt)
                nxt += c
        return 0

    cdef uint32_t special_node(self, int32_t i, int32_t idx, uint32_t flags,
                               uint32_t *extra) except? 0xFFFFFFFF:
        """encode.py ``special_node``: a zone apex carries its zone's index, a verified pod
        namespace the offset of its pod list (relative to the pod lists until assembly)."""
        cdef int zi
        cdef bytes packed
        for zi in range(self.nzones):
            if self.apex_id[zi] == i:
                flags |= NODE_ZONE_APEX | NODE_EXISTS
                extra[0] = self.zone[i]          # the last zone of that apex, as a dict's
                self.apex_node[zi] = idx
        if i in self.pods:
            flags |= NODE_POD_NS | NODE_EXISTS
            packed = self.pods[i]
            if packed is not None:
                flags |= NODE_POD_VERIFIED
                extra[0] = self.podl_len
                _grow(<void **>&self.podl, &self.podl_cap, self.podl_len + 4 + len(packed), 1)
                put32le(self.podl + self.podl_len, len(packed) // 16)
                memcpy(self.podl + self.podl_len + 4, <const char *>packed, len(packed))
                self.podl_len += 4 + len(packed)
                _grow(<void **>&self.verified, &self.verified_cap, self.nverified + 1, 4)
                self.verified[self.nverified] = idx
                self.nverified += 1
        return flags

    cdef int rev_key(self, int32_t i, uint8_t *key) noexcept:
        """encode.py ``reverse_to_ip`` on name ``i``: 1 and key[17] = family, address; 0 if
        not a full canonical reverse name."""
        cdef const uint8_t *p = self.nbuf + self.noff[i]
        cdef int k, ln, v, d
        cdef int nl = self.nlab[i]
        memset(key, 0, 17)
        if nl == 6 and self.nlen[i] >= 14 and memcmp(p + self.nlen[i] - 14, b"\x07in-addr\x04arpa\x00", 14) == 0:
            key[0] = 4
            for k in range(4):
                ln = p[0]
                if ln < 1 or ln > 3 or (ln > 1 and p[1] == 48):
                    return 0
                v = 0
                for d in range(ln):
                    if not 48 <= p[1 + d] <= 57:
                        return 0
                    v = v * 10 + p[1 + d] - 48
                if v > 255:
                    return 0
                key[1 + 3 - k] = v
                p += ln + 1
            return 1
        if nl == 34 and self.nlen[i] >= 10 and memcmp(p + self.nlen[i] - 10, b"\x03ip6\x04arpa\x00", 10) == 0:
            key[0] = 6
            for k in range(32):
                if p[0] != 1:
                    return 0
                v = hex_nibble(p[1])
                if v < 0:
                    return 0
                # Labels are least significant nibble first (RFC 3596 §2.5).
                d = 31 - k
                if d % 2 == 0:
                    key[1 + d // 2] |= v << 4
                else:
                    key[1 + d // 2] |= v
                p += 2
            return 1
        return 0

    cdef int _encode_reverse(self) except -1:
        """The reverse table, sorted by (family, address), encoding each name's blobs;
        entries hold rr offsets relative to the rr table until ``assemble``."""
        cdef int32_t i, k, m = 0
        cdef RevKey *keys
        cdef uint8_t *e
        cdef size_t rr_start
        for i in range(self.n):
            if self.nflags[i] & NF_REV:
                m += 1
        self.revkeys = <RevKey *>self._re(self.revkeys, (m + 1) * sizeof(RevKey))
        keys = self.revkeys
        m = 0
        for i in range(self.n):
            if self.nflags[i] & NF_REV:
                if not self.rev_key(i, keys[m].key):
                    raise self.error(f"{self.text_of(i)} is not a full reverse name")
                keys[m].id = i
                m += 1
        qsort(keys, m, sizeof(RevKey), _cmp_rev)
        self.rev = <uint8_t *>self._re(self.rev, (m + 1) * REV_SIZE)
        memset(self.rev, 0, (m + 1) * REV_SIZE)
        self.nrev = m
        for k in range(m):
            i = keys[k].id
            rr_start = self.rrf_len
            if self.nflags[i] & NF_DATA:
                self.entries(i)
            e = self.rev + REV_SIZE * k
            e[REV_FAMILY] = keys[k].key[0]
            memcpy(e + REV_IP, keys[k].key + 1, 16)
            put32le(e + REV_RR_OFF, rr_start // 2 * RRENT_SIZE)
            put16le(e + REV_NRR, (self.rrf_len - rr_start) // 2)
            put16le(e + REV_ZONE, self.zone_of(i))
        return 0

    def compile(self, rrsets, exists, ttls, pods, bint synced, uint64_t serial, alloc=None,
                bint consume=False, bytes autopath=b""):
        """The image of ``rrsets`` (rr.RRset) and ``exists`` (names declared to exist):
        every name filed, the trie grown, every answer encoded (the zones' negative answers
        first, then the nodes' in trie order, then the reverse names' in address order:
        the blob pool's order), and the sections assembled behind the header.

        ``ttls``: each zone's negative-answer TTL, in zone order. ``pods``: (namespace
        labels, packed pod IPs or None) for each pod namespace node (``pod.<zone>``'s
        children): with IPs it is verified (layout.py). ``alloc(size)``: a writable buffer
        of the image's size to write it into (a memfd's mapping), or None for a new bytes
        object. ``consume``: the RRsets list is emptied once every answer is encoded, so
        that its memory is free before the image is assembled (the compile's peak).
        ``autopath``: the autopath section (encode.autopath_section), placed last, 4-aligned."""
        cdef int zi
        cdef int32_t i
        cdef uint32_t nodes_off, zones_off, rev_off, rrtab_off, labels_off, pods_off
        cdef uint32_t blobs_off
        cdef size_t total
        self.check()
        ttls = list(ttls)
        if len(ttls) != self.nzones:
            raise ValueError("one TTL per zone")
        self._begin()
        self._add(rrsets, exists)
        for zi in range(self.nzones):
            self.mark(self.labels_of(self.apex_id[zi]))
            self.apex_node[zi] = 0
        for labels, packed in pods:
            i = self.mark(labels)
            self.pods[i] = None if packed is None else bytes(packed)
        self._grow_trie()
        for zi in range(self.nzones):
            self.neg_blob[zi] = self.negative_blob(zi)
        self.seg(0, 0, 0, 0, 0)
        self.servfail_blob = self.finish_blob(0, 0, 1, 0, RCODE_SERVFAIL)
        self._encode_nodes()
        self._encode_reverse()
        # Every answer is encoded: the RRsets, the per-compile name arrays and the trie
        # may go before the image is allocated (the compile's peak is the image's bytes
        # plus what is alive while they are written).
        self.rrsets = []
        self.lean = not (self.persistent and self.warm)
        if self.lean:
            self.free_scratch()
            free(self.kids); free(self.order); free(self.kid_start); free(self.rr_next)
            free(self.rr_type); free(self.fillbuf); free(self.revkeys)
            self.fillbuf = NULL; self.revkeys = NULL
            self.kids = NULL; self.order = NULL; self.kid_start = NULL; self.rr_next = NULL
            self.rr_type = NULL
        if consume and type(rrsets) is list:
            rrsets.clear()
        nodes_off = HEADER_SIZE
        zones_off = nodes_off + NODE_SIZE * self.nnodes
        rev_off = zones_off + ZONE_SIZE * self.nzones
        rrtab_off = rev_off + REV_SIZE * self.nrev
        labels_off = rrtab_off + RRENT_SIZE * (self.rrf_len // 2)
        pods_off = labels_off + self.lpool_len
        pods_off += -pods_off % 4
        blobs_off = pods_off + self.podl_len
        total = blobs_off + self.placed_len
        if autopath:
            total += -total % 4 + len(autopath)
        if total > 0xFFFFFFFF:
            raise self.error("the image would be over 4 GiB")
        out = None if alloc is None else alloc(total)
        return self._assemble(out, ttls, synced, serial, nodes_off, zones_off, rev_off,
                              rrtab_off, labels_off, pods_off, blobs_off, total, autopath)

    cdef object _assemble(self, out, list ttls, bint synced, uint64_t serial,
                          uint32_t nodes_off, uint32_t zones_off, uint32_t rev_off,
                          uint32_t rrtab_off, uint32_t labels_off, uint32_t pods_off,
                          uint32_t blobs_off, size_t total, bytes autopath):
        """The image: the header, then the sections in layout order with every
        section-relative offset rebased. Written into ``out`` when given (a writable buffer
        of ``total`` bytes), which is returned; otherwise into a new bytes object."""
        cdef uint8_t[::1] into
        cdef int32_t idx, k
        cdef int zi
        cdef uint8_t *nd
        cdef uint8_t *o
        cdef uint8_t *e
        cdef size_t pos
        cdef const uint8_t *magic = self.magic
        cdef size_t ap_len = len(autopath)
        cdef size_t core_end = <size_t>blobs_off + self.placed_len
        cdef size_t ap_off = (core_end + 3) & ~(<size_t>3) if ap_len else 0
        if <size_t>blobs_off != pods_off + self.podl_len or total != (
                ap_off + ap_len if ap_len else core_end):
            raise AssertionError("inconsistent image layout")
        for k in range(<int32_t>self.nverified):
            nd = self.nodes + NODE_SIZE * self.verified[k] + NODE_EXTRA
            put32le(nd, le32(nd) + pods_off)
        if not self.persistent:
            self.release_names()
        if out is None:
            out = PyBytes_FromStringAndSize(NULL, total)
            o = <uint8_t *>PyBytes_AS_STRING(out)
        else:
            into = out
            if into.shape[0] != total:
                raise ValueError("output buffer is not the image's size")
            o = &into[0]
        memset(o, 0, HEADER_SIZE)
        pos = HEADER_SIZE
        # Each table is freed once it is in the image: the image's pages grow as they go.
        for idx in range(self.nnodes):
            nd = self.nodes + NODE_SIZE * idx
            memcpy(o + pos, nd, NODE_SIZE)
            put32le(o + pos + NODE_LABEL_OFF, le32(nd + NODE_LABEL_OFF) + labels_off)
            put32le(o + pos + NODE_RR_OFF, le32(nd + NODE_RR_OFF) + rrtab_off)
            pos += NODE_SIZE
        if self.lean:
            free(self.nodes)
            self.nodes = NULL
        for zi in range(self.nzones):
            e = o + pos + ZONE_SIZE * zi
            put32le(e + ZONE_APEX_NODE, self.apex_node[zi] if self.zone_kind[zi] == ZONE_AUTH else 0)
            put32le(e + ZONE_NEG_BLOB, self.neg_blob[zi] + blobs_off)
            put32le(e + ZONE_TTL, ttls[zi])
            put16le(e + ZONE_APEX_WIRE_LEN, self.apex_wlen[zi])
            put16le(e + ZONE_KIND, self.zone_kind[zi])
        pos += ZONE_SIZE * self.nzones
        for k in range(self.nrev):
            e = self.rev + REV_SIZE * k
            memcpy(o + pos, e, REV_SIZE)
            put32le(o + pos + REV_RR_OFF, le32(e + REV_RR_OFF) + rrtab_off)
            pos += REV_SIZE
        if self.lean:
            free(self.rev)
            self.rev = NULL
        for k in range(0, <int32_t>self.rrf_len, 2):
            put32le(o + pos + RRENT_QTYPE, self.rrf[k])      # with its zero pad: 32 bits
            put32le(o + pos + RRENT_BLOB, self.rrf[k + 1] + blobs_off)
            pos += RRENT_SIZE
        if self.lean:
            free(self.rrf)
            self.rrf = NULL
            self.rrf_cap = 0
        if self.lpool_len:
            memcpy(o + pos, self.lpool, self.lpool_len)
        pos += self.lpool_len
        if self.lean:
            free(self.lpool)
            self.lpool = NULL
            self.lpool_cap = 0
        while pos < pods_off:
            o[pos] = 0
            pos += 1
        if self.podl_len:               # no pod lists: podl may be NULL (memcpy's UB)
            memcpy(o + pos, self.podl, self.podl_len)
        pos += self.podl_len
        # The names and tables are no longer needed: give them back before the pool copy's
        # peak is reached by the caller.
        # The blobs, in the order first used; without the GIL (the API watchers and the
        # supervisor's loop run meanwhile).
        with nogil:
            copy_placed(o + pos, self.pool, self.ipool, self.bref, self.placed, self.nplaced)
        if ap_len:
            pos = core_end
            while pos < ap_off:
                o[pos] = 0
                pos += 1
            memcpy(o + ap_off, <const char *>autopath, ap_len)
        crc = zlib.crc32(memoryview(out)[HEADER_SIZE:])
        memcpy(o + HEADER_MAGIC, magic, 8)
        put32le(o + HEADER_LENGTH, total)
        put32le(o + HEADER_FLAGS, FLAG_SYNCED if synced else 0)
        put32le(o + HEADER_NODES_OFF, nodes_off)
        put32le(o + HEADER_NNODES, self.nnodes)
        put32le(o + HEADER_ZONES_OFF, zones_off)
        put32le(o + HEADER_NZONES, self.nzones)
        put32le(o + HEADER_REV_OFF, rev_off)
        put32le(o + HEADER_NREV, self.nrev)
        put32le(o + HEADER_SERVFAIL, self.servfail_blob + blobs_off)
        put32le(o + HEADER_AUTOPATH, <uint32_t>ap_off)
        put32le(o + HEADER_SERIAL, serial & 0xFFFFFFFF)
        put32le(o + HEADER_SERIAL + 4, serial >> 32)
        put32le(o + HEADER_CRC, crc)
        if self.persistent:
            if self.lean:
                self.release_compile()
            else:
                self.rrf_len = self.lpool_len = self.podl_len = self.nverified = 0
                self.rrsets = []
                self.pods = {}
            self.warm = True
            self.done_epoch = self.cepoch
            self.done_total, self.done_blobs_off = total, blobs_off
        else:
            self.release()
        return out

    def rebase(self, image):
        """Read the blobs of the image just compiled from ``image`` from now on, and free
        the store's copy of them: a persistent core otherwise holds every answer twice, in
        its store and in the published image (about 25 MB at 10,000 services and 100,000
        endpoints). ``image``: a read-only buffer holding that image, unchanged for as long
        as this core uses it (a sealed memfd's mapping), which this keeps. Blobs still
        referenced but not in that image stay in the store; blobs nothing references are
        dropped. Returns the bytes the store gave back. A buffer that is not that compile's
        image (size, or any blob's bytes) raises ValueError and changes nothing."""
        cdef const uint8_t[::1] view = image
        cdef const uint8_t *base
        cdef uint8_t *fresh = NULL
        cdef size_t k, n, keep = 0, pos = 0, before = self.pool_len
        self.check()
        if (not self.persistent or self.done_epoch != self.cepoch or self.done_total == 0
                or <size_t>view.shape[0] != self.done_total or self.placed_len >= IN_IMAGE):
            raise ValueError("rebase: not the image of this core's last compile")
        base = &view[0] + self.done_blobs_off
        # The image must hold our very blobs: the first and the last one placed are compared
        # (all of them would cost a read of the whole pool per compile; the caller hands
        # over the sealed image it has just had written, of the very size).
        for k in (0, self.nplaced - 1) if self.nplaced else ():
            n = self.bref[2 * self.placed[k] + 1]
            if memcmp(base + self.bplace[self.placed[k]], self.blob(self.placed[k]), n):
                raise ValueError("rebase: the image's blobs are not this core's")
        for k in range(self.nblobs):
            n = self.bref[2 * k + 1]
            if n and self.bepoch[k] != self.cepoch and self.bcnt[k]:
                keep += n
        if keep:
            fresh = <uint8_t *>malloc(keep)
            if fresh == NULL:
                raise MemoryError()
        for k in range(self.nblobs):
            n = self.bref[2 * k + 1]
            if n == 0:
                continue
            if self.bepoch[k] == self.cepoch:        # placed: the image has it
                self.bref[2 * k] = self.bplace[k] | IN_IMAGE
            elif self.bcnt[k]:                       # referenced, not in this image
                memcpy(fresh + pos, self.blob(k), n)
                self.bref[2 * k] = pos
                pos += n
            else:
                # Garbage: gone. Its slot in the hash stays, matching nothing (length 0),
                # until the next rehash leaves it out.
                self.dead_bytes -= n
                self.bref[2 * k] = 0
                self.bref[2 * k + 1] = 0
        free(self.pool)
        self.pool = fresh
        self.pool_len = self.pool_cap = keep
        self.ipool = base
        self.ipool_owner = view               # the old image's buffer is let go here
        return before - keep
