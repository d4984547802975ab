"""Shared memory for zone images and counters, and the generation handshake with workers.

Why: every worker must see the same immutable image and switch to a new one atomically,
without a file system (the root FS will be read-only) and without locks on the packet path.
The supervisor writes each image once into an anonymous memfd, seals it (write, grow, shrink:
nobody can change it any more, so a reader can trust it), and sends the fd with a generation
number over a unix SEQPACKET socketpair (SCM_RIGHTS) to each worker. A worker maps it
read-only and swaps between batches; it records the generation it serves in its counter page
(slot ``image_generation``) so the supervisor and tests can see when all have switched.

What it must not do: parse DNS. It only checks the image header and CRC through the engine.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading

from kdns.packet import counters as C

log = logging.getLogger("kdns.serve.publish")

GENERATION = struct.Struct("<Q")
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


def seal_image(data: bytes, name: str = "kdns-image") -> int:
    """Image bytes -> a sealed memfd holding exactly them (the caller owns the fd)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SpareMemfd:
    """A sealable memfd of ``capacity`` bytes, allocated and mapped writable ahead of need
    (``ImageMemfd(spare=...)``). Faulting in fresh shared-memory pages while writing a
    30 MiB image cost ~20 ms, mapping them ~12 ms; done ahead, on another thread (these
    calls release the GIL), they cost the compile nothing.

    ``populate=False`` maps it without allocating its pages: they are the pod's memory from
    the moment they exist (a 33 MiB image's spare is a second image held between compiles,
    the whole time the endpoints churn), so the compile that writes them pays the faults
    instead and only the mapping is done ahead."""

    def __init__(self, capacity: int, name: str = "kdns-image", populate: bool = True):
        self.capacity = capacity
        self.map: mmap.mmap | None = None
        self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, capacity)
            if populate:
                os.posix_fallocate(self.fd, 0, capacity)
            self.map = mmap.mmap(self.fd, capacity,
                                 flags=mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0)
                                                          if populate else 0),
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ImageMemfd:
    """An image compiled straight into a memfd: the compile core writes through
    ``map``, ``seal`` makes it immutable, and ``Publisher.publish`` hands that very fd to the
    workers, so a 30 MiB image is not copied once more per change. ``len()`` is its size;
    after ``seal``, ``map`` is a read-only mapping (what ``engine.Image`` checks)."""

    def __init__(self, size: int, name: str = "kdns-image", spare: SpareMemfd | None = None):
        """``spare``: a prepared memfd of at least ``size`` bytes to use (it is taken)."""
        self.size = size
        self._wmap: mmap.mmap | None = None
        if spare is not None:
            if spare.capacity < size:
                raise ValueError("spare memfd smaller than the image")
            self.fd: int | None = spare.fd
            self._wmap, spare.fd, spare.map = spare.map, None, None
        else:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            if self._wmap is None:
                os.ftruncate(self.fd, size)
                self._wmap = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.map = memoryview(self._wmap)[:size]
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self.size

    def seal(self) -> "ImageMemfd":
        # No writable mapping may exist when F_SEAL_WRITE is added (EBUSY otherwise); a
        # spare's extra capacity is cut off first.
        self.map.release()
        self._wmap.close()
        self._wmap = None
        os.ftruncate(self.fd, self.size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
        self.map = map_sealed(self.fd)
        return self

    def take_fd(self) -> int:
        """The sealed fd, now the caller's to close."""
        fd, self.fd = self.fd, None
        if fd is None or not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE:
            raise ValueError("take_fd() of an image that is not sealed, or given away")
        self.map.close()
        return fd

    def close(self) -> None:
        m = getattr(self, "map", None)
        if m is not None:
            m.release() if isinstance(m, memoryview) else m.close()
        if self._wmap is not None:
            self._wmap.close()
            self._wmap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except (OSError, BufferError, AttributeError):
            pass


def map_sealed(fd: int) -> mmap.mmap:
    """Map a received image read-only, refusing one that could still change under us."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & SEALS != SEALS:
        raise ValueError("the image memfd is not sealed against writes; refusing to map it")
    return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def counters_memfd(nslots: int) -> tuple[int, mmap.mmap]:
    """One zeroed page per worker slot; the supervisor reads, each worker writes its own."""
    fd = os.memfd_create("kdns-counters", os.MFD_CLOEXEC)
    os.ftruncate(fd, nslots * C.PAGE_BYTES)
    return fd, mmap.mmap(fd, nslots * C.PAGE_BYTES, flags=mmap.MAP_SHARED)


def map_page(fd: int, slot: int) -> mmap.mmap:
    """A worker's own counter page, writable and shared."""
    return mmap.mmap(fd, C.PAGE_BYTES, flags=mmap.MAP_SHARED, offset=slot * C.PAGE_BYTES)


class Publisher:
    """Supervisor side: the current sealed image and one control channel per worker slot."""

    def __init__(self):
        self.generation = 0
        self._fd: int | None = None
        self._fd_lock = threading.Lock()   # publish (main thread) vs current_image (HTTP)
        self._channels: dict[int, socket.socket] = {}
        self._behind: set[int] = set()    # slots whose socket was full at the last publish
        # Called with each new generation after it was sent (the image stream's hook).
        self.listeners: list = []

    def publish(self, data: bytes) -> int:
        """Seal ``data`` (image bytes; an ``ImageMemfd`` gives its own fd, no copy), send it
        to every attached worker; returns the new generation.

        The caller validates the image first (``engine.Image``; ``verify`` for files).
        """
        fd = data.take_fd() if isinstance(data, ImageMemfd) else seal_image(data)
        with self._fd_lock:
            old, self._fd = self._fd, fd
            self.generation += 1
            if old is not None:
                os.close(old)       # workers that mapped it keep their mapping
        for slot in list(self._channels):
            self._send(slot)
        for listener in self.listeners:
            listener(self.generation)
        return self.generation

    def current_image(self) -> tuple[int, mmap.mmap] | None:
        """(generation, a read-only map of the image the workers were sent), or None before
        the first publish; for readers outside the main thread (the /cache listing)."""
        with self._fd_lock:
            if self._fd is None:
                return None
            return self.generation, mmap.mmap(self._fd, 0, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ)

    def attach(self, slot: int) -> socket.socket:
        """A new channel for ``slot`` (replacing any old one); returns the worker's end,
        which already has the current image queued when there is one."""
        self.detach(slot)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._channels[slot] = ours
        if self._fd is not None:
            self._send(slot)
        return theirs

    def detach(self, slot: int) -> None:
        sock = self._channels.pop(slot, None)
        self._behind.discard(slot)
        if sock is not None:
            sock.close()

    def retry(self) -> None:
        """Resend the current image to workers whose channel was full."""
        for slot in list(self._behind):
            self._send(slot)

    def close(self) -> None:
        for slot in list(self._channels):
            self.detach(slot)
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _send(self, slot: int) -> None:
        try:
            socket.send_fds(self._channels[slot], [GENERATION.pack(self.generation)], [self._fd])
            self._behind.discard(slot)
        except BlockingIOError:
            self._behind.add(slot)
        except OSError as e:
            # A dead worker: the supervisor replaces it and attaches a fresh channel.
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED):
                log.warning("could not send image generation %d to worker %d: %s",
                            self.generation, slot, e)


class Subscription:
    """Worker side of a control channel."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> tuple[int, mmap.mmap] | None:
        """Drain the channel; the newest image as (generation, read-only map), or None.

        Raises EOFError when the supervisor has gone away.
        """
        latest = None
        while True:
            try:
                msg, fds, flags, _ = socket.recv_fds(self.sock, GENERATION.size, 1)
            except (BlockingIOError, InterruptedError):
                return latest
            if not msg and not fds:
                raise EOFError("the supervisor closed the control channel")
            if flags & socket.MSG_CTRUNC or len(msg) != GENERATION.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                log.error("malformed message on the control channel; ignored")
                continue
            try:
                latest = (GENERATION.unpack(msg)[0], map_sealed(fds[0]))
            except (OSError, ValueError) as e:
                log.error("could not map image generation %d: %s", GENERATION.unpack(msg)[0], e)
            finally:
                os.close(fds[0])
