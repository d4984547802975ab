# The zone image layout for C: what both extensions that touch images share, the packet path
# (kdns/packet/_fastpath.pyx, which reads images) and the compiler core
# (kdns/zone/_compile.pyx, which writes them). Declarations only (enum constants and inline
# functions), so cimporting it links nothing of the control plane into the worker.
from libc.stdint cimport uint8_t, uint16_t, uint32_t


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
