"""Worker slots as threads: ``--workers N`` slots hosted by ``--worker-processes P``
processes, one thread (and event loop) per slot. Every slot keeps its own socket, counter
page and heartbeat; a process is replaced with all its slots when it dies or any of them
stalls, and what queued on their sockets meanwhile is answered."""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
import socket
import time
import types

import dns.message
import pytest

from conftest import unavailable

from kdns import settings
from kdns.packet import counters as C
from kdns.serve import supervisor as S
from kdns.serve import worker as W
from kdns.zone import refpath
from serverutil import HOST, a_records, alive, children, cmdline, running
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local"


def wait_for(cond, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def threads_of(pid: int) -> dict[int, str]:
    """{tid: its name} of a process (/proc/<pid>/task/<tid>/comm)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except OSError:
            pass
    return out


def slots_of(pid: int) -> set[int]:
    """The slots a worker process serves on threads of their own (its first slot is served
    on the main thread, named after the process)."""
    return {int(name.rsplit("-", 1)[1]) for name in threads_of(pid).values()
            if name.startswith("kdns-slot-")}


class Pages:
    """The supervisor's counter pages, read through its memfd (/proc/<pid>/fd): what each
    slot counted, as the supervisor sees it."""

    def __init__(self, supervisor_pid: int, nslots: int):
        fd_dir = f"/proc/{supervisor_pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:kdns-counters"):
                with open(f"{fd_dir}/{fd}", "rb") as f:
                    self.map = mmap.mmap(f.fileno(), nslots * C.PAGE_BYTES,
                                         prot=mmap.PROT_READ)
                break
        else:
            raise AssertionError("the supervisor holds no counters memfd")
        self.nslots = nslots

    def udp_queries(self, slot: int) -> int:
        """UDP queries of type A the slot counted (the tests ask A; the health probe, which
        runs on its own clock, asks SRV)."""
        words = memoryview(self.map)[slot * C.PAGE_BYTES:(slot + 1) * C.PAGE_BYTES].cast("Q")
        return sum(words[C.LAYOUT[f"{v}queries_udp_A"]] for v in ("", "v6"))

    def close(self) -> None:
        self.map.close()


def expected_reply(wire: bytes) -> bytes:
    return refpath.answer(refpath.Image(sample_image()), wire)[1]


def query_id(i: int) -> bytes:
    q = dns.message.make_query(K, "A")
    q.id = i & 0xFFFF
    return q.to_wire()


# --------------------------------------------------------------------------- serving


def test_slots_in_threads_answer_on_every_socket_and_count_on_their_own_page(tmp_path):
    with running(tmp_path, image=sample_image(), workers=4,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        assert len(procs) == 2
        # Slot i is hosted by process i % 2: slots 0 and 2 in one, 1 and 3 in the other,
        # the second of each on a thread of its own.
        assert sorted(sorted(slots_of(p)) for p in procs) == [[2], [3]]
        assert "with 4 workers (--workers) in 2 processes" in server.logs()
        pages = Pages(server.proc.pid, 4)
        try:
            before = [pages.udp_queries(i) for i in range(4)]
            sent = 0
            # One fresh client socket per query: SO_REUSEPORT spreads them over the four
            # sockets by their source port. Until every slot has answered some.
            while sent < 2000 and not all(pages.udp_queries(i) > before[i] for i in range(4)):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(2)
                    wire = query_id(sent)
                    s.sendto(wire, (HOST, server.port))
                    assert s.recv(65535) == expected_reply(wire)
                sent += 1
            counted = [pages.udp_queries(i) - before[i] for i in range(4)]
            assert all(counted), counted
            # Each query counted once, on the page of the slot that answered it.
            assert sum(counted) == sent, (counted, sent)
        finally:
            pages.close()
        assert a_records(server.tcp(K)) == ["10.96.0.1"]
        # Every slot maps a new image (one check per process, shared by its slots).
        assert server.served_generations() == [1, 1, 1, 1]
        server.publish(sample_image("10.96.0.9"))
        assert server.served_generations() == [2, 2, 2, 2]
        assert {a_records(server.udp(K))[0] for _ in range(20)} == {"10.96.0.9"}
        assert "Traceback" not in server.logs()


def test_one_process_can_host_every_slot(tmp_path):
    with running(tmp_path, image=sample_image(), workers=3,
                 args=("--worker-processes", "1")) as server:
        (proc,) = server.worker_pids()
        assert slots_of(proc) == {1, 2}
        assert server.served_generations() == [1, 1, 1]
        assert a_records(server.udp(K)) == ["10.96.0.1"]


def test_slots_in_fresh_interpreters_when_forking_is_off(tmp_path):
    env = {**os.environ, "KDNS_FORK_WORKERS": "0"}
    with running(tmp_path, image=sample_image(), workers=4, env=env,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        assert len(procs) == 2 and sorted(sorted(slots_of(p)) for p in procs) == [[2], [3]]
        assert server.served_generations() == [1, 1, 1, 1]
        assert a_records(server.udp(K)) == ["10.96.0.1"]


# --------------------------------------------------------------------------- faults


def test_processes_of_several_slots_exit_when_the_supervisor_is_killed(tmp_path):
    """Every slot sees its control channel close and stops; the process exits once all its
    slots have: nothing keeps answering as an orphan."""
    with running(tmp_path, image=sample_image(), workers=4,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        assert all(slots_of(p) for p in procs)
        server.proc.kill()
        server.proc.wait(5)
        assert wait_for(lambda: not any(alive(p) for p in procs), 5)


def test_sigterm_stops_every_slot_of_every_process_cleanly(tmp_path):
    with running(tmp_path, image=sample_image(), workers=4,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert wait_for(lambda: not any(alive(p) for p in procs), 5)
        logs = server.logs()
        assert "Traceback" not in logs and "exited with status" not in logs, logs
        assert "stopped" in logs


def queue_queries(server, timeout: float, n: int = 64) -> list[socket.socket]:
    """``n`` queries to ``server``, one client socket each, so the kernel spreads them over
    every slot's SO_REUSEPORT socket; the sockets, waiting for their answers."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.sendto(query_id(i), (HOST, server.port))
        socks.append(s)
    return socks


def queue_then_kill(server, victim: int, nslots: int, remaining: int) -> list[int]:
    """Stop ``victim`` (a worker process of ``server``), queue 64 queries spread over every
    socket (one client socket each), kill it, wait until ``remaining`` worker processes run
    without it, and check every query is answered; the queries each slot's page counted."""
    pages = Pages(server.proc.pid, nslots)
    socks = []
    try:
        os.kill(victim, signal.SIGSTOP)          # a child of the server we started
        before = [pages.udp_queries(i) for i in range(nslots)]
        socks += queue_queries(server, 20)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: not alive(victim) and len(server.worker_pids()) == remaining
                        and victim not in server.worker_pids(), 10), server.logs()
        for i, s in enumerate(socks):
            assert s.recv(65535) == expected_reply(query_id(i))
        counted = [pages.udp_queries(k) - before[k] for k in range(nslots)]
        # The pages count on where the predecessor stopped.
        assert sum(counted) == len(socks), counted
        return counted
    finally:
        for s in socks:
            s.close()
        pages.close()
        if alive(victim):
            os.kill(victim, signal.SIGKILL)


def test_a_killed_process_is_replaced_with_all_its_slots_and_their_queues_answered(tmp_path):
    """The process hosting slots 0 and 2 is stopped, queries queue on their sockets, then it
    is killed: its replacement serves both slots on the sockets the supervisor kept, and
    answers every query that queued meanwhile."""
    with running(tmp_path, image=sample_image(), workers=4,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        (victim,) = [p for p in procs if slots_of(p) == {2}]
        (survivor,) = procs - {victim}
        counted = queue_then_kill(server, victim, 4, remaining=2)
        # Both of the victim's slots had queries queued, and the replacement answered them.
        assert counted[0] and counted[2], counted
        server.wait_generation(1, timeout=10)
        assert survivor in server.worker_pids()
        (new,) = server.worker_pids() - {survivor}
        assert slots_of(new) == {2}
        assert "workers 0,2 (pid %d) exited" % victim in server.logs()


def test_by_default_two_workers_are_threads_of_one_process_replaced_together(tmp_path):
    """The default hosts every slot in one worker process, with no zygote (nothing to share
    it with): that process is killed while queries queue on both slots' sockets, and its
    replacement, a fresh interpreter as no zygote exists, serves both slots on the sockets
    the supervisor kept and answers every query that queued meanwhile."""
    assert settings.DEFAULT_WORKER_PROCESSES == 1
    with running(tmp_path, image=sample_image(), workers=2) as server:
        (victim,) = server.worker_pids()
        # Every child of the supervisor: a zygote would be one more.
        assert children(server.proc.pid) == {victim}
        assert "kdns.serve.worker" in cmdline(victim)
        # Slot 0 on the main thread (named after the process), slot 1 on a thread of its own.
        assert slots_of(victim) == {1}
        assert "with 2 workers (--workers) in 1 process," in server.logs()
        counted = queue_then_kill(server, victim, 2, remaining=1)
        # Both slots had queries queued, and the replacement answered them.
        assert counted[0] and counted[1], counted
        server.wait_generation(1, timeout=10)
        (new,) = server.worker_pids()
        assert children(server.proc.pid) == {new}
        assert slots_of(new) == {1}
        assert server.served_generations() == [1, 1]
        assert "workers 0,1 (pid %d) exited" % victim in server.logs()


PTRACE_CONT, PTRACE_SEIZE, PTRACE_INTERRUPT = 7, 0x4206, 0x4207
WALL = 0x40000000                   # waitpid's __WALL: a traced thread, not a child


def traced_status(libc, tid: int, want, timeout: float) -> int:
    """Wait (bounded) for the traced thread ``tid`` to report a status ``want`` accepts;
    other stops are continued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(tid, WALL | os.WNOHANG)
        if pid == 0:
            time.sleep(0.01)
            continue
        if want(status):
            return status
        if os.WIFSTOPPED(status):
            libc.ptrace(PTRACE_CONT, tid, None, None)
    raise AssertionError(f"thread {tid} reported nothing wanted in {timeout}s")


def test_a_frozen_slot_thread_gets_its_process_replaced(tmp_path):
    """One slot's thread stops (a ptrace interrupt stops that thread alone; its process's
    other slot keeps serving): its heartbeat stands still, the supervisor kills the process
    and replaces it with both slots, and what queued on the frozen slot's socket is
    answered."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    bound = settings.WORKER_STALL_TIMEOUT + 20
    with running(tmp_path, image=sample_image(), workers=4,
                 args=("--worker-processes", "2")) as server:
        procs = server.worker_pids()
        (victim,) = [p for p in procs if slots_of(p) == {3}]
        (tid,) = [t for t, name in threads_of(victim).items() if name == "kdns-slot-3"]
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
            unavailable(f"ptrace is not permitted here ({os.strerror(ctypes.get_errno())})")
        pages = Pages(server.proc.pid, 4)
        socks = []
        try:
            assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0
            traced_status(libc, tid, os.WIFSTOPPED, 5)
            before = [pages.udp_queries(i) for i in range(4)]
            socks += queue_queries(server, bound)
            # The stopped thread is reaped here (its tracer), or its process could never be.
            traced_status(libc, tid, lambda st: os.WIFSIGNALED(st) or os.WIFEXITED(st), bound)
            assert wait_for(lambda: not alive(victim) and len(server.worker_pids()) == 2
                            and victim not in server.worker_pids(), bound), server.logs()
            for i, s in enumerate(socks):
                assert s.recv(65535) == expected_reply(query_id(i))
            counted = [pages.udp_queries(k) - before[k] for k in range(4)]
            assert counted[3] and sum(counted) == len(socks), counted
            assert ("worker 3 (pid %d) made no progress" % victim) in server.logs()
            assert "with the 1 other slot of its process" in server.logs()
            server.wait_generation(1, timeout=bound)
        finally:
            for s in socks:
                s.close()
            pages.close()
            if alive(victim):
                os.kill(victim, signal.SIGKILL)
            try:
                while os.waitpid(tid, WALL | os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass                    # reaped already


# --------------------------------------------------------------------------- the watchdog


class FakeProc:
    pid = 4242

    def __init__(self):
        self.killed = 0

    def poll(self):
        return None

    def kill(self):
        self.killed += 1


def test_watchdog_kills_the_process_when_one_of_its_slots_stands_still():
    """Clock injected: slot 2 of a process serving slots 0 and 2 stops beating while slot
    0 keeps beating; after WORKER_STALL_TIMEOUT the process is killed, once."""
    fd, counters = S.publish.counters_memfd(4)
    try:
        slots = [S.Slot(i, None, None) for i in range(4)]
        host = S.Host(0, slots[0::2])
        host.proc = FakeProc()
        sup = types.SimpleNamespace(counters=counters)
        page = lambda i: memoryview(counters)[i * C.PAGE_BYTES:(i + 1) * C.PAGE_BYTES]
        t = 100.0
        for beat in range(1, 4):
            t += 0.1
            for i in (0, 2):
                C.set_page_heartbeat(page(i), beat)
                assert not S.Supervisor.check_heartbeat(sup, host, slots[i], t)
        for beat in range(4, 4 + int(settings.WORKER_STALL_TIMEOUT / 0.1) + 2):
            t += 0.1
            C.set_page_heartbeat(page(0), beat)        # slot 0 goes on, slot 2 stands still
            assert not S.Supervisor.check_heartbeat(sup, host, slots[0], t)
            if S.Supervisor.check_heartbeat(sup, host, slots[2], t):
                break
        assert host.proc.killed == 1
        assert t - 100.3 > settings.WORKER_STALL_TIMEOUT
        # Not again on the next look: the supervisor's loop reaps it first.
        assert not S.Supervisor.check_heartbeat(sup, host, slots[2], t + 0.1)
        assert host.proc.killed == 1
    finally:
        counters.close()
        os.close(fd)


# --------------------------------------------------------------------------- arguments


def test_process_count_defaults_to_one_and_never_exceeds_the_slots():
    assert S.process_count(1, None) == 1
    assert S.process_count(2, None) == settings.DEFAULT_WORKER_PROCESSES == 1
    assert S.process_count(8, None) == 1
    assert S.process_count(8, 2) == 2
    assert S.process_count(8, 8) == 8
    assert S.process_count(3, 5) == 3


def test_worker_arguments_list_one_value_per_slot():
    cfg = S.ServeConfig()
    args = S.worker_args(cfg, [1, 3], [[10, 11, 12], [20, 21, 22], 30])
    a = W.parse_args(args)
    assert (a.slot, a.udp_fd, a.tcp_fd, a.control_fd, a.counters_fd, a.forward_fd) == (
        [1, 3], [10, 20], [11, 21], [12, 22], 30, None)
    single = W.parse_args(S.worker_args(cfg, [0], [[5, 6, 7], 8]))
    assert (single.slot, single.udp_fd, single.counters_fd) == ([0], [5], 8)


@pytest.mark.parametrize("argv,message", [
    (["--slot", "0,1", "--udp-fd", "3", "--tcp-fd", "4,5", "--control-fd", "6,7",
      "--counters-fd", "8"], "--udp-fd lists 1 values for 2 slots"),
    (["--slot", "0,x", "--udp-fd", "3", "--tcp-fd", "4", "--control-fd", "6",
      "--counters-fd", "8"], "not a comma-separated list"),
])
def test_worker_refuses_mismatched_slot_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        W.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_more_processes_than_computed_workers_is_capped_not_refused():
    """A manifest's --worker-processes runs on any node: when the worker count came from
    the CPUs, more processes than workers are capped at the workers; only both flags given
    and contradicting each other is an error (test_cli's BAD_FLAGS)."""
    from kdns import cli
    cfg = S.ServeConfig(workers=1, workers_why="CPU quota 1 from cpu.max")
    a = types.SimpleNamespace(workers=None, worker_processes=4)
    assert cli._worker_processes(a, cfg) is None and cfg.worker_processes == 1
    cfg = S.ServeConfig(workers=2)
    a = types.SimpleNamespace(workers=2, worker_processes=3)
    assert "--worker-processes 3 is more than --workers 2" in cli._worker_processes(a, cfg)
    a = types.SimpleNamespace(workers=8, worker_processes=None)
    cfg = S.ServeConfig(workers=8)
    assert cli._worker_processes(a, cfg) is None and cfg.worker_processes is None


class FakeSlot:
    """What serve_slots uses of a Worker: ``run`` (here: fail, or wait to be stopped),
    ``stop_soon`` from any thread, ``on_signal`` and ``slot``."""

    def __init__(self, slot: int, fail: bool):
        self.slot, self.fail, self.on_signal = slot, fail, None
        self.stopped = None

    async def run(self):
        import asyncio
        if self.fail:
            raise RuntimeError("this slot's loop broke")
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.loop = loop
        await asyncio.wait_for(self.stopped.wait(), 10)

    def stop_soon(self):
        while self.stopped is None and not self.fail:
            time.sleep(0.001)           # run() has not made its event yet
        if not self.fail and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stopped.set)


def test_a_slot_thread_that_fails_stops_its_process_with_status_1(caplog):
    """The supervisor replaces a process that exits; a slot left dead inside a live process
    would go unnoticed until its heartbeat, so a failing slot stops them all."""
    slots = [FakeSlot(0, fail=False), FakeSlot(2, fail=True)]
    assert W.serve_slots(slots) == 1
    assert "worker 2 failed; stopping its process" in caplog.text
    assert slots[0].on_signal is not None and slots[1].on_signal is False
