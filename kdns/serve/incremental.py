"""The incremental compiler: after a change, re-run the rules and re-encode only the services
it touched, and assemble the image from everything else's answers encoded earlier.

Why: at 10,000 services and 100,000 endpoints a full compile (every rule, every
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
``build.compile_model`` on the same model (the tests hold the two equal through random
churn). Names and blobs nothing uses any more are garbage in the core; past a bound, a
fresh core is loaded from the saved records.

What stays outside the records, recomputed every time (all small): the zone frame (SOA with
the model's serial, NS and its address, dns-version, namespaces, pod namespaces), and the
services whose answers follow a CNAME (ExternalName) together with the services such a CNAME
points into, compiled from their RRsets. Anything the records cannot express (a CNAME into
a reverse zone) or bad input makes this one compile a full one;
an unexpected error also drops the saved state, so the next compile starts over from the
model. Correctness never depends on the incremental path: it only saves work.

What it must not do: decide a DNS rule (``records.py``) or the image layout (``image.py``).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass

from kdns import settings
from kdns.zone import image as I
from kdns.serve import publish
from kdns.dns.names import reverse_name
from kdns.kube import records
from kdns.serve import build
from kdns.dns import rr as R
from kdns.kube.model import ClusterModel

log = logging.getLogger("kdns.serve.incremental")


# Services derived and exported together, then PTRs: a chunk's RRsets are garbage before
# the next chunk makes its own, so a first compile of 10,000 services never holds them all
# (memory peak), and what it keeps is not scattered over arenas full of freed RRsets.
CHUNK_SERVICES = 256
CHUNK_PTRS = 4096
MEMFD_MIN_BYTES = 1 << 20


@dataclass(slots=True, eq=False)     # compared and hashed by identity (``_ptr``'s sets)
class _Service:
    """What the last compile derived from one service (its answers live in the core)."""
    fqdn: str
    # ip, target, ip, target...: what it adds to PTRs, each target as ``_packed_target``
    # keeps it (the IPs are the model's own strings).
    ptrs: tuple
    warnings: tuple
    in_core: bool = False        # its answers are a group in the core, named ``fqdn``
    raw: tuple | None = None     # its RRsets instead: a CNAME is, or points, into it


def _packed_target(ip: str, target: str, fqdn: str):
    """A PTR target as a service's entry keeps it: None for the service's own name (a
    cluster IP), "" for the endpoint name the rules derive from the address alone
    (``<dashed ip>.<fqdn>``), else the name itself. 100,000 endpoints held their names
    (~90 bytes each, 9 MiB) for as long as kdns runs, while a compile needs only those of
    the addresses it re-derives (``_unpack_target``)."""
    if target == fqdn:
        return None
    if target == f"{records.dashed_ip(ip)}.{fqdn}":
        return ""
    return target


def _unpack_target(ip: str, packed, fqdn: str) -> str:
    if packed is None:
        return fqdn
    if packed == "":
        return f"{records.dashed_ip(ip)}.{fqdn}"
    return packed


class IncrementalCompiler:
    """``controller.Compiler`` that re-encodes only the services a change touched."""

    def __init__(self, *, domain: str = settings.DOMAIN, ttl: int = settings.TTL, pods: str = settings.PODS,
                 endpoint_pod_names: bool = False, ns_ips=None, into_memfd: bool = False,
                 hosts=None, rewrites=(), autopath=None, populate_spare: bool = False):
        """``into_memfd``: images of a MiB or more are compiled into a sealed memfd
        (``publish.ImageMemfd``) that the supervisor publishes without copying it.
        ``autopath``: None, or the server's search domains (``build.compile_model``)."""
        if pods not in records.PODS_MODES:
            raise ValueError(f"pods must be one of {', '.join(records.PODS_MODES)}, not {pods!r}")
        self.zone = R.canonical(domain)
        self.svc_suffix = ".svc." + self.zone
        self.ttl, self.pods = ttl, pods
        self.endpoint_pod_names, self.ns_ips = endpoint_pod_names, ns_ips
        self.into_memfd = into_memfd
        self._spare: publish.SpareMemfd | None = None  # the next image's memfd
        self._spare_lock = threading.Lock()
        self._spare_ready = threading.Condition(self._spare_lock)
        self._next_spare = 0
        self.options = {"domain": domain, "ttl": ttl, "pods": pods,
                        "endpoint_pod_names": endpoint_pod_names, "ns_ips": ns_ips,
                        "autopath": autopath}
        self.autopath = autopath
        self._autopath: bytes | None = None    # the last autopath section, while no pod changes
        # The Corefile's custom records (forward.hosts.HostsBox), read at every compile.
        # Their A/AAAA and PTR RRsets are compiled from RRsets each time (a few names); an
        # address of theirs keeps no cluster PTR group in the core (hosts answer first).
        self.hosts = hosts
        self._hosts_zones: tuple = ()
        # The Corefile's ``rewrite name`` rules: an exact rule's alias owns its target's
        # RRsets (build.with_rewrites), so a target service is compiled from RRsets (pinned)
        # and the aliases are added to every assembly.
        from kdns.forward.rewrite import compiled_aliases
        self.rewrites = tuple(rewrites)
        self._aliases = compiled_aliases(self.rewrites)
        # Statistics, for logs, metrics and tests.
        self.full_compiles = 0       # compiles that did not use the saved records
        self.last_dirty = 0          # services re-derived by the last compile
        self.last_encoded = 0        # RRsets encoded by the last compile
        self.core_reloads = 0        # times the core was rebuilt to shed its garbage
        self.rebased_bytes = 0       # store bytes the last ``_rebase`` gave back
        # The spare memfd's pages are allocated ahead only when asked: held between compiles
        # they are a second image the pod pays for (``publish.SpareMemfd``).
        self.populate_spare = populate_spare
        self._reset()

    def _reset(self) -> None:
        self._services: dict[tuple[str, str], _Service] = {}
        self._slice_owner: dict[tuple[str, str], str] = {}
        # ip -> the service entry claiming it, or an ordered set (dict) of them; each IP
        # here has its reverse name as a group in the core. The targets are in the
        # entries (``_ptr_targets``).
        self._ptr: dict[str, object] = {}
        self._pinned: set = set()              # services compiled from RRsets (``_pins``)
        self._pod_lists: dict | None = None    # verified: namespace -> packed pod IPs
        self._autopath = None
        self._ap_keys: dict = {}               # pod IP -> its key in the autopath section
        self._primed = False
        self._core = None                      # the persistent ZoneCore
        self._zones = (I.Zone(self.zone), *(I.Zone(rz, kind=I.ZONE_REVERSE)
                                            for rz in records.REVERSE_ZONES),
                       *self._hosts_zones)
        self._zones += build.alias_zones(self.rewrites, self._zones)
        self._hosts_ips: frozenset = frozenset()   # addresses whose PTR is the hosts' 

    # ------------------------------------------------------------------ entry point
    def compile(self, model: ClusterModel, *, synced: bool, changed: set) -> bytes:
        core = I._compiled_core()
        hosts = self.hosts.records if self.hosts is not None else None
        if core is None:                       # KDNS_PURE: the reference compiler only
            return self._full(model, synced, hosts=hosts)
        if hosts is not None:
            zones = tuple(hosts.zones(self.zone.rstrip(".")))
            if zones != self._hosts_zones:
                self._hosts_zones = zones
                self._reset()                  # the core's zones are fixed when it is made
            if any(n.endswith("." + self.zone) or n == self.zone for n in hosts.names()):
                # A custom name inside the cluster domain replaces a cluster name's answers,
                # which the saved service answers cannot express: the full compile decides,
                # and the saved state, which this change does not reach, starts over after.
                return self._full(model, synced, reset=True, hosts=hosts)
        elif self._hosts_zones:
            self._hosts_zones = ()
            self._reset()
        if any(self._inside(a) or any(self._inside(t, rz) for rz in records.REVERSE_ZONES)
               for a, (t, _) in self._aliases.items()):
            # An alias of a cluster name replaces that name's saved answers, and a reverse
            # target's RRsets are not kept: the full compile decides those.
            return self._full(model, synced, reset=True, hosts=hosts)
        paused = gc.isenabled()
        gc.disable()       # as compile_image: many new objects, no garbage cycles among them
        try:
            try:
                self._update(model, changed, core,
                             frozenset(hosts.ptr) if hosts is not None else frozenset())
            except Exception:
                # A bug here must not cost a wrong answer: forget everything saved (the next
                # compile derives it again from the model) and compile this one in full.
                log.exception("incremental compile failed; compiling in full")
                return self._full(model, synced, reset=True, hosts=hosts)
            try:
                return self._assemble(model, synced, core, changed, hosts)
            except I.CompileError as e:
                # Input the saved answers cannot express (a CNAME into a reverse name, whose
                # RRsets the core no longer holds) or bad input: the full path decides, with
                # the same rules. The saved state is whole (the core's next compile forgets
                # this one's half-done tables).
                log.debug("compiling in full: %s", e)
                return self._full(model, synced, hosts=hosts)
            except Exception:
                log.exception("incremental compile failed; compiling in full")
                return self._full(model, synced, reset=True, hosts=hosts)
        finally:
            if paused:
                gc.enable()

    def _inside(self, name: str, zone: str | None = None) -> bool:
        zone = self.zone if zone is None else R.canonical(zone)
        return name == zone or name.endswith("." + zone)

    def _full(self, model: ClusterModel, synced: bool, reset: bool = False,
              hosts=None) -> bytes:
        if reset:
            self._reset()
        self.full_compiles += 1
        return build.compile_model(model, synced=synced, hosts=hosts, rewrites=self.rewrites,
                                   **self.options)

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
        for target, _ in self._aliases.values():
            if target.endswith(self.svc_suffix):
                parts = target[:-len(self.svc_suffix)].split(".")
                if len(parts) >= 2:
                    pinned.add((parts[-1], parts[-2]))
        for svc in model.services():
            if svc.type == "ExternalName":
                target = svc.external_name.rstrip(".").lower() + "."
                if target.endswith(self.svc_suffix):
                    parts = target[:-len(self.svc_suffix)].split(".")
                    if len(parts) >= 2:
                        pinned.add((parts[-1], parts[-2]))
        return pinned

    def _update(self, model: ClusterModel, changed: set, core_type,
                hosts_ips: frozenset = frozenset()) -> None:
        dirty = self._dirty(model, changed)
        pinned = self._pins(model)
        dirty |= pinned ^ self._pinned
        self._pinned = pinned
        self.last_dirty = len(dirty)
        self.last_encoded = 0
        if self._core is None:
            self._core = self._new_core(core_type)
        ptr_before: dict[str, bool] = {}     # dirty IP -> had a PTR group in the core
        keys = sorted(dirty)
        for at in range(0, len(keys), CHUNK_SERVICES):
            self._services_chunk(model, keys[at:at + CHUNK_SERVICES], pinned, ptr_before,
                                 core_type)
        old_hosts = self._hosts_ips
        if hosts_ips != old_hosts:
            # An address that became, or stopped being, the hosts' gets its cluster PTR group
            # dropped or back (what _ptrs_chunk does for a dirty address).
            for ip in old_hosts ^ hosts_ips:
                ptr_before.setdefault(ip, ip in self._ptr)
        for ip in old_hosts:
            if ip in ptr_before:
                ptr_before[ip] = False          # it had no group: the hosts answered it
        self._hosts_ips = hosts_ips
        ips = sorted(ptr_before)
        for at in range(0, len(ips), CHUNK_PTRS):
            self._ptrs_chunk(ips[at:at + CHUNK_PTRS], ptr_before, core_type)
        st = self._core.stats()
        # Garbage: names and blobs that nothing uses any more (churn brings new IPs, so new
        # names); past these bounds a fresh core costs less than carrying them.
        if st["dead_bytes"] > st["live_bytes"] // 2 + (8 << 20) or \
                st["names"] > 2 * st["encoded_names"] + 100_000:
            log.debug("reloading the compile core: %s", st)
            fresh = self._new_core(core_type)
            fresh.apply((), self._core.dump())
            self._core = fresh
            self.core_reloads += 1

    def _services_chunk(self, model, keys, pinned, ptr_before, core_type) -> None:
        remove, encode, groups, owners = [], [], [], []
        for key in keys:
            old = self._services.pop(key, None)
            if old is not None:
                self._drop_ptrs(old, ptr_before)
                if old.in_core:
                    remove.append(old.fqdn)
            svc = model.service(*key)
            if svc is None:
                continue
            rrsets, ptrs, warnings = records.service_records(
                model, svc, zone=self.zone, ttl=self.ttl,
                endpoint_pod_names=self.endpoint_pod_names)
            if warnings != (old.warnings if old is not None else ()):
                for w in warnings:
                    log.warning("%s", w)
            fqdn = f"{svc.name}.{svc.namespace}{self.svc_suffix}"
            flat = tuple(x for ip, target in ptrs
                         for x in (ip, _packed_target(ip, target, fqdn)))
            entry = _Service(fqdn, flat, warnings)
            self._add_ptrs(entry, ptr_before)
            if key in pinned or any(s.rtype == R.CNAME for s in rrsets):
                entry.raw = tuple(rrsets)
            elif rrsets:
                encode += rrsets
                groups.append(entry.fqdn)
                owners.append(entry)
            self._services[key] = entry
        out = self._export(encode, groups, core_type)
        self._core.apply(remove, [(e.fqdn, recs) for e, recs in zip(owners, out) if recs])
        for e, recs in zip(owners, out):
            e.in_core = bool(recs)

    def _ptr_targets(self, ips) -> dict:
        """ip -> its PTR target, or an ordered set (dict) of them, for each of ``ips`` some
        service claims: each claiming entry is read once (a service of 5,000 endpoints is
        not scanned once per address)."""
        ptr = self._ptr
        owners: dict = {}
        for ip in ips:
            cur = ptr.get(ip)
            if cur is None:
                continue
            if type(cur) is dict:
                owners.update(cur)
            else:
                owners[cur] = None
        wanted = set(ips)
        out: dict = {}
        for e in owners:
            flat, fqdn = e.ptrs, e.fqdn
            for k in range(0, len(flat), 2):
                ip = flat[k]
                if ip in wanted:
                    records._add_to_set(out, ip, _unpack_target(ip, flat[k + 1], fqdn))
        return out

    def _ptrs_chunk(self, ips, ptr_before, core_type) -> None:
        remove, encode, groups = [], [], []
        found = self._ptr_targets(ips)
        for ip in ips:
            if ptr_before[ip]:
                remove.append(reverse_name(ip))
            targets = found.get(ip)
            if targets is not None and ip not in self._hosts_ips:
                s = records.ptr_rrset(ip, targets, self.ttl)
                encode.append(s)
                groups.append(s.name)
        out = self._export(encode, groups, core_type)
        self._core.apply(remove, list(zip(groups, out)))

    def _export(self, encode: list, groups: list, core_type) -> list:
        self.last_encoded += len(encode)
        if not encode:
            return [b""] * len(groups)
        # Bad input raises here; the caller forgets everything and compiles in full (every
        # compile, until that input changes), which reports it.
        return I.CoreCompiler(list(self._zones), True, 0, core_type).export(encode, groups)

    def _drop_ptrs(self, entry: _Service, ptr_before: dict) -> None:
        ptr = self._ptr
        for ip in dict.fromkeys(entry.ptrs[0::2]):     # an address may have two targets
            cur = ptr[ip]
            ptr_before.setdefault(ip, True)
            if type(cur) is dict:
                del cur[entry]
                if len(cur) == 1:
                    ptr[ip] = next(iter(cur))
            else:
                del ptr[ip]

    def _add_ptrs(self, entry: _Service, ptr_before: dict) -> None:
        ptr = self._ptr
        for ip in dict.fromkeys(entry.ptrs[0::2]):
            cur = ptr.get(ip)
            ptr_before.setdefault(ip, cur is not None)
            if cur is None:
                ptr[ip] = entry
            elif type(cur) is dict:
                cur[entry] = None
            else:
                ptr[ip] = {cur: None, entry: None}

    def _rebase(self, image: "publish.ImageMemfd") -> None:
        """The core reads its blobs from this sealed image from now on instead of keeping a
        copy of every answer (``ZoneCore.rebase``): the image's pages are the ones the
        workers map, so the pod holds those bytes once. Its own read-only mapping, which the
        core keeps until the next image replaces it."""
        if self._core is None or not hasattr(self._core, "rebase"):
            return
        try:
            self.rebased_bytes = self._core.rebase(publish.map_sealed(image.fd))
        except (OSError, ValueError) as e:
            # The core still holds its own copy: nothing is lost but the memory.
            log.warning("the compile core keeps its own copy of the answers: %s", e)

    def _new_core(self, core_type):
        return I.CoreCompiler.new_core(core_type, list(self._zones), persistent=True)

    # ------------------------------------------------------------------ assembly
    def _into(self, size: int):
        # Small images copy in no time; a memfd each would only cost file descriptors.
        if not self.into_memfd or size < MEMFD_MIN_BYTES:
            return None
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.capacity < size:
            spare.close()
            spare = None
        self._next_spare = size + size // 16
        return publish.ImageMemfd(size, spare=spare)

    def _prepare(self, capacity: int) -> None:
        try:
            spare = publish.SpareMemfd(capacity, populate=self.populate_spare)
        except OSError as e:
            log.debug("no spare image memfd: %s", e)
            return
        with self._spare_lock:
            old, self._spare = self._spare, spare
            self._spare_ready.notify_all()
        if old is not None:
            old.close()

    # ------------------------------------------------------------------ observation
    def core_stats(self) -> dict | None:
        """The persistent core's sizes (``ZoneCore.stats``: names, encoded names, live and
        dead bytes), or None when there is no core (none yet, or forgotten after a failure:
        the next compile starts over)."""
        return None if self._core is None else self._core.stats()

    def service_state(self, namespace: str, name: str) -> str | None:
        """How the last compile holds a service: "core" (its answers are a group in the
        core), "rrsets" (kept as RRsets: a CNAME is, or points, into it), "empty" (it has
        no answers), or None (not known)."""
        entry = self._services.get((namespace, name))
        if entry is None:
            return None
        return "rrsets" if entry.raw is not None else "core" if entry.in_core else "empty"

    @property
    def spare(self) -> publish.SpareMemfd | None:
        """The memfd prepared for the next image (``into_memfd``), or None."""
        return self._spare

    def wait_spare(self, timeout: float) -> publish.SpareMemfd | None:
        """The prepared memfd once the thread preparing it after a compile has, or None
        after ``timeout`` seconds."""
        with self._spare_ready:
            self._spare_ready.wait_for(lambda: self._spare is not None, timeout)
            return self._spare

    def idle(self) -> None:
        """The changes stopped (the controller's idle trim): give the spare memfd and the
        core's per-compile tables back."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
        if self._core is not None and hasattr(self._core, "trim"):
            self._core.trim()

    def _pods(self, model: ClusterModel, changed: set) -> dict | None:
        """``--pods verified``: each namespace's pod IPs packed for the image, re-packed only
        for namespaces whose pods changed (100,000 pods cost ~0.3 s to pack every time)."""
        if self.pods != "verified":
            return None
        if self._pod_lists is None:
            dirty = None
        else:
            dirty = {ns for kind, ns, _ in changed if kind == "Pod"}
            if not dirty:
                return self._pod_lists
        ips: dict[str, list] = {}
        for pod in model.pods():
            if dirty is None or pod.namespace in dirty:
                ips.setdefault(pod.namespace, []).append(pod.ip)
        lists = {} if dirty is None else self._pod_lists
        for ns in (ips if dirty is None else dirty):
            packed = I.pod_list(ips.get(ns, ()))
            if packed:
                lists[ns] = packed
            else:
                lists.pop(ns, None)
        self._pod_lists = lists
        return lists

    def _autopath_section(self, model: ClusterModel, changed: set) -> bytes:
        """The autopath section, rebuilt only after a pod change (150,000 pods cost ~0.2 s)."""
        if self.autopath is None:
            return b""
        if self._autopath is None or any(kind == "Pod" for kind, _, _ in changed):
            if len(self._ap_keys) > 2 * model.count("Pod") + 1024:
                self._ap_keys = {}             # IPs long gone: start the cache over
            self._autopath = build.autopath_image(model, self.autopath, self._ap_keys)
        return self._autopath

    def _assemble(self, model: ClusterModel, synced: bool, core_type, changed: set,
                  hosts=None) -> bytes:
        started = time.perf_counter()
        serial = model.serial
        frame, zones, exists = records.zone_frame(model, zone=self.zone, ttl=self.ttl,
                                                  pods=self.pods, serial=serial,
                                                  ns_ips=self.ns_ips,
                                                  pod_lists=self._pods(model, changed))
        raw = list(frame)
        for entry in self._services.values():
            if entry.raw is not None:
                raw += entry.raw
        if hosts is not None:
            raw += hosts.rrsets()
            zones = (*zones, *self._hosts_zones)
        if self._aliases:
            zd = build.with_rewrites(records.ZoneData(tuple(raw), tuple(zones), exists, serial,
                                                      ()), self.rewrites)
            raw, zones = list(zd.rrsets), zd.zones     # the zones: self._zones's
        image = I.CoreCompiler(list(zones), synced, serial, core_type,
                               core=self._core).build(raw, exists, into=self._into,
                                                      autopath=self._autopath_section(model, changed))
        if isinstance(image, publish.ImageMemfd):
            image.seal()
            self._rebase(image)
            # The next image's memfd, allocated while this one is published (after the
            # compile: alongside it, the two fought over memory bandwidth), and dropped by
            # ``idle`` when the changes stop: it is memory the pod is charged for.
            threading.Thread(target=self._prepare, args=(self._next_spare,), daemon=True,
                             name="kdns-spare-memfd").start()
        log.debug("assembled %d bytes in %.3fs (%d services re-derived, %d RRsets encoded)",
                  len(image), time.perf_counter() - started, self.last_dirty, self.last_encoded)
        return image
