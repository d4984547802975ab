"""A real Prometheus server on loopback that scrapes the targets a test gives it.

Why: a metric is only as good as the queries operators run on it; this runs them, with the
`prometheus` binary from Debian (the package that also provides promtool), against a
running kdns, instead of parsing the exposition and guessing what PromQL would make of it.

Scrapes every second into a temporary TSDB; ``query`` runs an instant query over the HTTP
API. Its port is drawn, and a start that loses the port to another socket is retried.
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request

import yaml

from conftest import require_tool
from serverutil import HOST, free_port

SCRAPE_INTERVAL = "1s"


class PrometheusServer:
    def __init__(self, tmp_path, targets: list[str], labels: dict[str, str], *,
                 metrics_path: str = "/metrics", rule_groups: list | None = None):
        self.tmp = tmp_path
        self.binary = require_tool("prometheus")
        cfg = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
               "scrape_configs": [{"job_name": "kdns", "metrics_path": metrics_path,
                                   "static_configs": [{"targets": targets,
                                                       "labels": labels}]}]}
        if rule_groups:
            rules = tmp_path / "rules.yml"
            rules.write_text(yaml.safe_dump({"groups": rule_groups}))
            cfg["rule_files"] = [str(rules)]
        self.config = tmp_path / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        for attempt in range(5):
            self.port = free_port(HOST)
            log = open(self.tmp / f"prometheus-{attempt}.log", "wb")
            self.log_path = log.name
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.tmp / f'tsdb-{attempt}'}",
                 f"--web.listen-address={HOST}:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{self.port}/-/ready",
                                                timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.1)
            text = open(self.log_path, errors="replace").read()
            self.stop()
            if "address already in use" not in text:
                raise AssertionError(f"prometheus did not start:\n{text}")
        raise AssertionError("prometheus lost its port five times in a row")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        url = (f"http://{HOST}:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        assert len(res) <= 1, (expr, res)
        return float(res[0]["value"][1]) if res else None

    def rules(self) -> dict[str, dict]:
        """Loaded alerting rules by name: their health ("ok" once evaluated) and state."""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/api/v1/rules", timeout=10) as r:
            doc = json.loads(r.read())
        return {rule["name"]: rule for g in doc["data"]["groups"] for rule in g["rules"]}

    def wait_scrapes(self, n: int, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully ``n`` times more from now."""
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline:
            res = self.query('count_over_time(up{job="kdns"}[10m])')
            counts = [float(r["value"][1]) for r in res]
            if counts:
                if first is None:
                    first = min(counts)
                if min(counts) >= first + n:
                    return
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not scrape {n} times in {timeout}s")
