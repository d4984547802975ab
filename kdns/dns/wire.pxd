# DNS wire facts for C: what both extensions share, the packet path
# (kdns/packet/_fastpath.pyx) and the compiler core (kdns/zone/_compile.pyx). Declarations
# only (enum constants and inline functions), so cimporting it links nothing into either.
# The numbers restate kdns/dns/wire.py name for name; tests/test_layout.py holds them equal.
from libc.stdint cimport uint8_t


cdef enum:
    # Type codes (RFC 1035 §3.2.2, RFC 3596, RFC 2782, RFC 6891, RFC 1995/5936).
    T_A = 1
    T_NS = 2
    T_CNAME = 5
    T_SOA = 6
    T_PTR = 12
    T_HINFO = 13
    T_MX = 15
    T_TXT = 16
    T_AAAA = 28
    T_SRV = 33
    T_OPT = 41
    T_IXFR = 251
    T_AXFR = 252
    T_ANY = 255
    CLASS_IN = 1
    CLASS_ANY = 255                       # QCLASS "*" (RFC 6895 §3.2)
    MAX_POINTER = 0x3FFF                  # RFC 1035 §4.1.4: 14-bit offsets
    SERVFAIL = 2                          # RFC 1035 §4.1.1 RCODE


# ASCII-only case folding (RFC 4343 §3): bytes 0x41-0x5A and nothing else.
cdef inline uint8_t ascii_lower(uint8_t c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


# One hexadecimal digit of a reverse IPv6 name (RFC 3596 §2.5), lower case only: the
# canonical spelling; -1 for anything else.
cdef inline int hex_nibble(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    return -1
