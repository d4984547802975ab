"""The controller: API events -> model -> image -> workers, checked by DNS over UDP.

Two layers: the controller alone (relist semantics, coalescing, latency, synced) with a
recording compiler, and a real ``kdns serve`` (supervisor + a worker) reading
``tests/fakeapi.py`` through a generated kubeconfig (resolved by the real ``kubernetes`` client), with
every change checked by querying the server. Every wait is bounded.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from fakeapi import FakeApiServer, Gone, Slow
from kdns.serve import controller as C
from kdns.kube import records
from kdns.serve import build
from serverutil import Kdns, a_records, rcode_text
from test_api_source import api_connection, write_kubeconfig

pytestmark = pytest.mark.timeout(90)

ZONE = "cluster.local"
K = f"kubernetes.default.svc.{ZONE}"


# --------------------------------------------------------------------------- objects


def svc(name, ns="default", ip="10.96.0.1"):
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def eps(name, service, ips, ns="default"):
    return {"metadata": {"namespace": ns, "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}


def nsobj(name):
    return {"metadata": {"name": name}}


def pod(name, ip, ns="default"):
    return {"metadata": {"namespace": ns, "name": name},
            "status": {"phase": "Running", "podIP": ip}}


def base_objects(api):
    api.create("namespaces", nsobj("default"))
    api.create("services", svc("kubernetes", ip="10.96.0.1"))


# --------------------------------------------------------------------------- the controller alone


class RecordingCompiler:
    """Counts compiles and remembers what each one saw; compiles the real image."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[bool, set, set]] = []
        self.delay = delay

    def compile(self, model, *, synced, changed):
        time.sleep(self.delay)
        self.calls.append((synced, {s.name for s in model.services()}, set(changed)))
        return build.compile_model(model, synced=synced)


def wait_until(predicate, timeout=5.0, what="condition", step=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


class FakeClock:
    """The controller's injected clock: time moves only when a test says so, so debounce
    decisions do not depend on how fast this machine runs the test."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def full_steps(ctl):
    """Wait until the compiler thread has finished two more passes than now: whatever it
    took in before this call has then been applied and judged (compile or not)."""
    start = ctl.steps
    ctl.inbox.nudge()
    # An idle pass waits at most 0.5 s (Controller._timeout); nudged, it returns at once.
    wait_until(lambda: ctl.steps >= start + 2 or ctl.inbox.nudge(), timeout=5.0,
               what="two compiler-thread passes")


def compiled(ctl):
    """Every change taken in is compiled and the image waits for the supervisor's poll."""
    return not ctl.changes_pending and ctl.image_waiting


class FakeSupervisor:
    """The supervisor's side of the hand-off: publishes on wake, workers switch at once."""

    def __init__(self, ctl: C.Controller):
        self.ctl, self.generation, self.served, self.images = ctl, 0, 0, []
        self.event = threading.Event()
        ctl.bind(wake=self.event.set, served_generation=lambda: self.served)

    def pump(self):
        image = self.ctl.poll()
        if image is None:
            return False
        self.generation += 1
        self.images.append(image)
        self.ctl.published(self.generation)
        self.served = self.generation
        return True


@pytest.fixture
def ctl():
    comp = RecordingCompiler()
    c = C.Controller(compiler=comp, needed=2)
    c.first()
    try:
        yield c
    finally:
        c.stop()


def listed(sink, kind, objs):
    sink.relist_begin(kind)
    for o in objs:
        sink.apply(kind, {**o, "kind": kind})
    sink.relist_end(kind)


def test_nothing_compiled_as_synced_until_every_watcher_listed():
    clock = FakeClock()
    ctl = C.Controller(compiler=RecordingCompiler(), needed=2, clock=clock)
    ctl.first()
    try:
        nothing_compiled_until_synced(ctl, clock)
    finally:
        ctl.stop()


def nothing_compiled_until_synced(ctl, clock):
    sink = ctl.sink
    listed(sink, "Service", [svc("a")])
    sink.synced("Service")
    # The clock moves only once the change is taken in (it is stamped when applied), then
    # past every debounce delay, and the thread judges it again: synced, it would compile.
    full_steps(ctl)
    assert ctl.changes_pending
    clock.advance(ctl.debounce.max_delay)
    full_steps(ctl)
    assert ctl.compiles == 0 and ctl.poll() is None and ctl.ready_generation == 0
    listed(sink, "Namespace", [nsobj("default")])
    sink.synced("Namespace")
    wait_until(lambda: ctl.synced, what="both synced")
    full_steps(ctl)             # the pass that took it in is over: its stamps are made
    clock.advance(ctl.debounce.max_delay)
    wait_until(lambda: ctl.compiles == 1, what="the first synced compile")
    sup = FakeSupervisor(ctl)
    sup.pump()
    assert ctl.ready_generation == 1
    assert ctl.compiler.calls[-1][:2] == (True, {"a"})


def test_what_the_first_sync_built_leaves_the_collector_once_it_is_served(monkeypatch):
    """The server's controller freezes (gc.freeze) once, when the first synced image is
    published: before it nothing, and later images do not freeze again."""
    freezes = []
    monkeypatch.setattr(C.gc, "freeze", lambda: freezes.append(1))
    clock = FakeClock()
    ctl = C.Controller(compiler=RecordingCompiler(), needed=2, clock=clock)
    ctl.freeze_after_sync = True
    ctl.first()
    try:
        nothing_compiled_until_synced(ctl, clock)      # ends with the first image published
        assert freezes == [1]
        listed(ctl.sink, "Service", [svc("a"), svc("b")])
        full_steps(ctl)
        clock.advance(ctl.debounce.max_delay)
        wait_until(lambda: ctl.compiles == 2, what="a compile after the sync")
        FakeSupervisor(ctl).pump()
        assert ctl.compiler.calls[-1][1] == {"a", "b"} and freezes == [1]
    finally:
        ctl.stop()


def test_a_controller_embedded_in_another_process_never_freezes(monkeypatch):
    freezes = []
    monkeypatch.setattr(C.gc, "freeze", lambda: freezes.append(1))
    clock = FakeClock()
    ctl = C.Controller(compiler=RecordingCompiler(), needed=2, clock=clock)
    ctl.first()
    try:
        nothing_compiled_until_synced(ctl, clock)
        assert freezes == []
    finally:
        ctl.stop()


def test_relist_deletes_what_it_did_not_see_and_a_restarted_list_is_authoritative(ctl):
    sink = ctl.sink
    listed(sink, "Service", [svc("a"), svc("b"), svc("c")])
    sink.synced("Service")
    sink.synced("Namespace")
    wait_until(lambda: ctl.compiles == 1)
    # A relist that no longer sees b (deleted while disconnected): b goes, a and c stay.
    listed(sink, "Service", [svc("a"), svc("c")])
    wait_until(lambda: ctl.compiles == 2)
    assert ctl.compiler.calls[-1][1] == {"a", "c"}
    assert ("Service", "default", "b") in ctl.compiler.calls[-1][2]
    # A list that failed half-way (begin, d, begin again) and then completed without d.
    sink.relist_begin("Service")
    sink.apply("Service", {**svc("d"), "kind": "Service"})
    listed(sink, "Service", [svc("a")])
    wait_until(lambda: ctl.compiler.calls[-1][1] == {"a"}, what="the restarted list to win")


def test_a_burst_is_coalesced_and_a_single_change_is_quick():
    clock = FakeClock()
    comp = RecordingCompiler(delay=0.02)
    ctl = C.Controller(compiler=comp, needed=1, clock=clock)
    ctl.first()
    try:
        burst_then_one(ctl, clock)
    finally:
        ctl.stop()


def burst_then_one(ctl, clock):
    debounce = ctl.debounce
    due = max(debounce.settle, debounce.quiet)      # a lone change waits this long, no more
    sup = FakeSupervisor(ctl)
    ctl.sink.synced("Service")
    wait_until(lambda: ctl.synced, what="synced")      # taken in, then time moves
    full_steps(ctl)
    clock.advance(due)
    wait_until(lambda: ctl.compiles == 1)
    sup.pump()
    # 300 changes inside one debounce window (the clock stands still): one compile.
    for i in range(300):
        ctl.sink.apply("EndpointSlice", {**eps(f"s{i}", "web", [f"10.1.{i // 250}.{i % 250 + 1}"]),
                                         "kind": "EndpointSlice"})
    wait_until(lambda: ctl.status()["objects"]["EndpointSlice"] == 300, what="the burst taken in")
    full_steps(ctl)
    clock.advance(due)
    wait_until(lambda: compiled(ctl), what="the burst compiled")
    burst = ctl.compiles - 1
    assert burst == 1, f"{burst} compiles for a burst of 300 changes"
    sup.pump()
    # One change: not compiled before the debounce delay, compiled as soon as it has passed.
    before = ctl.compiles
    ctl.sink.apply("Service", {**svc("one"), "kind": "Service"})
    wait_until(lambda: ctl.status()["objects"]["Service"] == 1, what="the change taken in")
    full_steps(ctl)
    clock.advance(due / 2)
    full_steps(ctl)
    assert ctl.compiles == before and ctl.changes_pending
    clock.advance(due / 2)
    wait_until(lambda: ctl.compiles == before + 1, what="one change compiled")
    sup.pump()
    wait_until(lambda: ctl.latency.snapshot()[3] >= 301, what="latency observed")
    _, cumulative, total, count = ctl.latency.snapshot()
    assert count == 301 and 0 < total
    assert cumulative[-1] == 301        # everything under ~9 minutes


def test_latency_is_labelled_by_service_kind_as_coredns(ctl):
    sup = FakeSupervisor(ctl)
    listed(ctl.sink, "Service", [svc("web"), svc("db", ip="None")])
    ctl.sink.synced("Service")
    ctl.sink.synced("Namespace")
    wait_until(lambda: ctl.compiles == 1)
    sup.pump()
    ctl.sink.apply("EndpointSlice", {**eps("db-1", "db", ["10.1.0.1"]), "kind": "EndpointSlice"})
    ctl.sink.apply("EndpointSlice", {**eps("web-1", "web", ["10.1.0.2"]), "kind": "EndpointSlice"})
    ctl.sink.apply("Service", {**svc("web", ip="10.96.0.9"), "kind": "Service"})
    ctl.sink.apply("Namespace", {**nsobj("team"), "kind": "Namespace"})
    wait_until(lambda: compiled(ctl), what="the compile")
    sup.pump()
    wait_until(lambda: ctl.latency.snapshot()[3] == 4, what="four observations")
    hist = ctl.programming_histograms()
    assert set(hist) == set(C.SERVICE_KINDS)
    counts = {kind: pairs[-1] for kind, (pairs, _) in hist.items()}
    assert counts == {"cluster_ip": ("+Inf", 2), "headless_with_selector": ("+Inf", 1),
                      "headless_without_selector": ("+Inf", 0)}
    pairs, total = hist["cluster_ip"]
    assert pairs[0] == ("0.001", pairs[0][1]) and total > 0
    assert [c for _, c in pairs] == sorted(c for _, c in pairs)     # cumulative


def test_latency_ends_when_the_last_worker_swapped_not_when_the_controller_looks():
    """The compiler thread may be busy when the workers switch; the workers' swap time
    (``served_at``) ends the measurement, so a late look does not inflate it."""
    clock = FakeClock()
    ctl = C.Controller(compiler=RecordingCompiler(), needed=2, clock=clock)
    ctl.first()
    try:
        latency_ends_at_the_swap(ctl, clock)
    finally:
        ctl.stop()


def latency_ends_at_the_swap(ctl, clock):
    due = max(ctl.debounce.settle, ctl.debounce.quiet)
    sup = FakeSupervisor(ctl)
    swapped = {"at": 0.0}
    ctl.bind(wake=sup.event.set, served_generation=lambda: sup.served,
             served_at=lambda: swapped["at"])
    listed(ctl.sink, "Service", [svc("web")])
    ctl.sink.synced("Service")
    ctl.sink.synced("Namespace")
    wait_until(lambda: ctl.synced, what="synced")      # taken in, then time moves
    full_steps(ctl)
    clock.advance(due)
    wait_until(lambda: ctl.compiles == 1)
    sup.pump()
    seen = clock()
    ctl.sink.apply("Service", {**svc("web", ip="10.96.0.9"), "kind": "Service"})
    wait_until(lambda: ctl.changes_pending, what="the change taken in")
    full_steps(ctl)
    clock.advance(due)
    wait_until(lambda: compiled(ctl), what="the compile")
    # Published and served now, but the workers "swapped" 50 ms after the event was seen
    # and the controller only looks 300 ms later.
    swapped["at"] = seen + 0.05
    clock.advance(0.3)
    sup.pump()
    wait_until(lambda: ctl.latency.snapshot()[3] == 1, what="the observation")
    assert ctl.latency.recent[-1] == pytest.approx(0.05)


@pytest.mark.parametrize("full", ["0", "1"])
def test_the_api_controller_compiles_incrementally_unless_told_not_to(tmp_path, monkeypatch,
                                                                      full):
    from kdns.serve.incremental import IncrementalCompiler
    from kdns import settings
    monkeypatch.setattr(settings, "ENV", settings.from_env({"KDNS_FULL_COMPILE": full}))
    cfg = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9", {"token": "t"})
    ctl = C.ApiController(connection=api_connection(cfg))
    want = C.FullCompiler if full == "1" else IncrementalCompiler
    assert type(ctl.compiler) is want


def test_staleness_grows_during_an_outage_and_clears_after(api):
    """ApiController with the real watchers against the fake API, in process (fast timings)."""
    from kdns.kube import api as source
    import pathlib
    import tempfile
    base_objects(api)
    fast = source.WatchSettings(page_size=50, watch_timeout=(2, 2), read_slack=0.5,
                                connect_timeout=1.0, list_read_timeout=2.0, backoff_base=0.2,
                                backoff_cap=0.5, min_stream_seconds=0.2)
    with tempfile.TemporaryDirectory() as d:
        cfg = write_kubeconfig(pathlib.Path(d) / "kubeconfig", api.url, {"token": api.token})
        ctl = C.ApiController(connection=api_connection(cfg), settings=fast)
        ctl.first()
        try:
            sup = FakeSupervisor(ctl)
            wait_until(lambda: sup.pump() is not None and ctl.ready_generation, timeout=10,
                       what="the first sync")
            assert ctl.staleness_seconds() == 0.0
            relists = ctl.relists()
            assert relists == 3                 # one list per watcher
            api.set_down(True)
            api.delete("services", "default", "kubernetes")
            api.compact()       # the delete is no longer in history: only a relist sees it
            # The reset streams fail at once; staleness then grows with the time since the
            # last contact (bounded: the slowest a watcher notices is a silent stream's
            # watch timeout + read slack).
            wait_until(lambda: ctl.staleness_seconds() > 0.5,
                       timeout=fast.watch_timeout[1] + fast.read_slack + 0.5,
                       what="staleness during the outage")
            api.set_down(False)
            wait_until(lambda: ctl.staleness_seconds() == 0.0, timeout=10, what="reconnected")
            wait_until(lambda: ctl.relists() > relists, timeout=10, what="relist after 410")
            wait_until(lambda: sup.pump() is not None and ctl.model.count("Service") == 0,
                       timeout=5, what="the deletion made during the outage")
        finally:
            ctl.stop()


def test_initial_sync_timeout_logs_loudly_and_keeps_waiting(caplog):
    ctl = C.Controller(compiler=RecordingCompiler(), needed=1, initial_sync_timeout=0.2,
                       describe_waiting=lambda: "Service (last error: HTTP 500)")
    ctl.first()
    try:
        wait_until(lambda: any("not synced" in r.message and r.levelname == "ERROR"
                               for r in caplog.records), what="the error")
        assert "Service (last error: HTTP 500)" in caplog.text
        assert ctl.ready_generation == 0
        ctl.sink.synced("Service")
        wait_until(lambda: ctl.compiles == 1, what="the compile after a late sync")
    finally:
        ctl.stop()


# --------------------------------------------------------------------------- kdns serve + fake API


class ApiKdns(Kdns):
    """``kdns serve`` reading the fake API through a kubeconfig (no --from-* flag)."""

    def __init__(self, tmp_path, api: FakeApiServer, *, args=(), workers=1, env=None,
                 user=None, python_args=()):
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url,
                                      user or {"token": api.token})
        super().__init__(tmp_path, workers=workers, args=args, env=env,
                         source=["--kubecfg-file", kubeconfig], python_args=python_args)

    def answering(self) -> bool:
        try:
            self.udp(K)
            return True
        except Exception:           # noqa: BLE001 -- not listening yet
            return False

    def start_serving(self, timeout=20.0) -> "ApiKdns":
        """Start and wait until the workers answer (ready or not)."""
        return self.start(timeout, until=ApiKdns.answering)

    def published(self) -> int:
        return int(self.metrics()[("kdns_image_published_generation", frozenset())])

    def wait_answer(self, name, check, rdtype="A", timeout=10.0, what=None):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.udp(name, rdtype)
            if check(msg):
                return msg
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or name}: still {rcode_text(msg)} {a_records(msg)}"
                                     f" after {timeout}s\n{self.logs()[-3000:]}")
            time.sleep(0.01)


def answers(*ips):
    return lambda m: rcode_text(m) == "NOERROR" and a_records(m) == sorted(ips)


def rcode(text):
    return lambda m: rcode_text(m) == text


@pytest.fixture
def api():
    server = FakeApiServer(token="secret", bookmark_interval=1.0).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kdns_api(api, tmp_path):
    base_objects(api)
    k = ApiKdns(tmp_path, api)
    try:
        k.start(timeout=30)
        yield k
    finally:
        k.stop()


def test_servfail_and_not_ready_before_the_first_sync_then_answers(api, tmp_path):
    base_objects(api)
    api.inject("services", "list", Slow(4.0))
    k = ApiKdns(tmp_path, api, args=("--initial-sync-timeout", "1s"))
    try:
        k.start_serving()
        assert rcode_text(k.udp(K)) == "SERVFAIL"          # never a false NXDOMAIN
        assert rcode_text(k.udp(f"nothing.default.svc.{ZONE}")) == "SERVFAIL"
        assert k.http_get("/readiness")[0] == 503
        wait_until(lambda: "not synced with the Kubernetes API" in k.logs(), timeout=10,
                   what="the initial-sync-timeout error")
        assert k.proc.poll() is None                        # kept trying, did not exit
        k.wait_answer(K, answers("10.96.0.1"), timeout=15)
        wait_until(k.ready, timeout=5, what="/readiness 200 after the sync")
        assert rcode_text(k.udp(f"nothing.default.svc.{ZONE}")) == "NXDOMAIN"
    finally:
        k.stop()


def test_add_modify_delete_of_each_kind(api, kdns_api):
    k = kdns_api
    web = f"web.default.svc.{ZONE}"
    # Service: add, modify, delete.
    k.wait_answer(web, rcode("NXDOMAIN"))
    api.create("services", svc("web", ip="10.96.0.20"))
    k.wait_answer(web, answers("10.96.0.20"), timeout=5)
    api.update("services", svc("web", ip="10.96.0.21"))
    k.wait_answer(web, answers("10.96.0.21"), timeout=5)
    api.delete("services", "default", "web")
    k.wait_answer(web, rcode("NXDOMAIN"), timeout=5)
    # Headless service and its EndpointSlice: add, modify, delete.
    db = f"db.default.svc.{ZONE}"
    api.create("services", svc("db", ip="None"))
    api.create("endpointslices", eps("db-1", "db", ["10.1.0.1", "10.1.0.2"]))
    k.wait_answer(db, answers("10.1.0.1", "10.1.0.2"), timeout=5)
    api.update("endpointslices", eps("db-1", "db", ["10.1.0.3"]))
    k.wait_answer(db, answers("10.1.0.3"), timeout=5)
    k.wait_answer(f"10-1-0-3.db.default.svc.{ZONE}", answers("10.1.0.3"), timeout=5)
    api.delete("endpointslices", "default", "db-1")
    k.wait_answer(db, rcode("NXDOMAIN"), timeout=5)    # dns-rules §1.13: headless, no endpoints
    # Namespace: <ns>.svc exists (NODATA) only while the namespace does.
    team = f"team.svc.{ZONE}"
    k.wait_answer(team, rcode("NXDOMAIN"))
    api.create("namespaces", nsobj("team"))
    k.wait_answer(team, lambda m: rcode_text(m) == "NOERROR" and not m.answer, timeout=5)
    api.delete("namespaces", None, "team")
    k.wait_answer(team, rcode("NXDOMAIN"), timeout=5)
    assert k.ready()


def test_clusterip_to_headless_and_back(api, kdns_api):
    k = kdns_api
    name = f"flip.default.svc.{ZONE}"
    api.create("services", svc("flip", ip="10.96.0.30"))
    api.create("endpointslices", eps("flip-1", "flip", ["10.2.0.1", "10.2.0.2"]))
    k.wait_answer(name, answers("10.96.0.30"), timeout=5)
    api.update("services", svc("flip", ip="None"))
    k.wait_answer(name, answers("10.2.0.1", "10.2.0.2"), timeout=5)
    api.update("services", svc("flip", ip="10.96.0.31"))
    k.wait_answer(name, answers("10.96.0.31"), timeout=5)
    assert a_records(k.udp(name)) == ["10.96.0.31"]


def test_a_burst_of_300_endpointslice_changes_is_a_few_publishes(api, kdns_api):
    k = kdns_api
    for i in range(10):
        api.create("services", svc(f"b{i}", ip="None"))
    api.create("endpointslices", eps("b0-x", "b0", ["10.3.0.1"]))
    k.wait_answer(f"b0.default.svc.{ZONE}", answers("10.3.0.1"), timeout=5)
    before = k.published()
    final = {}
    for n in range(300):
        i = n % 10
        ips = [f"10.3.{n % 200}.{j + 1}" for j in range(1 + n % 3)]
        name = f"b{i}-{n // 10 % 3}"
        if (i, n // 10 % 3) in final:
            api.update("endpointslices", eps(name, f"b{i}", ips))
        else:
            api.create("endpointslices", eps(name, f"b{i}", ips))
        final[(i, n // 10 % 3)] = ips
    expect = {i: sorted({ip for (j, _), ips in final.items() if j == i for ip in ips}
                        | ({"10.3.0.1"} if i == 0 else set())) for i in range(10)}
    for i in range(10):
        k.wait_answer(f"b{i}.default.svc.{ZONE}", answers(*expect[i]), timeout=10)
    # Every answer shows the last change, so the last compile with a change has landed.
    publishes = k.published() - before
    print(f"300 EndpointSlice changes -> {publishes} publishes")
    # Coalesced: fewer publishes than changes. How many fewer depends on how fast the fake
    # API delivers them (one per event when they trickle slower than the debounce); the
    # exact coalescing is checked with an injected clock in
    # test_a_burst_is_coalesced_and_a_single_change_is_quick.
    assert 1 <= publishes < 300, f"{publishes} publishes for 300 changes"
    # Every change was one programming-latency observation, exported as CoreDNS does.
    count = k.metrics()[("coredns_kubernetes_dns_programming_duration_seconds_count",
                         frozenset({("service_kind", "headless_with_selector")}))]
    assert count >= 300


def test_gone_in_a_busy_stream_loses_no_update(api, kdns_api):
    k = kdns_api
    n_svc = 20
    for i in range(n_svc):
        api.create("services", svc(f"g{i}", ip="None"))
        api.create("endpointslices", eps(f"g{i}", f"g{i}", [f"10.4.{i}.1"]))
    k.wait_answer(f"g{n_svc - 1}.default.svc.{ZONE}", answers(f"10.4.{n_svc - 1}.1"))
    lists_before = api.count(verb="list", resource="endpointslices")
    final = {}
    for rnd in range(10):
        if rnd == 3:
            # The next endpointslices watch gets 10 events and then 410 Expired; dropping the
            # connections makes the watchers reconnect now, in the middle of the stream.
            api.inject("endpointslices", "watch", Gone(after_events=10))
            api.drop_connections()
        for i in range(n_svc):
            ips = [f"10.4.{i}.{rnd + 2}"] + ([f"10.5.{i}.{rnd}"] if rnd % 2 else [])
            api.update("endpointslices", eps(f"g{i}", f"g{i}", ips))
            final[i] = ips
        time.sleep(0.02)
    for i in range(n_svc):
        k.wait_answer(f"g{i}.default.svc.{ZONE}", answers(*final[i]), timeout=15)
    assert api.count(verb="list", resource="endpointslices") > lists_before, "no relist happened"


# The outage test's watch settings, given to kdns through KDNS_WATCH_SETTINGS: a small backoff
# cap so that every watcher's reconnect after the outage lands within a bound derived from
# these numbers (kdns's default 30 s cap would make any wait race the jitter).
OUTAGE_SETTINGS = {"backoff_base": 0.1, "backoff_cap": 1.0, "connect_timeout": 2.0,
                   "list_read_timeout": 5.0}
# Once the API is back, a watcher's next attempt starts within backoff_cap and its relist
# (the outage's history is compacted) finishes within connect + read timeouts.
RECONNECT_BOUND = (OUTAGE_SETTINGS["backoff_cap"] + OUTAGE_SETTINGS["connect_timeout"]
                   + OUTAGE_SETTINGS["list_read_timeout"])
OUTAGE_SECONDS = 10
OUTAGE_ROUNDS = 40          # query rounds during the outage, however slow the machine is


def test_an_api_outage_keeps_answers_flowing_then_converges(api, tmp_path):
    # The issue asks for 30 s; 10 s shows the same (several failed reconnects with growing
    # backoff, then convergence) and keeps the suite short.
    base_objects(api)
    k = ApiKdns(tmp_path, api, env={"KDNS_WATCH_SETTINGS": json.dumps(OUTAGE_SETTINGS)})
    try:
        k.start(timeout=30)
        outage_then_convergence(api, k)
    finally:
        k.stop()


def outage_then_convergence(api, k):
    for name, ip in (("keep", "10.96.1.1"), ("gone", "10.96.1.2"), ("moved", "10.96.1.3")):
        api.create("services", svc(name, ip=ip))
    k.wait_answer(f"moved.default.svc.{ZONE}", answers("10.96.1.3"))
    api.set_down(True)
    down_at = time.monotonic()
    api.delete("services", "default", "gone")
    api.update("services", svc("moved", ip="10.96.1.4"))
    api.create("services", svc("new", ip="10.96.1.5"))
    api.compact()       # the history of the outage is gone: only a relist can see the delete
    failures, rounds = [], 0
    # Both a duration (the watchers fail and back off several times) and a number of rounds
    # (answers checked all along), so a loaded machine lengthens the loop instead of failing.
    while rounds < OUTAGE_ROUNDS or time.monotonic() - down_at < OUTAGE_SECONDS:
        for name, ip in (("keep", "10.96.1.1"), ("gone", "10.96.1.2"), ("moved", "10.96.1.3")):
            msg = k.udp(f"{name}.default.svc.{ZONE}")
            if a_records(msg) != [ip]:
                failures.append((name, rcode_text(msg), a_records(msg)))
        assert k.ready(), "not ready during an API outage"
        rounds += 1
        time.sleep(0.05)
    assert not failures, failures[:5]
    m = k.metrics()
    # Says how stale it is: at least as long as the API has been down (last contact was
    # before set_down).
    assert m[("kdns_api_staleness_seconds", frozenset())] >= OUTAGE_SECONDS
    relists = m[("kdns_api_relists_total", frozenset())]
    api.set_down(False)
    # Each watcher is back within RECONNECT_BOUND; the compile and hand-off after it are the
    # debounce's max_delay plus the workers' switch (the other waits in this file: 10 s).
    converge = RECONNECT_BOUND + 10
    k.wait_answer(f"gone.default.svc.{ZONE}", rcode("NXDOMAIN"), timeout=converge)
    k.wait_answer(f"moved.default.svc.{ZONE}", answers("10.96.1.4"), timeout=converge)
    k.wait_answer(f"new.default.svc.{ZONE}", answers("10.96.1.5"), timeout=converge)
    k.wait_answer(f"keep.default.svc.{ZONE}", answers("10.96.1.1"), timeout=converge)
    assert k.ready()
    # Watchers with nothing to deliver reconnect on their own backoff too.
    wait_until(lambda: k.metrics()[("kdns_api_staleness_seconds", frozenset())] == 0,
               timeout=RECONNECT_BOUND, step=0.2, what="every watcher reconnected")
    assert k.metrics()[("kdns_api_relists_total", frozenset())] > relists


def test_pods_verified_watches_pods(api, tmp_path):
    base_objects(api)
    api.create("namespaces", nsobj("apps"))
    api.create("pods", pod("p1", "10.6.0.1", ns="apps"))
    k = ApiKdns(tmp_path, api, args=("--pods", "verified"))
    try:
        k.start(timeout=30)
        one, two = f"10-6-0-1.apps.pod.{ZONE}", f"10-6-0-2.apps.pod.{ZONE}"
        k.wait_answer(one, answers("10.6.0.1"), timeout=5)
        assert a_records(k.udp(two)) == []
        api.create("pods", pod("p2", "10.6.0.2", ns="apps"))
        k.wait_answer(two, answers("10.6.0.2"), timeout=5)
        api.delete("pods", "apps", "p1")
        k.wait_answer(one, lambda m: not a_records(m), timeout=5)
        assert api.count(verb="watch", resource="pods") >= 1
    finally:
        k.stop()


def imported_modules(log: str) -> set[str]:
    """The modules a ``python -X importtime`` process reported importing (its stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_the_supervisor_never_imports_kubernetes_and_follows_rotated_exec_credentials(
        api, tmp_path):
    """The ``kubernetes`` package resolves the connection in a child, never in the
    supervisor (``-X importtime`` lists every module the supervisor imports, however late;
    the workers and the child are started without it). A credential the API revokes is
    replaced by the exec plugin's new one through a second child."""
    from test_connection import ExecPlugin
    base_objects(api)
    plugin = ExecPlugin(tmp_path / "plugin", api.token)
    k = ApiKdns(tmp_path, api, user=plugin.user(), python_args=("-X", "importtime"),
                env={"KDNS_WATCH_SETTINGS": json.dumps(OUTAGE_SETTINGS)})
    try:
        k.start(timeout=30)
        imported = imported_modules(k.logs())
        # The control: the list is the supervisor's, and has what it talks to the API with.
        assert {"urllib3", "kdns.kube.connection", "kdns.kube.api"} <= imported, imported
        assert plugin.runs == 1
        api.token = "rotated"
        plugin.set("rotated")
        api.drop_connections()            # the watches end; their next requests get 401
        api.create("services", svc("after", ip="10.96.3.3"))
        k.wait_answer(f"after.default.svc.{ZONE}", answers("10.96.3.3"),
                      timeout=RECONNECT_BOUND + 10)
        assert plugin.runs == 2, "one re-resolve for all the watchers"
        assert api.requests[-1].authorization == "Bearer rotated"
        late = imported_modules(k.logs())
        assert not {m for m in late if m.split(".")[0] == "kubernetes"}, sorted(late)
    finally:
        k.stop()


@pytest.mark.parametrize("flags,named", [
    (["--kubecfg-file", "/nonexistent/kubeconfig"], "--kubecfg-file"),
    (["--kube-master-url", "ftp://api"], "--kube-master-url"),
    (["--initial-sync-timeout", "soon"], "--initial-sync-timeout"),
])
def test_bad_connection_flags_are_one_sentence_naming_them(capsys, flags, named):
    from kdns import cli
    try:
        code = cli.main(["serve", "--dns-port", "0", "--healthz-port", "0", "--metrics-port", "0",
                         *flags])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
