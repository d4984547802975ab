"""Custom records from the Corefile's ``hosts`` plugin: the hosts file, its inline lines,
and the records, zones and PTRs they give the zone compiler.

Why: k3s's default Corefile answers its node names from ``hosts /etc/coredns/NodeHosts``
(a key of the coredns ConfigMap), and operators add records the same way. CoreDNS answers
them before the kubernetes plugin; kdns compiles them into the image like cluster records,
so the packet path answers them without forwarding and with no per-packet work.

CoreDNS's rules (plugin/hosts: setup.go, hostsfile.go, hosts.go), which kdns follows:

- ``hosts [FILE [ZONES...]] { [INLINE] ttl SECONDS; no_reverse; reload DURATION;
  fallthrough [ZONES...] }``; FILE defaults to /etc/hosts, ZONES to the server block's, ttl
  to 3600 (1 to 65535), reload to 5s (0: never). Any other line before ``fallthrough`` is an
  inline hosts line; after it, an error. A missing file is a warning: the inline lines serve.
- A line is an address and its names (hosts(5)), ``#`` to the end of the line a comment.
  An IPv4 address (an IPv4-mapped IPv6 one too) gives A records, IPv6 AAAA; an IPv6 zone
  (``%eth0``) is dropped. Names are case-folded; a name outside ZONES is ignored. The file's
  addresses come before the inline lines' for one name, and every name of an address gives
  it a PTR (RFC 1035 §3.5) unless ``no_reverse``.
- Answers: a name with addresses answers A and AAAA with them (AA), and any other type with
  no records (NOERROR, AA, no SOA: there is none). A name of ZONES without addresses goes to
  the next plugin with ``fallthrough`` covering it, else SERVFAIL. PTR for an address it has:
  its names, for any reverse name; for one it lacks: always the next plugin.

Where kdns differs, and why: a line CoreDNS would skip silently (no names, an address that
does not parse, a name that cannot be put on the wire) is an error naming file:line, and the
version is not used (the last good records stay), so a typo does not silently drop a record;
an RRset holds each address once (RFC 2181 §5); wildcard names (``*.example.org``, newer
CoreDNS) and names under in-addr.arpa/ip6.arpa are refused as lines. What this must not do:
know Kubernetes or the image layout (it hands RRsets and zones to the compiler).
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field

from kdns.dns import rr as R
from kdns.dns.names import reverse_name

log = logging.getLogger("kdns.forward.hosts")

DEFAULT_FILE = "/etc/hosts"
DEFAULT_TTL = 3600                 # CoreDNS hosts: "The default is 3600 seconds"
DEFAULT_RELOAD = 5.0               # CoreDNS hosts: the file is re-read every 5 s
MAX_TTL = 65535                    # setup.go refuses a ttl outside 1..65535
REVERSE = ("in-addr.arpa", "ip6.arpa")


class HostsError(ValueError):
    """A hosts line kdns cannot use; ``str()`` is one sentence naming file:line."""


def within(name: str, zone: str) -> bool:
    """Is ``name`` (no trailing dot, lower case; "" is the root) ``zone`` or below it?"""
    return zone in ("", ".") or name == zone or name.endswith("." + zone)


@dataclass(frozen=True)
class HostsSpec:
    """One ``hosts`` directive, as the Corefile gives it. ``zones`` and ``fallthrough`` are
    lower-case names without the trailing dot, "." for the root; ``fallthrough`` None means
    none, () every zone of the plugin. ``inline``: (file:line, text) per inline line."""
    where: str
    path: str = DEFAULT_FILE
    zones: tuple = (".",)
    inline: tuple = ()
    ttl: int = DEFAULT_TTL
    reverse: bool = True
    reload: float = DEFAULT_RELOAD
    fallthrough: tuple | None = None

    def falls_through(self, name: str) -> bool:
        """CoreDNS ``fall.F.Through``: does a miss at ``name`` go to the next plugin?"""
        if self.fallthrough is None:
            return False
        return not self.fallthrough or any(within(name, z) for z in self.fallthrough)

    def in_zones(self, name: str) -> bool:
        return any(within(name, z) for z in self.zones)


@dataclass(frozen=True)
class HostsRecords:
    """What the records are: per name its IPv4 and IPv6 addresses (text, in order, each
    once), per address its names; and the directive they came from."""
    spec: HostsSpec
    v4: dict = field(default_factory=dict)
    v6: dict = field(default_factory=dict)
    ptr: dict = field(default_factory=dict)

    # Made once per version (every compile uses them; a blocklist-sized file is big).
    def entries(self) -> int:
        """CoreDNS's ``coredns_hosts_entries``: addresses per name plus names per address."""
        return sum(map(len, self.v4.values())) + sum(map(len, self.v6.values())) + \
            sum(map(len, self.ptr.values()))

    def names(self) -> frozenset:
        """The names with records, absolute (trailing dot)."""
        return self._names

    @functools.cached_property
    def _names(self) -> frozenset:
        return frozenset(n + "." for n in (*self.v4, *self.v6))

    def reverse_names(self) -> frozenset:
        return self._reverse_names

    @functools.cached_property
    def _reverse_names(self) -> frozenset:
        return frozenset(reverse_name(ip) for ip in self.ptr)

    def rrsets(self) -> tuple:
        """A, AAAA and PTR RRsets at the plugin's TTL, the addresses in file order."""
        return self._rrsets

    @functools.cached_property
    def _rrsets(self) -> tuple:
        ttl, out = self.spec.ttl, []
        for table, rtype in ((self.v4, R.A), (self.v6, R.AAAA)):
            for name, ips in table.items():
                out.append(R.RRset(name + ".", rtype, ttl, tuple(R.Address(ip) for ip in ips)))
        for ip, names in self.ptr.items():
            out.append(R.RRset(reverse_name(ip), R.PTR, ttl,
                               tuple(R.Target(n + ".") for n in names)))
        return tuple(out)

    def zones(self, domain: str) -> list[R.Zone]:
        """The image zones of the plugin's names: each of ZONES (but the cluster domain's and
        the reverse zones', which their own zones answer) as ZONE_HOSTS when a miss falls
        through and ZONE_HOSTS_FINAL when not; a fallthrough zone inside a final one is a
        ZONE_HOSTS of its own (the deepest zone decides, as ``fall.F.Through`` matches)."""
        spec, out = self.spec, {}
        for z in spec.zones:
            if within(z, domain) or any(within(z, r) for r in REVERSE):
                continue
            out[z] = R.ZONE_HOSTS if spec.falls_through(z) else R.ZONE_HOSTS_FINAL
            if out[z] == R.ZONE_HOSTS_FINAL:
                for f in spec.fallthrough or ():
                    if f != z and within(f, z) and not within(f, domain) \
                            and not any(within(f, r) for r in REVERSE):
                        out[f] = R.ZONE_HOSTS
        return [R.Zone("." if z == "." else z + ".", kind=kind, ttl=spec.ttl)
                for z, kind in sorted(out.items())]


def parse_lines(lines, spec: HostsSpec, domain: str = "") -> tuple[dict, dict, dict]:
    """``lines``: (file:line, text) pairs -> (v4, v6, ptr) tables; HostsError at the first bad
    line. ``domain``: the cluster domain, whose apex the plugin may not take."""
    v4: dict[str, dict] = {}
    v6: dict[str, dict] = {}
    ptr: dict[str, dict] = {}
    for where, raw in lines:
        text = raw.split("#", 1)[0]
        fields = text.split()
        if not fields:
            continue
        addr = fields[0].split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise HostsError(f"{where}: {fields[0]!r} is not an IP address; a hosts line is "
                             f"an address and its names, e.g. 10.0.0.1 node1.") from None
        if len(fields) < 2:
            raise HostsError(f"{where}: the address {fields[0]} has no names; give at least "
                             f"one after it, e.g. {fields[0]} node1.")
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped              # Go's To4(): an A record, as CoreDNS
        text_ip = str(ip)
        table = v4 if ip.version == 4 else v6
        for word in fields[1:]:
            name = word.rstrip(".").lower()
            if not name or "*" in name:
                raise HostsError(f"{where}: {word!r} is not a name kdns serves from hosts "
                                 f"(wildcard and empty names are not supported).")
            try:
                R.name_labels(name + ".")
                name.encode("ascii")
            except (R.NameError_, UnicodeEncodeError) as e:
                raise HostsError(f"{where}: {word!r} is not a domain name ({e}).") from None
            if not spec.in_zones(name):
                continue                     # CoreDNS: "name is not in Origins"
            if any(within(name, r) for r in REVERSE):
                raise HostsError(f"{where}: {word!r} lies under a reverse zone; kdns makes "
                                 f"the PTRs of hosts from their addresses.")
            if domain and name == domain:
                raise HostsError(f"{where}: {word!r} is the cluster domain's apex, which "
                                 f"kdns serves from the cluster.")
            table.setdefault(name, {})[text_ip] = None
            if spec.reverse:
                ptr.setdefault(text_ip, {})[name] = None
    return ({n: tuple(a) for n, a in v4.items()}, {n: tuple(a) for n, a in v6.items()},
            {ip: tuple(n) for ip, n in ptr.items()})


def records(spec: HostsSpec, file_text: str | None, label: str, domain: str = "") \
        -> HostsRecords:
    """The records of the file's text (None: no file) and then the inline lines, as
    CoreDNS puts the file's addresses first."""
    lines = [] if file_text is None else [(f"{label}:{n}", line) for n, line
                                          in enumerate(file_text.splitlines(), 1)]
    fv4, fv6, fptr = parse_lines(lines, spec, domain)
    iv4, iv6, iptr = parse_lines(spec.inline, spec, domain)
    return HostsRecords(spec, _join(fv4, iv4), _join(fv6, iv6), _join(fptr, iptr))


def _join(first: dict, then: dict) -> dict:
    out = {k: dict.fromkeys(v) for k, v in first.items()}
    for k, v in then.items():
        out.setdefault(k, {}).update(dict.fromkeys(v))
    return {k: tuple(v) for k, v in out.items()}


class HostsBox:
    """The custom records the compiles use now: the supervisor swaps ``records`` (one
    reference, so a compile on the controller's thread reads one version whole) and then
    asks for a compile."""

    def __init__(self, records: HostsRecords | None = None):
        self.records = records


class HostsSource:
    """The hosts file, re-read every ``spec.reload`` seconds when its inode, size, mtime or
    ctime changed (CoreDNS compares mtime and size); or, through the API, the ConfigMap key
    that stands for it (``offer_key``). ``current`` is the last good HostsRecords; a bad
    version logs one line naming file:line and keeps it."""

    def __init__(self, spec: HostsSpec, domain: str = "", *, configmap_key: str | None = None):
        self.spec, self.domain = spec, domain
        self.configmap_key = configmap_key
        self.stamp = None
        self.failed = None
        self.rejected = 0
        self.next_check = 0.0
        self.current = HostsRecords(spec)        # none until ``load_first``
        # CoreDNS's coredns_hosts_reload_timestamp_seconds: the mtime of the file version
        # in use (a ConfigMap key: when its version was taken); 0 before any.
        self.reloaded = 0.0

    def load_first(self, text: str | None = None) -> HostsRecords:
        """The first version (start-up): HostsError when it is bad, so kdns does not start
        on records it cannot serve. ``text``: the ConfigMap key's, when read through it."""
        if self.configmap_key is not None:
            stamp = ("key", text)
        else:
            stamp, text = self._read()
            if stamp is None:
                log.warning("hosts file %s does not exist (%s); serving the inline records "
                            "only", self.spec.path, self.spec.where)
        self.current = records(self.spec, text, self.label(), self.domain)
        self.stamp = stamp
        self._stamped(stamp)
        self._logged(self.current)
        return self.current

    def _stamped(self, stamp) -> None:
        if stamp is None:
            return
        self.reloaded = time.time() if stamp[0] == "key" else stamp[2] / 1e9

    def _logged(self, new: HostsRecords) -> None:
        log.info("hosts records from %s: %d names, %d addresses with PTRs", self.label(),
                 len(set(new.v4) | set(new.v6)), len(new.ptr))

    def label(self) -> str:
        return self.spec.path if self.configmap_key is None else self.configmap_key

    def _read(self):
        try:
            with open(self.spec.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise HostsError(f"{self.spec.where}: cannot read the hosts file "
                             f"{self.spec.path} ({e.strerror or e}).") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), \
            data.decode("utf-8", errors="replace")

    def poll(self, now: float) -> HostsRecords | None:
        """New records when the file changed and the new version is good, else None."""
        if self.configmap_key is not None or not self.spec.reload or now < self.next_check:
            return None
        self.next_check = now + self.spec.reload
        try:
            stamp, text = self._read()
        except HostsError as e:
            return self._reject(("error", str(e)), e)
        if stamp is None:
            # CoreDNS keeps what it has when the file cannot be opened; so does kdns.
            return None
        if stamp == self.stamp:
            return None
        return self._offer(stamp, text, self.spec.path)

    def offer_key(self, data: dict) -> HostsRecords | None:
        """A ConfigMap version read through the API: its key's text (absent: no file)."""
        text = data.get(self.configmap_key.rsplit(":", 1)[-1])
        stamp = ("key", text)
        if stamp == self.stamp:
            return None
        return self._offer(stamp, text, self.label())

    def _offer(self, stamp, text, label) -> HostsRecords | None:
        if stamp == self.failed:
            return None
        try:
            new = records(self.spec, text, label, self.domain)
        except HostsError as e:
            return self._reject(stamp, e)
        self.stamp, self.failed = stamp, None
        self._stamped(stamp)
        if (new.v4, new.v6, new.ptr) == (self.current.v4, self.current.v6, self.current.ptr):
            return None
        self.current = new
        self._logged(new)
        return new

    def _reject(self, stamp, e: HostsError) -> None:
        if stamp != self.failed:
            self.rejected += 1
            log.error("%s Keeping the last good hosts records.", e)
        self.failed = stamp
        return None
