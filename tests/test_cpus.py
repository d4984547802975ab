"""The default worker count: the cgroup CPU quota (v1 and v2) rounded up, capped by the CPUs
the process may use, at least one; read from temporary directories laid out as / is."""
from __future__ import annotations

import os

import pytest

from kdns import cli
from kdns.serve import cpus


def lay(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


V2_SELF = {"proc/self/cgroup": "0::/\n"}
# cgroup v1 as a container without its own cgroup namespace sees it: the host's path in
# /proc/self/cgroup, and the container's cgroup at the root of the cpu mount.
V1_SELF = {"proc/self/cgroup": "12:memory:/kubepods/pod1/c1\n"
                               "4:cpu,cpuacct:/kubepods/pod1/c1\n"
                               "1:name=systemd:/kubepods/pod1/c1\n"}


def test_v2_quota(tmp_path):
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "200000 100000\n"})
    q = cpus.cpu_quota(root)
    assert q.cpus == 2.0 and q.warning is None
    assert "cpu.max" in q.source
    assert cpus.default_workers(q, 8) == 2


def test_v2_quota_rounds_up(tmp_path):
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cpus.decide_workers(root, 8)[0] == 2
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "10000 100000\n"})   # 100m
    assert cpus.decide_workers(root, 8)[0] == 1


def test_v2_max_means_every_usable_cpu(tmp_path):
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "max 100000\n"})
    n, q = cpus.decide_workers(root, 6)
    assert (n, q.cpus, q.warning) == (6, None, None)
    assert "no CPU quota" in q.source


def test_v2_nested_cgroup_takes_the_smallest_quota_on_the_way_up(tmp_path):
    root = lay(tmp_path, {"proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                          "sys/fs/cgroup/cpu.max": "max 100000\n",
                          "sys/fs/cgroup/kubepods/pod1/cpu.max": "300000 100000\n",
                          "sys/fs/cgroup/kubepods/pod1/c1/cpu.max": "max 100000\n"})
    q = cpus.cpu_quota(root)
    assert q.cpus == 3.0 and "pod1/cpu.max" in q.source


def test_v1_quota_at_the_mount_root(tmp_path):
    root = lay(tmp_path, {**V1_SELF,
                          "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "350000\n",
                          "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    n, q = cpus.decide_workers(root, 16)
    assert (n, q.cpus) == (4, 3.5)
    assert "cfs_quota_us" in q.source


def test_v1_minus_one_means_no_quota(tmp_path):
    root = lay(tmp_path, {**V1_SELF,
                          "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                          "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    n, q = cpus.decide_workers(root, 3)
    assert (n, q.cpus, q.warning) == (3, None, None)


def test_quota_capped_by_usable_cpus(tmp_path):
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "1600000 100000\n"})
    assert cpus.decide_workers(root, 2)[0] == 2


def test_absent_means_every_usable_cpu(tmp_path):
    n, q = cpus.decide_workers(str(tmp_path), 5)      # no /proc, no /sys at all
    assert (n, q.cpus, q.warning) == (5, None, None)
    root = lay(tmp_path, V2_SELF)                     # a cgroup, but no cpu controller
    n, q = cpus.decide_workers(root, 5)
    assert (n, q.warning) == (5, None)


@pytest.mark.parametrize("files", [
    {**V2_SELF, "sys/fs/cgroup/cpu.max": "lots\n"},
    {**V2_SELF, "sys/fs/cgroup/cpu.max": "0 100000\n"},
    {**V2_SELF, "sys/fs/cgroup/cpu.max": "1 2 3\n"},
    {**V1_SELF, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "fast\n",
     "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    {**V1_SELF, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n"},     # no period
], ids=["v2-word", "v2-zero", "v2-three-fields", "v1-word", "v1-no-period"])
def test_malformed_warns_and_falls_back(tmp_path, files):
    n, q = cpus.decide_workers(lay(tmp_path, files), 4)
    assert n == 4 and q.cpus is None
    assert q.warning and "cannot read the CPU quota" in q.warning and q.source in q.warning


def test_never_fewer_than_one():
    assert cpus.default_workers(cpus.Quota(0.001, "x"), 8) == 1
    assert cpus.default_workers(cpus.Quota(None, "x"), 0) == 1


def test_this_machine_reads_without_warning():
    # The real /proc and /sys of the test machine (v1, v2 or neither): a count in range.
    n, q = cpus.decide_workers()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert q.warning is None, q.warning


def test_cli_flag_overrides_and_default_says_why(tmp_path):
    assert cli._workers(7, str(tmp_path)) == (7, "--workers", None)
    root = lay(tmp_path, {**V2_SELF, "sys/fs/cgroup/cpu.max": "100000 100000\n"})
    n, why, warning = cli._workers(None, root)
    assert n == 1 and warning is None
    assert "CPU quota 1 from" in why and "cpu.max" in why
    args = cli.build_parser().parse_args(["serve", "--from-file", str(root) + "/proc/self/cgroup"])
    assert args.workers is None           # the default is decided at start, not by argparse
