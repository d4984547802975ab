"""A small but rich zone image built straight from RRsets, for tests of the packet path and
the server that must not depend on the Kubernetes record rules."""
from kdns.dns.names import reverse_name
from kdns.zone import image as I
from kdns.dns import rr as R

Z = "cluster.local."


def soa(apex: str, ttl: int = 30, serial: int = 1) -> R.RRset:
    return R.RRset(apex, R.SOA, ttl, (R.Soa("ns.dns." + apex, "hostmaster." + apex, serial,
                                             7200, 1800, 86400, ttl),))


def sample_rrsets(tag: str = "10.96.0.1") -> list:
    """``tag`` changes the address of kubernetes.default so two images differ visibly."""
    s = "kubernetes.default.svc." + Z
    many = tuple(R.Address(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(120))
    return [
        soa(Z), soa("in-addr.arpa."), soa("ip6.arpa."),
        R.RRset(Z, R.NS, 30, (R.Target("ns.dns." + Z),)),
        R.RRset("ns.dns." + Z, R.A, 30, (R.Address("10.96.0.10"),)),
        R.RRset("dns-version." + Z, R.TXT, 30, (R.Txt(("1.1.0",)),)),
        R.RRset(s, R.A, 30, (R.Address(tag),)),
        R.RRset(s, R.SRV, 30, (R.Srv(0, 100, 443, s),)),
        R.RRset("_https._tcp." + s, R.SRV, 30, (R.Srv(0, 100, 443, s),)),
        R.RRset("dual.default.svc." + Z, R.A, 30, (R.Address("10.96.0.20"),)),
        R.RRset("dual.default.svc." + Z, R.AAAA, 30, (R.Address("fd00::20"),)),
        R.RRset("ext.default.svc." + Z, R.CNAME, 30, (R.Target(s),)),
        R.RRset("outside.default.svc." + Z, R.CNAME, 30, (R.Target("www.example.com."),)),
        R.RRset("big.default.svc." + Z, R.A, 30, many),
        R.RRset("1.0.96.10.in-addr.arpa.", R.PTR, 30, (R.Target(s),)),
        R.RRset(reverse_name("fd00::20"), R.PTR, 30, (R.Target("dual.default.svc." + Z),)),
    ]


def rotating_rrsets() -> list:
    """What rotates (kdns/zone/layout.py, Rotation): a headless service's A records and its
    SRV records with their glue, targets of different lengths so each rotation moves the cut
    points, and a CNAME to it (the rotating run then follows the chain)."""
    hl = "hl.default.svc." + Z
    hosts = [("h" * (1 + 5 * i % 11)) + str(i) for i in range(6)]
    out = [R.RRset(hl, R.A, 30, tuple(R.Address(f"10.2.0.{i + 1}") for i in range(6))),
           R.RRset(hl, R.AAAA, 30, (R.Address("fd00::2:1"), R.Address("fd00::2:2"))),
           R.RRset("_http._tcp." + hl, R.SRV, 30,
                   tuple(R.Srv(0, 100, 80 + i, f"{h}.{hl}") for i, h in enumerate(hosts))),
           R.RRset("hlalias.default.svc." + Z, R.CNAME, 30, (R.Target(hl),))]
    out += [R.RRset(f"{h}.{hl}", R.A, 30, (R.Address(f"10.2.0.{i + 1}"),))
            for i, h in enumerate(hosts)]
    return out


ROTATING_NAMES = [("hl.default.svc.cluster.local", "A"), ("hl.default.svc.cluster.local", "AAAA"),
                  ("_http._tcp.hl.default.svc.cluster.local", "SRV"),
                  ("hlalias.default.svc.cluster.local", "A"),
                  ("hlalias.default.svc.cluster.local", "AAAA")]


def sample_zones(pods: str = "insecure"):
    ns = {"default": None, "kube-system": None}
    if pods == "verified":
        ns = {"default": {"10.244.0.5", "fd00:10:244::5"}, "kube-system": set()}
    return [I.Zone(Z, pods=pods, pod_namespaces=ns), I.Zone("in-addr.arpa.", kind=I.ZONE_REVERSE),
            I.Zone("ip6.arpa.", kind=I.ZONE_REVERSE)]


def sample_image(tag: str = "10.96.0.1", pods: str = "insecure", synced: bool = True,
                 rotating: bool = False) -> bytes:
    """``rotating``: with ``rotating_rrsets`` too."""
    return I.compile_image(sample_rrsets(tag) + (rotating_rrsets() if rotating else []),
                           sample_zones(pods),
                           exists=["default.svc." + Z, "kube-system.svc." + Z, "svc." + Z, "pod." + Z],
                           synced=synced)


# Autopath's clients (kdns/zone/layout.py, autopath section): a pod of default, one of
# kube-system (IPv4 and IPv6), and an address no pod has; None is no client address.
AUTOPATH_PODS = (("10.244.0.5", "default"), ("10.244.0.6", "kube-system"),
                 ("fd00:10:244::6", "kube-system"))
AUTOPATH_CLIENTS = (None, "10.244.0.5", "fd00:10:244::6", "10.244.9.9")
# Names a kube-system pod's resolver asks first for names of default (ndots:5).
AUTOPATH_NAMES = [(f"{n}.kube-system.svc.cluster.local", t) for n, t in (
    ("kubernetes.default", "A"), ("kubernetes.default", "SRV"), ("kubernetes.default.svc", "A"),
    ("_https._tcp.kubernetes.default", "SRV"), ("hl.default", "A"), ("hlalias.default", "AAAA"),
    ("_http._tcp.hl.default", "SRV"), ("big.default", "A"), ("dual.default", "AAAA"),
    ("dual.default", "TXT"), ("outside.default", "A"), ("ext.default", "A"),
    ("www.example.com", "A"), ("default", "A"), ("1-2-3-4.default.pod", "A"))]


def autopath_image(synced: bool = True) -> bytes:
    """The rotating sample with the autopath section (``AUTOPATH_PODS``, search
    example.org)."""
    return I.compile_image(sample_rrsets() + rotating_rrsets(), sample_zones("insecure"),
                           exists=["default.svc." + Z, "kube-system.svc." + Z, "svc." + Z,
                                   "pod." + Z], synced=synced,
                           autopath=I.autopath_section(AUTOPATH_PODS, ("example.org",)))


def hosts_image(synced: bool = True) -> bytes:
    """The sample with custom records (the Corefile's hosts): the root as a hosts zone with
    fallthrough, final.example. without it, a PTR of theirs, and CNAMEs from the cluster to
    a host name and to a name of a hosts zone without records."""
    s = "kubernetes.default.svc." + Z
    extra = [
        R.RRset("k3s-server.", R.A, 60, (R.Address("10.0.0.9"),)),
        R.RRset("k3s-server.", R.AAAA, 60, (R.Address("fd00::9"),)),
        R.RRset("node.final.example.", R.A, 60, (R.Address("192.0.2.9"), R.Address("192.0.2.10"))),
        R.RRset("9.0.0.10.in-addr.arpa.", R.PTR, 60, (R.Target("k3s-server."),)),
        R.RRset("tohost.default.svc." + Z, R.CNAME, 30, (R.Target("k3s-server."),)),
        R.RRset("tomiss.default.svc." + Z, R.CNAME, 30, (R.Target("miss.final.example."),)),
        # A rewrite alias (forward/rewrite.py) in its own zone: its A answered, the rest
        # handed off.
        R.RRset("alias.example.", R.A, 30, (R.Address("10.96.0.1"),)),
    ]
    zones = sample_zones() + [I.Zone(".", kind=I.ZONE_HOSTS, ttl=60),
                              I.Zone("final.example.", kind=I.ZONE_HOSTS_FINAL, ttl=60),
                              I.Zone("alias.example.", kind=I.ZONE_ALIAS)]
    return I.compile_image(sample_rrsets() + extra, zones,
                           exists=["default.svc." + Z, "kube-system.svc." + Z, "svc." + Z, "pod." + Z],
                           synced=synced)


HOSTS_NAMES = ["k3s-server", "K3S-SERVER", "x.k3s-server", "node.final.example", "final.example",
               "miss.final.example", "example", "9.0.0.10.in-addr.arpa",
               "tohost.default.svc.cluster.local", "tomiss.default.svc.cluster.local", ".",
               "alias.example", "ALIAS.example", "x.alias.example"]


# Names worth asking about: hits, ENTs, misses, synthesis, reverse, outside.
SAMPLE_NAMES = [
    "kubernetes.default.svc.cluster.local", "_https._tcp.kubernetes.default.svc.cluster.local",
    "_tcp.kubernetes.default.svc.cluster.local", "dual.default.svc.cluster.local",
    "ext.default.svc.cluster.local", "outside.default.svc.cluster.local",
    "big.default.svc.cluster.local", "nope.default.svc.cluster.local", "default.svc.cluster.local",
    "svc.cluster.local", "pod.cluster.local", "cluster.local", "ns.dns.cluster.local",
    "dns-version.cluster.local", "1-2-3-4.default.pod.cluster.local",
    "fd00-10-244--5.default.pod.cluster.local", "10-244-0-5.default.pod.cluster.local",
    "1-2-3-4.nons.pod.cluster.local", "x.1-2-3-4.default.pod.cluster.local",
    "1.0.96.10.in-addr.arpa", "2.0.96.10.in-addr.arpa", "0.96.10.in-addr.arpa", "in-addr.arpa",
    reverse_name("fd00::20").rstrip("."), "google.com", "com", "local",
]
