# The compiled forwarder (cache misses without an asyncio task and a socket per try). Included by _fastpath.pyx, so it shares its cimports and helpers.
#
# One FwdEngine per worker, owning a pool of non-blocking UDP sockets on kernel-chosen
# ephemeral ports (Python opens them and rotates one every sweep, RFC 5452 §9.2), all in one
# epoll set that the worker's event loop watches. The plain case runs here:
#
#   UdpServer.serve: image miss, cache miss, name outside every zone and not under a stub
#   domain -> fw_submit: new pending entry keyed by (socket, ID), ID from getrandom()
#   (RFC 5452 §4.3), query rewritten (our ID, RD, the client's CD/DO, our OPT) and queued;
#   fw_flush sends the batch's queries, one sendmmsg per socket.
#
#   FwdEngine.drain (epoll readable): recvmmsg every ready socket; a reply is accepted only
#   if (socket, ID) is pending, the source address and port are that upstream's and the
#   question matches case-insensitively (RFC 5452 §3); anything else is dropped and counted.
#   Then the reply is relayed to every client waiting on it (coalesced identical questions)
#   exactly like forward.Forwarder._from_upstream + fit: the client's ID and question case,
#   RD copied, the upstream OPT replaced by ours, cut to the client's UDP size with TC.
#   Cacheable replies go straight into the worker's PacketCache with cache.Cache.put's
#   rules (fw_cache_store): the one cache the Python Forwarder reads too, so a TCP client
#   asking the same name next is answered from it.
#
#   UdpServer.pump waits on the client socket and the upstream sockets together (this
#   epoll set) without the GIL, so a forward and its reply cost no event-loop iteration;
#   it returns to Python within a 2 ms budget or as soon as Python has work.
#
# Everything unusual goes back to Python's Forwarder (the reference behaviour) as a
# "handback" with the reason and the upstream tried: a per-try timeout (found by the
# periodic sweep), TC (Python retries over TCP), SERVFAIL/REFUSED or a malformed reply
# (Python fails over, serves stale, relays). Python keeps the overall deadline from the
# moment C sent the first try. All memory is allocated once, in __cinit__.
#
# Dead upstreams: an upstream whose try timed out (the sweep) or drew an ICMP unreachable
# is marked down, and a well-formed reply from it marks it live again; the Forwarder's
# verdicts on its own tries arrive through set_down. A new query goes to a live upstream
# (random, or the first in order for ``sequential``) while there is one, so a blackholed
# upstream costs one try timeout per worker, not one in every n queries; with every
# upstream down the pick is as if none were (one may be back). Each worker's engine learns
# on its own; Python's health checks (handoff.CompiledForward) bring a down one back.

cdef enum:
    FW_QMAX = 512                # client queries longer than this stay in Python
    FW_MAXUP = 16
    FW_MAXSOCK = 256
    FW_MAXSTUB = 64
    FW_MAXREC = 96               # records relayed from C; more: Python
    FW_RAND = 4096               # CSPRNG bytes fetched per refill
    FW_SENDQ = 1024              # upstream queries queued per serve() call
    FW_RX = 64                   # replies per recvmmsg
    FW_TX = 64                   # client replies per sendmmsg
    FW_EVENTS = 64
    FW_CLIENT = 0xFFFF           # epoll tag of the worker's client socket (UdpServer.pump)

    FE_FREE = 0
    FE_LEADER = 1                # owns the upstream query (in idtab)
    FE_FOLLOWER = 2              # a coalesced client of a leader
    FE_HANDBACK = 3              # waiting for Python to take it

    HB_TIMEOUT = 1
    HB_TC = 2
    HB_BAD = 3                   # SERVFAIL / REFUSED / malformed / too big for C
    HB_RECONFIG = 4
    HB_UNREACHABLE = 5           # ICMP destination unreachable for the upstream (IP_RECVERR)

    F_RCODE_SERVFAIL = 2

    FW_RANDOM = 0                # pick policies (set_routes): a random live upstream
    FW_SEQUENTIAL = 1            # the first live upstream in the order given


cdef struct FwEntry:
    int64_t sent_ns
    uint64_t khash
    int32_t next                 # next follower of a leader, or next free entry
    int32_t state
    int32_t reason
    uint16_t id
    uint16_t sock
    uint16_t up
    uint16_t qlen
    uint16_t qend
    uint16_t klen
    socklen_t alen
    sockaddr_storage addr
    uint8_t key[PC_KEYMAX]
    uint8_t q[FW_QMAX]


cdef struct FwUp:
    sockaddr_in addr
    uint64_t queries
    uint64_t replies
    uint64_t forged
    uint64_t timeouts
    # Marked down: its last try failed (a timeout or an ICMP unreachable) and it has not
    # answered since. The pick skips it while any upstream is live (the Forwarder's rule:
    # the others first); set by C on its own tries and by Python (set_down) on Python's.
    int down
    # This upstream's row of the worker's counter page (the metrics' numbers, counted where
    # they happen; the Python Forwarder counts its tries into the same row): words of
    # FwState.ctr, placed by set_counters/set_routes.
    int row
    uint64_t *requests
    uint64_t *failures
    uint64_t *rcodes             # nrcodes words, the last one for every other rcode
    uint64_t *lat                # NLAT buckets
    uint64_t *lat_sum


cdef struct FwState:
    int client_fd
    int client_watched           # the client socket is in the epoll set (pump started)
    int epfd
    int nsock
    int nup
    int nlive                    # upstreams not marked down, in live[] in route order
    int policy                   # FW_RANDOM or FW_SEQUENTIAL
    int nstub
    int edns_size
    int cap                      # pool entries (the in-flight bound's share of C)
    int used                     # entries not free (leaders, followers, handbacks)
    int leaders
    int64_t try_ns
    int32_t free_head
    # Pool entries ever handed out: those from here on were never used (FE_FREE, pages the
    # kernel has not even given yet), so the pool costs memory only for what a burst of
    # queries in flight reached, and scans stop here.
    int32_t fresh
    uint32_t idmask
    uint32_t kmask
    int rpos
    int nq
    int ntx
    int nhb
    uint64_t forged              # replies matching no pending query (no upstream known)
    uint64_t sent_fail
    uint64_t coalesced
    uint64_t relayed
    uint64_t taken               # queries C took (each a miss of the worker's cache)
    uint64_t *ctr                # the worker's counter page (set_counters), else scratch
    int w_misses                 # its cache-miss word
    int w_all_down               # queries that found every upstream marked down
    int r_requests               # offsets inside an upstream row (counters.ROW_*)
    int r_failures
    int r_rcodes
    int nrcodes
    int r_latency
    int r_latency_sum
    uint64_t scratch[SLOT_WORDS]
    uint64_t cached              # replies stored straight into the PacketCache
    PCTable *ct                  # the worker's PacketCache (set_cache), or NULL
    uint32_t min_ttl
    uint32_t max_ttl
    uint32_t max_neg_ttl
    uint64_t cache_skipped       # cacheable replies too big for a cache slot
    int socks[FW_MAXSOCK]
    int sockpend[FW_MAXSOCK]
    FwUp ups[FW_MAXUP]
    int live[FW_MAXUP]
    uint8_t stublen[FW_MAXSTUB]
    uint8_t stubs[FW_MAXSTUB][256]
    uint8_t rnd[FW_RAND]
    FwEntry *pool
    int32_t *idtab
    int32_t *ktab
    int32_t *hb
    # upstream sends
    mmsghdr *qmsg
    iovec *qiov
    uint8_t *qbuf
    int *qsock
    # upstream receives
    mmsghdr rmsg[FW_RX]
    iovec riov[FW_RX]
    sockaddr_storage raddr[FW_RX]
    uint8_t *rbuf
    # client sends
    mmsghdr tmsg[FW_TX]
    iovec tiov[FW_TX]
    sockaddr_storage taddr[FW_TX]
    uint8_t *tbuf


cdef void fw_place_row(FwState *s, int i, int row) noexcept nogil:
    """Point upstream ``i``'s counters at its page row (-1: at scratch, uncounted)."""
    cdef uint64_t *r = s.ctr + row if row >= 0 else s.scratch
    s.ups[i].row = row
    s.ups[i].requests = r + s.r_requests
    s.ups[i].failures = r + s.r_failures
    s.ups[i].rcodes = r + s.r_rcodes
    s.ups[i].lat = r + s.r_latency
    s.ups[i].lat_sum = r + s.r_latency_sum


cdef inline uint32_t fw_rand16(FwState *s) noexcept nogil:
    if s.rpos + 2 > FW_RAND:
        getrandom(s.rnd, FW_RAND, 0)
        s.rpos = 0
    s.rpos += 2
    return be16(s.rnd + s.rpos - 2)


cdef void fw_mark(FwState *s, int up, int down) noexcept nogil:
    """Mark upstream ``up`` down (1) or live (0); live[] follows (at most FW_MAXUP, and
    only when the mark changes, so never per packet in the steady state)."""
    cdef int i
    if up < 0 or up >= s.nup or s.ups[up].down == down:
        return
    s.ups[up].down = down
    s.nlive = 0
    for i in range(s.nup):
        if not s.ups[i].down:
            s.live[s.nlive] = i
            s.nlive += 1


cdef inline uint16_t fw_pick(FwState *s) noexcept nogil:
    """The upstream a new query goes to: by the policy, among the live ones; when every
    one is marked down, among all of them (one may be back, and Python fails over)."""
    if s.nlive > 0:
        if s.policy == FW_SEQUENTIAL:
            return <uint16_t>s.live[0]
        return <uint16_t>s.live[fw_rand16(s) % <uint32_t>s.nlive]
    s.ctr[s.w_all_down] += 1            # CoreDNS forward's "healthcheck broken"
    if s.policy == FW_SEQUENTIAL:
        return 0
    return <uint16_t>(fw_rand16(s) % <uint32_t>s.nup)


cdef inline uint32_t fw_slot(FwState *s, unsigned int sock, unsigned int qid) noexcept nogil:
    cdef uint32_t x = ((<uint32_t>sock << 16) | qid) * 2654435761u
    return (x >> 8) & s.idmask


cdef int32_t fw_alloc(FwState *s) noexcept nogil:
    cdef int32_t i = s.free_head
    if i >= 0:
        s.free_head = s.pool[i].next
    elif s.fresh < s.cap:
        i = s.fresh
        s.fresh += 1
    else:
        return -1
    s.pool[i].next = -1
    s.used += 1
    return i


cdef void fw_free(FwState *s, int32_t i) noexcept nogil:
    s.pool[i].state = FE_FREE
    s.pool[i].next = s.free_head
    s.free_head = i
    s.used -= 1


cdef bint fw_python_name(FwState *s, const Ask *a) noexcept nogil:
    """Names Python keeps: under a stub domain (its own servers), the loop probe zone."""
    cdef int i, k, n, nl = a.qend - 16
    cdef const uint8_t *last
    if a.nlabels:
        last = a.name + a.loff[a.nlabels - 1]
        if last[0] == 15 and memcmp(last + 1, b"kdns-loop-probe", 15) == 0:
            return True
    for i in range(s.nstub):
        n = s.stublen[i]
        if n > nl:
            continue
        # A suffix at a label boundary: compare from each label start that leaves n bytes.
        for k in range(a.nlabels):
            if nl - a.loff[k] == n:
                if memcmp(a.name + a.loff[k], s.stubs[i], n) == 0:
                    return True
                break
    return False


cdef int fw_submit(FwState *s, const uint8_t *q, Py_ssize_t qlen, const sockaddr_storage *addr,
                   socklen_t alen, int64_t now) noexcept nogil:
    """Take a handed-off UDP query (1) or leave it to Python (0)."""
    cdef int took = fw_take(s, q, qlen, addr, alen, now)
    s.taken += took
    s.ctr[s.w_misses] += took
    return took


cdef int fw_take(FwState *s, const uint8_t *q, Py_ssize_t qlen, const sockaddr_storage *addr,
                 socklen_t alen, int64_t now) noexcept nogil:
    cdef Ask a
    cdef uint8_t key[PC_KEYMAX]
    cdef int klen, k, qend
    cdef int32_t e, lead
    cdef uint64_t h
    cdef uint32_t slot = 0, sock = 0, qid = 0, r
    cdef FwEntry *p
    cdef uint8_t *m
    if s.nup == 0 or qlen > FW_QMAX or s.nq >= FW_SENDQ or s.used >= s.cap:
        return 0
    if addr.ss_family != AF_INET and addr.ss_family != AF_INET6:
        return 0
    klen = pc_prepare(q, qlen, s.edns_size, &a, key)
    if klen < 0 or a.flags & 0x7800 or a.qclass != CLASS_IN:
        return 0
    if a.qtype == T_AXFR or a.qtype == T_IXFR or fw_python_name(s, &a):
        return 0
    h = pc_hash(key, klen)
    e = fw_alloc(s)
    if e < 0:
        return 0
    p = &s.pool[e]
    p.khash = h
    p.klen = klen
    memcpy(p.key, key, klen)
    p.qlen = <uint16_t>qlen
    p.qend = a.qend
    memcpy(p.q, q, qlen)
    memcpy(&p.addr, addr, alen)
    p.alen = alen
    p.sent_ns = now
    p.reason = 0
    lead = s.ktab[h & s.kmask]
    if lead >= 0 and s.pool[lead].state == FE_LEADER and s.pool[lead].khash == h and \
            s.pool[lead].klen == klen and memcmp(s.pool[lead].key, key, klen) == 0:
        # The same question is in flight: wait for its reply (coalescing).
        p.state = FE_FOLLOWER
        p.next = s.pool[lead].next
        s.pool[lead].next = e
        s.coalesced += 1
        return 1
    for k in range(16):
        qid = fw_rand16(s)
        r = fw_rand16(s)
        sock = r % <uint32_t>s.nsock
        slot = fw_slot(s, sock, qid)
        if s.idtab[slot] < 0:
            break
    if s.idtab[slot] >= 0:
        fw_free(s, e)
        return 0
    p.state = FE_LEADER
    p.id = qid
    p.sock = sock
    p.up = fw_pick(s)
    s.idtab[slot] = e
    s.ktab[h & s.kmask] = e
    s.leaders += 1
    s.sockpend[sock] += 1
    s.ups[p.up].queries += 1
    s.ups[p.up].requests[0] += 1
    # The upstream query, as Forwarder._query: our ID, RD plus the client's CD, the client's
    # question bytes, our OPT (RFC 6891 §6.2.5) with the client's DO.
    qend = a.qend
    m = s.qbuf + s.nq * (FW_QMAX + OPT_LEN)
    put16(m, qid)
    put16(m + 2, F_RD | (a.flags & F_CD))
    put16(m + 4, 1)
    put16(m + 6, 0)
    put16(m + 8, 0)
    put16(m + 10, 1)
    memcpy(m + 12, q + 12, qend - 12)
    m[qend] = 0
    put16(m + qend + 1, T_OPT)
    put16(m + qend + 3, s.edns_size)
    put32(m + qend + 5, 0x8000 if a.edns_do else 0)
    put16(m + qend + 9, 0)
    s.qiov[s.nq].iov_base = m
    s.qiov[s.nq].iov_len = qend + OPT_LEN
    # fw_flush reorders the headers by socket: point this one back at its own iovec.
    s.qmsg[s.nq].msg_hdr.msg_iov = &s.qiov[s.nq]
    s.qmsg[s.nq].msg_hdr.msg_iovlen = 1
    s.qmsg[s.nq].msg_hdr.msg_name = &s.ups[p.up].addr
    s.qmsg[s.nq].msg_hdr.msg_namelen = sizeof(sockaddr_in)
    s.qsock[s.nq] = sock
    s.nq += 1
    return 1


cdef void fw_flush(FwState *s) noexcept nogil:
    """Send the queued upstream queries: one sendmmsg per socket (sockets are few)."""
    cdef int i = 0, j, k, r, n
    cdef mmsghdr tmp
    cdef int t
    # Group by socket in place (stable enough: order between sockets does not matter).
    while i < s.nq:
        j = i + 1
        for k in range(i + 1, s.nq):
            if s.qsock[k] == s.qsock[i]:
                if k != j:
                    tmp = s.qmsg[k]
                    s.qmsg[k] = s.qmsg[j]
                    s.qmsg[j] = tmp
                    t = s.qsock[k]
                    s.qsock[k] = s.qsock[j]
                    s.qsock[j] = t
                j += 1
        n = i
        while n < j:
            r = sendmmsg(s.socks[s.qsock[i]], s.qmsg + n, j - n, MSG_DONTWAIT)
            if r > 0:
                n += r
            elif r < 0 and errno == EINTR:
                continue
            else:
                # Lost: the entry times out and Python retries it.
                s.sent_fail += j - n
                break
        i = j
    s.nq = 0


cdef bint fw_rdata_names_ok(const uint8_t *m, int n, unsigned int rtype, Py_ssize_t start,
                            Py_ssize_t end) noexcept nogil:
    """cache.check_rdata_names: the names in this RDATA are valid and end with it."""
    cdef Py_ssize_t off
    if rtype == T_SOA:
        off = skip_name(m, n, start)
        if off < 0:
            return False
        off = skip_name(m, n, off)
        return off >= 0 and off + 20 == end
    if rtype == T_NS or rtype == T_CNAME or rtype == T_PTR:
        off = skip_name(m, n, start)
    elif rtype == T_MX:
        off = skip_name(m, n, start + 2)
    elif rtype == T_SRV:
        off = skip_name(m, n, start + 6)
    else:
        return True
    return off == end


cdef int fw_scan(const uint8_t *m, int n, int qend, int *ends, int *types,
                 int *ttloff, int *opt) noexcept nogil:
    """Record ends/types/TTL offsets of a reply; the number of records, or -1."""
    cdef unsigned int an = be16(m + 6), ns = be16(m + 8), ar = be16(m + 10), i
    cdef Py_ssize_t off = qend, start
    opt[0] = -1
    if an + ns + ar > FW_MAXREC:
        return -1
    for i in range(an + ns + ar):
        start = off
        off = skip_name(m, n, off)
        if off < 0 or off + 10 > n:
            return -1
        types[i] = be16(m + off)
        ttloff[i] = <int>off + 4
        start = off + 10
        off += 10 + be16(m + off + 8)
        if off > n:
            return -1
        # Every name a relayed or cached reply carries is checked (cache.scan's rules);
        # RFC 6891 §6.1.1: OPT only in the additional section.
        if types[i] == T_OPT and i < an + ns:
            return -1
        if not fw_rdata_names_ok(m, n, types[i], start, off):
            return -1
        ends[i] = <int>off
        if types[i] == T_OPT and opt[0] < 0:
            opt[0] = i
    return <int>(an + ns + ar)


cdef int fw_render(const uint8_t *m, int n, int qend, int nrec, const int *ends,
                   int opt, unsigned int ext, const FwEntry *c, int edns_size,
                   uint8_t *out) noexcept nogil:
    """forward.Forwarder._from_upstream + fit for one client: the reply's length in out."""
    cdef unsigned int an = be16(m + 6), ns = be16(m + 8), flags, cflags = be16(c.q + 2)
    cdef int kept = nrec, wlen = n, k = 0, room, limit, cut, edns = 0, do_bit = 0
    cdef unsigned int kan, kns, kar
    cdef Ask a
    cdef uint8_t key[PC_KEYMAX]
    # The client's EDNS terms (its query parsed before, so this cannot fail).
    pc_prepare(c.q, c.qlen, edns_size, &a, key)
    edns = a.edns
    do_bit = a.edns_do
    limit = a.limit
    if opt >= 0:
        kept = opt
        wlen = ends[opt - 1] if opt else qend
    kan = an if <unsigned int>kept > an else kept
    kns = (kept - an if <unsigned int>kept - an < ns else ns) if <unsigned int>kept > an else 0
    kar = kept - kan - kns
    memcpy(out, m, wlen)
    memcpy(out, c.q, 2)
    flags = (be16(m + 2) & ~F_RD) | (cflags & F_RD)
    memcpy(out + 12, c.q + 12, qend - 12)
    put16(out + 6, kan)
    put16(out + 8, kns)
    room = limit - (OPT_LEN if edns else 0)
    if wlen <= room:
        put16(out + 10, kar + (1 if edns else 0))
        cut = wlen
    else:
        while k < kept and ends[k] <= room:
            k += 1
        if <unsigned int>k < kan + kns:
            flags |= F_TC
        put16(out + 6, kan if <unsigned int>k > kan else k)
        put16(out + 8, 0 if <unsigned int>k <= kan else (kns if <unsigned int>k - kan > kns else k - kan))
        put16(out + 10, ((k - kan - kns) if <unsigned int>k > kan + kns else 0) + (1 if edns else 0))
        cut = ends[k - 1] if k else qend
    put16(out + 2, flags)
    if edns:
        out[cut] = 0
        put16(out + cut + 1, T_OPT)
        put16(out + cut + 3, edns_size)
        out[cut + 5] = ext
        out[cut + 6] = 0
        put16(out + cut + 7, 0x8000 if do_bit else 0)
        put16(out + cut + 9, 0)
        cut += OPT_LEN
    return cut


cdef void fw_tx_flush(FwState *s) noexcept nogil:
    cdef int sent = 0, r
    while sent < s.ntx:
        r = sendmmsg(s.client_fd, s.tmsg + sent, s.ntx - sent, MSG_DONTWAIT)
        if r > 0:
            sent += r
        elif r < 0 and errno == EINTR:
            continue
        else:
            s.sent_fail += s.ntx - sent
            break
    s.ntx = 0


cdef void fw_count_sent(uint64_t *ctr, const uint8_t *r, int n) noexcept nogil:
    # engine.count_reply's counting, for a reply sent from here.
    cdef int rcode = r[3] & 0xF
    cdef int rs = C_RESP_SIZE + PROTO_UDP * (NSIZE + 1)
    ctr[C_RCODE + PROTO_UDP * NRCODES + rcode] += 1
    if rcode == RC_FORMERR:
        ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_FORMERR] += 1
    if r[2] & 0x02:
        ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_TRUNCATED] += 1
    elif rcode == 0 and be16(r + 6) == 0:
        ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_NODATA] += 1     # RFC 2308 §2.2
    ctr[rs + size_bucket(n)] += 1
    ctr[rs + NSIZE] += <uint64_t>n


cdef void fw_unlink(FwState *s, int32_t e) noexcept nogil:
    """A leader leaves the (socket, ID) and question tables."""
    cdef FwEntry *p = &s.pool[e]
    cdef uint32_t slot = fw_slot(s, p.sock, p.id)
    if s.idtab[slot] == e:
        s.idtab[slot] = -1
    if s.ktab[p.khash & s.kmask] == e:
        s.ktab[p.khash & s.kmask] = -1
    s.sockpend[p.sock] -= 1
    s.leaders -= 1


cdef void fw_handback(FwState *s, int32_t e, int reason) noexcept nogil:
    """A leader and its followers go back to Python (they are already unlinked)."""
    cdef int32_t nxt
    while e >= 0:
        nxt = s.pool[e].next
        s.pool[e].state = FE_HANDBACK
        s.pool[e].reason = reason
        s.pool[e].next = -1
        s.hb[s.nhb] = e
        s.nhb += 1
        e = nxt


cdef bint fw_source_ok(const FwUp *u, const sockaddr_storage *src) noexcept nogil:
    cdef const sockaddr_in *a = <const sockaddr_in *>src
    return (src.ss_family == AF_INET and a.sin_port == u.addr.sin_port and
            a.sin_addr.s_addr == u.addr.sin_addr.s_addr)


cdef void fw_reply(FwState *s, int sock, const uint8_t *m, int n, const sockaddr_storage *src,
                   uint64_t *ctr, int64_t now) noexcept nogil:
    cdef int32_t e, c, nxt
    cdef FwEntry *p
    cdef FwUp *u
    cdef uint32_t slot
    cdef int i, nl, qend, nrec, opt, rcode, len_out
    cdef unsigned int flags, ext = 0
    cdef int ends[FW_MAXREC]
    cdef int types[FW_MAXREC]
    cdef int ttloff[FW_MAXREC]
    cdef int64_t took
    if n < 12:
        s.forged += 1
        return
    slot = fw_slot(s, sock, be16(m))
    e = s.idtab[slot]
    if e < 0 or s.pool[e].sock != sock or s.pool[e].id != be16(m):
        s.forged += 1                   # no query of ours has this (socket, ID)
        return
    p = &s.pool[e]
    u = &s.ups[p.up]
    qend = p.qend
    nl = qend - 16
    flags = be16(m + 2)
    # RFC 5452 §3: source address and port, QR, one question, the same name (any case),
    # type and class. Anything else is someone else's packet or forged.
    if not fw_source_ok(u, src) or not flags & F_QR or be16(m + 4) != 1 or n < qend:
        u.forged += 1
        return
    for i in range(nl):
        if ascii_lower(m[12 + i]) != p.key[i]:
            u.forged += 1
            return
    if memcmp(m + qend - 4, p.key + nl, 4) != 0:
        u.forged += 1
        return
    fw_unlink(s, e)
    u.replies += 1
    took = now - p.sent_ns
    u.lat[latency_bucket(took)] += 1
    u.lat_sum[0] += <uint64_t>took
    rcode = flags & 0xF
    u.rcodes[rcode if rcode < s.nrcodes - 1 else s.nrcodes - 1] += 1
    nrec = fw_scan(m, n, qend, ends, types, ttloff, &opt)
    if nrec >= 0:
        # It answers (any rcode, as the Forwarder's UpstreamStats.answered): live again.
        fw_mark(s, p.up, 0)
    if nrec < 0 or rcode == F_RCODE_SERVFAIL or rcode == RC_REFUSED:
        fw_handback(s, e, HB_BAD)
        return
    if flags & F_TC:
        fw_handback(s, e, HB_TC)       # RFC 7766 §5: Python asks again over TCP
        return
    if opt >= 0:
        ext = (be32(m + ttloff[opt]) >> 24) & 0xFF
    if s.ct != NULL:
        fw_cache_store(s, m, n, qend, nrec, ends, types, ttloff, opt, ext, p, now)
    c = e
    while c >= 0:
        nxt = s.pool[c].next
        if s.ntx == FW_TX:
            fw_tx_flush(s)
        len_out = fw_render(m, n, qend, nrec, ends, opt, ext, &s.pool[c], s.edns_size,
                            s.tbuf + s.ntx * UDP_BUF)
        s.tiov[s.ntx].iov_len = len_out
        memcpy(s.tmsg[s.ntx].msg_hdr.msg_name, &s.pool[c].addr, s.pool[c].alen)
        s.tmsg[s.ntx].msg_hdr.msg_namelen = s.pool[c].alen
        fw_count_sent(ctr, s.tbuf + s.ntx * UDP_BUF, len_out)
        # The client's request duration: from when its query arrived to this relay. The
        # key ends in qtype, qclass, DO and CD (pc_prepare).
        count_latency(ctr, PROTO_UDP, 1, now - s.pool[c].sent_ns)
        count_type_latency(ctr, be16(s.pool[c].key + s.pool[c].klen - 6),
                           now - s.pool[c].sent_ns)
        s.ntx += 1
        s.relayed += 1
        fw_free(s, c)
        c = nxt


cdef void fw_cache_store(FwState *s, const uint8_t *m, int n, int qend, int nrec,
                         const int *ends, const int *types, const int *ttloff, int opt,
                         unsigned int ext, const FwEntry *p, int64_t now) noexcept nogil:
    """cache.Cache.put's rules and stored form, straight into the PacketCache: lifetime
    from the RR TTLs (positive) or the authority SOA (RFC 2308 §5, negative), clamped; the
    OPT and what follows it dropped; ID 0; question name lowercased."""
    cdef unsigned int an = be16(m + 6), ns = be16(m + 8), rcode = be16(m + 2) & 0xF
    cdef int kept = opt if opt >= 0 else nrec, i, wlen
    cdef int64_t life = -1, t
    cdef unsigned int kan, kns
    cdef uint8_t buf[PC_WIREMAX]
    cdef uint16_t offs[PC_MAXRR]
    cdef uint32_t ttls[PC_MAXRR]
    if ext or (rcode != 0 and rcode != RC_NXDOMAIN):
        return
    if rcode == 0 and an:
        for i in range(nrec):
            if types[i] != T_OPT:
                t = be32(m + ttloff[i])
                if life < 0 or t < life:
                    life = t
        life = life if life < s.max_ttl else s.max_ttl
        life = life if life > s.min_ttl else s.min_ttl
    else:
        for i in range(an, an + ns if an + ns < <unsigned int>nrec else nrec):
            if types[i] == 6 and ends[i] - 4 >= ttloff[i] + 6:
                life = be32(m + ttloff[i])
                t = be32(m + ends[i] - 4)
                life = life if life < t else t
                break
        if life < 0:
            return                      # no SOA, no negative caching
        life = life if life < s.max_neg_ttl else s.max_neg_ttl
        life = life if life > s.min_ttl else s.min_ttl
    wlen = ends[kept - 1] if kept else qend
    if wlen > PC_WIREMAX or kept > PC_MAXRR or p.klen > PC_KEYMAX:
        s.cache_skipped += 1
        return
    memcpy(buf, m, wlen)
    put16(buf, 0)
    kan = an if <unsigned int>kept > an else kept
    kns = (kept - an if <unsigned int>kept - an < ns else ns) if <unsigned int>kept > an else 0
    put16(buf + 6, kan)
    put16(buf + 8, kns)
    put16(buf + 10, kept - kan - kns)
    for i in range(12, qend - 4):
        buf[i] = ascii_lower(buf[i])
    for i in range(kept):
        offs[i] = ttloff[i]
        ttls[i] = be32(m + ttloff[i])
    pc_store(s.ct, p.key, p.klen, buf, wlen, qend, offs, ttls, kept,
             <uint32_t>life, now, now)
    s.cached += 1


cdef void fw_drain_sock(FwState *s, int sock, uint64_t *ctr, int64_t now) noexcept nogil:
    """Every reply waiting on upstream socket ``sock`` (client sends are queued)."""
    cdef int j, r, fd = s.socks[sock]
    while True:
        for j in range(FW_RX):
            s.rmsg[j].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            s.rmsg[j].msg_hdr.msg_flags = 0
        r = recvmmsg(fd, s.rmsg, FW_RX, MSG_DONTWAIT, NULL)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == ECONNREFUSED or errno == EHOSTUNREACH or errno == ENETUNREACH:
                fw_unreachable(s, sock)
                continue            # replies may wait behind the error
            return                  # EAGAIN
        for j in range(r):
            if s.rmsg[j].msg_hdr.msg_flags & MSG_TRUNC:
                s.forged += 1
                continue
            fw_reply(s, sock, s.rbuf + j * UDP_BUF, s.rmsg[j].msg_len, &s.raddr[j], ctr, now)
        if r < FW_RX:
            return


cdef void fw_unreachable(FwState *s, int sock) noexcept nogil:
    """ICMP destination unreachable on upstream socket ``sock`` (RFC 1122 §4.1.3.3; the
    socket has IP_RECVERR): each queued error names the address the failed datagram went
    to; the queries waiting on that upstream on this socket go back to Python at once
    (HB_UNREACHABLE) instead of waiting out their try."""
    cdef msghdr mh
    cdef iovec iov
    cdef sockaddr_storage dest
    cdef uint8_t junk[64], ctl[256]
    cdef int32_t i
    cdef FwUp *u
    while True:
        memset(&mh, 0, sizeof(mh))
        iov.iov_base = junk
        iov.iov_len = sizeof(junk)
        mh.msg_name = &dest
        mh.msg_namelen = sizeof(dest)
        mh.msg_iov = &iov
        mh.msg_iovlen = 1
        mh.msg_control = ctl
        mh.msg_controllen = sizeof(ctl)
        if recvmsg(s.socks[sock], &mh, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
            if errno == EINTR:
                continue
            return
        for i in range(s.fresh):
            if s.pool[i].state == FE_LEADER and s.pool[i].sock == sock:
                u = &s.ups[s.pool[i].up]
                if fw_source_ok(u, &dest):
                    u.failures[0] += 1
                    fw_mark(s, s.pool[i].up, 1)
                    fw_unlink(s, i)
                    fw_handback(s, i, HB_UNREACHABLE)


cdef int fw_drain(FwState *s, uint64_t *ctr) noexcept nogil:
    cdef epoll_event evs[FW_EVENTS]
    cdef int nev, i
    cdef int64_t now
    nev = epoll_wait(s.epfd, evs, FW_EVENTS, 0)
    if nev <= 0:
        return 0
    now = now_ns()
    for i in range(nev):
        if <int>evs[i].data.u32 < s.nsock:
            fw_drain_sock(s, evs[i].data.u32, ctr, now)
    fw_tx_flush(s)
    return nev


cdef class FwdEngine:
    """A worker's compiled forwarder (see the top of this file).

    ``FwdEngine(client_fd, sock_fds, capacity, try_timeout, edns_size)``:
    ``client_fd`` is the worker's UDP socket (replies leave from it), ``sock_fds`` the
    upstream sockets (Python's; non-blocking, bound). ``set_routes(upstreams, stubs)``:
    IPv4 (host, port) pairs and stub-domain wire names that stay in Python. ``fileno()``
    is the epoll fd to watch; ``drain(counters)`` relays replies; ``sweep()`` hands timed
    out queries back. ``handbacks()`` gives Python its share after either."""
    cdef FwState *s
    cdef readonly int capacity
    cdef object cache                   # the PacketCache C stores into, or None
    cdef object counters                # the Counters whose page s.ctr points into

    def __cinit__(self, int client_fd, sock_fds, int capacity, double try_timeout,
                  int edns_size):
        cdef int i, n = len(sock_fds), tsize = 1, ksize = 1
        cdef epoll_event ev
        cdef FwState *s
        if not 1 <= n <= FW_MAXSOCK:
            raise ValueError(f"between 1 and {FW_MAXSOCK} upstream sockets, got {n}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        while tsize < capacity * 8:
            tsize <<= 1
        while ksize < capacity * 2:
            ksize <<= 1
        self.capacity = capacity
        self.s = <FwState *>PyMem_Malloc(sizeof(FwState))
        if self.s == NULL:
            raise MemoryError()
        memset(self.s, 0, sizeof(FwState))
        s = self.s
        s.epfd = -1
        s.cap = capacity                # also what __dealloc__ unmaps
        # Zeroed pages mapped lazily (FE_FREE is 0): 1000 entries are ~1 MiB, and a worker
        # at everyday load has a few in flight (fw_alloc hands out entries from the start).
        s.pool = <FwEntry *>mmap(NULL, <size_t>capacity * sizeof(FwEntry),
                                 PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if s.pool == <FwEntry *>MAP_FAILED:
            s.pool = NULL
        s.idtab = <int32_t *>PyMem_Malloc(tsize * sizeof(int32_t))
        s.ktab = <int32_t *>PyMem_Malloc(ksize * sizeof(int32_t))
        s.hb = <int32_t *>PyMem_Malloc(capacity * sizeof(int32_t))
        s.qmsg = <mmsghdr *>PyMem_Malloc(FW_SENDQ * sizeof(mmsghdr))
        s.qiov = <iovec *>PyMem_Malloc(FW_SENDQ * sizeof(iovec))
        s.qbuf = <uint8_t *>PyMem_Malloc(FW_SENDQ * (FW_QMAX + OPT_LEN))
        s.qsock = <int *>PyMem_Malloc(FW_SENDQ * sizeof(int))
        s.rbuf = <uint8_t *>PyMem_Malloc(FW_RX * UDP_BUF)
        s.tbuf = <uint8_t *>PyMem_Malloc(FW_TX * UDP_BUF)
        if not (s.pool and s.idtab and s.ktab and s.hb and s.qmsg and s.qiov and s.qbuf and
                s.qsock and s.rbuf and s.tbuf):
            raise MemoryError()
        s.free_head = -1
        s.fresh = 0
        memset(s.idtab, 0xFF, tsize * sizeof(int32_t))
        memset(s.ktab, 0xFF, ksize * sizeof(int32_t))
        s.idmask = tsize - 1
        s.kmask = ksize - 1
        memset(s.qmsg, 0, FW_SENDQ * sizeof(mmsghdr))
        for i in range(FW_SENDQ):
            s.qmsg[i].msg_hdr.msg_iov = &s.qiov[i]
            s.qmsg[i].msg_hdr.msg_iovlen = 1
        for i in range(FW_RX):
            s.riov[i].iov_base = s.rbuf + i * UDP_BUF
            s.riov[i].iov_len = UDP_BUF
            s.rmsg[i].msg_hdr.msg_iov = &s.riov[i]
            s.rmsg[i].msg_hdr.msg_iovlen = 1
            s.rmsg[i].msg_hdr.msg_name = &s.raddr[i]
        for i in range(FW_TX):
            s.tiov[i].iov_base = s.tbuf + i * UDP_BUF
            s.tmsg[i].msg_hdr.msg_name = &s.taddr[i]
            s.tmsg[i].msg_hdr.msg_iov = &s.tiov[i]
            s.tmsg[i].msg_hdr.msg_iovlen = 1
        s.client_fd = client_fd
        s.edns_size = edns_size
        # Until set_counters: count into scratch, at the page's shape.
        s.ctr = s.scratch
        s.nrcodes = 16
        s.r_latency = 16
        s.r_latency_sum = 16 + NLAT
        for i in range(FW_MAXUP):
            fw_place_row(s, i, -1)
        s.try_ns = <int64_t>(try_timeout * 1e9)
        s.rpos = FW_RAND
        s.epfd = epoll_create1(EPOLL_CLOEXEC)
        if s.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        s.nsock = n
        for i in range(n):
            s.socks[i] = sock_fds[i]
            ev.events = EPOLLIN
            ev.data.u32 = i
            if epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.socks[i], &ev) < 0:
                raise OSError(errno, "epoll_ctl failed")

    def __dealloc__(self):
        cdef FwState *s = self.s
        if s == NULL:
            return
        if s.epfd >= 0:
            close(s.epfd)
        if s.pool != NULL:
            munmap(s.pool, <size_t>s.cap * sizeof(FwEntry))
        PyMem_Free(s.idtab)
        PyMem_Free(s.ktab)
        PyMem_Free(s.hb)
        PyMem_Free(s.qmsg)
        PyMem_Free(s.qiov)
        PyMem_Free(s.qbuf)
        PyMem_Free(s.qsock)
        PyMem_Free(s.rbuf)
        PyMem_Free(s.tbuf)
        PyMem_Free(s)

    def fileno(self):
        return self.s.epfd

    def set_cache(self, PacketCache cache, uint32_t min_ttl=5, uint32_t max_ttl=3600,
                  uint32_t max_neg_ttl=1800):
        """Store cacheable replies straight into ``cache`` with cache.Cache's rules and
        limits (None: relay without caching)."""
        self.cache = cache
        self.s.ct = &cache.t if cache is not None else NULL
        self.s.min_ttl, self.s.max_ttl, self.s.max_neg_ttl = min_ttl, max_ttl, max_neg_ttl

    def set_counters(self, page, int misses, int all_down, int requests, int failures,
                     int rcodes, int nrcodes, int latency, int latency_sum):
        """Count into the worker's counter ``page``: cache misses (the queries C takes) at
        word ``misses``, queries that found every upstream down at word ``all_down``, and
        per upstream, at these offsets from its row (set_routes):
        requests, failures (timeouts), ``nrcodes`` rcode words (the last for every other
        rcode), NLAT latency buckets and their sum in ns."""
        cdef Counters c = Counters(page)
        cdef int i, end = max(requests, failures, rcodes + nrcodes, latency + NLAT,
                              latency_sum + 1)
        if not (0 <= misses < SLOT_WORDS and 0 <= all_down < SLOT_WORDS and 1 <= nrcodes <= 16 and
                min(requests, failures, rcodes, latency, latency_sum) >= 0 and end <= 64):
            raise ValueError("counter words outside the page")
        self.counters = c
        self.s.ctr = c.words
        self.s.w_misses = misses
        self.s.w_all_down = all_down
        self.s.r_requests, self.s.r_failures, self.s.r_rcodes = requests, failures, rcodes
        self.s.nrcodes, self.s.r_latency, self.s.r_latency_sum = nrcodes, latency, latency_sum
        for i in range(FW_MAXUP):
            fw_place_row(self.s, i, self.s.ups[i].row)

    def set_routes(self, upstreams, stubs=(), rows=None, bint sequential=False):
        """IPv4 (host, port) upstreams C may use (empty: everything goes to Python), the
        stub domains' wire names (lowercase) whose names stay in Python, and the first word
        of each upstream's counter row (None: uncounted). ``sequential``: a query goes to
        the first live upstream in this order, else to a random live one. Every upstream
        starts live (set_down marks them). Queries in flight are handed back (Python
        finishes them on the new routes)."""
        cdef int i, row
        cdef sockaddr_in *a
        import socket as _socket
        rows = list(rows) if rows is not None else [-1] * len(upstreams)
        if len(upstreams) > FW_MAXUP or len(stubs) > FW_MAXSTUB or len(rows) != len(upstreams):
            self.s.nup = 0
            return False
        for row in rows:
            if not -1 <= row <= SLOT_WORDS - 64:
                raise ValueError(f"counter row {row} outside the page")
        self.reset(HB_RECONFIG)
        memset(self.s.ups, 0, sizeof(self.s.ups))
        for i in range(FW_MAXUP):
            fw_place_row(self.s, i, rows[i] if i < len(rows) else -1)
        for i, (host, port) in enumerate(upstreams):
            a = &self.s.ups[i].addr
            a.sin_family = AF_INET
            a.sin_port = ntohs(port)
            a.sin_addr.s_addr = int.from_bytes(_socket.inet_aton(host), "little")
        for i, wire in enumerate(stubs):
            if len(wire) > 255:
                self.s.nup = 0
                return False
            self.s.stublen[i] = len(wire)                # with the root label, as Ask.name
            memcpy(self.s.stubs[i], <const char *>wire, len(wire))
        self.s.nstub = len(stubs)
        self.s.nup = len(upstreams)
        self.s.nlive = len(upstreams)
        for i in range(self.s.nup):
            self.s.live[i] = i
        self.s.policy = FW_SEQUENTIAL if sequential else FW_RANDOM
        return True

    def set_down(self, int i, bint down):
        """Mark upstream ``i`` down (the Forwarder saw its try fail) or live (it answered):
        new queries skip a down upstream while another is live. C marks its own tries'
        outcomes itself (a timeout, an ICMP unreachable, a reply)."""
        if not 0 <= i < self.s.nup:
            raise IndexError(i)
        fw_mark(self.s, i, 1 if down else 0)

    def down(self):
        """Which upstreams are marked down, in route order."""
        return [bool(self.s.ups[i].down) for i in range(self.s.nup)]

    def reset(self, int reason=HB_RECONFIG):
        """Hand every query in flight back to Python."""
        cdef int i
        for i in range(self.s.fresh):
            if self.s.pool[i].state == FE_LEADER:
                fw_unlink(self.s, i)
                fw_handback(self.s, i, reason)

    def drain(self, Counters c not None):
        """Relay the upstream replies waiting on the sockets; returns the handbacks waiting."""
        cdef uint64_t *ctr = c.words
        with nogil:
            fw_drain(self.s, ctr)
        return self.s.nhb

    def sweep(self, double now=-1.0):
        """Hand back leaders whose try timed out (and their followers); the count."""
        cdef int i
        cdef int64_t t = now_ns() if now < 0 else <int64_t>(now * 1e9)
        cdef int before = self.s.nhb
        for i in range(self.s.fresh):
            if self.s.pool[i].state == FE_LEADER and t - self.s.pool[i].sent_ns >= self.s.try_ns:
                self.s.ups[self.s.pool[i].up].timeouts += 1
                self.s.ups[self.s.pool[i].up].failures[0] += 1
                fw_mark(self.s, self.s.pool[i].up, 1)
                fw_unlink(self.s, i)
                fw_handback(self.s, i, HB_TIMEOUT)
        return self.s.nhb - before

    def handbacks(self):
        """[(query, addr, reason, upstream index, sent monotonic seconds)], then released."""
        cdef int i
        cdef FwEntry *p
        out = []
        for i in range(self.s.nhb):
            p = &self.s.pool[self.s.hb[i]]
            out.append((PyBytes_FromStringAndSize(<char *>p.q, p.qlen), sockaddr_tuple(&p.addr),
                        p.reason, p.up, p.sent_ns / 1e9))
            fw_free(self.s, self.s.hb[i])
        self.s.nhb = 0
        return out

    def sock_pending(self, int i):
        return self.s.sockpend[i]

    def replace_socket(self, int i, int fd):
        """Swap upstream socket ``i`` for ``fd`` (port rotation) when nothing waits on it."""
        cdef epoll_event ev
        if not 0 <= i < self.s.nsock:
            raise IndexError(i)
        if self.s.sockpend[i]:
            return False
        epoll_ctl(self.s.epfd, EPOLL_CTL_DEL, self.s.socks[i], &ev)
        self.s.socks[i] = fd
        ev.events = EPOLLIN
        ev.data.u32 = i
        if epoll_ctl(self.s.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl failed")
        return True

    @property
    def inflight(self):
        """Entries in use (leaders, coalesced clients, handbacks not yet taken)."""
        return self.s.used

    def stats(self):
        cdef int i, k
        cdef FwUp *u
        ups = []
        for i in range(self.s.nup):
            u = &self.s.ups[i]
            ups.append(dict(queries=u.queries, replies=u.replies, forged=u.forged,
                            timeouts=u.timeouts, down=bool(u.down)))
        return dict(forged=self.s.forged, send_failed=self.s.sent_fail,
                    coalesced=self.s.coalesced, relayed=self.s.relayed, taken=self.s.taken,
                    cached=self.s.cached,
                    cache_skipped=self.s.cache_skipped, upstreams=ups)


cdef object sockaddr_tuple(const sockaddr_storage *ss):
    cdef char text[INET6_ADDRSTRLEN + 1]
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    if ss.ss_family == AF_INET:
        a4 = <const sockaddr_in *>ss
        inet_ntop(AF_INET, &a4.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(a4.sin_port))
    a6 = <const sockaddr_in6 *>ss
    inet_ntop(AF_INET6, &a6.sin6_addr, text, sizeof(text))
    return (text.decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
            a6.sin6_scope_id)
