"""kdns's API connection: flags resolved by the ``kubernetes`` client in a child process, then
requests made with urllib3 here, against the fake API (HTTP, and HTTPS with certificates the
test makes with openssl).

What must hold: every connection flag behaves as before (kubeconfig token, tokenFile
followed, client certificate, CA, tls-server-name, insecure-skip-tls-verify; in-cluster
service account; ``--kube-master-url``); the child's errors name the flag; a rotated token
file is used by the next request without a new child; an exec plugin's credentials are
resolved again when they expire or are rejected, and not more often than the interval; no
request is retried behind the watch loop. The supervisor's own check (it never imports
``kubernetes``) is in test_controller.py, where a real ``kdns serve`` runs.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import urllib3
import yaml

from fakeapi import FakeApiServer, HttpError, Reset, Tls
from kdns.kube import connection as C
from test_api_source import write_kubeconfig

pytestmark = pytest.mark.timeout(30)

TIMEOUT = (2.0, 2.0)


def get(conn: C.ApiConnection, path="/api/v1/namespaces"):
    """One request, read and released: (status, the request as the fake API saw it)."""
    resp = conn.get(path, [("limit", 1)], timeout=TIMEOUT)
    try:
        resp.read()
    finally:
        resp.release_conn()
    return resp.status


def child(kubeconfig: str = "", master: str = "", **kw) -> C.ConnectionInfo:
    return C.resolve_in_child(kubeconfig, master, **kw)


@pytest.fixture
def api():
    server = FakeApiServer(token="secret").start()
    try:
        yield server
    finally:
        server.close()


# ---- an exec credential plugin ----------------------------------------------------------------

PLUGIN = """\
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
with open(d / "runs", "a") as f:
    f.write("x")
status = {"token": (d / "token").read_text().strip()}
if (d / "expiry").exists():
    status["expirationTimestamp"] = (d / "expiry").read_text().strip()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": status}))
"""


class ExecPlugin:
    """A credential plugin (a script run by the kubernetes client) that hands out the token
    in ``dir/token`` (expiring at ``dir/expiry`` when that exists) and counts its runs."""

    def __init__(self, d: pathlib.Path, token: str, expiry: str | None = None):
        self.dir = d
        d.mkdir(exist_ok=True)
        (d / "plugin.py").write_text(PLUGIN)
        self.set(token, expiry)

    def set(self, token: str, expiry: str | None = None) -> None:
        (self.dir / "token").write_text(token)
        if expiry is not None:
            (self.dir / "expiry").write_text(expiry)

    @property
    def runs(self) -> int:
        try:
            return len((self.dir / "runs").read_text())
        except FileNotFoundError:
            return 0

    def user(self) -> dict:
        return {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                         "command": sys.executable,
                         "args": [str(self.dir / "plugin.py"), str(self.dir)],
                         "interactiveMode": "Never"}}


# ---- the child ----------------------------------------------------------------------------------

def test_the_child_resolves_a_kubeconfig_and_requests_carry_its_token(api, tmp_path):
    conn = C.ApiConnection(child(write_kubeconfig(tmp_path / "kc", api.url,
                                                  {"token": "secret"})))
    assert get(conn) == 200
    seen = api.requests[-1]
    assert seen.authorization == "Bearer secret" and seen.user_agent == C.USER_AGENT


def test_master_url_alone_sends_no_credentials(api):
    api.token = None
    conn = C.ApiConnection(child(master=api.url + "/"))
    assert conn.server == api.url
    assert get(conn) == 200 and api.requests[-1].authorization is None


def test_the_master_url_overrides_the_kubeconfigs_server(api, tmp_path):
    kc = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9", {"token": "secret"})
    conn = C.ApiConnection(child(kc, api.url))
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer secret"


@pytest.mark.parametrize("case, message", [
    ("missing", r"--kubecfg-file='.*/nope': no such file"),
    ("not yaml", r"--kubecfg-file='.*/kc' cannot be used"),
    ("bad url", r"--kube-master-url='10.0.0.1:6443' needs a scheme and a host"),
    ("no flags", r"not running inside a cluster .*; give --kubecfg-file or --kube-master-url"),
])
def test_the_childs_errors_name_the_flag_and_what_to_do(tmp_path, monkeypatch, case, message):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "kc").write_text("clusters: [\n")
    flags = {"missing": (str(tmp_path / "nope"), ""), "not yaml": (str(tmp_path / "kc"), ""),
             "bad url": ("", "10.0.0.1:6443"), "no flags": ("", "")}[case]
    with pytest.raises(C.ConnectionConfigError, match=message):
        child(*flags, service_account_dir=str(tmp_path))


def test_the_childs_flags_are_env_expanded(api, tmp_path, monkeypatch):
    monkeypatch.setenv("KC_DIR", str(tmp_path))
    write_kubeconfig(tmp_path / "kc", api.url, {"token": "secret"})
    assert child("${KC_DIR}/kc").authorization == "Bearer secret"


def _kubernetes_modules_after(code: str) -> list:
    code += ("; import sys, json; print(json.dumps(sorted("
             "m for m in sys.modules if m.split('.')[0] == 'kubernetes')))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, check=True, timeout=30).stdout)


def test_resolving_in_the_child_leaves_no_kubernetes_module_here():
    assert _kubernetes_modules_after(
        "from kdns.kube import connection as C; C.resolve_in_child('', 'http://127.0.0.1:9')"
    ) == []
    # The control: the same resolution in-process imports it.
    assert "kubernetes.client" in _kubernetes_modules_after(
        "from kdns.kube import kubeconfig; kubeconfig.resolve(kube_master_url='http://h:9')")


# ---- what a request does ------------------------------------------------------------------------

def test_no_request_is_retried_behind_the_watch_loop(api, tmp_path):
    conn = C.ApiConnection(child(write_kubeconfig(tmp_path / "kc", api.url,
                                                  {"token": "secret"})))
    api.inject("namespaces", "list", HttpError(503, retry_after=1))
    resp = conn.get("/api/v1/namespaces", timeout=TIMEOUT)
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert b"injected 503" in resp.read()
    resp.release_conn()
    api.inject("namespaces", "list", Reset())
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        conn.get("/api/v1/namespaces", timeout=TIMEOUT)
    assert api.count(verb="list", resource="namespaces") == 2


def test_a_rotated_token_file_is_used_by_the_next_request(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    api.token = "first"
    kc = write_kubeconfig(tmp_path / "kc", api.url, {"tokenFile": "token"})   # relative
    resolve = lambda: child(kc)                                              # noqa: E731
    conn = C.ApiConnection(resolve(), resolve=resolve)
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer first"
    api.token = "second"
    (tmp_path / "token.new").write_text("second\n")
    os.replace(tmp_path / "token.new", token)        # the kubelet's atomic swap
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer second"
    token.write_text("")                             # half-written: the last good one stays
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer second"
    assert conn.resolves == 1, "a token file needs no new child"


def test_an_expiring_exec_credential_is_resolved_again_before_it_expires(api, tmp_path):
    api.token = None                         # every request passes; the test reads its header
    plugin = ExecPlugin(tmp_path / "plugin", "t1", expiry="2030-01-01T00:00:00Z")
    expiry = 1893456000.0                    # 2030-01-01T00:00:00Z
    kc = write_kubeconfig(tmp_path / "kc", api.url, plugin.user())
    now = [expiry - 3600]
    resolve = lambda: child(kc)                                              # noqa: E731
    conn = C.ApiConnection(resolve(), resolve=resolve, clock=lambda: now[0])
    assert conn.info.expires_at == expiry
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer t1"
    plugin.set("t2", expiry="2030-01-02T00:00:00Z")
    now[0] = expiry - C.EXPIRY_SKEW - 1      # not yet within the client's margin
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer t1"
    assert plugin.runs == 1
    now[0] = expiry - C.EXPIRY_SKEW
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer t2"
    assert plugin.runs == 2 and conn.resolves == 2
    assert conn.info.expires_at == expiry + 86400


def test_a_401_runs_the_exec_plugin_again_at_most_once_per_interval(api, tmp_path):
    plugin = ExecPlugin(tmp_path / "plugin", "secret")
    kc = write_kubeconfig(tmp_path / "kc", api.url, plugin.user())
    mono = [0.0]
    resolve = lambda: child(kc)                                              # noqa: E731
    conn = C.ApiConnection(resolve(), resolve=resolve, monotonic=lambda: mono[0])
    assert get(conn) == 200 and plugin.runs == 1
    api.token = "rotated"                    # the old credential is revoked...
    plugin.set("rotated")                    # ...and the plugin hands out the new one
    assert get(conn) == 401
    assert get(conn) == 200 and api.requests[-1].authorization == "Bearer rotated"
    assert plugin.runs == 2
    api.token = "again"                      # rejected again, right after a re-resolve:
    assert [get(conn), get(conn)] == [401, 401]
    assert plugin.runs == 2                  # held back for the interval
    mono[0] += C.REFRESH_INTERVAL - 0.1
    assert get(conn) == 401 and plugin.runs == 2
    mono[0] += 0.1
    plugin.set("again")
    assert get(conn) == 200 and plugin.runs == 3


def test_a_failed_re_resolve_keeps_the_current_credentials(api, caplog):
    calls = []

    def resolve():
        calls.append(1)
        if len(calls) > 1:
            raise C.ConnectionConfigError("--kubecfg-file='kc': no such file")
        return C.ConnectionInfo(server=api.url, authorization="Bearer secret")

    conn = C.ApiConnection(resolve(), resolve=resolve)
    api.token = "other"
    assert get(conn) == 401
    with caplog.at_level(logging.WARNING, logger="kdns.kube.connection"):
        assert get(conn) == 401
    assert len(calls) == 2 and "keeping the current ones" in caplog.text
    assert api.requests[-1].authorization == "Bearer secret"


def test_what_the_child_logs_is_logged_here(api, tmp_path, caplog):
    plugin = ExecPlugin(tmp_path / "plugin", "secret")
    (plugin.dir / "plugin.py").write_text("import sys; sys.exit('no credentials for you')")
    kc = write_kubeconfig(tmp_path / "kc", api.url, plugin.user())
    with caplog.at_level(logging.WARNING, logger="kdns.kube.connection"):
        info = child(kc)
    # As the client in-process did: the failure is logged and the requests go without
    # credentials (401s, backed off and retried by the watch loop).
    assert info.authorization is None
    assert "no credentials for you" in caplog.text


# ---- TLS --------------------------------------------------------------------------------------

def _openssl(d: pathlib.Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs; server certificates for IP 127.0.0.1 ("ip") and for the name api.kdns.test
    only ("named"); a client certificate with CN kdns-client. All signed by "ca"."""
    d = tmp_path_factory.mktemp("pki")

    def key(name):
        _openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", f"{name}.key")

    for ca in ("ca", "other-ca"):
        key(ca)
        _openssl(d, "req", "-x509", "-new", "-key", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN={ca}")
    for name, cn, ext in (("ip", "127.0.0.1", "subjectAltName=IP:127.0.0.1"),
                          ("named", "api.kdns.test", "subjectAltName=DNS:api.kdns.test"),
                          ("client", "kdns-client", "extendedKeyUsage=clientAuth")):
        key(name)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(d, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext")
    return d


@pytest.fixture
def tls_api(pki):
    server = FakeApiServer(token="secret", tls=Tls(
        cert=str(pki / "ip.crt"), key=str(pki / "ip.key"), client_ca=str(pki / "ca.crt"),
        client_cn="kdns-client")).start()
    try:
        yield server
    finally:
        server.close()


def tls_kubeconfig(path, server: str, pki, *, cluster: dict, user: dict) -> str:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
           "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
           "users": [{"name": "u", "user": user}]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def b64(path) -> str:
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


@pytest.mark.parametrize("form", ["data", "files"])
def test_a_client_certificate_authenticates_over_a_verified_connection(tls_api, pki, tmp_path,
                                                                       monkeypatch, form):
    # The client writes ``…-data`` to temporary files; the child must remove them on exit.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    if form == "data":
        cluster = {"certificate-authority-data": b64(pki / "ca.crt")}
        user = {"client-certificate-data": b64(pki / "client.crt"),
                "client-key-data": b64(pki / "client.key")}
    else:
        for name in ("ca.crt", "client.crt", "client.key"):      # relative to the kubeconfig
            (tmp_path / name).write_bytes((pki / name).read_bytes())
        cluster = {"certificate-authority": "ca.crt"}
        user = {"client-certificate": "client.crt", "client-key": "client.key"}
    kc = tls_kubeconfig(tmp_path / "kc", tls_api.url, pki, cluster=cluster, user=user)
    conn = C.ApiConnection(child(kc))
    assert not list(tmp.iterdir())
    assert get(conn) == 200
    seen = tls_api.requests[-1]
    assert seen.client_cn == "kdns-client" and seen.authorization is None
    # The key went from the child's pipe into OpenSSL through anonymous memory: no file of
    # this process holds it once the context is built.
    fds = os.listdir("/proc/self/fd")
    assert not [fd for fd in fds if "memfd:kdns-client-cert" in _readlink(fd)]


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_an_untrusted_server_is_refused_unless_told_to_skip_verification(tls_api, pki,
                                                                        tmp_path):
    user = {"token": "secret"}
    kc = tls_kubeconfig(tmp_path / "kc", tls_api.url, pki,
                        cluster={"certificate-authority-data": b64(pki / "other-ca.crt")},
                        user=user)
    conn = C.ApiConnection(child(kc))
    with pytest.raises(urllib3.exceptions.SSLError, match="certificate verify failed"):
        get(conn)
    kc = tls_kubeconfig(tmp_path / "kc2", tls_api.url, pki,
                        cluster={"insecure-skip-tls-verify": True}, user=user)
    conn = C.ApiConnection(child(kc))
    assert not conn.info.verify
    assert get(conn) == 200 and tls_api.requests[-1].authorization == "Bearer secret"


def test_tls_server_name_is_the_name_checked(pki, tmp_path):
    server = FakeApiServer(token="secret", tls=Tls(cert=str(pki / "named.crt"),
                                                   key=str(pki / "named.key"))).start()
    try:
        ca = {"certificate-authority-data": b64(pki / "ca.crt")}
        kc = tls_kubeconfig(tmp_path / "kc", server.url, pki, cluster=ca,
                            user={"token": "secret"})
        with pytest.raises(urllib3.exceptions.SSLError, match="127.0.0.1"):
            get(C.ApiConnection(child(kc)))       # the certificate names api.kdns.test only
        kc = tls_kubeconfig(tmp_path / "kc2", server.url, pki,
                            cluster={**ca, "tls-server-name": "api.kdns.test"},
                            user={"token": "secret"})
        assert get(C.ApiConnection(child(kc))) == 200
    finally:
        server.close()


def test_in_cluster_over_tls_follows_the_service_account_token(tls_api, pki, tmp_path,
                                                              monkeypatch):
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("secret")
    (sa / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", tls_api.url.rsplit(":", 1)[1])
    resolve = lambda: child(service_account_dir=str(sa))                     # noqa: E731
    conn = C.ApiConnection(resolve(), resolve=resolve)
    assert conn.server == tls_api.url
    assert get(conn) == 200 and tls_api.requests[-1].authorization == "Bearer secret"
    tls_api.token = "rotated"
    (sa / "token.new").write_text("rotated")
    os.replace(sa / "token.new", sa / "token")
    # The client alone re-read it once a minute; the connection at the next request.
    assert get(conn) == 200 and tls_api.requests[-1].authorization == "Bearer rotated"
    assert conn.resolves == 1
