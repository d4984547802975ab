"""The CoreDNS Corefile, read for the subset the clusters' default Corefiles use.

Why: most clusters serve ``kube-system/kube-dns`` with CoreDNS, configured by the ``coredns``
ConfigMap's ``Corefile`` (kubeadm, EKS, AKS, k3s, kind). Swapping the image must keep that
configuration meaning what it meant, or refuse it: a Corefile kdns only half understands would
answer differently from CoreDNS without anyone noticing. So every plugin and option is either
mapped onto a kdns setting that behaves as CoreDNS's does, accepted as having no effect in kdns
for a stated reason (``reload`` is what kdns always does), or refused with one sentence naming
the plugin and its file:line (``docs/corefile.md`` lists them).

Syntax (CoreDNS's Caddyfile): server blocks ``ZONE[:PORT] ... { ... }``; a directive is its
name and the tokens on the same line, with an optional ``{ ... }`` block of option lines;
``#`` comments; double-quoted tokens; ``{$VAR}`` / ``{%VAR%}`` replaced by the environment
(unset: empty); ``import GLOB`` at the top level or inside a block, relative to the
importing file's directory (a glob that matches nothing imports nothing, a plain path must
exist).

What it must not do: open sockets, resolve names, or know the forwarder's internals; it reads
files and returns settings.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

from kdns import settings
from kdns.forward.forwarder import Upstream
from kdns.forward.kubedns_config import (KubeDNSConfig, is_dns1123_subdomain, parse_duration,
                                         parse_upstream)

log = logging.getLogger("kdns.forward.corefile")

IMPORT_DEPTH = 10            # Caddy's limit on nested imports (a loop would never end)
REVERSE = ("in-addr.arpa", "ip6.arpa")
# CoreDNS forward: "up to 15 upstreams".
MAX_FORWARD_TO = 15
COREDNS_K8S_TTL = 5          # the kubernetes plugin's TTL when the Corefile gives none
# ``cache`` without a TTL caps success at 3600 s and denial at 1800 s, floor 5 s, and
# ``serve_stale`` without a DURATION serves for 1 h: kdns's defaults are CoreDNS's.
COREDNS_MAX_TTL = settings.CACHE_SUCCESS_TTL
COREDNS_MAX_NEG_TTL = settings.CACHE_DENIAL_TTL
COREDNS_MIN_TTL = settings.CACHE_MIN_TTL
COREDNS_STALE = settings.SERVE_STALE_DURATION


class CorefileError(ValueError):
    """The Corefile cannot be used; ``str()`` is one sentence naming file:line."""


@dataclass(frozen=True)
class Token:
    text: str
    file: str
    line: int
    quoted: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Directive:
    name: Token
    args: list[Token]
    block: list[list[Token]] | None      # option lines: [name, args...]


@dataclass
class ServerBlock:
    keys: list[Token]
    directives: list[Directive]


@dataclass
class CorefileSettings:
    """What a Corefile sets. ``flags`` are ``kdns serve`` settings by their argparse names
    (only those the Corefile decides); ``forwarding`` the upstreams and stub domains as the
    kube-dns ConfigMap would give them; ``resolv_conf`` the file ``forward . FILE`` names
    (None when the Corefile names addresses); ``unsupported`` one sentence per plugin or
    option kdns does not implement (the Corefile is refused unless they are only warned
    about); ``version`` a digest over every file read, to see a change."""
    flags: dict = field(default_factory=dict)
    forwarding: KubeDNSConfig = field(default_factory=KubeDNSConfig)
    resolv_conf: str | None = None
    unsupported: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    version: str = ""
    # The ``hosts`` plugin (kdns.forward.hosts.HostsSpec), or None.
    hosts: object = None
    # The ``rewrite name`` rules in order (kdns.forward.rewrite.NameRule).
    rewrites: tuple = ()

    def forward_options(self) -> dict:
        """The forward and cache settings a worker applies (``ForwardingOptions.policy``...)."""
        return {k: v for k, v in self.flags.items() if k in FORWARD_KEYS}


# The settings that reach the workers through the forwarding channel (applied live on a
# reload); every other one is read at start.
FORWARD_KEYS = ("forward_policy", "forward_max_concurrent", "forward_force_tcp", "cache_size",
                "cache_success_ttl", "cache_denial_ttl", "cache_min_ttl", "serve_stale",
                "serve_stale_refresh", "cache_prefetch")


# --------------------------------------------------------------------------- lexing

_ENV = re.compile(r"\{\$([A-Za-z_][A-Za-z0-9_]*)\}|\{%([A-Za-z_][A-Za-z0-9_]*)%\}")


def _substitute(text: str, env) -> str:
    return _ENV.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


def tokenize(text: str, path: str, env) -> list[Token]:
    """Caddyfile tokens with their line numbers: whitespace separates, ``#`` at the start of
    a token comments out the rest of the line, ``"..."`` is one token (``\\"`` inside)."""
    out: list[Token] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _substitute(raw, env)
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c.isspace():
                i += 1
                continue
            if c == "#":
                break
            if c == '"':
                j, buf = i + 1, []
                while j < n and line[j] != '"':
                    if line[j] == "\\" and j + 1 < n and line[j + 1] in '"\\':
                        j += 1
                    buf.append(line[j])
                    j += 1
                if j >= n:
                    raise CorefileError(f"{path}:{lineno}: a quoted token is not closed on its "
                                        f"line; add the closing \".")
                out.append(Token("".join(buf), path, lineno, quoted=True))
                i = j + 1
                continue
            j = i
            while j < n and not line[j].isspace():
                j += 1
            out.append(Token(line[i:j], path, lineno))
            i = j
    return out


def _is(tok: Token, text: str) -> bool:
    return not tok.quoted and tok.text == text


class _Reader:
    """Files → tokens with ``import`` expanded in place, and the digest of what was read."""

    def __init__(self, env):
        self.env = env
        self.digest = hashlib.sha256()
        self.files: list[str] = []

    def read(self, path: str, depth: int = 0, at: Token | None = None) -> list[Token]:
        if depth > IMPORT_DEPTH:
            raise CorefileError(f"{at.where}: imports nest deeper than {IMPORT_DEPTH} "
                                f"levels; an import loop?")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            where = f"{at.where}: import {at.text}" if at is not None else "--corefile"
            raise CorefileError(f"{where}: cannot read {path} ({e.strerror or e}).") from None
        return self.read_text(text, path, os.path.dirname(path), depth)

    def read_text(self, text: str, label: str, base: str, depth: int = 0) -> list[Token]:
        """``text`` named ``label`` in messages, its imports relative to ``base``."""
        self.files.append(label)
        self.digest.update(label.encode() + b"\0" + text.encode() + b"\0")
        return self.expand(tokenize(text, label, self.env), base, depth)

    def expand(self, toks: list[Token], base: str, depth: int) -> list[Token]:
        out, i = [], 0
        while i < len(toks):
            t = toks[i]
            # ``import`` is a directive at the start of its line (a first token on the line).
            first = i == 0 or toks[i - 1].line != t.line or toks[i - 1].file != t.file
            if first and _is(t, "import"):
                args = []
                i += 1
                while i < len(toks) and toks[i].line == t.line and toks[i].file == t.file:
                    args.append(toks[i])
                    i += 1
                if len(args) != 1:
                    raise CorefileError(f"{t.where}: import takes one file or glob, got "
                                        f"{len(args)}.")
                pattern = args[0].text
                full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
                if glob.has_magic(full):
                    paths = sorted(p for p in glob.glob(full) if os.path.isfile(p))
                else:
                    paths = [full]
                for p in paths:
                    out += self.read(p, depth + 1, args[0])
                continue
            out.append(t)
            i += 1
        return out


# --------------------------------------------------------------------------- parsing


def parse_blocks(toks: list[Token]) -> list[ServerBlock]:
    blocks, i = [], 0
    while i < len(toks):
        keys = []
        while i < len(toks) and not _is(toks[i], "{"):
            if _is(toks[i], "}"):
                raise CorefileError(f"{toks[i].where}: a '}}' closes no block.")
            keys += [Token(k, toks[i].file, toks[i].line) for k in toks[i].text.split(",") if k]
            i += 1
        if i >= len(toks):
            raise CorefileError(f"{keys[-1].where}: server block {' '.join(k.text for k in keys)} "
                                f"has no '{{'; write its plugins between {{ and }}.")
        if not keys:
            raise CorefileError(f"{toks[i].where}: a '{{' without a zone before it; begin the "
                                f"server block with its zones, e.g. .:53 {{.")
        i += 1
        directives = []
        while True:
            if i >= len(toks):
                raise CorefileError(f"{keys[0].where}: server block {keys[0].text} is not "
                                    f"closed; add its '}}'.")
            t = toks[i]
            if _is(t, "}"):
                i += 1
                break
            if _is(t, "{"):
                raise CorefileError(f"{t.where}: a '{{' without a plugin name before it.")
            i += 1
            args = []
            while i < len(toks) and toks[i].line == t.line and toks[i].file == t.file \
                    and not _is(toks[i], "{") and not _is(toks[i], "}"):
                args.append(toks[i])
                i += 1
            block = None
            if i < len(toks) and _is(toks[i], "{") and toks[i].line == t.line:
                i += 1
                block = []
                while True:
                    if i >= len(toks):
                        raise CorefileError(f"{t.where}: the block of {t.text} is not closed; "
                                            f"add its '}}'.")
                    o = toks[i]
                    if _is(o, "}"):
                        i += 1
                        break
                    if _is(o, "{"):
                        raise CorefileError(f"{o.where}: a nested '{{' in the block of {t.text}"
                                            f" (kdns reads no option blocks inside options).")
                    line = [o]
                    i += 1
                    while i < len(toks) and toks[i].line == o.line and toks[i].file == o.file \
                            and not _is(toks[i], "}") and not _is(toks[i], "{"):
                        line.append(toks[i])
                        i += 1
                    block.append(line)
            directives.append(Directive(t, args, block))
        blocks.append(ServerBlock(keys, directives))
    return blocks


# --------------------------------------------------------------------------- mapping


def _zone(text: str) -> str:
    return text.strip().rstrip(".").lower()


class _Mapper:
    def __init__(self):
        self.flags: dict = {}
        self.unsupported: list[str] = []
        self.stubs: dict[str, tuple[Upstream, ...]] = {}
        self.upstreams: tuple[Upstream, ...] = ()
        self.resolv_conf: str | None = None
        self.have_root_forward = False
        self.seen: dict[str, Token] = {}         # setting -> where it was set
        self.hosts = None                        # hosts.HostsSpec
        self.hosts_at: Token | None = None
        self.rewrites: list = []                 # (NameRule, Token, the block's zones)

    # ---- helpers
    def refuse(self, tok: Token, what: str, why: str = "") -> None:
        self.unsupported.append(f"{tok.where}: {what} is not supported by kdns"
                                + (f" ({why})" if why else "") + ".")

    def set(self, key: str, value, tok: Token) -> None:
        """One setting; two blocks that set it differently are an error, because kdns has
        one of each (one cluster domain, one listener, one cache, one forwarder)."""
        if key in self.flags and self.flags[key] != value:
            raise CorefileError(f"{tok.where}: sets {key.replace('_', '-')} to {value!r}, but "
                                f"{self.seen[key].where} set it to {self.flags[key]!r}; kdns "
                                f"has one of each for every server block.")
        self.flags[key] = value
        self.seen.setdefault(key, tok)

    @staticmethod
    def number(tok: Token, lo: int, hi: int, what: str) -> int:
        if not tok.text.isdigit() or not lo <= int(tok.text) <= hi:
            raise CorefileError(f"{tok.where}: {tok.text!r} is not {what} ({lo} to {hi}).")
        return int(tok.text)

    @staticmethod
    def duration(tok: Token) -> float:
        try:
            return parse_duration(tok.text)
        except ValueError:
            raise CorefileError(f"{tok.where}: {tok.text!r} is not a duration (like 5s, 1m, "
                                f"500ms).") from None

    @staticmethod
    def no_args(d: Directive, n: int = 0) -> None:
        if len(d.args) > n:
            raise CorefileError(f"{d.args[n].where}: {d.name.text} takes "
                                f"{'no arguments' if n == 0 else f'at most {n}'}, got "
                                f"{d.args[n].text!r}.")

    def no_block(self, d: Directive) -> None:
        if d.block:
            self.refuse(d.block[0][0], f"the option {d.block[0][0].text!r} of {d.name.text}")

    def port_of(self, tok: Token, text: str) -> int:
        """``[host]:port`` of health/ready/prometheus → the port; a host other than all
        addresses is refused (kdns's HTTP listeners share --dns-bind-address)."""
        host, _, port = text.rpartition(":")
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise CorefileError(f"{tok.where}: {text!r} is not [host]:port.")
        if host not in ("", "0.0.0.0", "[::]"):
            self.refuse(tok, f"the address {host} of {tok.text}",
                        "kdns's HTTP listeners listen on --dns-bind-address")
        return int(port)

    # ---- server blocks
    def block(self, b: ServerBlock) -> None:
        zones, port = [], None
        for k in b.keys:
            text = k.text
            if "://" in text:
                scheme, _, text = text.partition("://")
                if scheme != "dns":
                    self.refuse(k, f"the {scheme}:// server block {k.text}",
                                "kdns serves plain DNS over UDP and TCP")
                    continue
            zone, _, p = text.partition(":")
            if p:
                kp = self.number(Token(p, k.file, k.line), 0, 65535, "a port")
                if port is not None and kp != port:
                    raise CorefileError(f"{k.where}: one server block with ports {port} and "
                                        f"{kp}; kdns serves one port.")
                port = kp
            zones.append("." if zone in (".", "") else _zone(zone))
        self.set("dns_port", 53 if port is None else port, b.keys[0])
        names = [d.name.text for d in b.directives]
        for d in b.directives:
            if names.count(d.name.text) > 1 and d.name.text not in ("forward", "rewrite"):
                raise CorefileError(f"{d.name.where}: {d.name.text} appears twice in one server "
                                    f"block; CoreDNS allows it once.")
            handler = getattr(self, "p_" + d.name.text, None)
            if handler is None:
                self.refuse(d.name, f"the plugin {d.name.text}")
                continue
            handler(d, zones)

    # ---- plugins: no effect in kdns, for the reason each says
    def p_errors(self, d, zones):
        # kdns logs every error it meets (one line each) already; ``consolidate`` only groups
        # them, so the block is accepted and changes nothing.
        return

    def p_reload(self, d, zones):
        # kdns re-reads the Corefile every --config-period and applies a valid change (the
        # forward and cache settings at once, the rest at the next start: a line says so);
        # ``reload``'s interval and jitter are not used.
        self.no_args(d, 2)

    def p_loop(self, d, zones):
        # kdns's loop check runs at start and after every change and turns it not ready,
        # where CoreDNS's exits; both find the same loops (a probe that comes back).
        self.no_args(d)

    def p_log(self, d, zones):
        # One line per query that reaches Python, as --log-queries (UDP fast-path queries are
        # counted, never logged one by one: the flag's documented limit).
        if d.args or d.block:
            self.refuse(d.args[0] if d.args else d.block[0][0], "log with arguments")
        self.set("log_queries", True, d.name)

    def p_bind(self, d, zones):
        if len(d.args) != 1:
            self.refuse(d.name, "bind with other than one address",
                        "kdns listens on one --dns-bind-address")
            return
        from ipaddress import ip_address
        try:
            self.set("dns_bind_address", str(ip_address(d.args[0].text)), d.name)
        except ValueError:
            self.refuse(d.args[0], f"bind to the interface {d.args[0].text!r}")

    def p_health(self, d, zones):
        self.no_args(d, 1)
        self.set("health_port", self.port_of(d.args[0], d.args[0].text) if d.args else 8080,
                 d.name)
        for opt in d.block or ():
            if opt[0].text == "lameduck" and len(opt) == 2:
                self.set("lameduck", self.duration(opt[1]), opt[0])
            else:
                self.refuse(opt[0], f"the health option {opt[0].text!r}")

    def p_ready(self, d, zones):
        self.no_args(d, 1)
        self.no_block(d)
        self.set("ready_port", self.port_of(d.args[0], d.args[0].text) if d.args else 8181,
                 d.name)

    def p_prometheus(self, d, zones):
        self.no_args(d, 1)
        self.no_block(d)
        self.set("metrics_port", self.port_of(d.args[0], d.args[0].text) if d.args else 9153,
                 d.name)

    # ---- hosts (kdns/forward/hosts.py states CoreDNS's rules)
    def p_hosts(self, d, zones):
        from kdns.forward import hosts as H
        if self.hosts is not None:
            self.refuse(d.name, "a second hosts plugin",
                        f"kdns serves one set of custom records, {self.hosts.where}'s")
            return
        path = H.DEFAULT_FILE
        if d.args:
            path = d.args[0].text
            if not os.path.isabs(path):
                # CoreDNS joins a relative path to the ``root`` plugin's directory; kdns,
                # which has no root, to the Corefile's (as imports).
                path = os.path.join(os.path.dirname(d.args[0].file), path)
        origins = [_zone(a.text) or "." for a in d.args[1:]] or list(zones)
        ttl, reverse, reload, fall, inline = H.DEFAULT_TTL, True, H.DEFAULT_RELOAD, None, []
        for opt in d.block or ():
            o, args = opt[0], opt[1:]
            name = o.text
            if name == "fallthrough":
                fall = tuple(_zone(a.text) or "." for a in args)
            elif name == "ttl":
                if len(args) != 1:
                    raise CorefileError(f"{o.where}: hosts ttl takes one number of seconds.")
                ttl = self.number(args[0], 1, H.MAX_TTL, "a TTL")
            elif name == "no_reverse" and not args:
                reverse = False
            elif name == "reload":
                if len(args) != 1:
                    raise CorefileError(f"{o.where}: hosts reload takes one duration (0 "
                                        f"disables it).")
                reload = self.duration(args[0])
            elif name == "fallthrough_unsupported":
                self.refuse(o, "the hosts option fallthrough_unsupported",
                            "a name of the hosts answers every type but A and AAAA with "
                            "no records")
            elif fall is None:
                # CoreDNS: every other line before fallthrough is a hosts line.
                inline.append((o.where, " ".join(t.text for t in opt)))
            else:
                raise CorefileError(f"{o.where}: {name!r} after fallthrough is no hosts "
                                    f"option (inline hosts lines come before fallthrough).")
        self.hosts = H.HostsSpec(where=d.name.where, path=path, zones=tuple(origins),
                                 inline=tuple(inline), ttl=ttl, reverse=reverse,
                                 reload=reload, fallthrough=fall)
        self.hosts_at = d.name
        try:
            # The inline lines are the Corefile's: a bad one is the Corefile's error.
            H.parse_lines(inline, self.hosts)
        except H.HostsError as e:
            raise CorefileError(str(e)) from None

    def check_hosts(self) -> None:
        """CoreDNS runs hosts before kubernetes: a hosts plugin whose zones take in cluster
        names and that does not fall through for them answers every cluster name it does
        not list SERVFAIL. kdns answers cluster names from the cluster, so it refuses that
        Corefile instead of answering differently."""
        from kdns.forward.hosts import within
        spec, domain = self.hosts, self.flags.get("domain")
        if spec is None or domain is None:
            return
        for z in spec.zones:
            if within(domain, z):
                point = domain              # the zone takes in the whole cluster domain
            elif within(z, domain):
                point = z                   # the zone lies inside the cluster domain
            else:
                continue
            if not spec.falls_through(point):
                self.refuse(self.hosts_at, f"hosts for {z} without fallthrough for {point}",
                            "CoreDNS would answer SERVFAIL for every cluster name the hosts "
                            "do not list; add fallthrough")
                self.hosts = None           # refused: kdns starts without it (warn)
                return

    # ---- rewrite (kdns/forward/rewrite.py states CoreDNS's rules)
    def p_rewrite(self, d, zones):
        from kdns.forward import rewrite as RW
        args = [t.text for t in d.args]
        if len(args) < 2 and d.block:
            # CoreDNS: a rule's tokens continue in the block (``rewrite stop { name ...
            # answer ... }``), one rule per directive.
            for line in d.block:
                args += [t.text for t in line]
        elif d.block:
            raise CorefileError(f"{d.block[0][0].where}: a rewrite with its rule on its line "
                                f"takes no block.")
        try:
            rule = RW.parse_rule(args, d.name.where)
        except RW.RewriteError as e:
            if "is not supported" in str(e):
                self.unsupported.append(str(e))
                return
            raise CorefileError(str(e)) from None
        self.rewrites.append((rule, d.name, tuple(zones)))

    def check_rewrite(self, kube_zones: set) -> tuple:
        """The rules kdns can apply as CoreDNS does; each other one is refused naming its
        line. kdns answers names of its zones (the cluster domain, the reverse zones, the
        hosts' zones) from the image: a rule there must be an exact one whose answer the
        image holds (a name of the cluster or the hosts), and a suffix rule may not reach
        into them; prefix, substring and regex rules apply to the names kdns forwards."""
        from kdns.forward.hosts import within
        domain = self.flags.get("domain")
        image_zones = [domain, *REVERSE]
        hosts_zones = [z for z in (self.hosts.zones if self.hosts is not None else ())
                       if domain is None or not within(z, domain)]
        ours = image_zones + hosts_zones
        kept = []
        for rule, tok, zones in self.rewrites:
            if not set(zones) & kube_zones:
                self.refuse(tok, "rewrite outside the server block of kubernetes",
                            "kdns applies rewrite rules to the names of its main block")
                continue
            frm, to = rule.frm.rstrip("."), rule.to.rstrip(".")
            if rule.kind == "exact":
                if any(within(frm, z) for z in ours) and not (
                        (domain and within(to, domain) and not within(to, f"pod.{domain}"))
                        or (self.hosts is not None and self.hosts.in_zones(to)
                            and not within(to, domain or ""))):
                    self.refuse(tok, f"rewrite of {frm}, a name kdns answers from its image, "
                                f"to {to}", "the alias of a name of the cluster or the hosts "
                                "must name a service, endpoint or hosts name")
                    continue
            elif rule.kind == "suffix":
                z = frm.lstrip(".") if rule.frm.startswith(".") else frm.partition(".")[2]
                if any(within(z, o) or within(o, z) for o in ours if o):
                    self.refuse(tok, f"rewrite name suffix {rule.frm} over names kdns answers "
                                f"from its image", "kdns applies suffix rules to names it "
                                "forwards; use exact rules for cluster names")
                    continue
            else:
                log.warning("%s: rewrite name %s applies to the names kdns forwards (and to "
                            "none of the cluster's, the reverse zones' or the hosts', which "
                            "kdns answers from its image).", tok.where, rule.kind)
            kept.append(rule)
        return tuple(kept)

    def p_loadbalance(self, d, zones):
        # Answers rotate (--loadbalance); kdns rotates A, AAAA and SRV by a per-worker
        # counter where CoreDNS shuffles A, AAAA and MX at random: either way clients that
        # use the first address spread over the endpoints. ``round_robin`` is the only
        # policy kdns has (CoreDNS's default); ``weighted`` needs a weights file.
        self.no_block(d)
        if d.args and d.args[0].text != "round_robin":
            self.refuse(d.args[0], f"the loadbalance policy {d.args[0].text!r}",
                        "kdns rotates round_robin only")
            return
        self.no_args(d, 1)
        self.set("loadbalance", True, d.name)

    def p_autopath(self, d, zones):
        # CoreDNS autopath with @kubernetes (--autopath): the search path of the client pod
        # comes from the cluster, then the server's resolv.conf search domains. A
        # resolv.conf-like file of its own, or other zones than the cluster's, kdns has not.
        self.no_block(d)
        if not d.args or d.args[-1].text != "@kubernetes":
            self.refuse(d.args[-1] if d.args else d.name,
                        f"autopath {' '.join(a.text for a in d.args) or 'without arguments'}",
                        "kdns takes the search path from the cluster: autopath @kubernetes")
            return
        if len(d.args) > 1:
            self.refuse(d.args[0], "autopath with zones",
                        "kdns autopaths the cluster domain of its kubernetes plugin")
            return
        self.set("autopath", True, d.name)

    # ---- kubernetes
    def p_kubernetes(self, d, zones):
        kzones = [_zone(a.text) for a in d.args] or [z for z in zones if z != "."]
        forward = [z for z in kzones if not any(z == r or z.endswith("." + r) for r in REVERSE)]
        if len(forward) != 1:
            raise CorefileError(f"{d.name.where}: kubernetes serves {len(forward)} cluster "
                                f"domains ({', '.join(forward) or 'none'}); kdns serves one "
                                f"(--domain).")
        self.set("domain", forward[0], d.name)
        for z in kzones:
            if z != forward[0] and z not in REVERSE:
                self.refuse(d.name, f"the reverse zone {z} of kubernetes",
                            "kdns answers PTR for every cluster address under in-addr.arpa "
                            "and ip6.arpa")
        ttl, fall = COREDNS_K8S_TTL, None
        for opt in d.block or ():
            o, args = opt[0], opt[1:]
            name = o.text
            if name == "pods" and len(args) == 1 and args[0].text in ("insecure", "verified",
                                                                       "disabled"):
                self.set("pods", args[0].text, o)
            elif name == "ttl" and len(args) == 1:
                ttl = self.number(args[0], 0, 3600, "a TTL")
            elif name == "fallthrough":
                fall = [_zone(a.text) for a in args]
                # kdns forwards reverse names it has no record for; a name in the cluster
                # domain it has no record for is NXDOMAIN, never forwarded.
                bad = [z for z in fall or ["."] if z not in REVERSE]
                if bad:
                    self.refuse(o, f"fallthrough for {', '.join(bad)}",
                                "kdns answers NXDOMAIN for cluster names it has no record "
                                "for; only reverse names fall through")
            elif name == "endpoint_pod_names" and not args:
                self.set("endpoint_pod_names", True, o)
            else:
                # noendpoints, ignore empty_service, namespaces, labels, kubeconfig,
                # endpoint, tls, multicluster: rules kdns does not implement.
                self.refuse(o, f"the kubernetes option {' '.join(t.text for t in opt)!r}")
        if fall is None:
            # Without fallthrough CoreDNS answers NXDOMAIN for every reverse name of its
            # zones it has no record for; kdns forwards them.
            for z in kzones:
                if z in REVERSE:
                    self.refuse(d.name, f"kubernetes serving {z} without fallthrough",
                                "kdns forwards reverse names it has no record for, as "
                                "'fallthrough in-addr.arpa ip6.arpa' does")
                    break
        self.set("ttl", ttl, d.name)

    # ---- forward
    def p_forward(self, d, zones):
        if len(d.args) < 2:
            raise CorefileError(f"{d.name.where}: forward needs FROM and at least one TO, e.g. "
                                f"forward . /etc/resolv.conf.")
        frm = _zone(d.args[0].text)
        targets = d.args[1:]
        if len(targets) > MAX_FORWARD_TO:
            raise CorefileError(f"{targets[MAX_FORWARD_TO].where}: forward takes at most "
                                f"{MAX_FORWARD_TO} upstreams.")
        froms = [z for z in (zones if frm == "" else [frm])]
        ups, resolv = [], None
        for t in targets:
            text = t.text
            if "://" in text:
                scheme, _, text = text.partition("://")
                if scheme != "dns":
                    self.refuse(t, f"forwarding over {scheme}://",
                                "kdns forwards over UDP, and TCP when truncated")
                    continue
            if text.startswith("/") or os.sep in text:
                if len(targets) != 1:
                    self.refuse(t, "a resolv.conf mixed with addresses in forward")
                resolv = text
                continue
            try:
                ups.append(parse_upstream(text))
            except ValueError as e:
                raise CorefileError(f"{t.where}: forward: {e}.") from None
        excepts: list[str] = []
        for opt in d.block or ():
            o, args = opt[0], opt[1:]
            name = o.text
            if name == "max_concurrent" and len(args) == 1:
                self.set("forward_max_concurrent", self.number(args[0], 1, 1_000_000,
                                                               "a query count"), o)
            elif name == "policy" and len(args) == 1 and args[0].text in (
                    "random", "round_robin", "sequential"):
                self.set("forward_policy", args[0].text, o)
            elif name == "force_tcp" and not args:
                self.set("forward_force_tcp", True, o)
            elif name == "prefer_udp" and not args:
                # What kdns always does: the first try is UDP whatever the client used, and
                # TCP follows a truncated reply (RFC 7766 §5).
                continue
            elif name == "expire" and len(args) == 1:
                # kdns keeps no upstream connections to expire: each TCP exchange opens its
                # own connection, and UDP uses a fresh port per try (RFC 5452 §9.2).
                self.duration(args[0])
            elif name == "health_check" and args:
                # kdns checks upstreams with the queries it forwards: one that fails goes
                # last until it answers again. No separate probe is sent.
                self.duration(args[0])
            elif name == "max_fails" and len(args) == 1:
                self.number(args[0], 0, 1_000_000, "a count")
            elif name == "except" and args:
                excepts += [_zone(a.text) for a in args]
            else:
                self.refuse(o, f"the forward option {' '.join(t.text for t in opt)!r}")
        for z in excepts:
            # CoreDNS passes an excepted name to the next plugin; with none after forward
            # that is SERVFAIL, which a stub domain without servers answers too.
            self.stub(z, (), d.name)
        for z in froms:
            if z == ".":
                if self.have_root_forward:
                    raise CorefileError(f"{d.name.where}: a second forward for '.'; kdns has "
                                        f"one set of upstreams.")
                self.have_root_forward = True
                self.upstreams, self.resolv_conf = tuple(ups), resolv
            elif resolv is not None:
                self.refuse(d.name, f"forward of {z} to a resolv.conf",
                            "stub domains name their servers")
            else:
                self.stub(z, tuple(ups), d.name)

    def stub(self, zone: str, ups: tuple, tok: Token) -> None:
        if not is_dns1123_subdomain(zone):
            raise CorefileError(f"{tok.where}: {zone!r} is not a domain name kdns can route.")
        if zone in self.stubs and self.stubs[zone] != ups:
            raise CorefileError(f"{tok.where}: {zone} is forwarded twice, differently.")
        self.stubs[zone] = ups

    # ---- cache
    def p_cache(self, d, zones):
        domain_ok = True
        ttl = None
        for a in d.args:
            if a.text.isdigit() and ttl is None:
                ttl = self.number(a, 0, 2**31 - 1, "a TTL")
            elif _zone(a.text) not in (".", ""):
                domain_ok = False
                self.refuse(a, f"cache limited to the zone {a.text}",
                            "kdns has one cache, for every forwarded name")
        if not domain_ok:
            return
        success_ttl = COREDNS_MAX_TTL if ttl is None else ttl
        denial_ttl = COREDNS_MAX_NEG_TTL if ttl is None else ttl
        min_ttl, sizes = None, []
        for opt in d.block or ():
            o, args = opt[0], opt[1:]
            name = o.text
            if name in ("success", "denial") and 1 <= len(args) <= 3:
                sizes.append(self.number(args[0], 1, 10_000_000, "a cache size"))
                if len(args) >= 2:
                    t = self.number(args[1], 0, 2**31 - 1, "a TTL")
                    if name == "success":
                        success_ttl = t
                    else:
                        denial_ttl = t
                if len(args) == 3:
                    m = self.number(args[2], 0, 2**31 - 1, "a TTL")
                    if min_ttl is not None and m != min_ttl:
                        self.refuse(args[2], "different MINTTLs for success and denial",
                                    "kdns's cache has one floor")
                    min_ttl = m
            elif name == "serve_stale" and len(args) <= 2:
                stale = self.duration(args[0]) if args else COREDNS_STALE
                mode = args[1].text if len(args) == 2 else "immediate"
                if mode not in ("immediate", "verify"):
                    raise CorefileError(f"{args[1].where}: serve_stale's refresh mode is "
                                        f"immediate or verify, not {mode!r}.")
                self.set("serve_stale", stale, o)
                self.set("serve_stale_refresh", mode, o)
            elif name == "prefetch" and 1 <= len(args) <= 3:
                # CoreDNS setup.go: AMOUNT, then DURATION, then PERCENTAGE% (10 to 90).
                amount = self.number(args[0], 0, 1_000_000, "a hit count")
                dur = self.duration(args[1]) if len(args) > 1 else settings.PREFETCH_DURATION
                pct = settings.PREFETCH_PERCENT
                if len(args) > 2:
                    if not args[2].text.endswith("%"):
                        raise CorefileError(f"{args[2].where}: the prefetch percentage ends "
                                            f"with %, as {args[2].text}%.")
                    pct = self.number(Token(args[2].text[:-1], args[2].file, args[2].line),
                                      10, 90, "a percentage")
                self.set("cache_prefetch", (amount, dur, pct), o)
            elif name == "disable" and len(args) >= 2 and args[0].text in ("success", "denial"):
                # kdns never caches cluster answers (they come from the live image), so
                # disabling the cache for the cluster domain is what kdns does anyway;
                # kubeadm's Corefile writes exactly that.
                domain = self.flags.get("domain")
                others = [a for a in args[1:] if domain is None or _zone(a.text) != domain]
                if others:
                    self.refuse(others[0], f"cache disable for {others[0].text}",
                                "kdns only leaves the cluster domain uncached")
            else:
                self.refuse(o, f"the cache option {' '.join(t.text for t in opt)!r}")
        if sizes:
            # kdns keeps one LRU for success and denial answers: their sum is its size.
            self.set("cache_size", sum(sizes), d.name)
        self.set("cache_success_ttl", success_ttl, d.name)
        self.set("cache_denial_ttl", denial_ttl, d.name)
        self.set("cache_min_ttl", COREDNS_MIN_TTL if min_ttl is None else min_ttl, d.name)


def parse(path: str, *, env=None, text: str | None = None,
          base: str = settings.COREFILE_DIR) -> CorefileSettings:
    """Read the Corefile at ``path`` (imports included); CorefileError when it is malformed
    or contradicts itself. Unsupported plugins and options are listed, not raised: the
    caller refuses or warns (--corefile-unsupported). With ``text`` (the ConfigMap's
    ``Corefile`` key read through the API) ``path`` only names it in messages, and imports
    are relative to ``base`` (where CoreDNS's manifests mount the Corefile)."""
    env = os.environ if env is None else env
    reader = _Reader(env)
    toks = reader.read(path) if text is None else reader.read_text(text, path, base)
    if not toks:
        raise CorefileError(f"{path}: the Corefile is empty; give at least one server block, "
                            f"e.g. .:53 {{ kubernetes cluster.local }}.")
    m = _Mapper()
    blocks = parse_blocks(toks)
    # Kubernetes first: ``cache { disable ... cluster.local }`` needs the domain.
    for b in sorted(blocks, key=lambda b: not any(d.name.text == "kubernetes"
                                                  for d in b.directives)):
        m.block(b)
    for b in blocks:
        zones = {_zone(k.text.partition("://")[2] or k.text).partition(":")[0] or "."
                 for k in b.keys}
        kinds = {d.name.text for d in b.directives}
        if "hosts" in kinds and not kinds & {"kubernetes", "forward"}:
            # Nothing after hosts in this block: CoreDNS answers what falls through
            # SERVFAIL (no next plugin), which a stub domain without servers answers too.
            for z in sorted(zones - {"."}):
                m.stub(z, (), b.keys[0])
        if not kinds & {"kubernetes", "forward", "hosts"} and zones - {"."}:
            m.refuse(b.keys[0], f"the server block {b.keys[0].text} without forward or "
                     f"kubernetes", "kdns would have nothing to answer its names with")
    if "domain" not in m.flags:
        raise CorefileError(f"{path}: no kubernetes plugin; kdns serves a cluster domain, so "
                            f"the Corefile must have one.")
    m.check_hosts()
    kube_zones = {z for b in blocks if any(d.name.text == "kubernetes" for d in b.directives)
                  for z in ({_zone(k.text.partition("://")[2] or k.text).partition(":")[0] or "."
                             for k in b.keys})}
    rewrites = m.check_rewrite(kube_zones)
    if rewrites:
        # Compiled into the image and given to the workers at start (a change of them
        # applies at the next start, as the watcher logs).
        m.flags["rewrite"] = rewrites
    if "cache_success_ttl" not in m.flags:
        m.unsupported.append(f"{path}: a Corefile without cache is not supported by kdns "
                             f"(kdns always caches forwarded answers); add cache 30.")
    flags = dict(m.flags)
    # A plugin the Corefile leaves out is off, as in CoreDNS: no /health, /ready or
    # /metrics listener, no lameduck, no query log, no answer rotation.
    for key, off in (("health_port", 0), ("ready_port", 0), ("metrics_port", 0),
                     ("lameduck", 0.0), ("log_queries", False), ("loadbalance", False),
                     ("autopath", False)):
        flags.setdefault(key, off)
    cfg = KubeDNSConfig(dict(sorted(m.stubs.items())), m.upstreams)
    return CorefileSettings(flags=flags, forwarding=cfg, resolv_conf=m.resolv_conf,
                            unsupported=m.unsupported, files=reader.files,
                            version=reader.digest.hexdigest(), hosts=m.hosts,
                            rewrites=rewrites)


def version_of(path: str, env=None, text: str | None = None,
               base: str = settings.COREFILE_DIR) -> str:
    """The digest ``parse`` would give, without mapping (a cheap change check)."""
    reader = _Reader(os.environ if env is None else env)
    reader.read(path) if text is None else reader.read_text(text, path, base)
    return reader.digest.hexdigest()


def configmap_text(data: dict, label: str) -> str:
    """The ``Corefile`` key of a ConfigMap's data, as CoreDNS's manifests mount it."""
    if data.get("Corefile") is None:
        raise CorefileError(f"{label}: the ConfigMap has no Corefile key (it is absent or "
                            f"holds only {', '.join(sorted(data)) or 'nothing'}).")
    return data["Corefile"]


class CorefileWatcher:
    """Re-reads the Corefile every poll and calls ``on_change(settings)`` when its files
    changed and the new version is valid (CoreDNS ``reload``: a bad Corefile keeps the last
    good one, and the error names file:line). ``strict``: unsupported plugins reject a
    version as the first read refused the Corefile; otherwise each is logged."""

    def __init__(self, path: str, on_change, *, strict: bool = True, env=None,
                 first: CorefileSettings | None = None):
        self.path, self.on_change, self.strict, self.env = path, on_change, strict, env
        self.current = first
        self.version = first.version if first is not None else None
        self.rejected = 0

    def poll_once(self) -> bool:
        """The file: re-read it (and its imports)."""
        return self.offer(lambda: version_of(self.path, self.env),
                          lambda: parse(self.path, env=self.env))

    def offer_configmap(self, data: dict, label: str) -> bool:
        """A ConfigMap version read through the API: its ``Corefile`` key."""
        def text():
            return configmap_text(data, label)
        return self.offer(lambda: version_of(label, self.env, text()),
                          lambda: parse(label, env=self.env, text=text()))

    def offer(self, version_of_new, load) -> bool:
        try:
            version = version_of_new()
        except CorefileError as e:
            if self.version != "unreadable":
                log.error("%s Keeping the last good Corefile.", e)
                self.rejected += 1
            self.version = "unreadable"
            return False
        if version == self.version:
            return False
        self.version = version
        try:
            new = load()
            if new.unsupported and self.strict:
                raise CorefileError(new.unsupported[0])
        except CorefileError as e:
            self.rejected += 1
            log.error("Corefile rejected: %s Keeping the last good Corefile.", e)
            return False
        for why in new.unsupported:
            log.warning("%s Ignored (--corefile-unsupported=warn).", why)
        old, self.current = self.current, new
        if old is not None:
            # The cache's size is fixed when a worker starts (its compiled table).
            later = sorted(k for k in set(old.flags) | set(new.flags)
                           if (k not in FORWARD_KEYS or k == "cache_size")
                           and old.flags.get(k) != new.flags.get(k))
            if later:
                log.warning("Corefile changed %s; kdns applies %s at its next start "
                            "(forwarding and cache changes apply now).",
                            ", ".join(later), "it" if len(later) == 1 else "them")
        self.on_change(new)
        return True
