# The forwarder's answer cache as seen by the packet path (issue 5: cache hits without
# Python). Included by _fastpath.pyx, so it shares its cimports and helpers.
#
# One PacketCache per worker: a fixed open-addressing table allocated once. The Python
# forwarder inserts (``put``) after an upstream answered; ``UdpServer`` consults it, with the
# GIL released, for the packets the image hands off. Both run on the worker's one thread
# (serve() returns before the event loop runs anything else), so there are no locks.
#
# An entry is kdns/forward/cache.py's stored form: the upstream reply with ID 0, question name
# lowercased, OPT removed, plus the offset and original TTL of every RR. A hit is rendered
# exactly like ``Entry.render`` + ``forward.fit``: copy, patch ID and flags, echo the
# client's question bytes (DNS 0x20 case), count TTLs down, cut to the client's size with TC,
# append our OPT. The tests hold the two to the same bytes.

cdef enum:
    PC_KEYMAX = 256 + 6          # name (<= 255) + qtype + qclass + DO + CD
    PC_MAXRR = 48
    PC_WIREMAX = 1232            # what we advertise upstream (forward.EDNS_SIZE); bigger: Python
    PC_PROBE = 8                 # linear-probe window
    PC_AA = 0x0400


cdef struct PCEntry:
    uint64_t hash                # 0 = empty slot
    int64_t stored_ns            # CLOCK_MONOTONIC, the clock of time.monotonic()
    int64_t expires_ns
    uint32_t ttl                 # the entry's lifetime cap (cache.py Entry.ttl)
    uint16_t keylen
    uint16_t wirelen
    uint16_t qend
    uint16_t nrr
    uint16_t ttl_off[PC_MAXRR]
    uint32_t ttls[PC_MAXRR]
    uint8_t key[PC_KEYMAX]
    uint8_t wire[PC_WIREMAX]


cdef inline uint64_t pc_hash(const uint8_t *k, int n) noexcept nogil:
    # FNV-1a 64; never 0 (0 marks an empty slot).
    cdef uint64_t h = 14695981039346656037ULL
    cdef int i
    for i in range(n):
        h = (h ^ k[i]) * 1099511628211ULL
    return h if h else 1


cdef PCEntry *pc_find(PCEntry *tab, uint64_t mask, const uint8_t *key, int klen,
                      uint64_t h) noexcept nogil:
    cdef int i
    cdef PCEntry *e
    for i in range(PC_PROBE):
        e = &tab[(h + i) & mask]
        if e.hash == h and e.keylen == klen and memcmp(e.key, key, klen) == 0:
            return e
    return NULL


cdef int pc_render(const PCEntry *e, const Ask *a, int64_t now, int edns_size, uint8_t *out,
                   Outcome *res) noexcept nogil:
    """Entry -> reply for this client in ``out`` (at least UDP_BUF bytes); its length."""
    cdef int opt = OPT_LEN if a.edns else 0
    cdef int room = a.limit - opt
    cdef int n = e.wirelen, k = 0, cut, j
    cdef unsigned int an = be16(e.wire + 6), ns = be16(e.wire + 8), ar = be16(e.wire + 10)
    cdef unsigned int flags
    cdef int64_t age = (now - e.stored_ns) // 1000000000
    cdef int64_t left
    cdef uint32_t ttl
    memcpy(out, e.wire, n)
    memcpy(out, a.q, 2)                                  # the client's ID
    # AA cleared: an answer from memory is not authoritative (RFC 1035 §4.1.1); RD and CD
    # are the client's.
    flags = (be16(e.wire + 2) & ~(PC_AA | F_RD | F_CD)) | (a.flags & (F_RD | F_CD))
    memcpy(out + 12, a.q + 12, e.qend - 12)              # question as sent (DNS 0x20)
    for j in range(e.nrr):
        # RFC 1035 §4.1.3 / RFC 2181 §8: the remaining time, never below 0.
        ttl = e.ttls[j] if e.ttls[j] < e.ttl else e.ttl
        left = <int64_t>ttl - age
        put32(out + e.ttl_off[j], <uint32_t>(left if left > 0 else 0))
    if n > room:
        # UDP client smaller than the answer: keep whole records that fit. Dropping answer or
        # authority records sets TC; dropping additional ones does not (RFC 2181 §9).
        while k < e.nrr and e.ttl_off[k] + 6 + be16(out + e.ttl_off[k] + 4) <= room:
            k += 1
        if <unsigned int>k < an + ns:
            flags |= F_TC
            res.tc = 1
        cut = e.ttl_off[k - 1] + 6 + be16(out + e.ttl_off[k - 1] + 4) if k else e.qend
        put16(out + 6, an if <unsigned int>k > an else k)
        put16(out + 8, 0 if <unsigned int>k <= an else (ns if <unsigned int>k - an > ns else k - an))
        ar = (k - an - ns) if <unsigned int>k > an + ns else 0
        n = cut
    put16(out + 2, flags)
    put16(out + 10, ar + (1 if opt else 0))
    if opt:
        # Our OPT (RFC 6891 §6.1.2): root owner, our buffer size, version 0, DO echoed.
        out[n] = 0
        put16(out + n + 1, T_OPT)
        put16(out + n + 3, edns_size)
        put32(out + n + 5, 0x8000 if a.edns_do else 0)
        put16(out + n + 9, 0)
        n += OPT_LEN
    res.length = n
    res.rcode = flags & 0xF
    return ACTION_SEND


cdef int pc_prepare(const uint8_t *q, Py_ssize_t qlen, int edns_size, Ask *a,
                    uint8_t *key) noexcept nogil:
    """Parse a handed-off query into ``a`` (question, EDNS, the client's size limit) and
    its cache key into ``key``; the key's length, or -1 when Python must look at it.
    Shared by the cache lookup and the compiled forwarder (includes/fwd.pxi)."""
    cdef int found = 0, version = 0, do_bit = 0, nl
    cdef unsigned int opt_size = 0
    a.q = q
    a.qlen = qlen
    a.flags = be16(q + 2)
    if parse_question(a) < 0:
        return -1
    if parse_edns(a, be16(q + 6), be16(q + 8), be16(q + 10), &found, &opt_size, &version,
                  &do_bit) < 0 or version > 0:
        return -1
    a.edns = found
    a.edns_do = do_bit if found else 0
    # The client's limit as forward.Forwarder._client_limit computes it (RFC 6891 §6.2.5).
    if found:
        a.limit = <int>opt_size if <int>opt_size < edns_size else edns_size
        if a.limit < UDP_PLAIN:
            a.limit = UDP_PLAIN
    else:
        a.limit = UDP_PLAIN
    # Key: cache.py's (name, qtype, qclass, DO, CD), flattened.
    nl = a.qend - 16
    memcpy(key, a.name, nl)
    put16(key + nl, a.qtype)
    put16(key + nl + 2, a.qclass)
    key[nl + 4] = a.edns_do
    key[nl + 5] = 1 if a.flags & F_CD else 0
    return nl + 6


cdef int cache_answer(PCEntry *tab, uint64_t mask, int edns_size, const uint8_t *q,
                      Py_ssize_t qlen, int64_t now, uint8_t *out,
                      Outcome *res) noexcept nogil:
    """A packet the image handed off -> SEND from the cache, or HANDOFF on a miss.

    The packet already passed answer_query up to the hand-off, so it parses; it is parsed
    again here (cheaper than threading state through, and only misses of the image pay)."""
    cdef Ask a
    cdef int klen
    cdef uint8_t key[PC_KEYMAX]
    cdef PCEntry *e
    cdef uint64_t h
    klen = pc_prepare(q, qlen, edns_size, &a, key)
    if klen < 0:
        return ACTION_HANDOFF
    h = pc_hash(key, klen)
    e = pc_find(tab, mask, key, klen, h)
    if e == NULL or now >= e.expires_ns or e.qend != a.qend:
        return ACTION_HANDOFF
    res.qtype = a.qtype
    return pc_render(e, &a, now, edns_size, out, res)


cdef void pc_store(PCEntry *tab, uint64_t mask, const uint8_t *key, int klen,
                   const uint8_t *wire, int wirelen, int qend, const uint16_t *offs,
                   const uint32_t *ttls, int nrr, uint32_t ttl, int64_t stored_ns,
                   int64_t now) noexcept nogil:
    """Store one entry (the caller checked the sizes against PC_KEYMAX/WIREMAX/MAXRR)."""
    cdef int i, j
    cdef uint64_t h = pc_hash(key, klen)
    cdef PCEntry *e
    cdef PCEntry *victim = NULL
    cdef PCEntry *oldest = NULL
    for i in range(PC_PROBE):
        e = &tab[(h + i) & mask]
        if e.hash == h and e.keylen == klen and memcmp(e.key, key, klen) == 0:
            victim = e
            break
        if victim == NULL and (e.hash == 0 or now >= e.expires_ns):
            victim = e
        if oldest == NULL or e.stored_ns < oldest.stored_ns:
            oldest = e
    if victim == NULL:
        # Window full of live entries: evict the one stored longest ago, so a burst of
        # one-off names cannot push out the names asked again and again (they are
        # re-stored on every Python hit, see forwarding.LinkedCache).
        victim = oldest
    e = victim
    e.hash = h
    e.keylen = klen
    memcpy(e.key, key, klen)
    e.wirelen = wirelen
    memcpy(e.wire, wire, wirelen)
    e.qend = qend
    e.nrr = nrr
    for j in range(nrr):
        e.ttl_off[j] = offs[j]
        e.ttls[j] = ttls[j]
    e.ttl = ttl
    e.stored_ns = stored_ns
    e.expires_ns = stored_ns + <int64_t>ttl * 1000000000


cdef class PacketCache:
    """A worker's compiled view of the forwarder cache (see the top of this file).

    ``put(key, wire, qend, ttl_offs, ttls, ttl, stored)`` copies one kdns.forward.cache.Entry in
    (key = name wire + qtype + qclass + DO + CD bytes, ``stored`` in time.monotonic()
    seconds); entries too big for a slot are skipped (Python serves them). ``get(key)``
    is for tests."""
    cdef PCEntry *tab
    cdef uint64_t mask
    cdef readonly int capacity
    cdef readonly int edns_size
    cdef readonly uint64_t inserts
    cdef readonly uint64_t skipped

    def __cinit__(self, int capacity=4096, int edns_size=1232):
        if capacity < 8 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 8, got {capacity}")
        self.tab = <PCEntry *>PyMem_Malloc(capacity * sizeof(PCEntry))
        if self.tab == NULL:
            raise MemoryError()
        memset(self.tab, 0, capacity * sizeof(PCEntry))
        self.mask = capacity - 1
        self.capacity = capacity
        self.edns_size = edns_size

    def __dealloc__(self):
        PyMem_Free(self.tab)

    def clear(self):
        memset(self.tab, 0, (self.mask + 1) * sizeof(PCEntry))

    def put(self, bytes key not None, bytes wire not None, int qend, ttl_offs, ttls,
            uint32_t ttl, double stored):
        cdef int klen = len(key), nrr = len(ttl_offs), j
        cdef uint16_t offs[PC_MAXRR]
        cdef uint32_t tt[PC_MAXRR]
        if (klen > PC_KEYMAX or len(wire) > PC_WIREMAX or nrr > PC_MAXRR or qend < 16
                or len(wire) < qend):
            self.skipped += 1
            return False
        for j in range(nrr):
            offs[j] = ttl_offs[j]
            tt[j] = ttls[j]
        pc_store(self.tab, self.mask, <const uint8_t *><const char *>key, klen,
                 <const uint8_t *><const char *>wire, len(wire), qend, offs, tt, nrr, ttl,
                 <int64_t>(stored * 1e9), now_ns())
        self.inserts += 1
        return True

    def answer(self, bytes query not None):
        """(action, reply) for one UDP query, as UdpServer would; for tests."""
        cdef Outcome res
        cdef uint8_t out[UDP_BUF]
        cdef int action
        if len(query) < 12:
            return ACTION_HANDOFF, b""
        res.tc = 0
        action = cache_answer(self.tab, self.mask, self.edns_size,
                              <const uint8_t *><const char *>query, len(query),
                              now_ns(), out, &res)
        if action != ACTION_SEND:
            return action, b""
        return action, PyBytes_FromStringAndSize(<char *>out, res.length)
