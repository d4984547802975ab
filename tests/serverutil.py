"""Run a real `kdns serve` for end-to-end tests, and always stop it by pid.

The server listens on loopback ports drawn at start (redrawn if one is taken meanwhile); with an image (tests/zonefixtures) it is started
with --from-image, so tests do not depend on the Kubernetes record rules; ``publish`` then
replaces the image file and sends SIGHUP (an immediate re-read) and waits until every worker
reports the new generation through /metrics.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import dns.message
import dns.query
import dns.rcode
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A loopback port free for both UDP and TCP right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free loopback port")


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def workers_of(pid: int) -> set[int]:
    """The supervisor's worker processes: its children but the zygote they are forked from.
    A forked worker has the zygote's command line and names itself kdns-worker
    (kdns/serve/zygote.py) before it serves."""
    return {p for p in children(pid)
            if "kdns.serve.zygote" not in cmdline(p) or comm(p) == "kdns-worker"}


def children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (read from /proc, no tools needed)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def own_resolvers(tmp_path, args) -> list[str]:
    """A test kdns never forwards to the machine's resolvers: unless the test
    chose them, an empty resolv.conf (no upstream: outside names are REFUSED) and no
    ConfigMap directory."""
    extra = []
    if "--resolv-conf" not in args:
        path = tmp_path / "empty-resolv.conf"
        path.write_text("")
        extra += ["--resolv-conf", str(path)]
    if "--config-dir" not in args and not {"--corefile", "--corefile-configmap"} & set(args):
        extra += ["--config-dir", str(tmp_path / "no-kube-dns-config")]
    return extra


class Port:
    """A placeholder for a loopback port in ``Kdns(args=..., env=...)``: drawn afresh for each
    start attempt, read back as ``kdns.ports[name]`` once started."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Port({self.name!r})"


# How many times Kdns.start draws new ports when kdns reports one of them taken: a port free
# when drawn may be bound by anyone before the child binds it; five losses in a row would
# mean something other than bad luck.
START_ATTEMPTS = 5
PORT_TAKEN = "Address already in use"


class Kdns:
    """A running `kdns serve` child process.

    Its ports are drawn when it starts (``port``, ``http_port``, and one per ``Port`` in
    ``args`` or ``env``, in ``ports``); if kdns exits because one was taken meanwhile, start
    draws them all again and retries, so no test fails on another socket's luck."""

    def __init__(self, tmp_path, *, image: bytes | None = None, zone_file: str | None = None,
                 workers: int = 2, args: tuple = (), env: dict | None = None, host: str = HOST,
                 source: list[str] | None = None, dns_port: int | None = None,
                 python: str = sys.executable, python_args: tuple = (), cwd: str = ROOT):
        self.tmp = tmp_path
        self.host = host
        self.cwd = cwd
        self.workers = workers
        self.image_path = None
        if source is not None:                   # e.g. --kubecfg-file: no zone file here
            pass
        elif image is not None:
            self.image_path = str(tmp_path / "zone.img")
            with open(self.image_path, "wb") as f:
                f.write(image)
            source = ["--from-image", self.image_path]
        else:
            source = ["--from-file", zone_file]
        self.argv_template = [
            python, *python_args, "-m", "kdns", "serve", *source,
            # A fixed dns_port is shared on purpose (SO_REUSEPORT): not redrawn.
            "--dns-bind-address", host,
            "--dns-port", Port("dns") if dns_port is None else str(dns_port),
            *(() if dns_port is None else ("--share-dns-port",)),
            "--healthz-port", Port("http"), "--metrics-port", Port("http"),
            # The other listeners have fixed default ports (tests run in
            # parallel) and SIGTERM would wait out the 5s lameduck; tests opt in.
            "--health-port", "0", "--ready-port", "0", "--sidecar-port", "0",
            "--lameduck", "0",
            "--workers", str(workers), *args, *own_resolvers(tmp_path, args)]
        self.env_template = {**os.environ, **(env or {})}
        self.attempt = 0
        self.draw_ports()
        self.proc: subprocess.Popen | None = None
        self.generation = 1

    def draw_ports(self) -> None:
        """Fresh ports for every placeholder; argv, env and log path follow."""
        names = [v.name for v in [*self.argv_template, *self.env_template.values()]
                 if isinstance(v, Port)]
        self.ports: dict[str, int] = {}
        for name in names:
            if name not in self.ports:
                self.ports[name] = free_port(self.host)
        fill = lambda v: str(self.ports[v.name]) if isinstance(v, Port) else v
        self.argv = [fill(v) for v in self.argv_template]
        self.env = {k: fill(v) for k, v in self.env_template.items()}
        self.port = self.ports.get("dns", int(self.argv[self.argv.index("--dns-port") + 1]))
        self.http_port = self.ports["http"]
        self.attempt += 1
        self.log_path = self.tmp / f"kdns-{self.port}-{self.attempt}.log"

    # ---- lifecycle
    def start(self, timeout: float = 20.0, until=None) -> "Kdns":
        """Start and wait for /readiness (or ``until(self)``); ``timeout`` is per attempt."""
        until = until or Kdns.ready
        for attempt in range(START_ATTEMPTS):
            if attempt:
                self.draw_ports()
            self.log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if until(self):
                    return self
                time.sleep(0.05)
            else:
                raise AssertionError(f"kdns did not become ready in {timeout}s: {self.logs()}")
            # kdns exits 2 naming the flag when a port is taken (before any worker exists).
            if self.proc.returncode != 2 or PORT_TAKEN not in self.logs():
                break
            self.log.close()
        raise AssertionError(f"kdns exited with {self.proc.returncode}: {self.logs()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit; only this pid (its workers follow)."""
        if self.proc is None:
            return None
        workers = children(self.proc.pid)      # the zygote too: it must exit as well
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Workers exit when the supervisor's control channel closes; make sure.
        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in workers:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode

    def logs(self) -> str:
        with contextlib.suppress(OSError):
            self.log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- HTTP
    def http_get(self, path: str) -> tuple[int, str]:
        try:
            netloc = f"[{self.host}]" if ":" in self.host else self.host
            with urllib.request.urlopen(f"http://{netloc}:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> bool:
        try:
            return self.http_get("/readiness") == (200, "ok")
        except OSError:
            return False

    def metrics(self) -> dict:
        """{(name, frozenset(labels.items())): value} of the current scrape."""
        _, text = self.http_get("/metrics")
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def served_generations(self) -> list[int]:
        m = self.metrics()
        return [int(m[("kdns_image_generation", frozenset({("worker", str(i))}))])
                for i in range(self.workers)]

    # ---- zone updates
    def publish(self, image: bytes, timeout: float = 10.0) -> int:
        """Replace the image file atomically, SIGHUP, wait until all workers serve it."""
        tmp = self.image_path + ".new"
        with open(tmp, "wb") as f:
            f.write(image)
        os.replace(tmp, self.image_path)
        self.proc.send_signal(signal.SIGHUP)
        self.generation += 1
        self.wait_generation(self.generation, timeout)
        return self.generation

    def wait_generation(self, generation: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(g == generation for g in self.served_generations()):
                return
            time.sleep(0.005)
        raise AssertionError(f"workers serve {self.served_generations()}, not {generation}")

    def worker_pids(self) -> set[int]:
        return workers_of(self.proc.pid)

    # ---- DNS
    def udp(self, name: str, rdtype: str = "A", **kw) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        return dns.query.udp(q, self.host, port=self.port, timeout=2)

    def tcp(self, name: str, rdtype: str = "A", **kw) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        return dns.query.tcp(q, self.host, port=self.port, timeout=2)


@contextlib.contextmanager
def running(tmp_path, **kw):
    server = Kdns(tmp_path, **kw)
    try:
        yield server.start()
    finally:
        server.stop()


def a_records(msg: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in msg.answer for rd in rrset if rrset.rdtype == 1)


def rcode_text(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())
