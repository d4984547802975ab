"""deploy/: schema-valid for current Kubernetes, and a drop-in for kube-dns in what clusters
depend on (the kube-dns Service, probes that hit the ports kdns listens on, the security
context the image is built for, a grace period that covers the lameduck)."""
import copy
import ipaddress
import os
import re

import kubernetes_validate as kv
import pytest
import yaml

from conftest import ROOT

DROP_IN = os.path.join(ROOT, "deploy", "kdns.yaml")
CONTAINER_ONLY = os.path.join(ROOT, "deploy", "kubedns-container.yaml")
RBAC = os.path.join(ROOT, "deploy", "rbac.yaml")

# The oldest release we support (EndpointSlice v1, policy/v1 PDB, seccompProfile all GA well
# before it) and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kv.latest_version()]

# kube-dns's Service, from cluster/addons/dns/kube-dns/kube-dns.yaml.in (dns-rules §3.5).
KUBE_DNS_SERVICE_LABELS = {
    "k8s-app": "kube-dns",
    "kubernetes.io/cluster-service": "true",
    "addonmanager.kubernetes.io/mode": "Reconcile",
    "kubernetes.io/name": "KubeDNS",
}
KUBE_DNS_SERVICE_PORTS = [
    {"name": "dns", "port": 53, "protocol": "UDP"},
    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
]

# kdns's listeners and their defaults: flag -> default port; 0 disables.
PORT_FLAGS = {
    "--dns-port": 53,
    "--healthz-port": 8081,
    "--sidecar-port": 10054,
    "--health-port": 8080,
    "--ready-port": 8181,
    "--metrics-port": 9153,
}
# Which flag's listener serves which probe path.
PROBE_PATH_FLAG = {
    "/readiness": "--healthz-port",
    "/healthcheck/kubedns": "--sidecar-port",
    "/health": "--health-port",
    "/ready": "--ready-port",
}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def flags(args):
    """kube-dns style `--name=value` args -> {--name: value}; a bare `--flag` maps to True."""
    out = {}
    for a in args:
        assert a.startswith("--"), f"not a flag: {a!r}"
        name, eq, value = a.partition("=")
        assert name not in out, f"{name} given twice"
        out[name] = value if eq else True
    return out


def seconds(duration):
    """Go duration as kdns's --lameduck takes it: 5s, 500ms, 1m, 1m30s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.fullmatch(r"((\d+(?:\.\d+)?)(ms|s|m|h))+", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def listening_ports(container):
    """{port: flag} of what kdns binds, from its args and the defaults (0 = off)."""
    f = flags(container.get("args", []))
    ports = {}
    for flag, default in PORT_FLAGS.items():
        port = int(f.get(flag, default))
        if port:
            assert port not in ports, f"{flag} and {ports[port]} both on {port}"
            ports[port] = flag
    for env in container.get("env", []):
        if env["name"] == "PROMETHEUS_PORT":
            ports[int(env["value"])] = "PROMETHEUS_PORT"
    return ports


def container_port(container, port):
    """A probe's port (number or name) -> the declared containerPort number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"probe port {port!r} is not a declared port of {container['name']}")


# --- schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [DROP_IN, CONTAINER_ONLY], ids=os.path.basename)
def test_schema_strict(path, version):
    docs = load(path)
    assert docs
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message}"
                        f" at {'.'.join(map(str, e.caused_by.path))}")


def test_schema_strict_rejects_a_misspelt_field():
    """Strict mode is what catches typos such as runAsNonroot (silently dropped by the API
    server otherwise); prove the validator as called above really rejects them."""
    dep = copy.deepcopy(one(load(DROP_IN), "Deployment"))
    sc = dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["runAsNonroot"] = sc.pop("runAsNonRoot")
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)


# --- the whole-pod drop-in ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def drop_in():
    return load(DROP_IN)


@pytest.fixture(scope="module")
def kdns_container(drop_in):
    containers = one(drop_in, "Deployment", "kube-dns")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the drop-in pod has one container, kdns"
    return containers[0]


def test_service_is_kube_dns(drop_in):
    svc = one(drop_in, "Service")
    assert svc["metadata"]["name"] == "kube-dns"
    assert svc["metadata"]["namespace"] == "kube-system"
    assert svc["metadata"]["labels"] == KUBE_DNS_SERVICE_LABELS
    assert svc["spec"]["selector"] == {"k8s-app": "kube-dns"}
    # kube-dns's two ports first and unchanged, then CoreDNS's metrics port.
    assert svc["spec"]["ports"][:2] == KUBE_DNS_SERVICE_PORTS
    assert svc["spec"]["ports"][2:] == [{"name": "metrics", "port": 9153, "protocol": "TCP"}]
    ip = ipaddress.ip_address(svc["spec"]["clusterIP"])
    assert ip in ipaddress.ip_network("10.96.0.0/12"), "placeholder: kubeadm's default range"
    assert "type" not in svc["spec"] or svc["spec"]["type"] == "ClusterIP"


def test_service_ports_reach_the_container(drop_in, kdns_container):
    svc = one(drop_in, "Service")
    declared = {(p["containerPort"], p.get("protocol", "TCP")) for p in kdns_container["ports"]}
    listening = listening_ports(kdns_container)
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        target = container_port(kdns_container, target)
        assert (target, port["protocol"]) in declared, port
        assert target in listening, f"Service port {port['name']} -> {target}: kdns does not listen there"
    f = flags(kdns_container["args"])
    assert int(f["--dns-port"]) == 53
    assert int(f["--metrics-port"]) == 9153


def test_serviceaccount_and_rbac(drop_in):
    sa = one(drop_in, "ServiceAccount")
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == ("kube-dns", "kube-system")
    role = one(drop_in, "ClusterRole")
    rules = {(g, r, tuple(sorted(rule["verbs"])))
             for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    # Read-only, and pods only for --pods=verified (which this manifest does not use).
    assert rules == {
        ("", "services", ("list", "watch")),
        ("", "endpoints", ("list", "watch")),
        ("", "namespaces", ("list", "watch")),
        ("discovery.k8s.io", "endpointslices", ("list", "watch")),
    }
    binding = one(drop_in, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube-dns",
                                    "namespace": "kube-system"}]
    dep = one(drop_in, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "kube-dns"
    assert flags(dep["spec"]["template"]["spec"]["containers"][0]["args"]).get("--pods") != "verified"


def test_rbac_matches_deploy_rbac_yaml(drop_in):
    """deploy/rbac.yaml (the standalone role) and the drop-in's own must grant the same reads,
    apart from pods, which only --pods=verified needs."""
    if not os.path.exists(RBAC):
        pytest.fail("deploy/rbac.yaml is missing: the standalone role must ship beside the drop-in")

    def reads(docs):
        role = one(docs, "ClusterRole")
        return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"] if r != "pods"}

    assert reads(drop_in) == reads(load(RBAC))
    # Same names too, or applying both files would create two roles that drift apart.
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        assert one(drop_in, kind)["metadata"]["name"] == one(load(RBAC), kind)["metadata"]["name"]


def test_configmap_is_optional_and_mounted_at_config_dir(drop_in, kdns_container):
    cm = one(drop_in, "ConfigMap")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("kube-dns", "kube-system")
    assert not cm.get("data"), "an operator's stubDomains must not be overwritten by ours"
    assert cm["metadata"]["labels"]["addonmanager.kubernetes.io/mode"] == "EnsureExists"
    pod = one(drop_in, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = flags(kdns_container["args"])["--config-dir"]
    assert config_dir == "/kube-dns-config"
    mount = [m for m in kdns_container["volumeMounts"] if m["mountPath"] == config_dir]
    assert len(mount) == 1
    assert volumes[mount[0]["name"]]["configMap"] == {"name": "kube-dns", "optional": True}


def test_probes_hit_kdns_listeners(kdns_container):
    listening = listening_ports(kdns_container)
    for kind in ("livenessProbe", "readinessProbe"):
        probe = kdns_container[kind]["httpGet"]
        port = container_port(kdns_container, probe["port"])
        flag = PROBE_PATH_FLAG[probe["path"]]
        assert listening.get(port) == flag, f"{kind} {probe['path']} on {port}: kdns serves it on {flag}"
    assert kdns_container["readinessProbe"]["httpGet"]["path"] in ("/readiness", "/ready")
    # Liveness must not depend on readiness-only state; both kube-dns and CoreDNS wait 60s.
    assert kdns_container["livenessProbe"]["initialDelaySeconds"] >= 60


def test_every_declared_port_is_a_listener(kdns_container):
    listening = listening_ports(kdns_container)
    for p in kdns_container["ports"]:
        assert p["containerPort"] in listening, f"{p['name']}: declared but kdns does not listen"


def test_prometheus_annotation_is_the_metrics_port(drop_in, kdns_container):
    ann = one(drop_in, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == int(flags(kdns_container["args"])["--metrics-port"])


def test_security_context(drop_in, kdns_container):
    sc = kdns_container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert isinstance(sc["runAsGroup"], int) and sc["runAsGroup"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    pod = one(drop_in, "Deployment")["spec"]["template"]["spec"]
    seccomp = sc.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod


def test_resources(kdns_container):
    res = kdns_container["resources"]
    assert res["requests"] == {"cpu": "100m", "memory": "70Mi"}
    # The CPU limit is the worker count kdns derives from its cgroup quota (kdns/serve/cpus.py):
    # without one, a pod on a 64-CPU node would start 64 workers the memory limit must hold.
    assert res["limits"] == {"cpu": "2", "memory": "170Mi"}
    assert "--workers" not in kdns_container["args"]
    from kdns.serve import cpus
    quota = cpus.Quota(float(res["limits"]["cpu"]), "limits.cpu")
    assert cpus.default_workers(quota, 64) == 2      # on a big node: 2 workers, not 64


def test_termination_grace_outlasts_lameduck(drop_in, kdns_container):
    pod = one(drop_in, "Deployment")["spec"]["template"]["spec"]
    lameduck = seconds(flags(kdns_container["args"])["--lameduck"])
    assert lameduck >= 5
    assert pod["terminationGracePeriodSeconds"] > lameduck


def test_pod_placement_and_rollout(drop_in):
    dep = one(drop_in, "Deployment", "kube-dns")
    assert dep["metadata"]["namespace"] == "kube-system"
    assert dep["spec"]["selector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert dep["spec"]["template"]["metadata"]["labels"]["k8s-app"] == "kube-dns"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "10%", "maxUnavailable": 0}
    pod = dep["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in pod["tolerations"]
    # kubeadm's CoreDNS tolerates the control-plane taint: clusters with only control-plane
    # nodes must get DNS too.
    assert {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"} in \
        pod["tolerations"]
    # The count belongs to the autoscaler (or the operator), not to every apply.
    assert "replicas" not in dep["spec"]
    assert "addonmanager.kubernetes.io/mode" not in dep["metadata"]["labels"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["dnsPolicy"] == "Default", "cluster DNS must not resolve through itself"
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchExpressions"] == [
        {"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]


def test_pdb_covers_the_pods(drop_in):
    pdb = one(drop_in, "PodDisruptionBudget")
    assert pdb["metadata"]["namespace"] == "kube-system"
    assert pdb["spec"]["selector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    dep = one(drop_in, "Deployment")
    # Drains must be able to proceed: some disruption is always allowed.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or \
        pdb["spec"]["minAvailable"] < dep["spec"].get("replicas", 1)


@pytest.mark.parametrize("path", [DROP_IN, CONTAINER_ONLY], ids=os.path.basename)
def test_manifest_args_parse(path, tmp_path, capsys):
    """The container's command line, exactly as the pod runs it (`kdns serve` + args), is
    accepted by kdns's own parser: every flag exists and every value is valid."""
    from kdns.cli import build_parser

    (container,) = [c for c in one(load(path), "Deployment")["spec"]["template"]["spec"]["containers"]
                    if c["image"].split("/")[-1].startswith("kdns")]
    # The ConfigMap volume is always mounted in the pod (optional only means possibly empty).
    args = [f"--config-dir={tmp_path}" if a.startswith("--config-dir=") else a
            for a in container["args"]]
    try:
        build_parser().parse_args(["serve", *args])
    except SystemExit as e:
        pytest.fail(f"kdns serve rejects the args of {os.path.basename(path)} (status {e.code}): "
                    f"{capsys.readouterr().err.strip()}")


# --- the container-only variant --------------------------------------------------------------

@pytest.fixture(scope="module")
def stock_pod():
    return one(load(CONTAINER_ONLY), "Deployment", "kube-dns")["spec"]["template"]["spec"]


def containers_by_name(pod):
    return {c["name"]: c for c in pod["containers"]}


def test_variant_keeps_the_stock_pod(stock_pod):
    c = containers_by_name(stock_pod)
    assert list(c) == ["kubedns", "dnsmasq", "sidecar"]
    assert c["dnsmasq"]["image"].startswith("registry.k8s.io/dns/k8s-dns-dnsmasq-nanny:")
    assert c["sidecar"]["image"].startswith("registry.k8s.io/dns/k8s-dns-sidecar:")
    assert "k8s-dns-kube-dns" not in c["kubedns"]["image"]
    assert stock_pod["serviceAccountName"] == "kube-dns"
    assert stock_pod["dnsPolicy"] == "Default"
    assert {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"} in \
        stock_pod["tolerations"]


def test_variant_kdns_where_dnsmasq_and_sidecar_look(stock_pod):
    c = containers_by_name(stock_pod)
    kd = c["kubedns"]
    f = flags(kd["args"])
    port = int(f["--dns-port"])
    assert port == 10053
    domain = f["--domain"].rstrip(".")
    assert {(p["containerPort"], p["protocol"]) for p in kd["ports"]} >= {(10053, "UDP"), (10053, "TCP")}
    # dnsmasq forwards the cluster zone and reverse zones to kdns...
    for zone in (domain, "in-addr.arpa", "ip6.arpa"):
        assert f"--server=/{zone}/127.0.0.1#{port}" in c["dnsmasq"]["args"]
    # ...and the sidecar's kubedns probe (kdns's liveness) asks kdns an SRV question.
    assert f"--probe=kubedns,127.0.0.1:{port},kubernetes.default.svc.{domain},5,SRV" in c["sidecar"]["args"]
    live = kd["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/healthcheck/kubedns", 10054)
    assert 10054 in {p["containerPort"] for p in c["sidecar"]["ports"]}
    ready = kd["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/readiness", 8081)
    assert listening_ports(kd).get(8081) == "--healthz-port"
    assert f["--config-dir"] == "/kube-dns-config"


def test_variant_no_port_clash_in_the_pod(stock_pod):
    """All containers share the pod's network namespace: kdns must leave 53 to dnsmasq and
    10054 to the real sidecar."""
    c = containers_by_name(stock_pod)
    kdns_ports = set(listening_ports(c["kubedns"]))
    others = {p["containerPort"] for name in ("dnsmasq", "sidecar") for p in c[name]["ports"]}
    assert not kdns_ports & others, f"kdns would bind {sorted(kdns_ports & others)}"


def test_variant_metrics_and_security(stock_pod):
    kd = containers_by_name(stock_pod)["kubedns"]
    assert kd["resources"]["limits"] == {"cpu": "2", "memory": "170Mi"}    # 2 workers
    env = {e["name"]: e["value"] for e in kd["env"]}
    assert env["PROMETHEUS_PORT"] == "10055"
    assert {"name": "metrics", "containerPort": 10055, "protocol": "TCP"} in kd["ports"]
    sc = kd["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (1001, 1001)
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    # The image's python has a file capability: dropping NET_BIND_SERVICE would stop it exec'ing.
    assert "NET_BIND_SERVICE" not in sc.get("capabilities", {}).get("drop", [])
    assert "ALL" not in [d.upper() for d in sc.get("capabilities", {}).get("drop", [])]


def test_variant_grace_outlasts_default_lameduck(stock_pod):
    kd = containers_by_name(stock_pod)["kubedns"]
    lameduck = seconds(flags(kd["args"]).get("--lameduck", "5s"))
    assert stock_pod.get("terminationGracePeriodSeconds", 30) > lameduck
