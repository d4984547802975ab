"""The Corefile reader: the clusters' default Corefiles, snippets → settings, refusals with
file:line, imports, the environment, and a bad edit keeping the last good Corefile.

The defaults are hand-written fixtures in tests/corefiles/ (each names its source).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from kdns.forward import corefile as cf
from kdns.forward.forwarder import Upstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "corefiles")

# What every default shares: the kubeadm plugin set.
COMMON = {"dns_port": 53, "domain": "cluster.local", "pods": "insecure", "metrics_port": 9153,
          "health_port": 8080, "ready_port": 8181, "cache_success_ttl": 30,
          "cache_denial_ttl": 30, "cache_min_ttl": 5, "log_queries": False}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def write(tmp_path, text: str, name: str = "Corefile") -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def k3s_copy(tmp_path) -> str:
    """k3s's Corefile with its /etc/coredns/custom imports pointed at the fixtures' copy."""
    custom = tmp_path / "custom"
    shutil.copytree(fixture("k3s-custom"), custom)
    text = open(fixture("k3s.Corefile")).read().replace("/etc/coredns/custom", str(custom))
    return write(tmp_path, text, "k3s.Corefile")


# Every default has loadbalance: its answers rotate (--loadbalance), nothing is refused but
# k3s's hosts.
LB = {"loadbalance": True, "autopath": False}


@pytest.mark.parametrize("name, expect, refused", [
    ("kubeadm.Corefile", {**COMMON, **LB, "ttl": 30, "lameduck": 5.0,
                          "forward_max_concurrent": 1000}, []),
    ("kind.Corefile", {**COMMON, **LB, "ttl": 30, "lameduck": 5.0,
                       "forward_max_concurrent": 1000}, []),
    # EKS gives no ttl: the kubernetes plugin's own default, 5 s, as CoreDNS serves it.
    ("eks.Corefile", {**COMMON, **LB, "ttl": 5, "lameduck": 5.0}, []),
    ("aks.Corefile", {**COMMON, **LB, "ttl": 30, "lameduck": 5.0}, []),
    # k3s's health has no lameduck block: 0, as CoreDNS.
    ("k3s", {**COMMON, **LB, "ttl": 5, "lameduck": 0.0, "log_queries": True}, []),
])
def test_default_corefiles_parse_to_their_settings(tmp_path, name, expect, refused):
    path = k3s_copy(tmp_path) if name == "k3s" else fixture(name)
    got = cf.parse(path, env={})
    assert got.flags == expect
    assert got.resolv_conf == "/etc/resolv.conf"
    assert got.forwarding.upstream_nameservers == ()
    stubs = {"corp.example": (Upstream("10.0.0.53", 53),)} if name == "k3s" else {}
    assert got.forwarding.stub_domains == stubs
    assert [u.split(" is not")[0].rsplit("/", 1)[-1] for u in got.unsupported] == refused


def test_aks_custom_override_and_server_keys_are_imported(tmp_path):
    shutil.copy(fixture("aks.Corefile"), tmp_path / "Corefile")
    write(tmp_path, "log\n", "custom/test.override")
    write(tmp_path, "puglife.local:53 {\n    errors\n    cache 30\n"
                    "    forward . 192.11.0.1  # my dev DNS server\n}\n", "custom/test.server")
    got = cf.parse(str(tmp_path / "Corefile"), env={})
    assert got.flags["log_queries"] is True
    assert got.forwarding.stub_domains == {"puglife.local": (Upstream("192.11.0.1", 53),)}
    # Nothing mounted: the globs import nothing, as CoreDNS.
    shutil.rmtree(tmp_path / "custom")
    assert cf.parse(str(tmp_path / "Corefile"), env={}).forwarding.stub_domains == {}


BASE = """.:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    %s
}
"""


@pytest.mark.parametrize("snippet, expect", [
    ("forward . 1.1.1.1 8.8.8.8:5353",
     {"upstreams": (Upstream("1.1.1.1", 53), Upstream("8.8.8.8", 5353))}),
    ("forward . dns://10.0.0.10", {"upstreams": (Upstream("10.0.0.10", 53),)}),
    ("forward . 1.1.1.1 {\n policy sequential\n max_concurrent 50\n force_tcp\n}",
     {"forward_policy": "sequential", "forward_max_concurrent": 50, "forward_force_tcp": True}),
    ("forward . 1.1.1.1 {\n policy round_robin\n prefer_udp\n expire 10s\n health_check 5s\n}",
     {"forward_policy": "round_robin"}),
    ("forward . 1.1.1.1 {\n except corp.example\n}", {"stubs": {"corp.example": ()}}),
    ("health :8089 {\n lameduck 12s\n}", {"health_port": 8089, "lameduck": 12.0}),
    ("ready :8282", {"ready_port": 8282}),
    ("prometheus 0.0.0.0:9253", {"metrics_port": 9253}),
    ("bind 127.0.0.1", {"dns_bind_address": "127.0.0.1"}),
    ("log", {"log_queries": True}),
    ("errors\nloop\nreload 10s", {"loadbalance": False}),   # no loadbalance: no rotation
    ("loadbalance", {"loadbalance": True}),
    ("loadbalance round_robin", {"loadbalance": True}),
    ("autopath @kubernetes", {"autopath": True}),
    ("errors", {"autopath": False}),
])
def test_snippets_map_to_settings(tmp_path, snippet, expect):
    got = cf.parse(write(tmp_path, BASE % snippet), env={})
    assert got.unsupported == []
    for key, value in expect.items():
        if key == "upstreams":
            assert got.forwarding.upstream_nameservers == value and got.resolv_conf is None
        elif key == "stubs":
            assert got.forwarding.stub_domains == value
        else:
            assert got.flags[key] == value


@pytest.mark.parametrize("cache, expect", [
    ("cache", (3600, 1800, 5, None)),
    ("cache 30", (30, 30, 5, None)),
    ("cache 600 {\n success 5000 300 10\n denial 2000 60 10\n}", (300, 60, 10, 7000)),
    ("cache {\n serve_stale\n}", (3600, 1800, 5, None)),
])
def test_cache_options(tmp_path, cache, expect):
    text = (".:53 {\n kubernetes cluster.local {\n  ttl 30\n }\n forward . 1.1.1.1\n"
            f" {cache}\n}}\n")
    got = cf.parse(write(tmp_path, text), env={})
    assert got.unsupported == []
    f = got.flags
    assert (f["cache_success_ttl"], f["cache_denial_ttl"], f["cache_min_ttl"],
            f.get("cache_size")) == expect


def test_serve_stale_modes(tmp_path):
    for opt, want in (("serve_stale", (3600.0, "immediate")),
                      ("serve_stale 10m verify", (600.0, "verify"))):
        text = f".:53 {{\n kubernetes cluster.local\n cache {{\n  {opt}\n }}\n}}\n"
        f = cf.parse(write(tmp_path, text), env={}).flags
        assert (f["serve_stale"], f["serve_stale_refresh"]) == want


def test_kubernetes_options(tmp_path):
    text = (".:53 {\n kubernetes example.org {\n  pods verified\n  ttl 0\n"
            "  endpoint_pod_names\n }\n cache 30\n}\n")
    f = cf.parse(write(tmp_path, text), env={}).flags
    assert (f["domain"], f["pods"], f["ttl"], f["endpoint_pod_names"]) == \
        ("example.org", "verified", 0, True)


def test_server_blocks_several_zones_ports_env_quotes_comments(tmp_path):
    text = """# a comment line
.:{$DNS_PORT} {   # trailing comment
    kubernetes {$DOMAIN} in-addr.arpa ip6.arpa {
        fallthrough in-addr.arpa ip6.arpa
    }
    forward . "{$UPSTREAM}"
    cache 30
}
a.example:{$DNS_PORT} b.example:{$DNS_PORT} {
    forward . 10.1.0.1 10.1.0.2
}
dns://c.example.:{$DNS_PORT} {
    forward . 10.2.0.1:5300
}
"""
    got = cf.parse(write(tmp_path, text),
                   env={"DNS_PORT": "1053", "DOMAIN": "corp.local", "UPSTREAM": "9.9.9.9"})
    assert got.unsupported == []
    assert got.flags["dns_port"] == 1053 and got.flags["domain"] == "corp.local"
    assert got.forwarding.upstream_nameservers == (Upstream("9.9.9.9", 53),)
    two = (Upstream("10.1.0.1", 53), Upstream("10.1.0.2", 53))
    assert got.forwarding.stub_domains == {"a.example": two, "b.example": two,
                                           "c.example": (Upstream("10.2.0.1", 5300),)}


@pytest.mark.parametrize("snippet, line, message", [
    ("rewrite type ANY HINFO", 6, "rewrite type is not supported by kdns"),
    ("rewrite name suffix .local. .cluster.local.", 6,
     "rewrite name suffix .local. over names kdns answers from its image is not supported"),
    ("rewrite name exact db.cluster.local www.example.org", 6,
     "rewrite of db.cluster.local, a name kdns answers from its image, to www.example.org is "
     "not supported by kdns"),
    ("hosts {\n 10.0.0.1 a.example\n}", 6,
     "hosts for . without fallthrough for cluster.local is not supported by kdns"),
    ("autopath /etc/resolv.conf", 6, "autopath /etc/resolv.conf is not supported by kdns "
     "(kdns takes the search path from the cluster: autopath @kubernetes)."),
    ("autopath cluster.local @kubernetes", 6, "autopath with zones is not supported by kdns"),
    ("forward . tls://1.1.1.1", 6, "forwarding over tls:// is not supported by kdns"),
    ("forward . 1.1.1.1 {\n tls_servername x\n}", 7,
     "the forward option 'tls_servername x' is not supported by kdns."),
    ("cache 30 {\n keepttl\n}", 6, "the cache option 'keepttl' is not supported"),
    ("loadbalance weighted /etc/coredns/weights", 6,
     "the loadbalance policy 'weighted' is not supported by kdns (kdns rotates round_robin "
     "only)."),
    ("loadbalance round_robin {\n prefer 10.0.0.0/8\n}", 7,
     "the option 'prefer' of loadbalance is not supported by kdns."),
])
def test_unsupported_plugins_are_named_with_file_and_line(tmp_path, snippet, line, message):
    # A snippet with its own cache takes the place of the base's (line 5 then).
    text = BASE.replace("    cache 30\n", "") % snippet if "cache" in snippet else BASE % snippet
    path = write(tmp_path, text)
    got = cf.parse(path, env={})
    assert any(u.startswith(f"{path}:{line}: {message}") for u in got.unsupported), \
        got.unsupported


@pytest.mark.parametrize("snippet", [
    "    kubernetes cluster.local {\n        noendpoints\n    }",
    "    kubernetes cluster.local {\n        ignore empty_service\n    }",
    "    kubernetes cluster.local {\n        fallthrough\n    }",
])
def test_kubernetes_rules_kdns_lacks_are_refused(tmp_path, snippet):
    path = write(tmp_path, f".:53 {{\n{snippet}\n    cache 30\n}}\n")
    got = cf.parse(path, env={})
    assert len(got.unsupported) == 1 and got.unsupported[0].startswith(f"{path}:3: ")


@pytest.mark.parametrize("text, line, words", [
    (".:53 {\n kubernetes cluster.local\n", 1, "is not closed"),
    (".:53 {\n kubernetes a.local b.local\n}\n", 2, "kdns serves one (--domain)"),
    (".:53 {\n kubernetes cluster.local\n forward .\n}\n", 3, "forward needs FROM"),
    (".:53 {\n kubernetes cluster.local {\n  ttl 99999\n }\n}\n", 3, "is not a TTL"),
    (".:53 {\n kubernetes cluster.local\n}\n.:54 {\n forward . 1.1.1.1\n}\n", 4,
     "sets dns-port to 54"),
    (".:53 {\n kubernetes cluster.local\n forward . 1.1.1.1 \"x\n}\n", 3, "quoted token"),
    (".:53 {\n kubernetes cluster.local\n import missing.conf\n}\n", 3, "cannot read"),
])
def test_malformed_corefiles_name_the_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(cf.CorefileError) as e:
        cf.parse(path, env={})
    assert str(e.value).startswith(f"{path}:{line}: ") and words in str(e.value), str(e.value)


def test_watcher_keeps_the_last_good_corefile(tmp_path, caplog):
    good = ".:53 {\n kubernetes cluster.local\n cache 30\n forward . 10.0.0.1\n}\n"
    path = write(tmp_path, good)
    seen = []
    w = cf.CorefileWatcher(path, seen.append, env={})
    assert w.poll_once() and seen[-1].forwarding.upstream_nameservers == (Upstream("10.0.0.1", 53),)
    assert not w.poll_once()                       # unchanged: nothing
    write(tmp_path, good.replace("forward . 10.0.0.1", "forward . 10.0.0.2 {\n  bogus\n }"))
    with caplog.at_level(logging.ERROR, "kdns.forward.corefile"):
        assert not w.poll_once()
    assert f"{path}:5: the forward option 'bogus' is not supported" in caplog.text
    assert "Keeping the last good Corefile" in caplog.text
    assert len(seen) == 1 and w.current is seen[0]
    write(tmp_path, good.replace("10.0.0.1", "10.0.0.3"))
    assert w.poll_once() and seen[-1].forwarding.upstream_nameservers == (Upstream("10.0.0.3", 53),)


def kdns_serve(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "kdns", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_an_unsupported_plugin_in_one_sentence(tmp_path):
    text = open(fixture("kubeadm.Corefile")).read().replace(
        "    loadbalance\n", "    loadbalance weighted /etc/coredns/weights\n")
    path = write(tmp_path, text)
    r = kdns_serve("--from-file", "examples/cluster.yaml", "--corefile", path,
                   "--dns-port", "0")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"kdns: --corefile: {path}:25: the loadbalance policy 'weighted' is not supported by "
        "kdns (kdns rotates round_robin only). Remove it, or pass --corefile-unsupported=warn "
        "to start without it.")


def test_cli_refuses_corefile_with_the_kube_dns_configmap(tmp_path):
    r = kdns_serve("--from-file", "examples/cluster.yaml", "--corefile",
                   fixture("eks.Corefile"), "--config-dir", str(tmp_path))
    assert r.returncode == 2
    assert "--corefile and --config-dir cannot be used together" in r.stderr


def test_watcher_says_which_changes_wait_for_a_restart(tmp_path, caplog):
    text = ".:53 {\n kubernetes cluster.local\n cache 30\n forward . 10.0.0.1\n}\n"
    path = write(tmp_path, text)
    w = cf.CorefileWatcher(path, lambda new: None, env={})
    w.poll_once()
    write(tmp_path, text.replace("cache 30", "cache 60 {\n  success 100\n }")
          .replace("cluster.local", "corp.local"))
    with caplog.at_level(logging.WARNING, "kdns.forward.corefile"):
        assert w.poll_once()
    assert "Corefile changed cache_size, domain; kdns applies them at its next start" \
        in caplog.text


def test_eks_conditional_forwarder_edit(tmp_path):
    """The edit AWS documents for a conditional forwarder: a server block of its own
    (older EKS Corefile: bare health, no ready)."""
    text = """.:53 {
    errors
    health
    kubernetes cluster.local in-addr.arpa ip6.arpa {
      pods insecure
      fallthrough in-addr.arpa ip6.arpa
    }
    prometheus :9153
    forward . /etc/resolv.conf
    cache 30
    loop
    reload
}
corp.example:53 {
    errors
    cache 30
    forward . 10.20.0.2
    reload
}
"""
    got = cf.parse(write(tmp_path, text), env={})
    assert got.unsupported == []
    assert got.forwarding.stub_domains == {"corp.example": (Upstream("10.20.0.2", 53),)}
    assert (got.flags["ready_port"], got.flags["health_port"], got.flags["lameduck"]) == \
        (0, 8080, 0.0)
