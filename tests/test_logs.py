"""Logs: leveled, one line per event; query logging off by default and, when on,
one line per query that reaches Python plus a periodic summary of the compiled path's
queries read from the shared counters; klog's --logtostderr=false with --log-file."""
from __future__ import annotations

import argparse
import json
import os
import re
import logging
import mmap
import sys
import time

from kdns.packet import counters as C
from kdns.forward import forwarder as forward
from kdns.observe import logs
from serverutil import Kdns
from zonefixtures import sample_image

K = "kubernetes.default.svc.cluster.local"


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_query_logging_is_off_by_default(tmp_path):
    k = Kdns(tmp_path, image=sample_image(), workers=1).start()
    try:
        k.tcp(K, "A")
        k.udp(K, "A")
    finally:
        k.stop()
    assert " -> NOERROR" not in k.log_path.read_text()


def test_log_queries_logs_tcp_queries_one_line_each(tmp_path):
    k = Kdns(tmp_path, image=sample_image(), workers=1, args=("--log-queries",)).start()
    try:
        k.tcp(K, "SRV")
        k.tcp("nope.default.svc.cluster.local", "A")
        assert wait_for(lambda: "NXDOMAIN" in k.logs()), k.logs()
    finally:
        k.stop()
    lines = [line for line in k.log_path.read_text().splitlines() if " -> " in line]
    assert any(f"tcp 127.0.0.1 {K}. SRV -> NOERROR" in line for line in lines), lines
    assert any("nope.default.svc.cluster.local. A -> NXDOMAIN" in line for line in lines), lines


def test_query_summary_reads_the_counters(caplog):
    pages = mmap.mmap(-1, 2 * C.SLOT_WORDS * 8)
    words = memoryview(pages).cast("Q")
    s = logs.QuerySummary(pages, 2, period=0.0)
    s.tick(time.monotonic())              # baseline
    words[C.LAYOUT["queries_udp_A"]] += 7
    words[C.SLOT_WORDS + C.LAYOUT["queries_udp_A"]] += 3
    words[C.LAYOUT["rcode_udp_3"]] += 2
    with caplog.at_level(logging.INFO, logger="kdns.queries"):
        s.tick(time.monotonic() + 1)
    assert "udp=10 (NXDOMAIN=2), tcp=0" in caplog.text


def test_upstream_failure_is_one_line_per_change(caplog):
    st = forward.UpstreamStats()
    up = forward.Upstream("192.0.2.53")
    with caplog.at_level(logging.INFO, logger="kdns.forward.forwarder"):
        for _ in range(5):
            st.failed(up, "timeout")
        st.answered(up)
        st.answered(up)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["upstream 192.0.2.53:53 failed (timeout); trying others",
                     "upstream 192.0.2.53:53 answers again"]


def test_log_file_with_logtostderr_false(tmp_path):
    path = tmp_path / "kdns.log"
    a = argparse.Namespace(skip_headers=False, logtostderr=False, log_file=str(path), log_dir="",
                           alsologtostderr=False, stderrthreshold=2)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("info", a)
        logging.getLogger("kdns.test").info("published image generation 2")
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
    line, = path.read_text().splitlines()
    assert line.startswith("I") and line.endswith("] published image generation 2"), line


def test_go_style_log_levels():
    assert logs.level_for("info", 2) == "info"
    assert logs.level_for("info", 3) == "debug"
    assert logs.level_for("warning", None) == "warning"


def test_describe_query_never_raises():
    assert logs.describe_query(b"\x00" * 5).startswith("<malformed")
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x00\x00\x21\x00\x01"
    assert logs.describe_query(q) == "www.example. SRV"


# ------------------------------------------------------------------ line formats

KLOG_HEADER = re.compile(r"^([IWEF])(\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) +(\d+) "
                         r"([\w.]+):(\d+)\] (.*)$")


def _record(level=logging.WARNING, msg="upstream %s failed", args=("192.0.2.53:53",)):
    rec = logging.getLogger("kdns.test").makeRecord(
        "kdns.test", level, "/src/kdns/forward/forwarder.py", 42, msg, args, None)
    rec.created = time.mktime((2026, 12, 3, 10, 44, 59, 0, 0, -1)) + 0.123456
    return rec


def test_klog_header_is_what_klog_prints():
    line = logs.KlogFormatter().format(_record())
    m = KLOG_HEADER.match(line)
    assert m, line
    assert m.group(1, 2, 3, 4, 5, 6) == ("W", "12", "03", "10", "44", "59")
    assert abs(int(m.group(7)) - 123456) <= 1
    assert int(m.group(8)) == os.getpid()
    assert m.group(9, 10, 11) == ("forwarder.py", "42", "upstream 192.0.2.53:53 failed")
    # klog's columns: severity+date, time, the id right-aligned in 7, then file:line].
    assert line[21:29] == f" {os.getpid():7d}"
    assert logs.line_level(line) == logging.WARNING
    assert logs.line_level(logs.KlogFormatter().format(_record(logging.ERROR))) == logging.ERROR


def test_json_lines_follow_the_kubernetes_schema():
    info = json.loads(logs.JsonFormatter().format(_record(logging.INFO)))
    assert info["msg"] == "upstream 192.0.2.53:53 failed"
    assert info["caller"] == "forwarder.py:42" and info["v"] == 0
    assert info["level"] == "info" and info["pid"] == os.getpid()
    assert abs(info["ts"] - _record().created) < 1e-5
    try:
        raise OSError("connection refused")
    except OSError:
        rec = _record(logging.ERROR)
        rec.exc_info = sys.exc_info()
    err = json.loads(logs.JsonFormatter().format(rec))
    assert "v" not in err and "connection refused" in err["err"]
    assert logs.line_level(json.dumps(err)) == logging.ERROR


def test_format_flags_choose_the_formatter():
    ns = argparse.Namespace
    assert logs.format_of(ns(skip_headers=False, logging_format="text")) == "klog"
    assert logs.format_of(ns(skip_headers=True, logging_format="text")) == "bare"
    assert logs.format_of(ns(skip_headers=False, logging_format="json")) == "json"


def test_log_file_rotates_at_its_max_size(tmp_path):
    path = tmp_path / "kdns.log"
    h = logs.RotatingFile(str(path), 1)              # 1 MB
    h.setFormatter(logs.BareFormatter())
    line = "x" * 1023                                # 1 KiB with the newline
    try:
        for i in range(1024 + 10):
            h.emit(_record(logging.INFO, f"{i:08d}" + line[8:], ()))
    finally:
        h.close()
    old, new = path.with_name("kdns.log.1"), path
    assert 1023 * 1024 <= old.stat().st_size <= 1024 * 1024
    assert old.stat().st_size + new.stat().st_size == (1024 + 10) * 1024
    first_new = new.read_text().splitlines()[0][:8]
    last_old = old.read_text().splitlines()[-1][:8]
    assert int(first_new) == int(last_old) + 1      # nothing lost at the cut
    h = logs.RotatingFile(str(tmp_path / "unbounded.log"), 0)
    h.setFormatter(logs.BareFormatter())
    try:
        for i in range(1100):
            h.emit(_record(logging.INFO, line, ()))
    finally:
        h.close()
    assert not (tmp_path / "unbounded.log.1").exists()


def test_every_process_writes_klog_lines_into_the_log_file(tmp_path):
    path = tmp_path / "pod.log"
    # Two worker processes (forked from the zygote): each of them writes to the file.
    k = Kdns(tmp_path, image=sample_image(), workers=2,
             args=("--logtostderr=false", f"--log-file={path}", "--v=3",
                   "--worker-processes", "2")).start()
    try:
        k.udp(K, "A")
        pids = {k.proc.pid} | k.worker_pids()
    finally:
        k.stop()
    lines = path.read_text().splitlines()
    bad = [line for line in lines if not KLOG_HEADER.match(line) and not line.startswith(" ")]
    assert not bad, bad
    serving = [KLOG_HEADER.match(line) for line in lines if "serving (" in line]
    assert len(serving) == 2, lines                      # each worker's line reached the file
    writers = {int(m.group(8)) for m in map(KLOG_HEADER.match, lines) if m}
    assert k.proc.pid in writers and len(writers) >= 3, writers
    assert pids <= writers
    # --stderrthreshold=ERROR (the default): the debug and info lines stay out of stderr.
    assert "serving (" not in k.log_path.read_text()


def test_json_format_reaches_the_workers(tmp_path):
    k = Kdns(tmp_path, image=sample_image(), workers=1,
             args=("--logging-format=json", "--v=3")).start()
    try:
        k.udp(K, "A")
    finally:
        k.stop()
    out = [line for line in k.log_path.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in out]
    assert any("serving (" in r["msg"] and r["pid"] != k.proc.pid for r in records), out
    assert any(r["pid"] == k.proc.pid for r in records), out
