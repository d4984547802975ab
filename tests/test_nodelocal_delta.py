"""The image delta (kdns/serve/delta.py): exact round trips on real compiled images,
far smaller than the full image, and refusal of anything that does not fit."""
import zlib

import pytest

from kdns.serve import delta as D
from kdns.packet import engine
from nodelocal_util import cluster_items, compile_items, service


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delta")
    base = compile_items(tmp, cluster_items(400), 1)
    changed = {
        "add service": compile_items(tmp, cluster_items(400, extra=[
            service("added", "ns1", "10.96.99.9")]), 2),
        "move endpoint": compile_items(tmp, cluster_items(400, endpoint_of={200: "10.250.1.2"}), 3),
        "remove service": compile_items(tmp, cluster_items(399), 4),
    }
    return base, changed


@pytest.mark.parametrize("change", ["add service", "move endpoint", "remove service"])
def test_round_trip_and_size(images, change):
    base, changed = images
    target = changed[change]
    d = D.make(base, target)
    out = D.apply(base, d)
    assert out == target
    assert engine.Image(out).verify() is not False
    full = len(zlib.compress(target, 6))
    # A one-object change must cost a small fraction of the compressed full image.
    assert len(d) * 5 < full, (change, len(d), full)


def test_identical_images_cost_almost_nothing(images):
    base, _ = images
    d = D.make(base, base)
    assert D.apply(base, d) == base
    assert len(d) < 100


def test_unrelated_images_still_round_trip(images, tmp_path):
    base, _ = images
    other = compile_items(tmp_path, cluster_items(30), 9)
    assert D.apply(base, D.make(base, other)) == other
    assert D.apply(other, D.make(other, base)) == base


def test_wrong_base_is_refused(images):
    base, changed = images
    d = D.make(base, changed["add service"])
    with pytest.raises(D.DeltaError, match="another base"):
        D.apply(changed["move endpoint"], d)


@pytest.mark.parametrize("cut", [1, 10, 50])
def test_truncated_or_corrupt_delta_is_refused(images, cut):
    base, changed = images
    d = D.make(base, changed["add service"])
    with pytest.raises(D.DeltaError):
        D.apply(base, d[:-cut])
    raw = bytearray(zlib.decompress(d))
    raw[D.HEAD.size + cut] ^= 0x5A            # an op's kind, length or offset
    try:
        out = D.apply(base, zlib.compress(bytes(raw)))
    except D.DeltaError:
        return
    assert out != changed["add service"]      # never: the crc check refuses that
