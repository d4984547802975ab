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


def _prefetch(text: str) -> tuple:
    """--cache-prefetch AMOUNT[,DURATION[,PERCENT]] (CoreDNS ``prefetch``'s arguments)."""
    parts = text.split(",")
    if not 1 <= len(parts) <= 3 or not parts[0].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not AMOUNT[,DURATION[,PERCENT]], "
                                         f"e.g. 10,1m,10")
    amount = int(parts[0])
    dur = _duration(parts[1]) if len(parts) > 1 else settings.PREFETCH_DURATION
    pct = parts[2].rstrip("%") if len(parts) > 2 else str(settings.PREFETCH_PERCENT)
    if not pct.isdigit() or not 10 <= int(pct) <= 90:
        raise argparse.ArgumentTypeError(f"the prefetch percentage {parts[2]!r} is not 10 to 90")
    if dur <= 0:
        raise argparse.ArgumentTypeError("the prefetch duration must be above 0")
    return (amount, dur, int(pct))


def _duration(text: str) -> float:
    """A duration flag: seconds, plain or Go-style as kube-dns/CoreDNS write them (5s, 500ms,
    1m30s), from 0 to 1h."""
    from kdns.forward.kubedns_config import parse_duration
    try:
        v = parse_duration(text, bare_seconds=True)
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


def _add_tuning_flags(s: argparse.ArgumentParser) -> None:
    """The forwarder's and the cache's options (CoreDNS forward's and cache's)."""
    s.add_argument("--forward-policy", choices=("random", "round_robin", "sequential"),
                   default=settings.FORWARD_POLICY,
                   help="which upstream is tried first: random, round_robin (one further per "
                        "query) or sequential (always the first, then the next); default random")
    s.add_argument("--forward-max-concurrent",
                   type=_int_in(1, 1_000_000, "a query count from 1 to 1000000"),
                   default=settings.FORWARD_MAX_CONCURRENT, metavar="N",
                   help="upstream queries in flight per worker; beyond it a new one is "
                        f"REFUSED, as CoreDNS's max_concurrent (default "
                        f"{settings.FORWARD_MAX_CONCURRENT})")
    s.add_argument("--forward-force-tcp", action="store_true",
                   help="ask upstreams over TCP only (default: UDP, TCP after a truncated reply)")
    s.add_argument("--cache-size", type=_int_in(1, 10_000_000, "an entry count from 1 to 10000000"),
                   default=settings.CACHE_SIZE, metavar="N",
                   help=f"forwarded answers cached per worker (default {settings.CACHE_SIZE})")
    ttl = _int_in(0, 2**31 - 1, "a TTL in seconds")
    s.add_argument("--cache-success-ttl", type=ttl, default=settings.CACHE_SUCCESS_TTL,
                   metavar="SECONDS",
                   help="longest a positive forwarded answer is cached, in seconds "
                        f"(default {settings.CACHE_SUCCESS_TTL})")
    s.add_argument("--cache-denial-ttl", type=ttl, default=settings.CACHE_DENIAL_TTL,
                   metavar="SECONDS",
                   help="longest an NXDOMAIN or NODATA is cached, in seconds (RFC 2308; "
                        f"default {settings.CACHE_DENIAL_TTL})")
    s.add_argument("--serve-stale", nargs="?", type=_duration, default=settings.SERVE_STALE,
                   const=settings.SERVE_STALE_DURATION, metavar="DURATION",
                   help="answer from expired cache entries up to DURATION past expiry when the "
                        "upstreams fail or are slow (RFC 8767; without DURATION 1h; default off)")
    s.add_argument("--cache-prefetch", type=_prefetch, default=settings.CACHE_PREFETCH,
                   metavar="AMOUNT[,DURATION[,PERCENT]]",
                   help="refresh a cached forwarded answer upstream before it expires once "
                        "it was asked AMOUNT times with no gap of DURATION (default 1m) and "
                        "its remaining TTL is at most PERCENT (10 to 90, default 10) of its "
                        "lifetime (CoreDNS cache prefetch; default off)")
    s.add_argument("--corefile", default="", metavar="PATH",
                   help="a CoreDNS Corefile (the coredns ConfigMap mounted): its kubernetes, "
                        "forward, cache, health, ready, prometheus... settings; re-read every "
                        "--config-period (not with --config-dir or --config-map)")
    s.add_argument("--corefile-configmap", nargs="?", const=settings.COREFILE_CONFIGMAP,
                   default="", metavar="NAME",
                   help="read the Corefile from this ConfigMap's Corefile key through the "
                        "Kubernetes API (default name coredns, in --config-map-namespace), "
                        "polled every --config-period; imports are read from /etc/coredns")
    s.add_argument("--corefile-unsupported", choices=("refuse", "warn"), default="refuse",
                   help="a Corefile plugin or option kdns does not implement: refuse to start "
                        "(default), or warn: log each one and start without it")


# The settings a Corefile decides, by their flag (argparse) names; a flag left at its
# default gives way to the Corefile, a flag given another value wins (and is logged).
COREFILE_FLAGS = ("domain", "ttl", "pods", "dns_bind_address", "dns_port", "health_port",
                  "ready_port", "metrics_port", "lameduck", "log_queries", "forward_policy",
                  "forward_max_concurrent", "forward_force_tcp", "cache_size",
                  "cache_success_ttl", "cache_denial_ttl", "serve_stale", "resolv_conf",
                  "loadbalance", "cache_prefetch", "autopath")


def _read_corefile_configmap(a: argparse.Namespace):
    """The coredns ConfigMap's Corefile, read once through the API (before anything starts:
    the cluster domain and the ports come from it). (settings, None) or (None, problem)."""
    from kdns.forward import corefile
    from kdns.kube.configmap import ConfigMapPoller, connection_for
    name, ns = a.corefile_configmap, a.config_map_namespace
    try:
        conn = connection_for(getattr(a, "kubecfg_file", ""), getattr(a, "kube_master_url", ""))
    except ValueError as e:
        return None, f"--corefile-configmap needs the Kubernetes API: {e}"
    poller = ConfigMapPoller(name, ns, a.config_period, conn)
    poller.fetch()
    got = poller.take()
    if got is None:
        return None, (f"--corefile-configmap: cannot read ConfigMap {ns}/{name} through the "
                      f"API (the log line above says why); check --kube-master-url and RBAC.")
    if got[0] == "absent":
        return None, f"--corefile-configmap: ConfigMap {ns}/{name} does not exist."
    label = f"configmap/{ns}/{name}:Corefile"
    text = corefile.configmap_text(got[1], label)
    a.corefile_configmap_data = got[1]
    return corefile.parse(label, text=text), None


def _apply_corefile(a: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """Read --corefile (or --corefile-configmap) into ``a``; the problem as one sentence,
    or None."""
    from kdns.forward import corefile
    flag = "--corefile" if a.corefile else "--corefile-configmap"
    if a.corefile and a.corefile_configmap:
        return "--corefile and --corefile-configmap cannot be used together; choose one."
    if a.config_map or a.config_dir:
        other = "--config-map" if a.config_map else "--config-dir"
        return (f"{flag} and {other} cannot be used together: the Corefile's forward "
                f"blocks replace the kube-dns ConfigMap; choose one.")
    try:
        if a.corefile:
            cf = corefile.parse(a.corefile)
        else:
            cf, problem = _read_corefile_configmap(a)
            if problem:
                return problem
    except corefile.CorefileError as e:
        return f"{flag}: {e}"
    if cf.unsupported:
        if a.corefile_unsupported == "refuse":
            more = len(cf.unsupported) - 1
            return (f"{flag}: {cf.unsupported[0]}"
                    + (f" ({more} more; --corefile-unsupported=warn lists them)" if more else "")
                    + " Remove it, or pass --corefile-unsupported=warn to start without it.")
        a.corefile_warnings = [f"{w} Ignored (--corefile-unsupported=warn)."
                               for w in cf.unsupported]
    values = dict(cf.flags)
    if cf.resolv_conf is not None:
        values["resolv_conf"] = cf.resolv_conf
    pinned, notes = set(), []
    for key in COREFILE_FLAGS:
        default = parser.get_default(key)
        if getattr(a, key) != default:
            pinned.add(key)
            if key in values and values[key] != getattr(a, key):
                notes.append(f"--{key.replace('_', '-')} {getattr(a, key)} overrides the "
                             f"Corefile's {values[key]!r}")
        elif key in values:
            setattr(a, key, values[key])
    a.corefile_notes = notes
    a.corefile_settings = cf
    a.corefile_pinned = frozenset(pinned)
    problem = _hosts_source(a, cf)
    if problem:
        return f"{flag}: {problem}"
    a.endpoint_pod_names = cf.flags.get("endpoint_pod_names", False)
    a.serve_stale_refresh = cf.flags.get("serve_stale_refresh") if "serve_stale" not in pinned \
        else None
    a.cache_min_ttl = cf.flags.get("cache_min_ttl", settings.CACHE_MIN_TTL)
    return None


def _hosts_source(a: argparse.Namespace, cf) -> str | None:
    """The Corefile's hosts plugin: its records read once now (a bad line stops the start,
    naming file:line), its source kept for re-reading. Through the API, a hosts file in the
    directory the ConfigMap is mounted at (/etc/coredns) that names one of its keys is that
    key (k3s mounts its ``NodeHosts`` key there); another path is read from disk, as imports
    are."""
    from kdns.forward import hosts as H
    a.hosts_box = a.hosts_source = None
    if cf.hosts is None:
        return None
    key, text = None, None
    data = getattr(a, "corefile_configmap_data", None)
    if data is not None and os.path.dirname(cf.hosts.path) == settings.COREFILE_DIR \
            and os.path.basename(cf.hosts.path) in data:
        base = os.path.basename(cf.hosts.path)
        key = f"configmap/{a.config_map_namespace}/{a.corefile_configmap}:{base}"
        text = data[base]
    src = H.HostsSource(cf.hosts, a.domain.rstrip(".").lower(), configmap_key=key)
    try:
        records = src.load_first(text)
    except H.HostsError as e:
        return str(e)
    a.hosts_box, a.hosts_source = H.HostsBox(records), src
    return None


def _forwarding(a: argparse.Namespace):
    from kdns.forward.control import ForwardingOptions
    if getattr(a, "corefile", "") or getattr(a, "corefile_configmap", ""):
        return ForwardingOptions(
            config_dir="", config_period=a.config_period, resolv_conf=a.resolv_conf,
            config_map=a.corefile_configmap, config_map_namespace=a.config_map_namespace,
            corefile_configmap=bool(a.corefile_configmap),
            nameservers=a.nameservers, cache_size=a.cache_size,
            kubecfg_file=getattr(a, "kubecfg_file", ""),
            kube_master_url=getattr(a, "kube_master_url", ""),
            **_tuning(a), corefile=a.corefile,
            corefile_strict=a.corefile_unsupported == "refuse",
            corefile_first=a.corefile_settings, pinned=a.corefile_pinned,
            hosts_source=getattr(a, "hosts_source", None),
            rewrites=a.corefile_settings.rewrites)
    return ForwardingOptions(config_dir="" if a.config_map else (a.config_dir or "/kube-dns-config"),
                             config_period=a.config_period, resolv_conf=a.resolv_conf,
                             nameservers=a.nameservers, config_map=a.config_map,
                             config_map_namespace=a.config_map_namespace,
                             kubecfg_file=getattr(a, "kubecfg_file", ""),
                             kube_master_url=getattr(a, "kube_master_url", ""),
                             cache_size=a.cache_size, **_tuning(a))


def _tuning(a: argparse.Namespace) -> dict:
    return dict(forward_policy=a.forward_policy, forward_max_concurrent=a.forward_max_concurrent,
                forward_force_tcp=a.forward_force_tcp, cache_success_ttl=a.cache_success_ttl,
                cache_denial_ttl=a.cache_denial_ttl,
                cache_min_ttl=getattr(a, "cache_min_ttl", settings.CACHE_MIN_TTL),
                serve_stale=a.serve_stale,
                serve_stale_refresh=getattr(a, "serve_stale_refresh", None),
                cache_prefetch=tuple(a.cache_prefetch))


def _forwarding_problem(a: argparse.Namespace) -> str | None:
    if a.config_map and a.config_dir:
        # kube-dns: "Cannot use both ConfigMap and ConfigDir".
        return "--config-map and --config-dir cannot be used together; choose one."
    if a.config_period <= 0:
        return "--config-period must be above 0, e.g. 10s."
    if a.config_map:
        from kdns.kube.configmap import connection_for
        try:
            connection_for(getattr(a, "kubecfg_file", ""), getattr(a, "kube_master_url", ""))
        except ValueError as e:            # connection.ConnectionConfigError
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
                   help="address to serve DNS on (default ::, both IPv6 and IPv4 on one socket; "
                        "0.0.0.0 on a node without IPv6)")
    port = _int_in(0, 65535, "a port from 0 to 65535")
    s.add_argument("--dns-port", type=port, default=settings.DNS_PORT,
                   help=f"DNS port (default {settings.DNS_PORT})")
    s.add_argument("--workers", type=_int_in(1, 1024, "a number of workers from 1 to 1024"),
                   default=None,
                   help="worker slots, each with its own UDP and TCP socket (default: the "
                        "cgroup CPU quota rounded up, at most the CPUs this process may use; "
                        "without a quota, those CPUs)")
    s.add_argument("--worker-processes", type=_int_in(1, 1024, "a number of processes from 1 "
                                                               "to 1024"),
                   default=None, metavar="P",
                   help=f"processes the worker slots run in, as threads: a process that "
                        f"crashes or stalls is replaced with all its slots (their sockets, "
                        f"and what queued on them, are kept), and each process beyond the "
                        f"first costs ~6 MiB and a zygote (default "
                        f"{settings.DEFAULT_WORKER_PROCESSES}, at most --workers; 2 or more "
                        f"keep the other processes' slots serving while one is replaced, "
                        f"equal to --workers gives each slot a process of its own)")
    s.add_argument("--healthz-port", type=port, default=settings.HEALTHZ_PORT,
                   help="kube-dns /readiness port (default 8081; 0 disables)")
    s.add_argument("--metrics-port", type=port, default=settings.METRICS_PORT,
                   help="CoreDNS-style Prometheus /metrics port (default 9153; 0 disables)")
    s.add_argument("--loadbalance", nargs="?", const=True, type=logs.go_bool,
                   default=settings.LOADBALANCE, metavar="BOOL",
                   help="rotate the order of A, AAAA and SRV answers with several records, so "
                        "clients that use the first address spread over the endpoints "
                        "(CoreDNS loadbalance; default true; --loadbalance=false or "
                        "--no-loadbalance keeps the compiled order)")
    s.add_argument("--no-loadbalance", dest="loadbalance", action="store_false",
                   help=argparse.SUPPRESS)
    s.add_argument("--autopath", nargs="?", const=True, type=logs.go_bool, default=False,
                   metavar="BOOL",
                   help="walk a pod's search path on the server (CoreDNS autopath "
                        "@kubernetes): a name under <ns>.svc.<zone> asked by a pod of <ns> "
                        "that does not exist is answered, behind a CNAME, by the first of "
                        "<base>.svc.<zone>, <base>.<zone>, <base> under --resolv-conf's search "
                        "domains, and <base> that exists; needs a watch of the pods' IPs")
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
    _add_tuning_flags(s)
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    s.add_argument("--v", type=_int_in(0, 10, "a kube-dns verbosity from 0 to 10"), default=None,
                   metavar="N", help="kube-dns (glog) verbosity; 3 or more means --log-level debug")

    s.add_argument("--serve-image", nargs="?", const=True, type=logs.go_bool, default=False,
                   metavar="BOOL",
                   help="serve the sealed zone image at /image on --healthz-port for "
                        "`kdns node-local` (full, or deltas against a node's previous "
                        "generation; long-poll; default false)")
    _add_node_local_parser(sub, port)

    r = sub.add_parser("records", help="print the zone kdns would serve, as a master file")
    r.add_argument("--from-file", type=_readable("--from-file"), metavar="PATH", required=True)
    _add_record_flags(r)
    return p


def _host_port(text: str):
    """IP[:PORT] (IPv6 as [IP]:PORT) -> Upstream, port 53 by default."""
    from kdns.forward.forwarder import Upstream
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise argparse.ArgumentTypeError(f"{text!r}: the port is not 1 to 65535")
        port = int(p)
    return Upstream(_address(host), port)


def _addresses(text: str) -> tuple[str, ...]:
    out = tuple(_address(x.strip()) for x in text.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError("give at least one address")
    return out


def _add_node_local_parser(sub, port) -> None:
    n = sub.add_parser("node-local", help="serve DNS on a node from the central kdns's "
                                          "zone image (a DaemonSet beside kdns serve)")
    n.add_argument("--image-url", required=True, metavar="URL",
                   help="the central kdns's image stream, e.g. "
                        "http://kdns-image.kube-system.svc:8081/image (kdns serve --serve-image)")
    n.add_argument("--listen", type=_addresses, default=("169.254.20.10",), metavar="IP,...",
                   help="addresses to answer on: the link-local one pods are given and, "
                        "optionally, the kube-dns ClusterIP (default 169.254.20.10)")
    n.add_argument("--dns-port", type=port, default=settings.DNS_PORT,
                   help=f"DNS port (default {settings.DNS_PORT})")
    n.add_argument("--workers", type=_int_in(1, 64, "a number of workers from 1 to 64"),
                   default=1, help=f"worker slots per listen address (default 1); the slots "
                                   f"of every address run as threads of "
                                   + ("one worker process" if settings.DEFAULT_WORKER_PROCESSES
                                      == 1 else f"at most {settings.DEFAULT_WORKER_PROCESSES} "
                                      f"worker processes"))
    n.add_argument("--domain", type=_domain, default=settings.DOMAIN,
                   help="the cluster domain the central kdns serves (default cluster.local)")
    n.add_argument("--kube-dns-upstream", type=_host_port, action="append", default=[],
                   metavar="IP[:PORT]",
                   help="the kube-dns Service (a second Service of the central pods, as "
                        "NodeLocal DNSCache's kube-dns-upstream, when --listen takes the "
                        "ClusterIP): cluster names go there over TCP while the image stream "
                        "is stale; without it the last image keeps answering")
    n.add_argument("--stale-after", type=_duration, default=60.0, metavar="DURATION",
                   help="how long without an answer from the image stream before the image "
                        "counts as stale (default 60s)")
    n.add_argument("--poll-wait", type=_duration, default=30.0, metavar="DURATION",
                   help="long-poll length of each image stream request (default 30s; below "
                        "--stale-after)")
    n.add_argument("--upstream", choices=("node", "central"), default="node",
                   help="where outside names go: the node's resolvers (--resolv-conf, "
                        "default), or the central kdns (--central-dns)")
    n.add_argument("--central-dns", type=_host_port, default=None, metavar="IP[:PORT]",
                   help="the central kdns's DNS Service, for --upstream central")
    n.add_argument("--resolv-conf", default=settings.RESOLV_CONF, metavar="PATH",
                   help="the node's resolv.conf (default /etc/resolv.conf)")
    n.add_argument("--cache-size", type=_int_in(1, 10_000_000, "an entry count"),
                   default=settings.CACHE_SIZE, metavar="N",
                   help=f"forwarded answers cached per worker (default {settings.CACHE_SIZE})")
    n.add_argument("--setup-interface", nargs="?", const=True, type=logs.go_bool, default=True,
                   metavar="BOOL", help="create the interface holding the listen addresses "
                                        "at start, delete it at exit (default true)")
    n.add_argument("--interface-name", default="nodelocaldns", metavar="NAME",
                   help="that interface's name (default nodelocaldns)")
    n.add_argument("--interface-type", default="dummy", metavar="TYPE",
                   help="its link type (default dummy; another for kernels without it)")
    n.add_argument("--setup-iptables", nargs="?", const=True, type=logs.go_bool, default=True,
                   metavar="BOOL", help="add the NOTRACK and ACCEPT rules for the listen "
                                        "addresses at start, remove them at exit (default true)")
    n.add_argument("--health-port", type=port, default=settings.HEALTH_PORT,
                   help="/health port on the first listen address (default 8080; 0 disables)")
    n.add_argument("--ready-port", type=port, default=0,
                   help="/ready port (default 0: off)")
    n.add_argument("--metrics-port", type=port, default=9253,
                   help="Prometheus /metrics port (default 9253, NodeLocal DNSCache's: the "
                        "node's network may also carry a central kdns on 9153; 0 disables)")
    n.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    n.add_argument("--version", action="version", version=_version())
    logs.add_klog_flags(n, _duration)


def cmd_node_local(a: argparse.Namespace) -> int:
    from kdns.forward.control import ForwardingOptions
    from kdns.nodelocal import netsetup, run
    if a.poll_wait >= a.stale_after:
        return _fail(f"--poll-wait {a.poll_wait:g}s must be below --stale-after "
                     f"{a.stale_after:g}s: a quiet long-poll would count as stale.")
    if a.upstream == "central" and a.central_dns is None:
        return _fail("--upstream central needs --central-dns IP[:PORT].")
    if a.image_url.split("://", 1)[0] != "http":
        return _fail(f"--image-url {a.image_url!r} is not an http:// URL.")
    for flag in ("--health-port", "--ready-port", "--metrics-port"):
        value = getattr(a, flag[2:].replace("-", "_"))
        if value and value == a.dns_port:
            return _fail(f"{flag} {value} is also the --dns-port; choose another.")
    try:
        logs.setup(a.log_level, a)
    except OSError as e:
        return _fail(f"cannot open the log file ({e.strerror or e}); fix --log-file/--log-dir.")
    fwd = ForwardingOptions(config_dir=None, resolv_conf=a.resolv_conf,
                            nameservers=(a.central_dns,) if a.upstream == "central" else (),
                            cache_size=a.cache_size)
    if a.upstream == "central":
        fwd.resolv_conf = "/nonexistent/kdns-node-local"     # the central only
    cfg = server.ServeConfig(domain=a.domain, dns_port=a.dns_port, healthz_port=0,
                             metrics_port=a.metrics_port, health_port=a.health_port,
                             ready_port=a.ready_port, lameduck=0.0, forwarding=fwd,
                             log_level=logs.level_for(a.log_level, None),
                             log_format=logs.format_of(a))
    setup = None
    if a.setup_interface or a.setup_iptables:
        setup = netsetup.NodeSetup(a.listen, interface=a.interface_name,
                                   kind=a.interface_type, setup_interface=a.setup_interface,
                                   setup_iptables=a.setup_iptables, port=a.dns_port)
    nl = run.NodeLocalOptions(image_url=a.image_url, addresses=a.listen,
                              workers_per_address=a.workers,
                              kube_dns_upstream=tuple(a.kube_dns_upstream),
                              stale_after=a.stale_after, poll_wait=a.poll_wait, setup=setup)
    try:
        return run.serve(cfg, nl)
    except (server.StartError, server.LoadError) as e:
        return _fail(str(e))


def _config(a: argparse.Namespace) -> server.ServeConfig:
    return server.ServeConfig(
        from_file=a.from_file, from_image=a.from_image, domain=a.domain,
        kubecfg_file=a.kubecfg_file, kube_master_url=a.kube_master_url,
        initial_sync_timeout=a.initial_sync_timeout,
        dns_bind_address=a.dns_bind_address, dns_port=a.dns_port, ttl=a.ttl, workers=a.workers,
        healthz_port=a.healthz_port, metrics_port=a.metrics_port, pods=a.pods,
        endpoint_pod_names=getattr(a, "endpoint_pod_names", False),
        edns_udp_size=a.edns_udp_size, tcp_idle_timeout=a.tcp_idle_timeout,
        tcp_max_connections=a.tcp_max_connections, lameduck=a.lameduck,
        tcp_max_per_source=a.tcp_max_per_source,
        share_dns_port=a.share_dns_port,
        forwarding=_forwarding(a),
        log_level=logs.level_for(a.log_level, a.v), log_format=logs.format_of(a),
        health_port=a.health_port, ready_port=a.ready_port, sidecar_port=a.sidecar_port,
        log_queries=a.log_queries, hosts=getattr(a, "hosts_box", None),
        rewrites=getattr(getattr(a, "corefile_settings", None), "rewrites", ()),
        loadbalance=a.loadbalance, serve_image=a.serve_image, autopath=_autopath(a))


def _autopath(a: argparse.Namespace):
    """None (autopath off), or the server's search domains autopath tries after the
    cluster's (CoreDNS's autopath takes them from its resolv.conf)."""
    if not getattr(a, "autopath", False):
        return None
    from kdns.forward.kubedns_config import parse_resolv_search
    return parse_resolv_search(getattr(a, "resolv_conf", settings.RESOLV_CONF))


def _fail(message: str) -> int:
    sys.stderr.write(f"kdns: {message}\n")
    return 2


def _prometheus_env(cfg: server.ServeConfig) -> str | None:
    """kube-dns's PROMETHEUS_PORT/PROMETHEUS_PATH: skydns_* metrics when the port is set."""
    text = settings.ENV.prometheus_port.strip()
    if text:
        if not text.isdigit() or not 0 < int(text) <= 65535:
            return f"PROMETHEUS_PORT={text!r} is not a port from 1 to 65535; fix or unset it."
        cfg.prometheus_port = int(text)
    path = settings.ENV.prometheus_path.strip() or "/metrics"
    if not path.startswith("/"):
        return f"PROMETHEUS_PATH={path!r} must start with /; fix or unset it."
    cfg.prometheus_path = path
    return None


def cmd_serve(a: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    if a.corefile or a.corefile_configmap:
        problem = _apply_corefile(a, parser or _serve_parser())
        if problem:
            return _fail(problem)
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
    for line in getattr(a, "corefile_warnings", ()):
        logging.getLogger("kdns").warning("%s", line)
    for line in getattr(a, "corefile_notes", ()):
        logging.getLogger("kdns").info("%s", line)
    cfg.workers, cfg.workers_why, cfg.workers_warning = _workers(a.workers)
    problem = _worker_processes(a, cfg)
    if problem:
        return _fail(problem)
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


def _worker_processes(a: argparse.Namespace, cfg) -> str | None:
    """--worker-processes against the worker count: more processes than slots is a
    mistake when both flags were given (say so); when the count came from the CPUs, the
    processes are capped at it (the same manifest runs on any node)."""
    p = getattr(a, "worker_processes", None)
    if p is None:
        return None
    if p > cfg.workers:
        if a.workers is not None:
            return (f"--worker-processes {p} is more than --workers {cfg.workers}: each "
                    f"process serves at least one worker; lower it or raise --workers.")
        logging.getLogger("kdns").info("--worker-processes %d capped at the %d workers (%s)",
                                       p, cfg.workers, cfg.workers_why)
        p = cfg.workers
    cfg.worker_processes = p
    return None


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


def _serve_parser() -> argparse.ArgumentParser:
    """The ``serve`` subparser (its defaults tell a flag given from one left alone)."""
    p = build_parser()
    sub = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction))
    return sub.choices["serve"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(logs.normalise_flag_names(argv))
    if a.command == "serve":
        return cmd_serve(a, _serve_parser())
    if a.command == "node-local":
        return cmd_node_local(a)
    return cmd_records(a)


if __name__ == "__main__":
    sys.exit(main())
