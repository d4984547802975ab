"""Shared test plumbing: the project root on sys.path and the CI rule for missing tools."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """Skip a test that cannot run on this developer machine; under CI=true, fail it instead
    (CI must run every test: a skip there would hide a missing feature)."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


def require_tool(name: str) -> str:
    """Path of an external tool. Under CI=true a missing tool fails the test (never a skip):
    `make test` installs every tool the suite needs."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    unavailable(f"{name} is not installed (`make test` installs it)")


def require_fastpath():
    """The compiled packet path (kdns.packet._fastpath). Under CI=true a missing build fails
    the test: `make install` builds it."""
    try:
        from kdns.packet import _fastpath
    except ImportError:
        unavailable("kdns.packet._fastpath is not built; `make install` builds it")
    return _fastpath


# Figures a passing test must show in the CI log: pytest -q captures a passing test's
# output, so they are recorded here and printed in the terminal summary, after the run.
FIGURES: list[tuple[str, str]] = []


def report(title: str, text: str) -> None:
    """Print ``text`` under ``title`` at the end of the run, whatever the test's outcome
    (a failing test's own output shows it once more)."""
    FIGURES.append((title, text))


def pytest_terminal_summary(terminalreporter):
    for title, text in FIGURES:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)
