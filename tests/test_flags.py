"""kube-dns's command line works on kdns (dns-rules §3.1): every kube-dns flag with its
default and meaning, the klog flags (underscores normalised to dashes as kube-dns does),
--version, PROMETHEUS_PORT/PROMETHEUS_PATH; an unknown flag is one clear line."""
from __future__ import annotations

import pytest

from test_cli import run_main

from kdns import cli, settings
from kdns.observe import logs


def parse(*args):
    return cli.build_parser().parse_args(["serve", *logs.normalise_flag_names(list(args))])


# Every flag of cmd/kube-dns/app/options/options.go, written as kube-dns manifests write them.
KUBE_DNS_FLAGS = [
    "--domain=cluster.local.", "--dns-port=10053", "--dns-bind-address=0.0.0.0",
    "--healthz-port=8081", "--kube-master-url=https://10.96.0.1:443",
    "--kubecfg-file=/etc/kubernetes/kubeconfig", "--nameservers=8.8.8.8:53,1.1.1.1",
    "--federations=myfed=example.com", "--config-map=kube-dns", "--config-map-namespace=kube-system",
    "--config-dir=/kube-dns-config", "--config-period=10s", "--initial-sync-timeout=60s",
    "--profiling", "--profiling=false",
]
KLOG_FLAGS = [
    "--v=2", "--logtostderr", "--logtostderr=true", "--alsologtostderr=false",
    "--log_dir=/tmp", "--log-dir=/tmp", "--log_file=/tmp/kdns.log", "--stderrthreshold=ERROR",
    "--stderrthreshold=2", "--vmodule=server=4,cache=2", "--log_backtrace_at=server.go:80",
    "--log-flush-frequency=5s", "--skip_headers=false", "--add_dir_header", "--one_output",
    "--skip-log-headers", "--log_file_max_size=1800",
]


@pytest.mark.parametrize("flag", KUBE_DNS_FLAGS + KLOG_FLAGS)
def test_kube_dns_and_klog_flags_are_accepted(flag):
    parse(flag)


def test_the_whole_stock_kubedns_command_line():
    # cluster/addons/dns/kube-dns/kube-dns.yaml.in (dns-rules §3.5), plus the klog flags people add.
    a = parse("--domain=cluster.local.", "--dns-port=10053", "--config-dir=/kube-dns-config",
              "--v=2", "--logtostderr")
    assert (a.domain, a.dns_port, a.config_dir, a.v) == ("cluster.local", 10053,
                                                         "/kube-dns-config", 2)


def test_defaults_are_kube_dns_and_coredns_defaults():
    a = parse()
    assert a.domain == "cluster.local"
    # kube-dns's 0.0.0.0 widened to both families (:: with IPV6_V6ONLY off).
    assert a.dns_port == 53 and a.dns_bind_address == "::"
    assert a.healthz_port == 8081                 # kube-dns
    assert a.sidecar_port == 10054                # kube-dns sidecar
    assert (a.health_port, a.ready_port, a.metrics_port) == (8080, 8181, 9153)   # CoreDNS
    assert a.lameduck == 5.0                      # kubeadm Corefile "lameduck 5s"
    assert a.config_period == 10.0 and a.config_map_namespace == "kube-system"
    assert a.initial_sync_timeout == 60.0
    assert a.profiling is False and a.log_queries is False
    assert a.logtostderr is True and a.stderrthreshold == 2


def test_underscores_are_normalised_like_kube_dns():
    assert logs.normalise_flag_names(["--log_dir=/x_y", "--dns_port", "10053", "-v"]) == \
        ["--log-dir=/x_y", "--dns-port", "10053", "-v"]
    assert parse("--dns_port=10053", "--healthz_port=0").dns_port == 10053


@pytest.mark.parametrize("flag,value", [("--logtostderr=false", False), ("--logtostderr", True),
                                        ("--logtostderr=0", False), ("--profiling=T", True)])
def test_go_bool_flags(flag, value):
    a = parse(flag)
    assert getattr(a, flag[2:].split("=")[0].replace("-", "_")) is value


@pytest.mark.parametrize("argv,named", [
    (["serve", "--no-such-flag"], "--no-such-flag"),
    (["serve", "--dns-bind", "127.0.0.1"], "--dns-bind"),     # pflag has no abbreviations
    (["serve", "--stderrthreshold=LOUD"], "--stderrthreshold"),
    (["serve", "--vmodule=nonsense"], "--vmodule"),
    (["serve", "--profiling=maybe"], "--profiling"),
    (["serve", "--federations=nodomain"], "--federations"),
    (["serve", "--sidecar-port=70000"], "--sidecar-port"),
    (["serve", "--health-port=-1"], "--health-port"),
])
def test_bad_or_unknown_flag_is_one_line(capsys, argv, named):
    code, _, err = run_main(capsys, argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err, err


def test_version(capsys):
    for argv in (["--version"], ["serve", "--version"]):
        code, out, _ = run_main(capsys, argv)
        assert code == 0 and out.startswith("kdns ") and "unknown" not in out


@pytest.mark.parametrize("env,named", [({"PROMETHEUS_PORT": "metrics"}, "PROMETHEUS_PORT"),
                                       ({"PROMETHEUS_PORT": "70000"}, "PROMETHEUS_PORT"),
                                       ({"PROMETHEUS_PORT": "10055", "PROMETHEUS_PATH": "x"},
                                        "PROMETHEUS_PATH")])
def test_bad_prometheus_env_is_one_line(capsys, monkeypatch, tmp_path, env, named):
    monkeypatch.setattr(settings, "ENV", settings.from_env(env))
    img = tmp_path / "zone.img"
    img.write_bytes(b"")
    code, _, err = run_main(capsys, ["serve", "--from-image", str(img)])
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--health-port", "--ready-port", "--sidecar-port"])
def test_http_port_on_the_dns_port_is_refused(capsys, tmp_path, flag):
    img = tmp_path / "zone.img"
    img.write_bytes(b"")
    code, _, err = run_main(capsys, ["serve", "--from-image", str(img), "--dns-port", "5300",
                                     f"{flag}=5300"])
    assert code == 2 and flag in err, err


def test_help_is_honest_about_what_is_not_implemented(capsys):
    code, out, _ = run_main(capsys, ["serve", "--help"])
    text = " ".join(out.split())
    assert code == 0
    assert "no pprof" in text                                # --profiling
    assert "never logged one by one" in text                 # --log-queries
    for flag in ("--health-port", "--ready-port", "--sidecar-port", "--v", "--logtostderr",
                 "--vmodule", "--log-flush-frequency", "--federations", "--version"):
        assert flag in out
