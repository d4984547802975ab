# The forwarder's answer cache: one store per worker that both packet paths read and fill.
# Included by _fastpath.pyx, so it shares its cimports and helpers.
#
# One PacketCache per worker: a fixed open-addressing table allocated once. ``UdpServer``
# answers the packets the image hands off from it with the GIL released; the compiled
# forwarder (fwd.pxi) stores the replies it relays; the Python Forwarder (TCP clients,
# retries, stub domains) reads and fills the same entries through ``lookup`` and ``put``
# (kdns/forward/cache.py CompiledCache). All of them run on the worker's one thread
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
    # The largest upstream reply kept: the IPv6 minimum MTU less the IPv6 and UDP headers
    # (RFC 8200 §5), the size advertised upstream by default (settings.EDNS_UDP_SIZE).
    # A bigger reply (an operator advertising more) is relayed but not cached.
    PC_WIREMAX = 1280 - 40 - 8
    PC_PROBE = 8                 # linear-probe window
    PC_DUE = 64                  # prefetches queued for Python per drain (more wait a hit)
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
    uint8_t denial               # NXDOMAIN, NODATA or SERVFAIL: CoreDNS's "denial" cache
    uint8_t refreshing           # queued for a prefetch, until the refreshed entry lands
    uint32_t hits                # CoreDNS cache freq: hits with no gap of a prefetch duration
    int64_t last_hit_ns
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


cdef struct PCTable:
    PCEntry *tab
    uint64_t mask
    # Where inserts, evictions and the entry count go: the worker's counter page once
    # bound (PacketCache.count_into), else ``own``. Indices into ``ctr``.
    uint64_t *ctr
    int w_inserts
    int w_evictions
    int w_entries
    int w_entries_denial         # the share of w_entries (and of w_evictions) that is denial
    int w_evictions_denial
    uint64_t own[5]
    uint64_t used                # slots holding an entry (fresh or expired)
    uint64_t used_denial
    # CoreDNS cache ``prefetch AMOUNT DURATION PERCENTAGE%`` (amount 0: off): an entry hit
    # AMOUNT times with no gap of DURATION whose remaining TTL is at most PERCENTAGE of its
    # lifetime is queued in ``due`` (slot indices) for Python to refresh upstream.
    uint32_t pf_amount
    uint32_t pf_percent
    int64_t pf_duration_ns
    uint32_t due[PC_DUE]
    int ndue


cdef PCEntry *pc_find(PCEntry *tab, uint64_t mask, const uint8_t *key, int klen,
                      uint64_t h) noexcept nogil:
    cdef int i
    cdef PCEntry *e
    for i in range(PC_PROBE):
        e = &tab[(h + i) & mask]
        if e.hash == h and e.keylen == klen and memcmp(e.key, key, klen) == 0:
            return e
    return NULL


cdef bint pc_hit(PCTable *t, PCEntry *e, int64_t now) noexcept nogil:
    """Count a hit of a fresh entry (CoreDNS freq.Update: a hit after a gap of DURATION or
    more starts the count again at 1) and queue its prefetch when due (CoreDNS
    shouldPrefetch: hits >= AMOUNT and the remaining whole seconds <= ceil(PERCENTAGE% of
    the lifetime)); True when it was queued."""
    cdef int64_t left
    cdef uint64_t threshold
    if t.pf_amount == 0:
        return False
    if e.hits == 0 or e.last_hit_ns < now - t.pf_duration_ns:
        e.hits = 1
    elif e.hits < <uint32_t>0xFFFFFFFF:
        e.hits += 1
    e.last_hit_ns = now
    if e.refreshing or e.hits < t.pf_amount or t.ndue >= PC_DUE:
        return False
    left = (<int64_t>e.ttl * 1000000000 - (now - e.stored_ns)) // 1000000000
    threshold = (<uint64_t>t.pf_percent * e.ttl + 99) // 100
    if left > <int64_t>threshold:
        return False
    e.refreshing = 1
    t.due[t.ndue] = <uint32_t>(e - t.tab)
    t.ndue += 1
    return True


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


cdef int cache_answer(PCTable *t, int edns_size, const uint8_t *q,
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
    e = pc_find(t.tab, t.mask, key, klen, h)
    if e == NULL or now >= e.expires_ns or e.qend != a.qend:
        return ACTION_HANDOFF
    pc_hit(t, e, now)
    res.qtype = a.qtype
    res.cache_denial = e.denial
    return pc_render(e, &a, now, edns_size, out, res)


cdef void pc_store(PCTable *t, const uint8_t *key, int klen,
                   const uint8_t *wire, int wirelen, int qend, const uint16_t *offs,
                   const uint32_t *ttls, int nrr, uint32_t ttl, int64_t stored_ns,
                   int64_t now) noexcept nogil:
    """Store one entry (the caller checked the sizes against PC_KEYMAX/WIREMAX/MAXRR)."""
    cdef int i, j
    cdef uint64_t h = pc_hash(key, klen)
    cdef PCEntry *e
    cdef PCEntry *victim = NULL
    cdef PCEntry *oldest = NULL
    cdef bint same = False
    for i in range(PC_PROBE):
        e = &t.tab[(h + i) & t.mask]
        if e.hash == h and e.keylen == klen and memcmp(e.key, key, klen) == 0:
            victim = e
            same = True
            break
        if victim == NULL and (e.hash == 0 or now >= e.expires_ns):
            victim = e
        if oldest == NULL or e.stored_ns < oldest.stored_ns:
            oldest = e
    if victim == NULL:
        # Window full of live entries: evict the one stored longest ago (FIFO within the
        # window: a hit does not move an entry, so the packet path writes nothing on a hit).
        victim = oldest
        t.ctr[t.w_evictions] += 1
        t.ctr[t.w_evictions_denial] += victim.denial
    e = victim
    if e.hash == 0:
        t.used += 1
        t.ctr[t.w_entries] += 1
    elif e.denial:
        t.used_denial -= 1              # the slot's old entry leaves the denial share
        t.ctr[t.w_entries_denial] -= 1
    # CoreDNS's cache types: "success" for NOERROR with an answer, "denial" for the rest
    # (NXDOMAIN and NODATA per RFC 2308, and cached SERVFAIL per RFC 9520).
    e.denial = not ((wire[3] & 0xF) == 0 and be16(wire + 6) > 0)
    if e.denial:
        t.used_denial += 1
        t.ctr[t.w_entries_denial] += 1
    t.ctr[t.w_inserts] += 1
    if not same:
        e.hits = 0                      # a new name starts unpopular
    # A refreshed entry keeps its popularity (CoreDNS resets the freq with its hits).
    e.refreshing = 0
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
    """A worker's forwarder cache (see the top of this file).

    ``put(key, wire, qend, ttl_offs, ttls, ttl, stored)`` copies one kdns.forward.cache.Entry in
    (key = name wire + qtype + qclass + DO + CD bytes, ``stored`` in time.monotonic()
    seconds); an entry too big for a slot is refused (False). ``lookup(key)`` gives an
    entry back, fresh or expired, as ``(wire, qend, ttl_offs, ttls, ttl, stored)``, or
    None. ``count_into`` moves its insert/eviction/entry counts onto the worker's page."""
    cdef PCTable t
    cdef object counters                # the Counters whose page ``t.ctr`` points into
    cdef readonly int capacity
    cdef readonly int edns_size

    def __cinit__(self, int capacity, int edns_size):
        if capacity < 8 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 8, got {capacity}")
        # Zeroed pages from the kernel: a slot costs memory only once an entry lands in it.
        self.t.tab = <PCEntry *>PyMem_Calloc(capacity, sizeof(PCEntry))
        if self.t.tab == NULL:
            raise MemoryError()
        self.t.mask = capacity - 1
        self.t.ctr = self.t.own
        self.t.w_inserts, self.t.w_evictions, self.t.w_entries = 0, 1, 2
        self.t.w_entries_denial, self.t.w_evictions_denial = 3, 4
        self.capacity = capacity
        self.edns_size = edns_size

    def __dealloc__(self):
        PyMem_Free(self.t.tab)

    def count_into(self, page, int inserts, int evictions, int entries,
                   int entries_denial, int evictions_denial):
        """Count inserts and evictions into words ``inserts``/``evictions`` of the counter
        ``page`` (adding to what is there: a replacement worker continues its predecessor's
        totals) and keep word ``entries`` equal to the entries held; the denial entries'
        shares of both go to ``entries_denial``/``evictions_denial``."""
        cdef Counters c = Counters(page)
        cdef int w
        for w in (inserts, evictions, entries, entries_denial, evictions_denial):
            if not 0 <= w < SLOT_WORDS:
                raise IndexError("counter word outside the page")
        self.counters = c
        self.t.ctr = c.words
        self.t.w_inserts, self.t.w_evictions, self.t.w_entries = inserts, evictions, entries
        self.t.w_entries_denial, self.t.w_evictions_denial = entries_denial, evictions_denial
        self.t.ctr[entries] = self.t.used
        self.t.ctr[entries_denial] = self.t.used_denial

    @property
    def inserts(self):
        return self.t.ctr[self.t.w_inserts]

    @property
    def evictions(self):
        return self.t.ctr[self.t.w_evictions]

    def __len__(self):
        return self.t.used

    def clear(self):
        # Empty = hash 0. Only occupied slots are written: pages no entry ever used stay
        # the kernel's shared zero page.
        cdef uint64_t i
        for i in range(self.t.mask + 1):
            if self.t.tab[i].hash:
                self.t.tab[i].hash = 0
        self.t.used = 0
        self.t.used_denial = 0
        self.t.ctr[self.t.w_entries] = 0
        self.t.ctr[self.t.w_entries_denial] = 0

    def put(self, bytes key not None, bytes wire not None, int qend, ttl_offs, ttls,
            uint32_t ttl, double stored):
        cdef int klen = len(key), nrr = len(ttl_offs), j
        cdef uint16_t offs[PC_MAXRR]
        cdef uint32_t tt[PC_MAXRR]
        if (klen > PC_KEYMAX or len(wire) > PC_WIREMAX or nrr > PC_MAXRR or qend < 16
                or len(wire) < qend or len(ttls) != nrr):
            return False
        for j in range(nrr):
            offs[j] = ttl_offs[j]
            tt[j] = ttls[j]
        pc_store(&self.t, <const uint8_t *><const char *>key, klen,
                 <const uint8_t *><const char *>wire, len(wire), qend, offs, tt, nrr, ttl,
                 <int64_t>(stored * 1e9), now_ns())
        return True

    def lookup(self, bytes key not None):
        """The entry under ``key``, fresh or expired (the caller decides), or None."""
        cdef int klen = len(key), j
        cdef const PCEntry *e
        if klen > PC_KEYMAX:
            return None
        e = pc_find(self.t.tab, self.t.mask, <const uint8_t *><const char *>key, klen,
                    pc_hash(<const uint8_t *><const char *>key, klen))
        if e == NULL:
            return None
        return (PyBytes_FromStringAndSize(<const char *>e.wire, e.wirelen), e.qend,
                tuple([e.ttl_off[j] for j in range(e.nrr)]),
                tuple([e.ttls[j] for j in range(e.nrr)]), e.ttl, e.stored_ns / 1e9)

    def set_prefetch(self, unsigned int amount, double duration, unsigned int percent):
        """CoreDNS ``prefetch AMOUNT DURATION PERCENTAGE%`` for the hits served here
        (amount 0: off)."""
        self.t.pf_amount = amount
        self.t.pf_duration_ns = <int64_t>(duration * 1e9)
        self.t.pf_percent = percent
        if amount == 0:
            self.t.ndue = 0

    @property
    def due_count(self):
        return self.t.ndue

    def take_due(self):
        """The keys of the entries whose prefetch is due (each once), emptying the queue."""
        cdef int i
        cdef const PCEntry *e
        out = []
        for i in range(self.t.ndue):
            e = &self.t.tab[self.t.due[i]]
            if e.hash and e.refreshing:
                out.append(PyBytes_FromStringAndSize(<const char *>e.key, e.keylen))
        self.t.ndue = 0
        return out

    def hit(self, bytes key not None, double now):
        """A hit served from Python (``now`` in time.monotonic() seconds): counted as the
        packet path counts its own; True when it queued the entry's prefetch."""
        cdef int klen = len(key)
        cdef PCEntry *e
        cdef int64_t t = <int64_t>(now * 1e9)
        if klen > PC_KEYMAX:
            return False
        e = pc_find(self.t.tab, self.t.mask, <const uint8_t *><const char *>key, klen,
                    pc_hash(<const uint8_t *><const char *>key, klen))
        if e == NULL or t >= e.expires_ns:
            return False
        return pc_hit(&self.t, e, t)

    def unmark(self, bytes key not None):
        """A prefetch that could not be made: the entry may be queued again."""
        cdef int klen = len(key)
        cdef PCEntry *e
        if klen > PC_KEYMAX:
            return
        e = pc_find(self.t.tab, self.t.mask, <const uint8_t *><const char *>key, klen,
                    pc_hash(<const uint8_t *><const char *>key, klen))
        if e != NULL:
            e.refreshing = 0

    def answer(self, bytes query not None):
        """(action, reply) for one UDP query, as UdpServer would; for tests."""
        cdef Outcome res
        cdef uint8_t out[UDP_BUF]
        cdef int action
        if len(query) < 12:
            return ACTION_HANDOFF, b""
        res.tc = 0
        action = cache_answer(&self.t, self.edns_size,
                              <const uint8_t *><const char *>query, len(query),
                              now_ns(), out, &res)
        if action != ACTION_SEND:
            return action, b""
        return action, PyBytes_FromStringAndSize(<char *>out, res.length)
