"""The incremental compiler: after a change, re-run the rules and re-encode only the services
it touched, and assemble the image from everything else's answers encoded earlier.

Why (issue 4): at 10,000 services and 100,000 endpoints a full compile (every rule, every
answer) takes about a second, so under a churn of 100 endpoint changes per second DNS
programming latency sat at 2-3 s; the goal is a 99th percentile under 250 ms. Most of that
second is spent re-deriving and re-encoding answers that did not change.

How: the zone is the union of independent parts (``records.service_records``): each service
owns the names under ``<svc>.<ns>.svc.<zone>`` and nothing else, and its SRV glue points only
at its own names; only PTRs merge across services, by IP. So this keeps, per service, its
answers as encoded records (``ZoneCore.export``), and per IP its PTR answer; a change re-runs
the rules for the services it touched, re-encodes their names and the PTRs of the IPs they
gained or lost, and swaps those records in a persistent ``ZoneCore`` (``apply``), which
keeps every name and every distinct answer blob between compiles. A compile then only lays
out the trie and the tables and copies the blobs: trie, tables and blob pool come out
exactly as a full compile lays them out, so the image is the same bytes as
``records.compile_model`` on the same model (the tests hold the two equal through random
churn). Names and blobs nothing uses any more are garbage in the core; past a bound, a
fresh core is loaded from the saved records.

What stays outside the records, recomputed every time (all small): the zone frame (SOA with
the model's serial, NS and its address, dns-version, namespaces, pod namespaces), and the
services whose answers follow a CNAME (ExternalName) together with the services such a CNAME
points into, compiled from their RRsets. Anything the records cannot express (a CNAME into
a reverse zone, input the compiled core does not model) makes this one compile a full one;
an unexpected error also drops the saved state, so the next compile starts over from the
model. Correctness never depends on the incremental path: it only saves work.

What it must not do: decide a DNS rule (``records.py``) or the image layout (``image.py``).
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

from . import image as I
from . import records
from . import rr as R
from .cluster import ClusterModel

log = logging.getLogger("kdns.incremental")


@dataclass(slots=True)
class _Service:
    """What the last compile derived from one service."""
    fqdn: str
    ptrs: tuple                  # (ip, target) pairs it contributes to PTRs
    warnings: tuple
    enc: bytes = b""             # its names' answers as ``export`` records (in the core)
    raw: tuple | None = None     # its RRsets instead: a CNAME is, or points, into it


class IncrementalCompiler:
    """``controller.Compiler`` that re-encodes only the services a change touched."""

    def __init__(self, *, domain: str = "cluster.local", ttl: int = 30, pods: str = "insecure",
                 endpoint_pod_names: bool = False, ns_ips=None):
        if pods not in records.PODS_MODES:
            raise ValueError(f"pods must be one of {', '.join(records.PODS_MODES)}, not {pods!r}")
        self.zone = R.canonical(domain)
        self.svc_suffix = ".svc." + self.zone
        self.ttl, self.pods = ttl, pods
        self.endpoint_pod_names, self.ns_ips = endpoint_pod_names, ns_ips
        self.options = {"domain": domain, "ttl": ttl, "pods": pods,
                        "endpoint_pod_names": endpoint_pod_names, "ns_ips": ns_ips}
        # Statistics, for logs, metrics and tests.
        self.full_compiles = 0       # compiles that did not use the saved records
        self.last_dirty = 0          # services re-derived by the last compile
        self.last_encoded = 0        # RRsets encoded by the last compile
        self._reset()

    def _reset(self) -> None:
        self._services: dict[tuple[str, str], _Service] = {}
        self._slice_owner: dict[tuple[str, str], str] = {}
        self._ptr: dict[str, dict] = {}        # ip -> ordered set of PTR targets
        self._ptr_enc: dict[str, bytes] = {}   # ip -> its reverse name's record
        self._pinned: set = set()              # services compiled from RRsets (``_pins``)
        self._primed = False
        self._core = None                      # the persistent ZoneCore
        self._zones = (I.Zone(self.zone), *(I.Zone(rz, kind=I.ZONE_REVERSE)
                                            for rz in records.REVERSE_ZONES))

    # ------------------------------------------------------------------ entry point
    def compile(self, model: ClusterModel, *, synced: bool, changed: set) -> bytes:
        core = I._compiled_core()
        if core is None:                       # KDNS_PURE: the reference compiler only
            self.full_compiles += 1
            return records.compile_model(model, synced=synced, **self.options)
        paused = gc.isenabled()
        gc.disable()       # as compile_image: many new objects, no garbage cycles among them
        try:
            try:
                self._update(model, changed, core)
            except Exception:
                # A bug here must not cost a wrong answer: forget everything saved (the next
                # compile derives it again from the model) and compile this one in full.
                log.exception("incremental compile failed; compiling in full")
                self._reset()
                self.full_compiles += 1
                return records.compile_model(model, synced=synced, **self.options)
            try:
                return self._assemble(model, synced, core)
            except (I._CoreUnsupported, I.CompileError) as e:
                # Input the records cannot express (a CNAME into a reverse name's saved
                # answer) or that the core leaves to the reference compiler: the full path
                # decides, with the same rules; the saved records stay valid (the next
                # compile's ``begin`` forgets this one's half-done tables).
                log.debug("compiling in full: %s", e)
                self.full_compiles += 1
                return records.compile_model(model, synced=synced, **self.options)
            except Exception:
                log.exception("incremental compile failed; compiling in full")
                self._reset()
                self.full_compiles += 1
                return records.compile_model(model, synced=synced, **self.options)
        finally:
            if paused:
                gc.enable()

    # ------------------------------------------------------------------ the saved state
    def _dirty(self, model: ClusterModel, changed: set) -> set:
        """Services whose records a change may have altered."""
        if not self._primed:
            self._primed = True
            for ns, name in model.keys("EndpointSlice"):
                owner = model.slice_service(ns, name)
                if owner is not None:
                    self._slice_owner[(ns, name)] = owner
            return set(model.keys("Service"))
        dirty = set()
        for kind, ns, name in changed:
            if kind in ("Service", "Endpoints"):
                dirty.add((ns, name))
            elif kind == "EndpointSlice":
                # A slice counts for the service it belonged to and the one it belongs to
                # now (its service-name label can change, or it can go).
                old = self._slice_owner.pop((ns, name), None)
                if old is not None:
                    dirty.add((ns, old))
                new = model.slice_service(ns, name)
                if new is not None:
                    self._slice_owner[(ns, name)] = new
                    dirty.add((ns, new))
            # Namespaces and Pods only change the frame, which is rebuilt every time.
        return dirty

    def _pins(self, model: ClusterModel) -> set:
        """Services some ExternalName's CNAME points into: the compile follows the chain
        through their RRsets, so they are compiled from RRsets, not from saved answers. A
        superset is harmless (it only costs their rules each compile)."""
        pinned = set()
        for svc in model.services():
            if svc.type == "ExternalName":
                target = svc.external_name.rstrip(".").lower() + "."
                if target.endswith(self.svc_suffix):
                    parts = target[:-len(self.svc_suffix)].split(".")
                    if len(parts) >= 2:
                        pinned.add((parts[-1], parts[-2]))
        return pinned

    def _update(self, model: ClusterModel, changed: set, core_type) -> None:
        dirty = self._dirty(model, changed)
        pinned = self._pins(model)
        dirty |= pinned ^ self._pinned
        self._pinned = pinned
        self.last_dirty = len(dirty)
        dirty_ips: set[str] = set()
        encode, groups, owners, gone = [], [], [], []
        for key in sorted(dirty):
            old = self._services.pop(key, None)
            if old is not None:
                for ip, target in old.ptrs:
                    targets = self._ptr[ip]
                    del targets[target]
                    if not targets:
                        del self._ptr[ip]
                    dirty_ips.add(ip)
                if old.enc:
                    gone.append(old.enc)
            svc = model.service(*key)
            if svc is None:
                continue
            rrsets, ptrs, warnings = records.service_records(
                model, svc, zone=self.zone, ttl=self.ttl,
                endpoint_pod_names=self.endpoint_pod_names)
            if warnings != (old.warnings if old is not None else ()):
                for w in warnings:
                    log.warning("%s", w)
            entry = _Service(f"{svc.name}.{svc.namespace}{self.svc_suffix}", ptrs, warnings)
            for ip, target in ptrs:
                self._ptr.setdefault(ip, {})[target] = None
                dirty_ips.add(ip)
            if key in pinned or any(s.rtype == R.CNAME for s in rrsets):
                entry.raw = tuple(rrsets)
            elif rrsets:
                encode += rrsets
                groups.append(entry.fqdn)
                owners.append(entry)
            self._services[key] = entry
        ips = []
        for ip in sorted(dirty_ips):
            old_enc = self._ptr_enc.pop(ip, None)
            if old_enc is not None:
                gone.append(old_enc)
            targets = self._ptr.get(ip)
            if targets:
                s = records.ptr_rrset(ip, targets if len(targets) > 1 else next(iter(targets)),
                                      self.ttl)
                encode.append(s)
                groups.append(s.name)
                ips.append(ip)
        self.last_encoded = len(encode)
        out = []
        if encode:
            try:
                out = I._CoreCompiler(list(self._zones), True, 0, core_type).export(encode, groups)
            except (I._CoreUnsupported, I.CompileError):
                # Input the core leaves to the reference compiler (every compile is then a
                # full one, until it changes): start over from the model next time.
                self._reset()
                raise
        for entry, enc in zip(owners, out):
            entry.enc = enc
        for ip, enc in zip(ips, out[len(owners):]):
            self._ptr_enc[ip] = enc
        if self._core is None:
            self._load(core_type)
        else:
            self._core.apply(b"".join(gone), b"".join(out))
            st = self._core.stats()
            # Garbage: names and blobs that nothing uses any more (churn brings new IPs, so
            # new names); past these bounds a fresh core costs less than carrying them.
            if st["dead_bytes"] > st["live_bytes"] // 2 + (8 << 20) or \
                    st["names"] > 2 * st["encoded_names"] + 100_000:
                log.debug("reloading the compile core: %s", st)
                self._load(core_type)

    def _load(self, core_type) -> None:
        """A fresh persistent core holding every saved record."""
        base = I._Compiler(list(self._zones), True, 0)
        core = I._CoreCompiler.new_core(core_type, base.zone_labels, base.zone_reverse,
                                        persistent=True)
        core.apply(b"", b"".join([e.enc for e in self._services.values() if e.enc]
                                 + list(self._ptr_enc.values())))
        self._core = core

    # ------------------------------------------------------------------ assembly
    def _assemble(self, model: ClusterModel, synced: bool, core_type) -> bytes:
        started = time.perf_counter()
        serial = model.serial
        frame, zones, exists = records.zone_frame(model, zone=self.zone, ttl=self.ttl,
                                                  pods=self.pods, serial=serial,
                                                  ns_ips=self.ns_ips)
        raw = list(frame)
        for entry in self._services.values():
            if entry.raw is not None:
                raw += entry.raw
        image = I._CoreCompiler(list(zones), synced, serial, core_type,
                                core=self._core).build(raw, exists)
        log.debug("assembled %d bytes in %.3fs (%d services re-derived, %d RRsets encoded)",
                  len(image), time.perf_counter() - started, self.last_dirty, self.last_encoded)
        return image
