"""``kdns serve --corefile`` on examples/cluster.yaml answers as the same kdns configured the
kube-dns way (a ConfigMap directory with the equivalent stubDomains/upstreamNameservers), over
real sockets with dnspython; a bad Corefile edit keeps the last good one.
"""
from __future__ import annotations

import os
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from serverutil import ROOT, Kdns
from upstream import TestDNSServer

pytestmark = pytest.mark.timeout(90)
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")

QUESTIONS = [("kubernetes.default.svc.cluster.local", "A"),
             ("kubernetes.default.svc.cluster.local", "SRV"),
             ("_https._tcp.kubernetes.default.svc.cluster.local", "SRV"),
             ("nothere.default.svc.cluster.local", "A"),
             ("10-244-1-5.default.pod.cluster.local", "A"),
             ("1.0.96.10.in-addr.arpa", "PTR"),
             ("www.outside.example", "A"),
             ("host.corp.example", "A"),
             ("missing.outside.example", "A")]

COREFILE = """# kubeadm's, with the forward pointed at the test's upstream and a stub domain
.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . {$UPSTREAM} {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
}
corp.example:53 {
    errors
    cache 30
    forward . {$CORP}
}
"""


def answer(k: Kdns, name: str, qtype: str):
    r = dns.query.udp(dns.message.make_query(name, qtype), k.host, port=k.port, timeout=3)
    # TTLs of forwarded answers count down in the cache: compare the records, not the time.
    sections = [sorted(rr.to_text().split("\n")) for rr in r.answer + r.authority]
    strip = [[" ".join(w for i, w in enumerate(line.split()) if i != 1) for line in sec]
             for sec in sections]
    return dns.rcode.to_text(r.rcode()), r.flags & 0x0580, strip


def wait_log(k: Kdns, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in k.logs():
        assert time.monotonic() < deadline, f"no {text!r} in: {k.logs()}"
        time.sleep(0.05)


def test_corefile_answers_as_the_equivalent_kube_dns_configmap(tmp_path):
    up = TestDNSServer({"www.outside.example.": ["A 198.51.100.1"]}, host="127.0.0.31")
    corp = TestDNSServer({"host.corp.example.": ["A 198.51.100.2"]}, host="127.0.0.32")
    with up, corp:
        (tmp_path / "cm").mkdir()
        (tmp_path / "cm" / "upstreamNameservers").write_text(f'["{up.host}:{up.port}"]')
        (tmp_path / "cm" / "stubDomains").write_text(
            f'{{"corp.example": ["{corp.host}:{corp.port}"]}}')
        (tmp_path / "Corefile").write_text(COREFILE)
        env = {"UPSTREAM": f"{up.host}:{up.port}", "CORP": f"{corp.host}:{corp.port}"}
        results = []
        for args in (("--config-dir", str(tmp_path / "cm"), "--ttl", "30"),
                     ("--corefile", str(tmp_path / "Corefile"))):
            k = Kdns(tmp_path, zone_file=CLUSTER, workers=1, args=args, env=env).start()
            try:
                results.append([answer(k, n, t) for n, t in QUESTIONS])
            finally:
                k.stop()
        assert results[0] == results[1]
        by_name = dict(zip(QUESTIONS, results[1]))
        assert by_name[("www.outside.example", "A")][2] == [["www.outside.example. IN A 198.51.100.1"]]
        assert by_name[("host.corp.example", "A")][2] == [["host.corp.example. IN A 198.51.100.2"]]
        assert by_name[("nothere.default.svc.cluster.local", "A")][0] == "NXDOMAIN"


def test_a_bad_corefile_edit_keeps_the_last_good_one(tmp_path):
    a = TestDNSServer({"x.corp.example.": ["A 198.51.100.10"]}, host="127.0.0.33")
    b = TestDNSServer({"x.corp.example.": ["A 198.51.100.20"]}, host="127.0.0.34")
    with a, b:
        path = tmp_path / "Corefile"
        text = COREFILE.replace("{$UPSTREAM}", "127.0.0.35:53")
        path.write_text(text.replace("{$CORP}", f"{a.host}:{a.port}"))
        k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
                 args=("--corefile", str(path), "--config-period", "0.1s")).start()
        try:
            def x():
                r = dns.query.udp(dns.message.make_query("x.corp.example", "A"), k.host,
                                  port=k.port, timeout=3)
                return [rr.to_text().split()[-1] for rr in r.answer]
            assert x() == ["198.51.100.10"]
            # A typo: an unknown forward option. Rejected with its line; a's route stays.
            bad = text.replace("{$CORP}", f"{b.host}:{b.port} {{\n        polcy random\n    }}")
            path.write_text(bad)
            wait_log(k, f"{path}:25: the forward option 'polcy random' is not supported")
            assert "Keeping the last good Corefile" in k.logs()
            assert x() == ["198.51.100.10"] and b.udp_queries == 0
            # Fixed: applied without a restart (the cache is cleared with the routes).
            path.write_text(text.replace("{$CORP}", f"{b.host}:{b.port}"))
            wait_log(k, "kube-dns config changed")
            deadline = time.monotonic() + 5
            while x() != ["198.51.100.20"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            k.stop()


class ConfigMapApi:
    """A loopback HTTP server answering GET of kube-system/coredns (what kdns polls)."""

    def __init__(self, data: dict):
        import http.server
        import json
        import threading
        outer = self
        self.data, self.rv = data, 1

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/api/v1/namespaces/kube-system/configmaps/coredns":
                    body, code = b'{"kind":"Status","code":404,"reason":"NotFound"}', 404
                else:
                    body, code = json.dumps({"kind": "ConfigMap", "apiVersion": "v1",
                                             "metadata": {"name": "coredns",
                                                          "resourceVersion": str(outer.rv)},
                                             "data": outer.data}).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def set(self, data: dict) -> None:
        self.data, self.rv = data, self.rv + 1

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_corefile_read_through_the_api_and_reloaded(tmp_path):
    a = TestDNSServer({"x.corp.example.": ["A 198.51.100.10"]}, host="127.0.0.36")
    b = TestDNSServer({"x.corp.example.": ["A 198.51.100.20"]}, host="127.0.0.37")
    text = COREFILE.replace("{$UPSTREAM}", "127.0.0.35:53")
    api = ConfigMapApi({"Corefile": text.replace("{$CORP}", f"{a.host}:{a.port}")})
    with a, b:
        k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
                 args=("--corefile-configmap", "--kube-master-url", api.url,
                       "--config-period", "0.1s"))
        try:
            k.start()

            def x():
                r = dns.query.udp(dns.message.make_query("x.corp.example", "A"), k.host,
                                  port=k.port, timeout=3)
                return [rr.to_text().split()[-1] for rr in r.answer]
            assert x() == ["198.51.100.10"]
            api.set({"Corefile": text.replace("{$CORP}",
                                              f"{b.host}:{b.port} {{\n        polcy random\n    }}")})
            wait_log(k, "configmap/kube-system/coredns:Corefile:25: the forward option "
                        "'polcy random' is not supported")
            assert x() == ["198.51.100.10"] and b.udp_queries == 0
            api.set({"Corefile": text.replace("{$CORP}", f"{b.host}:{b.port}")})
            deadline = time.monotonic() + 5
            while x() != ["198.51.100.20"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            k.stop()
            api.close()


def test_corefile_configmap_missing_is_one_sentence(tmp_path):
    import subprocess
    import sys
    api = ConfigMapApi({"Corefile": COREFILE})
    try:
        r = subprocess.run([sys.executable, "-m", "kdns", "serve", "--from-file", CLUSTER,
                            "--corefile-configmap", "other", "--kube-master-url", api.url],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2
        assert r.stderr.strip().endswith(
            "kdns: --corefile-configmap: ConfigMap kube-system/other does not exist.")
    finally:
        api.close()


def test_endpoint_pod_names_from_the_corefile(tmp_path):
    """``endpoint_pod_names`` names an endpoint without a hostname after its pod."""
    base = ".:53 {\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n" \
           "        fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n%s    }\n    cache 30\n}\n"
    got = {}
    for opt in ("", "        endpoint_pod_names\n"):
        path = tmp_path / "Corefile"
        path.write_text(base % opt)
        k = Kdns(tmp_path, zone_file=CLUSTER, workers=1, args=("--corefile", str(path))).start()
        try:
            r = dns.query.udp(dns.message.make_query("10.1.244.10.in-addr.arpa", "PTR"),
                              k.host, port=k.port, timeout=3)
            got[bool(opt)] = [rr.to_text().split()[-1] for rr in r.answer]
        finally:
            k.stop()
    assert got == {False: ["10-244-1-10.api.development.svc.cluster.local."],
                   True: ["api-7f9c-aaaaa.api.development.svc.cluster.local."]}


def test_forward_flags_reach_the_workers(tmp_path):
    """--forward-force-tcp and --forward-policy sequential, through a running kdns (its
    compiled forwarder leaves these to Python, which honours them)."""
    names = {f"n{i}.outside.example.": ["A 198.51.100.9"] for i in range(6)}
    first, second = TestDNSServer(names, host="127.0.0.38"), TestDNSServer(names, host="127.0.0.39")
    with first, second:
        ups = f"{first.host}:{first.port},{second.host}:{second.port}"
        k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
                 args=("--nameservers", ups, "--forward-force-tcp",
                       "--forward-policy", "sequential")).start()
        try:
            for i in range(6):
                r = dns.query.udp(dns.message.make_query(f"n{i}.outside.example", "A"),
                                  k.host, port=k.port, timeout=3)
                assert [rr.to_text().split()[-1] for rr in r.answer] == ["198.51.100.9"]
        finally:
            k.stop()
        # The loop check's probes go over TCP too; the six names all went to the first.
        asked = [q for q in first.queries if q[0].startswith("n")]
        assert len(asked) == 6 and all(proto == "tcp" for _, _, proto in asked)
        assert [q for q in second.queries if q[0].startswith("n")] == []
        assert first.udp_queries == 0 and second.udp_queries == 0


def test_kubeadm_default_starts_as_it_is(tmp_path):
    """kubeadm's own Corefile serves without --corefile-unsupported: kdns does all it asks
    (loadbalance included: tests/test_loadbalance.py), and nothing is logged as left out."""
    path = os.path.join(ROOT, "tests", "corefiles", "kubeadm.Corefile")
    k = Kdns(tmp_path, zone_file=CLUSTER, workers=1, args=("--corefile", path)).start()
    try:
        r = dns.query.udp(dns.message.make_query("kubernetes.default.svc.cluster.local", "A"),
                          k.host, port=k.port, timeout=3)
        assert [rr.to_text() for rr in r.answer] == \
            ["kubernetes.default.svc.cluster.local. 30 IN A 10.96.0.1"]
        assert "not supported" not in k.logs()
    finally:
        k.stop()


def test_cache_ttl_cap_and_max_concurrent_in_the_compiled_path(tmp_path):
    """--cache-success-ttl caps what the compiled cache serves; --forward-max-concurrent
    bounds the compiled forwarder's queries in flight: the one over it is REFUSED."""
    import socket
    up = TestDNSServer({"long.outside.example.": ["600 A 198.51.100.3"],
                        "slow1.outside.example.": ["A 198.51.100.4"],
                        "slow2.outside.example.": ["A 198.51.100.5"]}, host="127.0.0.40")
    with up:
        k = Kdns(tmp_path, zone_file=CLUSTER, workers=1,
                 args=("--nameservers", f"{up.host}:{up.port}", "--cache-success-ttl", "7",
                       "--forward-max-concurrent", "1")).start()
        try:
            def ask(name):
                return dns.query.udp(dns.message.make_query(name, "A"), k.host, port=k.port,
                                     timeout=3)
            assert ask("long.outside.example").answer[0].ttl == 600   # relayed as sent
            n = up.udp_queries
            cached = ask("long.outside.example")
            assert up.udp_queries == n and cached.answer[0].ttl <= 7  # the cap, from cache
            up.delay = 0.5
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            try:
                for s, name in zip(socks, ("slow1.outside.example", "slow2.outside.example")):
                    s.settimeout(3)
                    s.sendto(dns.message.make_query(name, "A").to_wire(), (k.host, k.port))
                rcodes = sorted(dns.rcode.to_text(dns.message.from_wire(s.recv(4096)).rcode())
                                for s in socks)
            finally:
                for s in socks:
                    s.close()
            assert rcodes == ["NOERROR", "REFUSED"]
        finally:
            k.stop()
