"""Prometheus exposition in the dialects kdns replaces: CoreDNS, kube-dns (SkyDNS), the sidecar.

Why: dashboards and alerts written for CoreDNS (``coredns_*`` on :9153) or kube-dns
(``skydns_skydns_dns_*`` on ``PROMETHEUS_PORT``, ``kubedns_*`` on the sidecar's :10054) must
keep working. Every value is read when Prometheus scrapes: the workers' shared
counter pages are summed then (docs/architecture.md, "What makes it fast"); prometheus_client is never
called per query. Label sets are bounded: qtypes are the fixed list in ``counters.QTYPES``,
rcodes 17 names, protocols 2, upstreams at most ``counters.FWD_UPSTREAMS``.

Request durations run from a query's arrival to its final reply: the batch's time for what
the image or the cache answered, the relay for what the compiled forwarder sent on, the
reply's send for what Python forwarded (CoreDNS times a request to its final reply too).
The replies of one batch share its time, each under its query type (the ``type`` label).
What is not measured, and therefore not invented: responses are not attributed to a plugin, so
``plugin`` is empty, as CoreDNS writes it for responses no plugin claimed.

What it must not do: sit on the packet path, or touch DNS sockets.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, UnknownMetricFamily)

from kdns.dns.wire import RCODE_NAMES
from kdns.packet import counters as C

# kubedns_probe_<label>_latency_ms buckets (ms); one observation per probe, not per query.
LATENCY_MS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

disable_created_metrics()      # *_created series are OpenMetrics noise neither peer exposes



def version() -> str:
    from kdns.observe.logs import kdns_version
    return kdns_version()


def _cumulative(counts, bounds, scale: float = 1.0):
    """Per-bucket counts (counters.py stores them non-cumulative; the last one is above
    every bound) -> Prometheus's cumulative (le, count) pairs, and the total."""
    out, acc = [], 0
    for count, bound in zip(counts, bounds):
        acc += count
        out.append((_le(bound * scale), acc))
    acc += counts[len(bounds)]
    out.append(("+Inf", acc))
    return out, acc


def _buckets(total: list[int], prefix: str, bounds, scale: float = 1.0):
    """The cumulative pairs of one histogram of the summed pages."""
    return _cumulative([total[C.LAYOUT[f"{prefix}_bucket_{i}"]] for i in range(len(bounds) + 1)],
                       bounds, scale)


def _over_protos(s, kind: str, bounds):
    """The cumulative pairs of a histogram summed over UDP and TCP (``latency``, ...)."""
    return _cumulative([sum(s[f"{kind}_{p}_bucket_{i}"] for p in C.PROTOS)
                        for i in range(len(bounds) + 1)], bounds)[0]


def _le(x: float) -> str:
    return repr(float(x))


class Snapshot:
    """One scrape's view: the summed counter pages and what the supervisor knows."""

    def __init__(self, sup):
        self.sup = sup
        self.total = C.sum_slots(sup.counters, sup.cfg.workers)
        self.fwd = C.forward_totals(sup.counters, sup.cfg.workers)

    def __getitem__(self, name: str) -> int:
        return self.total[C.LAYOUT[name]]


class CoreDNSCollector:
    """coredns_* with CoreDNS's names and labels, plus kdns_* for what CoreDNS has not."""

    def __init__(self, sup):
        self.sup = sup

    def labels(self) -> tuple[str, str, str]:
        cfg = self.sup.cfg
        host = "" if cfg.dns_bind_address in ("0.0.0.0", "::") else cfg.dns_bind_address
        host = f"[{host}]" if ":" in host else host
        return f"dns://{host}:{self.sup.dns_port()}", ".", ""

    def collect(self):
        snap = Snapshot(self.sup)
        yield from self.dns(snap)
        yield from self.cache(snap)
        yield from self.forward(snap)
        yield from self.plugin_info(snap)
        yield from KdnsCollector(self.sup).collect(snap)

    def dns(self, s: Snapshot):
        server, zone, view = self.labels()
        req = CounterMetricFamily("coredns_dns_requests", "Counter of DNS requests made per "
                                  "zone, protocol and family.",
                                  labels=["server", "zone", "view", "proto", "family", "type"])
        # family: the client's, per packet (1 IPv4, including IPv4-mapped clients of the
        # dual-stack socket, 2 IPv6), as CoreDNS labels it.
        for proto in C.PROTOS:
            for qtype, _ in C.QTYPES:
                req.add_metric([server, zone, view, proto, "1", qtype],
                               s[f"queries_{proto}_{qtype}"])
                req.add_metric([server, zone, view, proto, "2", qtype],
                               s[f"v6queries_{proto}_{qtype}"])
        resp = CounterMetricFamily("coredns_dns_responses", "Counter of response status codes.",
                                   labels=["server", "zone", "view", "rcode", "plugin"])
        for rcode, name in enumerate(RCODE_NAMES):
            resp.add_metric([server, zone, view, name, ""],
                            sum(s[f"rcode_{p}_{rcode}"] for p in C.PROTOS))
        dur = HistogramMetricFamily("coredns_dns_request_duration_seconds",
                                    "Histogram of the time (in seconds) each request took.",
                                    labels=["server", "zone", "view", "type"])
        for qtype, _ in C.QTYPES:
            dur.add_metric([server, zone, view, qtype],
                           _buckets(s.total, f"tlatency_{qtype}", C.LATENCY_BOUNDS)[0],
                           s[f"tlatency_{qtype}_sum_ns"] / 1e9)
        do = CounterMetricFamily("coredns_dns_do_requests", "Counter of DNS requests with DO "
                                 "bit set per zone.", labels=["server", "zone", "view"])
        do.add_metric([server, zone, view], sum(s[f"do_{p}"] for p in C.PROTOS))
        out = [req, resp, dur, do]
        for kind, what in (("request", "request"), ("response", "response")):
            h = HistogramMetricFamily(f"coredns_dns_{kind}_size_bytes",
                                      f"Size of the {what} in bytes.",
                                      labels=["server", "zone", "view", "proto"])
            for proto in C.PROTOS:
                pairs, _ = _buckets(s.total, f"{kind}_size_{proto}", C.SIZE_BOUNDS)
                h.add_metric([server, zone, view, proto], pairs, s[f"{kind}_size_{proto}_sum"])
            out.append(h)
        panics = CounterMetricFamily("coredns_panics", "A metrics that counts the number of "
                                     "panics (kdns: workers that died and were replaced).")
        panics.add_metric([], self.sup.worker_deaths)
        out.append(panics)
        return out

    def cache(self, s: Snapshot):
        server, zone, view = self.labels()
        f = s.fwd
        # CoreDNS's type label: "denial" for NXDOMAIN, NODATA and SERVFAIL entries, "success"
        # for the rest; the pages count the total and its denial share.
        hits_all = sum(s[f"cache_hit_{p}"] for p in C.PROTOS) + f["cache_hits"]
        hits_denial = sum(s[f"cache_hit_denial_{p}"] for p in C.PROTOS) + f["cache_hits_denial"]
        by_type = {"hits": (hits_all, hits_denial),
                   "entries": (f["cache_entries"], f["cache_entries_denial"]),
                   "evictions": (f["cache_evictions"], f["cache_evictions_denial"])}
        typed = ["server", "type", "view", "zones"]
        hits = CounterMetricFamily("coredns_cache_hits", "The count of cache hits (forwarded "
                                   "answers served from kdns's cache).", labels=typed)
        size = GaugeMetricFamily("coredns_cache_entries", "The number of elements in the "
                                 "cache (summed over workers).", labels=typed)
        ev = CounterMetricFamily("coredns_cache_evictions", "The count of cache evictions.",
                                 labels=typed)
        for fam, key in ((hits, "hits"), (size, "entries"), (ev, "evictions")):
            total, denial = by_type[key]
            fam.add_metric([server, "success", view, zone], max(0, total - denial))
            fam.add_metric([server, "denial", view, zone], denial)
        # A miss in the UDP packet path is counted once, by whoever forwards it next (the
        # compiled forwarder or the Python Forwarder's cache lookup), in cache_misses.
        miss = CounterMetricFamily("coredns_cache_misses", "The count of cache misses.",
                                   labels=["server", "view", "zones"])
        miss.add_metric([server, view, zone],
                        f["cache_misses"])
        req = CounterMetricFamily("coredns_cache_requests", "The count of cache requests.",
                                  labels=["server", "view", "zones"])
        req.add_metric([server, view, zone], hits_all + f["cache_misses"])
        stale = CounterMetricFamily("coredns_cache_served_stale", "The number of requests "
                                    "served from stale cache entries.",
                                    labels=["server", "view", "zones"])
        stale.add_metric([server, view, zone], f["stale_served"])
        pre = CounterMetricFamily("coredns_cache_prefetch", "The number of times the cache "
                                  "has prefetched a cached item.",
                                  labels=["server", "view", "zones"])
        pre.add_metric([server, view, zone], f["cache_prefetches"])
        return [hits, miss, req, size, ev, stale, pre]

    def forward(self, s: Snapshot):
        fams = []
        for prefix, extra in (("coredns_forward", []), ("coredns_proxy", ["forward"])):
            # coredns_forward_* is what CoreDNS before 1.11 and again from 1.12 writes;
            # CoreDNS 1.11 writes the same numbers as coredns_proxy_* with the name of the
            # plugin that forwarded in proxy_name, which its dashboards select on.
            names = ["proxy_name"] if extra else []
            req = CounterMetricFamily(f"{prefix}_requests", "Counter of requests made per "
                                      "upstream.", labels=names + ["to"])
            resp = CounterMetricFamily(f"{prefix}_responses", "Counter of responses received "
                                       "per upstream.", labels=names + ["to", "rcode"])
            dur = HistogramMetricFamily(f"{prefix}_request_duration_seconds", "Histogram of the "
                                        "time each request took.",
                                        labels=names + ["to", "rcode"])
            for u, up in enumerate(s.fwd["upstreams"]):
                to = up["to"] or f"upstream-{u}"
                req.add_metric(extra + [to], up["requests"])
                for rcode, n in up["rcodes"].items():
                    resp.add_metric(extra + [to, rcode], n)
                dur.add_metric(extra + [to, ""], _cumulative(up["latency"], C.LATENCY_BOUNDS)[0],
                               up["latency_sum_ns"] / 1e9)
            fams += [req, resp, dur]
        # CoreDNS's meanings: a failed health check (an upstream marked down is checked with
        # ". IN NS" until it answers), and a query that found every upstream down. Failed
        # client tries and SERVFAILs given up on are kdns_forward_* below.
        hc = CounterMetricFamily("coredns_forward_healthcheck_failures", "Counter of the number "
                                 "of failed healthchecks.", labels=["to"])
        phc = CounterMetricFamily("coredns_proxy_healthcheck_failures", "Counter of the "
                                  "number of failed healthchecks.", labels=["proxy_name", "to"])
        tries = CounterMetricFamily("kdns_forward_failed_tries", "Tries of client queries "
                                    "that timed out or met a network error, per upstream.",
                                    labels=["to"])
        for u, up in enumerate(s.fwd["upstreams"]):
            to = up["to"] or f"upstream-{u}"
            hc.add_metric([to], up["health_check_failures"])
            phc.add_metric(["forward", to], up["health_check_failures"])
            tries.add_metric([to], up["failures"])
        broken = CounterMetricFamily("coredns_forward_healthcheck_broken", "Counter of the "
                                     "number of complete failures of the healthchecks (queries "
                                     "that found every upstream marked down).")
        broken.add_metric([], s.fwd["all_down"])
        gave_up = CounterMetricFamily("kdns_forward_servfail", "Forwarded queries given up "
                                      "on: every upstream failed, the client got SERVFAIL.")
        gave_up.add_metric([], s.fwd["failures"])
        rej = CounterMetricFamily("coredns_forward_max_concurrent_rejects", "Counter of "
                                  "queries rejected because the concurrent limit was reached.")
        rej.add_metric([], s.fwd["refused_inflight"])
        return fams + [hc, phc, broken, rej, tries, gave_up]

    def plugin_info(self, s: Snapshot):
        info = GaugeMetricFamily("coredns_build_info", "A metric with a constant '1' value "
                                 "labeled by version, revision, and goversion from which "
                                 "CoreDNS was built (kdns: its version and Python's).",
                                 labels=["version", "revision", "goversion"])
        info.add_metric([version(), "kdns",
                         f"python{sys.version_info.major}.{sys.version_info.minor}"], 1)
        prog = HistogramMetricFamily("coredns_kubernetes_dns_programming_duration_seconds",
                                     "Histogram of the time (in seconds) it took to program a "
                                     "dns instance.", labels=["service_kind"])
        for kind, (pairs, total) in self.sup.programming_histograms().items():
            prog.add_metric([kind], pairs, total)
        return [info, prog, self.plugins(), *self.hosts(), *self.autopath(s)]

    def autopath(self, s: Snapshot):
        """CoreDNS autopath's counter, when autopath is on: replies answered from a later
        step of the client's search path (behind its CNAME), by the packet path or by the
        hand-off's steps."""
        if getattr(self.sup.cfg, "autopath", None) is None:
            return []
        server, _, _ = self.labels()
        fam = CounterMetricFamily("coredns_autopath_success", "Counter of requests that did "
                                  "autopath.", labels=["server"])
        fam.add_metric([server], sum(s[f"autopath_{p}"] for p in C.PROTOS)
                       + s.fwd["autopath_success"])
        return [fam]

    def hosts(self):
        """CoreDNS hosts' gauges, when the Corefile has hosts (its records and when their
        file was last read)."""
        fwd = self.sup.forwarding
        src = getattr(fwd, "hosts", None) if fwd is not None else None
        if src is None:
            return []
        entries = GaugeMetricFamily("coredns_hosts_entries", "The combined number of entries "
                                    "in hosts and Corefile.", labels=["hostsfile"])
        entries.add_metric([src.label()], src.current.entries())
        when = GaugeMetricFamily("coredns_hosts_reload_timestamp_seconds", "The timestamp of "
                                 "the last reload of hosts file.")
        when.add_metric([], src.reloaded)
        return [entries, when]

    def plugins(self):
        """coredns_plugin_enabled for each CoreDNS plugin whose job kdns is doing in this
        configuration, so dashboards that count plugins see what runs; none it does not."""
        cfg = self.sup.cfg
        names = ["kubernetes", "errors", "reload", "prometheus"]
        if cfg.forwarding is not None:
            names += ["forward", "cache", "loop"]
        if getattr(cfg, "health_port", 0) or getattr(cfg, "healthz_port", 0):
            names.append("health")
        if getattr(cfg, "ready_port", 0):
            names.append("ready")
        if cfg.log_queries:
            names.append("log")
        if getattr(cfg, "hosts", None) is not None:
            names.append("hosts")
        if getattr(cfg, "autopath", None) is not None:
            names.append("autopath")
        if getattr(cfg, "rewrites", ()):
            names.append("rewrite")
        if getattr(cfg, "loadbalance", False):
            names.append("loadbalance")
        server, zone, _ = self.labels()
        fam = GaugeMetricFamily("coredns_plugin_enabled", "A metric that indicates whether a "
                                "plugin is enabled on per server and zone basis.",
                                labels=["server", "zone", "view", "name"])
        for name in sorted(names):
            fam.add_metric([server, zone, "", name], 1)
        return fam


class KdnsCollector:
    """kdns_*: what neither peer exposes (image generation and age, staleness, relists,
    worker restarts, truncation and drops)."""

    def __init__(self, sup):
        self.sup = sup

    def collect(self, snap: Snapshot | None = None):
        s = snap or Snapshot(self.sup)
        sup = self.sup
        trunc = CounterMetricFamily("kdns_truncated_responses", "Replies sent with TC set.",
                                    labels=["proto"])
        drops = CounterMetricFamily("kdns_dropped_queries", "Packets dropped unanswered.",
                                    labels=["proto"])
        handoff = CounterMetricFamily("kdns_handoff_queries", "Queries the compiled path "
                                      "handed to Python (names outside the image).",
                                      labels=["proto"])
        for proto in C.PROTOS:
            trunc.add_metric([proto], s[f"truncated_{proto}"])
            drops.add_metric([proto], s[f"dropped_{proto}"])
            handoff.add_metric([proto], s[f"handoff_{proto}"])
        pub = GaugeMetricFamily("kdns_image_published_generation",
                                "Generation of the newest zone image the supervisor published.")
        pub.add_metric([], sup.publisher.generation)
        served = GaugeMetricFamily("kdns_image_generation",
                                   "Generation of the zone image each worker serves (0: none).",
                                   labels=["worker"])
        for slot in range(sup.cfg.workers):
            served.add_metric([str(slot)], C.page_generation(sup.counters, slot))
        age = GaugeMetricFamily("kdns_image_age_seconds", "Seconds since the newest zone image "
                                "was published.")
        age.add_metric([], max(0.0, time.time() - sup.published_at) if sup.published_at else 0)
        size = GaugeMetricFamily("kdns_image_bytes", "Size of the newest zone image.")
        size.add_metric([], sup.image_bytes)
        restarts = CounterMetricFamily("kdns_worker_restarts", "Workers that exited and were "
                                       "replaced.")
        restarts.add_metric([], sup.worker_deaths)
        ready = GaugeMetricFamily("kdns_ready", "1 when ready (first sync served, not in "
                                  "lameduck).")
        ready.add_metric([], 1 if sup.is_ready() else 0)
        out = [trunc, drops, handoff, pub, served, age, size, restarts, ready,
               *worker_process_metrics(sup)]
        stale = sup.staleness_seconds()
        st = GaugeMetricFamily("kdns_api_staleness_seconds", "Seconds since the served data was "
                               "last known current with the API (0 when up to date or not "
                               "reading the API).")
        st.add_metric([], stale or 0.0)
        rel = CounterMetricFamily("kdns_api_relists", "Full relists of the API (410 Gone, "
                                  "reconnects).")
        rel.add_metric([], sup.relists())
        loop = GaugeMetricFamily("kdns_forward_looping_upstreams", "Upstreams found sending "
                                 "kdns's queries back to it (a forwarding loop); they are out "
                                 "of routing and kdns stays ready.")
        loop.add_metric([], sup.looping_upstreams())
        return out + [st, rel, loop]


def worker_process_metrics(sup):
    """CPU and memory of each worker process (process_* sums the pod's processes), read
    from /proc at scrape time. One series per process, labelled with the first worker slot
    it serves (a process serving several has one series for them all)."""
    cpu = CounterMetricFamily("kdns_worker_cpu_seconds", "CPU time of each worker process "
                              "(labelled with the first worker slot it serves).",
                              labels=["worker"])
    rss = GaugeMetricFamily("kdns_worker_resident_memory_bytes", "Resident memory of each "
                            "worker process (labelled with the first worker slot it serves).",
                            labels=["worker"])
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    for host in getattr(sup, "hosts", ()):
        proc = host.proc
        if proc is None:
            continue
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue                     # exited between the check and the read
        first = str(host.slots[0].index)
        cpu.add_metric([first], (int(fields[11]) + int(fields[12])) / tick)
        rss.add_metric([first], int(fields[21]) * page)
    return [cpu, rss]


class SkyDNSCollector:
    """kube-dns's SkyDNS metrics on PROMETHEUS_PORT (dns-rules §3.1). ``system`` is "auth" for
    what the compiled path answered and "recursive" for what went to the forwarder."""

    def __init__(self, sup):
        self.sup = sup

    def collect(self):
        s = Snapshot(self.sup)
        p = "skydns_skydns_dns_"
        queries = sum(s[f"{v}queries_{pr}_{t}"] for v in ("", "v6") for pr in C.PROTOS
                      for t, _ in C.QTYPES)
        handoff = sum(s[f"handoff_{pr}"] for pr in C.PROTOS)
        req = CounterMetricFamily(p + "request_count", "Counter of DNS requests made.",
                                  labels=["system"])
        req.add_metric(["auth"], queries - handoff)
        req.add_metric(["recursive"], handoff)
        dur = HistogramMetricFamily(p + "request_duration_seconds", "Histogram of the time (in "
                                    "seconds) each request took to resolve.", labels=["system"])
        dur.add_metric(["auth"], _over_protos(s, "latency", C.LATENCY_BOUNDS), sum(s[f"latency_{pr}_sum_ns"] for pr in C.PROTOS) / 1e9)
        size = HistogramMetricFamily(p + "response_size_bytes", "Size of the returns response "
                                     "in bytes.", labels=["system"])
        size.add_metric(["auth"], _over_protos(s, "response_size", C.SIZE_BOUNDS), sum(s[f"response_size_{pr}_sum"] for pr in C.PROTOS))
        err = CounterMetricFamily(p + "error_count", "Counter of DNS requests resulting in an "
                                  "error.", labels=["system", "cause"])
        rc = lambda r: sum(s[f"rcode_{pr}_{r}"] for pr in C.PROTOS)   # noqa: E731
        err.add_metric(["auth", "nxdomain"], rc(3))
        err.add_metric(["auth", "refused"], rc(5))
        err.add_metric(["auth", "servfail"], rc(2))      # kube-dns's skydns spells it so
        err.add_metric(["auth", "truncated"], sum(s[f"truncated_{pr}"] for pr in C.PROTOS))
        err.add_metric(["auth", "nodata"], sum(s[f"nodata_{pr}"] for pr in C.PROTOS))
        miss = CounterMetricFamily(p + "cachemiss_count", "Counter of DNS requests that "
                                   "result in a cache miss.", labels=["cache"])
        miss.add_metric(["response"], s.fwd["cache_misses"])
        return [req, dur, size, err, miss]


class SidecarCollector:
    """What kube-dns's sidecar exports on :10054 (dns-rules §3.4): its probe of kdns, and
    kubedns_dnsmasq_* where kdns has the number (its forward cache plays dnsmasq's part)."""

    def __init__(self, sup, prober):
        self.sup, self.prober = sup, prober

    def collect(self):
        out = []
        pr = self.prober
        if pr is not None:
            pairs, acc = [], 0
            for i, bound in enumerate(LATENCY_MS_BOUNDS):
                acc += pr.buckets[i]
                pairs.append((_le(bound), acc))
            pairs.append(("+Inf", acc + pr.buckets[-1]))
            for label in pr.labels:
                lat = HistogramMetricFamily(f"kubedns_probe_{label}_latency_ms",
                                            f"Latency of the DNS probe request {label}")
                lat.add_metric([], pairs, pr.latency_ms_sum)
                # The sidecar's client_golang counter has no _total suffix: untyped keeps
                # the name.
                errs = UnknownMetricFamily(f"kubedns_probe_{label}_errors",
                                           f"Counter of errors for the DNS probe {label}")
                errs.add_metric([], pr.errors)
                out += [lat, errs]
        return out

    def dnsmasq_text(self) -> bytes:
        """kubedns_dnsmasq_*: counters in the sidecar (client_golang, no _total suffix), which
        prometheus_client cannot render under their own names, so written out here. kdns's
        forward cache plays dnsmasq's part; max_size is a counter there too."""
        s = Snapshot(self.sup)
        f = s.fwd
        values = (
            ("hits", "Number of DNS cache hits (from start of process)",
             sum(s[f"cache_hit_{p}"] for p in C.PROTOS) + f["cache_hits"]),
            ("misses", "Number of DNS cache misses (from start of process)", f["cache_misses"]),
            ("evictions", "Counter of DNS cache evictions (from start of process)",
             f["cache_evictions"]),
            ("insertions", "Counter of DNS cache insertions (from start of process)",
             f["cache_inserts"]),
            ("max_size", "Maximum size of the DNS cache", f["cache_capacity"]),
            ("errors", "Number of errors that have occurred getting metrics", 0),
        )
        lines = []
        for name, doc, value in values:
            full = f"kubedns_dnsmasq_{name}"
            lines += [f"# HELP {full} {doc}", f"# TYPE {full} counter", f"{full} {float(value)!r}"]
        return ("\n".join(lines) + "\n").encode()


class PodProcessCollector:
    """process_* for the whole pod: the supervisor and every worker, since the workers do
    the DNS work and a memory or CPU panel on the supervisor alone misleads (the per-worker
    breakdown is kdns_worker_*).

    CPU: the live processes' utime+stime plus what reaped workers used (the kernel's
    RUSAGE_CHILDREN), so the counter never goes back when a worker is replaced. Memory: the
    summed proportional set size (smaps_rollup), which is what the pod's cgroup is charged:
    RSS would count the shared zone image and libraries once per process."""

    def __init__(self, sup):
        self.sup = sup
        self.cpu_high = 0.0

    def pids(self) -> list[int]:
        # returncode, not poll(): reaping is the supervisor loop's, not this HTTP thread's.
        pids = [os.getpid()] + [h.proc.pid for h in getattr(self.sup, "hosts", ())
                                if h.proc is not None and h.proc.returncode is None]
        zygote = getattr(getattr(self.sup, "zygote", None), "proc", None)
        if zygote is not None and zygote.returncode is None:
            pids.append(zygote.pid)      # the workers' shared pages are charged to it
        return pids

    def collect(self):
        import resource
        tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        pids = self.pids()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, pss, vsz, fds, start = kids.ru_utime + kids.ru_stime, 0, 0, 0, None
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                pss += _pss_bytes(pid, int(fields[21]) * page)
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue                 # exited between listing and reading
            cpu += (int(fields[11]) + int(fields[12])) / tick
            vsz += int(fields[20])
            if pid == os.getpid():
                start = int(fields[19]) / tick + _boot_time()
        c = CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time of "
                                "every kdns process of the pod (supervisor and workers), in "
                                "seconds.")
        # A worker reaped between reading the children's usage and its /proc entry would be
        # missing from this sum once: never let the counter go back for it.
        self.cpu_high = max(self.cpu_high, cpu)
        c.add_metric([], self.cpu_high)
        yield c
        for name, doc, value in (
                ("process_resident_memory_bytes", "Memory of every kdns process of the pod: "
                 "summed proportional set size, what the pod's cgroup is charged.", pss),
                ("process_virtual_memory_bytes", "Virtual memory size of every kdns process "
                 "of the pod, summed.", vsz),
                ("process_open_fds", "Open file descriptors of every kdns process of the pod.",
                 fds),
                ("process_start_time_seconds", "Start time of the pod's supervisor since the "
                 "epoch, in seconds.", start or 0)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        g = GaugeMetricFamily("process_max_fds", "Maximum open file descriptors per process.")
        g.add_metric([], soft)
        yield g


def _pss_bytes(pid: int, fallback: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return fallback                      # no smaps_rollup (old kernel): RSS


_BOOT_TIME: list[float] = []


def _boot_time() -> float:
    if not _BOOT_TIME:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime"):
                    _BOOT_TIME.append(float(line.split()[1]))
                    break
            else:
                _BOOT_TIME.append(0.0)
    return _BOOT_TIME[0]


def registry(sup, *collectors) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    reg.register(PodProcessCollector(sup))
    return reg


def route(reg: CollectorRegistry, extra: Callable[[], bytes] | None = None
          ) -> Callable[[], tuple[int, str, bytes]]:
    from prometheus_client import generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    if extra is None:
        return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(reg))
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(reg) + extra())


def routes(sup, prober) -> dict[str, dict]:
    """Metrics routes per listener kind (the supervisor merges them into its listeners)."""
    sidecar = SidecarCollector(sup, prober)
    return {
        "metrics": {"/metrics": route(registry(sup, CoreDNSCollector(sup),
                                               *getattr(sup, "extra_collectors", ())))},
        "sidecar": {"/metrics": route(registry(sup, sidecar), sidecar.dnsmasq_text)},
        "prometheus": {sup.cfg.prometheus_path: route(registry(sup, SkyDNSCollector(sup)))},
    }
