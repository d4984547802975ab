"""The Kubernetes DNS naming rules: cluster model -> RRsets, zones and existing names.

Why: this is the one place that decides what a pod resolving through kdns sees, so it follows
``docs/dns-rules.md`` rule by rule, taking its choice where kube-dns (K) and
CoreDNS (C) differ. Everything here is a pure function of the model and the options; section
numbers in comments are the spec's.

What it must not do: know the image layout or sockets (it hands RRsets to
``image.compile_image``), or talk to the API (``sources/`` does). ``compile_file`` and
``master_file`` are thin conveniences for ``kdns serve/records --from-file``.
"""
from __future__ import annotations

import gc
import ipaddress
import logging
import os
import re
from dataclasses import dataclass

from kdns import settings
from kdns.dns import rr as R
from kdns.dns.names import reverse_name
from kdns.kube.model import ClusterModel, EndpointSet, Service
from kdns.kube.file import InputError, read_objects

__all__ = ["ZoneData", "zone_data", "master_file", "model_from_file",
           "InputError", "PODS_MODES", "DNS_SCHEMA_VERSION"]

log = logging.getLogger(__name__)

PODS_MODES = ("disabled", "insecure", "verified")
DNS_SCHEMA_VERSION = "1.1.0"          # dns-rules §1.9, kubernetes/dns docs/specification.md
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400   # dns-rules §2.2 (C values)
SOA_TTL_CAP = 300                     # dns-rules §2.2: SOA TTL = min(ttl, 300)
REVERSE_ZONES = ("in-addr.arpa.", "ip6.arpa.")
DEFAULT_NS_IP = "127.0.0.1"           # C apex test: ns.dns.Z A 127.0.0.1 when nothing better

# A DNS-1123 label, which every Kubernetes name part we publish must be (RFC 1123 §2.1).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class ZoneData:
    """Everything the compiler needs, plus the warnings about objects that were skipped."""
    rrsets: tuple
    zones: tuple
    exists: tuple
    serial: int
    warnings: tuple


def is_label(text: str) -> bool:
    return len(text) <= R.MAX_LABEL and _LABEL.match(text) is not None


def fits(name: str) -> bool:
    """An absolute name (trailing dot) within RFC 1035 §2.3.4's 255 wire bytes. Each part is
    a valid label, but together they can be too long with a long domain: such a name is
    skipped with a warning instead of failing the whole compile."""
    return len(name) <= R.MAX_NAME - 1


def dashed_ip(ip: str) -> str:
    """Endpoint label from an IP (dns-rules §1.4, C endpointHostname): IPv4 dots and IPv6 colons
    become dashes; an IPv6 label ending in '-' gets a '0' so it does not end in a dash."""
    if ":" not in ip:
        return ip.replace(".", "-")
    label = ip.replace(":", "-").replace(".", "-")
    return label + "0" if label.endswith("-") else label


def srv_weight(n: int) -> int:
    """dns-rules §1.5: priority 0, weight floor(100/N), at least 1."""
    return max(1, 100 // n)


class _Builder:
    """Accumulates rdatas per (name, type) as ordered sets, then freezes them into RRsets."""

    __slots__ = ("zone", "ttl", "endpoint_pod_names", "sets", "ptr", "warnings", "addresses")

    def __init__(self, zone: str, ttl: int, endpoint_pod_names: bool):
        self.zone = zone
        self.ttl = ttl
        self.endpoint_pod_names = endpoint_pod_names
        # Ordered sets of rdatas per (name, type) and of PTR targets per IP (``_add_to_set``).
        self.sets: dict[tuple[str, int], object] = {}
        self.ptr: dict[str, object] = {}
        self.warnings: dict[str, None] = {}   # ordered set: one warning per problem
        self.addresses: dict[str, tuple] = {}

    def add(self, name: str, rtype: int, rdata) -> None:
        _add_to_set(self.sets, (name, rtype), rdata)

    def address(self, name: str, ip: str) -> None:
        # One Address object per IP: each endpoint IP appears in three RRsets and a PTR.
        typed = self.addresses.get(ip)
        if typed is None:
            typed = self.addresses[ip] = (R.AAAA if ":" in ip else R.A, R.Address(ip))
        _add_to_set(self.sets, (name, typed[0]), typed[1])

    def add_ptr(self, ip: str, target: str) -> None:
        _add_to_set(self.ptr, ip, target)

    def warn(self, message: str) -> None:
        self.warnings[message] = None

    def rrsets(self) -> list[R.RRset]:
        return self.set_rrsets() + [ptr_rrset(ip, targets, self.ttl)
                                    for ip, targets in self.ptr.items()]

    def set_rrsets(self) -> list[R.RRset]:
        """Every RRset but the PTRs (which merge across services: ``ptr_rrset``)."""
        ttl, RRset = self.ttl, R.RRset
        # Sorted rdatas make the image independent of object order (identical input,
        # identical bytes); one-record sets, the vast majority, need no sort.
        return [RRset(name, rtype, ttl, tuple(sorted(rdatas)) if type(rdatas) is dict else (rdatas,))
                for (name, rtype), rdatas in self.sets.items()]

    def ptr_pairs(self) -> tuple:
        """(ip, target) of every PTR this builder collected."""
        return tuple((ip, t) for ip, targets in self.ptr.items()
                     for t in (targets if type(targets) is dict else (targets,)))


def ptr_rrset(ip: str, targets, ttl: int) -> R.RRset:
    """The PTR RRset of ``ip``: ``targets`` is one target or an ordered set (dict) of them;
    dns-rules §1.7 (C): one PTR per distinct target, sorted (identical input, identical bytes)."""
    Target = R.Target
    return R.RRset(reverse_name(ip), R.PTR, ttl,
                   tuple(Target(t) for t in sorted(targets)) if type(targets) is dict
                   else (Target(targets),))


def _add_to_set(sets: dict, key, value) -> None:
    """Add ``value`` to the ordered set ``sets[key]``. A one-member set is stored as the bare
    value (no value here is a dict): nearly every set has one member, and a one-entry dict
    costs ~200 bytes, tens of MB at 10k services (memory at the compile's peak)."""
    cur = sets.get(key)
    if cur is None:
        sets[key] = value
    elif type(cur) is dict:
        cur[value] = None
    elif cur != value:
        sets[key] = {cur: None, value: None}


# --------------------------------------------------------------------------- services


def service_records(model: ClusterModel, svc: Service, *, zone: str, ttl: int,
                    endpoint_pod_names: bool = False) -> tuple[list, tuple, tuple]:
    """One service's records alone: (RRsets, (ip, PTR target) pairs, warnings). A service's
    names are disjoint from every other's (all end in <svc>.<ns>.svc.<zone>) and its SRV
    targets are its own names; only PTRs merge across services (by IP). So the zone is the
    union of these plus ``zone_data``'s apex and PTRs, which the incremental compiler
    (kdns/serve/incremental.py) relies on."""
    b = _Builder(zone, ttl, endpoint_pod_names)
    _service_records(b, model, svc)
    return b.set_rrsets(), b.ptr_pairs(), tuple(b.warnings)


def _service_records(b: _Builder, model: ClusterModel, svc: Service) -> None:
    what = f"Service {svc.namespace}/{svc.name}"
    if not (is_label(svc.namespace) and is_label(svc.name)):
        b.warn(f"skipping {what}: its name or namespace is not a DNS label")
        return
    fqdn = f"{svc.name}.{svc.namespace}.svc.{b.zone}"
    if not fits(fqdn):
        b.warn(f"skipping {what}: {fqdn} is longer than 255 bytes")
        return
    if svc.type == "ExternalName":
        _external_name(b, svc, fqdn, what)
        return
    sets = model.endpoint_sets(svc.namespace, svc.name)
    if svc.headless:
        _headless(b, svc, fqdn, sets, what)
    else:
        _cluster_ip(b, svc, fqdn)
    _endpoint_names(b, svc, fqdn, sets, what)


def _cluster_ip(b: _Builder, svc: Service, fqdn: str) -> None:
    """dns-rules §1.2: A/AAAA from clusterIPs, endpoints or not; §1.5 SRV; §1.7 PTR."""
    for ip in svc.cluster_ips:
        b.address(fqdn, ip)
        b.add_ptr(ip, fqdn)
    nips = len(svc.cluster_ips)
    if not nips or not svc.ports:
        return                      # zero ports: A only, bare SRV NODATA (dns-rules §1.3)
    # Bare name (C): one SRV per port x cluster IP, de-duplicated by (target, port).
    w = srv_weight(len(svc.ports) * nips)
    for p in svc.ports:
        b.add(fqdn, R.SRV, R.Srv(0, w, p.port, fqdn))
    for p in svc.ports:
        if p.name:
            _named_srv(b, fqdn, p.name, p.protocol, [(p.port, fqdn)] * nips)


def _named_srv(b: _Builder, fqdn: str, port_name: str, proto: str,
               entries: list[tuple[int, str]]) -> None:
    """``_<port>._<proto>.<svc>`` (dns-rules §1.5): N counts entries before de-duplication."""
    if not is_label(port_name.lower()) or not is_label(proto.lower()):
        b.warn(f"skipping SRV for port {port_name!r}/{proto} of {fqdn}: not a DNS label")
        return
    name = f"_{port_name.lower()}._{proto.lower()}.{fqdn}"
    if not fits(name):
        b.warn(f"skipping SRV {name}: longer than 255 bytes")
        return
    w = srv_weight(len(entries))
    for port, target in entries:
        b.add(name, R.SRV, R.Srv(0, w, port, target))


def _headless(b: _Builder, svc: Service, fqdn: str, sets: tuple[EndpointSet, ...],
              what: str) -> None:
    """dns-rules §1.3: one record per ready address (de-duplicated); none -> no name (NXDOMAIN)."""
    bare: list[tuple[int, str]] = []
    named: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for es in sets:
        for ep in es.endpoints:
            for ip in ep.addresses:
                b.address(fqdn, ip)
                target = host_name(b, ep, ip, fqdn, what)
                if target is None:
                    continue
                for p in es.ports:
                    bare.append((p.port, target))
                    if p.name:
                        named.setdefault((p.name, p.protocol), []).append((p.port, target))
    if bare:
        w = srv_weight(len(bare))
        for port, target in bare:
            b.add(fqdn, R.SRV, R.Srv(0, w, port, target))
    for (pname, proto), entries in named.items():
        _named_srv(b, fqdn, pname, proto, entries)


def _endpoint_names(b: _Builder, svc: Service, fqdn: str, sets: tuple[EndpointSet, ...],
                    what: str) -> None:
    """``<host>.<svc>.<ns>.svc.Z`` -> every address with that hostname (C, dns-rules §1.3: also for
    ClusterIP services), and the PTR of every ready address pointing at it (dns-rules §1.7)."""
    for es in sets:
        for ep in es.endpoints:
            for ip in ep.addresses:
                host = host_name(b, ep, ip, fqdn, what)
                if host is None:
                    continue
                b.address(host, ip)
                b.add_ptr(ip, host)


def host_name(b: _Builder, ep, ip: str, fqdn: str, what: str) -> str | None:
    """``<host>.<svc>.<ns>.svc.Z`` of one endpoint address, or None (warned) if too long."""
    host = f"{endpoint_label(b, ep, ip, what)}.{fqdn}"
    if fits(host):
        return host
    b.warn(f"{what}: endpoint name {host} is longer than 255 bytes; serving the address "
           "under the service name only")
    return None


def endpoint_label(b: _Builder, ep, ip: str, what: str) -> str:
    """dns-rules §1.4 precedence: hostname, then (option) the pod name, then the dashed IP."""
    if ep.hostname:
        if is_label(ep.hostname):
            return ep.hostname
        b.warn(f"{what}: endpoint hostname {ep.hostname!r} is not a DNS label; using the IP")
    if b.endpoint_pod_names and ep.pod_name and is_label(ep.pod_name):
        return ep.pod_name          # C ignores pod names of 64+ characters; so does is_label
    return dashed_ip(ip)


def _external_name(b: _Builder, svc: Service, fqdn: str, what: str) -> None:
    """dns-rules §1.6: CNAME to externalName; an in-zone target is followed by the compiler."""
    target = svc.external_name.rstrip(".").lower()
    try:
        ipaddress.ip_address(target)
    except ValueError:
        pass
    else:
        # C serves nothing for an IP-valued externalName (NXDOMAIN); K's A is a quirk.
        b.warn(f"skipping {what}: externalName {svc.external_name!r} is an IP address")
        return
    try:
        target = R.canonical(target)
    except (R.NameError_, UnicodeError):
        b.warn(f"skipping {what}: externalName {svc.external_name!r} is not a domain name")
        return
    if target == fqdn:
        b.warn(f"skipping {what}: externalName points at itself")
        return
    b.add(fqdn, R.CNAME, R.Target(target))


# --------------------------------------------------------------------------- zone


def _apex(b: _Builder, model: ClusterModel, serial: int, ns_ips) -> list[R.RRset]:
    """dns-rules §1.10/§2.2: SOA, NS ns.dns.<zone> with its address, dns-version TXT (§1.9)."""
    z = b.zone
    soa_ttl = min(b.ttl, SOA_TTL_CAP)
    out = []
    for apex in (z, *REVERSE_ZONES):
        out.append(R.RRset(apex, R.SOA, soa_ttl, (R.Soa(
            "ns.dns." + apex, "hostmaster." + apex, serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
            b.ttl),)))
    nsname = "ns.dns." + z
    out.append(R.RRset(z, R.NS, b.ttl, (R.Target(nsname),)))
    for ip in _ns_addresses(model, ns_ips):
        b.address(nsname, ip)
    b.add("dns-version." + z, R.TXT, R.Txt((DNS_SCHEMA_VERSION,)))
    return out


def _ns_addresses(model: ClusterModel, ns_ips) -> tuple[str, ...]:
    """The name server's addresses: given, else kube-system/kube-dns's cluster IPs (what
    pods' resolv.conf points at), else 127.0.0.1 (as C when it finds no local address)."""
    if ns_ips:
        return tuple(ns_ips)
    svc = model.service("kube-system", "kube-dns")
    if svc is not None and svc.cluster_ips:
        return svc.cluster_ips
    return (DEFAULT_NS_IP,)


def _pod_namespaces(b: _Builder, model: ClusterModel, pods: str, namespaces) -> dict:
    """dns-rules §1.8: insecure needs the namespace; verified also a live pod with that IP."""
    if pods == "disabled":
        return {}
    if pods == "insecure":
        return {ns: None for ns in namespaces}
    ips: dict[str, set] = {ns: set() for ns in namespaces}
    for pod in model.pods():
        if pod.namespace in ips:
            ips[pod.namespace].add(pod.ip)
    return ips


def autopath_pods(model: ClusterModel) -> list:
    """(IP, namespace) of every live pod: the client table CoreDNS's autopath finds a
    querying pod's namespace in (its pod cache, ``pods verified``), which kdns compiles into
    the image (``encode.autopath_section``) whatever the pods mode."""
    return [(pod.ip, pod.namespace) for pod in model.pods()]


def zone_data(model: ClusterModel, *, domain: str = settings.DOMAIN, ttl: int = settings.TTL,
              pods: str = settings.PODS, endpoint_pod_names: bool = False, ns_ips=None,
              serial: int | None = None) -> ZoneData:
    """The whole cluster zone (and the reverse zones) for ``model``."""
    if pods not in PODS_MODES:
        raise ValueError(f"pods must be one of {', '.join(PODS_MODES)}, not {pods!r}")
    # As in image.compile_image: hundreds of thousands of new objects, none garbage until
    # the end, so the cyclic GC would only rescan them.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _zone_data(model, domain, ttl, pods, endpoint_pod_names, ns_ips, serial)
    finally:
        if paused:
            gc.enable()


def _zone_data(model, domain, ttl, pods, endpoint_pod_names, ns_ips, serial) -> ZoneData:
    zone = R.canonical(domain)
    serial = model.serial if serial is None else serial
    frame, zones, exists = zone_frame(model, zone=zone, ttl=ttl, pods=pods, ns_ips=ns_ips,
                                      serial=serial)
    b = _Builder(zone, ttl, endpoint_pod_names)
    for svc in sorted(model.services(), key=lambda s: (s.namespace, s.name)):
        _service_records(b, model, svc)
    for w in b.warnings:
        log.warning("%s", w)
    return ZoneData(tuple(frame + b.rrsets()), zones, exists, serial, tuple(b.warnings))


def zone_frame(model: ClusterModel, *, zone: str, ttl: int, pods: str, serial: int,
               ns_ips=None, pod_lists=None) -> tuple[list, tuple, tuple]:
    """The zone without its services (``service_records``) and PTRs: (the apex RRsets with
    the name server's address and dns-version, the zones with their pod namespaces, the
    names that exist without data). ``pod_lists``: for ``verified``, each namespace's pods
    already packed (``image.pod_list``) by a caller that keeps them between compiles."""
    b = _Builder(zone, ttl, False)
    fixed = _apex(b, model, serial, ns_ips)
    namespaces = sorted(ns for ns in model.namespaces() if is_label(ns))
    # dns-rules §1.1/§1.11: svc.Z and pod.Z always exist; so does <ns>.svc.Z of every namespace.
    exists = ["svc." + zone, "pod." + zone] + [f"{ns}.svc.{zone}" for ns in namespaces]
    if pods == "verified" and pod_lists is not None:
        pod_namespaces = {ns: pod_lists.get(ns, b"") for ns in namespaces}
    else:
        pod_namespaces = _pod_namespaces(b, model, pods, namespaces)
    zones = (R.Zone(zone, ttl=ttl, pods=pods, pod_namespaces=pod_namespaces),
             *(R.Zone(rz, kind=R.ZONE_REVERSE, ttl=ttl) for rz in REVERSE_ZONES))
    return fixed + b.set_rrsets(), zones, tuple(exists)


# --------------------------------------------------------------------------- files


def file_serial(path: str) -> int:
    # The file's mtime: increases when the file changes, and is the same for the same file,
    # so re-reading an unchanged file gives a byte-identical image.
    return int(os.stat(path).st_mtime)


def model_from_file(path: str) -> ClusterModel:
    objects, ignored = read_objects(path)
    if ignored:
        log.info("%s: ignored %s", path,
                 ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items())))
    model = ClusterModel()
    for obj in objects:
        model.apply(obj)
    return model


def master_file(path: str, *, domain: str = settings.DOMAIN, ttl: int = settings.TTL,
                pods: str = settings.PODS, endpoint_pod_names: bool = False,
                serial: int | None = None) -> str:
    """The zone for ``path`` in RFC 1035 §5 master-file format, sorted, for ``kdns records``."""
    zd = zone_data(model_from_file(path), domain=domain, ttl=ttl, pods=pods,
                   endpoint_pod_names=endpoint_pod_names,
                   serial=file_serial(path) if serial is None else serial)
    return format_master(zd)


def format_master(zd: ZoneData) -> str:
    lines = []
    for s in zd.rrsets:
        for rd in s.rdatas:
            key = (R.name_labels(s.name)[::-1], s.rtype, rdata_text(rd))
            lines.append((key, f"{s.name}\t{s.ttl}\tIN\t{R.TYPE_NAMES[s.rtype]}\t{key[2]}"))
    lines.sort()
    head = []
    z = zd.zones[0]
    if z.pods != "disabled":
        head.append(f"; pods {z.pods}: <a-b-c-d>.<ns>.pod.{z.apex} A/AAAA synthesised for "
                    f"namespaces: {' '.join(sorted(z.pod_namespaces)) or '(none)'}")
    head += [f"; exists without data: {name}" for name in sorted(zd.exists)]
    return "\n".join(head + [text for _, text in lines]) + "\n"


def rdata_text(rd) -> str:
    if isinstance(rd, R.Address):
        return rd.address
    if isinstance(rd, R.Target):
        return rd.target
    if isinstance(rd, R.Srv):
        return f"{rd.priority} {rd.weight} {rd.port} {rd.target}"
    if isinstance(rd, R.Txt):
        return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
                        for s in rd.strings)
    if isinstance(rd, R.Soa):
        return (f"{rd.mname} {rd.rname} {rd.serial} {rd.refresh} {rd.retry} {rd.expire} "
                f"{rd.minimum}")
    raise TypeError(f"no text form for {rd!r}")
