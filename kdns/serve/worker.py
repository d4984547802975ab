"""One worker process: an asyncio loop around the engine per slot, on sockets the
supervisor owns. A process serving several slots runs each on a thread of its own
(``serve_slots``); each slot's loop is what follows.

Why: the supervisor opens the SO_REUSEPORT sockets and keeps them, so a replacement worker
inherits the very sockets (and queued packets) of the one that died; it starts each worker
as ``python -m kdns.serve.worker`` with the fds passed (no fork from a threaded process).

The loop does four things:
- UDP readable -> the compiled engine serves it without Python: the loop's selector
  (``UdpSelector``) waits in ``UdpServer.wait``, which blocks in epoll_wait on the loop's own
  epoll set with the GIL released, answers queries (recvmmsg/sendmmsg) and relays upstream
  replies itself, and returns to Python only when Python has work (another fd ready, a
  hand-off, a timer due, a signal). Packets the image does not cover go to the hand-off.
  The pure engine (or KDNS_UDP_LOOP=asyncio) drains from a reader callback instead
  (``UdpServer.serve``, one trip through the loop per readable event).
- TCP (RFC 7766): length-framed, several queries per connection, pipelined, each response
  written as soon as it is ready; idle timeout; a per-worker connection cap; a client that
  does not read gets its reading paused, then is closed when idle.
- Control channel readable -> map the newest image and swap; swaps happen between batches
  because the loop runs one callback at a time.
- SIGTERM/SIGINT, or the supervisor going away -> stop and exit 0.

What it must not do: contain DNS rules (they are in the engine) or touch the file system.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import math
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Protocol

from kdns import settings
from kdns.forward import chaos
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.observe import logs
from kdns.serve import publish

log = logging.getLogger("kdns.serve.worker")

TCP_HIGH_WATER = 64 * 1024      # pause reading a client whose replies pile up above this
TCP_MAX_PENDING = 256           # hand-offs in flight per connection before reading pauses
LISTEN_BACKLOG = 1024           # same as the supervisor's listen()
UDP_MAX_PENDING = 4096          # hand-offs in flight per worker; beyond, UDP ones are dropped


class Handoff(Protocol):
    """Where queries the image cannot answer go.

    ``resolve(query, proto)`` returns the complete reply, or None to send nothing; for a
    query the hand-off's own UDP pump gave back (``Worker.udp_retry``) it is called as
    ``resolve(query, "udp", retry)``.

    A hand-off may also have ``attach(loop, worker)``: the worker calls it once, before it
    serves, and it returns the UDP drain to use instead of ``UdpServer.serve``, or None.
    That drain is ``pump(img, counters) -> n`` with ``serve``'s meaning of ``n`` (hand-off
    packets left in ``worker.udp_server``). What the hand-off may use of the worker:
    ``loop``, ``udp``, ``udp_server``, ``page``, ``counters``, ``img`` (read only), and the
    methods ``drain_udp()`` and ``udp_retry()``. It never sets attributes on the worker.
    """

    async def resolve(self, query: bytes, proto: str, retry=None) -> bytes | None: ...


class RefuseHandoff:
    """The default hand-off: REFUSED for names outside every served zone; CHAOS names
    answered as the forwarding hand-off does (kdns/forward/chaos.py)."""

    def __init__(self, edns_max: int = settings.EDNS_UDP_SIZE):
        self.edns_max = edns_max

    async def resolve(self, query: bytes, proto: str) -> bytes | None:
        local = chaos.answer(query, proto, self.edns_max)
        return local if local is not None else engine.refused(query, self.edns_max)


class UdpSelector(selectors.EpollSelector):
    """The worker's event-loop selector. Until a worker takes its UDP socket in (``take``)
    it is the stdlib's epoll selector; then ``select`` is ``UdpServer.wait`` on the same
    epoll set, with the UDP socket registered there behind asyncio's back (asyncio never
    sees its events: C serves them), and asyncio's timers bound each wait, so the
    worker's heartbeat timer proves that the wait in C returns.

    A new image is swapped in by a loop callback, so between two waits: the image a wait
    uses stays referenced (mapped) until the wait returns."""

    def __init__(self):
        super().__init__()
        self.worker: Worker | None = None

    def take(self, worker: "Worker") -> None:
        self._selector.register(worker.udp.fileno(), select.EPOLLIN)
        self.worker = worker

    def release(self) -> None:
        w, self.worker = self.worker, None
        if w is not None:
            self._selector.unregister(w.udp.fileno())

    def select(self, timeout=None):
        w = self.worker
        if w is None:
            return super().select(timeout)
        # The stdlib's rounding (selectors.EpollSelector): up to the next millisecond.
        if timeout is None:
            ms = -1
        elif timeout <= 0:
            ms = 0
        else:
            ms = math.ceil(timeout * 1e3)
        ready = []
        for fd, event in w.wait_udp(self._selector.fileno(), ms):
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            key = self._key_from_fd(fd)
            if key:
                ready.append((key, events & key.events))
        return ready


def event_loop() -> asyncio.AbstractEventLoop:
    """A loop whose worker serves UDP inside the selector's wait (``UdpSelector``)."""
    return asyncio.SelectorEventLoop(UdpSelector())


PR_SET_NAME = 15


class SharedImages:
    """The image checks of one process's slots: one checker thread, and one check (and one
    mapping) per generation, whichever slot received it first.

    Every slot has its own control channel, so each receives every generation with an fd of
    its own; the first to ask checks its mapping, the others close theirs and take the same
    ``engine.Image`` (read-only once checked: threads may serve it together)."""

    def __init__(self):
        # Named: a thread starts with its creator's name, which may be a slot thread's.
        self.checker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kdns-image-check",
            initializer=set_thread_name, initargs=("kdns-image-chk",))
        self.lock = threading.Lock()
        self.generation = 0
        self.latest: concurrent.futures.Future | None = None

    def check(self, generation: int, mapping, checked) -> concurrent.futures.Future:
        """A future of ``checked(generation, mapping)``'s image, shared by the slots."""
        with self.lock:
            if generation == self.generation and self.latest is not None:
                mapping.close()         # the one mapping of this generation is another's
                return self.latest
            done = self.checker.submit(checked, generation, mapping)
            if generation > self.generation:
                self.generation, self.latest = generation, done
            return done

    def close(self) -> None:
        self.checker.shutdown(wait=False, cancel_futures=True)
        self.latest = None


class Worker:
    def __init__(self, *, slot: int, udp: socket.socket, tcp: socket.socket,
                 control: socket.socket, page, edns_max: int = settings.EDNS_UDP_SIZE,
                 tcp_idle_timeout: float = settings.TCP_IDLE_TIMEOUT,
                 tcp_max_connections: int = settings.TCP_MAX_CONNECTIONS,
                 tcp_max_per_source: int = settings.TCP_MAX_PER_SOURCE,
                 handoff: Handoff | None = None, log_queries: bool = False,
                 loadbalance: bool = settings.LOADBALANCE,
                 udp_hold_us: int = settings.UDP_HOLD_US,
                 images: "SharedImages | None" = None, on_signal=None):
        """``images``: the image checks this worker shares with the other slots of its
        process (None: its own checker thread). ``on_signal``: what SIGTERM/SIGINT do
        (default: stop this worker); only a worker on the main thread installs them, and
        ``False`` installs none (a slot on another thread: the main one stops it)."""
        self.slot = slot
        self.udp = udp
        self.tcp = tcp
        self.control = publish.Subscription(control)
        self.page = page
        self.words = memoryview(page).cast("Q")
        self.counters = engine.Counters(page)
        self.edns_max = edns_max
        self.idle_timeout = tcp_idle_timeout
        self.max_connections = tcp_max_connections
        self.max_per_source = tcp_max_per_source
        self.beats = 0
        self.handoff = handoff or RefuseHandoff(edns_max)
        self.img = None
        self.generation = 0
        # Oldest activity first (a query moves its connection to the end), overall and per
        # source address: at a cap the connection idle longest is the one to close.
        self.connections: dict[TcpConnection, None] = {}
        self.by_source: dict[str, dict[TcpConnection, None]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.udp_server = engine.UdpServer(udp.fileno(), edns_max=edns_max)
        # CoreDNS loadbalance: one set of counters for UDP and TCP, made once (the packet
        # path only advances them); None keeps the order the compiler laid out.
        self.rotation = engine.Rotation() if loadbalance else None
        self.udp_server.set_rotation(self.rotation)
        self.stopping: asyncio.Event | None = None
        self.has_image: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.udp_pump = None            # the hand-off's UDP drain (Handoff.attach), if any
        self.selector: UdpSelector | None = None    # set while UDP is served in its wait
        self.udp_hold_us = udp_hold_us
        self.log_queries = log_queries
        # New images are checked on this thread while the loop keeps serving the old one
        # (the check releases the GIL): under churn images arrive many times a second.
        # Slots of one process share one checker and one check per generation.
        self.images = images
        self.checker = images.checker if images is not None else \
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"kdns-image-check-{slot}")
        self.on_signal = on_signal
        self.stop_requested = False     # stop_soon() before run() had a loop

    # ---- lifecycle
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.has_image = asyncio.Event()
        if self.stop_requested:         # stop_soon() came first (another thread's)
            self.stop()
        C.set_page_generation(self.page, 0)
        attach = getattr(self.handoff, "attach", None)
        if attach is not None:
            # Its config first (already queued by the supervisor), then its UDP drain.
            self.udp_pump = attach(self.loop, self)
        if self.on_signal is not False:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.on_signal or self.stop)
        self.loop.add_reader(self.control.fileno(), self.on_control)
        self.on_control()
        await self.first_image()
        if self.stopping.is_set():
            return
        self.udp.setblocking(False)
        # The loop's selector is asyncio's private attribute (BaseSelectorEventLoop, since
        # 3.4); any other loop (tests' asyncio.run, uvloop) gets the reader callback.
        selector = getattr(self.loop, "_selector", None)
        if (isinstance(selector, UdpSelector) and hasattr(self.udp_server, "wait")
                and settings.ENV.udp_loop != "asyncio"):
            self.selector = selector
            selector.take(self)
        else:
            self.loop.add_reader(self.udp.fileno(), self.drain_udp)
        # backlog: asyncio calls listen() again; keep the supervisor's queue length.
        server = await self.loop.create_server(lambda: TcpConnection(self), sock=self.tcp,
                                               backlog=LISTEN_BACKLOG)
        log.debug("worker %d serving (%s engine, UDP %s)", self.slot, engine.IMPLEMENTATION,
                  "in the loop's wait" if self.selector is not None else "from a reader")
        self.heartbeat()
        try:
            await self.stopping.wait()
        finally:
            # Lameduck: the supervisor has taken the UDP socket out of the SO_REUSEPORT
            # group; answer what is still queued on it before exiting.
            if self.selector is not None:
                self.selector.release()
                self.selector = None
            else:
                self.loop.remove_reader(self.udp.fileno())
            self.drain_udp()
            self.loop.remove_reader(self.control.fileno())
            server.close()
            for conn in list(self.connections):
                conn.transport.abort()
            for task in list(self.tasks):
                task.cancel()
            if self.images is None:     # a shared checker is its process's to shut down
                self.checker.shutdown(wait=False, cancel_futures=True)

    async def first_image(self) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        ready = asyncio.ensure_future(self.has_image.wait())
        await asyncio.wait([stop, ready], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        ready.cancel()

    def stop(self) -> None:
        self.stopping.set()
        self.has_image.set()

    def stop_soon(self) -> None:
        """stop() from any thread: on this worker's loop, or as soon as run() has one."""
        self.stop_requested = True
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.stop)
            except RuntimeError:
                pass                    # its loop is closed: it has stopped already

    # ---- images
    def on_control(self) -> None:
        try:
            got = self.control.receive()
        except EOFError:
            log.info("worker %d: supervisor went away; stopping", self.slot)
            self.loop.remove_reader(self.control.fileno())     # EOF stays readable
            self.stop()
            return
        if got is None:
            return
        generation, mapping = got
        if self.images is not None:
            # The process's one check of this generation (another slot's, or this one).
            checked = self.images.check(generation, mapping, self.checked)
            if self.img is None:        # nothing to serve meanwhile: wait for it here
                self.swap(generation, checked.result())
                return
            done = asyncio.wrap_future(checked, loop=self.loop)
        elif self.img is None:          # nothing to serve meanwhile: check it here
            self.swap(generation, self.checked(generation, mapping))
            return
        else:
            done = self.loop.run_in_executor(self.checker, self.checked, generation, mapping)
        done.add_done_callback(lambda f: self.swap(generation, f.result()))

    def swap(self, generation: int, img) -> None:
        # One checker thread keeps arrival order; a newer image already served wins anyway.
        if img is None or generation <= self.generation or (
                self.stopping is not None and self.stopping.is_set()):
            return
        # The old image's mapping is released when its last reference (a running hand-off
        # does not hold one) goes away.
        self.img, self.generation = img, generation
        C.set_page_generation(self.page, generation, swapped_ns=time.monotonic_ns())
        self.has_image.set()

    def checked(self, generation: int, mapping):
        """The image for ``mapping``, or None (logged) when the worker must not serve it."""
        try:
            # The layout check (every offset inside the image) is what lets the packet path
            # trust the image, and it runs here. The crc32 guards image files on their way
            # in, and the supervisor checks it when it reads one (server.checked_image);
            # compiled images are made in the supervisor, and a sealed memfd cannot change.
            # Checking it again here cost ~8 ms of serving per swap of a 30 MiB image
            # (under churn the workers swap images many times a second).
            return engine.Image(mapping)
        except ValueError as e:
            log.error("worker %d: image generation %d rejected (%s); keeping generation %d",
                      self.slot, generation, e, self.generation)
            return None

    # ---- UDP
    def serve_udp(self) -> int:
        """One drain of the UDP socket: the hand-off's pump when it gave one, else serve()."""
        if self.udp_pump is not None:
            return self.udp_pump(self.img, self.counters)
        return self.udp_server.serve(self.img, self.counters, max_batches=16)

    def drain_udp(self) -> None:
        n = self.serve_udp()
        if self.udp_pump is None:
            after = getattr(self.handoff, "after_udp", None)
            if after is not None:
                after()             # cache prefetches the packet path's hits queued
        if getattr(self.udp_server, "last_errno", 0):
            log.debug("worker %d: UDP receive error %s", self.slot,
                      os.strerror(self.udp_server.last_errno))
        self.take_handoffs(n)

    def wait_udp(self, epfd: int, timeout_ms: int) -> list:
        """The selector's wait (UdpSelector.select): UDP served in C until Python has work,
        then the hand-offs spawned and the forwarder's handbacks taken; returns the loop's
        other ready fds as [(fd, events)]."""
        srv = self.udp_server
        events = srv.wait(self.img, self.counters, epfd, timeout_ms, self.udp_hold_us)
        if srv.last_errno:
            log.debug("worker %d: UDP receive error %s", self.slot, os.strerror(srv.last_errno))
        if srv.handoffs:
            self.take_handoffs(srv.handoffs)
        if srv.handbacks:
            take = getattr(self.handoff, "take_handbacks", None)
            if take is not None:
                take()
        after = getattr(self.handoff, "after_udp", None)
        if after is not None:
            after()                 # cache prefetches the packet path's hits queued
        return events

    def take_handoffs(self, n: int) -> None:
        """Spawn the hand-offs of the last drain: ``n`` packets in ``udp_server``."""
        if not n:
            return
        # Copy out before the next serve() reuses the engine's hand-off slots.
        srv = self.udp_server
        items = [(srv.handoff_packet(i), srv.handoff_addr(i), srv.handoff_received_ns(i))
                 for i in range(n)]
        for packet, addr, received_ns in items:
            if len(self.tasks) >= UDP_MAX_PENDING:
                self.count("dropped_udp")
                continue
            self.spawn(self.udp_handoff(packet, addr, received_ns=received_ns))

    def udp_retry(self, packet: bytes, addr, retry, received_ns: int | None = None) -> None:
        """A query the hand-off's pump gave back (the compiled forwarder's timeout, TC...):
        the hand-off's ``resolve`` finishes it with ``retry``. ``received_ns``: when the
        query arrived (time.monotonic_ns())."""
        if len(self.tasks) >= UDP_MAX_PENDING:
            self.count("dropped_udp")
            return
        self.spawn(self.udp_handoff(packet, addr, retry, received_ns=received_ns))

    async def udp_handoff(self, packet: bytes, addr, retry=None, *,
                          received_ns: int | None = None) -> None:
        if retry is not None:
            reply = await self.handoff.resolve(packet, "udp", retry)
        elif getattr(self.img, "autopath", False):
            # Autopath's hand-offs are finished for the client's namespace.
            reply = await self.handoff.resolve(packet, "udp", client=addr[0])
        else:
            reply = await self.handoff.resolve(packet, "udp")
        if self.log_queries:
            logs.log_query("udp", addr, packet, reply)
        if reply is None:
            return
        try:
            self.udp.sendto(reply, addr)
        except OSError:
            self.count("send_failed_udp")
            return
        engine.count_reply(self.page, "udp", reply, received_ns)

    # ---- helpers
    def spawn(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self.tasks.add(task)          # keep a strong reference until done
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hand-off failed: %r", task.exception())

    def count(self, name: str) -> None:
        self.words[C.LAYOUT[name]] += 1

    def heartbeat(self) -> None:
        """Raise the page's heartbeat count, from this loop: the supervisor replaces a worker
        whose count stands still (a stopped or stuck loop serves nothing)."""
        self.beats += 1
        C.set_page_heartbeat(self.page, self.beats)
        if not self.stopping.is_set():
            self.loop.call_later(settings.WORKER_HEARTBEAT, self.heartbeat)

    def tcp_idle_timeout(self) -> float:
        """RFC 7766 §6.2.3: the idle timeout shortens as connections near the cap, from
        the configured one at half the cap to TCP_IDLE_TIMEOUT_MIN at the cap."""
        half = self.max_connections / 2
        over = len(self.connections) - half
        if over <= 0:
            return self.idle_timeout
        floor = min(self.idle_timeout, settings.TCP_IDLE_TIMEOUT_MIN)
        return max(floor, self.idle_timeout * (1 - over / half))

    def close_oldest_idle(self, conns: dict) -> bool:
        """Close the connection of ``conns`` idle longest (no reply owed), to make room for
        a new one (RFC 7766 §10); False if every one has work in flight."""
        for conn in conns:
            if conn.pending == 0 and not conn.write_paused:
                conn.forget()
                conn.transport.close()
                return True
        return False


class TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP client (RFC 7766)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending = 0
        self.write_paused = False
        self.read_paused = False
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.source = ""
        self.v6 = False                 # an IPv6 client (the family label of its queries)
        self.peer_ip = self.client = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        w = self.worker
        peer = transport.get_extra_info("peername")
        self.source = peer[0] if peer else ""
        self.v6 = bool(peer) and engine.client_is_ipv6(peer)
        # The peer's address for autopath (its key for the packet path, its text for the
        # hand-off); None when the transport has none.
        self.peer_ip = peer[0] if peer else None
        self.client = engine.client_key(peer) if peer else None
        mine = w.by_source.get(self.source)
        # RFC 7766 §10: a per-source limit, so one client cannot hold every connection, and
        # at a limit the oldest idle connection makes room (its client can reconnect; the
        # new one may be retrying a truncated UDP answer). Only if every connection has a
        # reply in flight is the new one refused: abort sends RST so it learns at once.
        if ((mine is not None and len(mine) >= w.max_per_source
             and not w.close_oldest_idle(mine))
                or (len(w.connections) >= w.max_connections
                    and not w.close_oldest_idle(w.connections))):
            transport.abort()
            return
        w.connections[self] = None
        w.by_source.setdefault(self.source, {})[self] = None
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        self.last_activity = w.loop.time()
        self.timer = w.loop.call_later(w.tcp_idle_timeout(), self.check_idle)

    def forget(self) -> None:
        """No longer count this connection against the caps (it is closing)."""
        w = self.worker
        w.connections.pop(self, None)
        mine = w.by_source.get(self.source)
        if mine is not None:
            mine.pop(self, None)
            if not mine:
                del w.by_source[self.source]

    def touch(self) -> None:
        """A complete query: this connection becomes the most recently active."""
        w = self.worker
        if w.connections.pop(self, 0) is None:
            w.connections[self] = None
            mine = w.by_source[self.source]
            del mine[self]
            mine[self] = None

    def connection_lost(self, exc) -> None:
        self.forget()
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        """Answer the complete messages in the buffer while the client keeps up: stop when
        its replies pile up (write paused) or too many hand-offs are in flight."""
        while (not self.write_paused and self.pending < TCP_MAX_PENDING
               and len(self.buf) >= 2 and not self.transport.is_closing()):
            n = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + n:
                break
            msg = bytes(self.buf[2:2 + n])
            del self.buf[:2 + n]
            # RFC 7766 §6.2.3: idle means no complete query for the timeout, so a client
            # trickling one byte at a time is still closed.
            self.last_activity = self.worker.loop.time()
            self.touch()
            self.query(msg)
        self.update_reading()

    def query(self, msg: bytes) -> None:
        w = self.worker
        received_ns = time.monotonic_ns()
        client = self.client if getattr(w.img, "autopath", False) else None
        action, reply = engine.tcp_answer(w.img, w.counters, msg, w.edns_max, w.udp_server.ra,
                                          self.v6, w.rotation, client)
        if w.log_queries and action != engine.HANDOFF:
            logs.log_query("tcp", self.transport.get_extra_info("peername"), msg,
                           reply if action == engine.SEND else None)
        if action == engine.SEND:
            self.write(reply)
        elif action == engine.HANDOFF:
            self.pending += 1
            w.spawn(self.handoff(msg, received_ns, client is not None))

    async def handoff(self, msg: bytes, received_ns: int | None = None,
                      autopath: bool = False) -> None:
        try:
            if autopath:
                reply = await self.worker.handoff.resolve(msg, "tcp", client=self.peer_ip)
            else:
                reply = await self.worker.handoff.resolve(msg, "tcp")
        finally:
            self.pending -= 1
        if self.worker.log_queries:
            logs.log_query("tcp", self.transport.get_extra_info("peername"), msg, reply)
        if reply is not None and not self.transport.is_closing():
            self.write(reply)
            engine.count_reply(self.worker.page, "tcp", reply, received_ns)
        self.update_reading()
        self.process()

    def write(self, reply: bytes) -> None:
        # RFC 7766 §8: length and message in one write, so they leave in one segment.
        self.transport.write(len(reply).to_bytes(2, "big") + reply)

    def update_reading(self) -> None:
        want_pause = self.write_paused or self.pending >= TCP_MAX_PENDING
        if self.transport.is_closing() or want_pause == self.read_paused:
            return
        self.read_paused = want_pause
        if want_pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.process()

    def check_idle(self) -> None:
        w = self.worker
        left = self.last_activity + w.tcp_idle_timeout() - w.loop.time()
        busy = self.pending and not self.write_paused
        if left > 0 or busy:
            self.timer = w.loop.call_later(max(left, 0.1), self.check_idle)
            return
        # A client that stopped reading cannot drain our buffer: drop it (abort), otherwise
        # close gracefully after the last reply (RFC 7766 §6.2.3).
        if self.write_paused:
            self.transport.abort()
        else:
            self.transport.close()


# --------------------------------------------------------------------------- process entry


def slot_list(text: str) -> list[int]:
    """``3`` or ``0,2,4``: one number per slot this process serves, in slot order."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kdns.serve.worker", description="kdns worker (started by kdns serve)")
    # One process serves one or more slots: --slot, --udp-fd, --tcp-fd and --control-fd
    # (and --forward-fd) each list one value per slot, in the same order.
    for name in ("--slot", "--udp-fd", "--tcp-fd", "--control-fd"):
        p.add_argument(name, type=slot_list, required=True)
    p.add_argument("--counters-fd", type=int, required=True)
    p.add_argument("--edns-udp-size", type=int, default=settings.EDNS_UDP_SIZE)
    p.add_argument("--tcp-idle-timeout", type=float, default=settings.TCP_IDLE_TIMEOUT)
    p.add_argument("--tcp-max-connections", type=int, default=settings.TCP_MAX_CONNECTIONS)
    p.add_argument("--tcp-max-per-source", type=int, default=settings.TCP_MAX_PER_SOURCE)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="klog", choices=logs.LOG_FORMATS)
    p.add_argument("--log-queries", action="store_true")
    p.add_argument("--no-loadbalance", dest="loadbalance", action="store_false")
    # The supervisor's forwarding-config channels; without them outside names are REFUSED.
    p.add_argument("--forward-fd", type=slot_list, default=None)
    p.add_argument("--cache-size", type=int, default=settings.CACHE_SIZE)
    a = p.parse_args(argv)
    n = len(a.slot)
    for name in ("udp_fd", "tcp_fd", "control_fd") + (("forward_fd",) if a.forward_fd else ()):
        if len(getattr(a, name)) != n:
            p.error(f"--{name.replace('_', '-')} lists {len(getattr(a, name))} values for "
                    f"{n} slots")
    return a


def setup_logging(level: str, fmt: str = "klog") -> None:
    """The supervisor's line format on stderr (kdns/observe/logs.py)."""
    logs.setup_worker(level, fmt)


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(a.log_level, a.log_format)
    return serve(a)


def serve(a: argparse.Namespace) -> int:
    """Serve with parsed arguments (the zygote parses them before it forks: whatever a
    worker runs first after the fork dirties pages that were shared). One slot: its loop on
    this thread, as a process of its own. Several: ``serve_slots``."""
    images = SharedImages() if len(a.slot) > 1 else None
    hold = settings.UDP_HOLD_US if settings.ENV.udp_hold_us is None else settings.ENV.udp_hold_us
    workers = []
    for i, slot in enumerate(a.slot):
        page = publish.map_page(a.counters_fd, slot)
        workers.append(Worker(
            slot=slot,
            udp=socket.socket(fileno=a.udp_fd[i]),
            tcp=socket.socket(fileno=a.tcp_fd[i]),
            control=socket.socket(fileno=a.control_fd[i]),
            page=page,
            edns_max=a.edns_udp_size,
            tcp_idle_timeout=a.tcp_idle_timeout,
            tcp_max_connections=a.tcp_max_connections,
            tcp_max_per_source=a.tcp_max_per_source,
            log_queries=a.log_queries,
            loadbalance=a.loadbalance,
            handoff=forwarding_handoff(a, page, i),
            udp_hold_us=hold,
            images=images,
        ))
    os.close(a.counters_fd)
    if images is None:
        with asyncio.Runner(loop_factory=event_loop) as runner:
            runner.run(workers[0].run())
        return 0
    try:
        return serve_slots(workers)
    finally:
        images.close()


def set_name(name: bytes) -> None:
    """Name the calling thread, and so a process from its main thread (prctl(2)
    PR_SET_NAME: /proc/<pid>/comm and /proc/<pid>/task/<tid>/comm, what ps and ``top -H``
    show): a forked worker's command line is the zygote's, and a process's slots share
    one, so an operator (or a test) tells them apart by name."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_thread_name(name: str) -> None:
    set_name(name.encode())


def serve_slots(workers: list[Worker]) -> int:
    """Several slots in one process, one thread each with its own event loop: the first on
    this (the main) thread, which alone takes SIGTERM/SIGINT and stops them all.

    Why threads: each slot's UDP is served inside ``UdpServer.wait`` with the GIL released,
    so the slots answer in parallel and Python runs only for hand-offs, TCP, control and
    timers; a slot costs its loop and buffers, not another interpreter. A slot whose thread
    fails stops the whole process (exit 1): the supervisor replaces it with every slot, on
    the very sockets, as it replaces a process that died."""
    failed: list[int] = []

    def stop_all() -> None:
        for w in workers:
            w.stop_soon()

    def run_one(w: Worker) -> None:
        try:
            with asyncio.Runner(loop_factory=event_loop) as runner:
                runner.run(w.run())
        except BaseException:
            log.exception("worker %d failed; stopping its process", w.slot)
            failed.append(w.slot)
            stop_all()

    def thread_main(w: Worker) -> None:
        set_thread_name(f"kdns-slot-{w.slot}")
        run_one(w)

    first = workers[0]
    first.on_signal = stop_all
    for w in workers[1:]:
        w.on_signal = False
    # The other slots' threads never take a signal (their wait would only see EINTR): the
    # mask is inherited from here, and this thread's own is restored after.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    threads = []
    try:
        for w in workers[1:]:
            t = threading.Thread(target=thread_main, args=(w,), name=f"kdns-slot-{w.slot}")
            t.start()
            threads.append(t)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    run_one(first)
    stop_all()          # the first stopped (supervisor gone, a signal, a failure): all do
    for t in threads:
        t.join()
    return 1 if failed else 0


def forwarding_handoff(a, page, i: int = 0):
    """The forwarding hand-off of the process's ``i``-th slot when the supervisor gave
    config channels; it counts into that slot's ``page``."""
    if not a.forward_fd:
        return None
    from kdns.forward.handoff import ForwardingHandoff
    return ForwardingHandoff(socket.socket(fileno=a.forward_fd[i]), edns_max=a.edns_udp_size,
                             cache_size=a.cache_size, page=page)



if __name__ == "__main__":
    sys.exit(main())
