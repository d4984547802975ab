"""A ConfigMap's data read through the API, polled (the kube-dns ConfigMap with --config-map).

Why a poll, not a watch: one small object; a poll bounds the delay exactly as --config-dir's
file polling does, with no watch to keep alive.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("kdns.kube.configmap")


def api_client_for(kubecfg_file: str, kube_master_url: str):
    from kdns.kube import kubeconfig        # imported only with --config-map: it is large
    return kubeconfig.api_client_from_flags(kubecfg_file=kubecfg_file,
                                            kube_master_url=kube_master_url)


class ConfigMapPoller:
    """--config-map: GET the ConfigMap every --config-period in a thread (one small object:
    a poll bounds the delay exactly as --config-dir's does, with no watch to keep alive). A
    missing ConfigMap means defaults, as in kube-dns; an unreachable API keeps the last one."""

    def __init__(self, name: str, namespace: str, period: float, api_client):
        self.name, self.namespace = name, namespace
        self.period, self.api = period, api_client
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
        from kubernetes import client
        from kubernetes.client.rest import ApiException
        try:
            cm = client.CoreV1Api(self.api).read_namespaced_config_map(
                self.name, self.namespace, _request_timeout=(5, 5))
            got = (f"rv:{cm.metadata.resource_version}", dict(cm.data or {}))
        except ApiException as e:
            if e.status != 404:
                return self._failed(f"HTTP {e.status} {e.reason}")
            got = ("absent", {})
        except Exception as e:   # noqa: BLE001 -- network, TLS: keep the last config
            return self._failed(str(e))
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
