"""The node-local's metrics, beside the CoreDNS ones on --metrics-port."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class NodeLocalCollector:
    def __init__(self, sup):
        self.sup = sup

    def collect(self):
        src = self.sup.source
        g = GaugeMetricFamily("kdns_nodelocal_stale", "1 while the image stream has not "
                              "answered for --stale-after: cluster names are then forwarded "
                              "to the kube-dns Service (with --kube-dns-upstream), else "
                              "answered from the last image.")
        g.add_metric([], 1.0 if src.stale else 0.0)
        yield g
        g = GaugeMetricFamily("kdns_nodelocal_forwarding_cluster_names", "1 while cluster "
                              "names are forwarded to the kube-dns Service over TCP.")
        g.add_metric([], 1.0 if self.sup.stale_forwarding else 0.0)
        yield g
        g = GaugeMetricFamily("kdns_nodelocal_image_staleness_seconds", "Seconds since the "
                              "central kdns last confirmed the image served.")
        g.add_metric([], src.staleness_seconds())
        yield g
        c = CounterMetricFamily("kdns_nodelocal_transfers", "Image stream answers by kind "
                                "(full image, delta, not modified).", labels=["transfer"])
        for kind in ("full", "delta", "not_modified"):
            c.add_metric([kind], src.stats[kind])
        yield c
        c = CounterMetricFamily("kdns_nodelocal_transfer_bytes", "Bytes received from the "
                                "image stream, by transfer kind.", labels=["transfer"])
        for kind in ("full", "delta"):
            c.add_metric([kind], src.stats["bytes_" + kind])
        yield c
        c = CounterMetricFamily("kdns_nodelocal_stream_errors", "Failed image stream requests "
                                "(unreachable, bad image, delta that did not apply).")
        c.add_metric([], src.stats["errors"])
        yield c
