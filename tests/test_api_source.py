"""The API source against a fake API server, through kdns's own connection.

Every test builds a kubeconfig pointing at ``tests/fakeapi.py`` on loopback, resolved by the
real ``kubernetes`` client's loaders (in this process, to keep the tests fast; the child
process that does it in kdns is tested in test_connection.py), so auth headers, URLs and the
HTTP layer are what kdns sends; faults come from the server side. Timings are shrunk (1 s
watches, 0.2 s backoff base) and every wait is bounded.
"""
from __future__ import annotations

import ast
import contextlib
import os
import pathlib
import re
import threading
import time

import pytest
import yaml

from fakeapi import ErrorEvent, FakeApiServer, Gone, HttpError, Reset, Slow, Stall
from kdns.kube import api as source
from kdns.kube import kubeconfig
from kdns.kube.connection import (ApiConnection, ConnectionConfigError, check_master_url,
                                  expand_env)

pytestmark = pytest.mark.timeout(20)

FAST = source.WatchSettings(page_size=5, watch_timeout=(1, 1), read_slack=0.5,
                            connect_timeout=1.0, list_read_timeout=2.0, backoff_base=0.2,
                            backoff_cap=1.0, retry_after_cap=5.0, min_stream_seconds=0.5)


class RecordingSink:
    """A reference implementation of the sink contract that records every call."""

    def __init__(self):
        self.cond = threading.Condition()
        self.calls: list[tuple] = []
        self.objects: dict[str, dict] = {}
        self.synced_kinds: list[str] = []
        self._seen: dict[str, set] = {}

    @staticmethod
    def _key(obj):
        meta = obj["metadata"]
        return meta.get("namespace", ""), meta["name"]

    def relist_begin(self, kind):
        with self.cond:
            self.calls.append(("begin", kind))
            self._seen[kind] = set()

    def apply(self, kind, obj):
        with self.cond:
            key = self._key(obj)
            self.calls.append(("apply", kind, key, obj["metadata"].get("resourceVersion")))
            assert obj["kind"] == kind and obj["apiVersion"]
            self.objects.setdefault(kind, {})[key] = obj
            if kind in self._seen:
                self._seen[kind].add(key)
            self.cond.notify_all()

    def delete(self, kind, namespace, name):
        with self.cond:
            self.calls.append(("delete", kind, (namespace, name)))
            self.objects.get(kind, {}).pop((namespace, name), None)
            self.cond.notify_all()

    def relist_end(self, kind):
        with self.cond:
            self.calls.append(("end", kind))
            seen = self._seen.pop(kind)
            for key in set(self.objects.get(kind, {})) - seen:
                del self.objects[kind][key]
            self.cond.notify_all()

    def synced(self, kind):
        with self.cond:
            self.calls.append(("synced", kind))
            self.synced_kinds.append(kind)
            self.cond.notify_all()

    def names(self, kind) -> set:
        with self.cond:
            return {name for _, name in self.objects.get(kind, {})}

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; calls: {self.calls[-20:]}"
                self.cond.wait(min(left, 0.05))


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def svc(name, ns="default", **spec):
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": "10.0.0.1", **spec}}


def write_kubeconfig(path: pathlib.Path, server: str, user: dict) -> str:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
           "clusters": [{"name": "fake", "cluster": {"server": server}}],
           "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
           "users": [{"name": "u", "user": user}]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def api():
    server = FakeApiServer(token="secret").start()
    try:
        yield server
    finally:
        server.close()


def api_connection(kubecfg_file: str = "", **kw) -> ApiConnection:
    """What ``connection.connect`` makes, with the flags resolved in this process."""
    resolve = lambda: kubeconfig.resolve(kubecfg_file=kubecfg_file, **kw)   # noqa: E731
    return ApiConnection(resolve(), resolve=resolve)


@pytest.fixture
def client(api, tmp_path):
    c = api_connection(write_kubeconfig(tmp_path / "kubeconfig", api.url, {"token": "secret"}))
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def running(client, sink, *, pods=False, settings=FAST):
    src = source.ApiSource(connection=client, sink=sink, pods=pods, settings=settings)
    src.start()
    try:
        yield src
    finally:
        src.stop(timeout=3)
        assert not src.alive, "watcher threads did not stop"


@contextlib.contextmanager
def watching(client, sink, resource=source.SERVICES, settings=FAST, fallback=None):
    """One watcher in a thread, stopped and joined on exit."""
    stop = threading.Event()
    w = source.ResourceWatcher(connection=client, resource=resource, sink=sink, stop=stop,
                               settings=settings, fallback=fallback)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        yield w
    finally:
        stop.set()
        w.interrupt()
        t.join(3)
        assert not t.is_alive(), "watcher thread did not stop"


def applied_versions(sink, name):
    return [int(c[3]) for c in sink.calls if c[0] == "apply" and c[2][1] == name]


# ---- the fake speaks the protocol the official client expects ------------------------------

def test_fake_api_serves_the_official_clients_typed_list_and_watch(api):
    from kubernetes import client as k8s, watch

    client = k8s.ApiClient(k8s.Configuration(host=api.url,
                                             api_key={"BearerToken": "Bearer secret"}))
    api.create_many("services", [svc(f"s{i}") for i in range(3)])
    api.create("endpointslices", {"metadata": {"namespace": "default", "name": "s0-x"},
                                  "addressType": "IPv4", "endpoints": [
                                      {"addresses": ["10.1.0.1"], "conditions": {"ready": True}}]})
    core = k8s.CoreV1Api(client)
    page = core.list_service_for_all_namespaces(limit=2)
    assert [s.metadata.name for s in page.items] == ["s0", "s1"]
    rest = core.list_service_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["s2"] and not rest.metadata._continue
    assert rest.metadata.resource_version == page.metadata.resource_version
    slices = k8s.DiscoveryV1Api(client).list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.1.0.1"]
    since = page.metadata.resource_version
    api.delete("services", "default", "s1")
    events = list(watch.Watch().stream(core.list_service_for_all_namespaces,
                                       resource_version=since, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "s1")]


# ---- listing ----------------------------------------------------------------------------------

def test_initial_paginated_list_is_delivered_completely_in_one_relist(api, client):
    api.create_many("services", [svc(f"s{i:02}") for i in range(23)])
    sink = RecordingSink()
    with running(client, sink):
        sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
        assert sink.names("Service") == {f"s{i:02}" for i in range(23)}
        # One begin/end pair around all five pages; synced only after the end.
        svc_calls = [c for c in sink.calls if c[1] == "Service"]
        assert svc_calls[0] == ("begin", "Service")
        assert svc_calls[-2:] == [("end", "Service"), ("synced", "Service")]
    lists = api.calls(verb="list", resource="services")
    assert [r.query.get("limit") for r in lists] == ["5"] * 5
    assert "continue" not in lists[0].query and all("continue" in r.query for r in lists[1:])


def test_changes_during_a_slow_paginated_list_arrive_through_the_watch(api, client):
    api.create_many("services", [svc(f"s{i:02}") for i in range(12)])
    api.inject("services", "list", Slow(0.3), times=3)
    sink = RecordingSink()
    with running(client, sink):
        wait_until(lambda: api.count(verb="list", resource="services") >= 2, what="page 2")
        api.create("services", svc("late"))
        api.delete("services", "default", "s00")
        sink.wait_for(lambda: "late" in sink.names("Service")
                      and "s00" not in sink.names("Service"), what="late changes")
    # The pages were a snapshot: "late" was not in them, and the list was not restarted.
    assert api.count(verb="list", resource="services") == 3
    watch = api.calls(verb="watch", resource="services")[0]
    assert int(watch.query["resourceVersion"]) < api.resource_version - 1


def test_expired_continue_token_restarts_the_list_from_scratch(api, client):
    api.create_many("services", [svc(f"s{i:02}") for i in range(12)])
    api.inject("services", "list", Slow(0.5))
    api.inject("services", "list", Slow(0.5))     # page 2 of the first list, held back
    sink = RecordingSink()
    with watching(client, sink) as w:
        wait_until(lambda: api.count(verb="list", resource="services") >= 2, what="page 2")
        with api.atomically():
            api.delete("services", "default", "s05")
            api.compact()                          # page 2's snapshot is gone: 410
        sink.wait_for(lambda: w.synced, timeout=6)
        assert sink.names("Service") == {f"s{i:02}" for i in range(12)} - {"s05"}
    statuses = [r.status for r in api.calls(verb="list", resource="services")]
    assert statuses[:2] == [200, 410] and len(statuses) == 2 + 3
    # The half-done relist was begun again, never ended with half the objects.
    assert [c for c in sink.calls if c[0] in ("begin", "end")] == [
        ("begin", "Service"), ("begin", "Service"), ("end", "Service")]


# ---- what the API server pays: the watch cache and WatchList --------------------------------

@contextlib.contextmanager
def fake_api(tmp_path, **kw):
    """A fake API server of its own (WatchList modes) and a client for it."""
    server = FakeApiServer(token="secret", **kw).start()
    c = api_connection(write_kubeconfig(tmp_path / "kubeconfig", server.url, {"token": "secret"}))
    try:
        yield server, c
    finally:
        c.close()
        server.close()


def test_lists_are_served_from_the_watch_cache_not_etcd(api, client):
    api.create_many("services", [svc(f"s{i:02}") for i in range(12)])
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
        wait_until(lambda: api.count(verb="watch", resource="services") >= 1, what="watching")
        seen = w.resource_version
        api.inject("services", "watch", Gone())     # the next watch (1 s from now): 410
        wait_until(lambda: api.count(verb="list", resource="services") >= 6, what="the relist")
    lists = api.calls(verb="list", resource="services")
    firsts = [r.query for r in lists if "continue" not in r.query]
    # resourceVersion=0: whatever the cache holds (a quorum read is resourceVersion unset);
    # a relist: the cache, never older than what this watcher already saw.
    assert firsts[0]["resourceVersion"] == "0"
    assert firsts[1]["resourceVersion"] == seen and int(seen) > 1
    assert all(q["resourceVersionMatch"] == "NotOlderThan" for q in firsts)
    # Continue pages carry no resourceVersion: the API rejects the pair with 400.
    assert all("resourceVersion" not in r.query for r in lists if "continue" in r.query)
    assert all(r.status == 200 for r in lists)


def test_a_server_behind_what_was_seen_is_listed_as_it_is(api, client):
    api.create_many("services", [svc("a"), svc("b")])
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
        wait_until(lambda: api.count(verb="watch", resource="services") >= 1, what="watching")
        seen = w.resource_version
        api.inject("services", "list", HttpError(504, message=(
            f"Too large resource version: {seen}, current: 2")))
        api.inject("services", "watch", Gone())
        wait_until(lambda: api.count(verb="list", resource="services") >= 3, what="relisted")
        sink.wait_for(lambda: sink.calls[-1] == ("end", "Service"), what="the relist's end")
    versions = [r.query.get("resourceVersion") for r in api.calls(verb="list",
                                                                  resource="services")]
    assert versions[:3] == ["0", seen, "0"]


def test_watch_list_streams_the_initial_state_without_a_list(tmp_path):
    with fake_api(tmp_path, watch_list="on") as (api, client):
        api.create_many("services", [svc(f"s{i:02}") for i in range(23)])
        sink = RecordingSink()
        with watching(client, sink) as w:
            sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
            assert sink.names("Service") == {f"s{i:02}" for i in range(23)}
            synced_at = w.resource_version
            wait_until(lambda: api.count(verb="watch", resource="services") >= 1,
                       what="watching after the initial events")
            api.create("services", svc("late"))
            sink.wait_for(lambda: "late" in sink.names("Service"), what="late service")
        assert api.count(verb="list", resource="services") == 0
        stream, = api.calls(verb="watchlist", resource="services")
        assert {k: stream.query.get(k) for k in ("sendInitialEvents", "resourceVersionMatch",
                                                  "allowWatchBookmarks", "resourceVersion")} == {
            "sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan",
            "allowWatchBookmarks": "true", "resourceVersion": ""}
        # The watch resumes at the initial-events-end bookmark's version.
        assert api.calls(verb="watch", resource="services")[0].query["resourceVersion"] == \
            synced_at
        calls = [c for c in sink.calls if c[1] == "Service"]
        assert calls[0] == ("begin", "Service")
        assert calls[24:26] == [("end", "Service"), ("synced", "Service")]


def test_watch_list_relist_drops_what_was_deleted_meanwhile(tmp_path):
    with fake_api(tmp_path, watch_list="on") as (api, client):
        api.create_many("services", [svc("keep"), svc("gone")])
        sink = RecordingSink()
        with watching(client, sink):
            sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
            wait_until(lambda: api.count(verb="watch", resource="services") >= 1,
                       what="watching")
            # The delete happens in an outage and is lost to a compacted history: only the
            # relist can settle it.
            api.set_down(True)
            api.delete("services", "default", "gone")
            api.compact()
            api.set_down(False)
            sink.wait_for(lambda: sink.names("Service") == {"keep"}, what="gone removed")
        assert api.count(verb="watchlist", resource="services") == 2
        assert api.count(verb="list", resource="services") == 0


def test_a_server_without_watch_list_is_listed_and_not_asked_again(api, client):
    api.create_many("services", [svc("a")])
    sink = RecordingSink()
    with watching(client, sink):
        sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
        wait_until(lambda: api.count(verb="watch", resource="services") >= 1, what="watching")
        api.inject("services", "watch", Gone())
        api.create("services", svc("b"))
        wait_until(lambda: api.count(verb="list", resource="services") >= 2, what="relisted")
        sink.wait_for(lambda: "b" in sink.names("Service"), what="b")
    refused, = api.calls(verb="watchlist", resource="services")
    assert refused.status == 422


def test_a_server_that_ignores_send_initial_events_is_listed(tmp_path):
    with fake_api(tmp_path, watch_list="ignore", bookmark_interval=0.1) as (api, client):
        api.create_many("services", [svc("a"), svc("b")])
        sink = RecordingSink()
        with watching(client, sink):
            sink.wait_for(lambda: "Service" in sink.synced_kinds, what="services synced")
            assert sink.names("Service") == {"a", "b"}
        # Its plain bookmark (no initial-events-end) gave it away: listed, not asked again.
        assert api.count(verb="watchlist", resource="services") == 1
        assert api.count(verb="list", resource="services") == 1


# ---- watching ---------------------------------------------------------------------------------

def test_add_modify_delete_are_seen_through_the_watch(api, client):
    api.create("services", svc("a"))
    sink = RecordingSink()
    with running(client, sink):
        sink.wait_for(lambda: "Service" in sink.synced_kinds)
        api.create("services", svc("b"))
        api.update("services", svc("a", clusterIP="None"))
        api.delete("services", "default", "b")
        sink.wait_for(lambda: ("delete", "Service", ("default", "b")) in sink.calls)
        assert sink.objects["Service"][("default", "a")]["spec"]["clusterIP"] == "None"
        assert sink.names("Service") == {"a"}
    assert api.count(verb="list", resource="services") == 1


def test_bookmark_advances_the_resume_version(api, client):
    api.create("services", svc("a"))
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        listed = int(w.resource_version)
        # Other kinds move the global version; only a bookmark tells the service watch.
        for i in range(3):
            api.create("namespaces", {"metadata": {"name": f"ns{i}"}})
        target = api.resource_version
        api.bookmark_interval = 0.3     # the API server sends bookmarks periodically
        wait_until(lambda: w.resource_version == str(target), what="bookmark applied")
        wait_until(lambda: any(r.query["resourceVersion"] == str(target)
                               for r in api.calls(verb="watch", resource="services")),
                   what="a watch resumed from the bookmark")
    assert listed < target
    assert api.calls(verb="watch", resource="services")[0].query["allowWatchBookmarks"] == "true"
    assert not [c for c in sink.calls if c[0] == "apply" and c[3] and int(c[3]) > listed]


def test_connection_reset_mid_stream_resumes_from_the_last_version(api, client):
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        api.inject("services", "watch", Reset(after_events=2))
        wait_until(lambda: api.count(verb="watch", resource="services") >= 2,
                   what="a watch carrying the fault")   # the next stream takes the fault
        for i in range(5):
            api.create("services", svc(f"n{i}"))
        sink.wait_for(lambda: sink.names("Service") == {f"n{i}" for i in range(5)})
        watches = api.calls(verb="watch", resource="services")
    assert api.count(verb="list", resource="services") == 1, "a reset must not cause a relist"
    resumed = [int(r.query["resourceVersion"]) for r in watches]
    assert resumed == sorted(resumed)
    # Each object applied exactly once, in version order: nothing lost, nothing replayed.
    for i in range(5):
        assert len(applied_versions(sink, f"n{i}")) == 1


def test_compacted_history_after_disconnect_relists_and_applies_deletions(api, client):
    api.create_many("services", [svc("a"), svc("b"), svc("c")])
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        wait_until(lambda: api.count(verb="watch", resource="services") >= 1)
        with api.atomically():           # the stream cannot see any of this
            api.delete("services", "default", "b")
            api.update("services", svc("a", clusterIP="10.0.0.9"))
            api.create("services", svc("d"))
            api.compact()
            api.drop_connections()
        sink.wait_for(lambda: sink.names("Service") == {"a", "c", "d"}, what="converged")
        assert sink.objects["Service"][("default", "a")]["spec"]["clusterIP"] == "10.0.0.9"
        assert w.relists == 2
    assert ("delete", "Service", ("default", "b")) not in sink.calls, \
        "the deletion can only have come from the relist"
    assert api.count(verb="list", resource="services") == 2


def test_gone_error_event_mid_stream_relists_and_applies_deletions(api, client):
    api.create_many("services", [svc("a"), svc("b"), svc("c")])
    api.inject("services", "watch", Gone(after_events=1))
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        wait_until(lambda: api.count(verb="watch", resource="services") >= 1)
        with api.atomically():
            api.update("services", svc("a", clusterIP="10.0.0.9"))
            api.delete("services", "default", "b")
            api.delete("services", "default", "c")
            api.create("services", svc("d"))
        sink.wait_for(lambda: sink.names("Service") == {"a", "d"} and w.relists == 2,
                      what="relisted")
    assert not [c for c in sink.calls if c[0] == "delete"], "deletions came from the relist"
    ends = [i for i, c in enumerate(sink.calls) if c == ("end", "Service")]
    assert len(ends) == 2


def test_an_object_the_sink_rejects_does_not_stall_the_stream(api, client):
    class PickySink(RecordingSink):
        def apply(self, kind, obj):
            if obj["metadata"]["name"] == "bad":
                raise ValueError("spec.ports[0].port: not an integer")
            super().apply(kind, obj)

    api.create_many("services", [svc("bad"), svc("good")])
    sink = PickySink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        api.update("services", svc("bad", clusterIP="10.0.0.2"))
        api.create("services", svc("later"))
        sink.wait_for(lambda: "later" in sink.names("Service"))
    assert sink.names("Service") == {"good", "later"}
    assert w.rejected == 2 and w.relists == 1


@pytest.mark.parametrize("status, expected", [
    ({"code": 410, "reason": "Expired", "message": "too old resource version: 1 (9)"},
     source.Gone),
    ({"code": 410, "reason": "Gone"}, source.Gone),
    ({"code": 500, "message": "etcdserver: mvcc: required revision has been compacted"},
     source.Gone),
    ({"code": 500, "reason": "InternalError", "message": "etcd leader changed"},
     source.ApiError),
])
def test_watch_error_events_that_mean_relist(api, client, status, expected):
    """An ERROR event that means "your version is gone" (410, or the 500 old API servers send
    for a compacted etcd revision) relists before watching again; any other resumes the
    watch from the version it had, without a list."""
    api.create_many("services", [svc("a")])
    api.inject("services", "watch", ErrorEvent(status))
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        # The watcher's next request after the error: a relist comes before its next watch.
        wait_until(lambda: api.count(verb="watch", resource="services") >= 2)
        lists = api.count(verb="list", resource="services")
    assert lists == (2 if expected is source.Gone else 1)
    assert sink.names("Service") == {"a"}


# ---- errors and backoff -----------------------------------------------------------------------

def test_http_500_on_list_backs_off_with_growing_delays(api, client):
    api.inject("services", "list", HttpError(500), times=3)
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced, timeout=6)
    t = [r.at for r in api.calls(verb="list", resource="services")]
    assert len(t) == 4, "three failures, one success, no extra requests"
    gaps = [b - a for a, b in zip(t, t[1:])]
    # Delays are drawn from [d/2, d] with d = 0.2, 0.4, 0.8: each at least its floor.
    for gap, floor in zip(gaps, (0.1, 0.2, 0.4)):
        assert gap >= floor
    assert sum(gaps) < 0.2 + 0.4 + 0.8 + 1.0


def test_errors_on_watch_resume_without_relisting(api, client):
    api.create("services", svc("a"))
    api.inject("services", "watch", HttpError(500), times=2)
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        api.create("services", svc("b"))
        sink.wait_for(lambda: "b" in sink.names("Service"))
    assert api.count(verb="list", resource="services") == 1
    watches = api.calls(verb="watch", resource="services")
    assert [r.status for r in watches[:3]] == [500, 500, 200]
    assert len({r.query["resourceVersion"] for r in watches[:3]}) == 1


def test_429_retry_after_is_honoured(api, client):
    api.inject("services", "watch", HttpError(429, retry_after=1), times=2)
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        wait_until(lambda: api.count(verb="watch", resource="services") >= 3, timeout=5)
    t = [r.at for r in api.calls(verb="watch", resource="services")]
    # Backoff alone would wait 0.1-0.4 s; the server asked for 1 s, twice.
    assert t[1] - t[0] >= 0.95 and t[2] - t[1] >= 0.95


def test_every_list_failing_never_spins(api, client):
    api.inject("services", "list", HttpError(503), times=100)
    stop = threading.Event()
    w = source.ResourceWatcher(connection=client, resource=source.SERVICES,
                               sink=RecordingSink(), stop=stop, settings=FAST)
    started = time.monotonic()
    w.run(iterations=4)                 # the iteration hook bounds the forever loop
    elapsed = time.monotonic() - started
    assert api.count(verb="list", resource="services") == 4
    assert elapsed >= 0.1 + 0.2 + 0.4 + 0.5 and not w.synced
    assert "503" in w.last_error


def test_stalled_stream_is_detected_by_read_timeout(api, client):
    sink = RecordingSink()
    api.inject("services", "watch", Stall(seconds=15))
    # Silent for timeoutSeconds + read_slack: declared dead, then a backoff, then a resumed
    # watch that connects and delivers: the longest the catch-up may take.
    catch_up = (FAST.watch_timeout[1] + FAST.read_slack + FAST.backoff_cap
                + FAST.connect_timeout + FAST.list_read_timeout)
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced)
        api.create("services", svc("after-stall"))
        sink.wait_for(lambda: "after-stall" in sink.names("Service"), timeout=catch_up)
    # Not given up early: the resumed watch came only after the stalled one's read timeout
    # (as the API saw the requests; the client's timer started a little before the first).
    t = [r.at for r in api.calls(verb="watch", resource="services")]
    assert len(t) >= 2 and t[1] - t[0] >= FAST.watch_timeout[0] + FAST.read_slack - 0.1, t
    assert api.count(verb="list", resource="services") == 1


def test_list_that_outlives_the_read_timeout_is_retried(api, client):
    api.create("services", svc("a"))
    api.inject("services", "list", Stall(seconds=15))
    sink = RecordingSink()
    with watching(client, sink) as w:
        sink.wait_for(lambda: w.synced, timeout=6)
        assert sink.names("Service") == {"a"}
    assert api.count(verb="list", resource="services") == 2


def test_unauthorized_then_rotated_token_file_recovers(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    c = api_connection(write_kubeconfig(tmp_path / "kubeconfig", api.url,
                                        {"tokenFile": str(token)}))
    sink = RecordingSink()
    try:
        with watching(c, sink) as w:
            sink.wait_for(lambda: w.synced)
            # The API stops accepting the old token before the new one reaches the file.
            api.token = "rotated"
            api.drop_connections()
            wait_until(lambda: any(r.status == 401 for r in api.requests), what="a 401")
            # The kubelet swaps the projected token file atomically.
            (tmp_path / "token.new").write_text("rotated\n")
            os.replace(tmp_path / "token.new", token)
            api.create("services", svc("after-rotation"))
            sink.wait_for(lambda: "after-rotation" in sink.names("Service"))
    finally:
        c.close()
    assert api.requests[-1].authorization == "Bearer rotated"
    # Rejected requests were backed off, not hammered.
    assert 1 <= sum(r.status == 401 for r in api.requests) <= 3
    assert api.count(verb="list", resource="services") == 1


# ---- which resources --------------------------------------------------------------------------

@pytest.mark.parametrize("refusal", ["forbidden", "not_served"])
def test_endpointslices_refused_falls_back_to_v1_endpoints(api, client, refusal):
    getattr(api, refusal).add("endpointslices")
    api.create("endpoints", {"metadata": {"namespace": "default", "name": "web"},
                             "subsets": [{"addresses": [{"ip": "10.1.0.1"}]}]})
    sink = RecordingSink()
    with running(client, sink) as src:
        sink.wait_for(lambda: src.synced)
        assert sorted(sink.synced_kinds) == ["Endpoints", "Namespace", "Service"]
        assert sink.names("Endpoints") == {"web"}
        api.create("endpoints", {"metadata": {"namespace": "default", "name": "api"}})
        sink.wait_for(lambda: "api" in sink.names("Endpoints"))
    assert api.count(resource="endpointslices") == 1, "no retrying a refused resource"


def test_endpointslices_used_when_readable(api, client):
    api.create("endpointslices", {"metadata": {"namespace": "default", "name": "web-abc"},
                                  "addressType": "IPv4", "endpoints": []})
    sink = RecordingSink()
    with running(client, sink) as src:
        sink.wait_for(lambda: src.synced)
        assert sink.names("EndpointSlice") == {"web-abc"}
    assert api.count(resource="endpoints") == 0


@pytest.mark.parametrize("pods", [False, True])
def test_pods_are_watched_only_when_requested(api, client, pods):
    api.create("pods", {"metadata": {"namespace": "default", "name": "p"},
                        "status": {"podIP": "10.1.0.7"}})
    sink = RecordingSink()
    with running(client, sink, pods=pods) as src:
        sink.wait_for(lambda: src.synced)
        assert ("Pod" in sink.synced_kinds) is pods
        assert (sink.names("Pod") == {"p"}) is pods
    assert (api.count(resource="pods") > 0) is pods


def test_stop_is_prompt_during_a_long_watch(api, client):
    slow = source.WatchSettings(watch_timeout=(300, 300))
    src = source.ApiSource(connection=client, sink=RecordingSink(), settings=slow)
    src.start()
    try:
        wait_until(lambda: api.count(verb="watch") >= 3, what="all watches open")
    finally:
        src.stop(timeout=3)
    # Each watch would run 300 s: every thread ending within stop's timeout means stop
    # interrupted them rather than waiting them out.
    assert not src.alive


# ---- connection flags -------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["10.0.0.1:6443", "https://", "ftp://h", "//host:1"])
def test_master_url_needs_scheme_and_host(url):
    with pytest.raises(ConnectionConfigError, match="needs a scheme and a host"):
        check_master_url(url)


def test_flags_are_env_expanded_and_master_url_overrides_kubeconfig(tmp_path):
    env = {"API_HOST": "127.0.0.1", "DIR": str(tmp_path)}
    write_kubeconfig(tmp_path / "kc", "http://127.0.0.2:1", {"token": "x"})
    info = kubeconfig.resolve(kubecfg_file="${DIR}/kc", kube_master_url="http://$API_HOST:8080",
                              environ=env)
    assert info.server == "http://127.0.0.1:8080"
    assert info.authorization == "Bearer x" and info.token_file is None
    assert expand_env("$UNSET-${UNSET}x", {}) == "-x"


def test_master_url_alone_means_no_credentials():
    info = kubeconfig.resolve(kube_master_url="http://127.0.0.1:8080", environ={})
    assert info.server == "http://127.0.0.1:8080"
    assert info.authorization is None and info.token_file is None and info.ca_pem is None


def test_in_cluster_config_names_the_service_account_files(tmp_path):
    (tmp_path / "token").write_text("first")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    info = kubeconfig.resolve(environ=env, service_account_dir=str(tmp_path))
    assert info.server == "https://10.96.0.1:443"
    assert info.ca_pem == "-----BEGIN CERTIFICATE-----\n" and info.verify
    # Followed by the connection, which re-reads it when it changes (test_connection.py).
    assert info.token_file == str(tmp_path / "token")
    with pytest.raises(ConnectionConfigError, match="not running inside a cluster"):
        kubeconfig.resolve(environ={}, service_account_dir=str(tmp_path))


@pytest.mark.parametrize("user, followed", [
    ({"tokenFile": "tok"}, True),
    ({"tokenFile": "tok", "token": "inline"}, False),     # an inline token wins (client-go)
])
def test_a_kubeconfig_token_file_is_followed_unless_a_token_wins(tmp_path, user, followed):
    (tmp_path / "tok").write_text("from-file")
    info = kubeconfig.resolve(kubecfg_file=write_kubeconfig(tmp_path / "kc", "http://h:1", user))
    assert info.token_file == (str(tmp_path / "tok") if followed else None)
    assert info.authorization == ("Bearer from-file" if followed else "Bearer inline")


def test_an_oidc_id_token_says_when_it_expires(tmp_path):
    import base64
    import json

    def b64(doc):
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    claims = {"exp": 1893456000, "sub": "kdns"}
    while len(b64(claims)) % 4 == 1:          # a length no base64 text has, as the loader checks
        claims["sub"] += "x"
    jwt = f"{b64({'alg': 'none'})}.{b64(claims)}.c2ln"
    user = {"auth-provider": {"name": "oidc", "config": {
        "id-token": jwt, "client-id": "kdns", "idp-issuer-url": "https://idp.invalid"}}}
    info = kubeconfig.resolve(kubecfg_file=write_kubeconfig(tmp_path / "kc", "http://h:1", user))
    assert info.authorization == f"Bearer {jwt}"
    assert info.expires_at == 1893456000.0      # the connection resolves it again before then


def test_missing_kubeconfig_is_a_clear_error(tmp_path):
    with pytest.raises(ConnectionConfigError, match="no such file"):
        kubeconfig.resolve(kubecfg_file=str(tmp_path / "nope"))


def test_sources_never_import_the_compiler_or_dns_layers():
    path = pathlib.Path(source.__file__)
    for name in ("api.py", "kubeconfig.py", "connection.py", "configmap.py"):
        tree = ast.parse((path.parent / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        kdns_modules = {m for m in imported if m and m.startswith("kdns")}
        assert kdns_modules <= {"kdns.kube", "kdns.kube.connection"}, kdns_modules
        if name != "kubeconfig.py":         # the child's module, run as its own process
            assert not {m for m in imported if m and m.split(".")[0] == "kubernetes"}, name


def _role_grants(text: str) -> set:
    role = next(d for d in yaml.safe_load_all(text) if d["kind"] == "ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert rule["verbs"] == ["list", "watch"], rule
        granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    return granted


def _source_reads(*, pods: bool) -> set:
    src = source.ApiSource(connection=None, sink=RecordingSink(), pods=pods)
    return {(res.api_version.rpartition("/")[0], res.plural)
            for w in src.watchers for res in (w.resource, w.fallback) if res}


def test_rbac_grants_exactly_what_the_source_reads():
    text = (pathlib.Path(__file__).resolve().parent.parent / "deploy" / "rbac.yaml").read_text()
    assert _role_grants(text) == _source_reads(pods=False)
    # The commented-out pods rule, once uncommented as its comment says, is what
    # --pods verified needs.
    uncommented = re.sub(r'(?m)^# (- apiGroups: \[""\]\n)# (  resources: \["pods"\]\n)# ',
                         r"\1\2", text)
    assert uncommented != text
    assert _role_grants(uncommented) == _source_reads(pods=True)
    docs = list(yaml.safe_load_all(text))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube-dns",
                                    "namespace": "kube-system"}]


def test_watch_settings_from_text_overrides_named_fields_and_rejects_unknown_ones():
    assert source.WatchSettings.from_text(None) == source.WatchSettings()
    got = source.WatchSettings.from_text('{"backoff_cap": 1.5, "watch_timeout": [2, 3]}')
    assert got == source.WatchSettings(backoff_cap=1.5, watch_timeout=(2, 3))
    for bad in ('{"backof_cap": 1}', "[1]", "not json"):
        with pytest.raises(ValueError, match="KDNS_WATCH_SETTINGS"):
            source.WatchSettings.from_text(bad)
