"""The release path: sdist -> wheel -> a clean venv -> `kdns serve` answers.

Why: an sdist that lacks the Cython includes builds no wheel, and a wheel that needs a
test-only package fails at import on a user's machine; neither shows in an editable install.
"""
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

from serverutil import ROOT, a_records, running

EXAMPLE = os.path.join(ROOT, "examples", "cluster.yaml")


def run(*argv, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, argv))}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(sdist, wheel, venv python): the wheel built from the sdist, installed in a new venv
    with only the runtime dependencies."""
    tmp = tmp_path_factory.mktemp("release")
    run(sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp / "dist"), ROOT)
    (sdist,) = (tmp / "dist").glob("kdns-*.tar.gz")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "wheels"),
        str(sdist))
    (wheel,) = (tmp / "wheels").glob("kdns-*.whl")
    run(sys.executable, "-m", "venv", str(tmp / "venv"))
    python = str(tmp / "venv" / "bin" / "python")
    run(python, "-m", "pip", "install", "-q", str(wheel))
    return sdist, wheel, python


def test_the_sdist_carries_the_sources_its_build_needs(release):
    sdist, _, _ = release
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for pyx in ("kdns/packet/_fastpath.pyx", "kdns/zone/_compile.pyx"):
        assert pyx in names
    needed = {os.path.relpath(os.path.join(d, f), ROOT)
              for d, _, files in os.walk(os.path.join(ROOT, "kdns"))
              for f in files if f.endswith((".pxd", ".pxi"))}
    assert needed and needed <= names, needed - names
    assert not [n for n in names if n.endswith((".c", ".so"))]


def test_the_wheel_carries_what_runs_and_no_build_leftovers(release):
    _, wheel, _ = release
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert [n for n in names if n.startswith("kdns/packet/_fastpath.") and n.endswith(".so")]
    assert [n for n in names if n.startswith("kdns/zone/_compile.") and n.endswith(".so")]
    assert not [n for n in names if n.endswith((".c", ".pyx", ".pxd", ".pxi"))]


def test_runtime_dependencies_are_what_the_runtime_imports(release):
    _, wheel, python = release
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip().split(";")[0]
                    for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line]
    # Compared as PEP 503 normalises names: case, "-", "_" and "." are alike.
    names = sorted(re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ]", r)[0].lower()) for r in requires)
    assert names == ["kubernetes", "prometheus-client", "pyyaml"], names
    # Every module of the package imports with nothing but those installed.
    code = ("import importlib, pkgutil, kdns; "
            "[importlib.import_module(m.name) for m in "
            "pkgutil.walk_packages(kdns.__path__, 'kdns.') if m.name != 'kdns.__main__']")
    run(python, "-c", code, cwd="/")


def test_the_installed_wheel_serves(release, tmp_path):
    _, _, python = release
    # cwd "/": the source tree must not be importable, only the installed wheel.
    with running(tmp_path, zone_file=EXAMPLE, workers=1, python=python, cwd="/") as k:
        msg = k.udp("kubernetes.default.svc.cluster.local")
        assert a_records(msg)
        assert k.metrics()
