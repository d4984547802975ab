"""Logs: leveled, one line per event; query logging off by default and, when on,
one line per query that reaches Python plus a periodic summary of the compiled path's
queries read from the shared counters; klog's --logtostderr=false with --log-file."""
from __future__ import annotations

import argparse
import logging
import mmap
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
    assert "kdns.queries" not in k.log_path.read_text()


def test_log_queries_logs_tcp_queries_one_line_each(tmp_path):
    k = Kdns(tmp_path, image=sample_image(), workers=1, args=("--log-queries",)).start()
    try:
        k.tcp(K, "SRV")
        k.tcp("nope.default.svc.cluster.local", "A")
        assert wait_for(lambda: "NXDOMAIN" in k.logs()), k.logs()
    finally:
        k.stop()
    lines = [line for line in k.log_path.read_text().splitlines() if "kdns.queries" in line]
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
    assert "INFO kdns.test: published image generation 2" in path.read_text()


def test_go_style_log_levels():
    assert logs.level_for("info", 2) == "info"
    assert logs.level_for("info", 3) == "debug"
    assert logs.level_for("warning", None) == "warning"


def test_describe_query_never_raises():
    assert logs.describe_query(b"\x00" * 5).startswith("<malformed")
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x00\x00\x21\x00\x01"
    assert logs.describe_query(q) == "www.example. SRV"
