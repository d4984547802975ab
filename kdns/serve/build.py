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


def compile_model(model, *, synced: bool = True, hosts=None, autopath=None,
                  **options) -> bytes:
    """Image bytes for ``model`` (what the controller publishes after a change); ``options``
    are ``zone_data``'s. ``synced=False`` before the first full list: cluster names then
    answer SERVFAIL, never a false NXDOMAIN (docs/architecture.md, "Failure behaviour").
    ``hosts``: the Corefile's custom records (``forward.hosts.HostsRecords``) or None.
    ``autopath``: None (off), or the server's search domains (a tuple, maybe empty): the
    image then carries the pods' client table (``autopath_image``)."""
    domain = options.get("domain", settings.DOMAIN)
    return _compile(with_hosts(records.zone_data(model, **options), hosts, domain), synced,
                    autopath_image(model, autopath))


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
                         autopath=None) -> tuple[bytes, int]:
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
    zd = with_hosts(zd, hosts, domain)
    section = autopath_image(model, autopath)
    del model
    return _compile(zd, True, section), objects
