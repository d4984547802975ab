"""The incremental compiler makes the same image bytes as a full compile.

A random but seeded churn drives a small cluster through everything the rules distinguish:
service types (ClusterIP, dual-stack, headless, NodePort, ExternalName to outside names, to
in-zone services, endpoint names, pod names, itself), EndpointSlices that
move between services, v1 Endpoints, endpoint IPs shared between services (merged PTRs),
hostnames good and bad, namespaces and pods coming and going. After every step the
incremental image must equal ``build.compile_model`` byte for byte, in each pods mode.
"""
from __future__ import annotations

import os
import random
import time

import pytest

from conftest import unavailable
from kdns.zone import image as I
from kdns.kube import records
from kdns.serve import build
from kdns.kube.model import ClusterModel
from kdns.serve.incremental import IncrementalCompiler

# How long a test waits for the spare memfd the compile's thread prepares (it signals when
# it has): only a failing test waits this long.
SPARE_WAIT = 30.0


def _headless(name: str, net: int, n: int) -> list:
    """A headless service and its one EndpointSlice of ``n`` addresses in 10.``net``.0.0/16."""
    return [{"kind": "Service", "metadata": {"namespace": "default", "name": name},
             "spec": {"clusterIP": "None"}},
            {"kind": "EndpointSlice",
             "metadata": {"namespace": "default", "name": f"{name}-a",
                          "labels": {"kubernetes.io/service-name": name}},
             "endpoints": [{"addresses": [f"10.{net}.{j // 250}.{j % 250 + 1}"]}
                           for j in range(n)]}]

ZONE = "cluster.local"
NAMESPACES = ["default", "ns1", "ns2", "kube-system"]
SERVICES = [f"s{i}" for i in range(8)] + ["kube-dns"]
IPS4 = [f"10.1.0.{i}" for i in range(1, 13)]
IPS6 = ["fd00::1", "fd00::2", "fd00::a:1"]
HOSTNAMES = [None, None, "h0", "h1", "Bad_Host", "x" * 70]


def service_obj(rng: random.Random, ns: str, name: str) -> dict:
    ports = rng.choice([[], [{"name": "http", "port": 80, "protocol": "TCP"}],
                        [{"name": "dns", "port": 53, "protocol": "UDP"},
                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                         {"port": 9153}]])
    kind = rng.choice(["ClusterIP", "ClusterIP", "dual", "headless", "headless", "NodePort",
                       "external"])
    spec: dict = {"ports": ports}
    if kind == "external":
        spec["type"] = "ExternalName"
        spec["externalName"] = rng.choice([
            "example.com", "www.Example.org.",
            f"{rng.choice(SERVICES)}.{rng.choice(NAMESPACES)}.svc.{ZONE}",
            f"h0.{rng.choice(SERVICES)}.{rng.choice(NAMESPACES)}.svc.{ZONE}",
            f"_http._tcp.{rng.choice(SERVICES)}.default.svc.{ZONE}",
            f"10-1-0-3.default.pod.{ZONE}",
            f"{name}.{ns}.svc.{ZONE}", "1.2.3.4"])
    elif kind == "headless":
        spec["clusterIP"] = "None"
    elif kind == "dual":
        spec["clusterIPs"] = [f"10.96.0.{rng.randrange(1, 20)}", f"fd96::{rng.randrange(1, 20):x}"]
    else:
        spec["clusterIP"] = f"10.96.0.{rng.randrange(1, 20)}"
        if kind == "NodePort":
            spec["type"] = "NodePort"
    return {"kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec}


def slice_obj(rng: random.Random, ns: str, name: str) -> dict:
    six = rng.random() < 0.2
    pool = IPS6 if six else IPS4
    endpoints = []
    for ip in rng.sample(pool, rng.randrange(0, min(4, len(pool)) + 1)):
        ep = {"addresses": [ip], "conditions": {"ready": rng.random() < 0.85}}
        host = rng.choice(HOSTNAMES)
        if host:
            ep["hostname"] = host
        if rng.random() < 0.3:
            ep["targetRef"] = {"kind": "Pod", "name": f"pod-{ip.replace('.', '-')}"}
        endpoints.append(ep)
    return {"kind": "EndpointSlice", "addressType": "IPv6" if six else "IPv4",
            "metadata": {"namespace": ns, "name": name,
                         "labels": {"kubernetes.io/service-name": rng.choice(SERVICES)}},
            "endpoints": endpoints,
            "ports": rng.choice([[{"name": "http", "port": 8080, "protocol": "TCP"}],
                                 [{"name": "", "port": 80, "protocol": "TCP"}], []])}


def endpoints_obj(rng: random.Random, ns: str, name: str) -> dict:
    addrs = [{"ip": ip, **({"hostname": "h0"} if rng.random() < 0.3 else {})}
             for ip in rng.sample(IPS4, rng.randrange(1, 4))]
    return {"kind": "Endpoints", "metadata": {"namespace": ns, "name": name},
            "subsets": [{"addresses": addrs,
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}]}


def step(rng: random.Random, model: ClusterModel) -> set:
    """A few random changes; the changed keys as the controller reports them."""
    changed = set()
    for _ in range(rng.randrange(1, 5)):
        ns, kind = rng.choice(NAMESPACES), rng.choice(
            ["Service", "Service", "EndpointSlice", "EndpointSlice", "EndpointSlice",
             "Endpoints", "Namespace", "Pod"])
        delete = rng.random() < 0.25
        if kind == "Service":
            name = rng.choice(SERVICES)
            obj = service_obj(rng, ns, name)
        elif kind == "EndpointSlice":
            name = f"slice-{rng.randrange(6)}"
            obj = slice_obj(rng, ns, name)
        elif kind == "Endpoints":
            name = rng.choice(SERVICES)
            obj = endpoints_obj(rng, ns, name)
        elif kind == "Namespace":
            ns, name = "", rng.choice(NAMESPACES[1:] + ["extra"])
            obj = {"kind": "Namespace", "metadata": {"name": name}}
        else:
            ip = rng.choice(IPS4)
            name = f"pod-{ip.replace('.', '-')}"
            obj = {"kind": "Pod", "metadata": {"namespace": ns, "name": name},
                   "status": {"phase": "Running", "podIP": ip}}
        if delete:
            did = model.delete(kind, ns, name)
        else:
            did = model.apply(obj)
        if did:
            changed.add((kind, ns, name))
    return changed


@pytest.mark.parametrize("pods", ["insecure", "verified", "disabled"])
@pytest.mark.parametrize("seed", range(6))
def test_churn_gives_the_full_compile_bytes(seed, pods):
    rng = random.Random(seed * 7919 + len(pods))
    model = ClusterModel(clock=lambda: 1_700_000_000)
    inc = IncrementalCompiler(domain=ZONE, pods=pods)
    first = inc.compile(model, synced=False, changed=set())
    assert first == build.compile_model(model, synced=False, domain=ZONE, pods=pods)
    for n in range(120):
        changed = step(rng, model)
        got = inc.compile(model, synced=True, changed=changed)
        want = build.compile_model(model, synced=True, domain=ZONE, pods=pods)
        assert got == want, f"seed {seed} step {n}: images differ after {sorted(changed)}"
        if n % 7 == 3:
            # The changes paused: the core gives its per-compile tables back, and the next
            # compile (lean, as the first) allocates them again.
            inc.idle()
    # Every compile used the saved records: a full one here would mean a CNAME met a saved
    # answer it needed the RRsets of (a service it points into was not pinned).
    assert inc.full_compiles == 0


def test_a_change_touches_only_its_service():
    model = ClusterModel()
    for i in range(50):
        model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": f"s{i}"},
                     "spec": {"clusterIP": f"10.96.1.{i}"}})
    inc = IncrementalCompiler()
    inc.compile(model, synced=True, changed=set())
    assert inc.last_dirty == 50
    model.apply({"kind": "EndpointSlice",
                 "metadata": {"namespace": "default", "name": "s7-x",
                              "labels": {"kubernetes.io/service-name": "s7"}},
                 "endpoints": [{"addresses": ["10.2.0.1"]}]})
    got = inc.compile(model, synced=True, changed={("EndpointSlice", "default", "s7-x")})
    assert inc.last_dirty == 1 and inc.full_compiles == 0
    assert got == build.compile_model(model)


def test_garbage_is_collected_by_reloading_the_core(monkeypatch):
    """Churn through ever new endpoint IPs: names and blobs nothing uses pile up in the core
    until it is reloaded from the saved records; the bytes stay right throughout."""
    model = ClusterModel()
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                 "spec": {"clusterIP": "None"}})
    inc = IncrementalCompiler()
    inc.compile(model, synced=True, changed=set())
    for gen in range(400):
        model.apply({"kind": "EndpointSlice",
                     "metadata": {"namespace": "default", "name": "web-a",
                                  "labels": {"kubernetes.io/service-name": "web"}},
                     "endpoints": [{"addresses": [f"10.{gen // 250}.{gen % 250}.{j}"]}
                                   for j in range(1, 250)]})
        got = inc.compile(model, synced=True, changed={("EndpointSlice", "default", "web-a")})
        if gen % 50 == 0:
            assert got == build.compile_model(model)
        stats = inc.core_stats()
        assert stats["names"] <= 2 * stats["encoded_names"] + 100_000 + 600
    assert inc.core_reloads > 0, "the core was never reloaded"
    assert got == build.compile_model(model)


def test_a_failure_in_the_incremental_path_compiles_in_full_and_starts_over(monkeypatch):
    model = ClusterModel()
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "a"},
                 "spec": {"clusterIP": "10.96.0.5"}})
    inc = IncrementalCompiler()
    inc.compile(model, synced=True, changed=set())
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "b"},
                 "spec": {"clusterIP": "10.96.0.6"}})
    real = records.service_records

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(records, "service_records", broken)
    got = inc.compile(model, synced=True, changed={("Service", "default", "b")})
    assert got == build.compile_model(model) and inc.full_compiles == 1
    assert inc.core_stats() is None         # forgotten: the next compile starts over
    monkeypatch.setattr(records, "service_records", real)
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "c"},
                 "spec": {"clusterIP": "10.96.0.7"}})
    got = inc.compile(model, synced=True, changed={("Service", "default", "c")})
    assert got == build.compile_model(model) and inc.full_compiles == 1


def test_a_cname_into_a_reverse_name_is_compiled_in_full():
    model = ClusterModel()
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                 "spec": {"clusterIP": "10.96.0.9"}})
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "rev"},
                 "spec": {"type": "ExternalName", "externalName": "9.0.96.10.in-addr.arpa"}})
    inc = IncrementalCompiler()
    got = inc.compile(model, synced=True, changed=set())
    assert got == build.compile_model(model)
    assert inc.full_compiles == 1       # the PTR's RRset is not in the saved answers


def test_core_refuses_inconsistent_records():
    """``apply`` and ``add`` guard the persistent core against records that would make a
    wrong image: a group or name given twice, a name outside its group, a name given both
    answers and RRsets, a group removed that is not there, a truncated record."""
    zones = [I.Zone("cluster.local."), I.Zone("in-addr.arpa.", kind=I.ZONE_REVERSE)]
    core_type = I._compiled_core()
    if core_type is None:
        unavailable("the compiled compiler core is not built (or KDNS_PURE=1)")
    a = "a.default.svc.cluster.local."
    rr = [records.R.RRset(a, records.R.A, 30, (records.R.Address("10.0.0.1"),))]
    enc, = I.CoreCompiler(list(zones), True, 0, core_type).export(rr, [a])

    def fresh(loaded=True):
        core = I.CoreCompiler.new_core(core_type, list(zones), persistent=True)
        if loaded:
            core.apply((), [(a, enc)])
        return core

    core = fresh()
    assert core.dump() == [(a, enc)]
    with pytest.raises(I.CompileError, match="twice"):
        fresh().apply((), [(a, enc)])
    with pytest.raises(I.CompileError, match="twice"):
        fresh().apply((), [("default.svc.cluster.local.", enc)])
    with pytest.raises(I.CompileError, match="not in its group"):
        fresh(loaded=False).apply((), [("b.default.svc.cluster.local.", enc)])
    with pytest.raises(I.CompileError, match="not there"):
        fresh().apply(["b.default.svc.cluster.local."], ())
    with pytest.raises(ValueError, match="encoded record"):
        fresh().apply([a], [(a, enc[:-3])])
    soa = records.R.RRset("cluster.local.", records.R.SOA, 30, (records.R.Soa(
        "ns.dns.cluster.local.", "hostmaster.cluster.local.", 1, 2, 3, 4, 5),))
    with pytest.raises(I.CompileError, match="encoded answers and RRsets"):
        I.CoreCompiler(list(zones), True, 0, core_type, core=fresh()).build(rr + [soa], ())
    core.apply([a], ())                 # removed, then given again: fine
    core.apply((), [(a, enc)])
    assert core.dump() == [(a, enc)] and core.stats()["encoded_names"] == 1


def test_services_a_cname_points_into_are_compiled_from_rrsets():
    """An ExternalName pointing into a service that did not change: the chain needs that
    service's RRsets, so it leaves the saved answers while pointed at, and comes back after."""
    model = ClusterModel()
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                 "spec": {"clusterIP": "10.96.0.9",
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    inc = IncrementalCompiler()
    inc.compile(model, synced=True, changed=set())
    assert inc.service_state("default", "web") == "core"
    for target in ("web.default.svc.cluster.local", "_http._tcp.web.default.svc.cluster.local."):
        model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "alias"},
                     "spec": {"type": "ExternalName", "externalName": target}})
        got = inc.compile(model, synced=True, changed={("Service", "default", "alias")})
        assert got == build.compile_model(model)
        assert inc.service_state("default", "web") == "rrsets"
    model.delete("Service", "default", "alias")
    got = inc.compile(model, synced=True, changed={("Service", "default", "alias")})
    assert got == build.compile_model(model)
    assert inc.service_state("default", "web") == "core"
    assert inc.full_compiles == 0


def test_into_memfd_compiles_a_sealed_memfd_the_supervisor_publishes_as_is(monkeypatch):
    """With ``into_memfd`` (the API controller's setting) the image is written straight into
    a memfd, sealed, and published by handing that fd to the workers: same bytes, no copy."""
    import fcntl

    from kdns.serve import incremental
    from kdns.serve import publish
    monkeypatch.setattr(incremental, "MEMFD_MIN_BYTES", 0)
    model = ClusterModel()
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                 "spec": {"clusterIP": "10.96.0.9"}})
    inc = IncrementalCompiler(into_memfd=True)
    img = inc.compile(model, synced=True, changed=set())
    want = build.compile_model(model)
    assert isinstance(img, publish.ImageMemfd) and len(img) == len(want)
    assert bytes(img.map) == want
    assert fcntl.fcntl(img.fd, fcntl.F_GET_SEALS) & publish.SEALS == publish.SEALS
    pub = publish.Publisher()
    try:
        sub = publish.Subscription(pub.attach(0))
        assert pub.publish(img) == 1
        generation, mapping = sub.receive()
        assert generation == 1 and bytes(mapping) == want
        with pytest.raises(ValueError, match="given away"):
            img.take_fd()
        img.close()             # nothing left to close; the publisher owns the fd
    finally:
        pub.close()
    # The next image's memfd was prepared meanwhile (the compile starts a thread for it,
    # which signals), and is used: the image is that very file, same bytes again. (A new
    # address for the service keeps the image's size: the spare has 1/16 headroom.)
    spare = inc.wait_spare(SPARE_WAIT)
    assert spare is not None, "no spare memfd prepared"
    inode = os.fstat(spare.fd).st_ino
    model.apply({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                 "spec": {"clusterIP": "10.96.0.10"}})
    img = inc.compile(model, synced=True, changed={("Service", "default", "web")})
    assert spare.fd is None and os.fstat(img.fd).st_ino == inode, "the spare was not used"
    assert bytes(img.map) == build.compile_model(model)
    img.close()
    spare = inc.wait_spare(SPARE_WAIT)
    assert spare is not None, "no spare memfd prepared"
    inc.idle()                  # changes stopped: the spare's memory goes back
    assert inc.spare is None and spare.fd is None
    # A spare too small for the next image (it grew by more than the 1/16 headroom) is
    # given back and a fresh memfd used instead.
    for i in range(1, 9):
        for obj in _headless(f"grow{i}", 100 + i, 250):
            model.apply(obj)
    changed = {("Service", "default", f"grow{i}") for i in range(1, 9)} | \
        {("EndpointSlice", "default", f"grow{i}-a") for i in range(1, 9)}
    img = inc.compile(model, synced=True, changed=changed)
    img.close()
    spare = inc.wait_spare(SPARE_WAIT)
    assert spare is not None, "no spare memfd prepared"
    inode = os.fstat(spare.fd).st_ino
    for i in range(9, 40):
        for obj in _headless(f"grow{i}", 100 + i, 250):
            model.apply(obj)
    changed = {("Service", "default", f"grow{i}") for i in range(9, 40)} | \
        {("EndpointSlice", "default", f"grow{i}-a") for i in range(9, 40)}
    img = inc.compile(model, synced=True, changed=changed)
    assert len(img) > spare.capacity, "the image did not outgrow the spare"
    assert spare.fd is None and os.fstat(img.fd).st_ino != inode
    assert bytes(img.map) == build.compile_model(model)
    img.close()
    spare = inc.wait_spare(SPARE_WAIT)
    assert spare is not None, "no spare memfd prepared"
    inc.idle()
    assert inc.spare is None and spare.fd is None
    monkeypatch.setattr(incremental, "MEMFD_MIN_BYTES", 1 << 40)
    want = build.compile_model(model)
    assert inc.compile(model, synced=True, changed=set()) == want     # small: plain bytes


@pytest.mark.parametrize("seed", range(3))
def test_rewrite_aliases_follow_their_target_through_churn(seed):
    """``rewrite name exact`` aliases own their target service's RRsets: as the service
    changes, the incremental compile keeps them equal to the full compile's, without
    falling back to it (the target service is compiled from RRsets)."""
    import dns.message
    from kdns.forward.rewrite import parse_rule
    from kdns.zone import refpath
    rules = []
    for ns in NAMESPACES[:2]:
        for svc in SERVICES:
            target = f"{svc}.{ns}.svc.{ZONE.rstrip('.')}"
            rules += [parse_rule(["name", f"alias-{svc}-{ns}.example.org", target], "C:1"),
                      parse_rule(["name", "exact", f"srv-{svc}-{ns}.example.org",
                                  f"_http._tcp.{target}"], "C:2")]
    rules = tuple(rules)
    rng = random.Random(seed)
    model = ClusterModel(clock=lambda: 1_700_000_000)
    inc = IncrementalCompiler(domain=ZONE, rewrites=rules)
    inc.compile(model, synced=True, changed=set())
    seen_alias = 0
    for n in range(80):
        changed = step(rng, model)
        got = inc.compile(model, synced=True, changed=changed)
        want = build.compile_model(model, synced=True, domain=ZONE, rewrites=rules)
        assert got == want, f"seed {seed} step {n}: images differ after {sorted(changed)}"
        img = refpath.Image(got)
        seen_alias += any(refpath.answer(img, dns.message.make_query(r.frm, "A").to_wire())[0]
                          == refpath.ACTION_SEND for r in rules[::2])
    assert seen_alias, "the target never had records: the test proved nothing"
    assert inc.full_compiles == 0


@pytest.mark.parametrize("seed", range(3))
def test_churn_with_autopath_gives_the_full_compile_bytes(seed):
    # The autopath section follows every pod change (and only pod changes rebuild it).
    rng = random.Random(seed * 104729)
    model = ClusterModel(clock=lambda: 1_700_000_000)
    search = ("example.org",)
    inc = IncrementalCompiler(domain=ZONE, pods="disabled", autopath=search)
    assert inc.compile(model, synced=False, changed=set()) == build.compile_model(
        model, synced=False, domain=ZONE, pods="disabled", autopath=search)
    for n in range(80):
        changed = step(rng, model)
        got = inc.compile(model, synced=True, changed=changed)
        want = build.compile_model(model, synced=True, domain=ZONE, pods="disabled",
                                   autopath=search)
        assert got == want, f"seed {seed} step {n}: images differ after {sorted(changed)}"
    assert inc.full_compiles == 0


@pytest.mark.parametrize("autopath", [None, ("example.org",)], ids=["plain", "autopath"])
@pytest.mark.parametrize("seed", range(3))
def test_a_core_reading_its_blobs_from_the_published_image_gives_the_full_compile_bytes(
        seed, autopath, monkeypatch):
    """Compiled into memfds, the core frees its copy of every answer the sealed image holds
    and reads them from its own mapping of that image (``ZoneCore.rebase``): the next
    images are still the full compile's bytes, with the images of earlier compiles closed
    (the core's mapping is its own), and with plain-bytes images (no rebase) between."""
    from kdns.serve import incremental
    rng = random.Random(seed * 31 + 7)
    model = ClusterModel(clock=lambda: 1_700_000_000)
    inc = IncrementalCompiler(domain=ZONE, into_memfd=True, autopath=autopath)
    rebased = 0
    for n in range(80):
        small = rng.random() < 0.25
        monkeypatch.setattr(incremental, "MEMFD_MIN_BYTES", 1 << 40 if small else 0)
        changed = step(rng, model)
        got = inc.compile(model, synced=True, changed=changed)
        want = build.compile_model(model, synced=True, domain=ZONE, autopath=autopath)
        if small:
            assert got == want, f"seed {seed} step {n}: images differ"
            continue
        assert bytes(got.map) == want, f"seed {seed} step {n}: images differ"
        got.close()
        st = inc.core_stats()
        assert st["in_image"]
        # What stays in the store is only what this image does not hold.
        assert st["store_bytes"] < st["live_bytes"] or st["live_bytes"] == 0
        rebased += inc.rebased_bytes > 0
    assert rebased > 10 and inc.full_compiles == 0
    inc.idle()


def test_rebase_refuses_a_buffer_that_is_not_the_last_image(monkeypatch):
    from kdns.serve import incremental
    monkeypatch.setattr(incremental, "MEMFD_MIN_BYTES", 1 << 40)    # plain bytes: no rebase
    model = ClusterModel()
    for obj in _headless("web", 7, 20):
        model.apply(obj)
    inc = IncrementalCompiler(into_memfd=True)
    img = inc.compile(model, synced=True, changed=set())
    core = inc._core
    before = core.stats()
    wrong = bytearray(img)
    wrong[-5] ^= 0xFF                          # a blob's byte differs
    with pytest.raises(ValueError, match="not this core's"):
        core.rebase(bytes(wrong))
    with pytest.raises(ValueError, match="last compile"):
        core.rebase(img + b"\0\0\0\0")         # not its size
    assert core.stats() == before and not before["in_image"]
    assert core.rebase(img) > 0 and core.stats()["in_image"]
    img2 = inc.compile(model, synced=True, changed={("Service", "default", "web")})
    assert img2 == img == build.compile_model(model)
