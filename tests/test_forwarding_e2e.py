"""Forwarding through a running ``kdns serve``: the kube-dns conformance scenarios
with a ConfigMap directory, hot reload (valid and invalid), TCP, the compiled cache, loops.

Every upstream is a TestDNSServer on loopback started here; kdns reads a resolv.conf and a
ConfigMap directory written here, never the machine's.
"""
from __future__ import annotations

import json
import socket
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from serverutil import Kdns
from upstream import TestDNSServer
from zonefixtures import sample_image

PERIOD = "0.2s"


def write_config(d, **keys) -> None:
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    for key, value in keys.items():
        (d / key).write_text(value if isinstance(value, str) else json.dumps(value))


def addr(server: TestDNSServer) -> str:
    return f"{server.host}:{server.port}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fwd")
    stub = TestDNSServer({"abc.acme.local.": ["A 1.1.1.1"], "def.acme.local.": ["A 2.2.2.2"]})
    up = TestDNSServer({"widget.local.": ["A 3.3.3.3"],
                        "www.example.com.": ["A 93.184.216.34", "A 93.184.216.35"],
                        "123.2.0.192.in-addr.arpa.": ["PTR my.test."],
                        **{f"c{i}.widget.local.": ["300 A 10.0.0.1"] for i in range(10)}})
    other = TestDNSServer({"widget.local.": ["A 4.4.4.4"]})
    with stub, up, other:
        cfg = tmp / "kube-dns-config"
        write_config(cfg, stubDomains={"acme.local": [addr(stub)]},
                     upstreamNameservers=[addr(up)])
        resolv = tmp / "resolv.conf"
        resolv.write_text("")            # no default upstream: only the ConfigMap's
        k = Kdns(tmp, image=sample_image(), workers=2,
                 args=("--config-dir", str(cfg), "--config-period", PERIOD,
                       "--resolv-conf", str(resolv)))
        k.start()
        try:
            yield k, cfg, stub, up, other
        finally:
            k.stop()


def ask(k: Kdns, name: str, qtype: str = "A", tcp: bool = False, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    if tcp:
        return dns.query.tcp(q, k.host, port=k.port, timeout=5)
    return dns.query.udp(q, k.host, port=k.port, timeout=5, **kw)


def addresses(m: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rr in m.answer for r in rr)


def test_stub_domain_acme_local(env):
    k, _, stub, _, _ = env
    assert addresses(ask(k, "abc.acme.local")) == ["1.1.1.1"]
    assert addresses(ask(k, "def.acme.local")) == ["2.2.2.2"]
    assert any(q[0] == "abc.acme.local." for q in stub.queries)


def test_upstream_nameservers_widget_local(env):
    k, _, _, up, _ = env
    assert addresses(ask(k, "widget.local")) == ["3.3.3.3"]
    assert any(q[0] == "widget.local." for q in up.queries)


def test_ptr_forwarding(env):
    k = env[0]
    m = ask(k, "123.2.0.192.in-addr.arpa", "PTR")
    assert addresses(m) == ["my.test."]


def test_cluster_names_still_from_the_image(env):
    k, _, _, up, _ = env
    before = len(up.queries)
    m = ask(k, "kubernetes.default.svc.cluster.local")
    assert addresses(m) == ["10.96.0.1"] and m.flags & 0x0400       # AA: from the image
    assert len(up.queries) == before


def test_tcp_client_answered_over_tcp(env):
    k = env[0]
    m = ask(k, "def.acme.local", tcp=True)
    assert addresses(m) == ["2.2.2.2"]


def test_cache_hits_ask_the_upstream_once(env):
    k, _, _, up, _ = env
    name = "c1.widget.local."
    # One client port: SO_REUSEPORT sends every datagram of it to the same worker.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((k.host, 0))
        port = s.getsockname()[1]
    replies = [ask(k, name.upper() if i % 2 else name, source=k.host, source_port=port)
               for i in range(20)]
    assert [addresses(r) for r in replies] == [["10.0.0.1"]] * 20
    assert sum(1 for q in up.queries if q[0] == name) == 1
    # DNS 0x20: the question comes back in the client's case.
    assert replies[1].question[0].name.to_text() == name.upper()
    assert all(r.answer[0].ttl <= 300 for r in replies)


def test_external_name_outside_gets_the_target_records(env):
    """dns-rules §1.6: CNAME (from the image, AA) followed by the target's A records (upstream)."""
    k, _, _, up, _ = env
    for tcp in (False, True):
        m = ask(k, "outside.default.svc.cluster.local", tcp=tcp)
        assert m.rcode() == dns.rcode.NOERROR
        texts = [rr.to_text() for rr in m.answer]
        assert texts[0] == "outside.default.svc.cluster.local. 30 IN CNAME www.example.com."
        assert addresses(m)[:2] == ["93.184.216.34", "93.184.216.35"]
        assert all(rr.name.to_text() == "www.example.com." for rr in m.answer[1:])
    # The CNAME query itself is the image's alone; the target is asked once (then cached).
    m = ask(k, "outside.default.svc.cluster.local", "CNAME")
    assert [rr.to_text() for rr in m.answer] == [
        "outside.default.svc.cluster.local. 30 IN CNAME www.example.com."]
    assert sum(1 for q in up.queries if q[0] == "www.example.com.") <= 2    # one per worker


def test_hot_reload_valid_then_invalid(env):
    import threading
    k, cfg, stub, up, other = env
    failures, answered, stop = [], [], threading.Event()

    def client():               # queries during the reload: none may go unanswered
        while not stop.is_set():
            try:
                answered.append(addresses(ask(k, "abc.acme.local")))
            except Exception as e:          # timeout = a dropped query
                failures.append(repr(e))

    t = threading.Thread(target=client)
    t.start()
    write_config(cfg, stubDomains={"acme.local": [addr(stub)]},
                 upstreamNameservers=[addr(other)])
    deadline = time.monotonic() + 10
    while addresses(ask(k, "widget.local")) != ["4.4.4.4"]:
        assert time.monotonic() < deadline, k.logs()
        time.sleep(0.1)
    stop.set()
    t.join()
    assert not failures and answered and all(a == ["1.1.1.1"] for a in answered)
    # Every worker applies it (each ask has its own source port, so SO_REUSEPORT spreads
    # them over both workers): the config channel reaches them in the same supervisor tick,
    # so 20 asks in a row all see it soon after the first did.
    deadline = time.monotonic() + 10
    while not all(addresses(ask(k, "widget.local")) == ["4.4.4.4"] for _ in range(20)):
        assert time.monotonic() < deadline, k.logs()
    # Invalid: the whole update is rejected with a line naming the key; the last good
    # configuration stays in force.
    write_config(cfg, stubDomains={"acme.local": [addr(stub)]},
                 upstreamNameservers="[not json")
    deadline = time.monotonic() + 10
    while "'upstreamNameservers' rejected" not in k.logs():
        assert time.monotonic() < deadline, k.logs()
        time.sleep(0.1)
    assert addresses(ask(k, "widget.local")) == ["4.4.4.4"]
    assert addresses(ask(k, "abc.acme.local")) == ["1.1.1.1"]
    assert k.ready()
    write_config(cfg, stubDomains={"acme.local": [addr(stub)]}, upstreamNameservers=[addr(up)])
    deadline = time.monotonic() + 10
    while addresses(ask(k, "widget.local")) != ["3.3.3.3"]:
        assert time.monotonic() < deadline, k.logs()
        time.sleep(0.1)


def test_cluster_answers_say_recursion_available_when_kdns_forwards(env):
    """RFC 1035 §4.1.1 RA, as kube-dns set it (nslookup: "Got recursion not available")."""
    k = env[0]
    for tcp in (False, True):
        for name in ("kubernetes.default.svc.cluster.local", "nope.default.svc.cluster.local"):
            assert ask(k, name, tcp=tcp).flags & dns.flags.RA, (name, tcp)


def test_no_upstream_means_refused(tmp_path):
    k = Kdns(tmp_path, image=sample_image(), workers=1)     # serverutil: empty resolv.conf
    k.start()
    try:
        assert ask(k, "google.com").rcode() == dns.rcode.REFUSED
        for tcp in (False, True):     # nobody to forward to: no recursion available
            assert not ask(k, "kubernetes.default.svc.cluster.local", tcp=tcp).flags & dns.flags.RA
        # An ExternalName to an outside name: kdns holds the CNAME, so it answers with it
        # alone (RFC 1034 §3.6.2: the client resolves the target itself), not REFUSED.
        for qtype in ("A", "AAAA", "SRV"):
            for tcp in (False, True):
                m = ask(k, "outside.default.svc.cluster.local", qtype, tcp=tcp)
                assert m.rcode() == dns.rcode.NOERROR, (qtype, tcp)
                assert [rr.to_text() for rr in m.answer] == [
                    "outside.default.svc.cluster.local. 30 IN CNAME www.example.com."]
    finally:
        k.stop()


def test_a_loop_takes_the_upstream_out_of_routing_and_kdns_stays_ready(tmp_path):
    """Every replica sees the same loop: not ready would empty the Service and take the
    cluster names down with the outside ones. kdns stays ready, answers SERVFAIL for what
    only the looping upstream serves, and says so in a log line and a gauge."""
    cfg = tmp_path / "kube-dns-config"
    with TestDNSServer({"widget.local.": ["A 3.3.3.3"]}) as good, TestDNSServer() as relay:
        write_config(cfg, upstreamNameservers=[addr(good)])
        k = Kdns(tmp_path, image=sample_image(), workers=2,
                 args=("--config-dir", str(cfg), "--config-period", PERIOD))
        k.start()
        relay.forward_to = (k.host, k.port)         # an upstream that sends queries back

        def looping() -> float:
            return k.metrics().get(("kdns_forward_looping_upstreams", frozenset()), -1)

        def wait(pred, what):
            deadline = time.monotonic() + 15
            while not pred():
                assert time.monotonic() < deadline, f"{what}: {k.logs()}"
                time.sleep(0.1)
        try:
            assert looping() == 0
            # On config change: an upstream that relays to kdns is probed and found.
            write_config(cfg, upstreamNameservers=[addr(relay)])
            wait(lambda: looping() == 1, "the loop found")
            assert "forwarding loop" in k.logs() and addr(relay) in k.logs()
            assert k.ready()
            assert addresses(ask(k, "kubernetes.default.svc.cluster.local")) == ["10.96.0.1"]
            relayed = len(relay.queries)
            assert ask(k, "widget.local").rcode() == dns.rcode.SERVFAIL
            assert ask(k, "widget.local", tcp=True).rcode() == dns.rcode.SERVFAIL
            assert len(relay.queries) == relayed, "a looping upstream must get no queries"
            # kdns itself as upstream: found without a probe.
            write_config(cfg, upstreamNameservers=[f"{k.host}:{k.port}"])
            wait(lambda: "is kdns's own listening address" in k.logs(), "own address found")
            assert looping() == 1 and k.ready()
            # Fixed: the gauge goes back to 0 and outside names resolve again.
            write_config(cfg, upstreamNameservers=[addr(good)])
            wait(lambda: looping() == 0, "the loop gone")
            assert addresses(ask(k, "widget.local")) == ["3.3.3.3"]
        finally:
            k.stop()


def test_tcp_after_udp_is_answered_from_the_cache(tmp_path):
    """One cache per worker: a name a UDP client had answered upstream (relayed and cached
    by the compiled path) is answered to a TCP client from that cache, and the other way
    round. One worker, so both clients reach the same cache."""
    with TestDNSServer({"once.example.": ["300 A 192.0.2.7"],
                        "back.example.": ["300 A 192.0.2.8"]}) as up:
        k = Kdns(tmp_path, image=sample_image(), workers=1, args=("--nameservers", addr(up)))
        k.start()
        try:
            def asked(name):
                return sum(1 for q in up.queries if q[0] == name)

            assert addresses(ask(k, "once.example")) == ["192.0.2.7"]
            assert addresses(ask(k, "once.example", tcp=True)) == ["192.0.2.7"]
            assert asked("once.example.") == 1
            assert addresses(ask(k, "back.example", tcp=True)) == ["192.0.2.8"]
            assert addresses(ask(k, "back.example")) == ["192.0.2.8"]
            assert asked("back.example.") == 1
        finally:
            k.stop()


def bucket_counts(k: Kdns, name: str) -> tuple[float, dict[float, float]]:
    """(count, {le: cumulative count}) of histogram ``name`` in one scrape."""
    m = k.metrics()
    count = sum(v for (n, _), v in m.items() if n == name + "_count")
    buckets: dict[float, float] = {}
    for (n, labels), v in m.items():
        if n == name + "_bucket":
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0) + v
    return count, buckets


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-forward", "python-forward"])
def test_request_duration_runs_to_the_final_reply(tmp_path, compiled):
    """A slow upstream shows in coredns_dns_request_duration_seconds (what CoreDNSLatencyHigh
    watches): a forwarded query is timed from its arrival to its reply, over UDP (relayed by
    the compiled forwarder, or sent by Python) and over TCP, not to the hand-off."""
    delay = 0.3
    with TestDNSServer({f"slow{i}.example.": ["300 A 192.0.2.9"] for i in range(3)}) as up:
        up.delay = delay
        k = Kdns(tmp_path, image=sample_image(), workers=1,
                 args=("--nameservers", addr(up)),
                 env={"KDNS_FWD_COMPILED": "1" if compiled else "0"})
        k.start()
        try:
            name = "coredns_dns_request_duration_seconds"
            before, below = bucket_counts(k, name)
            assert addresses(ask(k, "slow0.example")) == ["192.0.2.9"]
            assert addresses(ask(k, "slow1.example", tcp=True)) == ["192.0.2.9"]
            assert addresses(ask(k, "slow2.example")) == ["192.0.2.9"]
            after, buckets = bucket_counts(k, name)
            # The upstream held each of the three for `delay`: three new samples lie above
            # the largest bucket bound below it (0.256 s). (The health probe's own queries,
            # every few seconds, are answered from the image: below it.)
            bound = max(b for b in buckets if b < delay)
            slow = lambda count, b: count - b.get(bound, 0)   # noqa: E731
            assert slow(after, buckets) - slow(before, below) == 3
            # A cluster name is still answered at once from the image.
            assert ask(k, "kubernetes.default.svc.cluster.local").answer
            _, end = bucket_counts(k, name)
            assert end[bound] - buckets[bound] >= 1
        finally:
            k.stop()
