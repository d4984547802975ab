"""A ConfigMap's data read through the API, polled (the kube-dns ConfigMap with --config-map).

Why a poll, not a watch: one small object; a poll bounds the delay exactly as --config-dir's
file polling does, with no watch to keep alive.
"""
from __future__ import annotations

import json
import logging
import threading
from urllib.parse import quote

log = logging.getLogger("kdns.kube.configmap")


def connection_for(kubecfg_file: str, kube_master_url: str):
    """The process's API connection for these flags (``connection.connect``: resolved once,
    shared with the watchers); ConnectionConfigError names the flag."""
    from kdns.kube import connection
    return connection.connect(kubecfg_file, kube_master_url)


class ConfigMapPoller:
    """--config-map: GET the ConfigMap every --config-period in a thread (one small object:
    a poll bounds the delay exactly as --config-dir's does, with no watch to keep alive). A
    missing ConfigMap means defaults, as in kube-dns; an unreachable API keeps the last one."""

    def __init__(self, name: str, namespace: str, period: float, connection):
        self.name, self.namespace = name, namespace
        self.period, self.api = period, connection
        self.stop = threading.Event()
        self._latest: tuple[str, dict] | None = None
        self._lock = threading.Lock()
        self._failing = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="kdns-configmap", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.fetch()

    def fetch(self) -> None:
        import urllib3
        path = (f"/api/v1/namespaces/{quote(self.namespace, safe='')}/configmaps/"
                f"{quote(self.name, safe='')}")
        try:
            resp = self.api.get(path, timeout=(5, 5))
            try:
                body = resp.read()
            finally:
                resp.release_conn()
            if resp.status == 404:
                got = ("absent", {})
            elif resp.status != 200:
                return self._failed(f"HTTP {resp.status} {resp.reason}")
            else:
                cm = json.loads(body)
                meta, data = cm.get("metadata") or {}, cm.get("data") or {}
                if not isinstance(data, dict):
                    raise ValueError("its data is not an object")
                got = (f"rv:{meta.get('resourceVersion')}", dict(data))
        except (urllib3.exceptions.HTTPError, OSError) as e:    # network, TLS
            return self._failed(str(e))
        except (ValueError, AttributeError, TypeError) as e:
            # Not a ConfigMap (a proxy's error page, say): keep the last configuration.
            return self._failed(f"unreadable answer: {e}")
        if self._failing:
            log.info("ConfigMap %s/%s readable again", self.namespace, self.name)
        self._failing = False
        with self._lock:
            self._latest = got

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning("cannot read ConfigMap %s/%s (%s); keeping the current configuration "
                        "and retrying every %gs", self.namespace, self.name, why, self.period)
        self._failing = True

    def take(self) -> tuple[str, dict] | None:
        with self._lock:
            got, self._latest = self._latest, None
        return got
