"""`kdns node-local` flags: a bad one exits 2 with one sentence naming it, before anything
(interface, iptables rule, socket) is set up; and the node set-up's idempotence, in a
network namespace made for it."""
import os
import subprocess

import pytest

from conftest import require_tool, unavailable
from kdns import cli

URL = ["--image-url", "http://127.0.0.1:9/image"]


def run_main(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    return code, err


BAD = [
    ([], "--image-url"),
    (URL + ["--listen", "169.254.20"], "--listen"),
    (URL + ["--kube-dns-upstream", "10.0.0.10:99999"], "--kube-dns-upstream"),
    (URL + ["--stale-after", "soon"], "--stale-after"),
    (URL + ["--poll-wait", "60s", "--stale-after", "30s"], "--poll-wait"),
    (URL + ["--upstream", "central"], "--central-dns"),
    (URL + ["--upstream", "elsewhere"], "--upstream"),
    (["--image-url", "ftp://x/image"], "--image-url"),
    (URL + ["--setup-iptables", "maybe"], "--setup-iptables"),
    (URL + ["--metrics-port", "53"], "--metrics-port"),
    (URL + ["--workers", "0"], "--workers"),
]


@pytest.mark.parametrize("extra,flag", BAD, ids=[f for _, f in BAD])
def test_bad_flag_is_one_sentence_naming_it(capsys, extra, flag):
    code, err = run_main(capsys, ["node-local", *extra])
    assert code == 2
    assert flag in err
    assert len(err.strip().splitlines()) == 1, err


def test_defaults_are_node_cache_s(capsys):
    a = cli.build_parser().parse_args(["node-local", *URL])
    assert a.listen == ("169.254.20.10",)
    assert a.setup_interface is True and a.setup_iptables is True
    assert a.interface_name == "nodelocaldns" and a.interface_type == "dummy"
    assert a.poll_wait < a.stale_after
    a = cli.build_parser().parse_args(["node-local", *URL, "--setup-interface=false",
                                       "--setup-iptables=false", "--listen",
                                       "169.254.20.10,10.96.0.10"])
    assert a.setup_interface is False and a.setup_iptables is False
    assert a.listen == ("169.254.20.10", "10.96.0.10")


def test_serve_image_is_opt_in():
    assert cli.build_parser().parse_args(["serve", "--from-file", __file__]).serve_image is False
    assert cli.build_parser().parse_args(["serve", "--from-file", __file__,
                                          "--serve-image"]).serve_image is True


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    require_tool("ip")
    require_tool("iptables")
    require_tool("ip6tables")
    name = f"knc{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def in_ns(ns, *argv):
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)


def test_node_setup_is_idempotent_and_undone(netns):
    from kdns.nodelocal import netsetup
    kind = "dummy" if in_ns(netns, "ip", "link", "add", "probe0", "type", "dummy").returncode == 0 \
        else "bridge"
    in_ns(netns, "ip", "link", "del", "probe0")
    # Run in the namespace: a child process entered with `ip netns exec`.
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from kdns.nodelocal import netsetup
s = netsetup.NodeSetup(["169.254.20.10", "10.96.0.10", "fd00:10::a"], kind={kind!r})
s.apply(); s.apply()            # twice: nothing doubled
print("APPLIED", flush=True)
sys.stdin.readline()
s.undo(); s.undo()              # twice: the second finds nothing and says nothing wrong
print("UNDONE", flush=True)
"""
    import sys
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "APPLIED"
        rules = in_ns(netns, "iptables-save").stdout
        assert rules.count(netsetup.COMMENT) == 20, rules        # 2 addresses x 10 rules
        rules6 = in_ns(netns, "ip6tables-save").stdout
        assert rules6.count(netsetup.COMMENT) == 10, rules6      # the IPv6 one: ip6tables
        assert "-d fd00:10::a/128 -p udp -m udp --dport 53" in rules6
        addrs = in_ns(netns, "ip", "-o", "addr", "show", "dev", "nodelocaldns").stdout
        assert "169.254.20.10/32" in addrs and "10.96.0.10/32" in addrs
        assert addrs.count("169.254.20.10/32") == 1
        # A rule of someone else's in the same chain is left alone.
        in_ns(netns, "iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport",
              "5353", "-j", "NOTRACK")
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "UNDONE"
    finally:
        p.stdin.close()
        p.wait(30)
    rules = in_ns(netns, "iptables-save").stdout
    assert netsetup.COMMENT not in rules
    assert netsetup.COMMENT not in in_ns(netns, "ip6tables-save").stdout
    assert "--dport 5353 -j NOTRACK" in rules
    assert in_ns(netns, "ip", "link", "show", "dev", "nodelocaldns").returncode != 0


def test_rules_are_node_cache_s():
    from kdns.nodelocal.netsetup import rules
    got = {(t, " ".join(r)) for t, r in rules(["169.254.20.10"])}
    c = '-m comment --comment kdns node-local'
    for proto in ("udp", "tcp"):
        assert ("raw", f"PREROUTING -p {proto} -m {proto} -d 169.254.20.10 --dport 53 {c} "
                       f"-j NOTRACK") in got
        assert ("filter", f"INPUT -p {proto} -m {proto} -d 169.254.20.10 --dport 53 {c} "
                          f"-j ACCEPT") in got
        assert ("raw", f"OUTPUT -p {proto} -m {proto} -s 169.254.20.10 --sport 53 {c} "
                       f"-j NOTRACK") in got
        assert ("filter", f"OUTPUT -p {proto} -m {proto} -s 169.254.20.10 --sport 53 {c} "
                          f"-j ACCEPT") in got
