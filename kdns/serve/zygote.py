"""The zygote: one pre-imported, single-threaded process that workers are forked from.

Why: a worker started as a fresh interpreter (``python -m kdns.serve.worker``) builds its
own copy of every module it imports, ~16 MiB of private memory each, and a pod pays that
once per worker. Forked from a process that imported all of it once and froze it
(``gc.freeze()``: the collector never writes to those objects, so their pages stay shared
copy-on-write), a worker's own memory is what it changes after the fork.

Why a process of its own rather than a fork of the supervisor: the supervisor has HTTP and
API threads (forking a threaded process is unsafe) and holds the cluster model; the zygote
is started by fork+exec like any program, imports what a worker runs, and only ever forks.

Protocol, on a SOCK_SEQPACKET socket from the supervisor: each request is the worker's
argument list (JSON) with the fds it serves passed along (SCM_RIGHTS); ``{0}``, ``{1}``...
in the arguments stand for those fds' numbers here. The reply is ``{"pid": N}``. The worker
is forked twice (the middle process exits at once) so it becomes the supervisor's child
(the supervisor is a child subreaper, PR_SET_CHILD_SUBREAPER) and the supervisor waits for
it, reads its exit status and replaces it exactly as a worker it started itself. The
zygote exits when the supervisor's end closes.

What it must not do: start threads, open sockets of its own, or serve anything.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import traceback

ZYGOTE_NAME = b"kdns-zygote"        # /proc/<pid>/comm, what ps and top show
WORKER_NAME = b"kdns-worker"
MAX_REQUEST = 65536


# A process serving several slots gets 4 or 5 fds per slot and the counters: as many as one
# SCM_RIGHTS message carries (the kernel's SCM_MAX_FD); the supervisor starts a process
# that needs more as a fresh interpreter.
MAX_FDS = 253


def run_worker(a) -> int:
    """In the forked worker: serve with the parsed arguments ``a``; never returns to the
    zygote's loop."""
    from kdns.serve import worker
    worker.set_name(WORKER_NAME)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return worker.serve(a) or 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def fork_worker(sock: socket.socket, args: list[str], fds: list[int]) -> int:
    """Fork a worker twice removed (so it is reparented to the supervisor); its pid."""
    from kdns.serve import worker
    a = worker.parse_args([arg.format(*fds) for arg in args])
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:                       # the middle process: fork the worker, then go
        code = 0
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                sock.close()              # the supervisor must see EOF when the zygote dies
                code = run_worker(a)
                sys.stdout.flush()
                sys.stderr.flush()
            else:
                os.write(w, str(pid).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = os.read(r, 32)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if not data:
        raise OSError("the worker could not be forked")
    return int(data)


def warm_up(worker) -> None:
    """Run here, once, the start-up code every worker runs: what it imports lazily, and the
    functions it calls (Python 3.11 rewrites a function's bytecode in place as it warms up,
    so a function first run after the fork dirties its pages in every worker). No thread
    and no socket: this process must stay safe to fork."""
    import asyncio
    import concurrent.futures.thread  # noqa: F401  (ThreadPoolExecutor imports it lazily)
    import shutil  # noqa: F401

    async def spin():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        try:
            got = loop.create_future()
            loop.add_reader(r, lambda: got.done() or got.set_result(os.read(r, 1)))
            loop.call_later(0, os.write, w, b"x")
            await got
            loop.remove_reader(r)
            await asyncio.wait([asyncio.ensure_future(asyncio.sleep(0))], timeout=1)
        finally:
            os.close(r)
            os.close(w)

    for _ in range(8):
        asyncio.run(spin())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[argv.index("--control-fd") + 1]))
    # Ctrl-C reaches the whole process group; the supervisor decides when this stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Everything a worker imports, imported once here: the pages stay shared with every
    # worker forked from this process.
    from kdns.serve import worker
    from kdns.forward import handoff  # noqa: F401
    worker.set_name(ZYGOTE_NAME)
    # Logging is set up once here: a worker forked afterwards has it (the pid in each line
    # is read when the line is written).
    worker.setup_logging(argv[argv.index("--log-level") + 1] if "--log-level" in argv
                         else "info",
                         argv[argv.index("--log-format") + 1] if "--log-format" in argv
                         else "klog")
    warm_up(worker)
    gc.collect()
    gc.freeze()
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except OSError:
            return 0
        if not msg:
            return 0                      # the supervisor went away
        try:
            reply = {"pid": fork_worker(sock, json.loads(msg), fds)}
        except (OSError, ValueError) as e:
            reply = {"error": str(e)}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


if __name__ == "__main__":
    sys.exit(main())
