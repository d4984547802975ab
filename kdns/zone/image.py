"""The zone compiler: RRsets in, zone image bytes out.

Why: the packet path must answer with no allocation and no Python, so everything that can be
decided before a query arrives is decided here, once per zone change, and frozen into one flat,
position-independent byte string (offsets only, no pointers) that all workers map read-only.

What it must not do: know about Kubernetes (that is ``records.py``) or sockets.

The image's layout is defined in ``layout.py``. The compiled core (``_compile.pyx``, driven
by ``CoreCompiler``) is the compiler; the reference compiler (``oracle.py``) is its test
oracle and the fallback where the core is not (``KDNS_PURE=1``, the extension not built,
input it does not model exactly).
"""
from __future__ import annotations

import gc
import os
from typing import Iterable

from kdns.dns import rr as R
from kdns.dns.rr import ZONE_AUTH, ZONE_REVERSE, Zone  # noqa: F401  (callers' zone kinds)
from kdns.dns.wire import SERVFAIL as RCODE_SERVFAIL
from kdns.zone.encode import CompileError, Encoder, pod_list  # noqa: F401  (callers' names)
from kdns.zone.layout import (FLAG_SYNCED, HEADER, MAGIC, NODE, NODE_POD_VERIFIED,
                              NODE_ZONE_APEX, REV, ZONE)
from kdns.zone.oracle import ReferenceCompiler


def compile_image(rrsets: Iterable[R.RRset], zones: Iterable[Zone], *,
                  exists: Iterable[str] = (), synced: bool = True, serial: int = 0,
                  consume: bool = False) -> bytes:
    """RRsets -> image bytes. Identical input gives identical bytes.

    ``consume=True`` with a list of RRsets: the compiled core empties the list once every
    answer is encoded, so that (when the caller holds no other reference) the RRsets' memory
    is free before the image is assembled: the first build's peak sets the memory limit a
    pod needs."""
    # The compiler makes ~10 container objects per name and frees none until it returns;
    # the cyclic GC would rescan them all again and again (a third of the time at 250,000
    # names) and can find nothing to free, so it is paused for the duration.
    paused = gc.isenabled()
    gc.disable()
    try:
        zones = list(zones)
        core = _compiled_core()
        if core is not None:
            # Materialised once: the reference compiler may have to run on the same input.
            rrsets = rrsets if isinstance(rrsets, (list, tuple)) else list(rrsets)
            exists = exists if isinstance(exists, (list, tuple)) else list(exists)
            try:
                return CoreCompiler(zones, synced, serial, core, consume).build(rrsets, exists)
            except CoreUnsupported:
                pass          # input the core does not model exactly: the reference decides
        return ReferenceCompiler(zones, synced, serial).build(rrsets, exists)
    finally:
        if paused:
            gc.enable()


def _compiled_core():
    """``kdns.zone._compile.ZoneCore`` unless the extension is missing, ``KDNS_PURE=1``, or
    ``KDNS_PURE_COMPILE=1`` (the reference compiler with the compiled packet path: an
    escape hatch, and the "before" of bench/bench_scale.py's memory figures)."""
    if os.environ.get("KDNS_PURE") == "1" or os.environ.get("KDNS_PURE_COMPILE") == "1":
        return None
    try:
        from kdns.zone._compile import ZoneCore
    except ImportError:
        return None
    return ZoneCore


class CoreUnsupported(Exception):
    """Raised by the compiled core for input it does not model exactly."""


class CoreCompiler(Encoder):
    """The compile, its hot phases in ``ZoneCore`` (kdns/zone/_compile.pyx): names, trie,
    every answer of rr.py's rdata classes (CNAME chains too), reverse table and assembly.
    This class keeps the rest: the zone table, negative and SERVFAIL blobs, and rdata of
    other classes, through ``Encoder``'s methods, which see the core's names through
    ``rrsets_of`` and ``name_exists``. Same bytes as ``ReferenceCompiler`` (tests hold it)."""

    def __init__(self, zones, synced, serial, core_type, consume: bool = False, core=None):
        super().__init__(zones, synced, serial)
        self.consume = consume
        if core is None:
            core = self.new_core(core_type, self.zones)
        else:
            core.begin()        # a persistent core (kdns/serve/incremental.py) starts a compile
        self.core = core

    @classmethod
    def new_core(cls, core_type, zones, persistent: bool = False):
        """A ``ZoneCore`` for ``zones``; a ``persistent`` one keeps encoded answers
        (``ZoneCore.apply``) across compiles: the names given answers there are compiled
        without RRsets, with the same bytes as if their RRsets were given (the incremental
        compiler, kdns/serve/incremental.py)."""
        _, zone_labels, zone_reverse = cls.zone_tables(zones)
        return core_type(zone_labels, zone_reverse, error=CompileError,
                         unsupported=CoreUnsupported, name_labels=R.name_labels,
                         packed_fallback=cls.packed, type_names=R.TYPE_NAMES,
                         rdata_classes=(R.Srv, R.Target, R.Txt, R.Soa),
                         persistent=persistent)

    def intern(self, blob: bytes) -> int:
        return self.core.intern(bytes(blob))

    def rrsets_of(self, labels: tuple) -> tuple | None:
        return self.core.rrsets_of(labels)

    def name_exists(self, labels: tuple) -> bool:
        return self.core.name_exists(labels)

    def build(self, rrsets, exists, into=None):
        """The image bytes; with ``into`` (size -> a writable buffer of that size, such as
        ``publish.ImageMemfd``, or None for bytes), the image is written into it, which is
        returned."""
        core = self.core
        core.add(rrsets, exists)
        pod_info = {}
        for z, apex in zip(self.zones, self.zone_labels):
            if z.pods != "disabled":
                for ns, ips in z.pod_namespaces.items():
                    pod_info[(ns.encode().lower(), b"pod") + apex] = (z.pods, ips)
        for apex in self.zone_labels:
            core.mark(apex, True, True)
        for labels in pod_info:
            core.mark(labels, True, True)
        nnodes = core.grow()

        self.zone_negs = [self.negative_blob(zi) for zi in range(len(self.zones))]
        servfail = self.blob(RCODE_SERVFAIL, [], prebuilt=(b"", [0, 0, 0], [(0, 0, 0, 0)], []))

        pod_lists = bytearray()
        apex_nodes, verified_nodes = {}, []

        def special(labels, flags, idx):
            flags, extra = self.special_node(labels, flags, pod_info, pod_lists)
            if flags & NODE_ZONE_APEX:
                apex_nodes[labels] = idx
            if flags & NODE_POD_VERIFIED:
                verified_nodes.append(idx)
            return flags, extra

        chain = self._chain_entries
        core.encode_nodes(chain, self.generic_blob, special)
        nrev = core.encode_reverse(chain, self.generic_blob)
        # Every answer is encoded: from here on nothing can send the input back to the
        # reference compiler, so the RRsets may go before the image is assembled.
        core.drop_rrsets()
        if self.consume and isinstance(rrsets, list):
            rrsets.clear()
        nnodes, nrev, rr_bytes, labels_len, pool_len = core.sizes()

        nodes_off = HEADER.size
        zones_off = nodes_off + NODE.size * nnodes
        rev_off = zones_off + ZONE.size * len(self.zones)
        rrtab_off = rev_off + REV.size * nrev
        labels_off = rrtab_off + rr_bytes
        pods_off = labels_off + labels_len
        pods_off += -pods_off % 4
        blobs_off = pods_off + len(pod_lists)
        total = blobs_off + pool_len
        zone_table = bytearray(ZONE.size * len(self.zones))
        for zi, (z, apex) in enumerate(zip(self.zones, self.zone_labels)):
            apex_node = apex_nodes.get(apex, 0) if z.kind == ZONE_AUTH else 0
            ZONE.pack_into(zone_table, ZONE.size * zi, apex_node, self.zone_negs[zi] + blobs_off,
                           z.ttl, R.wire_length(apex), z.kind)

        def header(crc: int) -> bytes:
            return HEADER.pack(MAGIC, total, FLAG_SYNCED if self.synced else 0,
                               nodes_off, nnodes, zones_off, len(self.zones), rev_off,
                               nrev, servfail + blobs_off, 0, self.serial, crc, 0)

        args = (bytes(zone_table), bytes(pod_lists), verified_nodes, labels_off, rrtab_off,
                pods_off, blobs_off, total, header)
        out = None if into is None else into(total)
        if out is None:
            return core.assemble(*args)
        try:
            core.assemble(*args, out=out.map)
        except BaseException:
            out.close()
            raise
        return out

    def _chain_entries(self, labels: tuple) -> list:
        return self.chain_entries(labels, self.core.rrsets_of(labels))

    def export(self, rrsets, groups: list) -> list:
        """Encode ``rrsets`` (no zone apex data, no CNAME) and return their answers as
        ``ZoneCore.apply`` records, one bytes per name in ``groups``: each name with
        data goes to its nearest ancestor-or-self in ``groups``. The blobs are the ones a
        full compile makes for the same names, so an image assembled from them is the
        same bytes, as long as each group's answers depend only on its own names (a
        Kubernetes service's names do: its SRV glue points inside it)."""
        core = self.core
        core.add(rrsets, ())
        core.grow()

        def special(labels, flags, idx):
            raise CompileError("export: zone apexes are not exported")

        core.encode_nodes(self._chain_entries, self.generic_blob, special)
        core.encode_reverse(self._chain_entries, self.generic_blob)
        return core.export(groups)
