"""The layout's import rules hold over kdns/, and the checker catches each kind of break."""
from pathlib import Path

import layers

KDNS = Path(__file__).resolve().parent.parent / "kdns"


def test_kdns_follows_its_import_rules():
    assert layers.check(KDNS) == []


def _tree(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "kdns"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in {Path(rel).parent for rel in files} - {Path(".")}:
        (root / pkg / "__init__.py").touch()
    return root


def test_a_lower_layer_importing_a_higher_one_is_named(tmp_path):
    root = _tree(tmp_path, {"zone/image.py": "def f():\n    from kdns.serve import publish\n",
                            "serve/publish.py": ""})
    (problem,) = layers.check(root)
    assert "zone/image.py:2" in problem and "kdns.serve.publish" in problem


def test_relative_imports_resolve_before_they_are_judged(tmp_path):
    root = _tree(tmp_path, {"kube/records.py": "from ..zone import image\n",
                            "zone/image.py": ""})
    (problem,) = layers.check(root)
    assert "kdns.kube.records imports kdns.zone.image" in problem


def test_the_extension_may_not_import_the_control_plane(tmp_path):
    root = _tree(tmp_path, {"packet/_fastpath.pyx": "from kdns.serve.publish import x\n",
                            "serve/publish.py": ""})
    (problem,) = layers.check(root)
    assert "_fastpath.pyx:1" in problem and "kdns.serve.publish" in problem


def test_the_packet_extension_may_not_cimport_the_compiler_core(tmp_path):
    root = _tree(tmp_path, {"packet/_fastpath.pyx": "from kdns.zone.layout cimport le16\n"
                                                    "from kdns.zone._compile cimport ZoneCore\n",
                            "zone/_compile.pyx": "from kdns.zone.layout cimport le16\n"})
    (problem,) = layers.check(root)
    assert "_fastpath.pyx:2" in problem and "kdns.zone._compile" in problem


def test_the_zone_extension_may_cimport_only_the_layout(tmp_path):
    root = _tree(tmp_path, {"zone/_compile.pyx": "from kdns.packet.system cimport AF_INET\n"})
    (problem,) = layers.check(root)
    assert "_compile.pyx:1: the zone extension imports kdns.packet.system" in problem


def test_a_cycle_inside_one_layer_is_named(tmp_path):
    root = _tree(tmp_path, {"observe/a.py": "from kdns.observe import b\n",
                            "observe/b.py": "from kdns.observe import a\n"})
    assert layers.check(root) == ["import cycle: kdns.observe.a -> kdns.observe.b -> "
                                  "kdns.observe.a"]


def test_nothing_imports_the_entry_points(tmp_path):
    root = _tree(tmp_path, {"cli.py": "", "serve/supervisor.py": "import kdns.cli\n"})
    (problem,) = layers.check(root)
    assert "imports the entry point kdns.cli" in problem


def test_the_top_level_holds_at_most_six_modules(tmp_path):
    root = _tree(tmp_path, {f"m{i}.py": "" for i in range(6)})   # + __init__.py = 7
    (problem,) = layers.check(root)
    assert "7 top-level modules" in problem
