"""The import rules of kdns's layout, and a checker over a source tree.

Each stage package may import only the packages named for it below; a module outside every
stage (``kdns.cli``, ``kdns.settings``...) is its own layer. The packet-path extension
(``_fastpath.pyx`` and what it includes) may import nothing of kdns but its own declarations
and the image layout's; the zone compiler's extension only the image layout's.
Imports anywhere in a module count, lazy ones inside functions too: a lazy import is still a
dependency.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

# What each package may import (besides itself). The bottom modules every layer may use.
BOTTOM = {"kdns.settings", "kdns.errors"}
ALLOWED = {
    "kdns.dns": set(),
    "kdns.zone": {"kdns.dns"},
    "kdns.packet": {"kdns.dns", "kdns.zone"},
    "kdns.kube": {"kdns.dns"},
    "kdns.forward": {"kdns.dns", "kdns.zone", "kdns.packet"},
    "kdns.observe": {"kdns.dns", "kdns.zone", "kdns.packet"},
    "kdns.serve": {"kdns.dns", "kdns.zone", "kdns.packet", "kdns.kube", "kdns.forward",
                   "kdns.observe"},
    # Node-local mode: kdns serve's supervisor with the image stream as its source.
    "kdns.nodelocal": {"kdns.dns", "kdns.zone", "kdns.packet", "kdns.kube", "kdns.forward",
                       "kdns.observe", "kdns.serve"},
    "kdns.settings": set(),
    "kdns.errors": set(),
}
# What each package's extension sources (.pyx/.pxi/.pxd) may cimport or import. The packet
# path is compiled into the worker, so nothing of the control plane: its own declarations
# and the image layout's (kdns/zone/layout.pxd: constants and inline functions, no module
# at run time). The compiler core shares that layout and nothing else. Both may cimport the
# DNS wire facts' declarations (kdns/dns/wire.pxd: constants and inline functions, likewise).
EXTENSION_ALLOWED = {
    "kdns.packet": {"kdns.packet.system", "kdns.packet._fastpath", "kdns.zone.layout",
                    "kdns.dns.wire"},
    "kdns.zone": {"kdns.zone.layout", "kdns.dns.wire"},
}
EXTENSION_NAMES = {"kdns.packet": "the packet-path extension", "kdns.zone": "the zone extension"}
TOP_MODULES_MAX = 6
# The entry points: they wire everything and nothing imports them (but each other).
ENTRY = {"kdns.cli", "kdns.__main__"}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_imports(path: Path, mod: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every kdns import in a .py file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # "from kdns.x import y": y is a module kdns.x.y, or a name in kdns.x.
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(n, m) for n, m in out if m == "kdns" or m.startswith("kdns.")]


_CY_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def cython_imports(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    out = []
    for m in _CY_IMPORT.finditer(text):
        name = m.group(1) or m.group(2)
        if name.startswith("kdns"):
            out.append((text.count("\n", 0, m.start()) + 1, name))
    return out


def owner(mod: str, known: set[str]) -> str | None:
    """The layer a module belongs to: its stage package, or the top-level module itself."""
    parts = mod.split(".")
    if len(parts) >= 2 and f"kdns.{parts[1]}" in known | set(ALLOWED):
        return f"kdns.{parts[1]}"
    return None


def check(root: Path) -> list[str]:
    """Every broken rule under ``root`` (the kdns package directory), one sentence each."""
    root = Path(root)
    problems = []
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    known = set(modules) | {module_name(root, p) for p in root.rglob("*.pyx")}
    graph: dict[str, set[str]] = {}
    for mod, path in sorted(modules.items()):
        layer = owner(mod, known)
        graph[mod] = set()
        for line, imp in python_imports(path, mod):
            target = next((m for m in (imp, imp.rsplit(".", 1)[0]) if m in known), None)
            if target is None:
                continue          # a name, not a module (or a compiled extension)
            graph[mod].add(target)
            tl = owner(target, known)
            if tl in ENTRY and layer not in ENTRY:
                problem = f"{path}:{line}: {mod} imports the entry point {target}"
            elif layer in ENTRY or layer is None or tl is None or tl == layer or tl in BOTTOM:
                continue
            elif tl not in ALLOWED.get(layer, set()):
                problem = (f"{path}:{line}: {mod} imports {target}, but {layer} may import "
                           f"only {sorted(ALLOWED.get(layer, set())) or 'nothing'}")
            else:
                continue
            if problem not in problems:
                problems.append(problem)
    for path in sorted(list(root.rglob("*.pyx")) + list(root.rglob("*.pxi"))
                       + list(root.rglob("*.pxd"))):
        pkg = owner(module_name(root, path), known)
        allowed = EXTENSION_ALLOWED.get(pkg, set())
        for line, imp in cython_imports(path):
            if imp not in allowed:
                problems.append(f"{path}:{line}: {EXTENSION_NAMES.get(pkg, pkg)} imports {imp}; "
                                f"it may import only {sorted(allowed) or 'nothing of kdns'}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    tops = sorted(p.name for p in root.glob("*.py"))
    if len(tops) > TOP_MODULES_MAX:
        problems.append(f"{root} has {len(tops)} top-level modules ({', '.join(tops)}); "
                        f"at most {TOP_MODULES_MAX}: the rest belong in a stage package")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
