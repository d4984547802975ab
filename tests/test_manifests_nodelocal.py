"""deploy/kdns-node-local.yaml: schema-valid (strict) for the Kubernetes versions the other
manifests are checked against, its command line accepted by `kdns node-local`, and wired to
the central kdns of deploy/kdns.yaml (Services that select its pods and reach the port that
serves /image, a probe on the port the node-local serves /health on)."""
import os
import re

import kubernetes_validate as kv
import pytest

from conftest import ROOT
from test_manifests import K8S_VERSIONS, load, one

NODE_LOCAL = os.path.join(ROOT, "deploy", "kdns-node-local.yaml")
CENTRAL = os.path.join(ROOT, "deploy", "kdns.yaml")


@pytest.fixture(scope="module")
def docs():
    return load(NODE_LOCAL)


@pytest.fixture(scope="module")
def pod(docs):
    return one(docs, "DaemonSet", "kdns-node-local")["spec"]["template"]["spec"]


def flags(args):
    out = {}
    for a in args:
        name, _, value = a.partition("=")
        out[name] = value
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_schema_strict(docs, version):
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                        f"{e.message} at {'.'.join(map(str, e.caused_by.path))}")


def expand(text, env):
    """Kubernetes' $(VAR) expansion of args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  text)


def test_args_parse_as_node_local(pod, capsys):
    from kdns.cli import build_parser
    (c,) = pod["containers"]
    # Service links as kubelet injects them for the two Services of this manifest.
    env = {"KDNS_IMAGE_SERVICE_HOST": "10.96.3.3", "KDNS_IMAGE_SERVICE_PORT": "8081",
           "KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.4.4"}
    for e in c["env"]:
        env[e["name"]] = expand(e["value"], env)
    args = [expand(a, env) for a in c["args"]]
    assert "$(" not in " ".join(args), args
    try:
        a = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"kdns rejects the DaemonSet's args (status {e.code}): "
                    f"{capsys.readouterr().err.strip()}")
    assert a.command == "node-local"
    assert a.image_url == "http://10.96.3.3:8081/image"
    assert "169.254.20.10" in a.listen
    assert [(u.host, u.port) for u in a.kube_dns_upstream] == [("10.96.4.4", 53)]
    assert a.poll_wait < a.stale_after


def test_host_network_and_capabilities(pod):
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "Default"             # never itself, at start
    assert pod["automountServiceAccountToken"] is False   # no API access at all
    (c,) = pod["containers"]
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert {"NET_ADMIN", "NET_BIND_SERVICE"} <= set(caps["add"])
    assert any(m["mountPath"] == "/run/xtables.lock" for m in c["volumeMounts"])


def test_services_reach_the_central_pods(docs):
    central = load(CENTRAL)
    dep = one(central, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (kdns,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "kdns"]
    cflags = flags(kdns["args"])
    image = one(docs, "Service", "kdns-image")
    assert image["spec"]["selector"].items() <= labels.items()
    (port,) = image["spec"]["ports"]
    # /image is served on the central's --healthz-port (kdns serve --serve-image).
    assert port["targetPort"] == int(cflags["--healthz-port"])
    upstream = one(docs, "Service", "kube-dns-upstream")
    assert upstream["spec"]["selector"].items() <= labels.items()
    assert {(p["port"], p["protocol"]) for p in upstream["spec"]["ports"]} == \
        {(int(cflags["--dns-port"]), "UDP"), (int(cflags["--dns-port"]), "TCP")}


def test_probe_hits_the_node_local_health_listener(pod):
    (c,) = pod["containers"]
    probe = c["livenessProbe"]["httpGet"]
    f = flags(c["args"])
    assert probe["path"] == "/health" and probe["port"] == int(f["--health-port"])
    # Host network: the health listener is bound on the first listen address only.
    assert probe["host"] == f["--listen"].split(",")[0]
