"""The image stream end to end in one process: the central side (kdns/serve/stream.py)
on a real HTTP listener fed by a real Publisher, the node side (kdns/nodelocal/source.py)
long-polling it, with an injected clock for staleness."""
import http.client
import threading
import zlib

import pytest

from kdns.serve import stream as ST
from kdns.nodelocal.source import StreamError, StreamSource
from kdns.observe.http import HttpListener
from kdns.serve.publish import Publisher
from nodelocal_util import cluster_items, compile_items, service

WAIT = 5.0          # every wait is for an event; this only bounds a broken run


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Central:
    """A Publisher and the /image route on a loopback listener; ``down`` answers 503."""

    def __init__(self):
        self.publisher = Publisher()
        self.stream = ST.ImageStream(self.publisher)
        self.ready = threading.Condition()
        self.down = False
        route = self.stream.routes()["/image"]

        def guarded(handler):
            if self.down:
                return 503, "text/plain", b"down\n", {}
            return route(handler)
        guarded.wants_request = True
        self.listener = HttpListener("127.0.0.1", 0, {"/image": guarded})
        self.listener.start()
        self.url = f"http://127.0.0.1:{self.listener.server.server_address[1]}/image"

    def publish(self, image: bytes) -> int:
        gen = self.publisher.publish(image)
        with self.stream.cond:
            assert self.stream.cond.wait_for(
                lambda: self.stream.current is not None and self.stream.current.number == gen,
                WAIT)
        return gen

    def close(self):
        self.listener.close()
        self.publisher.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return [compile_items(tmp, cluster_items(300), 1),
            compile_items(tmp, cluster_items(300, extra=[service("new", "ns2", "10.96.77.7")]), 2),
            compile_items(tmp, cluster_items(300, extra=[service("new", "ns2", "10.96.77.7")],
                                             endpoint_of={7: "10.250.0.7"}), 3)]


@pytest.fixture
def central():
    c = Central()
    yield c
    c.close()


def follower(central, clock, **kw):
    events = {"stale": []}
    woke = threading.Event()
    kw.setdefault("fallback", b"FALLBACK")
    src = StreamSource(central.url, stale_after=10.0, wait=0.3, clock=clock,
                       on_stale=events["stale"].append, **kw)
    served = {"gen": 0}
    src.bind(wake=woke.set, served_generation=lambda: served["gen"])
    return src, woke, events, served


def next_image(src, woke):
    """The next bytes poll() hands over, waiting on the source's wake-ups."""
    for _ in range(50):
        data = src.poll()
        if data is not None:
            return data
        assert woke.wait(WAIT), "the stream never woke the supervisor"
        woke.clear()
    raise AssertionError("no image came")


def test_full_then_deltas_then_not_modified(central, images):
    central.publish(images[0])
    clock = Clock()
    src, woke, _, _ = follower(central, clock)
    try:
        assert src.first() == images[0]
        assert src.stats["full"] == 1
        central.publish(images[1])
        assert next_image(src, woke) == images[1]
        central.publish(images[2])
        assert next_image(src, woke) == images[2]
        assert src.stats["delta"] == 2 and src.stats["full"] == 1
        full = len(zlib.compress(images[2], 6))
        assert src.stats["bytes_delta"] * 10 < full * 2, src.stats
        assert not src.stale and src.staleness_seconds() == 0.0
    finally:
        src.stop()


def test_a_node_several_generations_behind_gets_the_chain(central, images):
    central.publish(images[0])
    conn = http.client.HTTPConnection("127.0.0.1", int(central.url.split(":")[2].split("/")[0]))
    conn.request("GET", "/image")
    r = conn.getresponse()
    etag, body = r.getheader("ETag"), r.read()
    base = zlib.decompress(body)
    central.publish(images[1])
    central.publish(images[2])
    conn = http.client.HTTPConnection("127.0.0.1", conn.port)
    conn.request("GET", "/image?wait=0", headers={"If-None-Match": etag})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("X-Kdns-Transfer") == "delta"
    assert r.getheader("X-Kdns-Deltas") == "2"
    src = StreamSource(central.url, fallback=b"", stale_after=1, wait=0.1)
    src.image = base
    assert src._apply(r.read()) == images[2]
    # An unknown tag gets the full image; the current one a 304 after the wait.
    conn = http.client.HTTPConnection("127.0.0.1", conn.port)
    conn.request("GET", "/image?wait=0", headers={"If-None-Match": '"nope"'})
    r = conn.getresponse()
    assert r.getheader("X-Kdns-Transfer") == "full" and zlib.decompress(r.read()) == images[2]
    conn = http.client.HTTPConnection("127.0.0.1", conn.port)
    conn.request("GET", "/image?wait=0.05", headers={"If-None-Match": r.getheader("ETag")})
    r = conn.getresponse()
    assert r.status == 304


def test_a_bad_delta_is_dropped_and_the_next_transfer_is_full(central, images):
    src = StreamSource(central.url, fallback=b"", stale_after=1, wait=0.1)
    src.image, src.etag = images[0], '"x"'
    with pytest.raises(StreamError, match="does not apply"):
        src._apply(ST.PART.pack(5) + b"junk!")
    assert src.etag is None


def test_stale_falls_back_and_recovers_once_the_image_is_served(central, images):
    central.publish(images[0])
    clock = Clock()
    src, woke, events, served = follower(central, clock)
    try:
        assert src.first() == images[0]
        central.down = True
        assert src.poll() is None                 # within the bound: still the image
        clock.now += 11                          # past --stale-after with no answer
        assert src.poll() == b"FALLBACK"
        assert events["stale"] == [True] and src.stale
        assert src.poll() is None                 # published once
        assert src.staleness_seconds() >= 11
        central.publish(images[1])
        central.down = False
        back = next_image(src, woke)              # the stream answers: the image again
        assert back == images[1]
        src.published(7)
        assert src.stale and events["stale"] == [True]    # not until every worker serves it
        served["gen"] = 7
        src.poll()
        assert not src.stale and events["stale"] == [True, False]
    finally:
        src.stop()


def test_without_a_kube_dns_upstream_the_last_image_keeps_answering(central, images):
    central.publish(images[0])
    clock = Clock()
    src, woke, events, _ = follower(central, clock, forward_when_stale=False)
    try:
        assert src.first() == images[0]
        central.down = True
        clock.now += 11
        assert src.poll() is None and src.stale and events["stale"] == [True]
    finally:
        src.stop()


def test_no_central_at_start_serves_the_fallback(images):
    src = StreamSource("http://127.0.0.1:9/image", fallback=b"FB", stale_after=10, wait=0.1,
                       first_timeout=0.5)
    try:
        assert src.first() == b"FB" and src.stale
    finally:
        src.stop()
