"""The cluster model's slim records: what they keep of an object and how they compare."""
from __future__ import annotations

import pytest

from kdns.kube.model import Endpoint, EndpointSet, Port, slim_endpoint_slice


def test_an_endpoint_set_gives_back_its_endpoints_in_order():
    eps = (Endpoint(("10.0.0.1",), "", ""), Endpoint(("fd00::1", "fd00::2"), "h0", "pod-a"),
           Endpoint(("10.0.0.3",), "web-0", ""))
    es = EndpointSet("default", "web", (Port("http", "TCP", 80),), eps)
    assert es.endpoints == eps
    assert es.namespace == "default" and es.service == "web" and es.ports[0].port == 80
    same = EndpointSet("default", "web", (Port("http", "TCP", 80),), eps)
    assert es == same and hash(es) == hash(same)
    assert es != EndpointSet("default", "web", (Port("http", "TCP", 80),), eps[:2])
    assert es != EndpointSet("default", "web", (), eps)
    # One address or a tuple of one: the same endpoint either way.
    assert EndpointSet("d", "s", (), (Endpoint(("10.0.0.1", "10.0.0.2"), "", ""),)) != \
        EndpointSet("d", "s", (), (Endpoint(("10.0.0.1",), "", ""),))
    with pytest.raises(AttributeError, match="immutable"):
        es.service = "other"
    assert "web-0" in repr(es)


def test_a_slice_keeps_ready_endpoints_and_their_names():
    es = slim_endpoint_slice({
        "metadata": {"namespace": "ns1", "name": "web-abc",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": [
            {"addresses": ["10.1.0.1"], "targetRef": {"kind": "Pod", "name": "web-1"}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
            {"addresses": ["10.1.0.3", "10.1.0.4"], "hostname": "h3"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    assert es.endpoints == (Endpoint(("10.1.0.1",), "", "web-1"),
                            Endpoint(("10.1.0.3", "10.1.0.4"), "h3", ""))


def test_equal_port_lists_are_one_shared_tuple_and_namespaces_one_string():
    from kdns.kube.model import slim_service

    def svc(name, ports):
        return slim_service({"metadata": {"namespace": "n" + "s1", "name": name},
                             "spec": {"clusterIP": "10.96.0.1", "ports": ports}})
    a = svc("a", [{"name": "http", "port": 80, "protocol": "TCP"}])
    b = svc("b", [{"name": "http", "port": 80}])                 # TCP is the default
    c = svc("c", [{"name": "http", "port": 8080, "protocol": "TCP"}])
    assert a.ports is b.ports and a.ports == (Port("http", "TCP", 80),)
    assert c.ports == (Port("http", "TCP", 8080),) and c.ports is not a.ports
    assert a.namespace is b.namespace
