"""The libc resolvers of a pod with ``ndots:5`` against kdns, autopath off then on: glibc
(Python's getaddrinfo) and musl (a client built with musl-gcc), in a network and mount
namespace this test creates (tests/autopath_libc.py does the work inside it).

With the pod's search path (three cluster domains and the node's) an outside name costs
glibc and musl five names times A and AAAA, ten queries, without autopath; with it, the
first A and AAAA are answered (CNAME + address) and the lookup stops: two. A service of
another namespace ("db.prod") costs four without, two with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import report, require_tool, unavailable

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    unshare, _ = require_tool("unshare"), require_tool("ip")
    musl_gcc = require_tool("musl-gcc")
    if os.geteuid() != 0:
        unavailable("network and mount namespaces need root")
    tmp = tmp_path_factory.mktemp("libc")
    client = str(tmp / "musl_lookup")
    subprocess.run([musl_gcc, "-O2", "-static", "-o", client,
                    os.path.join(HERE, "fixtures", "musl_lookup.c")], check=True)
    r = subprocess.run([unshare, "--net", "--mount", sys.executable,
                        os.path.join(HERE, "autopath_libc.py"), str(tmp), client],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    lines = []
    for kind in ("outside", "cluster"):
        for lib in ("glibc", "musl"):
            off, on = out["off"][kind][lib], out["on"][kind][lib]
            lines.append(f"{kind:8} {lib:6} queries/lookup {off['queries_per_lookup']:.0f} -> "
                         f"{on['queries_per_lookup']:.0f}; mean lookup "
                         f"{off['latency_us']:.0f} us -> {on['latency_us']:.0f} us")
    report("autopath: libc lookups from a pod, ndots:5, autopath off -> on (loopback)",
           "\n".join(lines))
    return out


@pytest.mark.parametrize("lib", ["glibc", "musl"])
def test_outside_name_takes_one_round_trip(figures, lib):
    off, on = figures["off"]["outside"][lib], figures["on"]["outside"][lib]
    assert off["queries_per_lookup"] == 10            # 5 names x (A, AAAA)
    assert on["queries_per_lookup"] == 2
    assert on["addresses"] == off["addresses"] == ["2001:db8::34", "93.184.216.34"]


@pytest.mark.parametrize("lib", ["glibc", "musl"])
def test_service_of_another_namespace_takes_one_round_trip(figures, lib):
    off, on = figures["off"]["cluster"][lib], figures["on"]["cluster"][lib]
    assert off["queries_per_lookup"] == 4
    assert on["queries_per_lookup"] == 2
    assert on["addresses"] == off["addresses"] == ["10.96.2.7"]
