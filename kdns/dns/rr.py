"""DNS value types shared by the record rules and the zone compiler.

Why this module exists: the record rules (``records.py``) speak in RRsets and the compiler
(``image.py``) turns RRsets into wire bytes. This is the vocabulary between them: immutable
value objects with ``__slots__``, names as absolute lower-case text, and the wire encoder with
name compression. It knows nothing of Kubernetes, sockets or the image layout.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from kdns import settings
from kdns.dns.wire import (CLASS_IN, MAX_LABEL, MAX_NAME, MAX_POINTER, T_A as A,  # noqa: F401
                           T_AAAA as AAAA, T_ANY as ANY, T_AXFR as AXFR, T_CNAME as CNAME,
                           T_IXFR as IXFR, T_MX as MX, T_NS as NS, T_OPT as OPT, T_PTR as PTR,
                           T_SOA as SOA, T_SRV as SRV, T_TXT as TXT)


TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", MX: "MX", TXT: "TXT",
              AAAA: "AAAA", SRV: "SRV", OPT: "OPT", IXFR: "IXFR", AXFR: "AXFR", ANY: "ANY"}



class NameError_(ValueError):
    """A name that cannot be put on the wire (label or name too long, empty label)."""


def name_labels(name: str) -> tuple[bytes, ...]:
    """Absolute text name -> tuple of lower-cased labels, root excluded.

    Raises NameError_ naming the problem, so an object with a bad name can be skipped with a
    clear warning instead of corrupting the zone.
    """
    text = name.rstrip(".")
    if not text:
        return ()
    labels = tuple(label.encode("ascii").lower() for label in text.split("."))
    for label in labels:
        if not label:
            raise NameError_(f"empty label in {name!r}")
        if len(label) > MAX_LABEL:
            raise NameError_(f"label longer than {MAX_LABEL} bytes in {name!r}")
    if wire_length(labels) > MAX_NAME:
        raise NameError_(f"name longer than {MAX_NAME} bytes on the wire: {name!r}")
    return labels


def wire_length(labels: tuple[bytes, ...]) -> int:
    return sum(len(label) + 1 for label in labels) + 1


def canonical(name: str) -> str:
    """Lower-cased absolute text form with the trailing dot."""
    labels = name_labels(name)
    return ".".join(label.decode() for label in labels) + "."


def is_subdomain(labels: tuple[bytes, ...], apex: tuple[bytes, ...]) -> bool:
    return len(labels) >= len(apex) and labels[len(labels) - len(apex):] == apex


class Wire:
    """Appends wire-format data whose absolute message offset starts at ``base``.

    Remembers where each name suffix was written so later names compress against it
    (RFC 1035 §4.1.4). Only offsets below 0x4000 can be pointed at.
    """

    __slots__ = ("buf", "base", "names")

    def __init__(self, base: int = 0):
        self.buf = bytearray()
        self.base = base
        self.names: dict[tuple[bytes, ...], int] = {}

    def seed(self, labels: tuple[bytes, ...], offset: int) -> None:
        """Record that ``labels`` already stand in the message at ``offset``."""
        for i in range(len(labels)):
            if offset <= MAX_POINTER:
                self.names.setdefault(labels[i:], offset)
            offset += len(labels[i]) + 1

    def name(self, labels: tuple[bytes, ...], compress: bool = True,
             remember: bool = True) -> None:
        """``remember=False``: no later name points into this one (an SRV target, whose
        record may move when answers rotate)."""
        for i in range(len(labels)):
            suffix = labels[i:]
            if compress and suffix in self.names:
                self.buf += struct.pack("!H", 0xC000 | self.names[suffix])
                return
            pos = self.base + len(self.buf)
            if remember and pos <= MAX_POINTER:
                self.names.setdefault(suffix, pos)
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)

    def rr(self, owner_ptr: int | None, owner: tuple[bytes, ...], rtype: int, ttl: int,
           rdata) -> None:
        """One resource record; ``owner_ptr`` is a known pointer offset for the owner."""
        if owner_ptr is not None:
            self.buf += struct.pack("!H", 0xC000 | owner_ptr)
        else:
            self.name(owner)
        self.buf += struct.pack("!HHI", rtype, CLASS_IN, ttl)
        len_at = len(self.buf)
        self.buf += b"\0\0"
        rdata.write(self)
        struct.pack_into("!H", self.buf, len_at, len(self.buf) - len_at - 2)


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A or AAAA rdata; ``address`` is the canonical text form."""
    address: str

    @property
    def rtype(self) -> int:
        return AAAA if ":" in self.address else A

    def write(self, w: Wire) -> None:
        w.buf += ipaddress.ip_address(self.address).packed


@dataclass(frozen=True, slots=True, order=True)
class Target:
    """CNAME, PTR and NS rdata: one compressible domain name (RFC 1035 §3.3)."""
    target: str

    def write(self, w: Wire) -> None:
        w.name(name_labels(self.target))


@dataclass(frozen=True, slots=True, order=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str

    def write(self, w: Wire) -> None:
        w.buf += struct.pack("!HHH", self.priority, self.weight, self.port)
        # RFC 2782: "name compression is not to be used for this field". Nor is it a
        # pointer's target: SRV records rotate (layout.py), and a pointer into one would
        # then point at another record's bytes.
        w.name(name_labels(self.target), compress=False, remember=False)


@dataclass(frozen=True, slots=True, order=True)
class Txt:
    strings: tuple[str, ...]

    def write(self, w: Wire) -> None:
        for s in self.strings:
            data = s.encode()
            if len(data) > 255:
                raise ValueError("TXT character-string longer than 255 bytes")
            w.buf.append(len(data))
            w.buf += data


@dataclass(frozen=True, slots=True, order=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int

    def write(self, w: Wire) -> None:
        w.name(name_labels(self.mname))
        w.name(name_labels(self.rname))
        w.buf += struct.pack("!IIIII", self.serial & 0xFFFFFFFF, self.refresh, self.retry,
                             self.expire, self.minimum)


@dataclass(frozen=True, slots=True)
class RRset:
    """All records of one (name, type): the unit the compiler encodes and truncates by."""
    name: str            # absolute, lower case, trailing dot
    rtype: int
    ttl: int
    rdatas: tuple

    def __post_init__(self):
        if not self.rdatas:
            raise ValueError(f"empty RRset {self.name} {self.rtype}")
        if not 0 <= self.ttl <= 0x7FFFFFFF:  # RFC 2181 §8
            raise ValueError(f"TTL out of range in {self.name}")


# A zone kdns answers for: what the record rules hand the zone compiler with the RRsets.
ZONE_AUTH = 0
ZONE_REVERSE = 1
# Zones of custom records (CoreDNS ``hosts``): only the names that have addresses are
# answered; every other name of the zone is passed on (ZONE_HOSTS: ``fallthrough``, to the
# forwarder) or answered SERVFAIL (ZONE_HOSTS_FINAL: CoreDNS's answer, having no SOA to
# deny a name with). A name with addresses answers any other type NOERROR without records.
ZONE_HOSTS = 2
ZONE_HOSTS_FINAL = 3
# The zone of a ``rewrite name`` alias outside every other zone: the alias answers its
# target's records; a type it lacks, and every other name of the zone, are handed to the
# forwarder, where the worker's rules ask the target (whose NODATA carries its zone's SOA,
# which the alias's own entry could not point at).
ZONE_ALIAS = 4


@dataclass(frozen=True)
class Zone:
    """A zone kdns answers for.

    ``pods``: 'disabled', 'insecure' or 'verified' (only for an authoritative zone);
    ``pod_namespaces`` maps each namespace to None (any IP, insecure) or the set of pod IPs
    that exist in it (verified). The zone's SOA RRset must be among the compiled RRsets.
    """
    apex: str
    kind: int = ZONE_AUTH
    ttl: int = settings.TTL
    pods: str = "disabled"
    pod_namespaces: dict = field(default_factory=dict)
