"""Node-local mode end to end, with network namespaces as nodes.

Topology (every namespace and link made here, deleted at the end)::

    root namespace: fake API server (loopback), central `kdns serve --serve-image`, and a
                    second replica behind "kube-dns-upstream"
        │ veth 10.77.N.1 ── 10.77.N.2
    node N namespace: `kdns node-local` on 169.254.20.10 (its own interface and iptables rules)
        │ veth 10.78.N.1 ── 10.78.N.2
    pod N namespace: glibc's getent and dnspython, resolv.conf as kubelet writes it
                     (nameserver 169.254.20.10, search <ns>.svc.cluster.local ..., ndots:5)

A Service created at the API answers in both pods within the programming-latency budget;
the image stream is cut (the node's TCP to the central image port dropped) and cluster names
are then forwarded to the kube-dns Service over TCP — a Service created during the cut
answers although the node's image cannot have it — and the stream restored; the central
stopped (both nodes forward to the replica) and started again (a full transfer, then the
image again); a node-local is restarted while a pod sends queries, and its set-up is gone
between the two runs.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import require_tool, unavailable, report
from fakeapi import FakeApiServer
from serverutil import ROOT, Kdns, free_port
from test_api_source import write_kubeconfig
from test_controller import base_objects, nsobj, svc
from upstream import TestDNSServer

pytestmark = pytest.mark.timeout(240)

ZONE = "cluster.local"
LINK_LOCAL = "169.254.20.10"
BUDGET = 3.0            # seconds from the API write to the answer in a pod (both nodes)
STALE_AFTER = "2s"
POLL_WAIT = "1s"
PREFIX = f"kn{os.getpid() % 1000}"
SERVICES = 300


def sh(*argv, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, argv))}: {r.stderr or r.stdout}")
    return r


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.02)


def link_kind() -> str:
    """dummy, as node-cache uses, where the kernel has it; else a port-less bridge, which
    holds local addresses the same way (this sandbox's kernel has no dummy driver)."""
    probe = f"{PREFIX}k"
    sh("ip", "netns", "add", probe)
    try:
        if sh("ip", "-n", probe, "link", "add", "t0", "type", "dummy", check=False).returncode == 0:
            return "dummy"
        return "bridge"
    finally:
        sh("ip", "netns", "del", probe, check=False)


class Topology:
    def __init__(self, nodes: int):
        self.nodes = list(range(1, nodes + 1))
        self.netns: list[str] = []
        self.etc: list[str] = []

    def node(self, i):
        return f"{PREFIX}n{i}"

    def pod(self, i):
        return f"{PREFIX}p{i}"

    def central_ip(self, i):
        return f"10.77.{i}.1"

    def _ns(self, name):
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def build(self):
        for i in self.nodes:
            node, pod = self.node(i), self.pod(i)
            self._ns(node)
            self._ns(pod)
            r, x = f"{PREFIX}r{i}", f"{PREFIX}x{i}"
            sh("ip", "link", "add", r, "type", "veth", "peer", "name", x, "netns", node)
            sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", r)
            sh("ip", "link", "set", r, "up")
            sh("ip", "-n", node, "addr", "add", f"10.77.{i}.2/24", "dev", x)
            sh("ip", "-n", node, "link", "set", x, "up")
            sh("ip", "-n", node, "route", "add", "default", "via", f"10.77.{i}.1")
            q, y = f"{PREFIX}q{i}", f"{PREFIX}y{i}"
            sh("ip", "-n", node, "link", "add", q, "type", "veth", "peer", "name", y, "netns", pod)
            sh("ip", "-n", node, "addr", "add", f"10.78.{i}.1/24", "dev", q)
            sh("ip", "-n", node, "link", "set", q, "up")
            sh("ip", "-n", pod, "addr", "add", f"10.78.{i}.2/24", "dev", y)
            sh("ip", "-n", pod, "link", "set", y, "up")
            sh("ip", "-n", pod, "route", "add", "default", "via", f"10.78.{i}.1")
            # What kubelet writes for a ClusterFirst pod in namespace ns0 of a cluster whose
            # DNS is the node-local address; `ip netns exec` mounts it over /etc/resolv.conf.
            etc = f"/etc/netns/{pod}"
            os.makedirs(etc, exist_ok=True)
            self.etc.append(etc)
            with open(f"{etc}/resolv.conf", "w") as f:
                f.write(f"nameserver {LINK_LOCAL}\nsearch ns0.svc.{ZONE} svc.{ZONE} {ZONE}\n"
                        f"options ndots:5 timeout:1 attempts:2\n")

    def close(self):
        for name in reversed(self.netns):
            sh("ip", "netns", "del", name, check=False)
        for etc in self.etc:
            shutil.rmtree(etc, ignore_errors=True)


class NodeLocal:
    """One `kdns node-local` in a node namespace (its pid is ours to stop)."""

    def __init__(self, topo, i, tmp, central, kind, upstream):
        self.topo, self.i, self.tmp, self.central, self.kind = topo, i, tmp, central, kind
        self.upstream = upstream        # the kube-dns-upstream: the other central replica
        self.proc = None
        self.runs = 0

    def argv(self):
        c = self.topo.central_ip(self.i)
        return ["ip", "netns", "exec", self.topo.node(self.i), sys.executable, "-m", "kdns",
                "node-local", "--image-url", f"http://{c}:{self.central.http_port}/image",
                "--listen", LINK_LOCAL, "--dns-port", "53", "--workers", "1",
                "--interface-type", self.kind,
                "--kube-dns-upstream", f"{c}:{self.upstream.port}",
                "--upstream", "central", "--central-dns", f"{c}:{self.central.port}",
                "--stale-after", STALE_AFTER, "--poll-wait", POLL_WAIT,
                "--health-port", "8080", "--metrics-port", "9153"]

    def start(self):
        self.runs += 1
        self.log_path = self.tmp / f"node{self.i}-{self.runs}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": ROOT})
        wait_until(lambda: self.proc.poll() is not None or self.answers(
            f"kubernetes.default.svc.{ZONE}") == ["10.96.0.1"], 30, f"node {self.i} answering")
        assert self.proc.poll() is None, self.logs()
        return self

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def logs(self):
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def exec(self, *argv, check=False):
        return sh("ip", "netns", "exec", self.topo.node(self.i), *argv, check=check)

    def answers(self, name):
        """A records the node-local gives for ``name`` (None: no answer)."""
        r = sh("ip", "netns", "exec", self.topo.pod(self.i), "dig", "+short", "+tries=1",
               "+time=1", f"@{LINK_LOCAL}", name, "A", check=False)
        if r.returncode:
            return None
        return sorted(line for line in r.stdout.split() if line[:1].isdigit())

    def metric(self, name):
        r = self.exec(sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                      f"urllib.request.urlopen('http://{LINK_LOCAL}:9153/metrics', timeout=2)"
                      ".read().decode())")
        for line in r.stdout.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def pod_getent(self, name):
        r = sh("ip", "netns", "exec", self.topo.pod(self.i), "getent", "ahostsv4", name,
               check=False)
        return sorted({line.split()[0] for line in r.stdout.splitlines()}) if r.returncode == 0 \
            else None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    for tool in ("ip", "iptables", "iptables-save", "dig", "getent"):
        require_tool(tool)
    tmp = tmp_path_factory.mktemp("nodelocal")
    kind = link_kind()
    topo = Topology(2)
    api = FakeApiServer(token="secret", bookmark_interval=1.0).start()
    outside = TestDNSServer({"example.org.": ["A 192.0.2.7"]}).__enter__()
    central = replica = nodes = None
    try:
        topo.build()
        base_objects(api)
        api.create("namespaces", nsobj("ns0"))
        # Enough Services that a one-Service change streams as a delta, not the full image.
        api.create_many("services", [svc(f"bulk{i}", ns="ns0", ip=f"10.97.{i // 250}.{i % 250 + 1}")
                                     for i in range(SERVICES)])
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", api.url, {"token": api.token})
        central = Kdns(tmp, workers=1, host="0.0.0.0", source=["--kubecfg-file", kubeconfig],
                       args=("--serve-image", "--nameservers", f"127.0.0.1:{outside.port}"))
        central.start(timeout=30)
        # A second replica behind "kube-dns-upstream": where cluster names go while stale.
        replica = Kdns(tmp, workers=1, host="0.0.0.0", source=["--kubecfg-file", kubeconfig],
                       args=("--nameservers", f"127.0.0.1:{outside.port}"))
        replica.start(timeout=30)
        nodes = [NodeLocal(topo, i, tmp, central, kind, replica) for i in topo.nodes]
        for n in nodes:
            n.start()
        yield {"topo": topo, "api": api, "central": central, "nodes": nodes, "kind": kind,
               "tmp": tmp, "outside": outside, "replica": replica}
    finally:
        for n in nodes or ():
            n.stop()
        for k in (central, replica):
            if k is not None:
                k.stop()
        api.close()
        outside.__exit__(None, None, None)
        topo.close()


def central_answers(central, name):
    import dns.message
    import dns.query
    q = dns.message.make_query(name, "A")
    m = dns.query.udp(q, "127.0.0.1", port=central.port, timeout=2)
    return sorted(rd.address for rr in m.answer for rd in rr if rr.rdtype == 1)


def test_a_new_service_answers_in_pods_on_both_nodes_within_the_budget(world):
    api, central, nodes = world["api"], world["central"], world["nodes"]
    t0 = time.monotonic()
    api.create("services", svc("fresh", ns="ns0", ip="10.96.5.5"))
    wait_until(lambda: central_answers(central, f"fresh.ns0.svc.{ZONE}") == ["10.96.5.5"],
               BUDGET, "the central kdns")
    at_central = time.monotonic() - t0
    took = []
    for n in nodes:
        # glibc in the pod, with its search path: "fresh" is fresh.ns0.svc.cluster.local.
        wait_until(lambda: n.pod_getent("fresh") == ["10.96.5.5"], BUDGET,
                   f"pod on node {n.i}")
        took.append(time.monotonic() - t0)
    report("node-local: programming latency (API write to answer, s)",
           f"central {at_central:.3f}; pods on node 1 / node 2 {took[0]:.3f} / {took[1]:.3f} "
           f"(budget {BUDGET}s; machine shared)")
    assert max(took) <= BUDGET
    for n in nodes:
        assert n.metric("kdns_nodelocal_stale") == 0
        # The first transfer was full; the change since came as a delta.
        assert n.metric('kdns_nodelocal_transfers_total{transfer="full"}') == 1
        assert n.metric('kdns_nodelocal_transfers_total{transfer="delta"}') >= 1
    deltas = [n.metric('kdns_nodelocal_transfer_bytes_total{transfer="delta"}') /
              n.metric('kdns_nodelocal_transfers_total{transfer="delta"}') for n in nodes]
    full = nodes[0].metric('kdns_nodelocal_transfer_bytes_total{transfer="full"}')
    report("node-local: bytes streamed per node",
           f"first image {full:.0f} (zlib), then {deltas[0]:.0f} per change (delta); "
           f"{SERVICES + 1} Services")
    assert max(deltas) * 3 < full
    m = central.metrics()
    assert m[("kdns_image_stream_responses_total", frozenset({("transfer", "delta")}))] >= 2
    # Both nodes follow it (each re-polls every --poll-wait: between two polls it is not
    # counted for a moment).
    wait_until(lambda: central.metrics()[("kdns_image_stream_waiting", frozenset())] ==
               len(nodes), 10, "both nodes long-polling")
    # Outside names go to the central kdns (--upstream central), which forwards them to its
    # upstream (a server of this test); asked again, it is answered from a cache.
    outside = world["outside"]
    for n in nodes:
        assert n.pod_getent("example.org") == ["192.0.2.7"]
    asked = outside.udp_queries + outside.tcp_queries
    for n in nodes:
        assert n.answers("example.org.") == ["192.0.2.7"]
    assert outside.udp_queries + outside.tcp_queries == asked     # from the caches


def test_node_setup_is_there_while_it_runs(world):
    n = world["nodes"][0]
    rules = n.exec("iptables-save", check=True).stdout
    for want in (f"-A PREROUTING -d {LINK_LOCAL}/32 -p udp -m udp --dport 53 -m comment "
                 f"--comment \"kdns node-local\" -j NOTRACK",
                 f"-A PREROUTING -d {LINK_LOCAL}/32 -p tcp -m tcp --dport 53",
                 f"-A OUTPUT -s {LINK_LOCAL}/32 -p udp -m udp --sport 53",
                 f"-A INPUT -d {LINK_LOCAL}/32 -p udp -m udp --dport 53"):
        assert want in rules, rules
    assert rules.count("kdns node-local") == 10          # 5 rules x udp, tcp; no duplicates
    addr = n.exec("ip", "-o", "addr", "show", "dev", "nodelocaldns", check=True).stdout
    assert f"{LINK_LOCAL}/32" in addr


def test_stream_cut_forwards_cluster_names_to_kube_dns_then_recovers(world):
    api, central, nodes = world["api"], world["central"], world["nodes"]
    n = nodes[1]
    cut = ["OUTPUT", "-p", "tcp", "-d", world["topo"].central_ip(n.i), "--dport",
           str(central.http_port), "-j", "DROP"]      # silence, not a reset: the hard case
    n.exec("iptables", "-I", *cut, check=True)
    try:
        wait_until(lambda: n.metric("kdns_nodelocal_forwarding_cluster_names") == 1, 15,
                   "stale mode after the cut")
        assert n.metric("kdns_nodelocal_stale") == 1
        # Created during the cut: the node's image cannot have it, kube-dns (over TCP) can.
        api.create("services", svc("during-cut", ns="ns0", ip="10.96.6.6"))
        # (Once the central has it: a miss before would be cached by the node's forwarder.)
        wait_until(lambda: central_answers(central, f"during-cut.ns0.svc.{ZONE}") ==
                   ["10.96.6.6"], BUDGET, "the central kdns")
        wait_until(lambda: n.pod_getent("during-cut") == ["10.96.6.6"], BUDGET + 2,
                   "a Service created during the cut, through kube-dns")
        assert n.answers(f"kubernetes.default.svc.{ZONE}") == ["10.96.0.1"]
        # The other node's stream was not cut: it has the Service from its own image.
        wait_until(lambda: nodes[0].pod_getent("during-cut") == ["10.96.6.6"], BUDGET,
                   "node 1")
        assert nodes[0].metric("kdns_nodelocal_stale") == 0
    finally:
        n.exec("iptables", "-D", *cut)
    wait_until(lambda: n.metric("kdns_nodelocal_forwarding_cluster_names") == 0, 30,
               "leaving stale mode")
    assert n.metric("kdns_nodelocal_stale") == 0
    api.create("services", svc("after-cut", ns="ns0", ip="10.96.7.7"))
    wait_until(lambda: n.pod_getent("after-cut") == ["10.96.7.7"], BUDGET, "after the cut")


def test_central_stopped_and_restarted(world):
    api, central, replica, nodes = world["api"], world["central"], world["replica"], world["nodes"]
    assert central.stop() == 0
    for n in nodes:
        wait_until(lambda: n.metric("kdns_nodelocal_forwarding_cluster_names") == 1, 15,
                   f"node {n.i} stale with the central stopped")
    api.create("services", svc("outage", ns="ns0", ip="10.96.8.8"))
    wait_until(lambda: central_answers(replica, f"outage.ns0.svc.{ZONE}") == ["10.96.8.8"],
               BUDGET, "the replica")
    for n in nodes:
        # From the kube-dns-upstream replica, over TCP: no image has it.
        wait_until(lambda: n.pod_getent("outage") == ["10.96.8.8"], BUDGET, f"node {n.i}")
        assert n.pod_getent("fresh") == ["10.96.5.5"]
    central.start(timeout=30)           # the same ports: the nodes' --image-url
    for n in nodes:
        wait_until(lambda: n.metric("kdns_nodelocal_forwarding_cluster_names") == 0, 30,
                   f"node {n.i} back on the stream")
        # A new process numbers its generations afresh and its image is another: full.
        assert n.metric('kdns_nodelocal_transfers_total{transfer="full"}') == 2
        assert n.pod_getent("outage") == ["10.96.8.8"]


LOAD = textwrap.dedent("""
    import json, sys, time
    import dns.message, dns.query, dns.exception
    stop_file, name = sys.argv[1], sys.argv[2]
    ok = fail = wrong = ok_after_fail = 0
    last_ok = time.monotonic(); gap = 0.0
    while True:
        q = dns.message.make_query(name, "A")
        try:
            m = dns.query.udp(q, "169.254.20.10", port=53, timeout=0.2)
            ips = sorted(rd.address for rr in m.answer for rd in rr)
            if ips == ["10.96.5.5"]:
                ok += 1; ok_after_fail += 1 if fail else 0; now = time.monotonic(); gap = max(gap, now - last_ok); last_ok = now
            else:
                wrong += 1
        except (dns.exception.Timeout, OSError):
            fail += 1
        import os
        if os.path.exists(stop_file):
            break
    print(json.dumps({"ok": ok, "fail": fail, "wrong": wrong, "gap": gap,
                      "ok_after_fail": ok_after_fail}))
""")


def test_node_local_restarted_under_load_cleans_up_and_recovers(world):
    n, tmp = world["nodes"][0], world["tmp"]
    script = tmp / "load.py"
    script.write_text(LOAD)
    stop = tmp / "load.stop"
    load = subprocess.Popen(["ip", "netns", "exec", world["topo"].pod(n.i), sys.executable,
                             str(script), str(stop), f"fresh.ns0.svc.{ZONE}"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert n.stop() == 0, n.logs()
        # Exit removed what start created: the rules and the interface.
        rules = n.exec("iptables-save", check=True).stdout
        assert "kdns node-local" not in rules
        assert n.exec("ip", "link", "show", "dev", "nodelocaldns").returncode != 0
        n.start()
        wait_until(lambda: n.answers(f"fresh.ns0.svc.{ZONE}") == ["10.96.5.5"], 10,
                   "answers after the restart")
        assert n.exec("iptables-save", check=True).stdout.count("kdns node-local") == 10
    finally:
        stop.write_text("")
        out, _ = load.communicate(timeout=30)
    got = json.loads(out)
    report("node-local: restart under load (one pod, UDP, 200 ms timeout)",
           f"answered {got['ok']}, unanswered {got['fail']}, wrong {got['wrong']}, "
           f"longest gap {got['gap']:.2f}s (machine shared)")
    assert got["wrong"] == 0           # never a wrong answer, before, during or after
    assert got["fail"] > 0             # the pod did see the restart ...
    assert got["ok_after_fail"] > 0    # ... and was answered again by the new process
    assert n.metric('kdns_nodelocal_transfers_total{transfer="full"}') == 1
