"""DNS wire facts: type and class codes, header flags, rcodes, size limits.

The one place these numbers are written down; every other module imports them by name.
"""

# Type codes kdns answers, forwards or refuses (RFC 1035 §3.2.2, RFC 3596, RFC 2782,
# RFC 6891, RFC 1995/5936 for the zone transfers).
T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_HINFO, T_MX, T_TXT = 1, 2, 5, 6, 12, 13, 15, 16
T_AAAA, T_SRV, T_OPT = 28, 33, 41
T_IXFR, T_AXFR, T_ANY = 251, 252, 255
# Classes (RFC 1035 §3.2.4, RFC 6895 §3.2): IN, CHAOS, Hesiod, and the QCLASS "*" (ANY).
CLASS_IN, CLASS_CH, CLASS_HS, CLASS_ANY = 1, 3, 4, 255
# RFC 8482 §4.2: the RRset synthesised for QTYPE=ANY, HINFO with CPU "RFC8482" and an empty
# OS string, as its RDATA (two character-strings).
RFC8482_HINFO = b"\x07RFC8482\x00"

# Header flag bits in the second 16-bit word (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD and CD).
QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010

# RCODEs (RFC 1035 §4.1.1, RFC 2136 §2.2, RFC 6891 §9 for the extended BADVERS = 16).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
# The names CoreDNS uses for rcode labels, indexed by rcode (16 = BADVERS).
RCODE_NAMES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN",
               "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13",
               "RCODE14", "RCODE15", "BADVERS")

HEADER_LEN = 12          # RFC 1035 §4.1.1
EDNS_MIN = 512           # RFC 6891 §6.2.5: a UDP payload size below 512 is treated as 512
MAX_LABEL = 63           # RFC 1035 §2.3.4
MAX_NAME = 255           # RFC 1035 §2.3.4, wire length including the root byte
MAX_POINTER = 0x3FFF     # RFC 1035 §4.1.4: 14-bit offsets
UDP_PLAIN = 512          # RFC 1035 §4.2.1: the UDP message limit without EDNS
TCP_MAX = 65535          # RFC 7766 §8: what a two-byte length prefix can frame
