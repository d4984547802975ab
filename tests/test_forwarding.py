"""The worker's one forwarder cache (_fastpath.PacketCache behind cache.CompiledCache) and
the forwarding config message.

The compiled hit must be byte-identical to what the Python forwarder renders from the same
entry (Entry.render + forwarder.fit), UdpServer must serve it without handing off, and an
entry either side stores is the other side's hit.
"""
from __future__ import annotations

import asyncio
import json
import mmap
import socket
import struct
import time

import pytest

from kdns import settings
from kdns.packet import counters as C
from kdns.packet import engine
from kdns.serve import publish
from kdns.forward.cache import Cache, CompiledCache, key_bytes
from kdns.forward.forwarder import Forwarder, parse_query
from kdns.forward.control import decode_config, encode_config
from kdns.forward.forwarder import Upstream
from upstream import make_query
from zonefixtures import sample_image

if engine.IMPLEMENTATION != "compiled":
    # Collected under CI, this must fail: a skip would hide a missing compiled cache.
    from conftest import unavailable
    unavailable("the compiled cache needs kdns.packet._fastpath (make install builds it)")
from kdns.packet import _fastpath  # noqa: E402


def upstream_reply(name: str, n: int = 3, ttl: int = 300, rcode: int = 0) -> bytes:
    """A plausible upstream answer: n A records, compressed owners, an OPT."""
    from dnslib import A, EDNS0, QTYPE, RR, DNSRecord
    q = DNSRecord.question(name, "A")
    r = q.reply()
    r.header.rcode = rcode
    for i in range(n):
        r.add_answer(RR(name, QTYPE.A, rdata=A(f"10.0.{i // 250}.{i % 250}"), ttl=ttl - i))
    r.add_ar(EDNS0(udp_len=1232))
    return bytes(r.pack())


def fill(name: str, **kw):
    fast = _fastpath.PacketCache(64, settings.EDNS_UDP_SIZE)
    cache = CompiledCache(fast, 100)
    q = parse_query(make_query(name))
    key = (q.name, q.qtype, q.qclass, 0, 0)
    e = cache.put(key, upstream_reply(name, **kw))
    assert e is not None
    return fast, cache, e


@pytest.mark.parametrize("name,edns,do,n", [
    ("www.Example.COM", None, False, 3),
    ("www.example.com", 1232, False, 3),
    ("www.example.com", 1232, True, 3),
    ("www.example.com", None, False, 40),     # does not fit 512: cut, TC
    ("www.example.com", 600, False, 40),
])
def test_compiled_hit_is_byte_identical_to_python(name, edns, do, n):
    fast, cache, e = fill(name.lower(), n=n)
    query = make_query(name, qid=4321, edns=edns, do=do)
    q = parse_query(query)
    key = key_bytes((q.name, q.qtype, q.qclass, q.edns[1] if q.edns else 0, 0))
    if do:
        # DO is part of the key (RFC 3225): the entry stored without DO must not answer.
        assert fast.answer(query)[0] == engine.HANDOFF
        return
    # The Python path (a TCP client's, a retry's) reads the same entry and must render it
    # to the same bytes: the Forwarder answers the hit itself, no upstream asked.
    fw = Forwarder(cache=cache)
    action, reply = fast.answer(query)
    assert action == engine.SEND
    assert reply == asyncio.run(fw.resolve(query, "udp"))
    assert key.startswith(q.name)


def test_ttls_count_down_and_entry_expires():
    fast, cache, e = fill("a.example", n=1, ttl=300)
    query = make_query("a.example")
    fast.put(key_bytes((b"\x01a\x07example\x00", 1, 1, 0, 0)), e.wire, e.qend,
             e.ttl_offs, e.ttls, 2, time.monotonic() - 1.5)       # 2 s lifetime, 1.5 s old
    action, reply = fast.answer(query)
    assert action == engine.SEND
    assert struct.unpack_from("!I", reply, e.ttl_offs[0])[0] == 1
    fast.put(key_bytes((b"\x01a\x07example\x00", 1, 1, 0, 0)), e.wire, e.qend,
             e.ttl_offs, e.ttls, 2, time.monotonic() - 2.5)
    assert fast.answer(query)[0] == engine.HANDOFF


def test_udpserver_serves_cache_hits_without_handing_off():
    fast, cache, e = fill("hit.example", n=2)
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(2)
    page = mmap.mmap(-1, C.PAGE_BYTES)
    try:
        us = engine.UdpServer(srv.fileno(), settings.EDNS_UDP_SIZE)
        us.set_cache(fast)
        img, ctr = engine.Image(sample_image()), engine.Counters(page)
        for name in ("hit.example", "miss.example"):
            cli.sendto(make_query(name), srv.getsockname())
        deadline = time.monotonic() + 2
        handed = []
        while len(handed) + ctr[C.LAYOUT["cache_hit_udp"]] < 2 and time.monotonic() < deadline:
            n = us.serve(img, ctr)
            handed += [us.handoff_packet(i) for i in range(n)]
        assert ctr[C.LAYOUT["cache_hit_udp"]] == 1
        assert ctr[C.LAYOUT["cache_miss_udp"]] == 1
        assert len(handed) == 1 and b"miss" in handed[0]
        reply = cli.recv(4096)
        assert reply[:2] == make_query("hit.example")[:2] and reply[7] == 2
    finally:
        srv.close()
        cli.close()


def test_config_message_round_trip():
    msg = encode_config("tok", (Upstream("10.0.0.1", 53),),
                        {"acme.local": (Upstream("1.2.3.4", 5353),)}, {Upstream("10.0.0.9")})
    token, ups, stubs, looping = decode_config(msg)
    assert token == "tok" and ups == (Upstream("10.0.0.1", 53),)
    assert stubs == {"acme.local": (Upstream("1.2.3.4", 5353),)}
    assert looping == {Upstream("10.0.0.9", 53)}


def test_compiled_cache_holds_what_the_python_cache_holds():
    """The pure twin is the oracle: same rules, same stored form, read back from C."""
    plain = Cache(10)
    compiled = CompiledCache(_fastpath.PacketCache(8, settings.EDNS_UDP_SIZE), 10)
    key = (b"\x01a\x07example\x00", 1, 1, 0, 0)
    want = plain.put(key, upstream_reply("a.example"))
    compiled.put(key, upstream_reply("a.example"))
    got = compiled.get(key)
    assert len(compiled.entries) == 0 and len(compiled) == 1     # held by the compiled table
    assert (got.wire, got.qend, got.ttl_offs, got.ttls, got.ttl, got.rcode) == \
        (want.wire, want.qend, want.ttl_offs, want.ttls, want.ttl, want.rcode)
    assert abs(got.stored - want.stored) < 1
    assert compiled.get((b"\x01b\x07example\x00", 1, 1, 0, 0)) is None
    assert (compiled.hits, compiled.misses) == (1, 1)


# --------------------------------------------------------------------------- --config-map


class _ConfigMapApi:
    """A loopback HTTP server answering GET of one ConfigMap (404 until ``data`` is set)."""

    def __init__(self):
        import http.server
        import threading
        outer = self
        self.data, self.rv, self.gets = None, 1, 0

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.gets += 1
                if self.path != "/api/v1/namespaces/kube-system/configmaps/kube-dns" or \
                        outer.data is None:
                    body, code = b'{"kind":"Status","code":404,"reason":"NotFound"}', 404
                else:
                    body, code = json.dumps({"kind": "ConfigMap", "apiVersion": "v1",
                                             "metadata": {"name": "kube-dns",
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

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_config_map_through_the_api(tmp_path):
    from kdns.forward.control import ForwardingOptions
    from kdns.serve.supervisor import forwarding_control
    api = _ConfigMapApi()
    # The upstream the ConfigMap names is a socket this test holds, so the loop check's
    # probe goes nowhere but here (and is never answered: a timeout, not a loop).
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    up = Upstream("127.0.0.1", sink.getsockname()[1])
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("")
    try:
        opts = ForwardingOptions(config_dir="", config_map="kube-dns", resolv_conf=str(resolv),
                                 kube_master_url=api.url, config_period=0.05)
        ctl = forwarding_control(opts)
        ctl.start([("127.0.0.1", 53)])
        assert ctl.upstreams() == ()                   # 404: defaults, as kube-dns
        api.data = {"upstreamNameservers": f'["127.0.0.1:{up.port}"]'}
        api.rv = 2
        deadline = time.monotonic() + 5
        while ctl.upstreams() != (up,):
            assert time.monotonic() < deadline
            time.sleep(0.05)
            ctl.poll(time.monotonic())
        api.data = {"upstreamNameservers": "[nope"}    # invalid: rejected, previous stays
        api.rv = 3
        deadline = time.monotonic() + 5
        while not ctl.rejected:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            ctl.poll(time.monotonic())
        assert ctl.upstreams() == (up,)
        assert decode_config(ctl.message)[1] == (up,)
        ctl.close()
    finally:
        api.close()
        sink.close()


@pytest.mark.parametrize("args,message", [
    (["--config-map", "kube-dns", "--config-dir", "/x"], "cannot be used together"),
    (["--nameservers", "1.2.3.4:99999"], "--nameservers"),
    (["--config-period", "0s"], "--config-period"),
])
def test_forwarding_flag_errors_name_the_flag(tmp_path, capsys, args, message):
    from kdns import cli
    img = tmp_path / "z.img"
    img.write_bytes(sample_image())
    with pytest.raises(SystemExit) as e:
        code = cli.main(["serve", "--from-image", str(img), *args])
        raise SystemExit(code)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_full_table_evicts_the_entry_stored_longest_ago():
    """8 slots, 8-slot probe window: every put sees the whole table."""
    fast, cache, e = fill("a.example", n=1)
    fast = _fastpath.PacketCache(8, settings.EDNS_UDP_SIZE)
    now = time.monotonic()
    keys = [key_bytes((bytes([1, 97 + i]) + b"\x07example\x00", 1, 1, 0, 0))
            for i in range(9)]
    for i, key in enumerate(keys[:8]):
        assert fast.put(key, e.wire, e.qend, e.ttl_offs, e.ttls, 300, now - 100 + i)
    fast.put(keys[8], e.wire, e.qend, e.ttl_offs, e.ttls, 300, now)
    asks = [make_query(chr(97 + i) + ".example") for i in range(9)]
    assert fast.answer(asks[0])[0] == engine.HANDOFF            # oldest: evicted
    assert all(fast.answer(q)[0] == engine.SEND for q in asks[1:])


def test_one_store_for_both_paths():
    """What the Forwarder stores is a compiled hit; what C stores, the Forwarder finds."""
    fast, cache, e = fill("b.example", n=1)
    assert fast.answer(make_query("b.example"))[0] == engine.SEND
    q = parse_query(make_query("c.example"))
    key = (q.name, 1, 1, 0, 0)
    assert cache.get(key) is None
    fast.put(key_bytes(key), e.wire, e.qend, e.ttl_offs, e.ttls, 300, time.monotonic())
    assert cache.get(key) is not None
    cache.clear()
    assert cache.get(key) is None and len(cache) == 0
    assert fast.answer(make_query("b.example"))[0] == engine.HANDOFF


def test_too_big_for_a_compiled_slot_is_kept_in_python_once():
    fast = _fastpath.PacketCache(8, settings.EDNS_UDP_SIZE)
    cache = CompiledCache(fast, 10)
    q = parse_query(make_query("big.example"))
    key = (q.name, q.qtype, q.qclass, 0, 0)
    assert cache.put(key, upstream_reply("big.example", n=90)) is not None   # > 1232 bytes
    assert len(fast) == 0 and len(cache.entries) == 1 and cache.get(key) is not None
    assert fast.answer(make_query("big.example"))[0] == engine.HANDOFF
