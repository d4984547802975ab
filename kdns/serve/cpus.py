"""How many workers fit the pod: the cgroup CPU quota, not the node's CPUs.

Why: a pod's CPU affinity is usually the whole node, so "every CPU this process may use"
gives a 64-core node 64 workers, each costing memory the pod's limit must cover, while the
container may only ever run on as much CPU time as its quota allows. The quota is what
Kubernetes sets from the container's CPU limit (``limits.cpu``):

- cgroup v2: ``cpu.max`` holds ``"$MAX $PERIOD"``, ``max`` meaning no quota;
- cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in the ``cpu`` controller, a quota
  of ``-1`` meaning none.

Where the process's cgroup is: ``/proc/self/cgroup`` names it (``0::/path`` on v2,
``N:cpu,cpuacct:/path`` on v1), relative to where the hierarchy is mounted under
``/sys/fs/cgroup``. In a container with its own cgroup namespace the path is ``/`` and the
mount's root is the container's cgroup; without one the path is the host's, which does not
exist below the container's mount, whose root is then the container's cgroup. So the
directories are tried from the named one up to the mount's root, and the smallest quota on
the way is the one in force (a parent's quota limits its children too).

Everything here reads below ``root``, so tests hand it a temporary directory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    cpus: float | None          # CPUs' worth of time per period; None: no quota found
    source: str                 # the file that decided, or why there was none
    warning: str | None = None  # a quota file that could not be read: said once at start


def _own_paths(root: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process's cgroup, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _walk(mount: str, path: str):
    """The cgroup's directory below ``mount`` and each parent up to the mount's root, those
    that exist."""
    parts = [p for p in path.split("/") if p]
    for n in range(len(parts), -1, -1):
        d = os.path.join(mount, *parts[:n])
        if os.path.isdir(d):
            yield d


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_quota(text: str) -> float | None:
    """CPUs from a ``cpu.max`` line; None for "max"; ValueError when malformed."""
    fields = text.split()
    if len(fields) not in (1, 2):
        raise ValueError(text)
    period = int(fields[1]) if len(fields) == 2 else 100000      # the kernel's default
    if fields[0] == "max":
        return None
    quota = int(fields[0])
    if quota <= 0 or period <= 0:
        raise ValueError(text)
    return quota / period


def _v1_quota(quota_text: str, period_text: str | None) -> float | None:
    quota = int(quota_text)
    if quota == -1:
        return None
    if period_text is None:
        raise ValueError("no cpu.cfs_period_us beside it")
    period = int(period_text)
    if quota <= 0 or period <= 0:
        raise ValueError(f"{quota_text} / {period_text}")
    return quota / period


def cpu_quota(root: str = "/") -> Quota:
    """The CPU quota in force for this process's cgroup, read below ``root``."""
    v2, v1 = _own_paths(root)
    base = os.path.join(root, "sys/fs/cgroup")
    best: Quota | None = None
    seen = []
    if v1 is not None:
        mounts = [os.path.join(base, name) for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        for mount in mounts:
            for d in _walk(mount, v1):
                f = os.path.join(d, "cpu.cfs_quota_us")
                text = _read(f)
                if text is None:
                    continue
                seen.append(f)
                try:
                    cpus = _v1_quota(text, _read(os.path.join(d, "cpu.cfs_period_us")))
                except ValueError:
                    return Quota(None, f, f"cannot read the CPU quota in {f} ({text!r}); "
                                          f"using the CPUs this process may use")
                if cpus is not None and (best is None or cpus < best.cpus):
                    best = Quota(cpus, f"{f}: {text}")
            if seen:
                break
    elif v2 is not None:
        for d in _walk(base, v2):
            f = os.path.join(d, "cpu.max")
            text = _read(f)
            if text is None:
                continue
            seen.append(f)
            try:
                cpus = _v2_quota(text)
            except ValueError:
                return Quota(None, f, f"cannot read the CPU quota in {f} ({text!r}); "
                                      f"using the CPUs this process may use")
            if cpus is not None and (best is None or cpus < best.cpus):
                best = Quota(cpus, f"{f}: {text}")
    if best is not None:
        return best
    if seen:
        return Quota(None, f"no CPU quota ({seen[0]} has none)")
    return Quota(None, "no cgroup CPU quota file found")


def default_workers(quota: Quota, cpus_allowed: int) -> int:
    """The quota rounded up (1.5 CPUs of time keep two workers busy part of the time, and
    one would leave half a CPU idle), never more than the CPUs the process may run on,
    at least one."""
    n = cpus_allowed if quota.cpus is None else math.ceil(quota.cpus - 1e-9)
    return max(1, min(n, cpus_allowed))


def decide_workers(root: str = "/", cpus_allowed: int | None = None) -> tuple[int, Quota]:
    """The default worker count for this process and the quota that decided it."""
    if cpus_allowed is None:
        cpus_allowed = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    return default_workers(quota, cpus_allowed), quota
