"""deploy/coredns-patch.yaml: kdns in place of CoreDNS, applied by the real kubectl to the
coredns Deployments that kubeadm, EKS and k3s ship (hand-written fixtures in
tests/manifests/, each naming its source).

The patched Deployment must differ from the original only in what the patch means to change.
It must be schema-valid. The container's args must be ones kdns accepts. kdns must accept
the distribution's own Corefile (tests/corefiles/) without a refusal. The probes and the
Service's ports must land on listeners that kdns opens from that Corefile.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess

import kubernetes_validate as kv
import pytest
import yaml

from conftest import ROOT, require_tool
from test_corefile import fixture as corefile_fixture, k3s_copy

from kdns import cli

PATCH = os.path.join(ROOT, "deploy", "coredns-patch.yaml")
MANIFESTS = os.path.join(ROOT, "tests", "manifests")
# distribution -> its Deployment fixture and its default Corefile.
DISTRIBUTIONS = {
    "kubeadm": ("kubeadm-coredns.yaml", "kubeadm.Corefile"),
    "eks": ("eks-coredns.yaml", "eks.Corefile"),
    "k3s": ("k3s-coredns.yaml", "k3s"),
}
CONFIG_MOUNT = "/etc/coredns"


def original(dist: str) -> dict:
    with open(os.path.join(MANIFESTS, DISTRIBUTIONS[dist][0])) as f:
        return yaml.safe_load(f)


def patch_text() -> str:
    with open(PATCH) as f:
        return f.read()


def patched(dist: str, tmp_path) -> dict:
    """The Deployment as `kubectl patch` makes it (offline: --local)."""
    kubectl = require_tool("kubectl")
    r = subprocess.run(
        [kubectl, "patch", "--local", "-f", os.path.join(MANIFESTS, DISTRIBUTIONS[dist][0]),
         "--type", "strategic", "-p", patch_text(), "-o", "json"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def container(dep: dict, name: str = "coredns") -> dict:
    found = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def the_patch() -> dict:
    with open(PATCH) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_patch_changes_the_coredns_container_and_nothing_else(dist, tmp_path):
    got = patched(dist, tmp_path)
    want = copy.deepcopy(original(dist))
    mine = container(the_patch())
    c = container(want)
    c["image"] = mine["image"]
    c["args"] = mine["args"]
    c["resources"]["limits"].update(mine["resources"]["limits"])
    c["securityContext"].update(mine["securityContext"])
    want["spec"]["template"]["spec"]["securityContext"] = {"seccompProfile":
                                                           {"type": "RuntimeDefault"}}
    assert got == want
    # What kube-system's Service and the cluster rely on stays: the name, the pod labels the
    # selector matches, the ServiceAccount bound to system:coredns, the Corefile's volume.
    o = original(dist)
    assert got["metadata"]["name"] == "coredns"
    assert got["spec"]["selector"] == o["spec"]["selector"]
    assert got["spec"]["template"]["metadata"]["labels"]["k8s-app"] == "kube-dns"
    assert got["spec"]["template"]["spec"]["serviceAccountName"] == "coredns"
    assert got["spec"]["template"]["spec"]["volumes"] == o["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_patched_deployment_is_schema_valid(dist, tmp_path):
    dep = patched(dist, tmp_path)
    for version in ("1.29.0", kv.latest_version()):
        kv.validate(dep, version, strict=True)


def serve_args(dep: dict, corefile_path: str):
    """The container's args as kdns's own parser reads them, with the mounted Corefile's
    path pointed at the fixture (the test's stand-in for the ConfigMap volume)."""
    args = [a.replace(f"{CONFIG_MOUNT}/Corefile", corefile_path) for a in container(dep)["args"]]
    assert any(a.startswith("--corefile=") for a in args)
    a = cli.build_parser().parse_args(["serve", *cli.logs.normalise_flag_names(args)])
    return a, cli._apply_corefile(a, cli._serve_parser())


def probe_port(c: dict, probe: str) -> int:
    port = c[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c["ports"] if "name" in p}
    return named[port]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_kdns_starts_from_the_distributions_corefile_with_the_patched_args(dist, tmp_path):
    dep = patched(dist, tmp_path)
    corefile = k3s_copy(tmp_path) if dist == "k3s" else corefile_fixture(DISTRIBUTIONS[dist][1])
    a, problem = serve_args(dep, corefile)
    assert problem is None
    assert getattr(a, "corefile_warnings", []) == []
    c = container(dep)
    # The probes' ports are the listeners the Corefile's health and ready plugins open.
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert probe_port(c, "livenessProbe") == a.health_port == 8080
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probe_port(c, "readinessProbe") == a.ready_port == 8181
    ports = {(p["containerPort"], p["protocol"]) for p in c["ports"]}
    assert {(a.dns_port, "UDP"), (a.dns_port, "TCP"), (a.metrics_port, "TCP")} <= ports
    # No listener the pod does not declare: kube-dns's /readiness and sidecar are off.
    assert a.healthz_port == 0 and a.sidecar_port == 0
    assert a.share_dns_port
    # The Corefile reaches the container where the args say: the coredns ConfigMap's
    # Corefile key, mounted at /etc/coredns.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    config = [n for n, path in mounts.items() if path == CONFIG_MOUNT]
    assert len(config) == 1
    cm = volumes[config[0]]["configMap"]
    assert cm["name"] == "coredns"
    assert "Corefile" in [i["path"] for i in cm.get("items", [{"path": "Corefile"}])]


def test_patch_keeps_the_containers_other_limits_and_requests(tmp_path):
    """A strategic merge adds the CPU limit beside CoreDNS's memory limit and requests; a
    regression to a JSON merge patch would drop them."""
    c = container(patched("kubeadm", tmp_path))
    assert c["resources"] == {"limits": {"cpu": "2", "memory": "170Mi"},
                              "requests": {"cpu": "100m", "memory": "70Mi"}}
    assert c["securityContext"]["capabilities"] == {"add": ["NET_BIND_SERVICE"],
                                                    "drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
