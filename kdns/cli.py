"""``kdns serve`` and ``kdns records``: flags, validation, exit codes.

Why: kube-dns users bring kube-dns flags (``--domain``, ``--dns-bind-address``,
``--dns-port``, ``--healthz-port``); a wrong flag must fail fast with one sentence that
names it, exit status 2, and nothing half-started.

What it must not do: do I/O beyond reading the input named on the command line.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from kdns import settings
from kdns.observe import logs
from kdns.serve import cpus
from kdns.serve import supervisor as server

LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits 2.

    No abbreviations: kube-dns (pflag) accepts only whole flag names."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`).\n")


def _int_in(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range; give {what}")
        return v
    return parse


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < v <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is out of range; give seconds above 0 and at most 86400")
    return v


def _duration(text: str) -> float:
    """Seconds, plain or Go-style as kube-dns/CoreDNS write them: 5s, 500ms, 1m."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0))
    t = text.strip()
    for suffix, scale in units:
        if t.endswith(suffix) and (suffix != "s" or not t.endswith("ms")):
            t, mult = t[:-len(suffix)], scale
            break
    else:
        mult = 1.0
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 5s or 500ms)") from None
    if not 0 <= v <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is out of range; give 0 to 1h")
    return v


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _domain(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or any(not label or len(label) > 63 for label in labels) or len(name) > 253:
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain name (like cluster.local)")
    return name


def _readable(flag: str):
    def check(path: str) -> str:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "is not a readable file"
            raise argparse.ArgumentTypeError(f"{path} {why}; give the path of a readable file")
        return path
    return check


def _add_record_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", type=_domain, default=settings.DOMAIN,
                   help="cluster domain served authoritatively (default cluster.local)")
    p.add_argument("--ttl", type=_int_in(0, 2**31 - 1, "a TTL in seconds, 0 to 2147483647"),
                   default=settings.TTL, help=f"TTL of cluster records (default {settings.TTL})")
    p.add_argument("--pods", choices=("insecure", "verified", "disabled"), default=settings.PODS,
                   help="pod A/AAAA records: insecure (any IP), verified (only existing pods), "
                        "or disabled (default insecure)")


def _version() -> str:
    return f"kdns {logs.kdns_version()}"


def _federations(text: str) -> str:
    """kube-dns --federations: name=domain[,name=domain] (deprecated, dns-rules §3.1)."""
    for part in filter(None, text.split(",")):
        name, eq, domain = part.partition("=")
        if not eq or not name or not domain:
            raise argparse.ArgumentTypeError(f"{part!r} is not name=domain")
        _domain(domain)
    return text


def _add_drop_in_flags(s: argparse.ArgumentParser, port) -> None:
    """The listeners of the kube-dns pod and of CoreDNS, and kube-dns's own flags
    that kdns accepts with the same meaning."""
    s.add_argument("--health-port", type=port, default=settings.HEALTH_PORT,
                   help="CoreDNS-style /health port: 200 while the workers answer a DNS probe "
                        "(default 8080; 0 disables)")
    s.add_argument("--ready-port", type=port, default=settings.READY_PORT,
                   help="CoreDNS-style /ready port (default 8181; 0 disables)")
    s.add_argument("--sidecar-port", type=port, default=settings.SIDECAR_PORT,
                   help="what kube-dns's sidecar serves: /healthcheck/kubedns, /healthz and "
                        "kubedns_* /metrics (default 10054; 0 disables; set 0 when the real "
                        "sidecar runs in the same pod)")
    s.add_argument("--federations", type=_federations, default="", metavar="NAME=DOMAIN,...",
                   help="deprecated kube-dns federation names; accepted, not served (a warning "
                        "is logged)")
    s.add_argument("--profiling", nargs="?", const=True, type=logs.go_bool, default=False,
                   metavar="BOOL", help="accepted for kube-dns compatibility; kdns has no "
                                        "pprof endpoint (a note is logged)")
    s.add_argument("--log-queries", action="store_true",
                   help="log each query that reaches Python (TCP, and names handed to the "
                        "forwarder) with its rcode, and every 10s a count of all queries by "
                        "protocol and rcode; UDP queries answered by the compiled path are "
                        "only counted, never logged one by one (default off)")
    s.add_argument("--version", action="version", version=_version())
    logs.add_klog_flags(s, _duration)


def _nameservers(text: str):
    from kdns.forward.kubedns_config import parse_nameservers_flag
    try:
        return parse_nameservers_flag(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--nameservers: ")) from None


def _add_forwarding_flags(s: argparse.ArgumentParser) -> None:
    """kube-dns's flags for names outside the cluster."""
    s.add_argument("--config-dir", default=None, metavar="PATH",
                   help="kube-dns ConfigMap mounted as a directory (stubDomains, "
                        "upstreamNameservers), polled every --config-period; a missing "
                        "directory means defaults (default /kube-dns-config)")
    s.add_argument("--config-period", type=_duration, default=settings.CONFIG_PERIOD, metavar="DURATION",
                   help="how often --config-dir is re-read, e.g. 10s (default 10s)")
    s.add_argument("--config-map", default="", metavar="NAME",
                   help="kube-dns ConfigMap read through the Kubernetes API every "
                        "--config-period (instead of --config-dir)")
    s.add_argument("--config-map-namespace", default=settings.CONFIG_MAP_NAMESPACE, metavar="NAMESPACE",
                   help="namespace of --config-map (default kube-system)")
    s.add_argument("--nameservers", type=_nameservers, default=(), metavar="IP[:PORT],...",
                   help="upstreams used when neither upstreamNameservers nor the resolv.conf "
                        "name any")
    s.add_argument("--resolv-conf", default=settings.RESOLV_CONF, metavar="PATH",
                   help="resolv.conf whose nameserver lines are the default upstreams "
                        "(default /etc/resolv.conf: the node's, with dnsPolicy: Default)")


def _forwarding(a: argparse.Namespace):
    from kdns.forward.control import ForwardingOptions
    return ForwardingOptions(config_dir="" if a.config_map else (a.config_dir or "/kube-dns-config"),
                             config_period=a.config_period, resolv_conf=a.resolv_conf,
                             nameservers=a.nameservers, config_map=a.config_map,
                             config_map_namespace=a.config_map_namespace,
                             kubecfg_file=getattr(a, "kubecfg_file", ""),
                             kube_master_url=getattr(a, "kube_master_url", ""))


def _forwarding_problem(a: argparse.Namespace) -> str | None:
    if a.config_map and a.config_dir:
        # kube-dns: "Cannot use both ConfigMap and ConfigDir".
        return "--config-map and --config-dir cannot be used together; choose one."
    if a.config_period <= 0:
        return "--config-period must be above 0, e.g. 10s."
    if a.config_map:
        from kdns.kube.configmap import api_client_for
        try:
            api_client_for(getattr(a, "kubecfg_file", ""), getattr(a, "kube_master_url", ""))
        except ValueError as e:            # kubeconfig.ConnectionConfigError
            return f"--config-map needs the Kubernetes API: {e}"
    return None


def build_parser() -> Parser:
    p = Parser(prog="kdns", description="Cluster DNS for Kubernetes (a kube-dns replacement).")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("serve", help="serve DNS")
    # Neither source flag means the Kubernetes API, as kube-dns.
    src = s.add_mutually_exclusive_group()
    src.add_argument("--from-file", type=_readable("--from-file"), metavar="PATH",
                     help="Kubernetes objects (kubectl get -o yaml|json); re-read when it changes")
    src.add_argument("--from-image", type=_readable("--from-image"), metavar="PATH",
                     help="a compiled kdns zone image (tests, benchmarks); re-read when it changes")
    s.add_argument("--kubecfg-file", default="", metavar="PATH",
                   help="kubeconfig to reach the Kubernetes API (default: the in-cluster "
                        "service account); ignored with --from-file/--from-image")
    s.add_argument("--kube-master-url", default="", metavar="URL",
                   help="Kubernetes API server URL, e.g. https://10.96.0.1:443 (overrides the "
                        "kubeconfig's server)")
    s.add_argument("--initial-sync-timeout", type=_duration, default=settings.INITIAL_SYNC_TIMEOUT, metavar="DURATION",
                   help="log an error when the first sync with the API takes longer than this; "
                        "kdns keeps trying and stays not ready meanwhile (default 60s)")
    _add_record_flags(s)
    s.add_argument("--dns-bind-address", type=_address, default=settings.DNS_BIND_ADDRESS,
                   help="address to serve DNS on (default 0.0.0.0)")
    port = _int_in(0, 65535, "a port from 0 to 65535")
    s.add_argument("--dns-port", type=port, default=settings.DNS_PORT,
                   help=f"DNS port (default {settings.DNS_PORT})")
    s.add_argument("--workers", type=_int_in(1, 1024, "a number of workers from 1 to 1024"),
                   default=None,
                   help="worker processes (default: the cgroup CPU quota rounded up, at most "
                        "the CPUs this process may use; without a quota, those CPUs)")
    s.add_argument("--healthz-port", type=port, default=settings.HEALTHZ_PORT,
                   help="kube-dns /readiness port (default 8081; 0 disables)")
    s.add_argument("--metrics-port", type=port, default=settings.METRICS_PORT,
                   help="CoreDNS-style Prometheus /metrics port (default 9153; 0 disables)")
    s.add_argument("--share-dns-port", action="store_true",
                   help="serve the DNS port together with another kdns already on it "
                        "(SO_REUSEPORT; a rolling hand-over in one network namespace); "
                        "without it kdns refuses a port another process serves")
    _add_drop_in_flags(s, port)
    s.add_argument("--edns-udp-size", type=_int_in(512, 65535, "a size from 512 to 65535 bytes"),
                   default=settings.EDNS_UDP_SIZE,
                   help=f"largest UDP reply advertised with EDNS (default {settings.EDNS_UDP_SIZE})")
    s.add_argument("--tcp-idle-timeout", type=_positive_seconds, default=settings.TCP_IDLE_TIMEOUT,
                   help="close a TCP connection idle this many seconds (default 10)")
    s.add_argument("--tcp-max-connections",
                   type=_int_in(1, 1_000_000, "a connection count from 1 to 1000000"),
                   default=settings.TCP_MAX_CONNECTIONS,
                   help=f"TCP connections per worker (default {settings.TCP_MAX_CONNECTIONS})")
    s.add_argument("--tcp-max-per-source",
                   type=_int_in(1, 1_000_000, "a connection count from 1 to 1000000"),
                   default=settings.TCP_MAX_PER_SOURCE,
                   help="TCP connections per client address per worker; at this or "
                        "--tcp-max-connections the oldest idle one is closed for a new one "
                        f"(RFC 7766 §10; default {settings.TCP_MAX_PER_SOURCE})")
    s.add_argument("--lameduck", type=_duration, default=settings.LAMEDUCK, metavar="DURATION",
                   help="after SIGTERM, report not ready but keep answering this long before "
                        "exiting 0, e.g. 5s (default 5s, as CoreDNS's kubeadm Corefile; "
                        "0 stops at once)")
    _add_forwarding_flags(s)
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    s.add_argument("--v", type=_int_in(0, 10, "a kube-dns verbosity from 0 to 10"), default=None,
                   metavar="N", help="kube-dns (glog) verbosity; 3 or more means --log-level debug")

    r = sub.add_parser("records", help="print the zone kdns would serve, as a master file")
    r.add_argument("--from-file", type=_readable("--from-file"), metavar="PATH", required=True)
    _add_record_flags(r)
    return p


def _config(a: argparse.Namespace) -> server.ServeConfig:
    return server.ServeConfig(
        from_file=a.from_file, from_image=a.from_image, domain=a.domain,
        kubecfg_file=a.kubecfg_file, kube_master_url=a.kube_master_url,
        initial_sync_timeout=a.initial_sync_timeout,
        dns_bind_address=a.dns_bind_address, dns_port=a.dns_port, ttl=a.ttl, workers=a.workers,
        healthz_port=a.healthz_port, metrics_port=a.metrics_port, pods=a.pods,
        edns_udp_size=a.edns_udp_size, tcp_idle_timeout=a.tcp_idle_timeout,
        tcp_max_connections=a.tcp_max_connections, lameduck=a.lameduck,
        tcp_max_per_source=a.tcp_max_per_source,
        share_dns_port=a.share_dns_port,
        forwarding=_forwarding(a),
        log_level=logs.level_for(a.log_level, a.v),
        health_port=a.health_port, ready_port=a.ready_port, sidecar_port=a.sidecar_port,
        log_queries=a.log_queries)


def _fail(message: str) -> int:
    sys.stderr.write(f"kdns: {message}\n")
    return 2


def _prometheus_env(cfg: server.ServeConfig) -> str | None:
    """kube-dns's PROMETHEUS_PORT/PROMETHEUS_PATH: skydns_* metrics when the port is set."""
    text = os.environ.get("PROMETHEUS_PORT", "").strip()
    if text:
        if not text.isdigit() or not 0 < int(text) <= 65535:
            return f"PROMETHEUS_PORT={text!r} is not a port from 1 to 65535; fix or unset it."
        cfg.prometheus_port = int(text)
    path = os.environ.get("PROMETHEUS_PATH", "").strip() or "/metrics"
    if not path.startswith("/"):
        return f"PROMETHEUS_PATH={path!r} must start with /; fix or unset it."
    cfg.prometheus_path = path
    return None


def cmd_serve(a: argparse.Namespace) -> int:
    http_ports = ("--healthz-port", "--metrics-port", "--health-port", "--ready-port",
                  "--sidecar-port")
    for flag in http_ports:
        value = getattr(a, flag[2:].replace("-", "_"))
        if value and value == a.dns_port:
            return _fail(f"{flag} {value} is also the --dns-port; choose another.")
    problem = _forwarding_problem(a)
    if problem:
        return _fail(problem)
    cfg = _config(a)
    problem = _prometheus_env(cfg)
    if problem:
        return _fail(problem)
    try:
        logs.setup(cfg.log_level, a)
    except OSError as e:
        return _fail(f"cannot open the log file ({e.strerror or e}); fix --log-file/--log-dir.")
    cfg.workers, cfg.workers_why, cfg.workers_warning = _workers(a.workers)
    if a.profiling:
        logging.getLogger("kdns").info("--profiling: kdns has no pprof endpoint; ignored")
    if a.federations:
        logging.getLogger("kdns").warning(
            "--federations is deprecated in kube-dns and not supported by kdns; federation "
            "names will not resolve (remove the flag to silence this warning)")
    try:
        return server.serve(cfg)
    except (server.StartError, server.LoadError) as e:
        return _fail(str(e))


def _workers(flag: int | None, root: str = "/") -> tuple[int, str, str | None]:
    """(workers, what decided it, a warning or None): --workers when given, else the count
    the cgroup CPU quota allows. The supervisor logs both once it starts, so an operator
    sees why a pod runs the workers it runs (and a failed start says only what failed)."""
    if flag is not None:
        return flag, "--workers", None
    usable = len(os.sched_getaffinity(0))
    n, quota = cpus.decide_workers(root, usable)
    if quota.cpus is not None:
        why = f"CPU quota {quota.cpus:g} from {quota.source}, {usable} CPUs usable"
    else:
        why = f"{quota.source}: the {usable} CPUs usable"
    return n, why, quota.warning


def cmd_records(a: argparse.Namespace) -> int:
    try:
        from kdns.kube import records
    except ImportError as e:
        return _fail(f"kdns records needs kdns.kube.records, which failed to import ({e}).")
    try:
        text = records.master_file(a.from_file, domain=a.domain, ttl=a.ttl, pods=a.pods)
    except records.InputError as e:
        return _fail(f"--from-file {a.from_file}: {e}")
    except OSError as e:
        return _fail(f"cannot read --from-file {a.from_file}: {e.strerror or e}.")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(logs.normalise_flag_names(argv))
    return {"serve": cmd_serve, "records": cmd_records}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
