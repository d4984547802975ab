"""Image publishing through sealed memfds, the engine twins' shared contract, and the worker's
hand-off seam, in-process."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import socket
import struct

import dns.message
import dns.rcode
import pytest

from conftest import require_fastpath, unavailable
from kdns import settings
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.serve import publish
from kdns.zone import refpath
from kdns.serve.worker import Worker
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local"


def compiled_engine():
    return require_fastpath()


ENGINES = ["pure", "compiled"]


def engine_api(which):
    if which == "pure":
        return (engine.PureImage, engine.PureCounters, engine.PureUdpServer,
                engine.pure_tcp_answer)
    fp = compiled_engine()
    return fp.Image, fp.Counters, fp.UdpServer, fp.tcp_answer


def page() -> mmap.mmap:
    return mmap.mmap(-1, C.PAGE_BYTES)            # page-aligned, like the real one


def test_packet_side_imports_no_control_plane():
    """The layering (docs/architecture.md): a worker imports the engine and publishing, never the record rules,
    sources, controller or supervisor."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, kdns.serve.worker; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('kdns'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert "kdns.serve.worker" in out and "kdns.packet.engine" in out
    # (refpath reads the image layout from kdns.zone.image; that is the packet path's contract.)
    assert not [m for m in out if m.split(".")[1:2] and m.split(".")[1] in
                ("records", "cluster", "sources", "controller", "server", "cli", "http")], out


# --------------------------------------------------------------------------- sealed memfds


def test_sealed_image_is_immutable():
    data = sample_image()
    fd = publish.seal_image(data)
    try:
        assert os.pread(fd, len(data) + 10, 0) == data
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & publish.SEALS == publish.SEALS and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
        with pytest.raises(PermissionError):                       # no writable mapping either
            mmap.mmap(fd, len(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
        m = publish.map_sealed(fd)
        assert m[:] == data
        m.close()
    finally:
        os.close(fd)


def test_unsealed_memfd_is_refused():
    fd = os.memfd_create("not-sealed", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, sample_image())
        with pytest.raises(ValueError, match="not sealed"):
            publish.map_sealed(fd)
    finally:
        os.close(fd)


def test_worker_gets_current_image_on_attach_and_only_the_newest_later():
    pub = publish.Publisher()
    try:
        a, b = sample_image(tag="10.96.0.1"), sample_image(tag="10.96.0.2")
        pub.publish(a)
        sub = publish.Subscription(pub.attach(0))
        gen, mapping = sub.receive()
        assert (gen, mapping[:]) == (1, a)
        assert sub.receive() is None                    # nothing new: non-blocking
        pub.publish(b)
        pub.publish(a)
        pub.publish(b)
        gen, mapping = sub.receive()                    # three queued: the newest wins
        assert (gen, mapping[:]) == (4, b)
        pub.detach(0)
        with pytest.raises(EOFError):
            sub.receive()
    finally:
        pub.close()


def test_no_fd_leaks_across_publishes():
    pub = publish.Publisher()
    try:
        sub = publish.Subscription(pub.attach(0))
        pub.publish(sample_image())
        sub.receive()[1].close()
        before = len(os.listdir("/proc/self/fd"))       # includes the current image's memfd
        for i in range(50):
            pub.publish(sample_image(tag=f"10.96.0.{i % 2 + 1}"))
            got = sub.receive()
            assert got[0] == i + 2
            got[1].close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        pub.close()


def test_counter_pages_are_shared_and_generation_is_visible():
    fd, whole = publish.counters_memfd(3)
    try:
        worker_page = publish.map_page(fd, 2)
        C.set_page_generation(worker_page, 41)
        assert [C.page_generation(whole, s) for s in range(3)] == [0, 0, 41]
        worker_page.close()
    finally:
        whole.close()
        os.close(fd)


# --------------------------------------------------------------------------- engine contract


QUERIES = [dns.message.make_query(n, t, use_edns=e).to_wire()
           for n in (K, "big.default.svc.cluster.local", "nope.default.svc.cluster.local",
                     "google.com", "1.0.96.10.in-addr.arpa")
           for t in ("A", "SRV", "PTR") for e in (False, True)]
BROKEN = [b"", b"\x00" * 5, QUERIES[0][:20], b"\x12\x34\x80" + QUERIES[0][3:],
          QUERIES[0][:12] + b"\xc0\x0c\x00\x01\x00\x01",
          QUERIES[0][:5] + b"\x02" + QUERIES[0][6:],                       # QDCOUNT 2
          QUERIES[0][:2] + b"\x20" + QUERIES[0][3:],                       # opcode 4 (NOTIFY)
          QUERIES[1][:-5] + b"\x01" + QUERIES[1][-4:]]                     # EDNS version 1


def without_latency(words) -> list[int]:
    skip = {i for name, i in C.LAYOUT.items() if name.startswith(("latency_", "tlatency_"))}
    return [w for i, w in enumerate(words[:len(C.LAYOUT)]) if i not in skip]


def latency_samples(words) -> dict[str, int]:
    """Samples per protocol and per query type: equal in both engines, whatever they took."""
    out = {}
    for name, i in C.LAYOUT.items():
        if "latency_" in name and "_bucket_" in name:
            key = name.split("_bucket_")[0]
            out[key] = out.get(key, 0) + words[i]
    return out


def test_pure_counters_match_compiled_counters():
    """The pure twin counts into the page exactly as _fastpath does (latency aside)."""
    fp = compiled_engine()
    pure_page, fast_page = page(), page()
    pure_img, fast_img = engine.PureImage(sample_image()), fp.Image(sample_image())
    pc, fc = engine.PureCounters(pure_page), fp.Counters(fast_page)
    for q in QUERIES + BROKEN:
        size = settings.EDNS_UDP_SIZE
        assert engine.pure_tcp_answer(pure_img, pc, q, size) == fp.tcp_answer(fast_img, fc, q, size)
    assert without_latency(memoryview(pure_page).cast("Q")) == \
        without_latency(memoryview(fast_page).cast("Q"))
    assert latency_samples(memoryview(pure_page).cast("Q")) == \
        latency_samples(memoryview(fast_page).cast("Q"))


@pytest.mark.parametrize("which", ENGINES)
def test_udp_server_answers_and_hands_off(which):
    Image, Counters, UdpServer, _ = engine_api(which)
    img, pg = Image(sample_image()), page()
    counters = Counters(pg)
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind(("127.0.0.1", 0))
        srv.setblocking(False)
        cli.bind(("127.0.0.1", 0))
        cli.settimeout(2)
        server = UdpServer(srv.fileno(), settings.EDNS_UDP_SIZE)
        ref = refpath.Image(sample_image())
        for q in QUERIES:
            cli.sendto(q, srv.getsockname())
        n = 0
        for _ in range(50):                            # loopback delivery is not instant
            n += server.serve(img, counters) if n == 0 else 0
            if n:
                break
        answered = [q for q in QUERIES if refpath.answer(ref, q)[0] == refpath.ACTION_SEND]
        handed = [q for q in QUERIES if refpath.answer(ref, q)[0] == refpath.ACTION_HANDOFF]
        replies = sorted(cli.recv(65535) for _ in answered)
        assert replies == sorted(refpath.answer(ref, q)[1] for q in answered)
        assert n == len(handed)
        assert sorted(server.handoff_packet(i) for i in range(n)) == sorted(handed)
        assert server.handoff_addr(0)[:2] == cli.getsockname()
        words = memoryview(pg).cast("Q")
        assert words[C.LAYOUT["handoff_udp"]] == len(handed)
        assert sum(words[C.LAYOUT[f"queries_udp_{t}"]] for t, _ in C.QTYPES) == len(QUERIES)
    finally:
        srv.close()
        cli.close()


def test_refused_echoes_question_and_opt():
    for q in QUERIES:
        r = dns.message.from_wire(engine.refused(q))
        m = dns.message.from_wire(q)
        assert r.rcode() == dns.rcode.REFUSED and r.id == m.id and r.question == m.question
        assert (r.edns >= 0) == (m.edns >= 0)       # RFC 6891 §6.1.1: OPT only if asked
    assert engine.refused(b"\x00" * 12) is None


# --------------------------------------------------------------------------- worker seam


class ScriptedHandoff:
    """A hand-off whose answers the test releases one by one (the forwarder's seam)."""

    def __init__(self):
        self.gates: dict[bytes, asyncio.Event] = {}
        self.seen: list[tuple[str, str]] = []

    async def resolve(self, query: bytes, proto: str) -> bytes | None:
        name = dns.message.from_wire(query).question[0].name.to_text()
        self.seen.append((name, proto))
        if name.startswith("slow."):
            await self.gate(name).wait()
        if name.startswith("silent."):
            return None
        r = dns.message.make_response(dns.message.from_wire(query))
        r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())


async def read_msg(reader) -> dns.message.Message:
    n = struct.unpack("!H", await reader.readexactly(2))[0]
    return dns.message.from_wire(await reader.readexactly(n))


# The two ways a worker serves UDP: inside its loop's wait in C (worker.UdpSelector, what
# `kdns serve` runs with the compiled engine) and from a loop reader callback (any other loop).
UDP_LOOPS = ["wait", "reader"]


def run_worker_loop(kind: str, coro):
    """Run ``coro`` on the loop a worker process uses ("wait") or on asyncio.run's."""
    if kind == "reader":
        return asyncio.run(coro)
    from kdns.serve import worker as W
    with asyncio.Runner(loop_factory=W.event_loop) as runner:
        return runner.run(coro)


def serves_in_wait(kind: str) -> bool:
    """Whether a worker on ``kind``'s loop serves UDP in the wait: the pure engine has no
    wait in C and drains from a reader callback on either loop."""
    return kind == "wait" and engine.IMPLEMENTATION == "compiled"


def make_worker(handoff, pub):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    pg = page()
    return Worker(slot=0, udp=udp, tcp=tcp, control=pub.attach(0), page=pg,
                  tcp_idle_timeout=5, handoff=handoff), pg


@pytest.mark.parametrize("kind", UDP_LOOPS)
def test_worker_hands_off_through_the_seam_and_answers_in_readiness_order(kind):
    """RFC 7766 §6.2.1.1: responses leave as they become ready, not in query order."""
    pub = publish.Publisher()
    pub.publish(sample_image())
    handoff = ScriptedHandoff()
    worker, pg = make_worker(handoff, pub)
    udp_addr, tcp_addr = worker.udp.getsockname(), worker.tcp.getsockname()

    async def scenario():
        run = asyncio.create_task(worker.run())
        while worker.img is None:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*tcp_addr)
        names = ["slow.example.", K + ".", "fast.example.", "silent.example.", K + "."]
        for i, name in enumerate(names):
            q = dns.message.make_query(name, "A")
            q.id = i
            writer.write(struct.pack("!H", len(q.to_wire())) + q.to_wire())
        await writer.drain()
        order = [(await read_msg(reader)).id for _ in range(3)]
        handoff.gate("slow.example.").set()
        order.append((await read_msg(reader)).id)
        # UDP goes through the same seam; None means no reply at all.
        loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        await loop.sock_sendto(udp, dns.message.make_query("silent.example.", "A").to_wire(),
                               udp_addr)
        await loop.sock_sendto(udp, dns.message.make_query("fast.example.", "A", id=99).to_wire(),
                               udp_addr)
        reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(udp, 65535), 2))
        udp.close()
        assert (worker.selector is not None) == serves_in_wait(kind)
        # A new image is picked up between batches and its generation recorded.
        pub.publish(sample_image(tag="10.96.0.2"))
        while worker.generation != 2:
            await asyncio.sleep(0.01)
        q = dns.message.make_query(K, "A", id=7)
        writer.write(struct.pack("!H", len(q.to_wire())) + q.to_wire())
        after_swap = await read_msg(reader)
        writer.close()
        worker.stop()
        await run
        return order, reply, after_swap

    try:
        order, reply, after_swap = run_worker_loop(kind, asyncio.wait_for(scenario(), 20))
    finally:
        pub.close()
        worker.udp.close()
        worker.tcp.close()
    # The image answers (1, 4) come at once, the fast hand-off next, the slow one last;
    # the silent one never.
    assert sorted(order[:2]) == [1, 4] and order[2:] == [2, 0]
    assert reply.id == 99 and reply.rcode() == dns.rcode.NXDOMAIN
    assert [rd.address for rd in after_swap.answer[0]] == ["10.96.0.2"]
    assert C.page_generation(pg, 0) == 2
    assert ("silent.example.", "udp") in handoff.seen and ("slow.example.", "tcp") in handoff.seen
    words = memoryview(pg).cast("Q")
    assert words[C.LAYOUT["rcode_tcp_3"]] == 2 and words[C.LAYOUT["rcode_udp_3"]] == 1


@pytest.mark.parametrize("kind", UDP_LOOPS)
def test_tcp_hand_offs_in_flight_are_bounded_per_connection(kind):
    """A client pipelining more slow hand-offs than TCP_MAX_PENDING: the worker stops taking
    new ones until some finish, then answers every one."""
    from kdns.serve import worker as W
    pub = publish.Publisher()
    pub.publish(sample_image())
    handoff = ScriptedHandoff()
    worker, _ = make_worker(handoff, pub)
    total = W.TCP_MAX_PENDING + 44

    async def scenario():
        run = asyncio.create_task(worker.run())
        while worker.img is None:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*worker.tcp.getsockname())
        for i in range(total):
            wire = dns.message.make_query(f"slow.n{i}.example.", "A", id=i).to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        tcp_taken = lambda: sum(1 for _, proto in handoff.seen if proto == "tcp")
        while tcp_taken() < W.TCP_MAX_PENDING:
            await asyncio.sleep(0.01)
        # The rest of the pipeline is readable all along: a few UDP round trips through the
        # same loop give the worker every chance to take more if it did not stop reading.
        loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        for i in range(3):
            await loop.sock_sendto(udp, dns.message.make_query("fast.example.", "A",
                                                               id=1000 + i).to_wire(),
                                   worker.udp.getsockname())
            await asyncio.wait_for(loop.sock_recv(udp, 65535), 5)
        udp.close()
        in_flight = tcp_taken()
        for i in range(total):
            handoff.gate(f"slow.n{i}.example.").set()
        ids = sorted([(await read_msg(reader)).id for _ in range(total)])
        writer.close()
        worker.stop()
        await run
        return in_flight, ids

    try:
        in_flight, ids = run_worker_loop(kind, asyncio.wait_for(scenario(), 20))
    finally:
        pub.close()
        worker.udp.close()
        worker.tcp.close()
    assert in_flight == W.TCP_MAX_PENDING
    assert ids == list(range(total))


@pytest.mark.parametrize("kind", UDP_LOOPS)
def test_worker_checks_new_images_off_its_loop_records_the_swap_time_and_keeps_order(caplog, kind):
    """A worker checks each new image on its checker thread, swaps when it passes,
    records when it swapped (the end of DNS programming latency), refuses a corrupt layout
    while serving the last good image, and never swaps back to an older generation."""
    import time
    pub = publish.Publisher()
    pub.publish(sample_image())
    worker, pg = make_worker(ScriptedHandoff(), pub)
    good = sample_image(tag="10.96.0.2")
    corrupt = bytearray(sample_image(tag="10.96.0.3"))
    struct.pack_into("<I", corrupt, 20, 1 << 30)        # nnodes: the node table runs out

    async def scenario():
        run = asyncio.create_task(worker.run())
        while worker.img is None:
            await asyncio.sleep(0.01)
        before = time.monotonic_ns()
        pub.publish(good)
        while worker.generation != 2:
            await asyncio.sleep(0.01)
        swapped = C.page_swapped_ns(pg, 0)
        assert before <= swapped <= time.monotonic_ns()
        pub.publish(bytes(corrupt))                       # generation 3: refused
        while "image generation 3 rejected" not in caplog.text:     # the checker's verdict
            await asyncio.sleep(0.01)
        assert worker.generation == 2 and C.page_generation(pg, 0) == 2
        assert C.page_swapped_ns(pg, 0) == swapped
        img = worker.img
        worker.swap(1, img)                               # a late older check: ignored
        assert worker.generation == 2
        pub.publish(good)                                 # generation 4
        while worker.generation != 4:
            await asyncio.sleep(0.01)
        worker.stop()
        await run

    try:
        run_worker_loop(kind, asyncio.wait_for(scenario(), 20))
    finally:
        pub.close()
        worker.udp.close()
        worker.tcp.close()


@pytest.mark.parametrize("kind", UDP_LOOPS)
def test_an_idle_worker_heartbeats_and_stops_when_the_supervisor_goes_away(kind):
    """With no traffic the wait in C returns for the loop's heartbeat timer, so the count
    keeps rising (the supervisor replaces a worker whose count stands still); the control
    channel's EOF reaches the loop through the same wait and stops the worker, which
    answers what is still queued on its UDP socket first (lameduck)."""
    pub = publish.Publisher()
    pub.publish(sample_image())
    worker, pg = make_worker(ScriptedHandoff(), pub)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)

    async def scenario():
        run = asyncio.create_task(worker.run())
        while C.page_heartbeat(pg, 0) < 1:
            await asyncio.sleep(0.01)
        assert (worker.selector is not None) == serves_in_wait(kind)
        first = C.page_heartbeat(pg, 0)
        while C.page_heartbeat(pg, 0) < first + 3:      # three more, nothing else to do
            await asyncio.sleep(0.01)
        # Sent just before the supervisor goes away: answered by the wait or, if the EOF
        # came first, by the lameduck drain; either way answered.
        c.sendto(dns.message.make_query(K, "A", id=31).to_wire(), worker.udp.getsockname())
        pub.close()                                     # the control channel's EOF
        await run
        assert worker.selector is None

    try:
        run_worker_loop(kind, asyncio.wait_for(scenario(), 20))
        reply = dns.message.from_wire(c.recv(4096))
    finally:
        c.close()
        worker.udp.close()
        worker.tcp.close()
    assert reply.id == 31 and reply.rcode() == dns.rcode.NOERROR
