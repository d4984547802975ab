"""The kube-dns connection flags resolved by the official ``kubernetes`` client, in a child.

Why: kube-dns users pass ``--kubecfg-file`` and ``--kube-master-url`` (or nothing, in a pod);
kdns takes auth and TLS from the client's own loaders (kubeconfig contexts, the in-cluster
service account, exec/OIDC/gcp credential plugins, client certificates) rather than
re-implementing them. This module is what ``python -m kdns.kube.kubeconfig`` runs: it
applies those loaders and prints one JSON object, a ``connection.ConnectionInfo`` (or
``{"error": …}`` with exit status 2), then exits, so the package it imports (about 24 MiB
resident) never stays in the long-lived supervisor (``connection.py``).

Same choices as client-go's ``BuildConfigFromFlags``: neither flag means the in-cluster
service account; ``--kubecfg-file`` means that file's current context; ``--kube-master-url``
overrides the server, and alone means no credentials. Both flags are $VAR-expanded.

What it must not do: talk to the API (the first request is the watch loop's), build DNS
names, or import anything from kdns outside ``kdns.kube``.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys

import yaml
from kubernetes import client, config
from kubernetes.config import incluster_config, kube_config

from kdns.kube.connection import (SERVICE_ACCOUNT_DIR, ConnectionConfigError, ConnectionInfo,
                                  check_master_url, expand_env)


def resolve(*, kubecfg_file: str = "", kube_master_url: str = "", environ=os.environ,
            service_account_dir: str = SERVICE_ACCOUNT_DIR) -> ConnectionInfo:
    """The connection kube-dns would make from the same flags (see the module docstring)."""
    kubecfg_file = expand_env(kubecfg_file, environ)
    master = check_master_url(expand_env(kube_master_url, environ)) if kube_master_url else ""
    cfg = client.Configuration()
    token_file, expiry = None, None
    if kubecfg_file:
        token_file, expiry = _load_kubeconfig(kubecfg_file, cfg)
    elif not master:
        token_file = _load_incluster(cfg, environ, service_account_dir)
    if master:
        cfg.host = master
    return _describe(cfg, token_file, expiry)


def _load_kubeconfig(path: str, cfg: client.Configuration):
    if not os.path.isfile(path):
        raise ConnectionConfigError(f"--kubecfg-file={path!r}: no such file; give the path "
                                    "of a kubeconfig, or omit the flag inside a cluster")
    try:
        # What config.load_kube_config does, keeping the loader: the expiry of a plugin's
        # credentials lives only there.
        loader = kube_config._get_kube_config_loader(filename=path, persist_config=False)
        loader.load_and_set(cfg)
    except (config.ConfigException, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConnectionConfigError(f"--kubecfg-file={path!r} cannot be used: {e}") from None
    expiry = loader.__dict__.get("expiry")
    if expiry is not None:
        expires_at = expiry.timestamp()
    elif loader._user and "auth-provider" in loader._user:
        # OIDC: the loader checks the id-token's expiry only while loading, so say when
        # it expires and the connection resolves it (and refreshes it) again before then.
        expires_at = _jwt_expiry(cfg.api_key.get("BearerToken") or "")
    else:
        expires_at = None
    return _kubeconfig_token_file(path), expires_at


def _jwt_expiry(authorization: str) -> float | None:
    """The ``exp`` claim (RFC 7519 §4.1.4) of a bearer JWT, or None."""
    try:
        payload = authorization.split(" ", 1)[1].split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        return float(exp)
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _kubeconfig_token_file(path: str) -> str | None:
    """The current user's ``tokenFile`` (made absolute) when the client took the token from
    it: an inline token and an auth-provider win over it, as in client-go."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    ctx_name = doc.get("current-context")
    ctx = next((c.get("context") or {} for c in doc.get("contexts") or []
                if c.get("name") == ctx_name), {})
    user = next((u.get("user") or {} for u in doc.get("users") or []
                 if u.get("name") == ctx.get("user")), {})
    token_file = user.get("tokenFile")
    if not token_file or user.get("token") or user.get("auth-provider"):
        return None
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


def _describe(cfg: client.Configuration, token_file: str | None,
              expiry: float | None) -> ConnectionInfo:
    """The client's Configuration as plain data, read the way its REST layer reads it."""
    # As set by the loaders (their refresh hooks would run a plugin again): "Bearer …", or
    # "Basic …" from a kubeconfig's username and password.
    authorization = cfg.api_key.get("BearerToken") or None
    ca_pem = _read(cfg.ssl_ca_cert, "certificate-authority")
    if getattr(cfg, "ca_cert_data", None):
        data = cfg.ca_cert_data
        ca_pem = (ca_pem or "") + (data.decode() if isinstance(data, bytes) else data)
    return ConnectionInfo(
        server=cfg.host.rstrip("/"), verify=bool(cfg.verify_ssl), ca_pem=ca_pem,
        tls_server_name=cfg.tls_server_name or None,
        client_cert_pem=_read(cfg.cert_file, "client-certificate"),
        client_key_pem=_read(cfg.key_file, "client-key"),
        authorization=authorization, token_file=token_file, expires_at=expiry,
        proxy=_proxy(cfg))


def _read(path: str | None, what: str) -> str | None:
    """The content of a file the client names: the kubeconfig's, or a temporary one it
    wrote from ``…-data`` and removes when this process exits."""
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise ConnectionConfigError(f"the kubeconfig's {what} {path!r} cannot be read: "
                                    f"{e}") from None


def _proxy(cfg: client.Configuration) -> str | None:
    """The proxy the client's REST layer would use for the server (the kubeconfig's
    proxy-url, or the environment's unless no_proxy exempts the server)."""
    if not cfg.proxy:
        return None
    from kubernetes.client import rest
    bypass = getattr(rest, "should_bypass_proxies", None)   # client versions before 37: none
    if bypass is not None and bypass(cfg.host, getattr(cfg, "no_proxy", None) or ""):
        return None
    return cfg.proxy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdns.kube.kubeconfig",
                                description="print the API connection kdns would make, as "
                                            "JSON (secrets included: for kdns's own use)")
    p.add_argument("--kubecfg-file", default="")
    p.add_argument("--kube-master-url", default="")
    p.add_argument("--service-account-dir", default=SERVICE_ACCOUNT_DIR)
    a = p.parse_args(argv)
    try:
        info = resolve(kubecfg_file=a.kubecfg_file, kube_master_url=a.kube_master_url,
                       service_account_dir=a.service_account_dir)
    except ConnectionConfigError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(info.to_json())
    return 0


if __name__ == "__main__":
    code = main()
    # The supervisor waits for this process before its first request. Tearing down the
    # client's modules would take it a tenth of a second longer; the one thing exit must do
    # is remove the temporary files the loader wrote certificates to.
    kube_config._cleanup_temp_files()
    sys.stdout.flush()
    os._exit(code)
