"""``kdns node-local``: a kdns whose image comes from the central kdns's stream.

Why: the supervisor, workers, forwarder and HTTP listeners are those of ``kdns serve``
(kdns/serve/supervisor.py); a node-local differs in where the image comes from
(``source.StreamSource`` instead of the compiler), in listening on more than one address
(the link-local one and, optionally, the kube-dns ClusterIP, as NodeLocal DNSCache), in
what it does when the stream goes stale (cluster names to the kube-dns Service over TCP),
and in setting up its node (``netsetup``).

What it must not do: watch the API.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from kdns.forward.forwarder import Upstream
from kdns.serve import supervisor as S

log = logging.getLogger("kdns.nodelocal")

REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")


@dataclass
class NodeLocalOptions:
    image_url: str = ""
    addresses: tuple[str, ...] = ("169.254.20.10",)
    workers_per_address: int = 1
    kube_dns_upstream: tuple = ()              # Upstreams of the kube-dns Service (stale mode)
    stale_after: float = 60.0
    poll_wait: float = 30.0
    setup: object = None                       # netsetup.NodeSetup or None
    first_timeout: float = 5.0
    extra: dict = field(default_factory=dict)


def fallback_images(domain: str) -> tuple[bytes, bytes]:
    """(zoneless, unsynced): an image with no zone at all, so every name, the cluster's
    too, goes to the forwarder (stale mode with a kube-dns upstream); and the image of a
    cluster not yet synced, where cluster names answer SERVFAIL, never a false NXDOMAIN
    (no image yet and nowhere to forward them)."""
    from kdns.kube.model import ClusterModel
    from kdns.serve import build
    from kdns.zone import image as I
    return (I.compile_image([], [], synced=True, serial=0),
            build.compile_model(ClusterModel(), synced=False, domain=domain))


class NodeLocalSupervisor(S.Supervisor):
    def __init__(self, cfg: S.ServeConfig, nl: NodeLocalOptions):
        from kdns.nodelocal.source import StreamSource
        self.nl = nl
        cfg.workers = nl.workers_per_address * len(nl.addresses)
        cfg.dns_bind_address = nl.addresses[0]
        zoneless, unsynced = fallback_images(cfg.domain)
        forward = bool(nl.kube_dns_upstream)
        source = StreamSource(nl.image_url, fallback=zoneless if forward else unsynced,
                              stale_after=nl.stale_after, wait=nl.poll_wait,
                              forward_when_stale=forward, on_stale=self.set_stale,
                              first_timeout=nl.first_timeout)
        super().__init__(cfg, source)
        self.stale_forwarding = False
        if self.forwarding is not None:
            self.base_config = self.forwarding.config
            self.base_force_tcp = self.forwarding.opts.forward_force_tcp
        from kdns.nodelocal.metrics import NodeLocalCollector
        self.extra_collectors = (NodeLocalCollector(self),)

    def listen(self) -> list:
        pairs = []
        try:
            for addr in self.nl.addresses:
                pairs += S.listening_sockets(addr, self.cfg.dns_port, self.nl.workers_per_address,
                                             share=self.cfg.share_dns_port)
        except S.StartError:
            for pair in pairs:
                for s in pair:
                    s.close()
            raise
        return pairs

    def set_stale(self, stale: bool) -> None:
        """Stale: the cluster domain and the reverse zones to the kube-dns Service, over
        TCP (its replies are not truncated and TCP leaves no conntrack entry behind: what
        NodeLocal DNSCache does for them always); fresh again: as configured."""
        self.stale_forwarding = stale and bool(self.nl.kube_dns_upstream)
        fc = self.forwarding
        if fc is None or not self.nl.kube_dns_upstream:
            return
        ups = tuple(self.nl.kube_dns_upstream)
        if stale:
            stubs = {**self.base_config.stub_domains,
                     **{z: ups for z in (self.cfg.domain.rstrip("."), *REVERSE_ZONES)}}
            config = dataclasses.replace(self.base_config, stub_domains=stubs)
        else:
            config = self.base_config
        # Forced TCP applies to every forwarded name while stale: the forwarder has one
        # transport setting, and the outside names are few next to the cluster's then.
        fc.opts = dataclasses.replace(fc.opts, forward_force_tcp=stale or self.base_force_tcp)
        if fc.message:
            fc._on_change(config)
        else:
            fc.config = config        # not started yet: start() sends it first

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            if self.nl.setup is not None:
                self.nl.setup.undo()


def serve(cfg: S.ServeConfig, nl: NodeLocalOptions) -> int:
    from kdns.nodelocal import netsetup
    from kdns.serve.memory import release_memory
    if nl.setup is not None:
        try:
            nl.setup.apply()
        except netsetup.SetupError as e:
            nl.setup.undo()
            raise S.StartError(str(e)) from None
    try:
        sup = NodeLocalSupervisor(cfg, nl)
        first = sup.source.first()
        sup.start(first)
    except BaseException:
        if nl.setup is not None:
            nl.setup.undo()
        raise
    del first
    release_memory()
    return sup.run()


def upstream(text: str, default_port: int = 53) -> Upstream:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return Upstream(host or text, int(port) if port else default_port)
