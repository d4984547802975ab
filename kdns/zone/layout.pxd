# The zone image layout for C: what both extensions that touch images share, the packet path
# (kdns/packet/_fastpath.pyx, which reads images) and the compiler core
# (kdns/zone/_compile.pyx, which writes them). Declarations only (enum constants and inline
# functions), so cimporting it links nothing of the control plane into the worker.
# The numbers restate kdns/zone/layout.py, the layout's one definition, name for name;
# tests/test_layout.py holds them equal.
from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef enum:
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

    NODE_LABEL_OFF = 0
    NODE_FIRST_CHILD = 4
    NODE_NCHILD = 8
    NODE_RR_OFF = 12
    NODE_NRR = 16
    NODE_FLAGS = 18
    NODE_EXTRA = 20
    NODE_SIZE = 24

    RRENT_QTYPE = 0
    RRENT_BLOB = 4
    RRENT_SIZE = 8

    ZONE_APEX_NODE = 0
    ZONE_NEG_BLOB = 4
    ZONE_TTL = 8
    ZONE_APEX_WIRE_LEN = 12
    ZONE_KIND = 14
    ZONE_SIZE = 16

    REV_FAMILY = 0
    REV_IP = 4
    REV_RR_OFF = 20
    REV_NRR = 24
    REV_ZONE = 26
    REV_SIZE = 28

    AP_COUNT = 0
    AP_NSEARCH = 4
    AP_SEARCH_OFF = 8
    AP_SIZE = 16
    APENT_IP = 0
    APENT_NS = 16
    APENT_SIZE = 20

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

    SEG_END = 0
    SEG_AN = 4
    SEG_NS = 6
    SEG_AR = 8
    SEG_TC = 10
    SEG_SIZE = 12

    FLAG_SYNCED = 1
    NODE_EXISTS = 1
    NODE_ZONE_APEX = 2
    NODE_POD_NS = 4
    NODE_POD_VERIFIED = 8
    ZONE_AUTH = 0
    ZONE_REVERSE = 1
    ZONE_HOSTS = 2
    ZONE_HOSTS_FINAL = 3
    ZONE_ALIAS = 4
    HDR_AA = 0x0400
    HDR_HANDOFF = 0x8000
    DEFAULT_QTYPE = 0
    CUT_EVERY_RR_OVER = 484
    ROT_BITS = 12
    ROT_SLOTS = 4096
    ROT_HASH = 0x045D9F3B
    QUESTION_OFFSET = 12


# Image integers are little-endian; byte-wise assembly is portable and compilers fuse it
# into one load (or store) on little-endian machines.
cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) |
            (<uint32_t>p[3] << 24))


cdef inline void put16le(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline void put32le(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint32_t rot_slot(uint32_t blob) noexcept nogil:
    # layout.py ``rot_slot``: unsigned arithmetic wraps mod 2**32.
    return (blob * <uint32_t>ROT_HASH) >> (32 - ROT_BITS)
