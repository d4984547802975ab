"""bench/wakeups.py reads perf stat's CSV output (-x,): the syscall counts it divides by the
answered queries. The fixtures are real perf 6.1 output captured on this project's machine:
a process making 100 sendto/recvfrom pairs, the same tracepoints --per-thread on a process
of three threads (one of which slept throughout), and a server that slept through the whole
window (every event <not counted>)."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench")
FIXTURES = os.path.join(HERE, "fixtures")


def _load_wakeups():
    # wakeups.py puts bench/ on sys.path and imports load.py and gen_cluster.py from there;
    # take both back out afterwards so that no test sees bench/'s modules.
    path, before = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("kdns_bench_wakeups",
                                                      os.path.join(BENCH, "wakeups.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - before:
            if name in ("load", "gen_cluster"):
                del sys.modules[name]
    return mod


wakeups = _load_wakeups()


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_counts_by_event():
    c = wakeups.perf_counts(fixture("perf-stat-x-syscalls.txt"))
    assert c["syscalls:sys_enter_sendto"] == 100
    assert c["syscalls:sys_enter_recvfrom"] == 100
    assert c["syscalls:sys_enter_recvmmsg"] == 0
    assert c["raw_syscalls:sys_enter"] == 9395
    assert c["task-clock"] == 117.84                  # milliseconds
    # Every event asked for is read, none twice or under another name.
    assert set(c) == set(wakeups.EVENTS)


def test_per_thread_lines_are_summed():
    c = wakeups.perf_counts(fixture("perf-stat-x-per-thread.txt"))
    assert c == {"raw_syscalls:sys_enter": 2352, "syscalls:sys_enter_sendto": 784,
                 "context-switches": 786, "task-clock": 11.65 + 11.27}


def test_not_counted_is_zero():
    c = wakeups.perf_counts(fixture("perf-stat-x-not-counted.txt"))
    assert c == {"raw_syscalls:sys_enter": 0, "context-switches": 0, "task-clock": 0}
