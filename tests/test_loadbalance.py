"""Answer rotation (CoreDNS ``loadbalance``) in a running kdns, over real sockets with
dnspython and dig: a headless service's A records and its SRV records come back in turned
order, so clients that take the first address (glibc does) spread over the endpoints.

Each worker turns each answer by its own counter (kdns/zone/layout.py, Rotation), so with
one worker the k-th answer is exactly the reference path's with rotation state k, and with
two each endpoint comes first a share of times that differs from an even one by at most one
per worker. Truncated answers keep whole records; --loadbalance=false, --no-loadbalance and
a Corefile without ``loadbalance`` keep the compiled order.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from conftest import require_tool
from kdns.kube import records
from kdns.kube.model import ClusterModel
from kdns.zone import image as I
from kdns.zone import refpath as P
from serverutil import HOST, ROOT, Kdns

pytestmark = pytest.mark.timeout(120)

LB = "lb.default.svc.cluster.local."
LB_SRV = "_http._tcp." + LB
BIG = "big.default.svc.cluster.local."
BIG_SRV = "_http._tcp." + BIG
# Ten endpoints with hostnames of different lengths (SRV records of different sizes).
LB_EPS = {f"{'e' * (1 + i % 4)}{i}": f"10.244.1.{i + 1}" for i in range(10)}
BIG_EPS = {f"b{i}": f"10.244.2.{i + 1}" for i in range(40)}


def service(name: str, eps: dict) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"namespace": "default", "name": name},
             "spec": {"clusterIP": "None",
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"namespace": "default", "name": f"{name}-1",
                          "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [ip], "hostname": host, "conditions": {"ready": True}}
                           for host, ip in eps.items()],
             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}]


OBJECTS = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
           *service("lb", LB_EPS), *service("big", BIG_EPS)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lb") / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": OBJECTS}))
    return str(path)


@pytest.fixture(scope="module")
def image() -> bytes:
    m = ClusterModel()
    for obj in OBJECTS:
        m.apply(obj)
    zd = records.zone_data(m, serial=1)
    return I.compile_image(list(zd.rrsets), list(zd.zones), exists=list(zd.exists), serial=1)


@pytest.fixture(scope="module")
def two_workers(cluster, tmp_path_factory):
    k = Kdns(tmp_path_factory.mktemp("lb2"), zone_file=cluster, workers=2).start()
    yield k
    k.stop()


def ask(k: Kdns, name: str, rdtype: str = "A", **kw) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype, **kw), k.host, port=k.port,
                         timeout=3)


def firsts(k: Kdns, name: str, rdtype: str, n: int) -> Counter:
    out = Counter()
    for _ in range(n):
        (rrset,) = ask(k, name, rdtype).answer
        first = rrset[0]
        out[first.address if rdtype == "A" else str(first.target).split(".")[0]] += 1
    return out


def test_each_endpoint_comes_first_a_tenth_of_the_time(two_workers):
    got = firsts(two_workers, LB, "A", 1000)
    assert set(got) == set(LB_EPS.values())
    assert all(70 <= n <= 130 for n in got.values()), got


def test_srv_targets_rotate_and_their_glue_stays_right(two_workers):
    got = firsts(two_workers, LB_SRV, "SRV", 1000)
    assert set(got) == set(LB_EPS)
    assert all(70 <= n <= 130 for n in got.values()), got
    # The glue owners are compressed against the question, never into a moved SRV record:
    # every one names a target of the answer with that target's address.
    for _ in range(20):
        r = ask(two_workers, LB_SRV, "SRV", use_edns=0, payload=1232)
        assert not r.flags & dns.flags.TC
        targets = {str(rd.target) for rd in r.answer[0]}
        glue = {(str(rr.name), rr[0].address) for rr in r.additional}
        assert {name for name, _ in glue} == targets and len(targets) == 10
        assert all(LB_EPS[name.split(".")[0]] == ip for name, ip in glue)


@pytest.mark.parametrize("name, rdtype", [(BIG, "A"), (BIG_SRV, "SRV")])
def test_truncated_answers_stay_whole_under_rotation(two_workers, name, rdtype):
    """40 records do not fit 512 bytes: every reply keeps whole records only (dnspython
    parses it), sets TC, and as many start it as there are rotations."""
    seen, counts = set(), set()
    for _ in range(200):
        q = dns.message.make_query(name, rdtype, use_edns=False)
        # The datagram as sent: dnspython's to_wire() does not keep an RRset's order, so a
        # re-rendered reply would not show which record came first.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(3)
            c.sendto(q.to_wire(), (HOST, two_workers.port))
            wire = c.recv(65535)
        r = dns.message.from_wire(wire)
        assert len(wire) <= 512 and r.flags & dns.flags.TC
        (rrset,) = r.answer
        assert 0 < len(rrset) < 40 and not r.additional
        if rdtype == "A":
            assert {rd.address for rd in rrset} <= set(BIG_EPS.values())
            # A records are all 16 bytes: every turn fits the same number.
            counts.add(len(rrset))
            seen.add(rrset[0].address)
        else:
            assert {str(rd.target).split(".")[0] for rd in rrset} <= set(BIG_EPS)
            seen.add(str(rrset[0].target))
    # 200 queries over two workers: one of them answered at least 100, every turn of 40.
    assert len(seen) == 40
    assert len(counts) <= 1


def test_one_worker_sends_the_reference_reply_of_each_rotation_state(image, tmp_path):
    """The k-th answer of a name from one worker is byte for byte refpath's with rotation
    state k, over UDP, truncated or not."""
    ref = P.Image(image)
    k = Kdns(tmp_path, image=image, workers=1).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    try:
        for name, rdtype, edns, payload in ((LB, "A", -1, 512), (LB_SRV, "SRV", 0, 1232),
                                            (BIG_SRV, "SRV", 0, 700)):
            for state in range(25):
                q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
                q.id = state
                wire = q.to_wire()
                sock.sendto(wire, (HOST, k.port))
                got = sock.recv(65535)
                assert got == P.answer(ref, wire, edns_max=1232, rotation=state)[1], \
                    (name, state)
                dns.message.from_wire(got)              # whole records, as a client reads
    finally:
        sock.close()
        k.stop()


def test_dig_sees_every_endpoint_first(cluster, tmp_path):
    dig = require_tool("dig")
    k = Kdns(tmp_path, zone_file=cluster, workers=1).start()
    try:
        first = []
        for _ in range(10):
            out = subprocess.run([dig, "@" + HOST, "-p", str(k.port), LB, "A", "+short",
                                  "+time=2", "+tries=1"],
                                 capture_output=True, text=True, timeout=10)
            assert out.returncode == 0, out
            lines = out.stdout.split()
            assert sorted(lines) == sorted(LB_EPS.values())
            first.append(lines[0])
        assert sorted(first) == sorted(LB_EPS.values())
    finally:
        k.stop()


@pytest.mark.parametrize("flag", [("--loadbalance=false",), ("--loadbalance", "false"),
                                  ("--no-loadbalance",)])
def test_the_flag_off_keeps_the_compiled_order(cluster, tmp_path, flag, image):
    k = Kdns(tmp_path, zone_file=cluster, workers=2, args=flag).start()
    try:
        for name, rdtype in ((LB, "A"), (LB_SRV, "SRV")):
            q = dns.message.make_query(name, rdtype)
            compiled = dns.message.from_wire(
                P.answer(P.Image(image), q.to_wire(), edns_max=1232)[1]).answer
            for _ in range(30):
                assert ask(k, name, rdtype).answer == compiled
    finally:
        k.stop()


def corefile(tmp_path, loadbalance: str | None) -> str:
    """kubeadm's default Corefile, with ``loadbalance`` as given (None: left out)."""
    text = open(os.path.join(ROOT, "tests", "corefiles", "kubeadm.Corefile")).read()
    assert "    loadbalance\n" in text
    text = text.replace("    loadbalance\n", "" if loadbalance is None else f"    {loadbalance}\n")
    path = tmp_path / "Corefile"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("line, rotates", [("loadbalance", True),
                                           ("loadbalance round_robin", True), (None, False)])
def test_corefile_loadbalance_turns_rotation_on_and_its_absence_off(cluster, tmp_path, line,
                                                                      rotates):
    k = Kdns(tmp_path, zone_file=cluster, workers=1,
             args=("--corefile", corefile(tmp_path, line))).start()
    try:
        got = firsts(k, LB, "A", 20)
        if rotates:
            assert got == Counter({ip: 2 for ip in LB_EPS.values()})
        else:
            assert len(got) == 1
        assert "not supported" not in k.logs()
    finally:
        k.stop()


def test_a_flag_given_wins_over_the_corefile(cluster, tmp_path):
    k = Kdns(tmp_path, zone_file=cluster, workers=1,
             args=("--corefile", corefile(tmp_path, "loadbalance"), "--no-loadbalance")).start()
    try:
        assert len(firsts(k, LB, "A", 20)) == 1
    finally:
        k.stop()


def test_corefile_weighted_policy_is_refused_naming_its_line(cluster, tmp_path):
    path = corefile(tmp_path, "loadbalance weighted /etc/coredns/weights")
    r = subprocess.run([sys.executable, "-m", "kdns", "serve", "--from-file", cluster,
                        "--corefile", path, "--dns-port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{path}:25: the loadbalance policy 'weighted' is not supported by kdns" in r.stderr
