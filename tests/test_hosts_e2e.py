"""The Corefile's ``hosts`` plugin end to end: a real kdns serving examples/cluster.yaml from a
Corefile with hosts (a file and inline lines), asked with dig and dnspython; outside names
fall through to a loopback upstream the test starts; the file is re-read when edited and a
bad edit keeps the last good records; the compiled and the reference packet paths send the
same bytes; k3s's default Corefile serves its NodeHosts, from disk and through the API.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from conftest import require_tool
from serverutil import ROOT, Kdns
from test_corefile_e2e import ConfigMapApi, wait_log
from upstream import TestDNSServer

pytestmark = pytest.mark.timeout(90)
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")

COREFILE = """.:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    hosts %(hosts)s {
       10.1.2.3 inline.example.org
       fd00::5  inline.example.org v6only.example.org   # two names, one address
       ttl 60
       reload 100ms
       %(fall)s
    }
    forward . %(up)s
    cache 30
}
"""
NODE_HOSTS = "10.0.0.1 k3s-server\n192.168.1.20 node-b node-b.lan # a comment\n"


def ask(k: Kdns, name: str, qtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, k.host, port=k.port, timeout=3)


def dig(k: Kdns, *args: str) -> list[str]:
    tool = require_tool("dig")
    out = subprocess.run([tool, "@" + k.host, "-p", str(k.port), *args, "+short",
                          "+time=2", "+tries=1"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    return out.stdout.split()


@pytest.fixture
def upstream():
    up = TestDNSServer({"nothere.example.org.": ["A 198.51.100.7"],
                        "www.outside.example.": ["A 198.51.100.8"],
                        "k3s-server.": ["MX 10 mail.example."]}, host="127.0.0.41")
    with up:
        yield up


def start(tmp_path, upstream, *, fall="fallthrough", hosts=None, env=None, workers=1):
    path = tmp_path / "NodeHosts"
    if not path.exists():
        path.write_text(NODE_HOSTS)
    corefile = tmp_path / "Corefile"
    corefile.write_text(COREFILE % {"hosts": hosts or str(path), "fall": fall,
                                    "up": f"{upstream.host}:{upstream.port}"})
    return Kdns(tmp_path, zone_file=CLUSTER, workers=workers, env=env,
                args=("--corefile", str(corefile))).start(), path


def test_hosts_records_answer_with_their_ptrs_and_fall_through(tmp_path, upstream):
    k, _ = start(tmp_path, upstream)
    try:
        # A and AAAA from the file and the inline lines, authoritative, at the hosts' TTL.
        r = ask(k, "k3s-server")
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
        assert [(rr.name.to_text(), rr.ttl, [d.to_text() for d in rr]) for rr in r.answer] == \
            [("k3s-server.", 60, ["10.0.0.1"])]
        assert dig(k, "node-b.lan", "A") == ["192.168.1.20"]
        assert dig(k, "NODE-B", "A") == ["192.168.1.20"]          # names are case-folded
        assert dig(k, "inline.example.org", "A") == ["10.1.2.3"]
        assert dig(k, "inline.example.org", "AAAA") == ["fd00::5"]
        assert dig(k, "-x", "10.0.0.1") == ["k3s-server."]
        assert dig(k, "-x", "fd00::5") == ["inline.example.org.", "v6only.example.org."]
        # A name of the hosts without that type: NODATA, no SOA (CoreDNS has none to give);
        # the upstream, which has an MX for k3s-server, is not asked.
        for name, qtype in (("v6only.example.org", "A"), ("k3s-server", "MX"),
                            ("k3s-server", "AAAA")):
            r = ask(k, name, qtype)
            assert (r.rcode(), r.answer, r.authority) == (dns.rcode.NOERROR, [], []), (name, r)
            assert r.flags & dns.flags.AA
        # Not a name of the hosts: falls through to the forwarder (the test's upstream).
        assert dig(k, "nothere.example.org", "A") == ["198.51.100.7"]
        assert dig(k, "www.outside.example", "A") == ["198.51.100.8"]
        assert ("nothere.example.org.", "A", "udp") in upstream.queries
        assert not [q for q in upstream.queries if q[0] == "k3s-server."]
        # Cluster names are the cluster's; a cluster address keeps its PTR.
        assert dig(k, "kubernetes.default.svc.cluster.local", "A") == ["10.96.0.1"]
        assert dig(k, "-x", "10.96.0.1") == ["kubernetes.default.svc.cluster.local."]
        r = ask(k, "nothere.default.svc.cluster.local")
        assert r.rcode() == dns.rcode.NXDOMAIN
        # TCP answers the same.
        assert ask(k, "inline.example.org", "A", tcp=True).answer == \
            ask(k, "inline.example.org", "A").answer
        # CoreDNS's hosts gauges: 6 addresses of names and 6 names of addresses.
        m = k.metrics()
        path = str(tmp_path / "NodeHosts")
        assert m[("coredns_hosts_entries", frozenset({("hostsfile", path)}))] == 12
        assert m[("coredns_hosts_reload_timestamp_seconds", frozenset())] == \
            pytest.approx(os.stat(path).st_mtime)
        assert any(name == "coredns_plugin_enabled" and ("name", "hosts") in labels
                   for name, labels in m)
    finally:
        k.stop()


def test_without_fallthrough_a_name_the_hosts_lack_is_servfail(tmp_path, upstream):
    """CoreDNS's hosts answers SERVFAIL there ("we don't have a SOA"), not NXDOMAIN; names
    outside its zones still go on to the next plugin."""
    path = tmp_path / "NodeHosts"
    path.write_text("192.0.2.1 known.example.org\n")
    k, _ = start(tmp_path, upstream, fall="", hosts=f"{path} example.org")
    try:
        assert dig(k, "known.example.org", "A") == ["192.0.2.1"]
        r = ask(k, "nothere.example.org")
        assert r.rcode() == dns.rcode.SERVFAIL and r.answer == []
        assert not [q for q in upstream.queries if q[0] == "nothere.example.org."]
        assert dig(k, "www.outside.example", "A") == ["198.51.100.8"]
        assert dig(k, "kubernetes.default.svc.cluster.local", "A") == ["10.96.0.1"]
    finally:
        k.stop()


def test_an_edited_hosts_file_is_reloaded_and_a_bad_edit_keeps_the_last_good(tmp_path,
                                                                              upstream):
    k, path = start(tmp_path, upstream)
    try:
        assert dig(k, "k3s-server", "A") == ["10.0.0.1"]
        path.write_text("10.0.0.2 k3s-server\n10.0.0.3 k3s-agent\n")
        wait_log(k, f"hosts records from {path}: 4 names")
        wait_log(k, "published image generation 2")
        assert dig(k, "k3s-server", "A") == ["10.0.0.2"]
        assert dig(k, "k3s-agent", "A") == ["10.0.0.3"]
        assert dig(k, "-x", "10.0.0.3") == ["k3s-agent."]
        # A bad line: one log line naming file:line; the last good records stay.
        path.write_text("10.0.0.4 k3s-server\n10.0.0.300 k3s-agent\n")
        wait_log(k, f"{path}:2: '10.0.0.300' is not an IP address")
        assert "Keeping the last good hosts records." in k.logs()
        assert dig(k, "k3s-server", "A") == ["10.0.0.2"]
        assert dig(k, "k3s-agent", "A") == ["10.0.0.3"]
    finally:
        k.stop()


def test_compiled_and_reference_paths_send_the_same_bytes(tmp_path, upstream):
    (tmp_path / "fast").mkdir()
    (tmp_path / "pure").mkdir()
    fast, _ = start(tmp_path / "fast", upstream)
    pure, _ = start(tmp_path / "pure", upstream, env={"KDNS_PURE": "1"})
    try:
        assert "pure engine" in pure.logs() and "compiled engine" in fast.logs()
        for name, qtype in (("k3s-server", "A"), ("K3s-Server", "AAAA"), ("k3s-server", "MX"),
                            ("k3s-server", "ANY"), ("inline.example.org", "AAAA"),
                            ("v6only.example.org", "A"), ("1.0.0.10.in-addr.arpa", "PTR"),
                            ("5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f"
                             ".ip6.arpa", "PTR")):
            for edns in (-1, 0):
                q = dns.message.make_query(name, qtype, use_edns=edns)
                q.id = 0x4242
                wire = q.to_wire()
                got = []
                for k in (fast, pure):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.settimeout(3)
                        s.sendto(wire, (k.host, k.port))
                        got.append(s.recv(65535))
                assert got[0] == got[1], (name, qtype, edns)
                assert dns.message.from_wire(got[0]).rcode() == dns.rcode.NOERROR
    finally:
        fast.stop()
        pure.stop()


def k3s_corefile(tmp_path, upstream, hosts_dir: str) -> str:
    """k3s's default Corefile with its NodeHosts and custom imports pointed at tmp_path and
    its forward at the test's upstream."""
    custom = tmp_path / "custom"
    shutil.copytree(os.path.join(ROOT, "tests", "corefiles", "k3s-custom"), custom)
    text = open(os.path.join(ROOT, "tests", "corefiles", "k3s.Corefile")).read()
    return (text.replace("/etc/coredns/custom", str(custom))
            .replace("/etc/coredns/NodeHosts", os.path.join(hosts_dir, "NodeHosts"))
            .replace("forward . /etc/resolv.conf", f"forward . {upstream.host}:{upstream.port}"))


def test_k3s_default_corefile_serves_its_node_hosts(tmp_path, upstream):
    """k3s's own Corefile serves as it is, hosts and loadbalance included: no plugin is
    left out, so no --corefile-unsupported is needed and none is warned about."""
    (tmp_path / "NodeHosts").write_text(NODE_HOSTS)
    path = tmp_path / "Corefile"
    path.write_text(k3s_corefile(tmp_path, upstream, str(tmp_path)))
    k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
             args=("--corefile", str(path))).start()
    try:
        assert dig(k, "k3s-server", "A") == ["10.0.0.1"]
        assert dig(k, "-x", "192.168.1.20") == ["node-b.", "node-b.lan."]
        assert dig(k, "www.outside.example", "A") == ["198.51.100.8"]
        assert dig(k, "kubernetes.default.svc.cluster.local", "A") == ["10.96.0.1"]
        warned = [line for line in k.logs().splitlines() if "--corefile-unsupported" in line]
        assert warned == []
    finally:
        k.stop()


def test_k3s_node_hosts_from_the_configmap_key(tmp_path, upstream):
    """Through the API, /etc/coredns/NodeHosts is the coredns ConfigMap's NodeHosts key (k3s
    mounts that key there); a new version of the key is compiled in."""
    text = k3s_corefile(tmp_path, upstream, "/etc/coredns")
    api = ConfigMapApi({"Corefile": text, "NodeHosts": NODE_HOSTS})
    k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
             args=("--corefile-configmap", "--kube-master-url", api.url,
                   "--config-period", "0.1s"))
    try:
        k.start()
        assert dig(k, "k3s-server", "A") == ["10.0.0.1"]
        api.set({"Corefile": text, "NodeHosts": "10.0.0.9 k3s-server\n"})
        wait_log(k, "hosts records from configmap/kube-system/coredns:NodeHosts: 1 names")
        wait_log(k, "published image generation 2")
        assert dig(k, "k3s-server", "A") == ["10.0.0.9"]
        assert dig(k, "-x", "10.0.0.9") == ["k3s-server."]
        r = ask(k, "node-b")                 # gone from the key: the upstream's NXDOMAIN
        assert r.rcode() == dns.rcode.NXDOMAIN and ("node-b.", "A", "udp") in upstream.queries
    finally:
        k.stop()
        api.close()


def test_from_the_api_hosts_answer_before_the_sync_and_an_edit_is_compiled_in(tmp_path,
                                                                              upstream):
    """With the Kubernetes API as the source, the records are in the image before the first
    sync (cluster names SERVFAIL then, hosts answer: CoreDNS's hosts does not wait for
    kubernetes either), and a file edit goes through the controller's compile."""
    from fakeapi import FakeApiServer, Slow
    from test_controller import ApiKdns, base_objects
    api = FakeApiServer(token="secret", bookmark_interval=1.0).start()
    try:
        base_objects(api)
        api.inject("services", "list", Slow(3.0))
        (tmp_path / "NodeHosts").write_text(NODE_HOSTS)
        corefile = tmp_path / "Corefile"
        corefile.write_text(COREFILE % {"hosts": tmp_path / "NodeHosts", "fall": "fallthrough",
                                        "up": f"{upstream.host}:{upstream.port}"})
        k = ApiKdns(tmp_path, api, args=("--corefile", str(corefile)))
        try:
            k.start_serving()
            assert ask(k, "kubernetes.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL
            assert dig(k, "k3s-server", "A") == ["10.0.0.1"]
            k.wait_answer("kubernetes.default.svc.cluster.local",
                          lambda m: m.rcode() == dns.rcode.NOERROR and m.answer, timeout=15)
            (tmp_path / "NodeHosts").write_text("10.0.0.7 k3s-server\n")
            wait_log(k, f"hosts records from {tmp_path / 'NodeHosts'}: 3 names")
            k.wait_answer("k3s-server", lambda m: [d.to_text() for rr in m.answer for d in rr]
                          == ["10.0.0.7"], timeout=10)
            assert dig(k, "-x", "10.0.0.7") == ["k3s-server."]
            assert dig(k, "kubernetes.default.svc.cluster.local", "A") == ["10.96.0.1"]
        finally:
            k.stop()
    finally:
        api.close()


def test_a_bad_hosts_file_at_start_is_one_sentence_naming_file_and_line(tmp_path, upstream):
    import sys
    path = tmp_path / "NodeHosts"
    path.write_text("10.0.0.1 k3s-server\n10.0.0.1\n")
    corefile = tmp_path / "Corefile"
    corefile.write_text(COREFILE % {"hosts": path, "fall": "fallthrough",
                                    "up": f"{upstream.host}:{upstream.port}"})
    r = subprocess.run([sys.executable, "-m", "kdns", "serve", "--from-file", CLUSTER,
                        "--corefile", str(corefile), "--dns-port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"kdns: --corefile: {path}:2: the address 10.0.0.1 has no names; give at least one "
        f"after it, e.g. 10.0.0.1 node1.")
