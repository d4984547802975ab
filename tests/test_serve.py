"""End to end over loopback: a real `kdns serve` (supervisor + workers) answering over UDP and
TCP (§6), zone updates while queries flow, and the HTTP endpoints."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import require_tool, unavailable
from kdns.zone import refpath
from serverutil import HOST, Kdns, a_records, rcode_text, running
from zonefixtures import SAMPLE_NAMES, sample_image

K = "kubernetes.default.svc.cluster.local"
OLD, NEW = "10.96.0.1", "10.96.0.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("kdns"), image=sample_image(), workers=2,
                 args=("--tcp-idle-timeout", "2")) as s:
        yield s


def tcp_connect(server) -> socket.socket:
    s = socket.create_connection((HOST, server.port), timeout=3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def frame(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg     # RFC 1035 §4.2.2


def read_frame(sock: socket.socket) -> bytes:
    n = struct.unpack("!H", recv_exact(sock, 2))[0]
    return recv_exact(sock, n)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_answers_hit_miss_and_outside(server, proto):
    ask = getattr(server, proto)
    assert a_records(ask(K)) == [OLD]
    r = ask("nope.default.svc.cluster.local")
    assert rcode_text(r) == "NXDOMAIN" and r.authority[0].rdtype == 6      # SOA for negatives
    assert rcode_text(ask("google.com")) == "REFUSED"    # hand-off default
    srv = ask("_https._tcp." + K, "SRV")
    assert [rd.port for rd in srv.answer[0]] == [443]


def test_serves_on_ipv6_loopback(tmp_path):
    if not socket.has_ipv6:
        unavailable("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        unavailable("::1 is not configured on this machine")
    with running(tmp_path, image=sample_image(), workers=1, host="::1") as server:
        for proto in ("udp", "tcp"):
            ask = getattr(server, proto)
            assert a_records(ask(K)) == [OLD]
            # The hand-off path sends to the client's IPv6 address tuple.
            assert rcode_text(ask("google.com")) == "REFUSED"


def test_default_bind_serves_both_families_on_one_socket(tmp_path):
    """The default --dns-bind-address is :: with IPV6_V6ONLY off: IPv4 and IPv6 clients
    reach the same workers, over UDP and TCP, with no flag."""
    from kdns import cli
    a = cli.build_parser().parse_args(["serve", "--from-file", "examples/cluster.yaml"])
    assert a.dns_bind_address == "::"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        unavailable("::1 is not configured on this machine")
    with running(tmp_path, image=sample_image(), workers=2, host="::") as server:
        for client in ("127.0.0.1", "::1"):
            q = dns.message.make_query(K, "A")
            assert a_records(dns.query.udp(q, client, port=server.port, timeout=3)) == [OLD]
            assert a_records(dns.query.tcp(q, client, port=server.port, timeout=3)) == [OLD]
            # The hand-off path replies to the client's address in its own family.
            q = dns.message.make_query("google.com", "A")
            assert rcode_text(dns.query.udp(q, client, port=server.port, timeout=3)) == "REFUSED"
        # coredns_dns_requests_total's family is the client's, per query: the IPv4 client
        # arrived IPv4-mapped on the one socket and counts as 1, the IPv6 one as 2.
        m = server.metrics()
        def a_queries(proto, family):
            return sum(v for (n, ls), v in m.items() if n == "coredns_dns_requests_total"
                       and {("proto", proto), ("family", family), ("type", "A")} <= ls)
        assert [a_queries(p, f) for p in ("udp", "tcp") for f in ("1", "2")] == [2, 2, 1, 1]


# socket() for AF_INET6 fails as on a kernel booted with ipv6.disable=1 (no IPv6 module):
# the way a node without IPv6 looks to kdns, made for kdns's process alone.
NO_IPV6_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    if (domain == AF_INET6) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    return real(domain, type, protocol);
}
"""


def test_default_bind_falls_back_to_ipv4_without_kernel_ipv6(tmp_path):
    """On a node without IPv6 the default bind address :: cannot work: kdns says so once
    and serves IPv4 on 0.0.0.0 (DNS over UDP and TCP, and the HTTP endpoints), instead of
    failing to start."""
    gcc = require_tool("gcc")
    src, shim = tmp_path / "noipv6.c", tmp_path / "noipv6.so"
    src.write_text(NO_IPV6_SHIM)
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(shim), str(src), "-ldl"], check=True)
    server = Kdns(tmp_path, image=sample_image(), workers=2, host="::",
                  env={"LD_PRELOAD": str(shim)})
    server.host = HOST                  # kdns binds ::, so clients must come over IPv4
    try:
        server.start()
        assert "IPv6 is not available on this node; listening on 0.0.0.0" in server.logs()
        assert a_records(server.udp(K)) == [OLD]
        assert a_records(server.tcp(K)) == [OLD]
        assert server.http_get("/readiness") == (200, "ok")
    finally:
        server.stop()
    # The shim did what it claims: a process under it cannot open an IPv6 socket at all.
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.socket(socket.AF_INET6)"],
        env={**os.environ, "LD_PRELOAD": str(shim)}, capture_output=True, text=True)
    assert probe.returncode != 0 and "Address family not supported" in probe.stderr


def test_replies_are_byte_identical_to_the_reference_path(server):
    """Whatever engine the workers run, the wire bytes are refpath's for the same image."""
    img = refpath.Image(sample_image())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for i, name in enumerate(SAMPLE_NAMES):
            for rdtype in ("A", "AAAA", "SRV", "PTR", "TXT"):
                q = dns.message.make_query(name, rdtype, use_edns=(i % 2 == 0))
                q.id = i
                wire = q.to_wire()
                action, expected = refpath.answer(img, wire)
                if action != refpath.ACTION_SEND:
                    continue            # handed off: REFUSED, checked elsewhere
                s.sendto(wire, (HOST, server.port))
                assert s.recv(65535) == expected, (name, rdtype)


def test_dig_over_udp_and_tcp(server):
    dig = require_tool("dig")
    for extra in ([], ["+tcp"]):
        out = subprocess.run([dig, "@" + HOST, "-p", str(server.port), K, "A", "+short",
                              "+time=2", "+tries=1", *extra],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0 and out.stdout.split() == [OLD], out
    out = subprocess.run([dig, "@" + HOST, "-p", str(server.port), "_https._tcp." + K, "SRV",
                          "+time=2", "+tries=1"], capture_output=True, text=True, timeout=10)
    assert "status: NOERROR" in out.stdout and "flags: qr aa rd" in out.stdout


def test_truncated_over_udp_then_whole_over_tcp(server):
    name = "big.default.svc.cluster.local"             # 120 A records: 1.9 kB
    udp = server.udp(name, use_edns=False)
    assert udp.flags & dns.flags.TC
    assert len(udp.to_wire()) <= 512                   # RFC 1035 §4.2.1
    tcp = server.tcp(name, use_edns=False)
    assert not tcp.flags & dns.flags.TC and len(a_records(tcp)) == 120
    dig = require_tool("dig")
    # dig retries over TCP by itself when it sees TC (RFC 7766 §5).
    out = subprocess.run([dig, "@" + HOST, "-p", str(server.port), name, "+noedns", "+short",
                          "+time=2", "+tries=1"], capture_output=True, text=True, timeout=10)
    assert len(out.stdout.split()) == 120, out


def test_case_is_echoed_dns0x20(server):
    r = server.udp("KuBeRnEtEs.DeFaUlT.sVc.ClUsTeR.lOcAl")
    assert r.question[0].name.to_text() == "KuBeRnEtEs.DeFaUlT.sVc.ClUsTeR.lOcAl."
    assert a_records(r) == [OLD]


# --------------------------------------------------------------------------- TCP (RFC 7766)


def test_pipelined_queries_on_one_connection(server):
    """RFC 7766 §6.2.1.1: several queries in one write, each answered; answers from the image
    are written at once, the handed-off one when it is ready (here: after them)."""
    names = ["google.com", K, "dual.default.svc.cluster.local", "nope.default.svc.cluster.local",
             "big.default.svc.cluster.local"]
    queries = []
    for i, name in enumerate(names):
        q = dns.message.make_query(name, "A")
        q.id = 1000 + i
        queries.append(q)
    with tcp_connect(server) as s:
        s.sendall(b"".join(frame(q.to_wire()) for q in queries))
        replies = [dns.message.from_wire(read_frame(s)) for _ in queries]
        # The connection stays open for more (RFC 7766 §6.2.1).
        s.sendall(frame(queries[1].to_wire()))
        assert a_records(dns.message.from_wire(read_frame(s))) == [OLD]
    by_id = {r.id: r for r in replies}
    assert sorted(by_id) == [q.id for q in queries]
    for q in queries:
        assert by_id[q.id].question[0].name == q.question[0].name
    assert rcode_text(by_id[1000]) == "REFUSED"
    assert a_records(by_id[1001]) == [OLD]
    assert len(a_records(by_id[1004])) == 120
    assert [r.id for r in replies][-1] == 1000          # ready last: written last


def test_query_split_across_segments(server):
    q = dns.message.make_query(K, "A").to_wire()
    with tcp_connect(server) as s:
        for byte in frame(q):
            s.sendall(bytes([byte]))
        assert a_records(dns.message.from_wire(read_frame(s))) == [OLD]


def test_idle_connection_is_closed(server):
    """--tcp-idle-timeout 2: an idle client, and one that never completes a message, are
    closed (RFC 7766 §6.2.3), while a busy one stays open."""
    with tcp_connect(server) as idle, tcp_connect(server) as trickle:
        trickle.sendall(b"\x00")                        # half a length prefix, then nothing
        t0 = time.monotonic()
        idle.settimeout(6)
        trickle.settimeout(6)
        assert idle.recv(1) == b""
        assert trickle.recv(1) == b""
        # Not before the idle timeout (load only delays it); the socket timeouts above bound
        # the other side.
        assert time.monotonic() - t0 >= 1.5


def server_rx_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds for the server side of one loopback connection that the
    server has not read yet (/proc/net/tcp rx_queue), or None when it is gone."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(local[1], 16) == server_port and int(remote[1], 16) == client_port:
                return int(fields[4].split(":")[1], 16)
    return None


def test_client_that_never_reads_does_not_stall_others(tmp_path):
    """A client pipelining large answers without ever reading: once its replies fill the
    buffers, the worker stops reading from it (pause_reading: its bytes stay in the kernel),
    meanwhile the same worker keeps serving everyone else, and the idle timer drops it."""
    burst = frame(dns.message.make_query("big.default.svc.cluster.local", "A").to_wire()) * 100
    with running(tmp_path, image=sample_image(), workers=1,
                 args=("--tcp-idle-timeout", "8")) as server, tcp_connect(server) as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        hog.setblocking(False)
        client_port = hog.getsockname()[1]
        # Pipeline until the server's unread backlog holds still for 0.5 s: it stopped
        # reading. A worker that kept reading (buffering in memory) would drain it to 0.
        # (The kernel may keep accepting a trickle for a few seconds after the worker
        # paused, hence an idle timeout well above that.)
        samples, deadline = [], time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                hog.send(burst)
            except BlockingIOError:
                pass
            samples.append(server_rx_queue(server.port, client_port))
            if len(samples) >= 10 and samples[-1] and len(set(samples[-10:])) == 1:
                break
            time.sleep(0.05)
        assert samples[-1] and len(set(samples[-10:])) == 1, samples[-20:]
        for _ in range(20):           # the one worker still serves others (2 s per query)
            assert a_records(server.udp(K)) == [OLD]
            assert a_records(server.tcp(K)) == [OLD]
        # Dropped by the idle timeout although it never read (RFC 7766 §6.2.3).
        hog.setblocking(True)
        hog.settimeout(12)
        with pytest.raises((ConnectionResetError, EOFError, BrokenPipeError)):
            while True:
                if not hog.recv(1 << 20):
                    raise EOFError
        assert wait_gone(lambda: server_rx_queue(server.port, client_port), 2)


def wait_gone(probe, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe() is None:
            return True
        time.sleep(0.05)
    return probe() is None


def tcp_connect_from(server, source: str) -> socket.socket:
    """A connection from another loopback address (127.0.0.0/8 is all local): a client
    with its own source address, as each pod has."""
    s = socket.create_connection((HOST, server.port), timeout=3, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def served(conn, q) -> bool:
    """One query answered on ``conn``; False if the server closed or reset it."""
    try:
        conn.sendall(frame(q))
        return a_records(dns.message.from_wire(read_frame(conn))) == [OLD]
    except (ConnectionResetError, EOFError, BrokenPipeError):
        return False


def closed_by_server(conn) -> bool:
    """Whether the server has closed ``conn`` (EOF or RST; the 3 s socket timeout bounds a
    close that never comes)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_connection_cap_closes_the_oldest_idle_connection(tmp_path):
    """RFC 7766 §10: at the per-worker cap a new client is served and the connection idle
    longest makes room, rather than every new client being refused."""
    with running(tmp_path, image=sample_image(), workers=1,
                 args=("--tcp-max-connections", "3")) as server:
        q = dns.message.make_query(K, "A").to_wire()
        conns = [tcp_connect_from(server, f"127.0.0.{i}") for i in (1, 2, 3)]
        try:
            for c in conns:                              # all three accepted and served
                assert served(c, q)
            with tcp_connect_from(server, "127.0.0.4") as new:
                assert served(new, q)
            assert closed_by_server(conns[0])            # the oldest idle one
            assert served(conns[2], q)
        finally:
            for c in conns:
                c.close()


def test_one_source_cannot_take_every_connection(tmp_path):
    """RFC 7766 §10: a client holding its per-source limit of connections gets its oldest
    idle one closed for each new one, so others still find room."""
    with running(tmp_path, image=sample_image(), workers=1,
                 args=("--tcp-max-connections", "4", "--tcp-max-per-source", "2")) as server:
        q = dns.message.make_query(K, "A").to_wire()
        hog = []
        try:
            for _ in range(4):
                hog.append(tcp_connect_from(server, "127.0.0.1"))
                assert served(hog[-1], q)
            assert closed_by_server(hog[0]) and closed_by_server(hog[1])
            others = [tcp_connect_from(server, "127.0.0.2") for _ in range(2)]
            hog += others
            assert all(served(c, q) for c in others)
            assert served(hog[3], q)                     # the hog keeps its limit
        finally:
            for c in hog:
                c.close()


# --------------------------------------------------------------------------- zone updates


def test_publish_100_alternating_images_while_queries_flow(tmp_path):
    """Zero errors, and every reply is byte-for-byte the old or the new image's (big's 120
    A records in any of their rotations: answers rotate, --loadbalance)."""
    images = {OLD: sample_image(tag=OLD), NEW: sample_image(tag=NEW)}
    names = [K, "big.default.svc.cluster.local", "dual.default.svc.cluster.local",
             "nope.default.svc.cluster.local", "1-2-3-4.default.pod.cluster.local"]
    expected = {}
    for name in names:
        for proto in ("udp", "tcp"):
            wire = dns.message.make_query(name, "A", id=7).to_wire()
            expected[(name, proto)] = {refpath.answer(refpath.Image(img), wire,
                                                      tcp=proto == "tcp", rotation=r)[1]
                                       for img in images.values() for r in range(120)}
    assert len(expected[(K, "udp")]) == 2          # the two images do differ visibly
    stop = threading.Event()
    errors, counts = [], {"udp": 0, "tcp": 0}

    def ask(proto):
        sock = None
        try:
            if proto == "udp":
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.settimeout(2)
            else:
                sock = tcp_connect(server)
            i = 0
            while not stop.is_set():
                name = names[i % len(names)]
                i += 1
                wire = dns.message.make_query(name, "A", id=7).to_wire()
                if proto == "udp":
                    sock.sendto(wire, (HOST, server.port))
                    reply = sock.recv(65535)
                else:
                    sock.sendall(frame(wire))
                    reply = read_frame(sock)
                if reply not in expected[(name, proto)]:
                    errors.append((proto, name, reply))
                counts[proto] += 1
        except Exception as e:  # noqa: BLE001 -- any failure is a test error, reported below
            errors.append((proto, repr(e)))
        finally:
            if sock is not None:
                sock.close()

    with running(tmp_path, image=images[OLD], workers=2,
                 args=("--tcp-idle-timeout", "60")) as server:
        threads = [threading.Thread(target=ask, args=(p,)) for p in ("udp", "tcp")]
        for t in threads:
            t.start()
        try:
            for i in range(100):
                server.publish(images[NEW if i % 2 == 0 else OLD])
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert server.generation == 101
        assert a_records(server.udp(K)) == [OLD]       # the 100th publish was the old image
        # Old images are unmapped after the swap: no worker accumulates 100 mappings.
        for pid in server.worker_pids():
            with open(f"/proc/{pid}/maps") as f:
                images = {line.split()[4] for line in f if "/memfd:kdns-image" in line}
            assert 1 <= len(images) <= 2, (pid, images)     # distinct memfd inodes mapped
    assert not errors, errors[:5]
    assert counts["udp"] > 50 and counts["tcp"] > 50, counts


ZONE_YAML = """apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: Namespace, metadata: {{name: default}}}}
- apiVersion: v1
  kind: Service
  metadata: {{name: web, namespace: default}}
  spec:
    clusterIP: {ip}
    clusterIPs: [{ip}]
    ports: [{{name: http, port: 80, protocol: TCP}}]
"""


def test_zone_file_change_is_published_and_bad_update_keeps_last_good(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(ZONE_YAML.format(ip="10.96.5.1"))
    name = "web.default.svc.cluster.local"
    with running(tmp_path, zone_file=str(path), workers=2) as server:
        assert a_records(server.udp(name)) == ["10.96.5.1"]
        path.write_text(ZONE_YAML.format(ip="10.96.5.2"))
        server.wait_generation(2, timeout=5)             # picked up by the 1 s poll
        assert a_records(server.udp(name)) == ["10.96.5.2"]
        path.write_text("items: [this is not: a kubernetes list")

        def errors():           # klog's E severity
            return [line for line in server.logs().splitlines()
                    if line.startswith("E") and "last good image" in line]
        deadline = time.monotonic() + 5          # the 1 s poll, with room for a loaded machine
        while not errors():
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.05)
        assert server.served_generations() == [2, 2]
        assert a_records(server.tcp(name)) == ["10.96.5.2"]
        assert str(path) in errors()[0], server.logs()


# --------------------------------------------------------------------------- HTTP


def test_readiness_health_and_metrics(server):
    assert server.http_get("/readiness") == (200, "ok")
    assert server.http_get("/health") == (200, "ok")
    before = server.metrics()
    for _ in range(3):
        server.udp(K, "SRV")
    server.tcp("nope.default.svc.cluster.local", "AAAA")
    after = server.metrics()

    def delta(name, **labels):
        # CoreDNS's label sets: requests by family, responses by plugin.
        base = {"server": f"dns://{server.host}:{server.port}", "zone": ".", "view": ""}
        extra = {"family": "1"} if name == "coredns_dns_requests_total" else {"plugin": ""}
        key = (name, frozenset({**base, **extra, **labels}.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("coredns_dns_requests_total", proto="udp", type="SRV") == 3
    assert delta("coredns_dns_requests_total", proto="tcp", type="AAAA") == 1
    assert delta("coredns_dns_responses_total", rcode="NXDOMAIN") == 1
    assert delta("coredns_dns_responses_total", rcode="NOERROR") >= 3
    assert server.http_get("/nope")[0] == 404


def test_second_kdns_on_a_served_port_refuses_to_start(server, tmp_path):
    """SO_REUSEPORT would let it join the first one's group and take half its traffic."""
    import sys
    from serverutil import ROOT, own_resolvers
    argv = [sys.executable, "-m", "kdns", "serve", "--from-image", server.image_path,
            "--dns-bind-address", HOST, "--dns-port", str(server.port),
            "--healthz-port", "0", "--metrics-port", "0", "--health-port", "0",
            "--ready-port", "0", "--sidecar-port", "0", "--lameduck", "0", "--workers", "1",
            *own_resolvers(tmp_path, ())]
    # It exits before starting a worker; the timeout only bounds a regression that serves.
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("a second kdns started on a port another kdns serves")
    assert done.returncode == 2, done.stderr
    assert f"port {server.port}" in done.stderr and "--share-dns-port" in done.stderr
    assert server.udp(K).answer                    # the first one still serves


def test_idle_timeout_shortens_under_pressure():
    """RFC 7766 §6.2.3: the configured timeout up to half the cap, then down to
    TCP_IDLE_TIMEOUT_MIN at the cap."""
    from types import SimpleNamespace
    from kdns import settings
    from kdns.serve.worker import Worker
    w = SimpleNamespace(max_connections=10, idle_timeout=10.0, connections={})
    timeout = lambda n: Worker.tcp_idle_timeout(SimpleNamespace(**{**vars(w), "connections": range(n)}))
    assert timeout(0) == timeout(5) == 10.0
    assert 10.0 > timeout(6) > timeout(9) > settings.TCP_IDLE_TIMEOUT_MIN
    assert timeout(10) == settings.TCP_IDLE_TIMEOUT_MIN
