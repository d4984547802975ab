"""The kube-dns ConfigMap (``kube-system/kube-dns``), read the way kube-dns reads it.

Why: kdns is a drop-in for kube-dns, so clusters that already route ``acme.local`` to a stub
server or set ``upstreamNameservers`` must keep working unchanged (kube-dns's
``pkg/dns/config/{config.go,sync_dir.go}``). This module turns the ConfigMap keys (and the
``--nameservers`` flag and resolv.conf) into plain ``Upstream`` lists for ``forwarder.py``.

Keys: ``stubDomains`` (JSON object: DNS-1123 subdomain → list of IP, IP:port, [IPv6]:port or
DNS-1123 name; port 0–65535, as kube-dns accepts), ``upstreamNameservers`` (JSON array, at
most 3, IP or IP:port, port 1–65535). ``federations`` is not supported: kube-dns federation
names were deprecated with Federation v1 and CoreDNS never served them, so a ConfigMap
containing the key is accepted (the rest of it applies) and a warning says kdns ignores it;
the value is not validated, because a key we ignore must not block an update. Unknown keys
are warned about and ignored, as kube-dns does.

A validation error rejects the whole update with one log line naming the key and the reason;
the previous configuration stays in force. An empty directory means defaults.

What it must not do: open sockets or resolve names (stub servers given as names are resolved
by the forwarder), or know the forwarder's internals. Only reading files is allowed here.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from kdns import settings
from kdns.forward.forwarder import Upstream

log = logging.getLogger(__name__)

MAX_UPSTREAMS = 3            # kube-dns config.go: "cannot have more than three entries"
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*\Z")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """A key of the ConfigMap is invalid. ``str()`` is the one log line an operator reads."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"kube-dns config key {key!r} rejected: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class KubeDNSConfig:
    """The validated ConfigMap. Empty fields mean "not set" (kube-dns defaults)."""
    stub_domains: dict[str, tuple[Upstream, ...]] = field(default_factory=dict)
    upstream_nameservers: tuple[Upstream, ...] = ()
    federations_ignored: bool = False


def is_dns1123_subdomain(s: str) -> bool:
    # k8s apimachinery IsDNS1123Subdomain: lowercase, at most 253 characters.
    return len(s) <= 253 and _DNS1123_SUBDOMAIN.match(s) is not None


def parse_ip(s: str) -> str | None:
    """Canonical text of an IP address (Go net.ParseIP's domain: no zone, no brackets)."""
    if "%" in s:
        return None
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        return None


def split_host_port(s: str) -> tuple[str, str] | None:
    """Go net.SplitHostPort: 'host:port' or '[v6]:port'; None when there is no port part."""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            return None
        return s[1:end], s[end + 2:]
    if s.count(":") != 1:
        return None              # no port, or a bare IPv6 address ("too many colons")
    host, port = s.split(":")
    return host, port


def _port(text: str, low: int) -> int | None:
    if not text.isdigit():
        return None
    p = int(text)
    return p if low <= p <= 65535 else None


def parse_stub_server(s: str) -> Upstream:
    """kube-dns validateStubDomains: IP, IP:port (0–65535), [IPv6]:port, or a DNS-1123 name."""
    hp = split_host_port(s)
    host, port = (s, 53) if hp is None else (hp[0], _port(hp[1], 0))
    if port is None:
        raise ValueError(f"invalid nameserver {s!r}: port must be a number from 0 to 65535")
    ip = parse_ip(host)
    if ip is None and not is_dns1123_subdomain(host):
        raise ValueError(f"invalid nameserver {s!r}: not an IP address or a DNS-1123 host name")
    return Upstream(ip or host, port)


def parse_upstream(s: str) -> Upstream:
    """kube-dns ValidateNameserverIpAndPort: 'ip' (port 53) or 'ip:port' (1–65535)."""
    ip = parse_ip(s)
    if ip is not None:
        return Upstream(ip, 53)
    hp = split_host_port(s)
    if hp is None:
        raise ValueError(f"invalid nameserver {s!r}: expected an IP address or IP:port")
    ip, port = parse_ip(hp[0]), _port(hp[1], 1)
    if ip is None:
        raise ValueError(f"invalid nameserver {s!r}: {hp[0]!r} is not an IP address")
    if port is None:
        raise ValueError(f"invalid nameserver {s!r}: port must be a number from 1 to 65535")
    return Upstream(ip, port)


def _parse_stub_domains(text: str) -> dict[str, tuple[Upstream, ...]]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError("stubDomains", f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("stubDomains", "must be a JSON object of domain -> list of servers")
    out = {}
    for domain, servers in value.items():
        if not is_dns1123_subdomain(domain):
            raise ConfigError("stubDomains", f"invalid domain name {domain!r} (must be a "
                              "lowercase DNS-1123 subdomain without a trailing dot)")
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise ConfigError("stubDomains", f"servers for {domain!r} must be a list of strings")
        try:
            out[domain] = tuple(parse_stub_server(s) for s in servers)
        except ValueError as exc:
            raise ConfigError("stubDomains", f"{domain!r}: {exc}") from None
    return out


def _parse_upstreams(text: str) -> tuple[Upstream, ...]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError("upstreamNameservers", f"not valid JSON ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ConfigError("upstreamNameservers", "must be a JSON array of strings")
    if len(value) > MAX_UPSTREAMS:
        raise ConfigError("upstreamNameservers",
                          f"has {len(value)} entries; at most {MAX_UPSTREAMS} are allowed")
    try:
        return tuple(parse_upstream(s) for s in value)
    except ValueError as exc:
        raise ConfigError("upstreamNameservers", str(exc)) from None


def parse_configmap(data: dict[str, str]) -> KubeDNSConfig:
    """ConfigMap data (key → text) → config; ConfigError on the first invalid key."""
    stubs, ups, fed = {}, (), False
    for key in sorted(data):
        if key == "stubDomains":
            stubs = _parse_stub_domains(data[key])
        elif key == "upstreamNameservers":
            ups = _parse_upstreams(data[key])
        elif key == "federations":
            fed = True
        else:
            log.warning("kube-dns config key %r is unknown; ignored", key)
    if fed:
        log.warning("kube-dns config key 'federations' is not supported by kdns and is ignored; "
                    "federation names will not resolve (remove the key to silence this warning)")
    return KubeDNSConfig(stubs, ups, fed)


def read_config_dir(path: str) -> tuple[str, dict[str, str]]:
    """(version, data) of a ConfigMap volume: every non-hidden regular file, no recursion.

    Hidden names cover the volume's ``..data`` / ``..<timestamp>`` directories; the visible
    entries are symlinks into them, so symlinks are followed (kube-dns reads them the same
    way). Version = sha256 over names and contents (sync_dir.go)."""
    data, h = {}, hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            raw = f.read()
        h.update(name.encode() + b"\0" + raw + b"\0")
        # Invalid UTF-8 becomes U+FFFD and then fails validation naming the key.
        data[name] = raw.decode("utf-8", errors="replace")
    return h.hexdigest(), data


def parse_duration(s: str, *, bare_seconds: bool = False) -> float:
    """Go time.ParseDuration subset ('10s', '1m30s', '500ms') → seconds: kube-dns's flags
    and ConfigMap write durations this way. ``bare_seconds``: a plain number is seconds too
    (kdns's own flags took seconds before they took Go durations); otherwise only "0" may
    go without a unit, as in Go."""
    text, total, pos = s.strip(), 0.0, 0
    if text == "0":
        return 0.0
    if bare_seconds and _SECONDS.fullmatch(text):
        return float(text)
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if m is None:
            raise ValueError(f"invalid duration {s!r}: expected e.g. '10s', '1m30s', '500ms'")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {s!r}: expected e.g. '10s', '1m30s', '500ms'")
    return total


class ConfigDirWatcher:
    """Polls a ConfigMap directory every ``period`` seconds and calls ``on_change(config)``
    when the content version changes and the new content is valid."""

    def __init__(self, path: str, on_change: Callable[[KubeDNSConfig], None], *,
                 period: float = settings.CONFIG_PERIOD):
        self.path, self.on_change, self.period = path, on_change, period
        self.version: str | None = None
        self.config = KubeDNSConfig()
        self.rejected = 0        # counter for metrics: updates refused as invalid

    def poll_once(self) -> bool:
        """Read the directory; True when a new configuration was applied."""
        try:
            version, data = read_config_dir(self.path)
        except FileNotFoundError:
            version, data = "absent", {}          # optional volume missing → defaults
        except OSError as exc:
            log.error("kube-dns config dir %s unreadable, keeping the previous config: %s",
                      self.path, exc)
            return False
        if version == self.version:
            return False
        self.version = version       # remember it either way: one log line per bad version
        try:
            config = parse_configmap(data)
        except ConfigError as exc:
            self.rejected += 1
            log.error("%s; keeping the previous configuration", exc)
            return False
        self.config = config
        self.on_change(config)
        return True

    async def run(self) -> None:
        """Forever: poll, sleep. Cancel the task to stop it."""
        while True:
            self.poll_once()
            await asyncio.sleep(self.period)


def parse_resolv_conf(path: str) -> tuple[Upstream, ...]:
    """``nameserver`` lines of a resolv.conf (port 53; a missing file means none)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return ()
    for line in lines:
        fields = line.split("#")[0].split(";")[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            ip = parse_ip(fields[1].split("%")[0])
            if ip is None:
                log.warning("%s: ignoring nameserver %r (not an IP address)", path, fields[1])
                continue
            out.append(Upstream(ip, 53))
    return tuple(out)


def parse_resolv_search(path: str) -> tuple[str, ...]:
    """The search list of a resolv.conf: its last ``search`` or ``domain`` line decides
    (resolv.conf(5)); a missing file, or none, means no search domains."""
    search: tuple[str, ...] = ()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ()
    for line in lines:
        fields = line.split("#")[0].split(";")[0].split()
        if fields and fields[0] in ("search", "domain"):
            names = []
            for name in fields[1:] if fields[0] == "search" else fields[1:2]:
                name = name.rstrip(".").lower()
                try:
                    labels = [x for x in name.split(".")]
                    if not name or any(not 0 < len(x) <= 63 for x in labels) or \
                            len(name) > 253 or not name.isascii():
                        raise ValueError
                except ValueError:
                    log.warning("%s: ignoring search domain %r", path, name)
                    continue
                names.append(name)
            search = tuple(names)
    return search


def parse_nameservers_flag(value: str) -> tuple[Upstream, ...]:
    """kube-dns ``--nameservers=ip[:port],...``; ValueError naming the flag on a bad entry."""
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(parse_upstream(item))
        except ValueError as exc:
            raise ValueError(f"--nameservers: {exc}") from None
    return tuple(out)


def effective_upstreams(config: KubeDNSConfig, resolv_conf: tuple[Upstream, ...],
                        flag: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
    """upstreamNameservers if set, else the resolv.conf nameservers, else --nameservers."""
    return config.upstream_nameservers or resolv_conf or flag
