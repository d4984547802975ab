"""A pod's resolver walking its search list through kdns (dns-rules §5.1, §5.2).

A pod in ``default`` has ``search default.svc.Z svc.Z Z`` and ``ndots:5``; short names like
``test.development`` or ``kubernetes.default`` only resolve if every candidate before the
right one is a clean NXDOMAIN (musl stops walking at NODATA). Checked three ways:
- dnspython's Resolver against an in-test UDP responder answering with ``refpath`` from the
  compiled example cluster (always available, no compiled extension needed);
- the same Resolver against a real ``kdns serve --from-file`` (tests/serverutil.py);
- the system C library (``getent ahosts``) in a private mount namespace whose
  /etc/resolv.conf points at kdns on 127.0.0.1:53 (root only).
Loopback only: no candidate in these walks leaves the cluster zone.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from conftest import unavailable
from kdns.kube import records
from kdns.serve import build
from kdns.zone import refpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cluster.yaml")
Z = "cluster.local"
SEARCH = [f"default.svc.{Z}", f"svc.{Z}", Z]


class Responder:
    """UDP on 127.0.0.1: answers each query with refpath from one image; records the
    questions it saw, so the test can check the walk's intermediate steps."""

    def __init__(self, image: bytes, port: int = 0):
        self.img = refpath.Image(image)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str, int, int]] = []      # (qname, qtype, rcode)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            action, reply = refpath.answer(self.img, data)
            if action == refpath.ACTION_HANDOFF:
                # No forwarder here: REFUSED keeps the test on loopback.
                reply = refpath.header_only(data, refpath.REFUSED)
                reply = reply[:4] + b"\0\1" + reply[6:] + data[12:]   # echo the question
            if action != refpath.ACTION_DROP:
                msg = dns.message.from_wire(reply)
                self.seen.append((str(msg.question[0].name).lower(), msg.question[0].rdtype,
                                  msg.rcode()))
                self.sock.sendto(reply, peer)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def pod_resolver(port: int) -> dns.resolver.Resolver:
    """dnspython configured like a ClusterFirst pod in ``default`` (kubelet dns.go)."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.search = [dns.name.from_text(s) for s in SEARCH]
    r.ndots = 5
    r.use_search_by_default = True
    r.timeout = r.lifetime = 3
    r.cache = None
    return r


WALKS = [
    # name, qtype, expected address, the candidates tried in order with their rcodes
    ("test.development", "A", "10.96.5.5",
     [(f"test.development.default.svc.{Z}.", "NXDOMAIN"), (f"test.development.svc.{Z}.", "NOERROR")]),
    ("kubernetes.default", "A", "10.96.0.1",
     [(f"kubernetes.default.default.svc.{Z}.", "NXDOMAIN"), (f"kubernetes.default.svc.{Z}.", "NOERROR")]),
    ("kubernetes.default.svc", "A", "10.96.0.1",
     [(f"kubernetes.default.svc.default.svc.{Z}.", "NXDOMAIN"),
      (f"kubernetes.default.svc.svc.{Z}.", "NXDOMAIN"),
      (f"kubernetes.default.svc.{Z}.", "NOERROR")]),
    ("kubernetes", "A", "10.96.0.1", [(f"kubernetes.default.svc.{Z}.", "NOERROR")]),
    ("db.prod", "AAAA", "fd00:10:244:2::10",
     [(f"db.prod.default.svc.{Z}.", "NXDOMAIN"), (f"db.prod.svc.{Z}.", "NOERROR")]),
    ("frontend.prod.svc", "AAAA", "fd00:10:96::7",
     [(f"frontend.prod.svc.default.svc.{Z}.", "NXDOMAIN"), (f"frontend.prod.svc.svc.{Z}.", "NXDOMAIN"),
      (f"frontend.prod.svc.{Z}.", "NOERROR")]),
]


def walk_rcodes(name: str, qtype: str, port: int) -> list[tuple[str, str]]:
    """What each search candidate answers, asked one by one, up to the first non-NXDOMAIN."""
    out = []
    for suffix in SEARCH:
        cand = f"{name}.{suffix}."
        q = dns.message.make_query(cand, qtype)
        reply = dns.query.udp(q, "127.0.0.1", port=port, timeout=3)
        out.append((cand, dns.rcode.to_text(reply.rcode())))
        if reply.rcode() != dns.rcode.NXDOMAIN:
            break
    return out


@pytest.fixture(scope="module")
def responder():
    with Responder(build.compile_file(EXAMPLE, serial=1)) as r:
        yield r


@pytest.mark.parametrize("name,qtype,address,steps", WALKS, ids=[w[0] + "/" + w[1] for w in WALKS])
def test_walk_through_refpath_responder(responder, name, qtype, address, steps):
    responder.seen.clear()
    answer = pod_resolver(responder.port).resolve(name, qtype)
    assert [rd.address for rd in answer] == [address]
    want = [(n.lower(), dns.rdatatype.from_text(qtype), dns.rcode.from_text(rc)) for n, rc in steps]
    assert responder.seen == want
    assert walk_rcodes(name, qtype, responder.port) == steps


def test_aaaa_of_a_v4_service_stops_at_nodata(responder):
    """dns-rules §5.2 step 2: AAAA of test.development.svc.Z is NODATA, not NXDOMAIN."""
    responder.seen.clear()
    with pytest.raises(dns.resolver.NoAnswer):
        pod_resolver(responder.port).resolve("test.development", "AAAA")
    assert [(n, rc) for n, _, rc in responder.seen] == [
        (f"test.development.default.svc.{Z}.", dns.rcode.NXDOMAIN),
        (f"test.development.svc.{Z}.", dns.rcode.NOERROR)]


def test_srv_short_name_of_the_e2e_suite(responder):
    """test/e2e/network/dns.go asks `_http._tcp.<svc>.<ns>.svc` through the search path."""
    answer = pod_resolver(responder.port).resolve("_http._tcp.test.development.svc", "SRV")
    assert [(rd.port, str(rd.target)) for rd in answer] == [(80, f"test.development.svc.{Z}.")]


# ---- a real kdns server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import serverutil
    srv = serverutil.Kdns(tmp_path_factory.mktemp("walk"), zone_file=EXAMPLE, workers=1).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("name,qtype,address,steps", WALKS, ids=[w[0] + "/" + w[1] for w in WALKS])
def test_walk_through_real_server(server, name, qtype, address, steps):
    answer = pod_resolver(server.port).resolve(name, qtype)
    assert [rd.address for rd in answer] == [address]
    assert walk_rcodes(name, qtype, server.port) == steps


# ---- the system's C library, in private mount and network namespaces


def _getent_available() -> bool:
    return bool(os.geteuid() == 0 and shutil.which("unshare") and shutil.which("getent")
                and shutil.which("ip"))


def test_walk_through_the_c_library(tmp_path):
    """glibc's own resolver (getent ahosts: A and AAAA per candidate) against kdns on
    127.0.0.1:53. A private network namespace gives a private loopback, so port 53 is ours
    and nothing can leave the machine; a private mount namespace replaces resolv.conf."""
    if not _getent_available():
        unavailable("needs root, unshare, ip and getent")
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver 127.0.0.1\nsearch {' '.join(SEARCH)}\n"
                    "options ndots:5 attempts:1 timeout:2\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files dns\n")
    py = os.path.join(ROOT, ".venv", "bin", "python")
    script = f"""
set -e
ip link set lo up
mount --bind {conf} /etc/resolv.conf
mount --bind {hosts} /etc/hosts
mount --bind {nsswitch} /etc/nsswitch.conf
{py if os.path.exists(py) else "python3"} -m kdns serve --from-file {EXAMPLE} --dns-bind-address 127.0.0.1 \
    --dns-port 53 --healthz-port 0 --metrics-port 0 --workers 1 >{tmp_path}/kdns.log 2>&1 &
pid=$!
i=0
until getent ahosts kubernetes.default.svc.{Z} >/dev/null; do
    i=$((i+1)); [ $i -lt 100 ] || {{ kill $pid; exit 3; }}; sleep 0.1
done
rc=0
for n in test.development kubernetes.default kubernetes.default.svc; do
    echo "== $n"; getent ahosts $n || rc=1
done
kill $pid; wait $pid || true
exit $rc
"""
    out = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr + (tmp_path / "kdns.log").read_text()
    found, name = {}, None
    for line in out.stdout.splitlines():
        if line.startswith("== "):
            name = line[3:]
        else:
            found.setdefault(name, set()).add(line.split()[0])
    assert found == {"test.development": {"10.96.5.5"}, "kubernetes.default": {"10.96.0.1"},
                     "kubernetes.default.svc": {"10.96.0.1"}}
