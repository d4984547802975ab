"""How kdns reaches the Kubernetes API: the kube-dns connection flags turned into an ApiClient.

Why: kube-dns users pass ``--kubecfg-file`` and ``--kube-master-url`` (or nothing, in a pod);
kdns must accept the same and get auth and TLS from the official ``kubernetes`` client rather
than re-implementing them. This module adds what the client lacks for a process that runs for
months: a bearer token read from a file is re-read when the file changes (projected service
account tokens are rotated by the kubelet, roughly hourly), and retries are left to our own
watch loop (``api.py``) so there is exactly one retry policy.

What it must not do: talk to the API (the first request is made by the watch loop), build DNS
names, or import anything from kdns outside ``kdns.kube``.
"""
from __future__ import annotations

import os
import re
import threading
from urllib.parse import urlsplit

import yaml
from kubernetes import client, config
from kubernetes.config import incluster_config

USER_AGENT = "kdns/0.1 (cluster DNS)"
SERVICE_ACCOUNT_DIR = os.path.dirname(incluster_config.SERVICE_TOKEN_FILENAME)


class ConnectionConfigError(ValueError):
    """The connection flags or files cannot be used; the message says which and what to do."""


def expand_env(value: str, environ=os.environ) -> str:
    """$VAR and ${VAR} replaced like Go's os.ExpandEnv (kube-dns applies it to both flags):
    unset variables become empty."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: environ.get(m.group(1) or m.group(2), ""), value)


def check_master_url(url: str) -> str:
    """The URL itself, or ConnectionConfigError: kube-dns requires a scheme and a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectionConfigError(
            f"--kube-master-url={url!r} needs a scheme and a host, "
            "for example https://10.96.0.1:443")
    return url.rstrip("/")


def api_client_from_flags(*, kubecfg_file: str = "", kube_master_url: str = "",
                          environ=os.environ,
                          service_account_dir: str = SERVICE_ACCOUNT_DIR) -> client.ApiClient:
    """An ApiClient configured as kube-dns would be from the same flags.

    Neither flag: in-cluster service account. ``--kubecfg-file``: that file's current context.
    ``--kube-master-url``: that server (overriding the kubeconfig's, as client-go's
    BuildConfigFromFlags does); alone it means no credentials.
    """
    kubecfg_file = expand_env(kubecfg_file, environ)
    master = check_master_url(expand_env(kube_master_url, environ)) if kube_master_url else ""
    cfg = client.Configuration()
    token_file = None
    if kubecfg_file:
        token_file = _load_kubeconfig(kubecfg_file, cfg)
    elif not master:
        token_file = _load_incluster(cfg, environ, service_account_dir)
    if master:
        cfg.host = master
    # One retry policy, ours (backoff with jitter, Retry-After): urllib3's silent retries would
    # hide failures from it and multiply requests against an overloaded API server.
    cfg.retries = False
    if token_file:
        follow_token_file(cfg, token_file)
    api = client.ApiClient(cfg)
    api.user_agent = USER_AGENT
    return api


def _load_kubeconfig(path: str, cfg: client.Configuration) -> str | None:
    if not os.path.isfile(path):
        raise ConnectionConfigError(f"--kubecfg-file={path!r}: no such file; give the path "
                                    "of a kubeconfig, or omit the flag inside a cluster")
    try:
        config.load_kube_config(config_file=path, client_configuration=cfg,
                                persist_config=False)
    except (config.ConfigException, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConnectionConfigError(f"--kubecfg-file={path!r} cannot be used: {e}") from None
    return _kubeconfig_token_file(path)


def _kubeconfig_token_file(path: str) -> str | None:
    """The current user's ``tokenFile`` (made absolute), which the client reads only once."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    ctx_name = doc.get("current-context")
    ctx = next((c.get("context") or {} for c in doc.get("contexts") or []
                if c.get("name") == ctx_name), {})
    user = next((u.get("user") or {} for u in doc.get("users") or []
                 if u.get("name") == ctx.get("user")), {})
    token_file = user.get("tokenFile")
    if not token_file or user.get("token"):
        return None                    # an inline token wins in client-go; nothing to follow
    return os.path.join(os.path.dirname(os.path.abspath(path)), token_file)


def _load_incluster(cfg: client.Configuration, environ, sa_dir: str) -> str:
    token_file = os.path.join(sa_dir, "token")
    loader = incluster_config.InClusterConfigLoader(
        token_filename=token_file, cert_filename=os.path.join(sa_dir, "ca.crt"),
        environ=environ)
    try:
        loader.load_and_set(cfg)
    except config.ConfigException as e:
        raise ConnectionConfigError(
            f"not running inside a cluster ({e}); give --kubecfg-file or --kube-master-url"
        ) from None
    return token_file


def follow_token_file(cfg: client.Configuration, path: str) -> None:
    """Make every request carry the token currently in ``path``.

    Chains the client's own refresh hook (in-cluster it re-reads every minute; kubeconfig
    exec/OIDC plugins refresh on expiry) and then re-reads ``path`` whenever its size or
    mtime changed — a stat per request, and requests are rare (list pages, watch starts), so a
    rotated token is used by the very next request instead of up to a minute later.
    """
    previous = cfg.refresh_api_key_hook
    lock = threading.Lock()
    state = {"stamp": None, "token": None}

    def refresh(c: client.Configuration) -> None:
        if previous is not None:
            previous(c)
            # The client's hooks re-install themselves on every call; stay in front of them.
            c.refresh_api_key_hook = refresh
        with lock:
            try:
                st = os.stat(path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != state["stamp"]:
                    with open(path, encoding="utf-8") as f:
                        token = f.read().strip()
                    if token:                  # a half-written file: keep the last good token
                        state["stamp"], state["token"] = stamp, token
            except OSError:
                pass                           # file briefly absent during an atomic swap
            if state["token"]:
                c.api_key["BearerToken"] = "Bearer " + state["token"]

    cfg.refresh_api_key_hook = refresh
    refresh(cfg)
