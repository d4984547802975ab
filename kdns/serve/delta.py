"""A compact diff of one zone image against the previous one, and its application.

Why: thousands of node-locals follow one central kdns; a 30 MiB image per change and node
would be 150 GB of traffic per change at 5,000 nodes. Between two generations most bytes are
the same, but an inserted name shifts everything after it: blobs move, and every offset
that points past the insertion (node and rr entries) grows by the same amount. So the diff
is cut in chunks, each aligned to the base at the shift that last matched (re-found with a
probe when a chunk stops matching), and a chunk that is not an exact copy is sent as the
difference of the two chunks read as little-endian integers: offsets that all moved by k
become runs of the same small number, which zlib shrinks to almost nothing.

Format (all integers little-endian), then zlib-compressed as a whole::

    magic b"KDNSDLT1", base length I, base crc I, target length I, target crc I, op count I
    the ops: kind B, length I, base offset I
    then each op's data, in op order (apart from the ops, so the runs of small
    differences sit next to each other for zlib):
      COPY (0): nothing               target[len] = base[off:off+len]
      DIFF (1): sign B, |d| len bytes  target = base[off:off+len] + d  (as integers)
      DATA (2): len bytes              target = the bytes

The crcs are the images' own header crcs (kdns/zone/layout.py, bytes [64, length)); the
receiver checks the result exactly as a worker checks an image it is handed
(``engine.Image(...).verify()``) before it publishes it.

What it must not do: trust its input. ``apply`` raises DeltaError on anything malformed.
"""
from __future__ import annotations

import struct
import zlib

from kdns.zone.layout import HEADER_CRC, HEADER_LENGTH

MAGIC = b"KDNSDLT1"
HEAD = struct.Struct("<8sIIIII")
OP = struct.Struct("<BII")
COPY, DIFF, DATA = 0, 1, 2
CHUNK = 4096          # a changed chunk costs at most this before compression
PROBE = 64            # bytes searched for when a chunk stops matching at the current shift
WINDOW = 1 << 16      # how far around the current shift a probe is looked for
RECENT = 8            # recent shifts kept as candidates
# Shifts tried around the current one: the sizes of the image's fixed entries (node 24,
# rr 8, zone 16, reverse 28) and small multiples, as an inserted entry moves the rest.
STRIDES = (4, 8, 12, 16, 24, 28, 32, 48, 56, 72, 84, 96)
MAX_OUTPUT = 1 << 28  # refuse to build an image beyond 256 MiB from a delta


class DeltaError(ValueError):
    """A delta that does not apply to this base (wrong base, truncated, malformed)."""


def image_crc(data) -> int:
    return struct.unpack_from("<I", data, HEADER_CRC)[0]


def image_length(data) -> int:
    return struct.unpack_from("<I", data, HEADER_LENGTH)[0]


def _match_len(a: memoryview, b: memoryview) -> int:
    """Length of the common prefix of ``a`` and ``b``: windows doubling from 64 bytes until
    one differs, then halvings inside it, so the cost follows the match, not the image."""
    n = min(len(a), len(b))
    lo, step = 0, 64                 # a[:lo] == b[:lo]
    while lo < n:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, step = hi, step * 2
    else:
        return n
    while hi - lo > 1:               # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def make(base, target, level: int = 9) -> bytes:
    """The compressed delta turning ``base`` into ``target`` (both whole images)."""
    b, t = memoryview(base).cast("B"), memoryview(target).cast("B")
    bb = base if hasattr(base, "find") else bytes(b)    # bytes or mmap: both find() in C
    out: list[bytes] = []        # the ops
    data: list[bytes] = []       # their bytes, in op order, after all the ops
    shift = 0                # base offset - target offset for the current alignment
    pending = None           # a COPY run being extended: [target start, base start, length]
    pos = 0
    recent: list[int] = []   # shifts used lately: sections re-align to them

    def flush():
        nonlocal pending
        if pending is not None:
            out.append(OP.pack(COPY, pending[2], pending[1]))
            pending = None

    def copy(bo: int, n: int):
        nonlocal pending
        if pending is not None and pending[1] + pending[2] == bo:
            pending[2] += n
        else:
            flush()
            pending = [pos, bo, n]

    while pos < len(t):
        bo = pos + shift
        if 0 <= bo < len(b):
            n = _match_len(t[pos:], b[bo:])
            if n:
                copy(bo, n)
                pos += n
                continue
        # A mismatch at pos. Tables of fixed-size entries change in every entry when the
        # offsets they hold move, so an exact probe rarely re-finds them: the alignment is
        # the candidate shift under which the most bytes of the chunk are equal.
        end = min(len(t), pos + CHUNK)
        n = end - pos
        tv = int.from_bytes(t[pos:end], "little")
        def best_of(cands):
            best, best_score, best_bv = None, -1, 0
            for c in cands:
                bo = pos + c
                if bo < 0 or bo + n > len(b):
                    continue
                bv = int.from_bytes(b[bo:bo + n], "little")
                score = (tv ^ bv).to_bytes(n, "little").count(0)
                if score > best_score or (score == best_score and c == shift):
                    best, best_score, best_bv = c, score, bv
            return best, best_score, best_bv

        best, best_score, best_bv = best_of((shift,))
        cands = {shift}
        if best_score < n - n // 64:
            # Not a few changed bytes in place: try the shifts an inserted or removed entry
            # makes, and the ones used lately.
            cands.update(recent)
            cands.update(shift + k for k in STRIDES)
            cands.update(shift - k for k in STRIDES)
            got = best_of(cands - {shift})
            if got[1] > best_score:
                best, best_score, best_bv = got
        if best_score < n:
            # No near shift explains the chunk: look for its bytes (a section that grew
            # or shrank by more than an entry or two).
            found = set()
            for at in range(pos, end - PROBE + 1, CHUNK // 4):
                probe = bytes(t[at:at + PROBE])
                lo = max(0, at + shift - WINDOW)
                hit = bb.find(probe, lo, min(len(bb), at + shift + WINDOW + PROBE))
                if hit >= 0:
                    found.add(hit - at)
            if found - cands:
                got = best_of(found - cands)
                if got[1] > best_score:
                    best, best_score, best_bv = got
        if best is None or best_score < n // 8:
            flush()
            out.append(OP.pack(DATA, n, 0))
            data.append(bytes(t[pos:end]))
            pos = end
            continue
        if best != shift:
            shift = best
            recent.insert(0, best)
            del recent[RECENT:]
            if _match_len(t[pos:pos + PROBE], b[pos + shift:pos + shift + PROBE]) == PROBE:
                continue            # an exact run again: copy it
        flush()
        d = tv - best_bv
        out.append(OP.pack(DIFF, n, pos + shift))
        data.append((b"\1" if d < 0 else b"\0") + abs(d).to_bytes(n, "little"))
        pos = end
    flush()
    head = HEAD.pack(MAGIC, len(b), image_crc(b), len(t), image_crc(t), len(out))
    return zlib.compress(head + b"".join(out) + b"".join(data), level)


def header(delta: bytes) -> tuple[int, int, int, int, int]:
    """(base length, base crc, target length, target crc, op count) of a compressed delta."""
    try:
        raw = zlib.decompressobj().decompress(delta, HEAD.size)
    except zlib.error as e:
        raise DeltaError(f"not a zlib stream ({e})") from None
    if len(raw) < HEAD.size or raw[:8] != MAGIC:
        raise DeltaError("not a kdns image delta")
    return HEAD.unpack_from(raw)[1:]


def apply(base, delta: bytes) -> bytes:
    """The target image of ``delta`` built on ``base``; DeltaError if it does not fit."""
    b = memoryview(base).cast("B")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(delta, MAX_OUTPUT * 2)
    except zlib.error as e:
        raise DeltaError(f"not a zlib stream ({e})") from None
    if not d.eof or d.unconsumed_tail:
        raise DeltaError("the delta is truncated (its zlib stream does not end)")
    if len(raw) < HEAD.size or raw[:8] != MAGIC:
        raise DeltaError("not a kdns image delta")
    _, blen, bcrc, tlen, tcrc, nops = HEAD.unpack_from(raw)
    if blen != len(b) or bcrc != image_crc(b):
        raise DeltaError("the delta is against another base image")
    if tlen > MAX_OUTPUT:
        raise DeltaError("the delta's target is too large")
    at = HEAD.size + nops * OP.size         # the ops, then their data
    if at > len(raw):
        raise DeltaError("truncated ops")
    out = bytearray()
    for i in range(nops):
        kind, n, off = OP.unpack_from(raw, HEAD.size + i * OP.size)
        if len(out) + n > tlen:
            raise DeltaError("the ops build more than the target length")
        if kind == COPY:
            if off + n > len(b):
                raise DeltaError("a copy beyond the base")
            out += b[off:off + n]
        elif kind == DIFF:
            if off + n > len(b) or at + 1 + n > len(raw):
                raise DeltaError("a diff beyond the base or the delta")
            mag = int.from_bytes(raw[at + 1:at + 1 + n], "little")
            v = int.from_bytes(b[off:off + n], "little") + (-mag if raw[at] else mag)
            if not 0 <= v < 1 << (8 * n):
                raise DeltaError("a diff out of range")
            out += v.to_bytes(n, "little")
            at += 1 + n
        elif kind == DATA:
            if at + n > len(raw):
                raise DeltaError("truncated data")
            out += raw[at:at + n]
            at += n
        else:
            raise DeltaError(f"unknown op {kind}")
    if at != len(raw):
        raise DeltaError("bytes after the last op's data")
    if len(out) != tlen or (tlen >= 64 and image_crc(out) != tcrc):
        raise DeltaError("the result does not have the target's length or crc")
    return bytes(out)
