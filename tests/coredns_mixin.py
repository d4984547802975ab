"""Every PromQL expression of the coredns-mixin's alerts and dashboard, written out by hand.

Source: github.com/povilasv/coredns-mixin, alerts/coredns.libsonnet, alerts/forward.libsonnet
and dashboards/coredns.libsonnet, with the mixin's defaults (config.libsonnet): selector
``k8s_app="kube-dns"``, instance label ``pod``, ``kubernetesPlugin: false``. Dashboard
variables are filled in as Grafana would: ``$instance`` → ``.*``, ``$__rate_interval`` → 1m.
Alert expressions are listed without their threshold (``> 4``, ``> 0.03``, ``> 0``): the
test asks that each returns series, which a threshold would hide while nothing is wrong.

``EXCLUDED`` are the expressions kdns cannot honestly serve, with the reason.
"""
SEL = 'k8s_app="kube-dns"'
INST = f'{SEL},pod=~".*"'
RI = "1m"

ALERTS = {
    # CoreDNSDown is absent(up == 1): it must return nothing while kdns is up.
    "CoreDNSDown (inverted)": f"up{{{SEL}}} == 1",
    "CoreDNSLatencyHigh": (f"histogram_quantile(0.99, sum(rate(coredns_dns_request_duration_"
                           f"seconds_bucket{{{SEL}}}[5m])) by(server, zone, le))"),
    "CoreDNSErrorsHigh": (f'sum(rate(coredns_dns_responses_total{{{SEL},rcode="SERVFAIL"}}[5m]))'
                          f" / sum(rate(coredns_dns_responses_total{{{SEL}}}[5m]))"),
    "CoreDNSForwardLatencyHigh": (f"histogram_quantile(0.99, sum(rate(coredns_forward_request_"
                                  f"duration_seconds_bucket{{{SEL}}}[5m])) by(to, le))"),
    "CoreDNSForwardErrorsHigh": (f'sum(rate(coredns_forward_responses_total{{{SEL},'
                                 f'rcode="SERVFAIL"}}[5m])) / sum(rate(coredns_forward_'
                                 f"responses_total{{{SEL}}}[5m]))"),
    "CoreDNSForwardHealthcheckFailureCount": (f"sum(rate(coredns_forward_healthcheck_failures_"
                                              f"total{{{SEL}}}[5m])) by (to)"),
    "CoreDNSForwardHealthcheckBrokenCount": (f"sum(rate(coredns_forward_healthcheck_broken_"
                                             f"total{{{SEL}}}[5m]))"),
}

DASHBOARD = {
    "Up": f"sum(up{{{SEL}}})",
    "Panics": f"sum(coredns_panics_total{{{SEL}}})",
    "RPC Rate": f"sum(rate(coredns_dns_responses_total{{{INST}}}[{RI}])) by (rcode)",
    "RPC Rate (forward)": f"sum(rate(coredns_forward_responses_total{{{INST}}}[{RI}])) by (rcode)",
    "Request duration 99th quantile": (
        f"histogram_quantile(0.99, sum(rate(coredns_dns_request_duration_seconds_bucket"
        f"{{{INST}}}[{RI}])) by (server, zone, le))"),
    "Request duration 99th quantile (forward)": (
        f"histogram_quantile(0.99, sum(rate(coredns_forward_request_duration_seconds_bucket"
        f"{{{INST}}}[{RI}])) by (to, le))"),
    "Requests (by qtype)": f"sum(rate(coredns_dns_requests_total{{{INST}}}[{RI}])) by (type)",
    "Requests (by zone)": f"sum(rate(coredns_dns_requests_total{{{INST}}}[{RI}])) by (zone)",
    "Forward Requests (by to)": (f"sum(rate(coredns_forward_requests_total{{{INST}}}[{RI}])) "
                                 f"by (to)"),
    "Plugins Enabled": f"count(sum(coredns_plugin_enabled{{{INST}}}) by (name))",
    "Request size 99th": (f"histogram_quantile(0.99, sum(rate(coredns_dns_request_size_bytes_"
                          f"bucket{{{INST}}}[{RI}])) by (server, zone, proto, le))"),
    "Request size 50th": (f"histogram_quantile(0.50, sum(rate(coredns_dns_request_size_bytes_"
                          f"bucket{{{INST}}}[{RI}])) by (server, zone, proto, le))"),
    "Response size 99th": (f"histogram_quantile(0.99, sum(rate(coredns_dns_response_size_bytes_"
                           f"bucket{{{INST}}}[{RI}])) by (server, zone, proto, le))"),
    "Response size 50th": (f"histogram_quantile(0.50, sum(rate(coredns_dns_response_size_bytes_"
                           f"bucket{{{INST}}}[{RI}])) by (server, zone, proto, le))"),
    "Cached": (f"sum(coredns_cache_hits_total{{{INST}}}) / (sum(coredns_cache_misses_total"
               f"{{{INST}}}) + sum(coredns_cache_hits_total{{{INST}}}))"),
    "Cache hit Rate": f"sum(rate(coredns_cache_hits_total{{{INST}}}[{RI}])) by (type)",
    "Cache hit Rate (misses)": f"sum(rate(coredns_cache_misses_total{{{INST}}}[{RI}]))",
    "Cache Size": f"sum(coredns_cache_entries{{{INST}}}) by (type)",
    "Memory": f"process_resident_memory_bytes{{{INST}}}",
    "CPU usage": f"rate(process_cpu_seconds_total{{{INST}}}[{RI}])",
}

EXCLUDED = {
    "Goroutines": (f"go_goroutines{{{INST}}}",
                   "a Go runtime gauge; kdns is not a Go program and reports no stand-in"),
}
