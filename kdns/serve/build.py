"""From the cluster model to image bytes: the record rules, then the zone compiler.

Why here: the record rules (``kdns.kube.records``) know Kubernetes and not the image; the
zone compiler (``kdns.zone.image``) knows the image and not Kubernetes. This joins them for
the full compile of a model (the API controller's first build and its fallback) and of a
file (``--from-file``); ``incremental`` joins them for the compile after a change.
"""
from __future__ import annotations

from kdns import settings
from kdns.dns import rr as R
from kdns.kube import records
from kdns.kube.model import KINDS
from kdns.zone import image as I


def compile_model(model, *, synced: bool = True, hosts=None, rewrites=(), autopath=None,
                  **options) -> bytes:
    """Image bytes for ``model`` (what the controller publishes after a change); ``options``
    are ``zone_data``'s. ``synced=False`` before the first full list: cluster names then
    answer SERVFAIL, never a false NXDOMAIN (docs/architecture.md, "Failure behaviour").
    ``hosts``: the Corefile's custom records (``forward.hosts.HostsRecords``) or None;
    ``rewrites``: its ``rewrite name`` rules (``forward.rewrite.NameRule``).
    ``autopath``: None (off), or the server's search domains (a tuple, maybe empty): the
    image then carries the pods' client table (``autopath_image``)."""
    domain = options.get("domain", settings.DOMAIN)
    zd = with_hosts(records.zone_data(model, **options), hosts, domain)
    return _compile(with_rewrites(zd, rewrites), synced, autopath_image(model, autopath))


def with_rewrites(zd: records.ZoneData, rules) -> records.ZoneData:
    """``zd`` with an image entry for every exact ``rewrite name`` rule whose target has
    records: the alias owns the target's RRsets, their target names reverted as CoreDNS
    reverts the answer, so the packet paths answer it like any name (the client's name is
    the owner, pointer 0xC00C). CoreDNS rewrites before hosts and kubernetes, so the alias's
    own records, if it had any, are left out. An alias outside every zone gets a custom-
    records zone of its own: its other names are handed to the forwarder, as before. Rules
    the image cannot decide (a target without records, the other rule types) are the
    worker's (``forward.rewrite``)."""
    if not rules:
        return zd
    from kdns.forward import rewrite as RW
    aliases = RW.compiled_aliases(rules)
    if not aliases:
        return zd
    targets = {t for t, _ in aliases.values()}
    found: dict[str, list] = {}
    for s in zd.rrsets:
        if s.name in targets:
            found.setdefault(s.name, []).append(s)
    added, own = [], alias_zones(rules, zd.zones)
    in_own_zone = {z.apex for z in own}
    for alias, (target, back) in sorted(aliases.items()):
        for s, new in zip(found.get(target, ()), RW.alias_rrsets(alias, back,
                                                                 found.get(target, ()))):
            if alias in in_own_zone and any(
                    n != o and getattr(n, "target", alias) != alias
                    for o, n in zip(s.rdatas, new.rdatas)):
                # Targets reverted to names below the alias (a headless service's SRV):
                # the image has no records of theirs to add, the worker's path does (the
                # target's answer, reverted whole). In its own zone the alias hands this
                # type off; inside another zone it is answered without them.
                continue
            added.append(new)
    drop = {alias for alias in aliases}
    kept = tuple(s for s in zd.rrsets if s.name not in drop)
    return records.ZoneData(kept + tuple(added), tuple(zd.zones) + own,
                            zd.exists, zd.serial, zd.warnings)


def alias_zones(rules, zones) -> tuple:
    """A custom-records zone for each exact alias outside ``zones``, whether its target has
    records or not (the zones are fixed for a compile core's life): its other names, and
    the alias while its target has none, are handed to the forwarder, where the worker's
    rules take them."""
    from kdns.forward import rewrite as RW
    apexes = [R.name_labels(z.apex) for z in zones]
    out = []
    for alias in sorted(RW.compiled_aliases(rules)):
        labels = R.name_labels(alias)
        if not any(R.is_subdomain(labels, a) for a in apexes):
            out.append(R.Zone(alias, kind=R.ZONE_ALIAS))
    return tuple(out)


def autopath_image(model, search, keys: dict | None = None) -> bytes:
    """The image's autopath section for ``model`` (b"" when ``search`` is None: off);
    ``keys``: the caller's IP -> key cache (``encode.autopath_section``)."""
    if search is None:
        return b""
    return I.autopath_section(records.autopath_pods(model), tuple(search), keys)


def with_hosts(zd: records.ZoneData, hosts, domain: str) -> records.ZoneData:
    """``zd`` with the custom records of ``hosts`` (None: as it is). CoreDNS asks hosts
    before kubernetes, so a name of the hosts keeps only their records (its A and AAAA; any
    other type NODATA) and an address of the hosts only their PTR: the cluster's records at
    the same name or address are left out."""
    if hosts is None:
        return zd
    names, rev = hosts.names(), hosts.reverse_names()
    kept = tuple(s for s in zd.rrsets if s.name not in names and s.name not in rev)
    return records.ZoneData(kept + tuple(hosts.rrsets()), zd.zones + tuple(hosts.zones(
        R.canonical(domain).rstrip("."))), zd.exists, zd.serial, zd.warnings)


def _compile(zd: records.ZoneData, synced: bool, autopath: bytes = b"") -> bytes:
    """Compile ``zd``, which the caller must not keep: the compiler lets the RRsets go once
    it has encoded them, before the image is assembled (the first build's peak)."""
    rrsets, zones, exists, serial = list(zd.rrsets), zd.zones, zd.exists, zd.serial
    del zd
    return I.compile_image(rrsets, zones, exists=exists, synced=synced, serial=serial,
                           consume=True, autopath=autopath)


def compile_file(path: str, **options) -> bytes:
    """Image bytes for the objects in ``path``; InputError if the file is unusable."""
    return compile_file_counted(path, **options)[0]


def compile_file_counted(path: str, *, domain: str = settings.DOMAIN, ttl: int = settings.TTL,
                         pods: str = settings.PODS, endpoint_pod_names: bool = False,
                         serial: int | None = None, hosts=None,
                         rewrites=(), autopath=None) -> tuple[bytes, int]:
    """Image bytes for ``path`` and how many objects of the DNS kinds it held: the file
    source refuses to replace a cluster with an empty one (a truncated file, see
    ``supervisor.WatchedFile``), which only the object count tells apart."""
    # The model is garbage once the rules have run, so the compile reuses its memory: a
    # file's model is rebuilt on every change, nothing keeps it (startup peak).
    model = records.model_from_file(path)
    objects = sum(model.count(kind) for kind in KINDS)
    zd = records.zone_data(model, domain=domain, ttl=ttl, pods=pods,
                           endpoint_pod_names=endpoint_pod_names,
                           serial=records.file_serial(path) if serial is None else serial)
    zd = with_rewrites(with_hosts(zd, hosts, domain), rewrites)
    section = autopath_image(model, autopath)
    del model
    return _compile(zd, True, section), objects
