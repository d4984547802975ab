"""Fuzz target: the upstream-reply scanners of both paths, through real loopback sockets.

Input: one byte of options (client EDNS, DO, RD), then the reply's header flags and
section counts (8 bytes) and everything after the question. For each input a client asks
a new outside name; the compiled forwarder (``_fastpath.UdpServer`` + ``FwdEngine``)
sends it to a socket this target holds, which answers with the upstream's ID and question
followed by the fuzzed bytes. Then:

- accept/reject: C relays the reply exactly when ``forward.cache.scan`` accepts it (and
  it is no SERVFAIL/REFUSED, and not TC: those are handed back to Python, as is anything
  C rejects);
- what C relays is byte for byte what the Python ``Forwarder._from_upstream`` builds;
- what C stores in the compiled cache is what ``cache.Cache.entry`` would store.
C's crashes are the process's crashes (and the sanitizer build's reports).
"""
from __future__ import annotations

import select
import socket
import struct
import sys

import common

with common.instrumented():
    from kdns.forward import cache as K
    from kdns.forward.forwarder import Forwarder, parse_query
    from kdns import settings
    from kdns.packet import _fastpath as F
    from kdns.packet import counters as C
    from kdns.packet import engine
    from kdns.zone.refpath import Malformed
    import zonefixtures as Z

HB_TC, HB_BAD = 2, 3             # fwd.pxi's hand-back reasons
FW_MAXREC = 96                   # fwd.pxi: replies with more records go to Python (HB_BAD)
UDP_BUF = 4096                   # _fastpath.pxd: a longer datagram is cut, so none is sent
WAIT = 2.0                       # seconds a loopback datagram may take (it takes microseconds)
S: dict = {}


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return s


def setup() -> None:
    S["img"] = F.Image(Z.sample_image())
    S["page"] = bytearray(C.SLOT_WORDS * 8)
    S["counters"] = F.Counters(S["page"])
    S["server_sock"] = srv = udp()
    srv.setblocking(False)
    S["client"] = udp()
    S["upstream"] = up = udp()            # plays the upstream resolver
    S["fwd_sock"] = fs = udp()            # the engine's upstream-side socket
    fs.setblocking(False)
    S["server"] = server = F.UdpServer(srv.fileno(), settings.EDNS_UDP_SIZE)
    S["cache"] = pc = F.PacketCache(1024, settings.EDNS_UDP_SIZE)
    server.set_cache(pc)
    S["engine"] = eng = F.FwdEngine(srv.fileno(), [fs.fileno()], 64, settings.TRY_TIMEOUT,
                                    settings.EDNS_UDP_SIZE)
    eng.set_cache(pc)
    eng.set_routes([up.getsockname()])
    server.set_forwarder(eng)
    S["forwarder"] = Forwarder([])
    S["pycache"] = K.Cache()
    S["n"] = 0


def client_query(opts: int, name: str) -> bytes:
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    flags = 0x0100 if not opts & 4 else 0
    q = struct.pack("!HHHHHH", 0xBEEF, flags, 1, 0, 0, 1 if opts & 1 else 0)
    q += labels + b"\0" + struct.pack("!HH", 1, 1)
    if opts & 1:
        q += b"\0" + struct.pack("!HHBBHH", 41, 4096 if opts & 8 else 1232, 0, 0,
                                 0x8000 if opts & 2 else 0, 0)
    return q


def wait(sock, what: str) -> None:
    if not select.select([sock], [], [], WAIT)[0]:
        raise AssertionError(f"no {what} within {WAIT} s on loopback")


def TestOneInput(data: bytes) -> None:
    if not S:
        setup()
    common.executed()
    if len(data) < 9:
        return
    opts, head, body = data[0], data[1:9], bytes(data[9:])
    S["n"] += 1
    name = f"f{S['n']}.fuzz.example"
    q = client_query(opts, name)
    client, upstream, server, eng = S["client"], S["upstream"], S["server"], S["engine"]
    client.sendto(q, S["server_sock"].getsockname())
    wait(S["server_sock"], "client query")
    if server.serve(S["img"], S["counters"]) != 0:
        raise AssertionError("the outside name was handed to Python, not forwarded by C")
    wait(upstream, "upstream query")
    uq, src = upstream.recvfrom(65535)
    _, qend = parse_name_end(uq)
    flags = struct.unpack_from("!H", head, 0)[0] | 0x8000
    raw = uq[:2] + struct.pack("!HH", flags, 1) + head[2:8] + uq[12:qend] + body
    raw = raw[:UDP_BUF]
    upstream.sendto(raw, src)
    wait(S["fwd_sock"], "reply at the engine")
    before = eng.stats()
    eng.drain(S["counters"])
    backs = eng.handbacks()
    after = eng.stats()
    relayed = after["relayed"] - before["relayed"]

    try:
        K.scan(raw)
        ok = True
    except Malformed:
        ok = False
    rcode, tc = raw[3] & 0xF, bool(raw[2] & 0x02)
    nrec = sum(struct.unpack_from("!HHH", raw, 6))
    if not ok or rcode in (2, 5) or nrec > FW_MAXREC:
        want = ("handback", HB_BAD)
    elif tc:
        want = ("handback", HB_TC)
    else:
        want = ("relayed", None)
    if backs:
        got = ("handback", backs[0][2])
    elif relayed:
        got = ("relayed", None)
    else:
        got = ("nothing", None)
    if got != want:
        common.mismatch("scan", data, f"python scan ok={ok} rcode={rcode} tc={tc}: wanted "
                        f"{want}, C did {got}; reply {raw.hex()}")
        drain_client(client)
        return
    if got[0] != "relayed":
        return
    wait(client, "relayed reply")
    reply = client.recv(65535)
    pq = parse_query(q)
    fw = S["forwarder"]
    ref = fw._from_upstream(raw, pq, fw._client_limit(pq, "udp"))
    if reply != ref:
        common.mismatch("scan", data, f"relayed bytes differ: C {reply.hex()} python "
                        f"{ref.hex()}; upstream reply {raw.hex()}")
        return
    stored = after["cached"] - before["cached"]
    entry = S["pycache"].entry(raw)
    if entry is not None and after["cache_skipped"] == before["cache_skipped"]:
        key = K.key_bytes((pq.name, pq.qtype, pq.qclass, pq.edns[1] if pq.edns else 0, 0))
        hit = S["cache"].lookup(key)
        if not stored or hit is None or tuple(hit[:5]) != (entry.wire, entry.qend,
                                                          tuple(entry.ttl_offs),
                                                          tuple(entry.ttls), entry.ttl):
            common.mismatch("scan", data, f"cache: python stores {entry.wire.hex()} ttl "
                            f"{entry.ttl}, C stored {stored}: {hit}; reply {raw.hex()}")
    elif entry is None and stored:
        common.mismatch("scan", data, f"C cached a reply Python's cache refuses: {raw.hex()}")


def parse_name_end(msg: bytes) -> tuple[int, int]:
    off = 12
    while msg[off]:
        off += 1 + msg[off]
    return off, off + 5


def drain_client(client) -> None:
    client.setblocking(False)
    try:
        while True:
            client.recv(65535)
    except BlockingIOError:
        pass
    finally:
        client.setblocking(True)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
