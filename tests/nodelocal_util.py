"""Clusters for the node-local tests: N Services with EndpointSlices, as JSON files."""
from __future__ import annotations

import json


def cluster_items(n: int, *, extra=(), endpoint_of=None) -> list[dict]:
    items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}"}}
             for i in range(5)]
    items.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
    for i in range(n):
        ns = f"ns{i % 5}"
        items.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"namespace": ns, "name": f"svc{i}"},
                      "spec": {"clusterIP": f"10.96.{1 + i // 250}.{i % 250 + 1}",
                               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
        ip = (endpoint_of or {}).get(i, f"10.128.{i // 250}.{i % 250 + 1}")
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"namespace": ns, "name": f"svc{i}-a",
                                   "labels": {"kubernetes.io/service-name": f"svc{i}"}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    return items + list(extra)


def service(name: str, ns: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80,
                                                  "protocol": "TCP"}]}}


def write_cluster(path, items) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    import os
    os.replace(tmp, path)


def compile_items(tmp_path, items, serial: int) -> bytes:
    from kdns.serve import build
    path = tmp_path / f"cluster-{serial}.json"
    write_cluster(path, items)
    return build.compile_file(str(path), serial=serial)
