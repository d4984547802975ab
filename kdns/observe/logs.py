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
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time

from kdns.packet import counters as C

# klog severities (stderrthreshold takes a name or its number).
SEVERITIES = {"INFO": 0, "WARNING": 1, "ERROR": 2, "FATAL": 3}
QUERY_SUMMARY_PERIOD = 10.0     # seconds between UDP fast-path query summaries

log = logging.getLogger("kdns.queries")


# Line formats: "klog" (klog's text header, what Kubernetes log pipelines parse), "json"
# (Kubernetes' structured JSON, --logging-format=json) and "bare" (--skip-headers).
LOG_FORMATS = ("klog", "json", "bare")
_KLOG_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                logging.CRITICAL: "F"}
_LETTER_LEVEL = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                 "F": logging.CRITICAL}


class _Formatter(logging.Formatter):
    """A record already formatted by a worker (relayed through the supervisor) passes as it
    is, so every line of the pod has one format whichever process wrote it."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "kdns_relayed", False):
            return record.getMessage()
        return self.line(record)

    def line(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class KlogFormatter(_Formatter):
    """klog's header: ``Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg``, L the severity
    letter, local time with microseconds, the process id right-aligned in seven columns
    (klog prints the thread id; a Python process's is not meaningful, its pid is)."""

    def line(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1_000_000)
        head = (f"{_KLOG_LETTER.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{usec:06d} "
                f"{record.process:7d} {record.filename}:{record.lineno}] ")
        text = head + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(_Formatter):
    """Kubernetes' JSON log schema: ``ts`` (seconds), ``caller``, ``msg``, ``v`` on info
    lines and ``err`` on errors, plus ``level``, ``logger`` and ``pid`` so a pipeline can
    route severity and tell the supervisor from the workers."""

    def line(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "caller": f"{record.filename}:{record.lineno}",
               "msg": record.getMessage(), "level": record.levelname.lower(),
               "logger": record.name, "pid": record.process}
        if record.levelno < logging.WARNING:
            out["v"] = 0 if record.levelno >= logging.INFO else 3
        if record.exc_info:
            out["err"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class BareFormatter(_Formatter):
    def line(self, record: logging.LogRecord) -> str:
        return record.getMessage()


FORMATTERS = {"klog": KlogFormatter, "json": JsonFormatter, "bare": BareFormatter}


def line_level(line: str) -> int:
    """The severity of a line one of the formatters above wrote."""
    if line.startswith("{"):
        try:
            return logging.getLevelName(json.loads(line).get("level", "info").upper())
        except (ValueError, AttributeError, TypeError):
            return logging.INFO
    if len(line) > 5 and line[1:5].isdigit():
        return _LETTER_LEVEL.get(line[0], logging.INFO)
    return logging.INFO


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


def _max_size(text: str) -> int:
    t = text.strip()
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in megabytes (0 for no limit)")
    return int(t)


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
    g.add_argument("--log-file-max-size", type=_max_size, default=1800, metavar="MB",
                   help="the log file's size limit in megabytes (default 1800, 0 for none): "
                        "at the limit the file is renamed to PATH.1, replacing an older one, "
                        "and a new file is started")
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
                   help="log bare messages, without klog's header")
    g.add_argument("--logging-format", default="text", choices=("text", "json"),
                   help="text (klog's header, the default) or json (Kubernetes' JSON schema: "
                        "ts, caller, msg, v, err, level, logger, pid)")
    g.add_argument("--skip-log-headers", default=False, **b, help="accepted; ignored")
    g.add_argument("--one-output", default=False, **b, help="accepted; ignored")
    g.add_argument("--log-flush-frequency", type=duration, default=5.0, metavar="DURATION",
                   help="accepted for kube-dns compatibility; kdns logs are unbuffered")


def level_for(log_level: str, v: int | None) -> str:
    """--v as kube-dns uses it: 0-2 are the normal INFO stream, 3 and above add debug lines."""
    if v is not None and v >= 3:
        return "debug"
    return log_level


def format_of(a: argparse.Namespace | None) -> str:
    """The line format the flags ask for: one of LOG_FORMATS."""
    if a is None:
        return "klog"
    if getattr(a, "logging_format", "text") == "json":
        return "json"
    return "bare" if a.skip_headers else "klog"


class RotatingFile(logging.handlers.RotatingFileHandler):
    """klog's --log-file-max-size: at the limit the file becomes PATH.1 (one generation
    kept, so the disk holds at most twice the limit) and a new file starts."""

    def __init__(self, path: str, max_mb: int):
        super().__init__(path, maxBytes=max_mb * 1024 * 1024, backupCount=1 if max_mb else 0)


def setup(level: str, a: argparse.Namespace | None = None) -> None:
    """Configure the root logger from --log-level/--v and the klog flags."""
    formatter = FORMATTERS[format_of(a)]()
    handlers: list[logging.Handler] = []
    path = ""
    if a is not None and not a.logtostderr:
        path = a.log_file or (f"{a.log_dir.rstrip('/')}/kdns.log" if a.log_dir else "")
    if path:
        handlers.append(RotatingFile(path, getattr(a, "log_file_max_size", 0)))
        err = logging.StreamHandler(sys.stderr)
        if not a.alsologtostderr:
            err.setLevel(("INFO", "WARNING", "ERROR", "CRITICAL")[a.stderrthreshold])
        handlers.append(err)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    global _to_file
    _to_file = bool(path)


_to_file = False


def setup_worker(level: str, fmt: str) -> None:
    """A worker's logging: lines in the supervisor's format on stderr, which is the
    supervisor's stderr or (when the supervisor writes a log file) a pipe it relays."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(FORMATTERS[fmt]())
    logging.basicConfig(level=level.upper(), handlers=[h], force=True)


class WorkerLogRelay:
    """When the supervisor logs to a file, the workers write their lines to a pipe and a
    thread here passes each line to the supervisor's handlers, so the file (and its
    rotation) has one writer and stderr gets only what --stderrthreshold lets through."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name="worker-log-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        logger = logging.getLogger("kdns.worker")
        with open(self.read_fd, "r", encoding="utf-8", errors="replace", closefd=True) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line:
                    continue
                level = line_level(line)
                rec = logger.makeRecord(logger.name, level, "", 0, line, (), None)
                rec.kdns_relayed = True
                for h in logging.getLogger().handlers:
                    if level >= h.level:
                        h.handle(rec)

    def close(self) -> None:
        """Called when no worker is left: the reader ends at end of file."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        self.thread.join(timeout=5)


def worker_log_relay() -> WorkerLogRelay | None:
    """A relay when this process logs to a file, else None (workers share stderr)."""
    return WorkerLogRelay() if _to_file else None


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
        n = sum(after[L[f"{v}queries_{p}_{t}"]] - before[L[f"{v}queries_{p}_{t}"]]
                for v in ("", "v6") for t, _ in C.QTYPES)
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
