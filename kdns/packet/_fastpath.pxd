# Declarations of the compiled packet path: the image layout and counter layout as C
# constants, the structs the per-packet functions share, and the bounds-checked cursor
# (asyncpg frb.pxd idea). Bodies live in _fastpath.pyx. The image layout comes from
# kdns/zone/layout.pxd; the counter numbers here restate kdns/packet/counters.py, and the
# tests hold them to it (counter_layout() == counters.LAYOUT).
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# The image layout (kdns/zone/layout.py's names and numbers) and its little-endian readers,
# shared with the compiler core.
from kdns.zone.layout cimport (BLOB_AN, BLOB_HDR, BLOB_LEN, BLOB_NFIX, BLOB_NSEG, BLOB_ROT_AT,
                               BLOB_ROT_N, BLOBHDR_SIZE, ROT_SLOTS, rot_slot,
                               AP_COUNT, AP_NSEARCH, AP_SEARCH_OFF, AP_SIZE, APENT_IP,
                               APENT_NS, APENT_SIZE, HEADER_AUTOPATH,
                               FLAG_SYNCED, HEADER_CRC, HEADER_FLAGS, HEADER_LENGTH,
                               HEADER_MAGIC, HEADER_NNODES, HEADER_NODES_OFF, HEADER_NREV,
                               HEADER_NZONES, HEADER_REV_OFF, HEADER_SERIAL, HEADER_SERVFAIL,
                               HEADER_SIZE, HEADER_ZONES_OFF, HDR_HANDOFF, NODE_EXTRA,
                               NODE_FIRST_CHILD, NODE_FLAGS, NODE_LABEL_OFF, NODE_NCHILD,
                               NODE_NRR, NODE_POD_NS, NODE_POD_VERIFIED, NODE_RR_OFF, NODE_SIZE,
                               NODE_ZONE_APEX, REV_FAMILY, REV_IP, REV_NRR, REV_RR_OFF, REV_SIZE,
                               REV_ZONE, RRENT_BLOB, RRENT_QTYPE, RRENT_SIZE, SEG_AN, SEG_AR,
                               SEG_END, SEG_NS, SEG_SIZE, SEG_TC, ZONE_APEX_NODE,
                               ZONE_ALIAS, ZONE_APEX_WIRE_LEN, ZONE_HOSTS, ZONE_HOSTS_FINAL,
                               ZONE_KIND,
                               ZONE_NEG_BLOB, ZONE_REVERSE,
                               ZONE_SIZE, ZONE_TTL, le16, le32)


# Type codes, case folding and hex digits: kdns/dns/wire.pxd, shared with the compiler core.
from kdns.dns.wire cimport (CLASS_ANY, CLASS_IN, T_A, T_AAAA, T_ANY, T_AXFR, T_CNAME, T_HINFO,
                            T_IXFR, T_MX, T_NS, T_OPT, T_PTR, T_SOA, T_SRV, ascii_lower,
                            hex_nibble)


# ---------------------------------------------------------------- DNS constants (RFC 1035)
cdef enum:
    ACTION_DROP = 0
    ACTION_SEND = 1
    ACTION_HANDOFF = 2

    F_QR = 0x8000
    F_AA = 0x0400
    F_TC = 0x0200
    F_RD = 0x0100
    F_RA = 0x0080
    F_CD = 0x0010
    F_ECHO = 0x7800 | 0x0100 | 0x0010     # opcode, RD, CD are copied into the reply

    RC_FORMERR = 1
    RC_NXDOMAIN = 3
    RC_NOTIMP = 4
    RC_REFUSED = 5
    RC_BADVERS = 16                       # RFC 6891 §6.1.3, counted as 16


    EDNS_MIN = 512                        # RFC 6891 §6.2.5
    UDP_PLAIN = 512                       # RFC 1035 §4.2.1
    TCP_MAX = 65535
    OPT_LEN = 11
    MAX_LABELS = 128                      # 255-byte names have at most 127 labels
    DNS_HEADER = 12                       # RFC 1035 §4.1.1
    MAX_LABEL = 63                        # RFC 1035 §2.3.4
    MAX_NAME = 255                        # RFC 1035 §2.3.4, wire length with the root byte
    MAX_HOPS = 127                        # kdns.dns.names.MAX_HOPS: one pointer per label at most

    # The largest reply: the TCP limit, or an empty answer whose echoed question
    # (at most 12 + 255 + 4 bytes) plus OPT already passes a tiny limit.
    OUT_MAX = 65536 + 512
    UDP_BUF = 4096                        # per-slot reply buffers; edns_max is capped here
    # A query slot holds the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6):
    # RFC 6891 options may make a query far larger than any reply we send, and recvmmsg
    # cuts a datagram longer than its buffer (MSG_TRUNC), losing it. The slots are mapped,
    # not written, so only the pages a large datagram touches become resident.
    UDP_SLOT = 65536
    HANDOFF_CAP = 256
    WAIT_EVENTS = 64                # UdpServer.wait: the event loop's fds per epoll_wait

# ---------------------------------------------------------------- counter layout (counters.py)
cdef enum:
    SLOT_WORDS = 1024
    NQTYPES = 15                          # counters.QTYPES, "other" last
    NRCODES = 17
    NSIZE = 15                            # len(SIZE_BOUNDS) + the +Inf bucket
    NLAT = 17                             # len(LATENCY_BOUNDS) + the +Inf bucket
    NEVENTS = 11
    PROTO_UDP = 0
    PROTO_TCP = 1

    C_IMAGE_GENERATION = 0
    C_QUERIES = 1                         # + proto * NQTYPES + qtype index
    C_RCODE = C_QUERIES + 2 * NQTYPES     # + proto * NRCODES + rcode
    C_REQ_SIZE = C_RCODE + 2 * NRCODES    # + proto * (NSIZE + 1) + bucket; sum at + NSIZE
    C_RESP_SIZE = C_REQ_SIZE + 2 * (NSIZE + 1)
    C_LATENCY = C_RESP_SIZE + 2 * (NSIZE + 1)   # + proto * (NLAT + 1) + bucket; sum_ns at + NLAT
    C_EVENTS = C_LATENCY + 2 * (NLAT + 1)       # + proto * NEVENTS + event
    C_V6QUERIES = C_EVENTS + 2 * NEVENTS        # + proto * NQTYPES + qtype index
    C_TLATENCY = C_V6QUERIES + 2 * NQTYPES      # + qtype index * (NLAT + 1) + bucket; sum_ns at + NLAT

    EV_TRUNCATED = 0
    EV_HANDOFF = 1
    EV_DROPPED = 2
    EV_FORMERR = 3
    EV_SEND_FAILED = 4
    EV_CACHE_HIT = 5
    EV_CACHE_MISS = 6
    EV_NODATA = 7
    EV_DO = 8
    EV_CACHE_HIT_DENIAL = 9
    EV_AUTOPATH = 10


# ---------------------------------------------------------------- shared structs
cdef struct ImageView:
    # The header fields the walk needs, read once when the image is mapped.
    const uint8_t *base
    Py_ssize_t length
    uint32_t flags
    uint32_t nodes_off
    uint32_t nnodes
    uint32_t zones_off
    uint32_t nzones
    uint32_t rev_off
    uint32_t nrev
    uint32_t servfail
    uint32_t autopath    # the autopath section's offset, 0 when off


cdef struct Outcome:
    # What the counters need to know about one answered packet.
    int length          # reply bytes (ACTION_SEND only)
    int qtype           # -1 when no question could be read
    int rcode           # 0..15 from the header, RC_BADVERS for BADVERS
    int tc
    int outside         # HANDOFF because the name is outside every zone
    int do_bit          # the query's EDNS DO bit (RFC 3225)
    int cache_denial    # a cache hit's entry is NXDOMAIN, NODATA or SERVFAIL
    int autopath        # answered from a later search step, behind autopath's CNAME


cdef struct Rotor:
    # Where a rotating answer takes its order from (layout.py, Rotation): ``slots`` (a
    # worker's ROT_SLOTS counters, one per hashed blob, each advanced as its answer is
    # sent), or with ``slots`` NULL the one counter ``fixed`` (0: the compiled order).
    uint32_t *slots
    uint32_t fixed


cdef struct Ask:
    # One query being answered: its question, lower-cased once, and the reply's EDNS terms.
    Rotor *rot
    const uint8_t *client   # the client's 16-byte address key (autopath), or NULL
    const uint8_t *q
    Py_ssize_t qlen
    int flags
    int qend            # offset just past the question
    int qtype
    int qclass
    int nlabels
    int limit           # reply size limit (RFC 1035 §4.2.1 / RFC 6891 §6.2.5 / TCP)
    int edns            # reply carries OPT
    int edns_size
    int edns_do
    int edns_ext        # extended rcode bits (1 = BADVERS)
    uint8_t loff[128]   # offset in ``name`` of each label's length byte, left to right
    uint8_t name[256]   # the question name in wire form, lower-cased


cdef struct Cursor:
    const uint8_t *ptr
    const uint8_t *end


# ---------------------------------------------------------------- inline readers
cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) |
            <uint32_t>p[3])


cdef inline void put16(uint8_t *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline Py_ssize_t cur_left(const Cursor *c) noexcept nogil:
    return c.end - c.ptr


cdef inline bint cur_u8(Cursor *c, unsigned int *v) noexcept nogil:
    if c.ptr >= c.end:
        return False
    v[0] = c.ptr[0]
    c.ptr += 1
    return True


cdef inline bint cur_u16(Cursor *c, unsigned int *v) noexcept nogil:
    if c.end - c.ptr < 2:
        return False
    v[0] = be16(c.ptr)
    c.ptr += 2
    return True


cdef inline bint cur_u32(Cursor *c, uint32_t *v) noexcept nogil:
    if c.end - c.ptr < 4:
        return False
    v[0] = be32(c.ptr)
    c.ptr += 4
    return True


cdef inline bint cur_skip(Cursor *c, Py_ssize_t n) noexcept nogil:
    if c.end - c.ptr < n:
        return False
    c.ptr += n
    return True


# ---------------------------------------------------------------- packet path
cdef int answer_query(const ImageView *img, const uint8_t *q, Py_ssize_t qlen, bint tcp,
                      int edns_max, uint8_t *out, int cap, Outcome *res,
                      bint ra=*, Rotor *rot=*, const uint8_t *client=*) noexcept nogil
cdef void count_packet(uint64_t *ctr, int proto, Py_ssize_t reqlen, int action,
                       const Outcome *res, const uint8_t *reply, bint v6) noexcept nogil
cdef void count_latency(uint64_t *ctr, int proto, uint64_t npackets, int64_t ns) noexcept nogil
cdef void count_type_latency(uint64_t *ctr, int qtype, int64_t ns) noexcept nogil


cdef class Image:
    cdef ImageView view
    cdef readonly object buffer          # the mapping (kdns.forward.external reads it through refpath)
    cdef const uint8_t[::1] mem


cdef class Counters:
    cdef uint64_t *words
    cdef uint8_t[::1] mem
