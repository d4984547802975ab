"""The Dockerfile builds, and the image serves DNS the way deploy/kdns.yaml runs it: as uid
1001, read-only root filesystem, all capabilities dropped but NET_BIND_SERVICE, no new
privileges, binding port 53 on the host network.

Base images cannot be pulled here, so tests/imagebuild.sh makes Debian bookworm bases with
debootstrap (cached in buildah storage across runs) and passes them as BASE_IMAGE and
BUILDER_IMAGE. Needs root and the Debian packages buildah, debootstrap, podman, runc and
libcap2-bin (getcap)."""
import json
import os
import random
import re
import resource
import signal
import subprocess
import time
import urllib.request

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from conftest import ROOT, require_tool, unavailable
from serverutil import free_port

from kdns.observe.health import PROBE_INTERVAL

# Per session: two test sessions on one machine must not remove or retag each other's image.
IMAGE = f"localhost/kdns:test-{os.getpid()}"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
# runc, not crun: crun refuses the hybrid cgroup layout of the containers CI runs in.
PODMAN = ["podman", "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
          "--events-backend", "none", "--runtime", "runc"]
# CI has 90 minutes for everything; the image may take at most this much of it (bases
# included when the cache is cold).
BUILD_BUDGET_S = 15 * 60
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")
# HTTP listeners of kdns besides the readiness one; on the host network each would take a
# fixed host port, so the run switches off those the image has.
OTHER_HTTP_PORT_FLAGS = ("--metrics-port", "--health-port", "--ready-port", "--sidecar-port")


def grace_period():
    """terminationGracePeriodSeconds of deploy/kdns.yaml: the kubelet's SIGKILL comes then."""
    with open(os.path.join(ROOT, "deploy", "kdns.yaml")) as f:
        dep = [d for d in yaml.safe_load_all(f) if d and d["kind"] == "Deployment"][0]
    return dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_BUDGET_S + 300)]


@pytest.fixture(scope="module")
def image():
    if os.geteuid() != 0:
        unavailable("the image test needs root (buildah --isolation chroot)")
    for tool in ("buildah", "debootstrap", "podman", "runc", "getcap"):
        require_tool(tool)
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "tests", "imagebuild.sh"), "build"],
                       env={**os.environ, "KDNS_IMAGE": IMAGE}, capture_output=True, text=True,
                       timeout=BUILD_BUDGET_S)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-6000:]
    timings = dict((m[0], int(m[1])) for m in re.findall(r"^timing (\S+) (\d+)$", r.stderr, re.M))
    print(f"image build: {took:.0f}s in all, steps {timings}")
    yield {"took": took, "timings": timings}
    # 300 MB in vfs storage per session otherwise; the cached bases stay.
    subprocess.run(BUILDAH + ["rmi", IMAGE], capture_output=True)


def inspect(ref):
    out = subprocess.run(BUILDAH + ["inspect", "--type", "image", ref], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_build_within_budget(image):
    assert "image" in image["timings"], "imagebuild.sh did not report the image build time"
    assert image["took"] < BUILD_BUDGET_S


def test_image_config(image):
    cfg = inspect(IMAGE)["OCIv1"]["config"]
    # Numeric: kubelet can only enforce runAsNonRoot against a numeric user.
    assert cfg["User"] == "1001:1001"
    assert cfg["Entrypoint"] == ["kdns", "serve"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TMPDIR"] == "/dev/shm"
    assert env["PATH"].split(":")[0] == "/opt/kdns/bin"


@pytest.fixture(scope="module")
def rootfs(image):
    """The image's files, mounted from buildah storage for inspection."""
    ctr = subprocess.run(BUILDAH + ["from", "--pull=false", IMAGE], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        mnt = subprocess.run(BUILDAH + ["mount", ctr], check=True, capture_output=True,
                             text=True).stdout.strip()
        yield mnt
    finally:
        subprocess.run(BUILDAH + ["rm", ctr], capture_output=True)


def test_python_has_only_net_bind_service(rootfs):
    # The venv's python is a symlink to the base's interpreter; the capability must be on the
    # real file. os.path.realpath would follow absolute links out of the rootfs, hence by hand.
    path = "/opt/kdns/bin/python"
    for _ in range(10):
        full = os.path.join(rootfs, path.lstrip("/"))
        if not os.path.islink(full):
            break
        t = os.readlink(full)
        path = t if t.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(path), t))
    real = os.path.join(rootfs, path.lstrip("/"))
    out = subprocess.run([require_tool("getcap"), real], capture_output=True, text=True).stdout
    assert out.split()[-1] == "cap_net_bind_service=ep", out


def test_runtime_is_minimal(rootfs):
    venv = os.path.join(rootfs, "opt/kdns")
    assert not os.path.exists(os.path.join(venv, "bin/pip")), "the runtime venv has pip"
    assert not os.path.exists(os.path.join(rootfs, "usr/bin/gcc")), "a compiler in the runtime"
    assert not os.path.exists(os.path.join(rootfs, "src")), "the source tree in the runtime"
    site = os.path.join(venv, "lib/python3.11/site-packages/kdns")
    for pkg, ext in (("packet", "_fastpath."), ("zone", "_compile.")):
        so = [f for f in os.listdir(os.path.join(site, pkg))
              if f.startswith(ext) and f.endswith(".so")]
        assert so, f"the compiled kdns.{pkg}.{ext[:-1]} is missing from the image"
    # The image carries what runs: no C or Cython sources next to the extensions.
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(site) for f in files
                 if f.endswith((".c", ".pyx", ".pxd", ".pxi"))]
    assert not leftovers, leftovers
    # kdns node-local's node set-up runs these (the runtime's own, not the host's).
    for tool in ("ip", "iptables", "ip6tables"):
        assert any(os.path.lexists(os.path.join(rootfs, d, tool))
                   for d in ("usr/sbin", "usr/bin", "sbin", "bin")), f"{tool} missing from the image"
    # Bytecode was compiled at install time: nothing needs writing under a read-only root.
    assert os.listdir(os.path.join(site, "__pycache__"))


def wait_ready(url: str, deadline: float) -> bool:
    """True once ``url`` answers 200 (polled until ``deadline``)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as h:
                if h.status == 200:
                    return True
        except OSError:                 # 503 (HTTPError) until ready, or not listening yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def wait_answer(proc, addr, qname, qtype, deadline):
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the container exited with status {proc.returncode}"
        try:
            r = dns.query.udp(dns.message.make_query(qname, qtype), addr, port=53, timeout=1)
            if r.rcode() == dns.rcode.NOERROR and r.answer:
                return r
            last = r
        except (dns.exception.Timeout, OSError) as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"no answer for {qname} {qtype} from {addr}:53: {last}")


def test_image_serves_dns_on_port_53_as_in_the_pod(image, tmp_path):
    """deploy/kdns.yaml's security context, with podman: if the file capability, the read-only
    root or the non-root user were wrong, kdns would not bind :53 or would not start."""
    assert os.path.exists(CLUSTER), "examples/cluster.yaml is missing"
    # A loopback address of our own: port 53 on it cannot clash with anything else on the host.
    addr = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
    name = f"kdns-test-{os.getpid()}"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    log = open(tmp_path / "kdns.log", "w+")
    cmd = PODMAN + [
        "run", "--rm", "--name", name, "--pull=never", "--network", "host",
        # podman's defaults raise these limits, which needs a capability the CI container
        # lacks: keep our own file limit, and few processes (kdns runs two here).
        "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=1024:1024",
        "--user", "1001:1001", "--read-only", "--read-only-tmpfs=false",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
        "--security-opt", "no-new-privileges",
        "-v", f"{CLUSTER}:/etc/kdns/cluster.yaml:ro",
        IMAGE,
    ]
    usage = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stdout + usage.stderr
    # On the random loopback address the container alone listens on, so no other socket on
    # this machine draws the port between this check and kdns binding it.
    readiness_port = free_port(addr)
    serve_args = [
        "--from-file", "/etc/kdns/cluster.yaml", "--dns-bind-address", addr, "--dns-port", "53",
        "--workers", "1", "--healthz-port", str(readiness_port),
    ] + [a for flag in OTHER_HTTP_PORT_FLAGS if flag in usage.stdout for a in (flag, "0")]
    proc = subprocess.Popen(cmd + serve_args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        r = wait_answer(proc, addr, "kubernetes.default.svc.cluster.local.", "A", deadline)
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["10.96.0.1"]
        # The kube-dns sidecar's liveness probe of kubedns (fails on zero answer records).
        r = dns.query.tcp(dns.message.make_query("kubernetes.default.svc.cluster.local.", "SRV"),
                          addr, port=53, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR and r.answer
        r = dns.query.udp(dns.message.make_query("nope.default.svc.cluster.local.", "A"),
                          addr, port=53, timeout=5)
        assert r.rcode() == dns.rcode.NXDOMAIN
        # The readiness probe deploy/ points at, served from inside the image. Ready needs
        # the health prober's own answer from the workers, which may come a probe interval
        # after the first answer a client saw.
        assert wait_ready(f"http://{addr}:{readiness_port}/readiness",
                          time.monotonic() + 2 * PROBE_INTERVAL + 5)
        assert proc.poll() is None, "kdns exited while serving"
        # kdns is PID 1 in the container, where a signal without a handler is ignored: the
        # kubelet's SIGTERM must end it (after the lameduck) with status 0, not its SIGKILL.
        grace = grace_period()
        t0 = time.monotonic()
        subprocess.run(PODMAN + ["stop", "--time", str(grace), name], capture_output=True,
                       timeout=grace + 30)
        assert proc.wait(timeout=30) == 0, f"exit status {proc.returncode} after SIGTERM"
        assert time.monotonic() - t0 < grace, "SIGTERM ignored: stopped by SIGKILL"
    except AssertionError as e:
        log.seek(0)
        raise AssertionError(f"{e}\n--- kdns output:\n{log.read()[-4000:]}") from None
    finally:
        # Stop our container only, by its unique name; then the podman client by pid.
        subprocess.run(PODMAN + ["stop", "--time", "10", name], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
