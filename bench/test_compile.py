"""Benchmarks of one compile after one change (the programming latency, the part kdns
controls): the full compile (``build.compile_model``: every rule, every answer) against the
incremental compiler (``kdns.serve.incremental``: the touched service's rules and answers, then
the persistent core's layout), on the same cluster and the same change.

The cluster is bench_api_scale.py's shape: one EndpointSlice of 10 addresses per service,
every fifth service headless. ``KDNS_BENCH_SERVICES`` sets its size (default 2,000: 20,000
endpoints; the scale is 10,000).

    .venv/bin/python -m pytest bench/test_compile.py --benchmark-only -q

Each benchmark checks its image against the other compiler's bytes, so a regression that
makes a wrong image shows up as a failure, not as a speed-up. No timing is asserted.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for p in (ROOT, BENCH):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_api_scale import service, slice_for  # noqa: E402
from kdns.kube import records  # noqa: E402
from kdns.serve import build
from kdns.kube.model import ClusterModel  # noqa: E402
from kdns.serve.incremental import IncrementalCompiler  # noqa: E402

SERVICES = int(os.environ.get("KDNS_BENCH_SERVICES", "2000"))


@pytest.fixture(scope="module")
def cluster():
    model = ClusterModel()
    for n in range(50):
        model.apply({"kind": "Namespace", "metadata": {"name": f"ns{n}"}})
    for i in range(SERVICES):
        model.apply({**service(i, i % 5 == 0), "kind": "Service"})
        model.apply({**slice_for(i, 10), "kind": "EndpointSlice"})
    inc = IncrementalCompiler()
    inc.compile(model, synced=True, changed=set())
    return model, inc


def changes(model):
    """An endless churn: each call gives one headless service a new endpoint set."""
    for gen in itertools.count(1):
        for i in range(0, SERVICES, 5):
            model.apply({**slice_for(i, 10, gen), "kind": "EndpointSlice"})
            yield {("EndpointSlice", f"ns{i % 50}", f"svc{i}-abc")}


def test_full_compile_after_one_change(benchmark, cluster):
    model, _ = cluster
    churn = changes(model)
    def setup():
        next(churn)             # the change is applied to the model outside the timing

    image = benchmark.pedantic(lambda: build.compile_model(model), setup=setup, rounds=3,
                               iterations=1)
    assert image == IncrementalCompiler().compile(model, synced=True, changed=set())


def test_incremental_compile_after_one_change(benchmark, cluster):
    model, inc = cluster
    churn = changes(model)

    def setup():
        return (next(churn),), {}

    def one(changed):
        return inc.compile(model, synced=True, changed=changed)

    image = benchmark.pedantic(one, setup=setup, rounds=20, iterations=1)
    assert inc.full_compiles == 0 and inc.last_dirty == 1
    assert image == build.compile_model(model)
