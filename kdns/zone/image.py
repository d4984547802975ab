"""The zone compiler: RRsets in, zone image bytes out.

Why: the packet path must answer with no allocation and no Python, so everything that can be
decided before a query arrives is decided here, once per zone change, and frozen into one flat,
position-independent byte string (offsets only, no pointers) that all workers map read-only.

What it must not do: know about Kubernetes (that is ``records.py``) or sockets.

The image's layout is defined in ``layout.py``. The compiled core (``_compile.pyx``'s
``ZoneCore``, driven by ``CoreCompiler``) is the compiler. The reference compiler
(``oracle.py``) is its test oracle, and the compiler only where the core is not: the pure
mode (``KDNS_PURE=1``, ``KDNS_PURE_COMPILE=1``) or the extension not built.
"""
from __future__ import annotations

import gc
from typing import Iterable

from kdns import settings
from kdns.dns import rr as R
from kdns.dns.rr import (ZONE_ALIAS, ZONE_AUTH, ZONE_HOSTS, ZONE_HOSTS_FINAL, ZONE_REVERSE,  # noqa: F401
                         Zone)  # (callers' zone kinds)
from kdns.zone.encode import CompileError, Encoder, autopath_section, pod_list  # noqa: F401  (callers' names)
from kdns.zone.layout import MAGIC
from kdns.zone.oracle import ReferenceCompiler


def compile_image(rrsets: Iterable[R.RRset], zones: Iterable[Zone], *,
                  exists: Iterable[str] = (), synced: bool = True, serial: int = 0,
                  consume: bool = False, autopath: bytes = b"") -> bytes:
    """RRsets -> image bytes. Identical input gives identical bytes.

    ``consume=True`` with a list of RRsets: the compiled core empties the list once every
    answer is encoded, so that (when the caller holds no other reference) the RRsets' memory
    is free before the image is assembled: the first build's peak sets the memory limit a
    pod needs. ``autopath``: the autopath section (``encode.autopath_section``) or b""."""
    # The compiler makes ~10 container objects per name and frees none until it returns;
    # the cyclic GC would rescan them all again and again (a third of the time at 250,000
    # names) and can find nothing to free, so it is paused for the duration.
    paused = gc.isenabled()
    gc.disable()
    try:
        zones = list(zones)
        core = _compiled_core()
        if core is None:
            return ReferenceCompiler(zones, synced, serial).build(rrsets, exists, autopath)
        return CoreCompiler(zones, synced, serial, core, consume).build(rrsets, exists,
                                                                         autopath=autopath)
    finally:
        if paused:
            gc.enable()


def _compiled_core():
    """``kdns.zone._compile.ZoneCore``, or None for the reference compiler: in the pure mode
    (``KDNS_PURE=1``), with ``KDNS_PURE_COMPILE=1`` (the reference compiler with the
    compiled packet path: an escape hatch, and the "before" of bench/bench_scale.py's memory
    figures), or when the extension is not built."""
    if settings.ENV.pure or settings.ENV.pure_compile:
        return None
    try:
        from kdns.zone._compile import ZoneCore
    except ImportError:
        return None
    return ZoneCore


class CoreCompiler:
    """The compile, run by ``ZoneCore`` (kdns/zone/_compile.pyx) from plain data: this class
    only orders the zones and turns their pod namespaces into (labels, packed IPs). Same
    bytes as ``ReferenceCompiler`` (tests/test_compile_compiled.py holds it)."""

    def __init__(self, zones, synced, serial, core_type, consume: bool = False, core=None):
        self.zones, self.zone_labels, _ = Encoder.zone_tables(zones)
        self.synced = synced
        self.serial = serial
        self.consume = consume
        # A persistent core (kdns/serve/incremental.py) is given; its compile starts anew.
        self.core = self.new_core(core_type, self.zones) if core is None else core

    @classmethod
    def new_core(cls, core_type, zones, persistent: bool = False):
        """A ``ZoneCore`` for ``zones``; a ``persistent`` one keeps encoded answers
        (``ZoneCore.apply``) across compiles: the names given answers there are compiled
        without RRsets, with the same bytes as if their RRsets were given (the incremental
        compiler, kdns/serve/incremental.py)."""
        zones, zone_labels, _ = Encoder.zone_tables(zones)
        return core_type([(z.apex, apex, z.kind) for z, apex in zip(zones, zone_labels)],
                         error=CompileError, name_labels=R.name_labels,
                         packed_fallback=Encoder.packed, type_names=R.TYPE_NAMES,
                         rdata_classes=(R.Srv, R.Target, R.Txt, R.Soa, R.Address),
                         magic=MAGIC, persistent=persistent)

    def pods(self) -> list:
        """(labels, packed IPs or None) per pod namespace, once per namespace: a verified
        namespace's IPs as the image stores them (``pod_list``)."""
        info = {}
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns, ips in z.pod_namespaces.items():
                    packed = None
                    if z.pods == "verified":
                        packed = ips if isinstance(ips, bytes) else pod_list(ips or ())
                    info[(ns.encode().lower(), b"pod") + apex] = packed
        return list(info.items())

    def build(self, rrsets, exists, into=None, autopath: bytes = b""):
        """The image bytes; with ``into`` (size -> a writable buffer of that size, such as
        ``publish.ImageMemfd``, or None for bytes), the image is written into it, which is
        returned."""
        made = []

        def alloc(size):
            out = into(size)
            made.append(out)
            return None if out is None else out.map

        try:
            image = self.core.compile(rrsets, exists, [z.ttl for z in self.zones], self.pods(),
                                      self.synced, self.serial,
                                      None if into is None else alloc, self.consume,
                                      autopath)
        except BaseException:
            for out in made:
                if out is not None:
                    out.close()
            raise
        return made[0] if made and made[0] is not None else image

    def export(self, rrsets, groups: list) -> list:
        """Encode ``rrsets`` (no zone apex data, no CNAME) and return their answers as
        ``ZoneCore.apply`` records, one bytes per name in ``groups``: each name with
        data goes to its nearest ancestor-or-self in ``groups``. The blobs are the ones a
        full compile makes for the same names, so an image assembled from them is the
        same bytes, as long as each group's answers depend only on its own names (a
        Kubernetes service's names do: its SRV glue points inside it)."""
        return self.core.export(rrsets, groups)
