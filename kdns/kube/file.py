"""Kubernetes objects from a file, as ``kubectl get -o yaml|json`` prints them.

Why: ``kdns serve --from-file`` and ``kdns records`` must work without an API server (demos,
tests, benchmarks, air-gapped debugging). This module turns a file into plain object dicts of
the kinds DNS needs; the cluster model slims them.

It accepts a single object, a ``List`` (or any ``*List`` kind) with ``items`` (nested lists
are flattened), a multi-document YAML stream, JSON, or a JSON array. Objects of other kinds
are counted and ignored, so a full ``kubectl get all -A -o yaml`` dump is usable as is.

What it must not do: build DNS names or judge objects' DNS validity (that is ``records.py``),
or keep anything after returning.
"""
from __future__ import annotations

import json
from collections import Counter

import yaml

KINDS = frozenset({"Service", "EndpointSlice", "Endpoints", "Namespace", "Pod"})

# libyaml is an order of magnitude faster on large dumps; fall back to the pure loader.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class InputError(ValueError):
    """The input file cannot be used; the message is one sentence naming file and problem."""


def read_objects(path: str) -> tuple[list[dict], Counter]:
    """Objects of the DNS kinds in ``path`` and a count of the ignored ones by kind."""
    text = _read_text(path)
    docs = _parse(path, text)
    objects: list[dict] = []
    ignored: Counter = Counter()
    for doc in docs:
        _flatten(path, doc, objects, ignored, depth=0)
    return objects, ignored


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give the path of a YAML or JSON file "
                         "of Kubernetes objects.") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise InputError(f"{path}: cannot be read ({reason}).") from None


def _parse(path: str, text: str) -> list:
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        # JSON is (almost) a YAML subset, but the json module is far faster and its error
        # messages name line and column precisely.
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                             f"{e.msg}.") from None
        except RecursionError:          # both parsers recurse once per nesting level
            raise InputError(f"{path}: JSON nested too deeply to be Kubernetes objects.") from None
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except RecursionError:
        raise InputError(f"{path}: YAML nested too deeply to be Kubernetes objects.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise InputError(f"{path}: invalid YAML{where}: {problem}.") from None


def _flatten(path: str, doc, out: list, ignored: Counter, depth: int,
             item_kind: str | None = None) -> None:
    if depth > 8:
        raise InputError(f"{path}: List objects nested more than 8 deep.")
    if isinstance(doc, list):                     # a bare JSON/YAML array of objects
        for item in doc:
            _flatten(path, item, out, ignored, depth + 1)
        return
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected Kubernetes objects (mappings with a 'kind'), "
                         f"found a {type(doc).__name__}.")
    kind = doc.get("kind") or item_kind
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        # The API's typed lists (ServiceList…) omit each item's kind; kubectl's List does not.
        inner = kind[:-4] or None
        for item in doc["items"]:
            _flatten(path, item, out, ignored, depth + 1, inner)
    elif isinstance(kind, str) and kind in KINDS:
        out.append(doc if doc.get("kind") else {**doc, "kind": kind})
    else:
        # Not a kind DNS uses; a kind that is no string at all is no kind of object.
        if isinstance(kind, str) or kind is None:
            ignored[str(kind)] += 1
        else:
            ignored[f"(a {type(kind).__name__})"] += 1
