"""The slim cluster model: what a watcher drives (apply/delete/replace_kind) and what it keeps."""
import logging

import pytest

from kdns.kube import model as C


def svc(name="web", ns="default", ip="10.96.0.5", **spec):
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns, "resourceVersion": "1",
                                            "annotations": {"big": "x" * 1000}},
            "spec": {"clusterIP": ip, **spec}}


def eps(name="web-1", svc_name="web", ns="default", endpoints=(), ports=()):
    return {"kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {C.SERVICE_NAME_LABEL: svc_name}},
            "endpoints": list(endpoints), "ports": list(ports)}


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_apply_reports_change_only_when_the_slim_record_changes():
    m = C.ClusterModel(clock=FakeClock())
    assert m.apply(svc()) is True
    again = svc()
    again["metadata"]["resourceVersion"] = "2"          # irrelevant to DNS
    assert m.apply(again) is False
    assert m.version == 1
    assert m.apply(svc(ip="10.96.0.6")) is True
    assert m.service("default", "web").cluster_ips == ("10.96.0.6",)


def test_records_are_slim_and_immutable():
    m = C.ClusterModel()
    m.apply(svc(ports=[{"name": "http", "port": 80}]))
    s = m.service("default", "web")
    assert not hasattr(s, "__dict__")                    # __slots__: no raw dict kept
    assert s.ports == (C.Port("http", "TCP", 80),)
    with pytest.raises(AttributeError):
        s.name = "other"


def test_serial_increases_on_every_change_even_within_a_second():
    clock = FakeClock(5000.0)
    m = C.ClusterModel(clock=clock)
    m.apply(svc())
    first = m.serial
    m.apply(svc(ip="10.96.0.7"))
    assert m.serial == first + 1 and first == 5000
    m.apply(svc(ip="10.96.0.7"))
    assert m.serial == first + 1                          # no change, no bump
    clock.t = 9000.0
    m.delete("Service", "default", "web")
    assert m.serial == 9000


def test_delete_and_missing_delete():
    m = C.ClusterModel()
    m.apply(svc())
    assert m.delete("Service", "default", "web") is True
    assert m.delete("Service", "default", "web") is False
    assert m.service("default", "web") is None


def test_cluster_ips_headless_and_external_name():
    m = C.ClusterModel()
    m.apply(svc("dual", ip="10.96.0.9", clusterIPs=["10.96.0.9", "FD00:0:0::9"]))
    m.apply(svc("hl", ip="None"))
    m.apply({"kind": "Service", "metadata": {"name": "ext", "namespace": "default"},
             "spec": {"type": "ExternalName", "externalName": "example.com"}})
    assert m.service("default", "dual").cluster_ips == ("10.96.0.9", "fd00::9")
    assert m.service("default", "hl").headless and m.service("default", "hl").cluster_ips == ()
    assert m.service("default", "ext").external_name == "example.com"


def test_only_ready_endpoints_are_kept_and_nil_ready_counts_as_ready():
    m = C.ClusterModel()
    m.apply(eps(endpoints=[{"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                           {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
                           {"addresses": ["10.1.0.3"]},
                           {"addresses": ["10.1.0.4"], "conditions": {}}]))
    (es,) = m.endpoint_sets("default", "web")
    assert [ep.addresses for ep in es.endpoints] == [("10.1.0.1",), ("10.1.0.3",), ("10.1.0.4",)]


def test_slices_of_a_service_merge_and_reindex_on_move():
    m = C.ClusterModel()
    m.apply(eps("a", endpoints=[{"addresses": ["10.1.0.1"]}]))
    m.apply(eps("b", endpoints=[{"addresses": ["10.1.0.2"]}]))
    assert len(m.endpoint_sets("default", "web")) == 2
    m.apply(eps("b", svc_name="other", endpoints=[{"addresses": ["10.1.0.2"]}]))
    assert len(m.endpoint_sets("default", "web")) == 1
    assert len(m.endpoint_sets("default", "other")) == 1
    m.delete("EndpointSlice", "default", "a")
    assert m.endpoint_sets("default", "web") == ()


def test_v1_endpoints_are_the_fallback_when_a_service_has_no_slices():
    m = C.ClusterModel()
    m.apply({"kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"},
             "subsets": [{"addresses": [{"ip": "10.1.0.9", "hostname": "h"}],
                          "notReadyAddresses": [{"ip": "10.1.0.8"}],
                          "ports": [{"name": "http", "port": 80}]}]})
    (es,) = m.endpoint_sets("default", "web")
    assert es.endpoints == (C.Endpoint(("10.1.0.9",), "h", ""),)
    m.apply(eps(endpoints=[{"addresses": ["10.1.0.1"]}]))
    (es,) = m.endpoint_sets("default", "web")
    assert es.endpoints[0].addresses == ("10.1.0.1",)


def test_pods_that_dns_must_not_vouch_for_are_dropped():
    m = C.ClusterModel()
    base = {"kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
            "status": {"phase": "Running", "podIP": "10.244.0.5"}}
    assert m.apply(base) and m.count("Pod") == 1
    for phase in ("Succeeded", "Failed", "Unknown"):
        m.apply(base)
        assert m.apply({**base, "status": {"phase": phase, "podIP": "10.244.0.5"}}) is True
        assert m.count("Pod") == 0
    m.apply(base)
    gone = {**base, "metadata": {**base["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert m.apply(gone) is True and m.count("Pod") == 0
    assert m.apply({**base, "status": {"phase": "Pending"}}) is False   # no IP yet


def test_replace_kind_is_a_relist():
    m = C.ClusterModel()
    m.apply(svc("a"))
    m.apply(svc("b"))
    assert m.replace_kind("Service", [svc("a"), svc("b")]) is False
    listed = svc("c")
    del listed["kind"]                                     # typed API lists omit it
    assert m.replace_kind("Service", [svc("a"), listed]) is True
    assert sorted(s.name for s in m.services()) == ["a", "c"]
    m.apply(eps("s1", endpoints=[{"addresses": ["10.1.0.1"]}]))
    assert m.replace_kind("EndpointSlice", []) is True
    assert m.endpoint_sets("default", "web") == ()


def test_namespaces_include_those_holding_services():
    m = C.ClusterModel()
    m.apply({"kind": "Namespace", "metadata": {"name": "empty"}})
    m.apply(svc(ns="busy"))
    assert m.namespaces() == {"empty", "busy"}
    assert m.delete("Namespace", "", "empty") is True
    assert m.namespaces() == {"busy"}


@pytest.mark.parametrize("obj,needle", [
    ({"kind": "Service", "metadata": {}}, "Service without metadata.name"),
    (svc(ip="10.96.0.300"), "Service default/web"),
    ({"kind": "Service", "metadata": {"name": "e", "namespace": "d"}, "spec": {"type": "ExternalName"}},
     "Service d/e is ExternalName without"),
    ({"kind": "EndpointSlice", "metadata": {"name": "s", "namespace": "d"}}, "EndpointSlice d/s has no"),
    ({"kind": "Pod", "metadata": {"name": "p", "namespace": "d"}, "status": {"podIP": "x"}}, "Pod d/p"),
    ({"kind": "Service", "metadata": {"name": "s"}, "spec": "oops"}, "spec is not a mapping"),
    ({"kind": "Widget", "metadata": {"name": "w"}}, "unknown kind 'Widget'"),
])
def test_bad_objects_are_skipped_with_one_warning_naming_them(caplog, obj, needle):
    m = C.ClusterModel()
    m.apply(svc("keep"))
    with caplog.at_level(logging.WARNING):
        assert m.apply(obj) is False
    assert len(caplog.records) == 1 and needle in caplog.messages[0]
    assert m.service("default", "keep") is not None


def test_one_bad_port_or_address_skips_that_part_and_names_its_field(caplog):
    """dns-rules §1.14: the rest of the object stays; the warning gives object and field."""
    m = C.ClusterModel()
    with caplog.at_level(logging.WARNING):
        assert m.apply(svc(ports=[{"name": "a", "port": 80}, {"name": "b", "port": "x"},
                                  {"name": "c", "port": 70000}, {"name": "d", "port": 53,
                                                                 "protocol": "udp"}]))
        assert m.apply(eps(endpoints=[{"addresses": ["10.1.0.1"]},
                                      {"addresses": ["10.1.0.2", "nonsense"]},
                                      {"addresses": ["fd00::zz"]}],
                           ports=[{"name": "a", "port": -1}, {"name": "b", "port": 8080}]))
    assert [(p.name, p.port) for p in m.service("default", "web").ports] == [("a", 80), ("d", 53)]
    (es,) = m.endpoint_sets("default", "web")
    assert [e.addresses for e in es.endpoints] == [("10.1.0.1",), ("10.1.0.2",)]
    assert [(p.name, p.port) for p in es.ports] == [("b", 8080)]
    text = "\n".join(caplog.messages)
    for needle in ("Service default/web: spec.ports[1].port: 'x' is not a valid port",
                   "Service default/web: spec.ports[2].port: 70000 is not a valid port",
                   "EndpointSlice default/web-1: endpoints[1].addresses[1]: 'nonsense' is not "
                   "an IP address",
                   "EndpointSlice default/web-1: endpoints[2].addresses[0]:",
                   "EndpointSlice default/web-1: ports[0].port: -1 is not a valid port"):
        assert needle in text, (needle, text)
    assert len(caplog.records) == 5
