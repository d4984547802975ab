# cython: language_level=3
"""The compiled packet path: query bytes in, reply bytes out, from a zone image.

Why: every query a cluster makes passes through here, so the per-packet work is C with no
Python objects, no allocation, no locks and no syscalls beyond the batched ones. It is a
byte-for-byte twin of ``kdns/zone/refpath.py``, the readable oracle the tests hold it to.

What it must not do: import anything from kdns (only its own .pxd files and the image
layout's, ``kdns/zone/layout.pxd``), raise inside the per-packet functions (errors become
rcodes or actions), or allocate per packet. Everything it reads was decided by the image
compiler (``kdns/zone/image.py``; ``kdns/zone/layout.py`` defines the layout) and everything
it counts follows ``kdns/packet/counters.py``.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memmove, memset

from kdns.packet.system cimport (AF_INET, AF_INET6, CLOCK_MONOTONIC, ECONNREFUSED,
                                   EHOSTUNREACH, EINTR, ENETUNREACH,
                                   INET6_ADDRSTRLEN, KDNS_CHECK, KDNS_WOULD_BLOCK,
                                   MSG_DONTWAIT, MSG_ERRQUEUE, MSG_TRUNC, clock_gettime,
                                   clock_nanosleep, errno,
                                   inet_ntop, iovec, mmsghdr, msghdr, ntohl, ntohs, recvmmsg,
                                   recvmsg, sendmmsg,
                                   sockaddr_in, sockaddr_in6, sockaddr_storage, timespec)
from kdns.packet.system cimport (EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN,
                                   close, epoll_create1, epoll_ctl, epoll_event, epoll_wait,
                                   getrandom, socklen_t)
from kdns.packet.system cimport (MADV_DONTNEED, MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE,
                                   MAP_PRIVATE, PROT_READ, PROT_WRITE, madvise, mmap, munmap)

import zlib

cdef int _i

# counters.QTYPES as a lookup: qtype -> index, everything else "other".
cdef uint8_t QTYPE_INDEX[256]
_QTYPE_CODES = (1, 28, 33, 12, 16, 6, 2, 5, 15, 255, 252, 251, 65, 64)
_QTYPE_NAMES = ("A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "CNAME", "MX", "ANY", "AXFR",
                "IXFR", "HTTPS", "SVCB", "other")
_EVENT_NAMES = ("truncated", "handoff", "dropped", "formerr", "send_failed", "cache_hit",
                "cache_miss", "nodata", "do", "cache_hit_denial", "autopath")
assert len(_EVENT_NAMES) == NEVENTS
for _i in range(256):
    QTYPE_INDEX[_i] = NQTYPES - 1
for _i, _code in enumerate(_QTYPE_CODES):
    QTYPE_INDEX[_code] = _i

# CoreDNS response size buckets (counters.SIZE_BOUNDS); n <= bound picks the bucket.
cdef uint32_t SIZE_BOUNDS[14]
for _i, _b in enumerate((0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000,
                         48000, 64000)):
    SIZE_BOUNDS[_i] = _b


# =============================================================================== parsing


cdef int parse_question(Ask *a) noexcept nogil:
    """Question name, type and class from offset 12; lower-cases the name once.

    No compression: a one-question query has nothing earlier to point at (RFC 1035 §4.1.4),
    so anything above 63 is malformed. Returns 0, or -1 when malformed.
    """
    cdef Cursor c
    cdef unsigned int n, qtype, qclass
    cdef int total = 1, pos = 0, k
    c.ptr = a.q + 12
    c.end = a.q + a.qlen
    a.nlabels = 0
    while True:
        if not cur_u8(&c, &n):
            return -1
        if n == 0:
            break
        if n > 63:                      # RFC 1035 §2.3.4
            return -1
        total += n + 1
        if total > 255 or cur_left(&c) < n:
            return -1
        a.loff[a.nlabels] = pos
        a.nlabels += 1
        a.name[pos] = n
        for k in range(<int>n):
            a.name[pos + 1 + k] = ascii_lower(c.ptr[k])
        pos += n + 1
        c.ptr += n
    a.name[pos] = 0
    if not cur_u16(&c, &qtype) or not cur_u16(&c, &qclass):
        return -1
    a.qtype = qtype
    a.qclass = qclass
    a.qend = <int>(c.ptr - a.q)
    return 0


cdef Py_ssize_t skip_name(const uint8_t *q, Py_ssize_t qlen, Py_ssize_t off) noexcept nogil:
    """Skip a possibly compressed name in the other sections; -1 when malformed.

    refpath.skip_name's rules: pointers only strictly backwards and past the header (RFC
    1035 §4.1.4), at most MAX_HOPS of them, the name at most MAX_NAME bytes."""
    cdef unsigned int n, ptr, total = 1, hops = 0
    cdef Py_ssize_t end = -1
    while True:
        if off >= qlen:
            return -1
        n = q[off]
        if n == 0:
            return end if end >= 0 else off + 1
        if n & 0xC0 == 0xC0:
            if off + 2 > qlen:
                return -1
            ptr = (n & 0x3F) << 8 | q[off + 1]
            hops += 1
            if ptr < DNS_HEADER or ptr >= off or hops > MAX_HOPS:
                return -1
            if end < 0:
                end = off + 2
            off = ptr
            continue
        if n > MAX_LABEL:
            return -1
        total += n + 1
        if total > MAX_NAME:
            return -1
        off += 1 + n


cdef bint opt_options_ok(const uint8_t *q, Py_ssize_t o, Py_ssize_t end) noexcept nogil:
    # RFC 6891 §6.1.2: OPTION-CODE, OPTION-LENGTH, data; they must tile the rdata exactly.
    while o < end:
        if o + 4 > end:
            return False
        o += 4 + be16(q + o + 2)
    return o == end


cdef int parse_edns(Ask *a, unsigned int an, unsigned int ns, unsigned int ar,
                    int *found, unsigned int *size, int *version, int *do_bit) noexcept nogil:
    """Walk the records after the question; report the OPT if there is one. -1 = FORMERR."""
    cdef Py_ssize_t off = a.qend, start
    cdef unsigned int i, rtype, rclass, rdlen
    cdef uint32_t ttl
    found[0] = 0
    for i in range(an + ns + ar):
        start = off
        off = skip_name(a.q, a.qlen, off)
        if off < 0 or off + 10 > a.qlen:
            return -1
        rtype = be16(a.q + off)
        rclass = be16(a.q + off + 2)
        ttl = be32(a.q + off + 4)
        rdlen = be16(a.q + off + 8)
        off += 10 + rdlen
        if off > a.qlen:
            return -1
        if rtype == T_OPT:
            # RFC 6891 §6.1.1: only in the additional section, owner root, at most one.
            if i < an + ns or a.q[start] != 0 or found[0]:
                return -1
            if not opt_options_ok(a.q, start + 11, off):
                return -1
            found[0] = 1
            size[0] = rclass
            version[0] = (ttl >> 16) & 0xFF
            do_bit[0] = (ttl >> 15) & 1
    return 0


# =============================================================================== replies


cdef int header_only(const uint8_t *q, int rcode, uint8_t *out, Outcome *res) noexcept nogil:
    # No question could be echoed: the header alone, all counts zero.
    memcpy(out, q, 2)
    put16(out + 2, F_QR | (be16(q + 2) & F_ECHO) | rcode)
    memset(out + 4, 0, 8)
    res.length = 12
    res.rcode = rcode
    return ACTION_SEND


cdef inline uint32_t seg_end(const uint8_t *seg, unsigned int i) noexcept nogil:
    return le32(seg + i * SEG_SIZE + SEG_END)


cdef int rotated_body(const uint8_t *seg, const uint8_t *data, unsigned int rot_at,
                      unsigned int rot_n, unsigned int k, int room, uint32_t end, uint8_t *p,
                      unsigned int *counts) noexcept nogil:
    """refpath.rotate: ``data`` up to the cut ``end`` into ``p`` with the rotating run's
    records from its ``k``-th on, cyclically (layout.py, Rotation); the segments hold every
    record's end, so no record is parsed. A cut past the run keeps it whole, rotated; a cut
    inside it keeps the most rotated records that fit (TC, RFC 2181 §9). Returns the bytes
    written, or -1 - the bytes written when the cut fell inside the run (``counts`` then
    hold the records kept)."""
    cdef uint32_t s0 = seg_end(seg, rot_at), sk = seg_end(seg, rot_at + k)
    cdef uint32_t sn = seg_end(seg, rot_at + rot_n), r
    cdef unsigned int lo, hi, mid, m
    if end >= sn:
        memcpy(p, data, s0)
        memcpy(p + s0, data + sk, sn - sk)
        memcpy(p + s0 + (sn - sk), data + s0, sk - s0)
        memcpy(p + sn, data + sn, end - sn)
        return <int>end
    if end < s0:
        memcpy(p, data, end)            # the run's start does not fit
        return <int>end
    lo = 0                              # the most rotated records that fit; all rot_n do not
    hi = rot_n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if k + mid <= rot_n:
            r = seg_end(seg, rot_at + k + mid) - sk
        else:
            r = sn - sk + seg_end(seg, rot_at + k + mid - rot_n) - s0
        if <int64_t>s0 + r <= room:
            lo = mid
        else:
            hi = mid - 1
    m = lo
    memcpy(p, data, s0)
    if k + m <= rot_n:
        r = seg_end(seg, rot_at + k + m) - sk
        memcpy(p + s0, data + sk, r)
    else:
        memcpy(p + s0, data + sk, sn - sk)
        r = seg_end(seg, rot_at + k + m - rot_n) - s0
        memcpy(p + s0 + (sn - sk), data + s0, r)
        r += sn - sk
    counts[0] = rot_at + m
    counts[1] = 0
    counts[2] = 0
    return -1 - <int>(s0 + r)


cdef int blob_body(const ImageView *img, uint32_t blob, int room, int apex_ptr, uint8_t *p,
                   int cap, unsigned int *hflags, unsigned int *counts,
                   Rotor *rot) noexcept nogil:
    """Copy the longest segment of ``blob`` that fits in ``room`` and apply its fixups.
    The segments are the compiler's cut points, their ends ascending: a binary search.
    A blob that rotates (layout.py, Rotation) takes its order from ``rot``.

    Returns the bytes written, or -1 if they would pass ``cap`` (never for a valid image).
    """
    cdef const uint8_t *b = img.base + blob
    cdef unsigned int nfix = le16(b + BLOB_NFIX), nseg = le16(b + BLOB_NSEG), k, f, lo, hi
    cdef unsigned int rot_n = le16(b + BLOB_ROT_N), turn
    cdef const uint8_t *seg = b + BLOBHDR_SIZE + ((2 * nfix + 3) & ~3u)
    cdef const uint8_t *data = seg + nseg * SEG_SIZE
    cdef const uint8_t *best = seg
    cdef uint32_t end
    cdef uint32_t *slot
    cdef int n
    KDNS_CHECK(blob >= HEADER_SIZE and blob + BLOBHDR_SIZE <= <uint64_t>img.length)
    hflags[0] |= le16(b + BLOB_HDR)
    lo = 1                              # the first segment past ``room`` (seg 0 always fits)
    hi = nseg if nseg else 1
    while lo < hi:
        k = (lo + hi) // 2
        if <int64_t>le32(seg + k * SEG_SIZE + SEG_END) > room:
            hi = k
        else:
            lo = k + 1
    best = seg + (lo - 1) * SEG_SIZE
    end = le32(best + SEG_END)
    KDNS_CHECK(data + end <= img.base + img.length)
    if end > <uint32_t>cap:
        return -1
    counts[0] = le16(best + SEG_AN)
    counts[1] = le16(best + SEG_NS)
    counts[2] = le16(best + SEG_AR)
    if rot_n >= 2 and rot != NULL:
        # One load, add and store per rotating answer; the image's checks (blob_ok) hold
        # the run inside the segments and the blob without fixups.
        if rot.slots != NULL:
            # The slot holds the next turn, kept below rot_n so that no answer divides; a
            # larger value is another name's (two blobs that hash alike), rare.
            slot = rot.slots + rot_slot(blob)
            turn = slot[0]
            if turn >= rot_n:
                turn %= rot_n
            slot[0] = turn + 1 if turn + 1 < rot_n else 0
        else:
            turn = rot.fixed % rot_n
        if turn:
            n = rotated_body(seg, data, le16(b + BLOB_ROT_AT), rot_n, turn, room, end, p,
                             counts)
            if n < 0:
                hflags[0] |= F_TC       # the cut fell inside the run: answer records left out
                return -1 - n
            if le16(best + SEG_TC):
                hflags[0] |= F_TC
            return n
    if le16(best + SEG_TC):
        hflags[0] |= F_TC               # RFC 2181 §9: answer or authority data was cut
    memcpy(p, data, end)
    for k in range(nfix):
        f = le16(b + BLOBHDR_SIZE + 2 * k)
        if f + 2 <= end:
            put16(p + f, 0xC000 | apex_ptr)
    return <int>end


cdef int build_reply(const Ask *a, const ImageView *img, uint32_t blob, int rcode,
                     int apex_ptr, const uint8_t *synth, int synth_len, uint8_t *out, int cap,
                     Outcome *res) noexcept nogil:
    """Header + the client's own question (case kept, DNS 0x20) + blob or synthesised RR +
    OPT, within ``a.limit``. Mirrors refpath.reply."""
    cdef unsigned int hflags = F_QR | (a.flags & F_ECHO) | rcode
    cdef unsigned int counts[3]
    cdef int opt = OPT_LEN if a.edns else 0
    cdef int room = a.limit - a.qend - opt
    cdef int body = 0
    cdef uint8_t *p = out + a.qend
    counts[0] = counts[1] = counts[2] = 0
    if a.qend + opt > cap:
        return ACTION_DROP
    if synth_len:
        hflags |= F_AA
        if synth_len <= room:
            memcpy(p, synth, synth_len)
            body = synth_len
            counts[0] = 1
        else:
            hflags |= F_TC
    elif blob:
        body = blob_body(img, blob, room, apex_ptr, p, cap - a.qend - opt, &hflags, counts,
                         a.rot)
        if body < 0:
            return ACTION_DROP
    memcpy(out, a.q, 2)
    put16(out + 2, hflags)
    put16(out + 4, 1)
    put16(out + 6, counts[0])
    put16(out + 8, counts[1])
    put16(out + 10, counts[2] + (1 if a.edns else 0))
    memcpy(out + 12, a.q + 12, a.qend - 12)
    p += body
    if a.edns:
        # RFC 6891 §6.1.2-3: root owner, CLASS = our UDP size, TTL = ext rcode, version, DO.
        p[0] = 0
        put16(p + 1, T_OPT)
        put16(p + 3, a.edns_size)
        p[5] = a.edns_ext
        p[6] = 0
        put16(p + 7, a.edns_do << 15)
        put16(p + 9, 0)
        p += OPT_LEN
    res.length = <int>(p - out)
    KDNS_CHECK(res.length <= cap)
    res.rcode = RC_BADVERS if a.edns_ext == 1 else <int>(hflags & 0xF)
    res.tc = (hflags & F_TC) != 0
    return ACTION_SEND


# =============================================================================== image walk


cdef inline const uint8_t *node_at(const ImageView *img, uint32_t i) noexcept nogil:
    return img.base + img.nodes_off + <size_t>i * NODE_SIZE


cdef inline const uint8_t *zone_at(const ImageView *img, uint32_t i) noexcept nogil:
    return img.base + img.zones_off + <size_t>i * ZONE_SIZE


cdef int64_t find_child(const ImageView *img, const uint8_t *node, const uint8_t *label,
                        unsigned int n) noexcept nogil:
    """Binary search of the children, ordered by (length, lower-cased bytes) as compiled."""
    cdef uint32_t first = le32(node + NODE_FIRST_CHILD), lo = 0, hi = le32(node + NODE_NCHILD), mid
    cdef const uint8_t *lab
    cdef int cmp
    KDNS_CHECK(<uint64_t>first + hi <= img.nnodes)
    while lo < hi:
        mid = lo + (hi - lo) // 2
        lab = img.base + le32(node_at(img, first + mid) + NODE_LABEL_OFF)
        if lab[0] != n:
            cmp = <int>lab[0] - <int>n
        else:
            cmp = memcmp(lab + 1, label, n)
        if cmp == 0:
            return first + mid
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid
    return -1


cdef uint32_t lookup_rr(const ImageView *img, uint32_t rr_off, unsigned int nrr,
                        unsigned int qtype) noexcept nogil:
    # Exact qtype wins; entry type 0 answers any other type (a CNAME owner's chain).
    cdef uint32_t default = 0
    cdef const uint8_t *e = img.base + rr_off
    cdef unsigned int j, t
    for j in range(nrr):
        t = le16(e + j * RRENT_SIZE + RRENT_QTYPE)
        if t == qtype:
            return le32(e + j * RRENT_SIZE + RRENT_BLOB)
        if t == 0:
            default = le32(e + j * RRENT_SIZE + RRENT_BLOB)
    return default


cdef bint label_is(const Ask *a, int i, const char *text, unsigned int n) noexcept nogil:
    cdef const uint8_t *lab = a.name + a.loff[i]
    return lab[0] == n and memcmp(lab + 1, text, n) == 0


cdef int decimal_octet(const uint8_t *s, unsigned int n) noexcept nogil:
    """Canonical decimal 0..255 (no sign, no leading zero) or -1, as reverse and pod names
    spell octets."""
    cdef unsigned int k
    cdef int v = 0
    if n == 0 or n > 3 or (n > 1 and s[0] == 48):
        return -1
    for k in range(n):
        if not 48 <= s[k] <= 57:
            return -1
        v = v * 10 + s[k] - 48
    return v if v <= 255 else -1


cdef int reverse_key(const Ask *a, uint8_t *key) noexcept nogil:
    """Full reverse name (RFC 1035 §3.5, RFC 3596 §2.5) -> family 4/6 and 16-byte key, or 0.
    Only canonical spellings match, as image.reverse_to_ip."""
    cdef int k, v, hi_n, lo_n
    cdef const uint8_t *lab
    memset(key, 0, 16)
    if a.nlabels == 6 and label_is(a, 4, b"in-addr", 7) and label_is(a, 5, b"arpa", 4):
        for k in range(4):
            lab = a.name + a.loff[3 - k]
            v = decimal_octet(lab + 1, lab[0])
            if v < 0:
                return 0
            key[k] = v
        return 4
    if a.nlabels == 34 and label_is(a, 32, b"ip6", 3) and label_is(a, 33, b"arpa", 4):
        for k in range(16):
            lab = a.name + a.loff[31 - 2 * k]
            if lab[0] != 1:
                return 0
            hi_n = hex_nibble(lab[1])
            lab = a.name + a.loff[30 - 2 * k]
            if lab[0] != 1:
                return 0
            lo_n = hex_nibble(lab[1])
            if hi_n < 0 or lo_n < 0:
                return 0
            key[k] = (hi_n << 4) | lo_n
        return 6
    return 0


cdef const uint8_t *rev_lookup(const ImageView *img, int fam, const uint8_t *key) noexcept nogil:
    # Reverse entries are sorted by (family, 16-byte address).
    cdef uint32_t lo = 0, hi = img.nrev, mid
    cdef const uint8_t *rec
    cdef int cmp
    while lo < hi:
        mid = lo + (hi - lo) // 2
        rec = img.base + img.rev_off + <size_t>mid * REV_SIZE
        cmp = <int>rec[REV_FAMILY] - fam
        if cmp == 0:
            cmp = memcmp(rec + REV_IP, key, 16)
        if cmp == 0:
            return rec
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid
    return NULL


# ------------------------------------------------------------------------ pod names


cdef inline bint is_colon(uint8_t c) noexcept nogil:
    # Pod labels spell IPv6 with dashes for colons (CoreDNS parse.go); a raw ':' counts too,
    # as refpath replaces dashes and then splits on colons.
    return c == 58 or c == 45


cdef int ipv6_groups(const uint8_t *s, int start, int stop, uint16_t *vals) noexcept nogil:
    """Split s[start:stop] at colons into 1-4 digit hex groups; count, or -1 if invalid or
    more than 8 (no valid address has more)."""
    cdef int n = 0, glen = 0, v = 0, k, h
    if start == stop:
        return 0
    for k in range(start, stop + 1):
        if k == stop or is_colon(s[k]):
            if glen == 0 or n == 8:
                return -1
            vals[n] = v
            n += 1
            glen = v = 0
            continue
        h = hex_nibble(s[k])
        if h < 0 or glen == 4:
            return -1
        v = (v << 4) | h
        glen += 1
    return n


cdef int parse_ipv6(const uint8_t *s, int n, uint8_t *key) noexcept nogil:
    """RFC 4291 §2.2 text form, hex groups only; '::' stands for at least one group."""
    cdef int k = 0, count = 0, first = -1, nh, nt, g
    cdef uint16_t head[8]
    cdef uint16_t tail[8]
    # Non-overlapping '::' occurrences, left to right (bytes.count semantics).
    while k + 1 < n:
        if is_colon(s[k]) and is_colon(s[k + 1]):
            count += 1
            if first < 0:
                first = k
            k += 2
        else:
            k += 1
    if count > 1:
        return 0
    if count == 1:
        nh = ipv6_groups(s, 0, first, head)
        nt = ipv6_groups(s, first + 2, n, tail)
        if nh < 0 or nt < 0 or nh + nt > 7:
            return 0
    else:
        nh = ipv6_groups(s, 0, n, head)
        nt = 0
        if nh != 8:
            return 0
    memset(key, 0, 16)
    for g in range(nh):
        put16(key + 2 * g, head[g])
    for g in range(nt):
        put16(key + 16 - 2 * (nt - g), tail[g])
    return 6


cdef int parse_pod_label(const uint8_t *s, int n, uint8_t *key) noexcept nogil:
    """Pod label -> family and 16-byte key, or 0 (CoreDNS parse.go): exactly three dashes and
    no '--' is IPv4 with dashes for dots; anything else is IPv6 with dashes for colons."""
    cdef int dashes = 0, double = 0, k, start = 0, part = 0, v
    for k in range(n):
        if s[k] == 45:
            dashes += 1
            if k > 0 and s[k - 1] == 45:
                double = 1
    if dashes != 3 or double:
        return parse_ipv6(s, n, key)
    memset(key, 0, 16)
    for k in range(n + 1):
        if k == n or s[k] == 45:
            v = decimal_octet(s + start, k - start)
            if v < 0:
                return 0
            key[part] = v
            part += 1
            start = k + 1
    return 4


cdef bint pod_ip_known(const ImageView *img, uint32_t off, const uint8_t *key) noexcept nogil:
    # Verified pod mode: [u32 count][count x 16-byte addresses, sorted].
    cdef uint32_t lo = 0, hi = le32(img.base + off), mid
    cdef int cmp
    while lo < hi:
        mid = lo + (hi - lo) // 2
        cmp = memcmp(img.base + off + 4 + <size_t>mid * 16, key, 16)
        if cmp == 0:
            return True
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid
    return False


cdef int answer_any(const Ask *a, const ImageView *img, uint32_t ttl, uint8_t *out, int cap,
                    Outcome *res) noexcept nogil:
    """QTYPE=ANY at a name with data: one synthesised HINFO "RFC8482" "" (RFC 8482 §4.2,
    dns-rules §2.1), not NODATA, which would say the name has none (refpath.any_hinfo)."""
    cdef uint8_t rr[21]
    put16(rr, 0xC00C)                 # owner: the question name
    put16(rr + 2, T_HINFO)
    put16(rr + 4, CLASS_IN)
    put32(rr + 6, ttl)
    put16(rr + 10, 9)
    rr[12] = 7                        # CPU: "RFC8482"
    memcpy(rr + 13, b"RFC8482", 7)
    rr[20] = 0                        # OS: ""
    return build_reply(a, img, 0, 0, 0, rr, 21, out, cap, res)


cdef int answer_pod(const Ask *a, const ImageView *img, uint32_t nflags, uint32_t extra,
                    const uint8_t *zone, int apex_ptr, uint8_t *out, int cap,
                    Outcome *res) noexcept nogil:
    """<ip>.<namespace>.pod.<zone>: A/AAAA synthesised from the name, NODATA for other types;
    -1 when the label is no (known) address, so the caller denies the name."""
    cdef uint8_t key[16]
    cdef uint8_t rr[28]
    cdef const uint8_t *lab = a.name + a.loff[0]
    cdef int fam = parse_pod_label(lab + 1, lab[0], key)
    cdef int rdlen
    if fam == 0 or (nflags & NODE_POD_VERIFIED and not pod_ip_known(img, extra, key)):
        return -1
    if (fam == 4 and a.qtype == T_A) or (fam == 6 and a.qtype == T_AAAA):
        rdlen = 4 if fam == 4 else 16
        put16(rr, 0xC00C)             # owner: the question name
        put16(rr + 2, a.qtype)
        put16(rr + 4, CLASS_IN)
        put32(rr + 6, le32(zone + ZONE_TTL))
        put16(rr + 10, rdlen)
        memcpy(rr + 12, key, rdlen)
        return build_reply(a, img, 0, 0, 0, rr, 12 + rdlen, out, cap, res)
    if a.qtype == T_ANY:
        return answer_any(a, img, le32(zone + ZONE_TTL), out, cap, res)
    return build_reply(a, img, le32(zone + ZONE_NEG_BLOB), 0, apex_ptr, NULL, 0, out, cap, res)


cdef int answer_reverse(const Ask *a, const ImageView *img, uint8_t *out, int cap,
                        Outcome *res) noexcept nogil:
    # Reverse names are a sorted table, not trie nodes; a miss belongs to the forwarder.
    cdef uint8_t key[16]
    cdef int fam = reverse_key(a, key)
    cdef const uint8_t *rec
    cdef const uint8_t *rzone
    cdef uint32_t blob
    if fam == 0:
        return ACTION_HANDOFF
    rec = rev_lookup(img, fam, key)
    if rec == NULL:
        return ACTION_HANDOFF
    rzone = zone_at(img, le16(rec + REV_ZONE))
    blob = lookup_rr(img, le32(rec + REV_RR_OFF), le16(rec + REV_NRR), a.qtype)
    if blob:
        return build_reply(a, img, blob, 0, 0, NULL, 0, out, cap, res)
    if a.qtype == T_ANY and le16(rec + REV_NRR):
        return answer_any(a, img, le32(rzone + ZONE_TTL), out, cap, res)
    return build_reply(a, img, le32(rzone + ZONE_NEG_BLOB), 0,
                       a.qend - 4 - le16(rzone + ZONE_APEX_WIRE_LEN), NULL, 0, out, cap, res)


cdef int resolve(const Ask *a, const ImageView *img, uint8_t *out, int cap,
                 Outcome *res) noexcept nogil:
    """Walk the trie right to left to the closest encloser, then HIT / NODATA / NXDOMAIN /
    pod synthesis / reverse table / handoff, as refpath.resolve."""
    cdef const uint8_t *node = node_at(img, 0)
    cdef const uint8_t *zone
    cdef const uint8_t *lab
    cdef int64_t zi = -1, c
    cdef int i = a.nlabels - 1, apex_ptr, act, below_apex = -1
    cdef unsigned int nflags, kind
    cdef uint32_t blob
    while True:
        nflags = le16(node + NODE_FLAGS)
        if nflags & NODE_ZONE_APEX:
            zi = le32(node + NODE_EXTRA)
            below_apex = i
        if i < 0:
            break
        lab = a.name + a.loff[i]
        c = find_child(img, node, lab + 1, lab[0])
        if c < 0:
            break
        node = node_at(img, <uint32_t>c)
        i -= 1
    if zi < 0:
        res.outside = 1
        return ACTION_HANDOFF           # outside every zone: the forwarder's
    zone = zone_at(img, <uint32_t>zi)
    # The apex inside the echoed question: 12 + qname length - apex length.
    apex_ptr = a.qend - 4 - le16(zone + ZONE_APEX_WIRE_LEN)
    kind = le16(zone + ZONE_KIND)
    if kind == ZONE_REVERSE and i >= 0:
        return answer_reverse(a, img, out, cap, res)
    if kind == ZONE_HOSTS or kind == ZONE_HOSTS_FINAL or kind == ZONE_ALIAS:
        # Custom records: a name without any is the forwarder's (fallthrough) or SERVFAIL;
        # they do not wait for the cluster's first sync (refpath.resolve).
        if i >= 0 or le16(node + NODE_NRR) == 0:
            if kind != ZONE_HOSTS_FINAL:
                res.outside = 1
                return ACTION_HANDOFF
            return build_reply(a, img, img.servfail, 0, 0, NULL, 0, out, cap, res)
    elif not img.flags & FLAG_SYNCED:
        # Not synced yet: SERVFAIL, never a false NXDOMAIN.
        return build_reply(a, img, img.servfail, 0, 0, NULL, 0, out, cap, res)
    if a.qtype == T_AXFR or a.qtype == T_IXFR:
        return build_reply(a, img, 0, RC_REFUSED, 0, NULL, 0, out, cap, res)
    if i < 0:
        blob = lookup_rr(img, le32(node + NODE_RR_OFF), le16(node + NODE_NRR), a.qtype)
        if blob and le16(img.base + blob + BLOB_HDR) & HDR_HANDOFF:
            return ACTION_HANDOFF           # CNAME to outside: the forwarder completes it
        if blob:
            return build_reply(a, img, blob, 0, 0, NULL, 0, out, cap, res)
        if a.qtype == T_ANY and le16(node + NODE_NRR):
            return answer_any(a, img, le32(zone + ZONE_TTL), out, cap, res)
        if kind == ZONE_ALIAS:
            res.outside = 1                 # the target's NODATA, through the rewrite
            return ACTION_HANDOFF
        return build_reply(a, img, le32(zone + ZONE_NEG_BLOB), 0, apex_ptr, NULL, 0, out, cap, res)
    if nflags & NODE_POD_NS and i == 0:
        act = answer_pod(a, img, nflags, le32(node + NODE_EXTRA), zone, apex_ptr, out, cap, res)
        if act >= 0:
            return act
    if a.client != NULL and img.autopath:
        act = answer_autopath(a, img, below_apex, le32(zone + ZONE_NEG_BLOB), apex_ptr, out,
                              cap, res)
        if act >= 0:
            return act
    return build_reply(a, img, le32(zone + ZONE_NEG_BLOB), RC_NXDOMAIN, apex_ptr, NULL, 0, out,
                       cap, res)


# =============================================================================== autopath


cdef int64_t client_ns(const ImageView *img, const uint8_t *key) noexcept nogil:
    """refpath.client_namespace: the offset of the client pod's namespace label, or -1.
    A binary search of the sorted pod table; nothing allocated."""
    cdef const uint8_t *sec = img.base + img.autopath
    cdef uint32_t lo = 0, hi = le32(sec + AP_COUNT), mid
    cdef const uint8_t *e
    cdef int cmp
    while lo < hi:
        mid = lo + (hi - lo) // 2
        e = sec + AP_SIZE + <size_t>mid * APENT_SIZE
        cmp = memcmp(e + APENT_IP, key, 16)
        if cmp == 0:
            return <int64_t>img.autopath + le32(e + APENT_NS)
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid
    return -1


cdef int reloc_name(uint8_t *b, int n, int off, int clen, int olen) noexcept nogil:
    # refpath.relocate's name(): the end of the name at ``off``, its pointer moved; -1 when
    # it runs past the body or a pointer would not fit in 14 bits.
    cdef unsigned int p
    while True:
        if off >= n:
            return -1
        if b[off] == 0:
            return off + 1
        if b[off] & 0xC0 == 0xC0:
            if off + 1 >= n:
                return -1
            p = (b[off] & 0x3F) << 8 | b[off + 1]
            p += <unsigned int>(olen + 16) if p < <unsigned int>(12 + clen) else <unsigned int>(olen + 12)
            if p > 0x3FFF:
                return -1
            b[off] = 0xC0 | (p >> 8)
            b[off + 1] = p & 0xFF
            return off + 2
        off += 1 + b[off]


cdef int relocate(uint8_t *b, int n, int nrec, int clen, int olen, uint32_t *ttl) noexcept nogil:
    """refpath.relocate: the records' pointers moved behind the asked question and the
    CNAME (RFC 1035 §4.1.4); the first record's TTL in ``ttl``. 0, or -1 as refpath's None."""
    cdef int off = 0, k, rd
    cdef unsigned int rtype
    for k in range(nrec):
        off = reloc_name(b, n, off, clen, olen)
        if off < 0 or off + 10 > n:
            return -1
        rtype = be16(b + off)
        if k == 0:
            ttl[0] = be32(b + off + 4)
        rd = off + 10
        if rtype == T_NS or rtype == T_CNAME or rtype == T_PTR:
            if reloc_name(b, n, rd, clen, olen) < 0:
                return -1
        elif rtype == T_MX:
            if reloc_name(b, n, rd + 2, clen, olen) < 0:
                return -1
        elif rtype == T_SRV:
            if reloc_name(b, n, rd + 6, clen, olen) < 0:
                return -1
        elif rtype == T_SOA:
            rd = reloc_name(b, n, rd, clen, olen)
            if rd < 0 or reloc_name(b, n, rd, clen, olen) < 0:
                return -1
            rd = off + 10
        off = rd + be16(b + off + 8)
    return 0


cdef int answer_autopath(const Ask *a, const ImageView *img, int below_apex, uint32_t neg_blob,
                         int apex_ptr, uint8_t *out, int cap, Outcome *res) noexcept nogil:
    """refpath.autopath, step for step: the asked name's next search candidates answered
    from the image, behind a CNAME; ACTION_HANDOFF from the first step the image hands off
    (the hand-off's, refpath.autopath_plan), or -1 for today's NXDOMAIN. The candidate's
    question is built on the stack."""
    cdef Ask c
    cdef uint8_t cq[12 + 256 + 4]
    cdef const uint8_t *nslab
    cdef const uint8_t *lab
    cdef const uint8_t *suffix
    cdef const uint8_t *sec = img.base + img.autopath
    cdef const uint8_t *sp
    cdef int64_t nsoff
    cdef int step, nsteps, k, nb, slen, olen, clen, act, opt, length, nbase, off
    cdef unsigned int an, tc
    cdef uint32_t ttl = 0
    cdef uint8_t *p
    if below_apex < 2 or not label_is(a, below_apex, b"svc", 3):
        return -1
    nsoff = client_ns(img, a.client)
    if nsoff < 0:
        return -1
    nslab = img.base + nsoff
    lab = a.name + a.loff[below_apex - 1]
    if lab[0] != nslab[0] or memcmp(lab + 1, nslab + 1, lab[0]) != 0:
        return -1
    olen = a.qend - 4 - 12
    nbase = below_apex - 1
    nb = a.loff[nbase]
    opt = OPT_LEN if a.edns else 0
    sp = sec + le32(sec + AP_SEARCH_OFF)
    nsteps = 3 + <int>le32(sec + AP_NSEARCH)
    for step in range(nsteps):
        # refpath.autopath_candidates: <base>.svc.<zone>, <base>.<zone> (the zone may be
        # the root), <base>.<search domain>..., <base>.
        if step < 2:
            k = below_apex + step
            off = a.loff[k] if k < a.nlabels else olen - 1
            suffix = a.name + off
            slen = olen - off
        elif step < nsteps - 1:
            suffix = sp
            slen = 0
            while sp[slen]:
                slen += 1 + sp[slen]
            slen += 1
            sp += slen
        else:
            suffix = b"\0"
            slen = 1
        clen = nb + slen
        if clen > MAX_NAME:
            continue                    # longer than a name may be (RFC 1035 §2.3.4)
        memcpy(&c, a, sizeof(Ask))
        c.client = NULL
        memcpy(c.name, a.name, nb)
        memcpy(c.name + nb, suffix, slen)
        c.nlabels = 0
        off = 0
        while c.name[off]:
            c.loff[c.nlabels] = off
            c.nlabels += 1
            off += 1 + c.name[off]
        memcpy(cq, a.q, 12)
        memcpy(cq + 12, c.name, clen)
        memcpy(cq + 12 + clen, a.q + a.qend - 4, 4)
        c.q = cq
        c.qlen = 12 + clen + 4
        c.qend = 12 + clen + 4
        c.limit = a.limit - olen - 12
        act = resolve(&c, img, out, cap, res)
        if act != ACTION_SEND:
            res.outside = 0
            return ACTION_HANDOFF       # this step and the rest: the hand-off's
        if out[3] & 0xF:
            continue                    # NXDOMAIN
        an = be16(out + 6)
        if an == 0 and step < 2:
            tc = out[2] & (F_TC >> 8)
            act = build_reply(a, img, neg_blob, 0, apex_ptr, NULL, 0, out, cap, res)
            out[2] |= tc
            if tc:
                res.tc = 1
            return act
        length = res.length
        if length + olen + 12 > cap:
            return -1
        # The body (and OPT) moves behind the asked question and the CNAME, then its
        # pointers follow it.
        memmove(out + 28 + olen + clen, out + 16 + clen, length - 16 - clen)
        if relocate(out + 28 + olen + clen, length - 16 - clen - opt,
                    an + be16(out + 8) + be16(out + 10) - (1 if a.edns else 0),
                    clen, olen, &ttl) < 0:
            return -1
        put16(out + 6, an + 1)
        memcpy(out + 12, a.q + 12, olen + 4)
        p = out + 16 + olen
        put16(p, 0xC00C)
        put16(p + 2, T_CNAME)
        put16(p + 4, CLASS_IN)
        put32(p + 6, ttl)
        put16(p + 10, clen)
        memcpy(p + 12, c.name, clen)
        res.length = length + olen + 12
        res.autopath = 1
        return ACTION_SEND
    return -1                           # every step NXDOMAIN: the asked name's own


cdef int answer_query(const ImageView *img, const uint8_t *q, Py_ssize_t qlen, bint tcp,
                      int edns_max, uint8_t *out, int cap, Outcome *res,
                      bint ra=False, Rotor *rot=NULL,
                      const uint8_t *client=NULL) noexcept nogil:
    """One query -> action, with the reply in ``out`` (``res.length`` bytes) when SEND.

    ``ra``: this worker forwards (it has upstreams), so every reply says recursion is
    available (RFC 1035 §4.1.1), as kube-dns's did; one OR per reply (refpath.answer).
    ``rot``: the rotation state (NULL: the compiled order). ``client``: the sender's
    16-byte address key (``client_key``), whose pod namespace autopath looks up (NULL:
    none, as for an image without autopath)."""
    cdef int action = answer_body(img, q, qlen, tcp, edns_max, out, cap, res, rot,
                                  client if img.autopath else NULL)
    if ra and action == ACTION_SEND:
        out[3] |= F_RA
    return action


cdef bint client_key(const sockaddr_storage *sa, uint8_t *key) noexcept nogil:
    # encode.ip_key: 16 bytes, IPv4 in the first 4; an IPv4-mapped IPv6 address (RFC 4291
    # §2.5.5.2) is its IPv4 address.
    cdef const uint8_t *b
    memset(key, 0, 16)
    if sa.ss_family == AF_INET:
        memcpy(key, &(<const sockaddr_in *>sa).sin_addr, 4)
        return True
    if sa.ss_family == AF_INET6:
        b = <const uint8_t *>&(<const sockaddr_in6 *>sa).sin6_addr
        if memcmp(b, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
            memcpy(key, b + 12, 4)
        else:
            memcpy(key, b, 16)
        return True
    return False


cdef int answer_body(const ImageView *img, const uint8_t *q, Py_ssize_t qlen, bint tcp,
                     int edns_max, uint8_t *out, int cap, Outcome *res,
                     Rotor *rot, const uint8_t *client=NULL) noexcept nogil:
    """answer_query without RA.

    ``cap`` must be at least max(reply limit, 12 + 255 + 4 + OPT_LEN). Mirrors
    refpath.answer step by step.
    """
    cdef Ask a
    cdef unsigned int qd, an, ns, ar, opt_size = 0
    cdef int opcode, found = 0, version = 0, do_bit = 0
    res.length = 0
    res.qtype = -1
    res.rcode = 0
    res.tc = 0
    res.outside = 0
    res.do_bit = 0
    res.cache_denial = 0
    res.autopath = 0
    if qlen < 12:
        return ACTION_DROP
    a.rot = rot
    a.client = client
    a.q = q
    a.qlen = qlen
    a.flags = be16(q + 2)
    if a.flags & F_QR:
        return ACTION_DROP              # a response: never answer it (no reflection loops)
    opcode = (a.flags >> 11) & 0xF
    qd = be16(q + 4)
    an = be16(q + 6)
    ns = be16(q + 8)
    ar = be16(q + 10)
    if qd != 1 or parse_question(&a) < 0:
        return header_only(q, RC_NOTIMP if opcode else RC_FORMERR, out, res)
    res.qtype = a.qtype
    a.edns = 0
    a.edns_ext = 0
    a.limit = 0
    if opcode:
        return build_reply(&a, img, 0, RC_NOTIMP, 0, NULL, 0, out, cap, res)
    if parse_edns(&a, an, ns, ar, &found, &opt_size, &version, &do_bit) < 0:
        return build_reply(&a, img, 0, RC_FORMERR, 0, NULL, 0, out, cap, res)
    if found:
        a.edns = 1
        a.edns_do = do_bit
        res.do_bit = do_bit
        a.edns_size = <int>opt_size if <int>opt_size < edns_max else edns_max
        if a.edns_size < EDNS_MIN:
            a.edns_size = EDNS_MIN
        if version > 0:
            a.edns_ext = 1              # BADVERS (RFC 6891 §6.1.3)
            return build_reply(&a, img, 0, 0, 0, NULL, 0, out, cap, res)
        a.limit = TCP_MAX if tcp else a.edns_size
    else:
        a.limit = TCP_MAX if tcp else UDP_PLAIN
    if a.qclass != CLASS_IN and a.qclass != CLASS_ANY:
        return ACTION_HANDOFF           # CH, HS...: the worker's, never the image's (refpath)
    return resolve(&a, img, out, cap, res)


# =============================================================================== counters


cdef inline int size_bucket(Py_ssize_t n) noexcept nogil:
    cdef int k
    for k in range(NSIZE - 1):
        if n <= SIZE_BOUNDS[k]:
            return k
    return NSIZE - 1


cdef inline int latency_bucket(int64_t ns) noexcept nogil:
    # counters.LATENCY_BOUNDS are 0.25 ms * 2**k, i.e. exactly 250000 << k nanoseconds.
    cdef int k
    for k in range(NLAT - 1):
        if ns <= (<int64_t>250000 << k):
            return k
    return NLAT - 1


cdef void count_packet(uint64_t *ctr, int proto, Py_ssize_t reqlen, int action,
                       const Outcome *res, const uint8_t *reply, bint v6) noexcept nogil:
    """One received query: its type, its client's family (``v6``), request size, its DO
    bit and what became of it (``reply``: the reply's bytes when ``action`` is
    ACTION_SEND)."""
    cdef int qi = QTYPE_INDEX[res.qtype] if 0 <= res.qtype < 256 else NQTYPES - 1
    cdef int ev = C_EVENTS + proto * NEVENTS
    cdef int rq = C_REQ_SIZE + proto * (NSIZE + 1)
    cdef int rs = C_RESP_SIZE + proto * (NSIZE + 1)
    ctr[(C_V6QUERIES if v6 else C_QUERIES) + proto * NQTYPES + qi] += 1
    ctr[rq + size_bucket(reqlen)] += 1
    ctr[rq + NSIZE] += <uint64_t>reqlen
    if res.do_bit:
        ctr[ev + EV_DO] += 1
    if action == ACTION_SEND:
        ctr[C_RCODE + proto * NRCODES + res.rcode] += 1
        # NODATA (RFC 2308 §2.2): NOERROR and no answer. A truncated reply with no whole
        # record that fit is not one (its client asks again over TCP).
        if res.rcode == 0 and not res.tc and be16(reply + 6) == 0:
            ctr[ev + EV_NODATA] += 1
        ctr[rs + size_bucket(res.length)] += 1
        ctr[rs + NSIZE] += <uint64_t>res.length
        if res.tc:
            ctr[ev + EV_TRUNCATED] += 1
        if res.rcode == RC_FORMERR:
            ctr[ev + EV_FORMERR] += 1
        if res.autopath:
            ctr[ev + EV_AUTOPATH] += 1
    elif action == ACTION_HANDOFF:
        ctr[ev + EV_HANDOFF] += 1
    else:
        ctr[ev + EV_DROPPED] += 1


cdef void count_latency(uint64_t *ctr, int proto, uint64_t npackets, int64_t ns) noexcept nogil:
    cdef int base = C_LATENCY + proto * (NLAT + 1)
    if ns < 0:
        ns = 0
    ctr[base + latency_bucket(ns)] += npackets
    ctr[base + NLAT] += npackets * <uint64_t>ns


cdef inline int qtype_slot(int qtype) noexcept nogil:
    return QTYPE_INDEX[qtype] if 0 <= qtype < 256 else NQTYPES - 1


cdef void count_type_latency(uint64_t *ctr, int qtype, int64_t ns) noexcept nogil:
    """One reply's request duration under its query type (the type label of CoreDNS's
    coredns_dns_request_duration_seconds); count_latency has it by protocol."""
    cdef int base = C_TLATENCY + qtype_slot(qtype) * (NLAT + 1)
    if ns < 0:
        ns = 0
    ctr[base + latency_bucket(ns)] += 1
    ctr[base + NLAT] += <uint64_t>ns


cdef inline bint client_is_ipv6(const sockaddr_storage *a) noexcept nogil:
    """An IPv6 client, not an IPv4 one reaching a dual-stack socket IPv4-mapped
    (::ffff:a.b.c.d, RFC 4291 §2.5.5.2)."""
    cdef const uint8_t *b
    cdef int i
    if a.ss_family != AF_INET6:
        return False
    b = <const uint8_t *>&(<const sockaddr_in6 *>a).sin6_addr
    for i in range(10):
        if b[i]:
            return True
    return b[10] != 0xff or b[11] != 0xff


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def counter_layout():
    """Counter name -> word index, built from the .pxd constants (must equal
    kdns.packet.counters.LAYOUT; tests/test_counters.py checks it)."""
    cdef int p, k
    out = {"image_generation": C_IMAGE_GENERATION}
    protos = ("udp", "tcp")
    for p in range(2):
        for k in range(NQTYPES):
            out[f"queries_{protos[p]}_{_QTYPE_NAMES[k]}"] = C_QUERIES + p * NQTYPES + k
    for p in range(2):
        for k in range(NRCODES):
            out[f"rcode_{protos[p]}_{k}"] = C_RCODE + p * NRCODES + k
    for kind, base in (("request_size", C_REQ_SIZE), ("response_size", C_RESP_SIZE)):
        for p in range(2):
            for k in range(NSIZE):
                out[f"{kind}_{protos[p]}_bucket_{k}"] = base + p * (NSIZE + 1) + k
            out[f"{kind}_{protos[p]}_sum"] = base + p * (NSIZE + 1) + NSIZE
    for p in range(2):
        for k in range(NLAT):
            out[f"latency_{protos[p]}_bucket_{k}"] = C_LATENCY + p * (NLAT + 1) + k
        out[f"latency_{protos[p]}_sum_ns"] = C_LATENCY + p * (NLAT + 1) + NLAT
    for p in range(2):
        for k in range(NEVENTS):
            out[f"{_EVENT_NAMES[k]}_{protos[p]}"] = C_EVENTS + p * NEVENTS + k
    for p in range(2):
        for k in range(NQTYPES):
            out[f"v6queries_{protos[p]}_{_QTYPE_NAMES[k]}"] = C_V6QUERIES + p * NQTYPES + k
    for k in range(NQTYPES):
        for p in range(NLAT):
            out[f"tlatency_{_QTYPE_NAMES[k]}_bucket_{p}"] = C_TLATENCY + k * (NLAT + 1) + p
        out[f"tlatency_{_QTYPE_NAMES[k]}_sum_ns"] = C_TLATENCY + k * (NLAT + 1) + NLAT
    return out


# =============================================================================== Python API


cdef class Image:
    """A mapped zone image (bytes, mmap, any buffer); keeps the buffer alive and exported.

    The header is checked here, once, so the packet path can trust the offsets: magic,
    length, and that every table, label, rr entry, pod list and blob lies inside the image.
    """

    def __cinit__(self, buffer):
        cdef const uint8_t[::1] mem = memoryview(buffer).cast("B")
        cdef const uint8_t *b
        if mem.shape[0] < HEADER_SIZE:
            raise ValueError(f"not a kdns image: {mem.shape[0]} bytes is shorter than the header")
        b = &mem[0]
        if memcmp(b + HEADER_MAGIC, b"KDNSIMG1", 8) != 0:
            raise ValueError("not a kdns image: bad magic (expected KDNSIMG1)")
        if le32(b + HEADER_LENGTH) != <uint64_t>mem.shape[0]:
            raise ValueError(f"kdns image length mismatch: header says {le32(b + HEADER_LENGTH)}, "
                             f"buffer has {mem.shape[0]} bytes")
        self.buffer = buffer
        self.mem = mem
        self.view.base = b
        self.view.length = mem.shape[0]
        self.view.flags = le32(b + HEADER_FLAGS)
        self.view.nodes_off = le32(b + HEADER_NODES_OFF)
        self.view.nnodes = le32(b + HEADER_NNODES)
        self.view.zones_off = le32(b + HEADER_ZONES_OFF)
        self.view.nzones = le32(b + HEADER_NZONES)
        self.view.rev_off = le32(b + HEADER_REV_OFF)
        self.view.nrev = le32(b + HEADER_NREV)
        self.view.servfail = le32(b + HEADER_SERVFAIL)
        self.view.autopath = le32(b + HEADER_AUTOPATH)
        problem = check_layout(&self.view)
        if problem:
            raise ValueError(f"corrupt kdns image: {problem}; recompile it")

    def verify(self):
        """Check the header's crc32 of bytes [64, length); True, or ValueError."""
        crc = zlib.crc32(self.mem[HEADER_SIZE:])
        if crc != le32(self.view.base + HEADER_CRC):
            raise ValueError(f"kdns image crc32 mismatch: header "
                             f"{le32(self.view.base + HEADER_CRC):#x}, data {crc:#x}; the "
                             f"image is corrupt")
        return True

    @property
    def serial(self):
        return ((<uint64_t>le32(self.view.base + HEADER_SERIAL))
                | (<uint64_t>le32(self.view.base + HEADER_SERIAL + 4) << 32))

    @property
    def synced(self):
        return bool(self.view.flags & FLAG_SYNCED)

    @property
    def nbytes(self):
        return self.view.length

    @property
    def autopath(self):
        """The image carries autopath's client table (layout.py)."""
        return self.view.autopath != 0


cdef bint span_ok(const ImageView *v, uint64_t off, uint64_t n) noexcept nogil:
    return off + n <= <uint64_t>v.length


cdef bint blob_ok(const ImageView *v, uint32_t off) noexcept nogil:
    cdef const uint8_t *b
    cdef uint64_t nfix, nseg, dlen, seg, data, rot_at, rot_n
    cdef unsigned int k
    if off < HEADER_SIZE or not span_ok(v, off, BLOBHDR_SIZE):
        return False
    b = v.base + off
    nfix = le16(b + BLOB_NFIX)
    nseg = le16(b + BLOB_NSEG)
    dlen = le32(b + BLOB_LEN)
    rot_at = le16(b + BLOB_ROT_AT)
    rot_n = le16(b + BLOB_ROT_N)
    seg = off + BLOBHDR_SIZE + ((2 * nfix + 3) & ~3u)
    data = seg + nseg * SEG_SIZE
    if nseg == 0 or not span_ok(v, data, dlen):
        return False
    # A rotating run (layout.py, Rotation): two or more records whose every end is a
    # segment, in a blob without fixups (its records move, fixup positions would not).
    if rot_n and (rot_n < 2 or nfix or rot_at + rot_n >= nseg
                  or rot_at + rot_n > le16(b + BLOB_AN)):
        return False
    if rot_at and not rot_n:
        return False
    for k in range(nseg):
        if le32(v.base + seg + k * SEG_SIZE + SEG_END) > dlen:
            return False
        # Ends ascending: blob_body's binary search relies on it.
        if k and le32(v.base + seg + k * SEG_SIZE + SEG_END) < le32(
                v.base + seg + (k - 1) * SEG_SIZE + SEG_END):
            return False
    return True


cdef enum:
    # scan_layout's findings; check_layout words them.
    LAYOUT_OK, LAYOUT_NODES, LAYOUT_ZONES, LAYOUT_REV, LAYOUT_SERVFAIL, LAYOUT_LABEL
    LAYOUT_CHILDREN, LAYOUT_ZONE_INDEX, LAYOUT_POD_LIST, LAYOUT_NODE_RRS, LAYOUT_ZONE
    LAYOUT_REV_ENTRY, LAYOUT_AUTOPATH, LAYOUT_AUTOPATH_ENTRY


cdef bint wire_name_ok(const ImageView *v, uint64_t off, uint64_t *end) noexcept nogil:
    # An uncompressed name (RFC 1035 §3.1) inside the image, at most MAX_NAME bytes.
    cdef uint64_t start = off
    while True:
        if not span_ok(v, off, 1) or v.base[off] > MAX_LABEL or off - start >= MAX_NAME:
            return False
        if v.base[off] == 0:
            end[0] = off + 1
            return True
        off += 1 + v.base[off]


cdef int autopath_ok(const ImageView *v, uint32_t *where) noexcept nogil:
    """The autopath section (layout.py): its table, each entry's namespace label (one
    label, so the packet path compares it with a query label) and the keys strictly
    ascending (client_ns's binary search), then its search names."""
    cdef uint64_t sec = v.autopath, count, e, ns, off, end
    cdef uint32_t i, nsearch
    if sec < HEADER_SIZE or not span_ok(v, sec, AP_SIZE):
        return LAYOUT_AUTOPATH
    count = le32(v.base + sec + AP_COUNT)
    if not span_ok(v, sec + AP_SIZE, count * APENT_SIZE):
        return LAYOUT_AUTOPATH
    for i in range(<uint32_t>count):
        where[0] = i
        e = sec + AP_SIZE + <uint64_t>i * APENT_SIZE
        ns = sec + le32(v.base + e + APENT_NS)
        if not span_ok(v, ns, 1) or v.base[ns] == 0 or v.base[ns] > MAX_LABEL or not span_ok(
                v, ns, 1 + v.base[ns]):
            return LAYOUT_AUTOPATH_ENTRY
        if i and memcmp(v.base + e - APENT_SIZE + APENT_IP, v.base + e + APENT_IP, 16) >= 0:
            return LAYOUT_AUTOPATH_ENTRY
    off = sec + le32(v.base + sec + AP_SEARCH_OFF)
    nsearch = le32(v.base + sec + AP_NSEARCH)
    for i in range(nsearch):
        if not wire_name_ok(v, off, &end):
            return LAYOUT_AUTOPATH
        off = end
    return LAYOUT_OK


cdef int scan_layout(const ImageView *v, uint32_t *where) noexcept nogil:
    """Every offset the packet path follows stays inside the image (it is shared memory,
    and a bad offset would read out of bounds instead of raising). Without the GIL: a
    worker checks a new image of tens of MiB while its loop keeps serving."""
    cdef uint32_t i
    cdef const uint8_t *n
    cdef const uint8_t *e
    if not span_ok(v, v.nodes_off, <uint64_t>v.nnodes * NODE_SIZE) or v.nnodes == 0:
        return LAYOUT_NODES
    if not span_ok(v, v.zones_off, <uint64_t>v.nzones * ZONE_SIZE):
        return LAYOUT_ZONES
    if not span_ok(v, v.rev_off, <uint64_t>v.nrev * REV_SIZE):
        return LAYOUT_REV
    if not blob_ok(v, v.servfail):
        return LAYOUT_SERVFAIL
    for i in range(v.nnodes):
        where[0] = i
        n = node_at(v, i)
        if not span_ok(v, le32(n + NODE_LABEL_OFF), 1) or not span_ok(
                v, le32(n + NODE_LABEL_OFF), 1 + v.base[le32(n + NODE_LABEL_OFF)]):
            return LAYOUT_LABEL
        if <uint64_t>le32(n + NODE_FIRST_CHILD) + le32(n + NODE_NCHILD) > v.nnodes:
            return LAYOUT_CHILDREN
        if le16(n + NODE_FLAGS) & NODE_ZONE_APEX and le32(n + NODE_EXTRA) >= v.nzones:
            return LAYOUT_ZONE_INDEX
        if le16(n + NODE_FLAGS) & NODE_POD_VERIFIED and not (
                span_ok(v, le32(n + NODE_EXTRA), 4) and
                span_ok(v, le32(n + NODE_EXTRA) + 4,
                        <uint64_t>le32(v.base + le32(n + NODE_EXTRA)) * 16)):
            return LAYOUT_POD_LIST
        if not rr_entries_ok(v, le32(n + NODE_RR_OFF), le16(n + NODE_NRR)):
            return LAYOUT_NODE_RRS
    for i in range(v.nzones):
        where[0] = i
        e = zone_at(v, i)
        if le32(e + ZONE_APEX_NODE) >= v.nnodes or not blob_ok(v, le32(e + ZONE_NEG_BLOB)):
            return LAYOUT_ZONE
    for i in range(v.nrev):
        where[0] = i
        e = v.base + v.rev_off + <size_t>i * REV_SIZE
        if le16(e + REV_ZONE) >= v.nzones or not rr_entries_ok(v, le32(e + REV_RR_OFF),
                                                               le16(e + REV_NRR)):
            return LAYOUT_REV_ENTRY
    if v.autopath:
        return autopath_ok(v, where)
    return LAYOUT_OK


cdef str check_layout(const ImageView *v):
    """``scan_layout``'s finding in words; "" when the layout is sound."""
    cdef uint32_t i = 0
    cdef int code
    with nogil:
        code = scan_layout(v, &i)
    return {LAYOUT_OK: "", LAYOUT_NODES: "node table out of bounds",
            LAYOUT_ZONES: "zone table out of bounds",
            LAYOUT_REV: "reverse table out of bounds",
            LAYOUT_SERVFAIL: "SERVFAIL blob out of bounds",
            LAYOUT_LABEL: f"label of node {i} out of bounds",
            LAYOUT_CHILDREN: f"children of node {i} out of bounds",
            LAYOUT_ZONE_INDEX: f"zone index of node {i} out of bounds",
            LAYOUT_POD_LIST: f"pod list of node {i} out of bounds",
            LAYOUT_NODE_RRS: f"rr entries of node {i} out of bounds",
            LAYOUT_ZONE: f"zone {i} out of bounds",
            LAYOUT_REV_ENTRY: f"reverse entry {i} out of bounds",
            LAYOUT_AUTOPATH: "autopath section out of bounds",
            LAYOUT_AUTOPATH_ENTRY: f"autopath entry {i} out of bounds or out of order"}[code]


cdef bint rr_entries_ok(const ImageView *v, uint32_t off, unsigned int nrr) noexcept nogil:
    cdef unsigned int j
    if not span_ok(v, off, <uint64_t>nrr * RRENT_SIZE):
        return False
    for j in range(nrr):
        if not blob_ok(v, le32(v.base + off + j * RRENT_SIZE + RRENT_BLOB)):
            return False
    return True


cdef class Counters:
    """One worker's page of shared counters: counters.SLOT_WORDS native uint64 words over a
    writable buffer (one writer per page, so plain increments suffice)."""

    def __cinit__(self, buffer):
        cdef uint8_t[::1] mem = memoryview(buffer).cast("B")
        if mem.shape[0] < SLOT_WORDS * 8:
            raise ValueError(f"counter page needs {SLOT_WORDS * 8} bytes, got {mem.shape[0]}")
        if (<uintptr_t>&mem[0]) % 8:
            raise ValueError("counter page must be 8-byte aligned (use mmap or a page slice)")
        self.mem = mem
        self.words = <uint64_t *>&mem[0]

    def __len__(self):
        return SLOT_WORDS

    def __getitem__(self, Py_ssize_t i):
        if not 0 <= i < SLOT_WORDS:
            raise IndexError(i)
        return self.words[i]

    def __setitem__(self, Py_ssize_t i, uint64_t value):
        if not 0 <= i < SLOT_WORDS:
            raise IndexError(i)
        self.words[i] = value


cdef class Rotation:
    """refpath.Rotation: a worker's rotation counters (ROT_SLOTS of them, one per hashed
    answer blob), allocated once; the packet path advances them without the GIL."""
    cdef Rotor r

    def __cinit__(self):
        self.r.slots = <uint32_t *>PyMem_Calloc(ROT_SLOTS, sizeof(uint32_t))
        self.r.fixed = 0
        if self.r.slots == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.r.slots)

    @property
    def slots(self):
        """The counters as a list (tests compare them with refpath.Rotation's)."""
        return [self.r.slots[i] for i in range(ROT_SLOTS)]


cdef Rotor *rotor_of(object rotation, Rotor *fixed) except? NULL:
    """The Rotor for ``answer``'s ``rotation``: a Rotation's counters, or a fixed counter."""
    if isinstance(rotation, Rotation):
        return &(<Rotation>rotation).r
    fixed.slots = NULL
    fixed.fixed = <uint32_t>(int(rotation) & 0xFFFFFFFF)
    return fixed


cdef const uint8_t *key_of(object client) except? NULL:
    # A Python caller's client: None, or its 16-byte key (encode.ip_key).
    if client is None:
        return NULL
    if not isinstance(client, bytes) or len(client) != 16:
        raise ValueError("client must be a 16-byte address key (encode.ip_key) or None")
    return <const uint8_t *><const char *>client


def answer(Image img not None, bytes query not None, bint tcp=False, *, int edns_max,
           bint ra=False, rotation=0, client=None):
    """One query -> (action, reply); reply is b"" unless action is 1 (send). The same result
    as refpath.answer(refpath.Image(buf), query, tcp=tcp, edns_max=edns_max, ra=ra,
    rotation=...) for the same rotation state (a Rotation, or a fixed counter); ``client``:
    the sender's 16-byte address key, for autopath."""
    cdef Outcome res
    cdef int action
    cdef Rotor fixed
    cdef Rotor *rot = rotor_of(rotation, &fixed)
    cdef const uint8_t *ck = key_of(client)
    cdef uint8_t *out = <uint8_t *>PyMem_Malloc(OUT_MAX)
    if out == NULL:
        raise MemoryError()
    try:
        action = answer_query(&img.view, <const uint8_t *><const char *>query, len(query), tcp,
                              edns_max, out, OUT_MAX, &res, ra, rot, ck)
        if action != ACTION_SEND:
            return action, b""
        return action, PyBytes_FromStringAndSize(<char *>out, res.length)
    finally:
        PyMem_Free(out)


def tcp_answer(Image img not None, Counters c not None, const unsigned char[::1] msg,
               int edns_max, bint ra=False, bint v6=False, Rotation rotation=None,
               client=None):
    """One TCP message (without its length prefix) -> (action, reply), counted under tcp
    (``v6``: the client is IPv6). RFC 7766 framing stays with the caller; TCP is not the
    hot path. ``rotation``: the worker's (None: the compiled order). ``client``: the
    peer's 16-byte address key, for autopath (None: none)."""
    cdef const uint8_t *ck = key_of(client)
    cdef Outcome res
    cdef int action
    cdef Rotor *rot = &rotation.r if rotation is not None else NULL
    cdef int64_t t0
    cdef Py_ssize_t n = msg.shape[0]
    cdef const uint8_t *q = &msg[0] if n else NULL
    cdef uint8_t *out = <uint8_t *>PyMem_Malloc(OUT_MAX)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            t0 = now_ns()
            action = answer_query(&img.view, q, n, True, edns_max, out, OUT_MAX, &res, ra, rot,
                                  ck)
            count_packet(c.words, PROTO_TCP, n, action, &res, out, v6)
            # A hand-off's time is counted when its reply is sent (engine.count_reply); a
            # dropped message has none.
            if action == ACTION_SEND:
                t0 = now_ns() - t0
                count_latency(c.words, PROTO_TCP, 1, t0)
                count_type_latency(c.words, res.qtype, t0)
        if action != ACTION_SEND:
            return action, b""
        return action, PyBytes_FromStringAndSize(<char *>out, res.length)
    finally:
        PyMem_Free(out)


def bench_answer(Image img not None, bytes query not None, Py_ssize_t n, bint tcp=False, *,
                 int edns_max, Rotation rotation=None):
    """Mean nanoseconds per answer_query() over ``n`` runs, with no Python in the loop;
    with ``rotation``, as a worker that rotates answers."""
    cdef Outcome res
    cdef Rotor *rot = &rotation.r if rotation is not None else NULL
    cdef Py_ssize_t k
    cdef int64_t t0, t1
    cdef uint64_t sink = 0
    cdef const uint8_t *q = <const uint8_t *><const char *>query
    cdef Py_ssize_t qlen = len(query)
    cdef uint8_t *out = <uint8_t *>PyMem_Malloc(OUT_MAX)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            t0 = now_ns()
            for k in range(n):
                sink += answer_query(&img.view, q, qlen, tcp, edns_max, out, OUT_MAX, &res,
                                     False, rot)
                sink += res.length
            t1 = now_ns()
        if sink == 0 and n > 0:
            return float("nan")          # keeps ``sink`` observable to the optimiser
        return (t1 - t0) / <double>max(n, 1)
    finally:
        PyMem_Free(out)


include "pktcache.pxi"
include "fwd.pxi"


cdef uint8_t *slot_area(int nslots):
    """``nslots`` query slots of UDP_SLOT bytes, mapped lazily: a slot costs memory only
    for the pages its datagrams reach (one page for a common query), so every slot can take
    the largest datagram without a per-packet allocation. NULL when the map fails."""
    cdef void *p = mmap(NULL, <size_t>nslots * UDP_SLOT, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    return NULL if p == MAP_FAILED else <uint8_t *>p


cdef class UdpServer:
    """Drains one UDP socket in batches with the GIL released: recvmmsg, answer each packet
    in place, one sendmmsg (NSD's handle_udp shape). All buffers are allocated here, once.

    Packets the image does not answer are kept for the caller (the forwarder's work):
    ``serve`` returns how many, ``handoff_packet(i)`` / ``handoff_addr(i)`` give them back.
    The socket is the caller's: this class never closes it. One thread serves at a time
    (the buffers are the server's own, reused by every call).
    """
    cdef int fd
    cdef int edns_max
    cdef int batch
    cdef int nhandoff
    cdef bint spilled                   # a datagram reached past a slot's first UDP_BUF bytes
    cdef readonly int last_errno
    cdef public bint ra                 # set RA on the image's replies: this worker forwards
    cdef mmsghdr *rmsgs
    cdef mmsghdr *smsgs
    cdef iovec *riov
    cdef iovec *siov
    cdef sockaddr_storage *addrs
    cdef uint8_t *inbuf
    cdef uint8_t *outbuf
    cdef uint8_t *hbuf
    cdef uint16_t *hlen
    cdef int64_t *hts                   # when each hand-off was received (CLOCK_MONOTONIC)
    cdef int *sqtype                    # each queued reply's query type (its latency label)
    cdef sockaddr_storage *haddr
    cdef object cache                   # PacketCache or None; ctab/cmask point into it
    cdef PCEntry *ctab
    cdef PCTable *ct
    cdef uint64_t cmask
    cdef int cedns
    cdef object fwd                     # FwdEngine or None; fws points into it
    cdef FwState *fws
    cdef object rotation                # Rotation or None; rot points into it
    cdef Rotor *rot
    cdef int nrecv                      # datagrams the last drain() received
    cdef epoll_event *wevs              # wait(): the event loop's ready fds
    cdef readonly uint64_t holds        # wait(): adaptive holds taken (tests, metrics)
    # What a wake-up costs is counted here, not guessed (bench/wakeups.py counts syscalls
    # from outside): epoll_wait returns inside wait(), recvmmsg calls that received
    # datagrams, the datagrams, and wait() calls (each one a return to Python).
    cdef readonly uint64_t wakeups
    cdef readonly uint64_t batches
    cdef readonly uint64_t datagrams
    cdef readonly uint64_t waits
    cdef int idle_holds                 # wait(): holds in a row that found nothing (<= 6)
    cdef int hold_skip                  # wait(): small batches left to answer without a hold
    cdef bint held                      # wait(): the last wake-up followed a hold

    def __cinit__(self, int fd, int edns_max, int batch=64):
        if fd < 0:
            raise ValueError(f"fd must be an open socket, got {fd}")
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch must be between 1 and 1024, got {batch}")
        self.fd = fd
        self.edns_max = min(edns_max, UDP_BUF)  # a reply must fit its slot's buffer
        self.batch = batch
        self.rmsgs = <mmsghdr *>PyMem_Malloc(batch * sizeof(mmsghdr))
        self.smsgs = <mmsghdr *>PyMem_Malloc(batch * sizeof(mmsghdr))
        self.riov = <iovec *>PyMem_Malloc(batch * sizeof(iovec))
        self.siov = <iovec *>PyMem_Malloc(batch * sizeof(iovec))
        self.addrs = <sockaddr_storage *>PyMem_Malloc(batch * sizeof(sockaddr_storage))
        self.inbuf = slot_area(batch)
        self.outbuf = <uint8_t *>PyMem_Malloc(batch * UDP_BUF)
        self.hbuf = slot_area(HANDOFF_CAP)
        self.hlen = <uint16_t *>PyMem_Malloc(HANDOFF_CAP * sizeof(uint16_t))
        self.hts = <int64_t *>PyMem_Malloc(HANDOFF_CAP * sizeof(int64_t))
        self.sqtype = <int *>PyMem_Malloc(batch * sizeof(int))
        self.haddr = <sockaddr_storage *>PyMem_Malloc(HANDOFF_CAP * sizeof(sockaddr_storage))
        self.wevs = <epoll_event *>PyMem_Malloc(WAIT_EVENTS * sizeof(epoll_event))
        if not (self.rmsgs and self.smsgs and self.riov and self.siov and self.addrs and
                self.inbuf and self.outbuf and self.hbuf and self.hlen and self.hts and
                self.sqtype and self.haddr and self.wevs):
            raise MemoryError()
        memset(self.rmsgs, 0, batch * sizeof(mmsghdr))
        memset(self.smsgs, 0, batch * sizeof(mmsghdr))
        memset(self.haddr, 0, HANDOFF_CAP * sizeof(sockaddr_storage))
        cdef int i
        for i in range(batch):
            self.riov[i].iov_base = self.inbuf + <size_t>i * UDP_SLOT
            self.riov[i].iov_len = UDP_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riov[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = &self.addrs[i]
            self.smsgs[i].msg_hdr.msg_iov = &self.siov[i]
            self.smsgs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        PyMem_Free(self.rmsgs)
        PyMem_Free(self.smsgs)
        PyMem_Free(self.riov)
        PyMem_Free(self.siov)
        PyMem_Free(self.addrs)
        if self.inbuf != NULL:
            munmap(self.inbuf, <size_t>self.batch * UDP_SLOT)
        PyMem_Free(self.outbuf)
        if self.hbuf != NULL:
            munmap(self.hbuf, <size_t>HANDOFF_CAP * UDP_SLOT)
        PyMem_Free(self.hlen)
        PyMem_Free(self.hts)
        PyMem_Free(self.sqtype)
        PyMem_Free(self.haddr)
        PyMem_Free(self.wevs)

    def set_cache(self, PacketCache cache):
        """Answer hand-offs found in ``cache`` here, without Python (None: stop)."""
        self.cache = cache
        self.ctab = cache.t.tab if cache is not None else NULL
        self.ct = &cache.t if cache is not None else NULL
        self.cmask = cache.t.mask if cache is not None else 0
        self.cedns = cache.edns_size if cache is not None else 0

    def set_rotation(self, Rotation rotation):
        """Rotate A, AAAA and SRV answers by ``rotation``'s counters (CoreDNS loadbalance);
        None: the compiled order."""
        self.rotation = rotation
        self.rot = &rotation.r if rotation is not None else NULL

    def set_forwarder(self, FwdEngine fwd):
        """Forward plain cache misses from C (fwd.pxi); None: Python does."""
        self.fwd = fwd
        self.fws = fwd.s if fwd is not None else NULL

    def serve(self, Image img not None, Counters c not None, int max_batches=16):
        """Drain the socket: at most ``max_batches`` recvmmsg batches, stopping early when it
        is empty or the handoff area is full. Returns the number of handoff packets stored.
        A socket error other than EAGAIN/EINTR ends the call and is left in ``last_errno``."""
        cdef ImageView view = img.view
        cdef uint64_t *ctr = c.words
        cdef int err
        self.nhandoff = 0
        self.release_spill()
        with nogil:
            err = self.drain(&view, ctr, max_batches)
        self.last_errno = err
        return self.nhandoff

    def pump(self, Image img not None, Counters c not None, int budget_us=2000,
             int max_batches=16):
        """serve() and the compiled forwarder's reply drain in one loop without the GIL
        (kdns/forward/handoff.py CompiledForward): waits on the client socket and the upstream
        sockets together, so a forwarded query and its reply cost no trip through the event
        loop. Returns to Python after ``budget_us`` at most, as soon as Python has work (hand-
        offs, handbacks), or when both sides stay idle for a millisecond. Same return value
        as serve(). Without a forwarder it is serve()."""
        cdef ImageView view = img.view
        cdef uint64_t *ctr = c.words
        cdef int err
        cdef epoll_event ev
        if self.fws == NULL:
            return self.serve(img, c, max_batches)
        if not self.fws.client_watched:
            ev.events = EPOLLIN
            ev.data.u32 = FW_CLIENT
            if epoll_ctl(self.fws.epfd, EPOLL_CTL_ADD, self.fd, &ev) < 0:
                raise OSError(errno, "epoll_ctl failed")
            self.fws.client_watched = 1
        self.nhandoff = 0
        self.release_spill()
        with nogil:
            err = self.pump_loop(&view, ctr, budget_us, max_batches)
        self.last_errno = err
        return self.nhandoff

    def wait(self, Image img not None, Counters c not None, int epfd, int timeout_ms,
             int hold_us=0, int max_batches=16):
        """The worker's event-loop wait (kdns/serve/worker.py UdpSelector), without the GIL:
        epoll_wait on the event loop's own epoll set ``epfd``, in which this socket (and
        the forwarder's epoll fd, set_forwarder) are registered with their fd as data.
        Their events are served here: UDP queries answered, upstream replies relayed. It
        returns only when Python has work: the loop's other ready fds as [(fd, events)]
        (TCP, control channels, the loop's self-pipe), hand-offs (the return value of
        ``handoffs``), the forwarder's handbacks, ``timeout_ms`` passed (-1: none; the
        loop's next timer, so its heartbeat proves this loop runs), a signal, or a socket
        error (``last_errno``). A wake-up costs what NSD's does (epoll_wait, recvmmsg,
        sendmmsg) and no Python.

        ``hold_us`` > 0: after a small batch (fewer than ``batch`` datagrams) sleep that
        long before waiting again, so the next wake-up finds several queries to answer in
        one recvmmsg and one sendmmsg (and wakes the client once for all of them). Queries
        wait at most ``hold_us`` longer; a full batch never holds (a busy socket is drained
        at once). A hold that finds nothing backs the holds off (the next 1, 3, 7 ... 63
        small batches hold not), so at a light load a hold seldom costs a wake-up of its own."""
        cdef ImageView view = img.view
        cdef uint64_t *ctr = c.words
        cdef int n, i
        self.nhandoff = 0
        self.release_spill()
        self.waits += 1
        with nogil:
            n = self.wait_loop(&view, ctr, epfd, timeout_ms, hold_us, max_batches)
        if n < 0:
            self.last_errno = 0
            if -n == EINTR:
                return []               # a signal: its Python handler runs in the loop
            raise OSError(-n, "epoll_wait failed")
        return [(self.wevs[i].data.fd, self.wevs[i].events) for i in range(n)]

    @property
    def handoffs(self):
        """Hand-off packets stored by the last serve/pump/wait (handoff_packet(i))."""
        return self.nhandoff

    @property
    def handbacks(self):
        """Queries the compiled forwarder is handing back to Python (FwdEngine.handbacks)."""
        return self.fws.nhb if self.fws != NULL else 0

    cdef int wait_loop(self, const ImageView *img, uint64_t *ctr, int epfd, int timeout_ms,
                       int hold_us, int max_batches) noexcept nogil:
        """wait()'s loop: the count of ready fds left in wevs for Python, or -errno."""
        cdef int n, i, k, err, wait = timeout_ms
        cdef int fwfd = self.fws.epfd if self.fws != NULL else -1
        cdef bint udp, fwd
        cdef int64_t now, deadline = 0
        cdef timespec hold
        hold.tv_sec = hold_us // 1000000
        hold.tv_nsec = (hold_us % 1000000) * 1000
        self.last_errno = 0
        if timeout_ms > 0:
            deadline = now_ns() + <int64_t>timeout_ms * 1000000
        while True:
            n = epoll_wait(epfd, self.wevs, WAIT_EVENTS, wait)
            if n < 0:
                return -errno
            self.wakeups += 1
            k = 0
            udp = fwd = False
            for i in range(n):
                if self.wevs[i].data.fd == self.fd:
                    udp = True
                elif self.wevs[i].data.fd == fwfd:
                    fwd = True
                else:
                    self.wevs[k] = self.wevs[i]
                    k += 1
            if fwd:
                fw_drain(self.fws, ctr)
            self.nrecv = 0
            if udp:
                err = self.drain(img, ctr, max_batches)
                if err:
                    self.last_errno = err
                    return k
            if self.held:
                # What the last hold found: nothing means the load is too light for holds
                # to pay (each costs a wake-up of its own): the next 1, 3, 7 ... 63 small
                # batches hold not.
                self.held = False
                if self.nrecv:
                    self.idle_holds = 0
                elif self.idle_holds < 6:
                    self.idle_holds += 1
                self.hold_skip = (1 << self.idle_holds) - 1
            # Prefetches the cache's hits queued are Python's to start (CoreDNS cache
            # prefetch), as hand-offs are.
            if k or self.nhandoff or (self.fws != NULL and self.fws.nhb) \
                    or (self.ct != NULL and self.ct.ndue):
                return k
            if timeout_ms == 0:
                return 0
            wait = timeout_ms
            if timeout_ms > 0:
                now = now_ns()
                if now >= deadline:
                    return 0
                wait = <int>((deadline - now + 999999) // 1000000)
            if hold_us > 0 and 0 < self.nrecv < self.batch:
                if self.hold_skip > 0:
                    self.hold_skip -= 1
                else:
                    # Low load: let the next few queries queue up (see wait()).
                    self.holds += 1
                    self.held = True
                    clock_nanosleep(CLOCK_MONOTONIC, 0, &hold, NULL)
                    wait = 0            # what the hold gathered, and only that

    cdef void release_spill(self) noexcept:
        # Large datagrams leave their pages resident; give them back once the call that
        # received them is over (the caller has copied its hand-offs out by now), so a burst
        # of them costs memory for one call only. Common queries never set the flag.
        if self.spilled:
            madvise(self.inbuf, <size_t>self.batch * UDP_SLOT, MADV_DONTNEED)
            madvise(self.hbuf, <size_t>HANDOFF_CAP * UDP_SLOT, MADV_DONTNEED)
            self.spilled = False

    cdef int pump_loop(self, const ImageView *img, uint64_t *ctr, int budget_us,
                       int max_batches) noexcept nogil:
        cdef epoll_event evs[FW_EVENTS]
        cdef FwState *s = self.fws
        cdef int n, i, err, wait = 0
        cdef bint client
        cdef int64_t now, end = now_ns() + <int64_t>budget_us * 1000
        while True:
            n = epoll_wait(s.epfd, evs, FW_EVENTS, wait)
            if n < 0:
                if errno == EINTR:
                    continue
                return 0
            if n == 0 and wait:
                return 0                # idle: back to the event loop
            client = False
            now = now_ns()
            for i in range(n):
                if evs[i].data.u32 == FW_CLIENT:
                    client = True
                elif <int>evs[i].data.u32 < s.nsock:
                    fw_drain_sock(s, evs[i].data.u32, ctr, now)
            fw_tx_flush(s)
            if client:
                err = self.drain(img, ctr, max_batches)
                if err:
                    return err
            if self.nhandoff or s.nhb or now_ns() >= end:
                return 0
            wait = 1

    cdef int drain(self, const ImageView *img, uint64_t *ctr, int max_batches) noexcept nogil:
        cdef int b, n, want, e, nsend, j
        cdef int64_t t0
        for b in range(max_batches):
            want = min(self.batch, HANDOFF_CAP - self.nhandoff)
            if want <= 0:
                return 0                # handoff area full: the caller forwards first
            for n in range(want):
                self.rmsgs[n].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                self.rmsgs[n].msg_hdr.msg_flags = 0
            n = recvmmsg(self.fd, self.rmsgs, want, MSG_DONTWAIT, NULL)
            if n < 0:
                e = errno
                if e == EINTR:
                    continue
                return 0 if KDNS_WOULD_BLOCK(e) else e
            t0 = now_ns()
            self.nrecv += n
            self.batches += 1
            self.datagrams += n
            nsend = self.answer_batch(img, ctr, n, t0)
            self.send_all(ctr, nsend)
            if self.fws != NULL and self.fws.nq:
                fw_flush(self.fws)
            # The replies sent now. A forwarded query's time runs until its reply is
            # relayed (fw_drain_sock) or sent by Python (engine.count_reply), so a slow
            # upstream shows in the request duration, as in CoreDNS's.
            t0 = now_ns() - t0
            count_latency(ctr, PROTO_UDP, nsend, t0)
            for j in range(nsend):
                count_type_latency(ctr, self.sqtype[j], t0)
            if n < want:
                return 0                # drained: a further recvmmsg would say EAGAIN
        return 0

    cdef int answer_batch(self, const ImageView *img, uint64_t *ctr, int n,
                          int64_t received) noexcept nogil:
        """Answer packets [0, n) (``received`` then) into their out slots; queue replies,
        keep handoffs."""
        cdef int i, action, nsend = 0
        cdef Outcome res
        cdef uint8_t *inp
        cdef uint8_t *outp
        cdef Py_ssize_t plen
        cdef int64_t now = 0
        cdef uint8_t key[16]
        cdef const uint8_t *ck
        for i in range(n):
            if self.rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                # Longer than a slot, which is longer than any UDP payload (UDP_SLOT): not a
                # datagram this socket can receive. Answering a prefix would be wrong.
                ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_DROPPED] += 1
                continue
            inp = self.inbuf + <size_t>i * UDP_SLOT
            outp = self.outbuf + i * UDP_BUF
            plen = self.rmsgs[i].msg_len
            if plen > UDP_BUF:
                self.spilled = True
            ck = NULL
            if img.autopath and client_key(&self.addrs[i], key):
                ck = key                # autopath: the sender's pod namespace decides
            action = answer_query(img, inp, plen, False, self.edns_max, outp, UDP_BUF, &res,
                                  self.ra, self.rot, ck)
            if action == ACTION_HANDOFF and self.ctab != NULL:
                # Outside the image: the forwarder's cache may hold it.
                if now == 0:
                    now = now_ns()
                action = cache_answer(self.ct, self.cedns, inp, plen, now,
                                      outp, &res)
                ctr[C_EVENTS + PROTO_UDP * NEVENTS +
                    (EV_CACHE_HIT if action == ACTION_SEND else EV_CACHE_MISS)] += 1
                if action == ACTION_SEND and res.cache_denial:
                    ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_CACHE_HIT_DENIAL] += 1
            count_packet(ctr, PROTO_UDP, plen, action, &res, outp,
                         client_is_ipv6(&self.addrs[i]))
            if action == ACTION_HANDOFF and res.outside and self.fws != NULL:
                if now == 0:
                    now = now_ns()
                if fw_submit(self.fws, inp, plen, &self.addrs[i],
                             self.rmsgs[i].msg_hdr.msg_namelen, now):
                    continue                # forwarded from C: its reply comes via drain
            if action == ACTION_SEND:
                self.sqtype[nsend] = res.qtype
                self.siov[nsend].iov_base = outp
                self.siov[nsend].iov_len = res.length
                self.smsgs[nsend].msg_hdr.msg_name = &self.addrs[i]
                self.smsgs[nsend].msg_hdr.msg_namelen = self.rmsgs[i].msg_hdr.msg_namelen
                nsend += 1
            elif action == ACTION_HANDOFF:
                memcpy(self.hbuf + <size_t>self.nhandoff * UDP_SLOT, inp, plen)
                self.hlen[self.nhandoff] = <uint16_t>plen
                self.hts[self.nhandoff] = received
                memcpy(&self.haddr[self.nhandoff], &self.addrs[i], sizeof(sockaddr_storage))
                self.nhandoff += 1
        return nsend

    cdef void send_all(self, uint64_t *ctr, int nsend) noexcept nogil:
        # sendmmsg may send a prefix; resume after it. A full socket buffer (EAGAIN) drops
        # the rest, as a busy server must; any other error loses only that one datagram.
        cdef int sent = 0, r, e
        cdef uint64_t *failed = &ctr[C_EVENTS + PROTO_UDP * NEVENTS + EV_SEND_FAILED]
        while sent < nsend:
            r = sendmmsg(self.fd, self.smsgs + sent, nsend - sent, MSG_DONTWAIT)
            if r > 0:
                sent += r
                continue
            e = errno
            if r < 0 and e == EINTR:
                continue
            if r == 0 or KDNS_WOULD_BLOCK(e):
                failed[0] += nsend - sent
                return
            failed[0] += 1
            sent += 1

    def handoff_packet(self, int i):
        if not 0 <= i < self.nhandoff:
            raise IndexError(f"handoff index {i} out of range (have {self.nhandoff})")
        return PyBytes_FromStringAndSize(<char *>self.hbuf + <size_t>i * UDP_SLOT, self.hlen[i])

    def handoff_received_ns(self, int i):
        """When hand-off ``i`` was received (CLOCK_MONOTONIC ns, as time.monotonic_ns()):
        its request duration ends when Python sends the reply."""
        if not 0 <= i < self.nhandoff:
            raise IndexError(f"handoff index {i} out of range (have {self.nhandoff})")
        return self.hts[i]

    def handoff_addr(self, int i):
        """The client's address, socket-module style: (host, port) or
        (host, port, flowinfo, scope_id)."""
        cdef char text[INET6_ADDRSTRLEN + 1]
        cdef sockaddr_in *a4
        cdef sockaddr_in6 *a6
        if not 0 <= i < self.nhandoff:
            raise IndexError(f"handoff index {i} out of range (have {self.nhandoff})")
        if self.haddr[i].ss_family == AF_INET:
            a4 = <sockaddr_in *>&self.haddr[i]
            inet_ntop(AF_INET, &a4.sin_addr, text, sizeof(text))
            return (text.decode("ascii"), ntohs(a4.sin_port))
        if self.haddr[i].ss_family == AF_INET6:
            a6 = <sockaddr_in6 *>&self.haddr[i]
            inet_ntop(AF_INET6, &a6.sin6_addr, text, sizeof(text))
            return (text.decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
                    a6.sin6_scope_id)
        raise ValueError(f"unsupported address family {self.haddr[i].ss_family}")


def _count_latency_for_test(Counters c not None, int64_t ns):
    """Count one UDP packet that took ``ns``: lets tests pin the bucket edges."""
    count_latency(c.words, PROTO_UDP, 1, ns)
    count_type_latency(c.words, 1, ns)
