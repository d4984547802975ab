"""Fuzz target: the compiled answer function against the reference path, byte for byte.

Input: two bytes of options, then the query. The first: image kind, TCP, the server's EDNS
size, RA, the image with custom records, the image with autopath's client table; the
second: the rotation state and (bits 2-3) the client address autopath looks up.
``_fastpath.answer`` and ``refpath.answer`` must return the same action and the same bytes
for the same rotation state (what tests/test_fastpath.py holds over Hypothesis' queries, here
coverage-guided). The images hold answers that rotate.
"""
from __future__ import annotations

import sys

import common

with common.instrumented():
    from kdns.packet import _fastpath as F
    from kdns.zone import refpath as P
    import zonefixtures as Z
    from kdns.zone.encode import ip_key

KINDS = ({"pods": "insecure"}, {"pods": "verified"}, {"pods": "disabled"},
         {"pods": "insecure", "synced": False})
EDNS_MAX = (1232, 512, 4096, 65535)
# Fixed rotation counters: the compiled order, one step, and two that pass the end of the
# rotating runs (6 A records and SRVs, 120 in big) at different records.
ROTATION = (0, 1, 5, 119)
IMAGES: list = []
CLIENTS = tuple(None if c is None else ip_key(c) for c in Z.AUTOPATH_CLIENTS)


def setup() -> None:
    for kw in KINDS:
        buf = Z.sample_image(**kw, rotating=True)
        IMAGES.append((P.Image(buf), F.Image(buf)))
    for synced in (True, False):
        buf = Z.hosts_image(synced=synced)
        IMAGES.append((P.Image(buf), F.Image(buf)))
    buf = Z.autopath_image()
    IMAGES.append((P.Image(buf), F.Image(buf)))


def TestOneInput(data: bytes) -> None:
    if not IMAGES:
        setup()
    common.executed()
    if len(data) < 2:
        return
    opts, rot, q = data[0], ROTATION[data[1] & 3], bytes(data[2:])
    client = CLIENTS[(data[1] >> 2) & 3]
    # Bit 7: the image with autopath; bit 6: the one with hosts zones (bit 0 then says
    # synced or not).
    if opts & 0x80:
        ref, fast = IMAGES[6]
    else:
        ref, fast = IMAGES[4 + (opts & 1)] if opts & 0x40 else IMAGES[opts & 3]
    tcp = bool(opts & 4)
    edns_max = EDNS_MAX[(opts >> 3) & 3]
    ra = bool(opts & 0x20)
    want = P.answer(ref, q, tcp=tcp, edns_max=edns_max, ra=ra, rotation=rot, client=client)
    got = F.answer(fast, q, tcp=tcp, edns_max=edns_max, ra=ra, rotation=rot, client=client)
    if (got[0], bytes(got[1])) != (want[0], bytes(want[1])):
        common.mismatch("answer", data, f"tcp={tcp} edns_max={edns_max} ra={ra} rotation={rot} "
                        f"client={client and client.hex()} query="
                        f"{q.hex()} refpath={want[0]}:{bytes(want[1]).hex()} "
                        f"fastpath={got[0]}:{bytes(got[1]).hex()}")


if __name__ == "__main__":
    common.main(sys.modules[__name__])
