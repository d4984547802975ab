"""The kube-dns ConfigMap, resolv.conf and --nameservers, read the way kube-dns reads them
(dns-rules §3.2; kube-dns pkg/dns/config). Files are written by the tests into tmp_path."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from kdns.forward.forwarder import Upstream
from kdns.forward.kubedns_config import (ConfigDirWatcher, ConfigError, KubeDNSConfig,
                                 effective_upstreams, parse_configmap, parse_duration,
                                 parse_nameservers_flag, parse_resolv_conf, read_config_dir)

pytestmark = pytest.mark.timeout(10)


# ---- keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("servers, expect", [
    (["1.2.3.4"], [Upstream("1.2.3.4", 53)]),
    (["10.0.0.1:5353"], [Upstream("10.0.0.1", 5353)]),
    (["[2001:db8::2]:10053"], [Upstream("2001:db8::2", 10053)]),
    (["2001:db8::2"], [Upstream("2001:db8::2", 53)]),
    (["ns.foo.com"], [Upstream("ns.foo.com", 53)]),
    (["ns.foo.com:54"], [Upstream("ns.foo.com", 54)]),
    (["1.2.3.4:0"], [Upstream("1.2.3.4", 0)]),               # kube-dns accepts 0..65535
    ([], []),
])
def test_stub_domains_valid(servers, expect):
    cfg = parse_configmap({"stubDomains": json.dumps({"acme.local": servers})})
    assert cfg.stub_domains == {"acme.local": tuple(expect)}


@pytest.mark.parametrize("value, reason", [
    ('{"Acme.local": ["1.2.3.4"]}', "invalid domain name 'Acme.local'"),
    ('{"acme.local.": ["1.2.3.4"]}', "invalid domain name"),
    ('{"-acme.local": ["1.2.3.4"]}', "invalid domain name"),
    ('{"acme.local": ["1.2.3.4:65536"]}', "port must be a number from 0 to 65535"),
    ('{"acme.local": ["1.2.3.4:x"]}', "port must be"),
    ('{"acme.local": ["[2001:db8::2]"]}', "not an IP address or a DNS-1123 host name"),
    ('{"acme.local": ["NS.foo.com"]}', "not an IP address or a DNS-1123"),
    ('{"acme.local": "1.2.3.4"}', "must be a list of strings"),
    ('["acme.local"]', "must be a JSON object"),
    ('{"acme.local": [', "not valid JSON"),
])
def test_stub_domains_invalid(value, reason):
    with pytest.raises(ConfigError) as err:
        parse_configmap({"stubDomains": value})
    assert err.value.key == "stubDomains" and reason in str(err.value)
    assert "'stubDomains'" in str(err.value)


@pytest.mark.parametrize("value, expect", [
    ('["8.8.8.8"]', (Upstream("8.8.8.8", 53),)),
    ('["8.8.8.8:5353", "2001:db8::1", "[2001:db8::1]:54"]',
     (Upstream("8.8.8.8", 5353), Upstream("2001:db8::1", 53), Upstream("2001:db8::1", 54))),
    ('[]', ()),
])
def test_upstream_nameservers_valid(value, expect):
    assert parse_configmap({"upstreamNameservers": value}).upstream_nameservers == expect


@pytest.mark.parametrize("value, reason", [
    ('["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"]', "at most 3"),
    ('["8.8.8.8:0"]', "port must be a number from 1 to 65535"),
    ('["8.8.8.8:65536"]', "port must be"),
    ('["dns.google"]', "expected an IP address"),
    ('["dns.google:53"]', "'dns.google' is not an IP address"),
    ('"8.8.8.8"', "JSON array"),
    ('[8]', "JSON array of strings"),
    ('nope', "not valid JSON"),
])
def test_upstream_nameservers_invalid(value, reason):
    with pytest.raises(ConfigError) as err:
        parse_configmap({"upstreamNameservers": value})
    assert err.value.key == "upstreamNameservers" and reason in str(err.value)


def test_federations_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = parse_configmap({"federations": "myfed=example.com",
                               "upstreamNameservers": '["8.8.8.8"]'})
    assert cfg.federations_ignored and cfg.upstream_nameservers == (Upstream("8.8.8.8"),)
    assert any("'federations' is not supported by kdns and is ignored" in r.message
               for r in caplog.records)


def test_unknown_key_warned_and_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_configmap({"colour": "blue"}) == KubeDNSConfig()
    assert any("'colour' is unknown" in r.message for r in caplog.records)


# ---- config dir ------------------------------------------------------------------------------

def configmap_volume(path, data: dict[str, str], stamp: str) -> None:
    """Lay out a directory the way the kubelet mounts a ConfigMap: the files live in a
    timestamped hidden directory, ``..data`` points at it, visible names are symlinks."""
    real = path / f"..{stamp}"
    real.mkdir()
    for k, v in data.items():
        (real / k).write_text(v)
    tmp = path / "..data_tmp"
    os.symlink(real.name, tmp)
    os.replace(tmp, path / "..data")
    for k in data:
        if not (path / k).is_symlink():
            os.symlink(f"..data/{k}", path / k)


def test_read_config_dir_like_a_configmap_volume(tmp_path):
    configmap_volume(tmp_path, {"upstreamNameservers": '["8.8.8.8"]'}, "2024_01")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / "stubDomains").write_text("not read: no recursion")
    version, data = read_config_dir(str(tmp_path))
    assert data == {"upstreamNameservers": '["8.8.8.8"]'}
    assert read_config_dir(str(tmp_path))[0] == version
    (tmp_path / "federations").write_text("a=b.c")
    assert read_config_dir(str(tmp_path))[0] != version


def test_watcher_hot_reload_valid_then_invalid_keeps_previous(tmp_path, caplog):
    applied = []
    w = ConfigDirWatcher(str(tmp_path), applied.append)
    assert w.poll_once() and applied == [KubeDNSConfig()]          # empty dir: defaults
    assert not w.poll_once() and len(applied) == 1                 # unchanged: nothing to do

    configmap_volume(tmp_path, {"stubDomains": '{"acme.local": ["1.2.3.4"]}'}, "v1")
    assert w.poll_once()
    assert applied[-1].stub_domains == {"acme.local": (Upstream("1.2.3.4"),)}

    (tmp_path / "upstreamNameservers").write_text('["1.1.1.1", "1.1.1.2", "1.1.1.3", "9.9.9.9"]')
    with caplog.at_level(logging.ERROR):
        assert not w.poll_once()
        assert not w.poll_once()                                    # one log line per version
    errors = [r.message for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "'upstreamNameservers'" in errors[0] and "at most 3" in errors[0]
    assert "keeping the previous configuration" in errors[0]
    assert len(applied) == 2 and w.config.stub_domains and w.rejected == 1

    (tmp_path / "upstreamNameservers").write_text('["9.9.9.9:5353"]')
    assert w.poll_once()
    assert applied[-1].upstream_nameservers == (Upstream("9.9.9.9", 5353),)
    assert applied[-1].stub_domains == {"acme.local": (Upstream("1.2.3.4"),)}


def test_invalid_utf8_rejected_naming_the_key(tmp_path, caplog):
    (tmp_path / "upstreamNameservers").write_bytes(b'["8.8.8.8\xff"]')
    with caplog.at_level(logging.ERROR):
        assert not ConfigDirWatcher(str(tmp_path), lambda c: None).poll_once()
    assert "'upstreamNameservers'" in caplog.records[-1].message


def test_watcher_missing_dir_means_defaults(tmp_path):
    applied = []
    assert ConfigDirWatcher(str(tmp_path / "absent"), applied.append).poll_once()
    assert applied == [KubeDNSConfig()]


def test_watcher_run_polls_every_period(tmp_path):
    applied = []

    async def main():
        w = ConfigDirWatcher(str(tmp_path), applied.append, period=0.05)
        task = asyncio.ensure_future(w.run())
        try:
            # The first poll applies the (empty) directory; only then the change, which a
            # later poll picks up: each wait is polls of 0.05 s, counted, not timed.
            for _ in range(40):
                if applied:
                    break
                await asyncio.sleep(0.05)
            assert len(applied) == 1, "the first poll did not apply the directory"
            (tmp_path / "upstreamNameservers").write_text('["8.8.4.4"]')
            for _ in range(40):
                if len(applied) == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
    asyncio.run(main())
    assert len(applied) == 2 and applied[-1].upstream_nameservers == (Upstream("8.8.4.4"),)


@pytest.mark.parametrize("text, seconds", [("10s", 10), ("1m30s", 90), ("500ms", 0.5),
                                           ("1h", 3600), ("1.5s", 1.5), ("0", 0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "", "s", "10x", "-1s"])
def test_parse_duration_invalid(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_bare_seconds_only_when_asked():
    # kube-dns's own fields follow Go (a unit is required); kdns's flags also take seconds.
    assert parse_duration("10", bare_seconds=True) == 10.0
    assert parse_duration("2.5", bare_seconds=True) == 2.5
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("-1", bare_seconds=True)


# ---- resolv.conf, --nameservers, precedence --------------------------------------------------

def test_parse_resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("# node resolver\nsearch example.com\nnameserver 10.0.0.2\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n"
                    "nameserver 2001:db8::53 # trailing comment\n")
    assert parse_resolv_conf(str(path)) == (Upstream("10.0.0.2"), Upstream("fe80::1"),
                                            Upstream("2001:db8::53"))
    assert parse_resolv_conf(str(tmp_path / "missing")) == ()


def test_parse_nameservers_flag():
    assert parse_nameservers_flag("1.2.3.4, 5.6.7.8:5353") == (Upstream("1.2.3.4"),
                                                               Upstream("5.6.7.8", 5353))
    assert parse_nameservers_flag("") == ()
    with pytest.raises(ValueError, match="--nameservers"):
        parse_nameservers_flag("1.2.3.4:99999")


def test_upstream_precedence():
    cm = KubeDNSConfig(upstream_nameservers=(Upstream("1.1.1.1"),))
    resolv, flag = (Upstream("2.2.2.2"),), (Upstream("3.3.3.3"),)
    assert effective_upstreams(cm, resolv, flag) == cm.upstream_nameservers
    assert effective_upstreams(KubeDNSConfig(), resolv, flag) == resolv
    assert effective_upstreams(KubeDNSConfig(), (), flag) == flag
