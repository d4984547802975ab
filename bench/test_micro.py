"""Micro-benchmarks of the per-packet function: one query in, one reply out.

Both implementations on the same image and the same query bytes: the compiled
``_fastpath.answer`` and the pure-Python ``refpath.answer`` (the oracle and fallback), on the
small sample image of the tests and on a generated 5,000-service cluster (bench/gen_cluster.py
through kdns.kube.records), for a hit (A), NXDOMAIN (a search-walk miss), NODATA (AAAA on a
v4-only service), SRV with an A record in the additional section, and PTR.

``answer`` is measured as Python calls it (argument parsing, output buffer, bytes object);
``test_native_loop`` measures the packet function alone through ``_fastpath.bench_answer``,
which loops in C with the GIL released: the difference is the cost of the Python boundary,
which the UDP workers do not pay (they answer whole recvmmsg batches in Cython).

    .venv/bin/python -m pytest bench/test_micro.py --benchmark-only -q

Each benchmark first checks that the reply is the kind of answer it claims to measure
(rcode and counts), so a regression that turns a hit into an error shows up as a failure,
not as a speed-up. No timing is asserted.
"""
from __future__ import annotations

import os
import struct
import sys

import pytest

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for p in (ROOT, os.path.join(ROOT, "tests"), BENCH):
    if p not in sys.path:
        sys.path.insert(0, p)

import dns.message  # noqa: E402

from kdns import settings  # noqa: E402
from kdns.zone import refpath  # noqa: E402

NOERROR, NXDOMAIN = 0, 3

# case -> (name, type, rcode, answers, additional) for each image. The cluster names are
# resolved from the generated cluster at fixture time (``{svc}`` etc.).
CASES = {
    "sample": {
        "hit_A": ("kubernetes.default.svc.cluster.local", "A", NOERROR, 1, 0),
        "nxdomain": ("kubernetes.default.default.svc.cluster.local", "A", NXDOMAIN, 0, 0),
        "nodata_AAAA": ("kubernetes.default.svc.cluster.local", "AAAA", NOERROR, 0, 0),
        "srv_additional": ("_https._tcp.kubernetes.default.svc.cluster.local", "SRV", NOERROR, 1, 1),
        "ptr": ("1.0.96.10.in-addr.arpa", "PTR", NOERROR, 1, 0),
    },
    "cluster5k": {
        "hit_A": ("{fqdn}", "A", NOERROR, 1, 0),
        "nxdomain": ("{name}.{ns}.{podns}.svc.cluster.local", "A", NXDOMAIN, 0, 0),
        "nodata_AAAA": ("{fqdn}", "AAAA", NOERROR, 0, 0),
        "srv_additional": ("_{port}._tcp.{fqdn}", "SRV", NOERROR, 1, 1),
        "ptr": ("{rev}", "PTR", NOERROR, 1, 0),
    },
}


def _fastpath():
    try:
        from kdns.packet import _fastpath
    except ImportError as e:
        pytest.fail(f"kdns.packet._fastpath is not importable ({e}); build it with `make install` "
                    f"(or `.venv/bin/pip install -e .`) before benchmarking the compiled path")
    return _fastpath


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> (image bytes, format values for the case names)."""
    import zonefixtures

    import gen_cluster
    from kdns.kube import records
    from kdns.serve import build

    out = {"sample": (zonefixtures.sample_image(), {})}
    d = tmp_path_factory.mktemp("cluster")
    meta = gen_cluster.write_all(str(d), 5000, 50, 1000, seed=1, queries=10)
    c = gen_cluster.generate(5000, 50, 1000, seed=1)
    svc = next(s for s in c.services[len(c.services) // 2:] if s.port_name)
    podns = next(ns for ns in c.namespaces if ns != svc.namespace)
    import ipaddress
    fmt = {"fqdn": svc.fqdn, "name": svc.name, "ns": svc.namespace, "podns": podns,
           "port": svc.port_name, "rev": ipaddress.ip_address(svc.ip).reverse_pointer}
    out["cluster5k"] = (build.compile_file(meta["paths"]["kdns_input"]), fmt)
    return out


def _query(name: str, qtype: str) -> bytes:
    q = dns.message.make_query(name, qtype)
    q.id = 0x1234
    return q.to_wire()


def _setup(impl: str, image: str, case: str, images):
    buf, fmt = images[image]
    name, qtype, rcode, an, ar = CASES[image][case]
    query = _query(name.format(**fmt), qtype)
    if impl == "fastpath":
        mod = _fastpath()
        img = mod.Image(buf)
    else:
        mod = refpath
        img = refpath.Image(buf)
    action, reply = mod.answer(img, query, edns_max=settings.EDNS_UDP_SIZE)
    # What is measured must be the answer it claims to be.
    assert action == refpath.ACTION_SEND, (impl, image, case, action)
    _, flags, _, got_an, _, got_ar = struct.unpack_from("!HHHHHH", reply, 0)
    assert (flags & 0xF, got_an, got_ar >= ar) == (rcode, an, True), (impl, image, case, reply.hex())
    return mod, img, query, reply


@pytest.mark.parametrize("case", list(CASES["sample"]))
@pytest.mark.parametrize("image", ["sample", "cluster5k"])
@pytest.mark.parametrize("impl", ["fastpath", "refpath"])
def test_answer(benchmark, impl, image, case, images):
    mod, img, query, reply = _setup(impl, image, case, images)
    benchmark.group = f"{image}-{case}"
    benchmark.extra_info.update(reply_bytes=len(reply), query_bytes=len(query))
    result = benchmark(mod.answer, img, query, edns_max=settings.EDNS_UDP_SIZE)
    assert result[1] == reply


@pytest.mark.parametrize("case", list(CASES["sample"]))
@pytest.mark.parametrize("image", ["sample", "cluster5k"])
def test_native_loop(benchmark, image, case, images):
    """1,000 answers per round inside _fastpath (no Python per packet); extra_info has
    the mean ns per answer as the packet function sees it."""
    mod, img, query, _ = _setup("fastpath", image, case, images)
    if not hasattr(mod, "bench_answer"):
        pytest.fail("kdns.packet._fastpath has no bench_answer(img, query, n)")
    n = 1000
    benchmark.group = f"native-loop-x{n}"
    ns = benchmark(mod.bench_answer, img, query, n, edns_max=settings.EDNS_UDP_SIZE)
    benchmark.extra_info["ns_per_answer_last_round"] = ns
    benchmark.extra_info["answers_per_round"] = n


ROTATING = {
    "headless_A": ("hl.default.svc.cluster.local", "A", 6, 0),
    "headless_SRV": ("_http._tcp.hl.default.svc.cluster.local", "SRV", 6, 6),
}


@pytest.mark.parametrize("rotation", ["off", "on"])
@pytest.mark.parametrize("case", list(ROTATING))
def test_native_loop_rotation(benchmark, case, rotation):
    """A headless service's 6 A records, and its 6 SRV records with their glue, answered in
    the compiled order (off) and rotated by a worker's counters (on, CoreDNS loadbalance):
    what rotation costs per answer."""
    import zonefixtures
    mod = _fastpath()
    img = mod.Image(zonefixtures.sample_image(rotating=True))
    name, qtype, an, ar = ROTATING[case]
    q = dns.message.make_query(name, qtype, use_edns=0, payload=1232)   # room for the glue
    q.id = 0x1234
    query = q.to_wire()
    rot = mod.Rotation() if rotation == "on" else None
    first = mod.answer(img, query, edns_max=settings.EDNS_UDP_SIZE, rotation=rot or 0)[1]
    second = mod.answer(img, query, edns_max=settings.EDNS_UDP_SIZE, rotation=rot or 0)[1]
    assert struct.unpack_from("!HHH", first, 6) == (an, 0, ar + 1)     # + OPT
    assert (first != second) == (rotation == "on")
    n = 1000
    benchmark.group = f"native-loop-rotation-x{n}"
    ns = benchmark(mod.bench_answer, img, query, n, edns_max=settings.EDNS_UDP_SIZE,
                   rotation=rot)
    benchmark.extra_info["ns_per_answer_last_round"] = ns
