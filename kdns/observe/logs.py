"""Logging: kube-dns's klog flags, leveled one-line-per-event logs, optional query logging.

Why: kube-dns pods are started with klog flags (``--v=2 --logtostderr``, sometimes
``--log_dir``/``--vmodule``); a drop-in must accept every one of them with kube-dns's
spelling rules (underscores normalised to dashes, dns-rules §3.1) and map what it can onto Python
logging. Events that matter (sync, publish with sizes and durations, config changes,
upstream failures, worker deaths) are one line each at INFO/WARNING; per-query lines only
with ``--log-queries``, and then only where a query is already in Python.

What it must not do: log from the compiled packet path (UDP queries answered there are
summarised from the shared counters, never logged one by one).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from kdns.packet import counters as C

FORMAT = "kdns[%(process)d] %(levelname)s %(name)s: %(message)s"
# klog severities (stderrthreshold takes a name or its number).
SEVERITIES = {"INFO": 0, "WARNING": 1, "ERROR": 2, "FATAL": 3}
QUERY_SUMMARY_PERIOD = 10.0     # seconds between UDP fast-path query summaries

log = logging.getLogger("kdns.queries")


def normalise_flag_names(argv: list[str]) -> list[str]:
    """kube-dns (pflag WordSepNormalizeFunc): ``--log_dir`` means ``--log-dir``."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def go_bool(text: str) -> bool:
    """A Go bool flag value (strconv.ParseBool)."""
    t = text.strip()
    if t in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if t in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _severity(text: str) -> int:
    t = text.strip().upper()
    if t in SEVERITIES:
        return SEVERITIES[t]
    if t.isdigit() and int(t) in SEVERITIES.values():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a klog severity (INFO, WARNING, ERROR, FATAL)")


def _vmodule(text: str) -> str:
    if text and not all(re.fullmatch(r"[^=,]+=\d+", part) for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of pattern=N")
    return text


def _backtrace_at(text: str) -> str:
    if text and not re.fullmatch(r"[^:]+:\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not file:line")
    return text


def add_klog_flags(p: argparse.ArgumentParser, duration) -> None:
    """The klog/glog flags kube-dns registers, with klog's defaults."""
    g = p.add_argument_group("klog flags (kube-dns compatibility)")
    b = dict(nargs="?", const=True, type=go_bool, metavar="BOOL")
    g.add_argument("--logtostderr", default=True, **b,
                   help="log to stderr (default true); false with --log-file or --log-dir "
                        "writes the log there instead")
    g.add_argument("--alsologtostderr", default=False, **b,
                   help="log to stderr as well as to --log-file/--log-dir")
    g.add_argument("--log-dir", default="", metavar="DIR",
                   help="with --logtostderr=false, write the log to DIR/kdns.log")
    g.add_argument("--log-file", default="", metavar="PATH",
                   help="with --logtostderr=false, write the log to PATH")
    g.add_argument("--log-file-max-size", type=int, default=1800, metavar="MB",
                   help="accepted for klog compatibility; kdns does not rotate its log")
    g.add_argument("--stderrthreshold", type=_severity, default=SEVERITIES["ERROR"],
                   metavar="SEVERITY",
                   help="when logging to a file, also copy lines at or above this to stderr "
                        "(default ERROR)")
    g.add_argument("--vmodule", type=_vmodule, default="", metavar="PATTERN=N,...",
                   help="accepted for klog compatibility; kdns has one verbosity (--v)")
    g.add_argument("--log-backtrace-at", type=_backtrace_at, default="", metavar="FILE:LINE",
                   help="accepted for klog compatibility; ignored")
    g.add_argument("--add-dir-header", default=False, **b, help="accepted; ignored")
    g.add_argument("--skip-headers", default=False, **b,
                   help="log bare messages, without the kdns[pid] LEVEL name: prefix")
    g.add_argument("--skip-log-headers", default=False, **b, help="accepted; ignored")
    g.add_argument("--one-output", default=False, **b, help="accepted; ignored")
    g.add_argument("--log-flush-frequency", type=duration, default=5.0, metavar="DURATION",
                   help="accepted for kube-dns compatibility; kdns logs are unbuffered")


def level_for(log_level: str, v: int | None) -> str:
    """--v as kube-dns uses it: 0-2 are the normal INFO stream, 3 and above add debug lines."""
    if v is not None and v >= 3:
        return "debug"
    return log_level


def setup(level: str, a: argparse.Namespace | None = None) -> None:
    """Configure the root logger from --log-level/--v and the klog flags."""
    fmt = "%(message)s" if a is not None and a.skip_headers else FORMAT
    handlers: list[logging.Handler] = []
    path = ""
    if a is not None and not a.logtostderr:
        path = a.log_file or (f"{a.log_dir.rstrip('/')}/kdns.log" if a.log_dir else "")
    if path:
        handlers.append(logging.FileHandler(path))
        err = logging.StreamHandler(sys.stderr)
        if not a.alsologtostderr:
            err.setLevel(("INFO", "WARNING", "ERROR", "CRITICAL")[a.stderrthreshold])
        handlers.append(err)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)


# ------------------------------------------------------------------------- query logging


class QuerySummary:
    """With --log-queries: every QUERY_SUMMARY_PERIOD, one line with the queries answered
    since the last line (by protocol and rcode), read from the shared counters: UDP queries
    answered in the compiled path are never logged one by one."""

    def __init__(self, pages, nslots: int, period: float = QUERY_SUMMARY_PERIOD):
        self.pages, self.nslots, self.period = pages, nslots, period
        self.last = None
        self.next_at = time.monotonic() + period

    def tick(self, now: float) -> None:
        if now < self.next_at:
            return
        self.next_at = now + self.period
        total = C.sum_slots(self.pages, self.nslots)
        if self.last is not None:
            log.info("queries in the last %.0fs: %s", self.period, summarise(self.last, total))
        self.last = total


def summarise(before: list[int], after: list[int]) -> str:
    L = C.LAYOUT
    parts = []
    for p in C.PROTOS:
        n = sum(after[L[f"queries_{p}_{t}"]] - before[L[f"queries_{p}_{t}"]] for t, _ in C.QTYPES)
        rc = {}
        for r in range(C.NRCODES):
            d = after[L[f"rcode_{p}_{r}"]] - before[L[f"rcode_{p}_{r}"]]
            if d:
                rc[RCODES[r]] = d
        parts.append(f"{p}={n}" + (" (" + " ".join(f"{k}={v}" for k, v in rc.items()) + ")"
                                   if rc else ""))
    return ", ".join(parts)


RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN",
          "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13",
          "RCODE14", "RCODE15", "BADVERS")


def describe_query(msg: bytes) -> str:
    """'name TYPE' of a query for a log line; never raises."""
    from kdns.zone import refpath
    try:
        name, end = refpath.parse_name(msg, 12)
        qtype = int.from_bytes(msg[end:end + 2], "big")
    except Exception:  # noqa: BLE001 -- a log line must not fail on a malformed packet
        return f"<malformed {len(msg)} bytes>"
    names = {code: t for t, code in C.QTYPES}
    text = b".".join(name).decode("ascii", "replace")
    return f"{text + '.' if text else '.'} {names.get(qtype, f'TYPE{qtype}')}"


def log_query(proto: str, peer, query: bytes, reply: bytes | None) -> None:
    rcode = RCODES[reply[3] & 0xF] if reply is not None and len(reply) >= 4 else "no reply"
    host = peer[0] if isinstance(peer, tuple) else peer
    log.info("%s %s %s -> %s", proto, host, describe_query(query), rcode)


def kdns_version() -> str:
    """The installed version, or pyproject.toml's when run from a checkout."""
    try:
        from importlib.metadata import version
        return version("kdns")
    except Exception:  # noqa: BLE001 -- not installed
        pass
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path) as f:
            for line in f:
                m = re.match(r'\s*version\s*=\s*"([^"]+)"', line)
                if m:
                    return m.group(1)
    except OSError:
        pass
    return "unknown"
