"""A small test DNS server (UDP + TCP) on a loopback address, able to misbehave on purpose.

Why: forwarder tests need real upstreams that the test owns: nothing may ever be sent to the
machine's own resolvers. Runs in its own threads so that delays and silence never
block the event loop under test. Use as a context manager; it stops and closes its sockets on
exit.

Zone: ``{"name.": ["A 1.1.1.1", "60 TXT hello"]}`` (TTL optional, default 30). Names not in
the zone get NXDOMAIN with the SOA of ``soa``; known names without that type get NODATA.

Switches (attributes, changeable while running): ``silent`` (drop everything), ``drop_next``
(drop that many UDP queries, then answer again: a sporadic loss), ``delay
(seconds before answering), ``truncate`` (UDP replies are empty with TC=1; also done when a
reply exceeds the client's UDP size), ``forge``
(a set of 'id', 'question', 'port': before the real reply send a forged one of each kind),
``forge_only`` (send only the forged replies), ``rcode`` (answer every query with this rcode),
``forward_to`` ((host, port): relay each query there instead of answering, to build loops).
Counters: ``udp_queries``, ``tcp_queries``, ``queries`` (list of (qname, qtype, proto)),
``raw`` (list of (query bytes, client address)).
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
import time

from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord

DEFAULT_SOA = "example. 300 IN SOA ns.example. host.example. 1 7200 1800 86400 60"


class TestDNSServer:
    __test__ = False        # not a pytest class

    def __init__(self, zone: dict[str, list[str]] | None = None, *, host: str = "127.0.0.1",
                 soa: str = DEFAULT_SOA):
        self.host, self.soa = host, RR.fromZone(soa)[0]
        self.records: list[RR] = []
        for name, rrs in (zone or {}).items():
            for text in rrs:
                parts = text.split(None, 1)
                ttl, rest = (parts[0], parts[1]) if parts[0].isdigit() else ("30", text)
                self.records += RR.fromZone(f"{name} {ttl} IN {rest}")
        self.silent = self.truncate = self.forge_only = False
        self.delay = 0.0
        self.drop_next = 0
        self.forge: set[str] = set()
        self.rcode: int | None = None
        self.forward_to: tuple[str, int] | None = None
        # Scripted reply: these bytes (their ID replaced by the query's) instead of an answer,
        # over UDP and TCP, for replies no honest server sends.
        self.reply_bytes: bytes | None = None
        self.udp_queries = self.tcp_queries = 0
        self.queries: list[tuple[str, str, str]] = []
        self.raw: list[tuple[bytes, tuple]] = []     # (query bytes, client address)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.udp, self.tcp = bind_pair(host)
        self.port = self.udp.getsockname()[1]
        self.udp.settimeout(0.05)
        self.tcp.settimeout(0.05)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __enter__(self) -> "TestDNSServer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()

    # ---- answering -------------------------------------------------------------------

    def answer(self, data: bytes) -> DNSRecord:
        req = DNSRecord.parse(data)
        reply = req.reply(ra=1, aa=1)
        reply.header.rd = req.header.rd
        if self.rcode is not None:
            reply.header.rcode = self.rcode
            return reply
        q = req.q
        qname = str(q.qname).lower()
        named = [r for r in self.records if str(r.rname).lower() == qname]
        hits = [r for r in named if r.rtype == q.qtype or q.qtype == QTYPE.ANY]
        for r in hits:
            reply.add_answer(r)
        if not hits:
            reply.add_auth(self.soa)
            if not named:
                reply.header.rcode = RCODE.NXDOMAIN
        return reply

    def _record(self, data: bytes, proto: str, addr=None) -> None:
        with self._lock:
            self.raw.append((data, addr))
            if proto == "udp":
                self.udp_queries += 1
            else:
                self.tcp_queries += 1
            try:
                q = DNSRecord.parse(data).q
                self.queries.append((str(q.qname), QTYPE.get(q.qtype), proto))
            except Exception:
                self.queries.append(("?", "?", proto))

    def _relay(self, data: bytes) -> bytes | None:
        fam = socket.AF_INET6 if ":" in self.forward_to[0] else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            s.sendto(data, self.forward_to)
            try:
                return s.recv(65535)
            except OSError:
                return None

    def _forged(self, data: bytes, reply: bytes) -> list[tuple[str, bytes]]:
        out = []
        if "id" in self.forge:
            out.append(("id", struct.pack("!H", (struct.unpack_from("!H", reply)[0] + 1) & 0xFFFF)
                        + reply[2:]))
        if "question" in self.forge:
            req = DNSRecord.parse(data)
            other = DNSRecord.question("forged.example.", "A")
            other.header.id = req.header.id
            fake = other.reply()
            fake.add_answer(*RR.fromZone("forged.example. 30 IN A 6.6.6.6"))
            out.append(("question", fake.pack()))
        if "port" in self.forge:
            out.append(("port", reply))
        return out

    def _udp_reply(self, data: bytes, addr) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self._stop.is_set():
            return
        if self.forward_to is not None:
            out = self._relay(data)
            if out is not None:
                self.udp.sendto(out, addr)
            return
        if self.reply_bytes is not None:
            self.udp.sendto(data[:2] + self.reply_bytes[2:], addr)
            return
        rec = self.answer(data)
        # A real server cuts UDP replies to the client's size (RFC 6891 §6.2.3, RFC 1035).
        opts = [r for r in DNSRecord.parse(data).ar if r.rtype == QTYPE.OPT]
        limit = max(512, opts[0].rclass) if opts else 512
        if self.truncate or len(rec.pack()) > limit:
            rec.rr, rec.auth, rec.ar = [], [], []
            rec.header.tc = 1
        reply = rec.pack()
        for kind, fake in self._forged(data, reply):
            if kind == "port":
                with socket.socket(self.udp.family, socket.SOCK_DGRAM) as other:
                    other.bind((self.host, 0))
                    other.sendto(fake, addr)
            else:
                self.udp.sendto(fake, addr)
        if not self.forge_only:
            self.udp.sendto(reply, addr)

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self._record(data, "udp", addr)
            if self.silent:
                continue
            if self.drop_next > 0:
                self.drop_next -= 1
                continue
            if self.delay or self.forward_to:
                threading.Thread(target=self._udp_reply, args=(data, addr), daemon=True).start()
            else:
                self._udp_reply(data, addr)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            with conn:
                head = _recv_exact(conn, 2)
                data = _recv_exact(conn, struct.unpack("!H", head)[0])
                self._record(data, "tcp")
                if self.silent:
                    return
                if self.delay:
                    time.sleep(self.delay)
                reply = (data[:2] + self.reply_bytes[2:] if self.reply_bytes is not None
                         else self.answer(data).pack())
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass


PAIR_ATTEMPTS = 50


def bind_pair(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket bound to the same loopback port, both held.

    The kernel picks the UDP port; the same number may already be held over TCP by another
    socket (ports are per protocol), so on EADDRINUSE the pair is dropped and drawn again.
    Nothing is ever closed and re-bound later, so no other process can take the port in
    between."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(PAIR_ATTEMPTS):
        udp = socket.socket(fam, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(fam, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError as e:
            tcp.close()
            udp.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError(f"no port free for both UDP and TCP on {host} in {PAIR_ATTEMPTS} draws")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def make_query(name: str, qtype: str = "A", *, qid: int = 1234, edns: int | None = None,
               do: bool = False, qclass: str = "IN") -> bytes:
    """Client query bytes (RD=1) as a pod's resolver would send them."""
    q = DNSRecord.question(name, qtype, qclass)
    q.header.id = qid
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(q.pack())
