"""Load harness: kdns against NSD and the kernel floor, same data, same run, loopback only.

One run:
  1. generates the cluster (bench/gen_cluster.py) as kdns input, NSD zones and query files;
  2. builds bench/loadgen.c and bench/responder.c with gcc into bench/bin/;
  3. starts every target: NSD (pinned to CPU 1), kdns with one worker (pinned to CPU 1),
     kdns with two workers (unpinned) and the C responder that only flips QR (pinned);
  4. checks that each kdns gives NSD's rcode and answer data for names of every kind in the
     mixes, and stops if not;
  5. drives each target with dnsperf and with loadgen (both pinned to CPU 0) on the hit mix
     and the search-path mix, in interleaved rounds;
  6. records QPS, latency, lost queries and the server's CPU time per query (utime+stime of
     every process of the server, from /proc, before/after each cell);
  7. then offers each target fixed rates (dnsperf -Q, --fixed-rates, default 20,000 and
     100,000 q/s) with every server on CPU 1 (the two-worker kdns pinned there for this
     part): CPU per answered query at everyday load, p50/p99 from dnsperf -v's per-query
     latencies, lost queries;
  8. prints the tables and the ratios kdns/NSD and kdns/floor, and writes everything to
     bench/out/load-<time>/results.json (and bench/out/load-latest.json).

    .venv/bin/python bench/load.py --short      # CI: 1,000 services, 2 s per cell, 1 round
    .venv/bin/python bench/load.py              # full: 5,000 services, 5 s per cell, 3 rounds

Every server is started by this process, pinned with taskset, in its own session (so it can
be ended by its process-group id) and with PR_SET_PDEATHSIG so it dies with the harness;
every load run is bounded by -l and a subprocess timeout. Only 127.0.0.1 is ever targeted.
The numbers are as noisy as the machine: on a shared 2-core box, compare within one run.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BIN = os.path.join(BENCH, "bin")
OUT = os.path.join(BENCH, "out")
sys.path.insert(0, BENCH)

import gen_cluster  # noqa: E402  (bench/ is not a package)

HOST = "127.0.0.1"          # the only address any traffic goes to
SERVER_CPU, CLIENT_CPU = "1", "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_tools() -> dict:
    """Compile loadgen and responder when their source is newer than the binary."""
    os.makedirs(BIN, exist_ok=True)
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise SystemExit("load.py: gcc is needed to build bench/loadgen.c and bench/responder.c")
    out = {}
    for name in ("loadgen", "responder"):
        src, exe = os.path.join(BENCH, name + ".c"), os.path.join(BIN, name)
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", exe, src], check=True)
        out[name] = exe
    return out


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if not path:
        raise SystemExit(f"load.py: {name} is not installed (`make test` installs it)")
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (racy, but only we use these)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    t.bind((HOST, port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _die_with_parent() -> None:
    # Runs in the child before exec: if the harness dies, so does the server.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pinned(cpu: str | None, argv: list) -> list:
    return ([tool("taskset"), "-c", cpu] if cpu is not None else []) + argv


def proc_tree(root: int) -> dict[int, int]:
    """{pid: utime+stime+cutime+cstime in clock ticks} of ``root`` and all its descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue                      # exited while we looked
        rest = text[text.rindex(")") + 2:].split()   # comm may hold spaces and parens
        ppid = int(rest[1])
        ticks = sum(int(x) for x in rest[11:15])     # utime stime cutime cstime
        stats[int(entry)] = (ppid, ticks)
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats and pid not in tree:
            tree.add(pid)
            frontier += [p for p, (pp, _) in stats.items() if pp == pid]
    return {p: stats[p][1] for p in tree}


def proc_tree_ticks(root: int) -> tuple[int, int]:
    """(CPU ticks, number of processes) over ``root`` and all its descendants: a server's CPU
    is its workers' as much as its own."""
    tree = proc_tree(root)
    return sum(tree.values()), len(tree)


def cpus_allowed(root: int) -> str:
    """The CPUs the processes of ``root``'s tree may run on (their Cpus_allowed_list,
    distinct values joined by '/'): how the fixed-rate table shows that a server is pinned."""
    seen = []
    for pid in proc_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^Cpus_allowed_list:\s*(\S+)", f.read(), re.M)
        except OSError:
            continue
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return "/".join(seen) or "?"


def pin_tree(root: int, cpu: str) -> None:
    """Pin every thread of every process of ``root``'s tree to ``cpu`` (taskset -a -p); what
    they fork later inherits it. A process that exits meanwhile is skipped."""
    for pid in proc_tree(root):
        subprocess.run([tool("taskset"), "-a", "-p", "-c", cpu, str(pid)], capture_output=True)


def core_ticks(cpu: str) -> tuple[int, int]:
    """(busy, steal) clock ticks of CPU ``cpu`` since boot (/proc/stat: user, nice, system,
    irq, softirq and steal are busy; steal is also the hypervisor's share on its own)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[7]
    return 0, 0


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP sockets bound to ``port`` because their receive
    buffer was full (/proc/net/udp's last column, summed over SO_REUSEPORT sockets)."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[-1])
    return total


def udp_rcvbuf_errors() -> int:
    """The machine's count of UDP datagrams dropped at a full receive buffer, any socket."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


# --------------------------------------------------------------------------- servers


class Server:
    """One server under test, started by us; ``stop`` ends it and everything it forked."""

    def __init__(self, name: str, argv: list, port: int, cpu: str | None, logpath: str,
                 cwd: str = ROOT, env: dict | None = None, ready_query=("cluster.local", "SOA"),
                 port_in_log: str | None = None):
        """``port`` 0 with ``port_in_log`` (a regex whose group 1 is the port): the server
        binds a port of its own choosing and says which in its log, so no port is picked
        here and bound there later, where another program may have taken it meanwhile."""
        self.name, self.port, self.cpu, self.logpath = name, port, cpu, logpath
        self.argv = pinned(cpu, argv)
        self.cwd, self.env, self.ready_query = cwd, env, ready_query
        self.port_in_log = port_in_log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.logf = open(self.logpath, "w")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self.logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        if self.port == 0 and self.port_in_log:
            self.port = self.wait_port(timeout)
        self.wait_ready(timeout)

    def wait_port(self, timeout: float) -> int:
        """The port the server reports in its log (``port_in_log``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(self.port_in_log, self.tail(200))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; "
                                   f"see {self.logpath}:\n{self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not report its port after {timeout}s; "
                           f"see {self.logpath}:\n{self.tail()}")

    def wait_ready(self, timeout: float) -> None:
        import dns.message
        import dns.query
        import dns.rcode
        deadline = time.monotonic() + timeout
        name, qtype = self.ready_query
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; "
                                   f"see {self.logpath}:\n{self.tail()}")
            try:
                r = dns.query.udp(dns.message.make_query(name, qtype), HOST, port=self.port,
                                  timeout=0.3)
                # Before its first sync kdns answers SERVFAIL: not ready yet.
                if r.rcode() == dns.rcode.NOERROR:
                    return
            except (OSError, dns.exception.DNSException):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not answering on {HOST}:{self.port} after {timeout}s; "
                           f"see {self.logpath}:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        try:
            with open(self.logpath) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def ticks(self) -> tuple[int, int]:
        return proc_tree_ticks(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # Whatever it forked is in its process group (its own session): end that group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.logf.close()
        self.proc = None


def nsd_conf(zdir: str, rundir: str, port: int, zones: list[str], servers: int = 1) -> str:
    """Write an NSD configuration serving ``zones`` (each from ``<zone>.zone`` in ``zdir``)
    on HOST:port, checked by nsd-checkconf; its path. Used for the server under test and
    for bench_forward.py's upstream."""
    os.makedirs(rundir, exist_ok=True)
    conf = os.path.join(rundir, "nsd.conf")
    # Foreground (-d), no control channel, no database, no privilege drop, one server process
    # per core it may use. minimal-responses: NSD otherwise adds the apex NS RRset to every
    # positive answer, which kdns (like CoreDNS) does not do: same answers, same work.
    zone_lines = "".join(f'''zone:
    name: "{z}"
    zonefile: "{z}.zone"
''' for z in zones)
    with open(conf, "w") as f:
        f.write(f"""server:
    ip-address: {HOST}@{port}
    port: {port}
    do-ip6: no
    server-count: {servers}
    reuseport: yes
    username: ""
    chroot: ""
    zonesdir: "{zdir}"
    database: ""
    zonelistfile: "{rundir}/zone.list"
    xfrdfile: "{rundir}/xfrd.state"
    xfrdir: "{rundir}"
    pidfile: "{rundir}/nsd.pid"
    verbosity: 0
    hide-version: yes
    minimal-responses: yes
    refuse-any: yes
    # Debian builds NSD with response rate limiting (200 q/s per client netblock by
    # default), which would turn a benchmark into a test of RRL: off.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
{zone_lines}""")
    subprocess.run([tool("nsd-checkconf"), conf], check=True)
    return conf


def nsd_server(zdir: str, rundir: str, port: int, cpu: str | None, servers: int = 1) -> Server:
    conf = nsd_conf(zdir, rundir, port, [gen_cluster.ZONE, "in-addr.arpa"], servers)
    return Server(f"nsd-{'cpu' + cpu if cpu else 'unpinned'}", [tool("nsd"), "-d", "-c", conf],
                  port, cpu, os.path.join(rundir, "nsd.log"))


def kdns_cmd(root: str = ROOT) -> list:
    """kdns as installed in ``root``'s .venv (``--baseline``: another checkout's build)."""
    exe = os.path.join(root, ".venv", "bin", "kdns")
    if os.path.exists(exe):
        return [exe]
    py = os.path.join(root, ".venv", "bin", "python")
    return [py if os.path.exists(py) else sys.executable, "-m", "kdns"]


def quiet_flags(rundir: str) -> list[str]:
    """Flags that keep a benchmark kdns to itself: no HTTP listener on a fixed port (two
    instances run at once), and no upstreams, so its start-up loop probe and any forward can
    never reach the machine's own resolvers (loopback only)."""
    resolv = os.path.join(rundir, "empty-resolv.conf")
    open(resolv, "w").close()
    return ["--healthz-port", "0", "--metrics-port", "0", "--health-port", "0",
            "--ready-port", "0", "--sidecar-port", "0", "--lameduck", "0",
            "--resolv-conf", resolv, "--config-dir", os.path.join(rundir, "no-config"),
            "--log-level", "info"]


# kdns logs the port it bound (``--dns-port 0``: one the kernel picked, for UDP and TCP).
KDNS_PORT_IN_LOG = re.escape(f"listening on {HOST} port ") + r"(\d+) "


# The Corefile of the ``kdns1rw`` target: kubeadm's cluster settings (the --from-file
# defaults: TTL 30, pods insecure, rotation on) plus rewrite rules, exact aliases of cluster
# names (compiled into the image) and a suffix rule (the worker's), none of which the query
# files ask: the cost of having rules configured, not of answering them.
REWRITE_COREFILE = """.:53 {
    kubernetes %(zone)s in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
%(rules)s
    loadbalance
    cache 30
}
"""


def rewrite_corefile(logdir: str, rules: bool = True) -> str:
    """``rules`` False: the same Corefile without them (the ``kdns1cf`` target)."""
    path = os.path.join(logdir, "rewrite.Corefile" if rules else "plain.Corefile")
    rules = "\n".join([f"    rewrite name exact alias{i}.example.org "
                       f"kubernetes.default.svc.{gen_cluster.ZONE}" for i in range(10)]
                      + [f"    rewrite name suffix .corp.example. .svc.{gen_cluster.ZONE}. "
                         f"answer auto"]) if rules else ""
    with open(path, "w") as f:
        f.write(REWRITE_COREFILE % {"zone": gen_cluster.ZONE, "rules": rules})
    return path


# kdns1asyncio: the worker's UDP drained from an event-loop reader callback, no hold (one
# trip through Python per readable event): the reference for what the wait in C saves.
ASYNCIO_ENV = {"KDNS_UDP_LOOP": "asyncio", "KDNS_UDP_HOLD_US": "0"}
# kdns1hold: the wait in C with a 100 us hold after small batches (off by default): what
# the hold saves in CPU per query and costs in p50/p99, in one run.
HOLD_ENV = {"KDNS_UDP_HOLD_US": "100"}


def kdns_server(cluster_json: str, port: int, cpu: str | None, workers: int, logdir: str,
                pure: bool = False, loadbalance: bool = True, rewrite: bool = False,
                corefile: bool = False, extra_env: dict | None = None,
                suffix: str = "", extra: tuple = (), tag: str = "",
                root: str = ROOT) -> Server:
    """``port`` 0: kdns binds one itself and reports it (``Server.port`` after start).
    ``loadbalance`` False: answers in the compiled order (--no-loadbalance). ``rewrite``:
    from ``rewrite_corefile`` (its rules configured), without upstreams as the others.
    ``extra_env``: KDNS_* switches for this one (its name gets ``suffix``). ``extra``:
    more flags (bench/bench_autopath.py: --autopath), ``tag`` added to the name. ``root``:
    the checkout whose build runs (its .venv; the baseline of --baseline)."""
    env = dict(os.environ)
    env.pop("KDNS_PURE", None)
    if pure:
        env["KDNS_PURE"] = "1"
    env.update(extra_env or {})
    flags = quiet_flags(logdir)
    if rewrite or corefile:
        at = flags.index("--config-dir")
        flags[at:at + 2] = ["--corefile", rewrite_corefile(logdir, rules=rewrite)]
    argv = kdns_cmd(root) + ["serve", "--from-file", cluster_json, "--dns-bind-address", HOST,
                         "--dns-port", str(port), "--workers", str(workers)] + flags
    argv += list(extra)
    name = f"kdns-{'cpu' + cpu if cpu else 'unpinned'}-{workers}w{tag}"
    if not loadbalance:
        argv.append("--no-loadbalance")
        name += "-nolb"
    if rewrite:
        name += "-rewrite"
    elif corefile:
        name += "-corefile"
    name += suffix
    return Server(name, argv, port, cpu, os.path.join(logdir, name + ".log"), env=env, cwd=root,
                  ready_query=("kubernetes.default.svc." + gen_cluster.ZONE, "A"),
                  port_in_log=KDNS_PORT_IN_LOG)


def kdns_engine(server: Server) -> str:
    # "listening on ... with N workers (why), compiled engine"
    m = re.search(r"listening on .* (\S+) engine", server.tail(200))
    return m.group(1) if m else "unknown"


def responder_server(exe: str, port: int, cpu: str | None, logdir: str, bound: float) -> Server:
    return Server(f"responder-{'cpu' + cpu if cpu else 'unpinned'}",
                  [exe, "-p", str(port), "-l", str(int(bound))], port, cpu,
                  os.path.join(logdir, "responder.log"))


# --------------------------------------------------------------------------- equivalence


def ask(port: int, name: str, qtype: str):
    import dns.flags
    import dns.message
    import dns.query
    q = dns.message.make_query(name, qtype)
    r = dns.query.udp(q, HOST, port=port, timeout=2)
    if r.flags & dns.flags.TC:
        r = dns.query.tcp(q, HOST, port=port, timeout=2)
    return r


def summarise(r) -> dict:
    """What must agree: rcode and answer data (hard); authority and additional data and
    the AA flag (reported). The SOA serial is left out: kdns's is a timestamp."""
    import dns.flags
    import dns.rcode
    import dns.rdatatype

    def rrs(section, drop_serial=False):
        out = []
        for rrset in section:
            for rd in rrset:
                text = rd.to_text().lower()
                if drop_serial and rrset.rdtype == dns.rdatatype.SOA:
                    f = text.split()
                    text = " ".join(f[:2] + f[3:])
                out.append(f"{rrset.name.to_text().lower()} {rrset.ttl} "
                           f"{dns.rdatatype.to_text(rrset.rdtype)} {text}")
        return sorted(out)

    return {"rcode": dns.rcode.to_text(r.rcode()), "answer": rrs(r.answer),
            "authority": rrs(r.authority, True), "additional": rrs(r.additional),
            "aa": bool(r.flags & dns.flags.AA)}


def record_answers(port: int, checks: list[tuple[str, str]]) -> dict:
    return {f"{n} {t}": summarise(ask(port, n, t)) for n, t in checks}


def compare(ref: dict, got: dict) -> tuple[list, list]:
    hard, soft = [], []
    for key, a in ref.items():
        b = got[key]
        for field in ("rcode", "answer"):
            if a[field] != b[field]:
                hard.append(f"{key}: {field} NSD={a[field]} kdns={b[field]}")
        for field in ("authority", "additional", "aa"):
            if a[field] != b[field]:
                soft.append(f"{key}: {field} NSD={a[field]} kdns={b[field]}")
    return hard, soft


def static_diff(cluster_json: str, zone_dir: str) -> list[str]:
    """`kdns records` (the zone kdns would serve) against the NSD zone files, record by
    record, SOA and NS aside: catches a drift in the record rules before any packet flies."""
    try:
        p = subprocess.run(kdns_cmd() + ["records", "--from-file", cluster_json], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"kdns records failed: {e}"]
    if p.returncode:
        return [f"kdns records failed: {p.stderr.strip()}"]

    def norm(text: str) -> set:
        out = set()
        for line in text.splitlines():
            f = line.split()
            if not f or line.startswith(";") or f[3] in ("SOA", "NS") or f[0].startswith("ns.dns."):
                continue
            out.add(" ".join([f[0].lower()] + f[1:]))
        return out

    nsd = set()
    for fn in os.listdir(zone_dir):
        with open(os.path.join(zone_dir, fn)) as f:
            nsd |= norm(f.read())
    kd = norm(p.stdout)
    return ([f"only in NSD zone: {r}" for r in sorted(nsd - kd)[:10]] +
            [f"only in kdns: {r}" for r in sorted(kd - nsd)[:10]])


# --------------------------------------------------------------------------- load tools


def run_measured(server: Server, argv: list, timeout: float,
                 stdout_path: str | None = None) -> tuple[str, dict]:
    """Run one bounded load tool; server CPU and client CPU around it. ``stdout_path``: the
    tool writes its output to that file (read back and removed afterwards) instead of a pipe,
    so that no reader in this unpinned process competes with the server while it runs."""
    out_f = open(stdout_path, "w") if stdout_path else None
    try:
        t0, n0 = server.ticks()
        c0 = core_ticks(server.cpu) if server.cpu is not None else (0, 0)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.monotonic()
        p = subprocess.run(argv, stdout=out_f or subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout, preexec_fn=_die_with_parent)
        wall = time.monotonic() - w0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t1, n1 = server.ticks()
        c1 = core_ticks(server.cpu) if server.cpu is not None else (0, 0)
    finally:
        if out_f:
            out_f.close()
    out = p.stdout
    if stdout_path:
        with open(stdout_path) as f:
            out = f.read()
        os.remove(stdout_path)
    if p.returncode:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    # What else ran on the server's core meanwhile (other programs, the hypervisor's steal):
    # a server sharing its core batches more per wake-up, so its CPU per query falls; the
    # fixed-rate figures are for a core of its own.
    others = max(0, (c1[0] - c0[0]) - (t1 - t0)) / CLK_TCK if server.cpu is not None else None
    return out, {
        "server_cpu_s": (t1 - t0) / CLK_TCK, "server_procs": max(n0, n1), "wall_s": wall,
        "core_others_s": others, "core_steal_s": (c1[1] - c0[1]) / CLK_TCK,
        "client_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}


class DnsperfFormatError(RuntimeError):
    """dnsperf printed something parse_dnsperf does not recognise: a new dnsperf version
    must fail the run loudly, not report zeros."""


# With -v, dnsperf 2.x prints one line per query (src/dnsperf.c): "> RCODE <name> <type>
# 0.000123" for an answer with its latency in seconds (microsecond resolution), "> T <name>
# <type>" for a query that got no answer within -t (counted as lost), "> I <name> <type>" for
# one still outstanding when dnsperf was interrupted.
_DNSPERF_ANSWER = re.compile(r"> ([A-Za-z][A-Za-z0-9]*) (.+) (\d+\.\d{6})")
_DNSPERF_UNANSWERED = re.compile(r"> ([TI]) (.+)")


def parse_dnsperf(out: str, verbose: bool = False) -> dict:
    """dnsperf's statistics block; with ``verbose`` (its -v) also every answered query's
    latency (``latencies_us``, in output order) and the timed-out and interrupted counts,
    checked against the statistics so that a change of format raises instead of skewing."""
    def num(label: str, required: bool = True) -> float | None:
        m = re.search(rf"^\s*{re.escape(label)}:\s+([\d.]+)", out, re.M)
        if not m:
            if required:
                raise DnsperfFormatError(f"dnsperf output lacks '{label}':\n{out[-2000:]}")
            return None
        return float(m.group(1))

    r = {"sent": int(num("Queries sent")), "completed": int(num("Queries completed")),
         "lost": int(num("Queries lost")), "interrupted": int(num("Queries interrupted", False) or 0),
         "qps": num("Queries per second"), "run_s": num("Run time (s)")}
    m = re.search(r"^\s*Response codes:(.*)$", out, re.M)
    r["rcodes"] = {k: int(v) for k, v in re.findall(r"([A-Za-z][A-Za-z0-9]*) (\d+) \(", m.group(1))} if m else {}
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", out)
    sd = re.search(r"Latency StdDev \(s\):\s+([\d.]+)", out)
    r["avg_latency_us"] = float(lat.group(1)) * 1e6 if lat else None
    r["min_latency_us"] = float(lat.group(2)) * 1e6 if lat else None
    r["max_latency_us"] = float(lat.group(3)) * 1e6 if lat else None
    r["stddev_latency_us"] = float(sd.group(1)) * 1e6 if sd else None
    if r["completed"] and sum(r["rcodes"].values()) != r["completed"]:
        raise DnsperfFormatError(f"dnsperf response codes {r['rcodes']} do not add up to "
                                 f"{r['completed']} completed queries")
    if not verbose:
        return r
    lats, unanswered = [], {"T": 0, "I": 0}
    for line in out.splitlines():
        if not line.startswith("> "):
            continue
        m = _DNSPERF_ANSWER.fullmatch(line)
        if m:
            lats.append(float(m.group(3)) * 1e6)
            continue
        m = _DNSPERF_UNANSWERED.fullmatch(line)
        if not m:
            raise DnsperfFormatError(f"unrecognised dnsperf -v line: {line!r}")
        unanswered[m.group(1)] += 1
    if (len(lats), unanswered["T"], unanswered["I"]) != (r["completed"], r["lost"], r["interrupted"]):
        raise DnsperfFormatError(
            f"dnsperf -v lines ({len(lats)} answered, {unanswered['T']} timed out, "
            f"{unanswered['I']} interrupted) disagree with its statistics ({r['completed']} "
            f"completed, {r['lost']} lost, {r['interrupted']} interrupted)")
    r["latencies_us"] = lats
    return r


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of an ascending list: a value that occurred."""
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))]


def dnsperf_cell(server: Server, qfile: str, seconds: float, a) -> dict:
    argv = pinned(CLIENT_CPU, [tool("dnsperf"), "-s", HOST, "-p", str(server.port), "-d", qfile,
                               "-l", str(seconds), "-T", "1", "-c", str(a.dnsperf_clients),
                               "-q", str(a.dnsperf_outstanding), "-t", "2"])
    out, m = run_measured(server, argv, seconds + 30)
    r = parse_dnsperf(out)
    completed = r["completed"]
    return {**m, "tool": "dnsperf", "sent": r["sent"], "completed": completed,
            "lost": r["lost"], "qps": r["qps"], "avg_latency_us": r["avg_latency_us"],
            "max_latency_us": r["max_latency_us"], "stddev_latency_us": r["stddev_latency_us"],
            "rcodes": r["rcodes"],
            "cpu_us_per_query": m["server_cpu_s"] / completed * 1e6 if completed else None}


def fixed_rate_cell(server: Server, qfile: str, rate: int, seconds: float, a,
                    scratch: str) -> dict:
    """dnsperf at a fixed offered rate (-Q): the server's CPU per answered query at that
    load, not at saturation, and the latency percentiles from -v's per-query lines. -b 4096:
    dnsperf's own sockets get 4 MiB buffers, so that a client that falls behind for a moment
    does not drop replies, which dnsperf would count as the server's lost queries; the drops
    at the server's own sockets are counted apart (``server_drops``). -q is high enough that
    the outstanding limit does not throttle the offered rate when the server stalls."""
    argv = pinned(CLIENT_CPU, [tool("dnsperf"), "-s", HOST, "-p", str(server.port), "-d", qfile,
                               "-l", str(seconds), "-T", "1", "-c", str(a.dnsperf_clients),
                               "-q", str(a.fixed_outstanding), "-t", "2", "-Q", str(rate),
                               "-b", "4096", "-v"])
    d0, e0 = udp_drops(server.port), udp_rcvbuf_errors()
    out, m = run_measured(server, argv, seconds + 30, stdout_path=scratch)
    d1, e1 = udp_drops(server.port), udp_rcvbuf_errors()
    r = parse_dnsperf(out, verbose=True)
    lats = sorted(r.pop("latencies_us"))
    completed = r["completed"]
    return {**m, "tool": "dnsperf-Q", "rate": rate, "sent": r["sent"], "completed": completed,
            "lost": r["lost"], "qps": r["qps"],
            "sent_qps": r["sent"] / r["run_s"] if r["run_s"] else None, "run_s": r["run_s"],
            "avg_latency_us": r["avg_latency_us"], "p50_us": percentile(lats, 0.5),
            "p90_us": percentile(lats, 0.9), "p99_us": percentile(lats, 0.99),
            "p999_us": percentile(lats, 0.999), "max_latency_us": r["max_latency_us"],
            "rcodes": r["rcodes"], "server_drops": d1 - d0, "udp_rcvbuf_errors": e1 - e0,
            "cpu_us_per_query": m["server_cpu_s"] / completed * 1e6 if completed else None}


def loadgen_cell(server: Server, exe: str, qfile: str, seconds: float, a) -> dict:
    argv = pinned(CLIENT_CPU, [exe, "-s", HOST, "-p", str(server.port), "-d", qfile,
                               "-l", str(seconds), "-w", str(a.window), "-b", str(a.batch),
                               "-c", str(a.sockets), "-t", "1", "-g", "1"])
    out, m = run_measured(server, argv, seconds + 30)
    r = json.loads(out.strip().splitlines()[-1])
    lat = r["latency_us"]
    return {**m, "tool": "loadgen", "sent": r["sent"], "completed": r["answered"],
            "lost": r["lost"], "qps": r["qps"], "avg_latency_us": lat["avg"],
            "p50_us": lat["p50"], "p90_us": lat["p90"], "p99_us": lat["p99"],
            "p999_us": lat["p999"], "max_latency_us": lat["max"], "rcodes": r["rcodes"],
            "unmatched": r["unmatched"], "mismatched": r["mismatched"],
            "cpu_us_per_query": m["server_cpu_s"] / r["answered"] * 1e6 if r["answered"] else None}


# --------------------------------------------------------------------------- report


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(cells: list[dict]) -> str:
    head = (f"{'target':<20} {'mix':<7} {'tool':<8} {'QPS':>10} {'avg us':>8} {'p99 us':>7} "
            f"{'lost':>6} {'NXDOMAIN':>8} {'srv CPU us/q':>12} {'srv CPU %':>9} {'cli CPU %':>9}")
    rows = [head, "-" * len(head)]
    for c in cells:
        run = c.get("run_s") or c["wall_s"]
        rows.append(f"{c['target']:<20} {c['mix']:<7} {c['tool']:<8} {fmt(c['qps'], ',.0f'):>10} "
                    f"{fmt(c['avg_latency_us'], '.0f'):>8} {fmt(c.get('p99_us'), '.0f'):>7} "
                    f"{c['lost']:>6} {100 * rcode_shares(c).get('NXDOMAIN', 0):>7.1f}% "
                    f"{fmt(c['cpu_us_per_query'], '.2f'):>12} "
                    f"{100 * c['server_cpu_s'] / run:>8.0f}% {100 * c['client_cpu_s'] / run:>8.0f}%")
    return "\n".join(rows)


def median(vals):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else (vals[m - 1] + vals[m]) / 2


def aggregate(samples: list[dict]) -> list[dict]:
    """One cell per (target, mix, tool) over the rounds: medians of the rates, sums of the
    counts (lost is every query lost in any round)."""
    groups: dict[tuple, list] = {}
    for c in samples:
        groups.setdefault((c["target"], c["mix"], c["tool"]), []).append(c)
    out = []
    for (target, mix, tool_), cs in groups.items():
        c = {"target": target, "mix": mix, "tool": tool_, "rounds": len(cs)}
        for k in ("qps", "avg_latency_us", "p50_us", "p90_us", "p99_us", "p999_us",
                  "cpu_us_per_query"):
            c[k] = median(x.get(k) for x in cs)
        for k in ("sent", "completed", "lost", "server_cpu_s", "client_cpu_s", "wall_s"):
            c[k] = sum(x[k] for x in cs)
        rc: dict = {}
        for x in cs:
            for name, n in x["rcodes"].items():
                rc[name] = rc.get(name, 0) + n
        c["rcodes"] = rc
        c["qps_rounds"] = [x["qps"] for x in cs]
        out.append(c)
    return out


def fixed_aggregate(samples: list[dict]) -> list[dict]:
    """One fixed-rate cell per (rate, target, mix) over the rounds: medians of the rates,
    CPU per query and percentiles, sums of the counts, the worst max."""
    groups: dict[tuple, list] = {}
    for c in samples:
        groups.setdefault((c["rate"], c["target"], c["mix"]), []).append(c)
    out = []
    for (rate, target, mix), cs in groups.items():
        c = {"rate": rate, "target": target, "mix": mix, "tool": "dnsperf-Q", "rounds": len(cs)}
        for k in ("qps", "sent_qps", "avg_latency_us", "p50_us", "p90_us", "p99_us", "p999_us",
                  "cpu_us_per_query"):
            c[k] = median(x.get(k) for x in cs)
        for k in ("sent", "completed", "lost", "server_drops", "udp_rcvbuf_errors",
                  "server_cpu_s", "client_cpu_s", "wall_s"):
            c[k] = sum(x[k] for x in cs)
        # None: the server was not pinned when it started (kdns2, pinned later), so which
        # core to read was not known.
        others = [x.get("core_others_s") for x in cs]
        c["core_others_s"] = None if None in others else sum(others)
        c["max_latency_us"] = max((x["max_latency_us"] for x in cs
                                   if x["max_latency_us"] is not None), default=None)
        rc: dict = {}
        for x in cs:
            for name, n in x["rcodes"].items():
                rc[name] = rc.get(name, 0) + n
        c["rcodes"] = rc
        out.append(c)
    return out


def fixed_nsd_ratio(cells: list[dict], nsd: str) -> None:
    """Each fixed-rate cell's CPU per query and p99 over NSD's at the same rate and mix."""
    ref = {(c["rate"], c["mix"]): c for c in cells if c["target"] == nsd}
    for c in cells:
        n = ref.get((c["rate"], c["mix"]))
        for k, out in (("cpu_us_per_query", "cpu_over_nsd"), ("p99_us", "p99_over_nsd")):
            c[out] = c[k] / n[k] if n and c[k] is not None and n[k] else None


def others_pct(c: dict) -> float | None:
    """Other programs' share of the server's core over the cell, in percent (None: unknown)."""
    return None if c["core_others_s"] is None else 100 * c["core_others_s"] / c["wall_s"]


def fixed_table(cells: list[dict]) -> str:
    head = (f"{'offered':>8} {'mix':<7} {'target':<17} {'sent q/s':>9} {'answered':>9} "
            f"{'srv CPU %':>9} {'CPU us/q':>8} {'x NSD':>6} {'p50 us':>7} {'p99 us':>7} "
            f"{'p99.9 us':>8} {'lost':>5} {'srv drops':>9} {'cli CPU %':>9} {'others %':>8}")
    rows = [head, "-" * len(head)]
    for c in sorted(cells, key=lambda c: (c["rate"], c["mix"])):
        rows.append(f"{c['rate']:>8,} {c['mix']:<7} {c['target']:<17} "
                    f"{fmt(c['sent_qps'], ',.0f'):>9} {fmt(c['qps'], ',.0f'):>9} "
                    f"{100 * c['server_cpu_s'] / c['wall_s']:>8.0f}% "
                    f"{fmt(c['cpu_us_per_query'], '.2f'):>8} {fmt(c.get('cpu_over_nsd'), '.2f'):>6} "
                    f"{fmt(c['p50_us'], '.0f'):>7} {fmt(c['p99_us'], '.0f'):>7} "
                    f"{fmt(c['p999_us'], '.0f'):>8} {c['lost']:>5} {c['server_drops']:>9} "
                    f"{100 * c['client_cpu_s'] / c['wall_s']:>8.0f}% "
                    f"{fmt(others_pct(c), '.0f'):>7}%")
    return "\n".join(rows)


def fixed_goals(cells: list[dict], kdns1: str, nsd: str) -> list[str]:
    """Everyday load, against this run's numbers (informational): at each offered rate,
    kdns on one core spends <= 0.8 x NSD's CPU per query, with p99 no worse and nothing lost.
    A cell whose dnsperf sent under 95% of the offered rate was not at that rate, and CPU per
    query falls as the rate rises (wake-ups are shared by more queries): then the checks
    read n/a, with the figures as run."""
    idx = {(c["rate"], c["target"], c["mix"]): c for c in cells}
    out = []
    for rate, mix in sorted({(c["rate"], c["mix"]) for c in cells}):
        k, n = idx.get((rate, kdns1, mix)), idx.get((rate, nsd, mix))
        if not (k and n):
            continue
        at = f"fixed {rate:,} q/s {mix}"
        short = [c for c in (n, k) if c["sent_qps"] is None or c["sent_qps"] < 0.95 * rate]

        def tag(ok: bool) -> str:
            return "n/a" if short else "met" if ok else "NOT met"

        if k["cpu_us_per_query"] and n["cpu_us_per_query"]:
            ratio = k["cpu_us_per_query"] / n["cpu_us_per_query"]
            out.append(f"[{tag(ratio <= 0.8)}] {at}: kdns CPU/query {k['cpu_us_per_query']:.2f} us "
                       f"<= 0.8 x NSD {n['cpu_us_per_query']:.2f} us (ratio {ratio:.2f})")
        if k["p99_us"] is not None and n["p99_us"] is not None:
            out.append(f"[{tag(k['p99_us'] <= n['p99_us'])}] {at}: kdns p99 {k['p99_us']:.0f} us "
                       f"<= NSD {n['p99_us']:.0f} us")
        out.append(f"[{tag(k['lost'] == 0)}] {at}: kdns lost {k['lost']} (NSD {n['lost']})")
        busy = [c for c in (n, k) if (c["core_others_s"] or 0) > 0.1 * c["wall_s"]]
        for c in busy:
            out.append(f"        {c['target']}'s core ran other programs "
                       f"{100 * c['core_others_s'] / c['wall_s']:.0f}% of the time: a shared "
                       f"core batches more per wake-up, so this cell's CPU per query is not "
                       f"that of a core of its own")
        for c in short:
            out.append(f"        dnsperf sent only {fmt(c['sent_qps'], ',.0f')} q/s to {c['target']} "
                       f"(client-bound or the machine is busy): not the offered {rate:,}")
    return out


def rcode_shares(c: dict) -> dict:
    total = sum(c["rcodes"].values())
    return {k: v / total for k, v in c["rcodes"].items()} if total else {}


def rcode_drift(cells: list[dict], ref: str, floor: str) -> list[str]:
    """Every answered query of a mix counts here, not only the check names: the servers
    must split NOERROR/NXDOMAIN alike (within 1 point; cells cut the file at different
    places)."""
    idx = {(c["mix"], c["tool"]): c for c in cells if c["target"] == ref}
    out = []
    for c in cells:
        r = idx.get((c["mix"], c["tool"]))
        if c["target"] in (ref, floor) or r is None:
            continue
        a, b = rcode_shares(r), rcode_shares(c)
        for k in sorted(set(a) | set(b)):
            if abs(a.get(k, 0) - b.get(k, 0)) > 0.01:
                out.append(f"{c['target']} {c['mix']} {c['tool']}: {k} {100 * b.get(k, 0):.1f}% "
                           f"vs {ref} {100 * a.get(k, 0):.1f}%")
    return out


def ratios(cells: list[dict], kdns1: str, kdns2: str, nsd: str, floor: str,
           kdns1off: str = "", kdns1rw: str = "", kdns1cf: str = "",
           kdns1base: str = "") -> tuple[str, dict]:
    idx = {(c["target"], c["mix"], c["tool"]): c for c in cells}
    lines, out = [], {}
    for tool_ in ("loadgen", "dnsperf"):
        for mix in ("hits", "search"):
            k1, k2 = idx.get((kdns1, mix, tool_)), idx.get((kdns2, mix, tool_))
            n, f = idx.get((nsd, mix, tool_)), idx.get((floor, mix, tool_))
            r = {}
            if k1 and n:
                r["kdns1_over_nsd_qps"] = k1["qps"] / n["qps"] if n["qps"] else None
                if k1["cpu_us_per_query"] and n["cpu_us_per_query"]:
                    r["kdns1_over_nsd_cpu_per_query"] = k1["cpu_us_per_query"] / n["cpu_us_per_query"]
                if k1["avg_latency_us"] and n["avg_latency_us"]:
                    r["kdns1_over_nsd_avg_latency"] = k1["avg_latency_us"] / n["avg_latency_us"]
            k1off = idx.get((kdns1off, mix, tool_))
            if k1off and n:
                r["kdns1nolb_over_nsd_qps"] = k1off["qps"] / n["qps"] if n["qps"] else None
                if k1off["cpu_us_per_query"] and n["cpu_us_per_query"]:
                    r["kdns1nolb_over_nsd_cpu_per_query"] = (k1off["cpu_us_per_query"]
                                                             / n["cpu_us_per_query"])
            k1rw = idx.get((kdns1rw, mix, tool_))
            k1cf = idx.get((kdns1cf, mix, tool_))
            if k1rw and k1 and k1["qps"]:
                r["kdns1rewrite_over_kdns1_qps"] = k1rw["qps"] / k1["qps"]
            if k1rw and k1cf and k1cf["qps"]:
                # Rules configured against none, the same Corefile otherwise, same run.
                r["kdns1rewrite_over_kdns1corefile_qps"] = k1rw["qps"] / k1cf["qps"]
                if k1rw["cpu_us_per_query"] and k1cf["cpu_us_per_query"]:
                    r["kdns1rewrite_over_kdns1corefile_cpu_per_query"] = (
                        k1rw["cpu_us_per_query"] / k1cf["cpu_us_per_query"])
            k1base = idx.get((kdns1base, mix, tool_))
            if k1 and k1base and k1base["qps"]:
                # This build against the --baseline checkout's, same run.
                r["kdns1_over_kdns1base_qps"] = k1["qps"] / k1base["qps"]
            if k2 and n:
                r["kdns2w_over_nsd_qps"] = k2["qps"] / n["qps"] if n["qps"] else None
            if k1 and f:
                r["kdns1_over_floor_qps"] = k1["qps"] / f["qps"] if f["qps"] else None
            if n and f:
                r["nsd_over_floor_qps"] = n["qps"] / f["qps"] if f["qps"] else None
            if not r:
                continue
            out[f"{tool_}/{mix}"] = r
            lines.append(f"{tool_:<8} {mix:<7} " + "  ".join(
                f"{k}={v:.2f}" for k, v in r.items() if v is not None))
    return "\n".join(lines), out


def goals(cells: list[dict], kdns1: str, nsd: str) -> list[str]:
    """The goal, stated against this run's numbers (informational)."""
    idx = {(c["target"], c["mix"], c["tool"]): c for c in cells}
    out = []
    for mix in ("hits", "search"):
        k, n = idx.get((kdns1, mix, "loadgen")), idx.get((nsd, mix, "loadgen"))
        if k and n and n["qps"]:
            ok = k["qps"] >= 1.1 * n["qps"]
            out.append(f"[{'met' if ok else 'NOT met'}] server-bound {mix}: kdns 1 core "
                       f"{k['qps']:,.0f} q/s >= 1.1 x NSD {n['qps']:,.0f} q/s "
                       f"(ratio {k['qps'] / n['qps']:.2f})")
        k, n = idx.get((kdns1, mix, "dnsperf")), idx.get((nsd, mix, "dnsperf"))
        if k and n:
            out.append(f"[{'met' if k['lost'] == 0 else 'NOT met'}] dnsperf {mix}: kdns lost "
                       f"{k['lost']} queries (NSD {n['lost']})")
            if k["avg_latency_us"] is not None and n["avg_latency_us"] is not None:
                ok = k["avg_latency_us"] <= n["avg_latency_us"]
                out.append(f"[{'met' if ok else 'NOT met'}] dnsperf {mix}: kdns avg latency "
                           f"{k['avg_latency_us']:.0f} us <= NSD {n['avg_latency_us']:.0f} us")
        for tool_ in ("loadgen", "dnsperf"):
            k, n = idx.get((kdns1, mix, tool_)), idx.get((nsd, mix, tool_))
            if k and n and k["cpu_us_per_query"] and n["cpu_us_per_query"]:
                ok = k["cpu_us_per_query"] < n["cpu_us_per_query"]
                out.append(f"[{'met' if ok else 'NOT met'}] CPU/query {mix} ({tool_}): kdns "
                           f"{k['cpu_us_per_query']:.2f} us < NSD {n['cpu_us_per_query']:.2f} us")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true",
                    help="CI size: 1,000 services, 20,000 queries per file, 2 s per cell")
    ap.add_argument("--seconds", type=float, help="per cell and round (default 5, --short 2)")
    ap.add_argument("--rounds", type=int, help="interleaved repetitions of every cell; the "
                    "table shows medians (default 3, --short 1)")
    ap.add_argument("--services", type=int)
    ap.add_argument("--namespaces", type=int)
    ap.add_argument("--named", type=int)
    ap.add_argument("--queries", type=int, help="lines per query file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default="nsd,kdns1,kdns2,floor",
                    help="comma list of nsd, kdns1 (1 worker, pinned), kdns1off (the same with "
                         "--no-loadbalance), kdns1rw (the same from a Corefile with rewrite "
                         "rules), kdns1cf (from the same Corefile without them), kdns1asyncio "
                         "(the same with KDNS_UDP_LOOP=asyncio and no UDP hold: the reference "
                         "for the wait in C), kdns1hold (the wait in C with a 100 us hold), "
                         "kdns1base (kdns1 as built in the --baseline checkout), "
                         "kdns2 (2 workers, "
                         "unpinned: threads of one process), kdns2p (2 workers in two "
                         "processes, --worker-processes 2, unpinned), floor (C responder, "
                         "pinned)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout with its own .venv (make install there): the "
                         "kdns1base target runs its build, to compare two builds in one run")
    ap.add_argument("--tools", default="dnsperf,loadgen")
    ap.add_argument("--mixes", default="hits,search")
    ap.add_argument("--window", type=int, default=64, help="loadgen queries in flight")
    ap.add_argument("--batch", type=int, default=32, help="loadgen sendmmsg/recvmmsg batch")
    ap.add_argument("--sockets", type=int, default=4, help="loadgen source ports")
    ap.add_argument("--dnsperf-clients", type=int, default=4)
    ap.add_argument("--dnsperf-outstanding", type=int, default=100)
    ap.add_argument("--pure", action="store_true", help="run kdns with KDNS_PURE=1")
    ap.add_argument("--idle-seconds", type=float, default=1.0,
                    help="how long to measure the servers' idle CPU before loading them")
    ap.add_argument("--no-verify", action="store_true",
                    help="measure even if kdns and NSD disagree (the report says so)")
    ap.add_argument("--fixed-rates", default="20000,100000",
                    help="offered rates (queries/s, dnsperf -Q) of the fixed-rate cells, every "
                         "server on one core: CPU per query, p50/p99, lost (default 20000,100000)")
    ap.add_argument("--no-fixed-rate", action="store_true", help="skip the fixed-rate cells")
    ap.add_argument("--fixed-mixes", default="hits", help="query mixes of the fixed-rate cells")
    ap.add_argument("--fixed-seconds", type=float,
                    help="per fixed-rate cell and round (default: --seconds)")
    ap.add_argument("--fixed-outstanding", type=int, default=1000,
                    help="dnsperf -q in the fixed-rate cells: high, so that a stalled server "
                         "does not lower the offered rate")
    a = ap.parse_args(argv)
    small = a.short
    a.seconds = a.seconds or (2.0 if small else 5.0)
    a.rounds = a.rounds or (1 if small else 3)
    a.services = a.services or (1000 if small else 5000)
    a.namespaces = a.namespaces or (20 if small else 50)
    a.named = a.named or (200 if small else 1000)
    a.queries = a.queries or (20_000 if small else 100_000)
    a.targets = [t for t in a.targets.split(",") if t]
    if "kdns1base" in a.targets and not a.baseline:
        ap.error("the kdns1base target needs --baseline DIR")
    a.tools = [t for t in a.tools.split(",") if t]
    a.mixes = [m for m in a.mixes.split(",") if m]
    a.fixed_rates = [] if a.no_fixed_rate else [int(r) for r in a.fixed_rates.split(",") if r]
    a.fixed_mixes = [m for m in a.fixed_mixes.split(",") if m]
    a.fixed_seconds = a.fixed_seconds or a.seconds
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.cpu_count() < 2:
        log("fewer than 2 CPUs: server and client pinning will share one core")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = os.path.join(OUT, "load-" + stamp)
    os.makedirs(outdir, exist_ok=True)
    cdir = os.path.join(outdir, "cluster")
    meta = gen_cluster.write_all(cdir, a.services, a.namespaces, a.named, a.seed, a.queries)
    log(f"cluster: {a.services} services / {a.namespaces} namespaces / {a.named} named ports "
        f"-> {cdir}")
    exes = build_tools()
    qfiles = {"hits": meta["paths"]["hits"], "search": meta["paths"]["search"]}
    with open(meta["paths"]["check"]) as f:
        checks = [tuple(line.split()) for line in f if line.strip()]
    zdir = os.path.join(cdir, "nsd")
    # Server lifetime bound for the responder (it stops itself); a generous upper bound.
    bound = (120 + 4 * a.rounds * len(a.tools) * len(a.mixes) * (a.seconds + 10)
             + 4 * a.rounds * len(a.fixed_rates) * len(a.fixed_mixes) * (a.fixed_seconds + 10))

    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    report = {"started": stamp, "kdns_commit": git, "args": vars(a), "cluster": meta, "host": {
        "cpus": os.cpu_count(), "uname": " ".join(os.uname()),
        "nsd": subprocess.run([tool("nsd"), "-v"], capture_output=True, text=True).stderr.splitlines()[0],
        "dnsperf": next((ln.strip() for ln in subprocess.run([tool("dnsperf"), "-h"], capture_output=True,
                                                               text=True).stderr.splitlines()
                         if ln.startswith("Version")), "?")},
        "verify": {}, "samples": [], "cells": [],
        "fixed_rate": {"rates": a.fixed_rates, "samples": [], "cells": [], "cpus": {}}}
    labels = {"nsd": "nsd-cpu1", "kdns1": "kdns-cpu1-1w", "kdns1off": "kdns-cpu1-1w-nolb",
              "kdns1rw": "kdns-cpu1-1w-rewrite", "kdns1cf": "kdns-cpu1-1w-corefile",
              "kdns1asyncio": "kdns-cpu1-1w-asyncio", "kdns1hold": "kdns-cpu1-1w-hold",
              "kdns1base": "kdns-cpu1-1w-base",
              "kdns2": "kdns-unpinned-2w", "kdns2p": "kdns-unpinned-2w-2p",
              "floor": "responder-cpu1"}
    running: list[Server] = []

    def start(make, timeout=120.0) -> Server:
        """``make(port)`` -> Server. free_port() can race with other programs taking ports
        on a shared machine: a server that finds its port taken gets another one."""
        for attempt in range(3):
            s = make(free_port())
            running.append(s)
            try:
                s.start(timeout)
                return s
            except RuntimeError as e:
                s.stop()
                running.remove(s)
                if attempt == 2 or "in use" not in str(e).lower():
                    raise
                log(f"{s.name}: port {s.port} was taken; retrying on another")

    def cell(key: str, s: Server, mix: str, tl: str, rnd: int) -> dict:
        if tl == "dnsperf":
            c = dnsperf_cell(s, qfiles[mix], a.seconds, a)
        else:
            c = loadgen_cell(s, exes["loadgen"], qfiles[mix], a.seconds, a)
        c.update(target=labels[key], mix=mix, round=rnd)
        log(f"r{rnd} {labels[key]:<18} {mix:<6} {tl:<7} {c['qps']:>10,.0f} q/s  "
            f"avg {fmt(c['avg_latency_us'], '.0f')} us  lost {c['lost']}  "
            f"server {fmt(c['cpu_us_per_query'], '.2f')} us CPU/q")
        return c

    # Pinned for the fixed-rate cells.
    flabels = dict(labels, kdns2="kdns-cpu1-2w", kdns2p="kdns-cpu1-2w-2p")

    def fixed(key: str, s: Server, rate: int, mix: str, rnd: int) -> dict:
        c = fixed_rate_cell(s, qfiles[mix], rate, a.fixed_seconds, a,
                            os.path.join(outdir, "dnsperf-v.out"))
        c.update(target=flabels[key], mix=mix, round=rnd)
        log(f"r{rnd} {flabels[key]:<18} {mix:<6} fixed {rate:>7,}: {c['qps']:>9,.0f} q/s  "
            f"p50 {fmt(c['p50_us'], '.0f')} p99 {fmt(c['p99_us'], '.0f')} us  lost {c['lost']}  "
            f"server {fmt(c['cpu_us_per_query'], '.2f')} us CPU/q")
        return c

    def verify(name: str, s: Server, ref: dict) -> None:
        hard, soft = compare(ref, record_answers(s.port, checks))
        report["verify"][name] = {"names": len(checks), "mismatch": hard, "differences": soft}
        for line in soft:
            log(f"note ({name}): {line}")
        for line in hard:
            log(f"MISMATCH ({name}): {line}")
        if hard and not a.no_verify:
            raise SystemExit(f"load.py: {name} and NSD disagree; not measuring "
                             "(--no-verify to measure anyway)")
        if not hard:
            log(f"verified {name}: {len(checks)} names, same rcode and answers as NSD")

    servers: dict[str, Server] = {}
    try:
        # All servers up at once (an idle server costs nothing), so that rounds can interleave
        # them: on a shared machine the background load drifts, and interleaving spreads the
        # drift over every target instead of penalising whichever ran during a busy minute.
        if "nsd" in a.targets or not a.no_verify:
            servers["nsd"] = start(lambda p: nsd_server(zdir, os.path.join(outdir, "nsd-run"), p,
                                                        SERVER_CPU))
        if "kdns1" in a.targets:
            servers["kdns1"] = start(lambda _: kdns_server(meta["paths"]["kdns_input"], 0,
                                                           SERVER_CPU, 1, outdir, a.pure))
        if "kdns1off" in a.targets:
            servers["kdns1off"] = start(lambda _: kdns_server(meta["paths"]["kdns_input"], 0,
                                                              SERVER_CPU, 1, outdir, a.pure,
                                                              loadbalance=False))
        if "kdns1rw" in a.targets:
            servers["kdns1rw"] = start(lambda _: kdns_server(meta["paths"]["kdns_input"], 0,
                                                             SERVER_CPU, 1, outdir, a.pure,
                                                             rewrite=True))
        if "kdns1cf" in a.targets:
            servers["kdns1cf"] = start(lambda _: kdns_server(meta["paths"]["kdns_input"], 0,
                                                             SERVER_CPU, 1, outdir, a.pure,
                                                             corefile=True))
        if "kdns1asyncio" in a.targets:
            servers["kdns1asyncio"] = start(lambda _: kdns_server(
                meta["paths"]["kdns_input"], 0, SERVER_CPU, 1, outdir, a.pure,
                extra_env=ASYNCIO_ENV, suffix="-asyncio"))
        if "kdns1hold" in a.targets:
            servers["kdns1hold"] = start(lambda _: kdns_server(
                meta["paths"]["kdns_input"], 0, SERVER_CPU, 1, outdir, a.pure,
                extra_env=HOLD_ENV, suffix="-hold"))
        if "kdns1base" in a.targets:
            servers["kdns1base"] = start(lambda _: kdns_server(
                meta["paths"]["kdns_input"], 0, SERVER_CPU, 1, outdir, a.pure,
                suffix="-base", root=os.path.abspath(a.baseline)))
        if "kdns2" in a.targets:
            servers["kdns2"] = start(lambda _: kdns_server(meta["paths"]["kdns_input"], 0, None,
                                                           2, outdir, a.pure))
        if "kdns2p" in a.targets:
            servers["kdns2p"] = start(lambda _: kdns_server(
                meta["paths"]["kdns_input"], 0, None, 2, outdir, a.pure,
                extra=("--worker-processes", "2"), tag="-2p"))
        if "floor" in a.targets:
            servers["floor"] = start(lambda p: responder_server(exes["responder"], p, SERVER_CPU,
                                                                outdir, bound))
        kd = servers.get("kdns1") or servers.get("kdns2")
        if kd:
            report["kdns_engine"] = kdns_engine(kd)
            log(f"kdns engine: {report['kdns_engine']}")
            if report["kdns_engine"] != "compiled":
                log("WARNING: kdns is not running the compiled packet path; "
                    "its figures are the pure-Python fallback's")
        # Equivalence first: never compare a fast wrong answer with a slow right one.
        if "nsd" in servers:
            ref = record_answers(servers["nsd"].port, checks)
            for key in ("kdns1", "kdns1off", "kdns1rw", "kdns1cf", "kdns1asyncio", "kdns1hold",
                        "kdns1base", "kdns2", "kdns2p"):
                if key in servers:
                    verify(labels[key], servers[key], ref)
            if kd:
                sd = static_diff(meta["paths"]["kdns_input"], zdir)
                report["verify"]["static_diff"] = sd
                for line in sd:
                    log(f"note (kdns records vs NSD zone): {line}")
        if "nsd" not in a.targets and "nsd" in servers:
            servers.pop("nsd").stop()
        # What each server burns doing nothing (timers, file polling): part of every
        # cell's CPU figure, so shown on its own.
        idle0 = {k: s.ticks()[0] for k, s in servers.items()}
        time.sleep(a.idle_seconds)
        report["idle_cpu_pct"] = {labels[k]: 100 * (s.ticks()[0] - idle0[k]) / CLK_TCK / a.idle_seconds
                                  for k, s in servers.items()}
        log("idle CPU: " + ", ".join(f"{k} {v:.1f}%" for k, v in report["idle_cpu_pct"].items()))
        for rnd in range(a.rounds):
            keys = [k for k in ("nsd", "kdns1", "kdns1off", "kdns1rw", "kdns1cf",
                                "kdns1asyncio", "kdns1hold", "kdns1base", "kdns2", "kdns2p",
                                "floor")
                    if k in servers]
            keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for key in keys:
                for mix in a.mixes:
                    for tl in a.tools:
                        report["samples"].append(cell(key, servers[key], mix, tl, rnd))
        # Fixed offered rates, every server on one core: the two-worker kdns is pinned to
        # the servers' CPU for this part (its two workers share the core, as they would in a
        # pod whose CPU limit is below its worker count).
        for key in ("kdns2", "kdns2p") if a.fixed_rates else ():
            if key in servers:
                pin_tree(servers[key].proc.pid, SERVER_CPU)
                servers[key].cpu = SERVER_CPU       # its core, for the cells' others %
        for key, s in servers.items() if a.fixed_rates else ():
            cpus = report["fixed_rate"]["cpus"][flabels[key]] = cpus_allowed(s.proc.pid)
            if cpus != SERVER_CPU:
                log(f"WARNING: {flabels[key]} may run on CPUs {cpus}, not only {SERVER_CPU}")
        for rnd in range(a.rounds if a.fixed_rates else 0):
            keys = [k for k in ("nsd", "kdns1", "kdns1asyncio", "kdns1hold", "kdns1base", "kdns2",
                                "kdns2p",
                                "floor")
                    if k in servers]
            keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for rate in a.fixed_rates:
                for key in keys:
                    for mix in a.fixed_mixes:
                        report["fixed_rate"]["samples"].append(fixed(key, servers[key], rate, mix, rnd))
    finally:
        for s in list(running):
            try:
                s.stop()
            except Exception as e:          # keep stopping the others
                log(f"stopping {s.name}: {e}")

    report["cells"] = aggregate(report["samples"])
    cells = report["cells"]
    text_table = table(cells)
    rtext, report["ratios"] = ratios(cells, labels["kdns1"], labels["kdns2"], labels["nsd"],
                                     labels["floor"], labels["kdns1off"], labels["kdns1rw"],
                                     labels["kdns1cf"], labels["kdns1base"])
    report["goals"] = goals(cells, labels["kdns1"], labels["nsd"])
    report["verify"]["rcode_drift"] = rcode_drift(cells, labels["nsd"], labels["floor"])
    fr = report["fixed_rate"]
    fr["cells"] = fixed_aggregate(fr["samples"])
    fixed_nsd_ratio(fr["cells"], labels["nsd"])
    fr["goals"] = fixed_goals(fr["cells"], labels["kdns1"], labels["nsd"])
    path = os.path.join(outdir, "results.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    shutil.copyfile(path, os.path.join(OUT, "load-latest.json"))
    print(f"\nkdns {report['kdns_commit']}, engine: {report.get('kdns_engine', '-')}   cluster: {a.services} services, "
          f"{a.seconds:g} s per cell x {a.rounds} round(s) (median shown), server CPU {SERVER_CPU}, "
          f"client CPU {CLIENT_CPU}")
    if cells:
        print(text_table)
    if report.get("idle_cpu_pct"):
        print("idle CPU (before load): " + ", ".join(
            f"{k} {v:.1f}%" for k, v in report["idle_cpu_pct"].items()))
    if rtext:
        print("\nratios (kdns1 = kdns 1 worker pinned, kdns1nolb = the same with --no-loadbalance, "
              "kdns2w = 2 workers unpinned, floor = C responder):")
        print(rtext)
    if fr["cells"]:
        print(f"\nfixed offered rate (dnsperf -Q, -T 1 -c {a.dnsperf_clients}, latencies from -v), "
              f"{a.fixed_seconds:g} s per cell x {a.rounds} round(s) (median shown), every server "
              f"on CPU {SERVER_CPU} ({', '.join(f'{k} {v}' for k, v in fr['cpus'].items())}); "
              f"x NSD = CPU per query over NSD's; lost = no answer within 2 s; srv drops = "
              f"datagrams dropped at the server's full socket buffer; others % = other "
              f"programs' (and the hypervisor's steal) share of the server's core meanwhile:")
        print(fixed_table(fr["cells"]))
    print("\ngoal, this run:")
    print("\n".join(report["goals"] + fr["goals"]) or "(needs the nsd and kdns1 targets)")
    for line in report["verify"]["rcode_drift"]:
        print(f"RCODE DRIFT: {line}")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
