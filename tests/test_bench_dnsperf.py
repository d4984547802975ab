"""bench/load.py reads dnsperf's output: its statistics block and, with -v, one line per query.
The fixtures are real dnsperf 2.10.0 output captured from runs (tests/fixtures/): against kdns
at a fixed rate on the search mix, and against a UDP echo that drops one query of three, so
that both the answered and the timed-out line forms occur. A dnsperf whose format differs must
make the parser raise, never report zeros or skewed percentiles."""
import importlib.util
import os
import statistics
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench")
FIXTURES = os.path.join(HERE, "fixtures")


def _load_harness():
    # load.py puts bench/ on sys.path for its own imports; take it off again afterwards.
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("kdns_bench_load", os.path.join(BENCH, "load.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
    return mod


load = _load_harness()


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


KDNS = "dnsperf-2.10.0-v-kdns.txt"
DROPS = "dnsperf-2.10.0-v-drops.txt"


def test_statistics_block():
    r = load.parse_dnsperf(fixture(KDNS))
    assert (r["sent"], r["completed"], r["lost"], r["interrupted"]) == (300, 300, 0, 0)
    assert r["rcodes"] == {"NOERROR": 91, "NXDOMAIN": 209}
    assert r["qps"] == pytest.approx(299.401496)
    assert r["run_s"] == pytest.approx(1.001999)
    assert (r["avg_latency_us"], r["min_latency_us"], r["max_latency_us"]) == pytest.approx((620, 24, 43438))
    assert "latencies_us" not in r          # only with verbose=True


def test_every_answer_line_gives_its_latency():
    r = load.parse_dnsperf(fixture(KDNS), verbose=True)
    lats = r["latencies_us"]
    assert len(lats) == r["completed"] == 300
    assert lats[0] == pytest.approx(547)    # "> NXDOMAIN session-frontend... A 0.000547"
    assert min(lats) == pytest.approx(r["min_latency_us"])
    assert max(lats) == pytest.approx(r["max_latency_us"])
    # dnsperf's average is the integer microseconds of its sum over the count.
    assert statistics.fmean(lats) == pytest.approx(r["avg_latency_us"], abs=1)


def test_timed_out_lines_are_the_lost_queries():
    r = load.parse_dnsperf(fixture(DROPS), verbose=True)
    assert (r["sent"], r["completed"], r["lost"]) == (100, 67, 33)
    assert len(r["latencies_us"]) == 67
    assert r["rcodes"] == {"NOERROR": 67}


def test_percentile_is_nearest_rank():
    vals = [float(v) for v in range(1, 101)]           # 1..100
    assert load.percentile(vals, 0.5) == 50
    assert load.percentile(vals, 0.99) == 99
    assert load.percentile(vals, 0.999) == 100
    assert load.percentile(vals, 1.0) == 100
    assert load.percentile([7.0], 0.99) == 7
    assert load.percentile([], 0.5) is None
    lats = sorted(load.parse_dnsperf(fixture(KDNS), verbose=True)["latencies_us"])
    assert lats[0] <= load.percentile(lats, 0.5) <= load.percentile(lats, 0.99) <= lats[-1]


def _replace_first(text: str, prefix: str, new: str) -> str:
    lines = text.splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines[i] = new
    return "".join(lines)


@pytest.mark.parametrize("mangle", [
    # latency printed in another unit
    lambda t: _replace_first(t, "> NXDOMAIN", "> NXDOMAIN a.cluster.local A 0.547ms\n"),
    # a per-query line without the leading marker's space
    lambda t: _replace_first(t, "> NOERROR", ">NOERROR a.cluster.local A 0.000083\n"),
    # one answered line fewer than the statistics count
    lambda t: _replace_first(t, "> NOERROR", ""),
    # the statistics block renamed
    lambda t: t.replace("Queries completed:", "Completed queries:"),
    # response codes no longer adding up to the completed count
    lambda t: t.replace("NXDOMAIN 209 (69.67%)", "NXDOMAIN 208 (69.33%)"),
], ids=["unit", "marker", "count", "label", "rcodes"])
def test_a_format_change_raises(mangle):
    with pytest.raises(load.DnsperfFormatError):
        load.parse_dnsperf(mangle(fixture(KDNS)), verbose=True)


def test_a_timed_out_line_too_few_raises():
    text = _replace_first(fixture(DROPS), "> T ", "")
    with pytest.raises(load.DnsperfFormatError, match="timed out"):
        load.parse_dnsperf(text, verbose=True)


def _fixed_cell(target, cpu_us, p99, others_s):
    return {"rate": 20000, "target": target, "mix": "hits", "sent_qps": 20000.0,
            "cpu_us_per_query": cpu_us, "p99_us": p99, "lost": 0, "wall_s": 10.0,
            "core_others_s": others_s}


def test_fixed_goals_say_when_a_core_was_shared():
    """A fixed-rate cell whose server core ran other programs over a tenth of the time is
    not a core of its own: the goal lines say so for that target, and only for it."""
    cells = [_fixed_cell("nsd", 10.0, 100.0, 0.5), _fixed_cell("kdns", 7.0, 90.0, 2.0)]
    lines = load.fixed_goals(cells, "kdns", "nsd")
    assert ("[met] fixed 20,000 q/s hits: kdns CPU/query 7.00 us <= 0.8 x NSD 10.00 us "
            "(ratio 0.70)") in lines
    notes = [ln for ln in lines if "ran other programs" in ln]
    assert len(notes) == 1 and "kdns's core ran other programs 20%" in notes[0]
    # Unknown (a server pinned after it started): no note, and the table prints "-".
    cells[1]["core_others_s"] = None
    assert not [ln for ln in load.fixed_goals(cells, "kdns", "nsd") if "ran other" in ln]
    assert load.others_pct(cells[1]) is None and load.others_pct(cells[0]) == 5.0
