"""Workers forked from the zygote: the supervisor's children, replaced like any worker, and
far cheaper in memory than a fresh interpreter each."""
from __future__ import annotations

import os
import re
import signal

from serverutil import a_records, alive, children, cmdline, comm, running
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local"


def wait_for(cond, timeout: float, step: float = 0.02) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def zygotes(server) -> set[int]:
    return {p for p in children(server.proc.pid)
            if "kdns.serve.zygote" in cmdline(p) and comm(p) != "kdns-worker"}


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def test_workers_are_forked_children_of_the_supervisor(tmp_path):
    # Two worker processes: one alone shares its imports with nobody and has no zygote.
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        assert len(zygotes(server)) == 1
        workers = server.worker_pids()
        assert len(workers) == 2
        # Reparented to the supervisor (a child subreaper), so it waits for them itself.
        assert {comm(p) for p in workers} == {"kdns-worker"}
        assert {parent(p) for p in workers} == {server.proc.pid}
        assert a_records(server.udp(K)) == ["10.96.0.1"]


def test_a_dead_zygote_is_replaced_and_workers_still_are(tmp_path):
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        (zygote,) = zygotes(server)
        os.kill(zygote, signal.SIGKILL)             # a child of the server we started
        assert wait_for(lambda: not alive(zygote), 5)
        before = server.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(server.worker_pids() - before) == 1, 10), server.logs()
        new = (server.worker_pids() - before).pop()
        assert comm(new) == "kdns-worker"           # forked by a new zygote, not exec'd
        assert zygotes(server) and zygote not in zygotes(server)
        server.wait_generation(1, timeout=10)
        assert a_records(server.udp(K)) == ["10.96.0.1"]
        assert "Traceback" not in server.logs()


def test_one_worker_needs_no_zygote(tmp_path):
    with running(tmp_path, image=sample_image(), workers=1) as server:
        assert not zygotes(server)
        assert len(server.worker_pids()) == 1
        assert a_records(server.udp(K)) == ["10.96.0.1"]


def test_fresh_interpreters_when_forking_is_off(tmp_path):
    env = {**os.environ, "KDNS_FORK_WORKERS": "0"}
    # Two processes, where a zygote would otherwise be started.
    with running(tmp_path, image=sample_image(), workers=2, env=env,
                 args=("--worker-processes", "2")) as server:
        assert not zygotes(server)
        assert {comm(p) for p in server.worker_pids()} != {"kdns-worker"}
        assert a_records(server.udp(K)) == ["10.96.0.1"]


def test_an_added_worker_costs_far_less_than_an_interpreter(tmp_path):
    # Summed PSS of every kdns process at 2 and at 5 workers, each a process of its own
    # (forked from the zygote): a fresh interpreter per worker cost ~16 MiB each on this
    # machine, a forked one ~6.
    sums = {}
    for n in (2, 5):
        (tmp_path / str(n)).mkdir()
        with running(tmp_path / str(n), image=sample_image(), workers=n,
                     args=("--worker-processes", str(n))) as server:
            server.wait_generation(1, timeout=10)
            assert a_records(server.udp(K)) == ["10.96.0.1"]
            pids = [server.proc.pid, *children(server.proc.pid)]
            sums[n] = sum(pss_kib(p) for p in pids)
    per_worker_mib = (sums[5] - sums[2]) / 3 / 1024
    assert per_worker_mib < 10, sums


def test_forked_workers_log_at_the_level_given(tmp_path):
    # Logging is set up in the zygote from --log-level: a forked worker's debug line shows
    # with debug and its own pid, and not at the default level.
    with running(tmp_path, image=sample_image(), workers=2,
                 args=("--log-level", "debug", "--worker-processes", "2")) as server:
        pid = min(server.worker_pids())
        assert comm(pid) == "kdns-worker"
        # klog's header: severity letter (debug is I), date, time, pid, file:line].
        line = re.compile(rf"^I\d{{4}} [\d:.]+ +{pid} worker\.py:\d+\] worker \d serving", re.M)
        assert wait_for(lambda: line.search(server.logs()), 5), server.logs()
    (tmp_path / "quiet").mkdir()
    with running(tmp_path / "quiet", image=sample_image(), workers=2,
                 args=("--worker-processes", "2")) as server:
        assert a_records(server.udp(K)) == ["10.96.0.1"]
        assert "worker 0 serving" not in server.logs()
