"""The in-memory cluster model: slim, immutable records of what DNS needs, and nothing else.

Why: API objects are large and mutable; a cluster of 10,000 services and 100,000 endpoints
must fit in kube-dns's memory limit, and the record rules must be pure functions of data that
cannot change under them. So each object is copied at ingestion into a small frozen record
(CoreDNS does the same, ``plugin/kubernetes/object/``), and a change that does not alter the
slim record is not a change at all (no rebuild for a pod's resourceVersion bump).

The API is shaped for a watcher: ``apply`` (ADDED/MODIFIED), ``delete`` (DELETED) and
``replace_kind`` (a relist); each returns whether the model changed, and ``version`` /
``serial`` say when it last did.

What it must not do: keep raw API dicts, build DNS names, or know the image format.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

SERVICE, ENDPOINT_SLICE, ENDPOINTS, NAMESPACE, POD = (
    "Service", "EndpointSlice", "Endpoints", "Namespace", "Pod")
KINDS = (SERVICE, ENDPOINT_SLICE, ENDPOINTS, NAMESPACE, POD)

# EndpointSlice label naming the owning service (discovery.k8s.io/v1).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Pods in these phases have no IP that DNS should vouch for (CoreDNS object/pod.go).
DEAD_PHASES = frozenset({"Succeeded", "Failed", "Unknown"})


class ObjectError(ValueError):
    """One object cannot be understood; the message names it."""


@dataclass(frozen=True, slots=True)
class Port:
    name: str          # "" for an unnamed port
    protocol: str      # upper case as in the API: TCP, UDP, SCTP
    port: int


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str                      # ClusterIP, NodePort, LoadBalancer, ExternalName
    cluster_ips: tuple[str, ...]   # canonical text; () for headless and ExternalName
    headless: bool
    external_name: str             # "" unless type ExternalName
    ports: tuple[Port, ...]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready endpoint: its addresses and the names it may be known by."""
    addresses: tuple[str, ...]
    hostname: str                  # "" when unset
    pod_name: str                  # targetRef.name of a Pod, "" otherwise


class EndpointSet:
    """Ready endpoints sharing one port list: an EndpointSlice, or one v1 Endpoints subset.

    Immutable. The endpoints are kept flat, (address or addresses, hostname, pod name) per
    endpoint in one tuple, and ``endpoints`` makes the ``Endpoint`` objects when asked: at
    100,000 endpoints an object and a one-address tuple each cost ~10 MiB the model keeps
    for as long as kdns runs, while only a compile reads them, a service at a time."""
    __slots__ = ("namespace", "service", "ports", "_flat")

    def __init__(self, namespace: str, service: str, ports: tuple[Port, ...],
                 endpoints: tuple[Endpoint, ...]):
        flat = []
        for ep in endpoints:
            a = ep.addresses
            flat += (a[0] if len(a) == 1 else a, ep.hostname, ep.pod_name)
        set_ = object.__setattr__
        set_(self, "namespace", namespace)
        set_(self, "service", service)
        set_(self, "ports", ports)
        set_(self, "_flat", tuple(flat))

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        f = self._flat
        return tuple(Endpoint(f[i] if type(f[i]) is tuple else (f[i],), f[i + 1], f[i + 2])
                     for i in range(0, len(f), 3))

    def __setattr__(self, name, value):
        raise AttributeError(f"EndpointSet is immutable: cannot set {name}")

    def __delattr__(self, name):
        raise AttributeError(f"EndpointSet is immutable: cannot delete {name}")

    def _key(self) -> tuple:
        return (self.namespace, self.service, self.ports, self._flat)

    def __eq__(self, other):
        if type(other) is not EndpointSet:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"EndpointSet(namespace={self.namespace!r}, service={self.service!r}, "
                f"ports={self.ports!r}, endpoints={self.endpoints!r})")


@dataclass(frozen=True, slots=True)
class Pod:
    # What autopath's client table and ``pods verified`` need of a pod, no more: the model
    # holds one per live pod (150,000 in a large cluster), under its (namespace, name) key.
    namespace: str                 # interned: shared by the namespace's pods
    ip: str                        # primary status.podIP, canonical text


# --------------------------------------------------------------------------- slimming


def _meta(obj: dict, kind: str) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ObjectError(f"{kind} without metadata.name")
    ns = meta.get("namespace", "") if kind != NAMESPACE else ""
    if not isinstance(ns, str):
        raise ObjectError(f"{kind} {meta['name']} has a non-string namespace")
    if kind != NAMESPACE and not ns:
        ns = "default"             # kubectl omits it only for the default namespace
    # One string per namespace, not one per object the JSON decoder made (20,000 objects
    # in 50 namespaces are 20,000 copies otherwise, held as long as the objects).
    return sys.intern(ns), meta["name"]


def canonical_ip(text) -> str:
    """Canonical text of an IP (K ``net.ParseIP().String()``), ValueError if it is none."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP address")
    if ":" not in text:
        # The C conversions are ~10x faster than ipaddress and agree with it on IPv4
        # (both refuse leading zeros and short forms); 100,000 endpoints make it matter.
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text.strip()))
        except OSError:
            raise ValueError(f"{text!r} is not an IP address") from None
    return str(ipaddress.ip_address(text.strip()))


def _dict(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ObjectError(f"{what} is not a mapping")
    return value


def _list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError(f"{what} is not a list")
    return value


def _skip(obj: str, path: str, problem: str) -> None:
    """One bad part of an object is skipped, the rest kept: say which, where, and why."""
    log.warning("%s: %s: %s; skipping it, keeping the rest of the object", obj, path, problem)


def _ports(raw, obj: str, path: str) -> tuple[Port, ...]:
    """The valid ports of ``raw`` (the list at ``path`` in ``obj``); an invalid one is skipped
    with a warning naming its field, so one bad port costs that port's SRV records only."""
    out = []
    for i, p in enumerate(_list(raw, f"{obj} {path}")):
        p = _dict(p, f"{obj} {path}[{i}]")
        port = p.get("port")
        if port is None:
            continue               # EndpointSlice: nil port means "all ports" - no SRV
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            _skip(obj, f"{path}[{i}].port", f"{port!r} is not a valid port")
            continue
        out.append(Port(str(p.get("name") or ""), str(p.get("protocol") or "TCP").upper(), port))
    return _shared_ports(tuple(out))


# Port lists repeat across a cluster (every web service's [http/TCP/80]): each distinct one
# is kept once and shared by every object that has it, instead of a tuple, its Port objects
# and their strings per Service and per EndpointSlice (~4 MiB at 10,000 of each). Bounded,
# so a cluster of unique port lists costs what it did without sharing.
_PORTS: dict[tuple, tuple] = {}
_PORTS_MAX = 4096


def _shared_ports(ports: tuple) -> tuple:
    if not ports:
        return ()
    got = _PORTS.get(ports)
    if got is not None:
        return got
    if len(_PORTS) < _PORTS_MAX:
        _PORTS[ports] = ports
    return ports


def slim_service(obj: dict) -> Service:
    ns, name = _meta(obj, SERVICE)
    name = sys.intern(name)        # the same string as its EndpointSlices' service label
    spec = _dict(obj.get("spec"), f"Service {ns}/{name} spec")
    stype = spec.get("type") or "ClusterIP"
    ports = _ports(spec.get("ports"), f"Service {ns}/{name}", "spec.ports")
    if stype == "ExternalName":
        ext = spec.get("externalName")
        if not isinstance(ext, str) or not ext:
            raise ObjectError(f"Service {ns}/{name} is ExternalName without spec.externalName")
        return Service(ns, name, stype, (), False, ext, ports)
    # spec.clusterIPs wins when set; older objects have only spec.clusterIP (dns-rules §1.2).
    raw_ips = _list(spec.get("clusterIPs"), f"Service {ns}/{name} clusterIPs") \
        or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if raw_ips and raw_ips[0] == "None":
        return Service(ns, name, stype, (), True, "", ports)
    try:
        ips = tuple(dict.fromkeys(canonical_ip(ip) for ip in raw_ips))
    except ValueError as e:
        raise ObjectError(f"Service {ns}/{name}: {e}") from None
    return Service(ns, name, stype, ips, False, "", ports)


def _endpoint(raw: dict, what: str, addresses, paths) -> Endpoint | None:
    """One endpoint with its valid addresses (``paths[i]`` names address ``i`` in the
    object); an invalid address is skipped with a warning, so one bad address costs that
    address only. None when no address is valid."""
    ref = _dict(raw.get("targetRef"), f"{what} targetRef")
    pod = ref.get("name") if ref.get("kind", "Pod") == "Pod" else ""
    hostname = raw.get("hostname") or ""
    if not isinstance(hostname, str) or not isinstance(pod or "", str):
        raise ObjectError(f"{what}: hostname or targetRef.name is not a string")
    ips = []
    for a, path in zip(addresses, paths):
        try:
            ips.append(canonical_ip(a))
        except ValueError as e:
            _skip(what, path, str(e))
    return Endpoint(tuple(ips), hostname, pod or "") if ips else None


def slim_endpoint_slice(obj: dict) -> EndpointSet:
    ns, name = _meta(obj, ENDPOINT_SLICE)
    what = f"EndpointSlice {ns}/{name}"
    labels = _dict(_dict(obj.get("metadata"), what).get("labels"), f"{what} labels")
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise ObjectError(f"{what} has no {SERVICE_NAME_LABEL} label")
    eps = []
    for i, raw in enumerate(_list(obj.get("endpoints"), f"{what} endpoints")):
        raw = _dict(raw, f"{what} endpoint")
        # Ready nil counts as ready (CoreDNS object/endpoint.go endpointsliceReady, dns-rules §1.13).
        if _dict(raw.get("conditions"), f"{what} conditions").get("ready") is False:
            continue
        addrs = _list(raw.get("addresses"), f"{what} addresses")
        ep = _endpoint(raw, what, addrs, [f"endpoints[{i}].addresses[{j}]"
                                          for j in range(len(addrs))]) if addrs else None
        if ep is not None:
            eps.append(ep)
    return EndpointSet(ns, sys.intern(service), _ports(obj.get("ports"), what, "ports"),
                       tuple(eps))


def slim_endpoints(obj: dict) -> tuple[EndpointSet, ...]:
    """v1 Endpoints: one EndpointSet per subset; notReadyAddresses are ignored (dns-rules §1.13)."""
    ns, name = _meta(obj, ENDPOINTS)
    what = f"Endpoints {ns}/{name}"
    out = []
    for i, sub in enumerate(_list(obj.get("subsets"), f"{what} subsets")):
        sub = _dict(sub, f"{what} subset")
        eps = tuple(ep for j, a in enumerate(_list(sub.get("addresses"), f"{what} addresses"))
                    if (ep := _endpoint(_dict(a, what), what, [_dict(a, what).get("ip")],
                                        [f"subsets[{i}].addresses[{j}].ip"])) is not None)
        if eps:
            out.append(EndpointSet(ns, name, _ports(sub.get("ports"), what,
                                                    f"subsets[{i}].ports"), eps))
    return tuple(out)


def slim_pod(obj: dict) -> Pod | None:
    """The pod if DNS may vouch for its IP, else None (deleted, finished or no IP yet)."""
    ns, name = _meta(obj, POD)
    meta = _dict(obj.get("metadata"), f"Pod {ns}/{name} metadata")
    status = _dict(obj.get("status"), f"Pod {ns}/{name} status")
    if meta.get("deletionTimestamp") or status.get("phase") in DEAD_PHASES:
        return None
    ip = status.get("podIP")
    if not ip:
        return None
    try:
        return Pod(ns, canonical_ip(ip))
    except ValueError as e:
        raise ObjectError(f"Pod {ns}/{name}: {e}") from None


_SLIMMERS = {SERVICE: slim_service, ENDPOINT_SLICE: slim_endpoint_slice,
             ENDPOINTS: slim_endpoints, NAMESPACE: lambda obj: _meta(obj, NAMESPACE)[1],
             POD: slim_pod}


# --------------------------------------------------------------------------- the model


class ClusterModel:
    """Slim records by kind, keyed by (namespace, name); Namespace keys have namespace ""."""

    __slots__ = ("_objs", "_slices_by_service", "version", "serial", "_clock")

    def __init__(self, *, clock=time.time):
        self._objs: dict[str, dict[tuple[str, str], object]] = {k: {} for k in KINDS}
        # (namespace, service) -> {slice name: EndpointSet}: all slices of a service merged.
        self._slices_by_service: dict[tuple[str, str], dict[str, EndpointSet]] = {}
        self.version = 0        # bumps on every change
        self.serial = 0         # SOA serial: Unix time of the last change, strictly increasing
        self._clock = clock

    # ---- ingestion
    def apply(self, obj: dict) -> bool:
        """Add or modify one object (watch ADDED/MODIFIED). Returns whether the model changed.

        An object that cannot be understood is skipped with one warning naming it: one bad
        object must never stop the zone.
        """
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in _SLIMMERS:
            log.warning("ignoring object of unknown kind %r", kind)
            return False
        try:
            ns, name = _meta(obj, kind)
            slim = _SLIMMERS[kind](obj)
        except ObjectError as e:
            log.warning("skipping %s", e)
            return False
        if slim is None or slim == ():
            return self.delete(kind, ns, name)
        return self._put(kind, (ns, name), slim)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Remove one object (watch DELETED). Returns whether the model changed."""
        key = ("" if kind == NAMESPACE else namespace, name)
        old = self._objs[kind].pop(key, None)
        if old is None:
            return False
        if kind == ENDPOINT_SLICE:
            self._unindex_slice(key, old)
        return self._changed()

    def replace_kind(self, kind: str, objs: Iterable[dict]) -> bool:
        """Replace every object of ``kind`` (a relist). Returns whether the model changed."""
        fresh = ClusterModel()
        for obj in objs:
            if isinstance(obj, dict) and obj.get("kind") is None:
                obj = {**obj, "kind": kind}      # typed API lists omit the items' kind
            if isinstance(obj, dict) and obj.get("kind") == kind:
                fresh.apply(obj)
        if fresh._objs[kind] == self._objs[kind]:
            return False
        self._objs[kind] = fresh._objs[kind]
        if kind == ENDPOINT_SLICE:
            self._slices_by_service = fresh._slices_by_service
        return self._changed()

    def _put(self, kind: str, key: tuple[str, str], slim) -> bool:
        table = self._objs[kind]
        old = table.get(key)
        if old == slim:
            return False
        table[key] = slim
        if kind == ENDPOINT_SLICE:
            if old is not None:
                self._unindex_slice(key, old)
            self._slices_by_service.setdefault((slim.namespace, slim.service), {})[key[1]] = slim
        return self._changed()

    def _unindex_slice(self, key, old: EndpointSet) -> None:
        svc_key = (old.namespace, old.service)
        group = self._slices_by_service.get(svc_key, {})
        group.pop(key[1], None)
        if not group:
            self._slices_by_service.pop(svc_key, None)

    def _changed(self) -> bool:
        self.version += 1
        # RFC 1982 serials only need to increase; Unix time (as CoreDNS) but never repeating.
        self.serial = max(self.serial + 1, int(self._clock()))
        return True

    # ---- queries used by the record rules
    def services(self) -> Iterator[Service]:
        return iter(self._objs[SERVICE].values())

    def service(self, namespace: str, name: str) -> Service | None:
        return self._objs[SERVICE].get((namespace, name))

    def endpoint_sets(self, namespace: str, service: str) -> tuple[EndpointSet, ...]:
        """Ready endpoints of a service: its EndpointSlices if it has any, else its v1
        Endpoints (a cluster that grants only kube-dns's RBAC has no slices; dns-rules §1.13:)."""
        slices = self._slices_by_service.get((namespace, service))
        if slices:
            return tuple(slices[k] for k in sorted(slices))
        return self._objs[ENDPOINTS].get((namespace, service), ())

    def slice_service(self, namespace: str, name: str) -> str | None:
        """The service an EndpointSlice belongs to (its service-name label), or None if no
        such slice: the incremental compiler's map from a changed slice to its service."""
        es = self._objs[ENDPOINT_SLICE].get((namespace, name))
        return None if es is None else es.service

    def namespaces(self) -> set[str]:
        """Namespaces known to exist: Namespace objects, and any namespace holding a service
        (a service cannot outlive its namespace; this keeps kube-dns RBAC clusters working)."""
        names = {name for _, name in self._objs[NAMESPACE]}
        names.update(ns for ns, _ in self._objs[SERVICE])
        return names

    def pods(self) -> Iterator[Pod]:
        return iter(self._objs[POD].values())

    def count(self, kind: str) -> int:
        return len(self._objs[kind])

    def keys(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every object of ``kind``: what a relist did not see is
        deleted by the controller without a second copy of the list."""
        return list(self._objs[kind])
