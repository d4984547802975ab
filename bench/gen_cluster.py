"""Generate a benchmark cluster and write it for both servers under test, plus query files.

One deterministic cluster (same seed, same bytes) becomes:

* ``cluster.json``: kdns's input, a v1 ``List`` of Namespace and Service objects shaped as
  ``kubectl get -o json`` prints them;
* ``nsd/cluster.local.zone`` and ``nsd/in-addr.arpa.zone``: the same names as NSD zone files,
  holding exactly the records kdns serves for them (CoreDNS rules, dns-rules §1.2, §1.5, §1.7,
  §2.2: A per ClusterIP, SRV ``0 100 <port>`` for each named port and for the bare name
  (one per port, named or not), PTR per cluster IP, TTL 30, SOA with MINIMUM 30);
* ``hits.txt``: dnsperf query file, positive-path mix (A, SRV, AAAA on v4-only services =
  NODATA, PTR);
* ``search.txt``: what pods with ``ndots:5`` send while walking their search list
  (dns-rules §5.2): the in-zone NXDOMAIN candidates, then the name that answers;
* ``check.txt``: a few names of every kind, for the harness's equivalence check;
* ``meta.json``: parameters and counts.

Only the names the mixes ask about need to agree between the servers; pod names (synthesised
by kdns, impossible in a zone file) are deliberately absent from both the zone and the mixes.

    .venv/bin/python bench/gen_cluster.py --out bench/out/cluster [--services 5000]
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import uuid
from dataclasses import dataclass

ZONE = "cluster.local"
TTL = 30
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
# Reserved by convention: .1 is the API server's service, .10 the cluster DNS service.
KUBERNETES_IP, DNS_IP = "10.96.0.1", "10.96.0.10"
SOA_SERIAL = 1  # kdns's serial differs (it is a timestamp); the equivalence check ignores it.

WORDS = ("api auth billing cache cart catalog checkout config db events feed gateway geo "
         "graph image inventory kafka ledger log mail media metrics notify orders payments "
         "pricing profile queue rank redis report search session shipping social stock "
         "store stream tax user vault web worker account admin audit backup batch chat "
         "coupon crm dashboard email export fraud health identity invoice loyalty market "
         "partner promo quote refund review sms ticket track wallet").split()
KINDS = ("svc backend frontend server db worker proxy v2 internal public").split()
NAMED_PORTS = (("http", 80), ("https", 443), ("grpc", 9090), ("metrics", 9100), ("http-alt", 8080))
UNNAMED_PORTS = (80, 8080, 443, 3000, 5432, 6379)
EXTERNAL = ("www.google.com", "api.github.com", "s3.amazonaws.com", "registry.npmjs.org",
            "pypi.org", "login.microsoftonline.com", "sts.amazonaws.com", "example.com")

# Query mixes: (kind, weight). Kept here so README, meta.json and the files agree.
HIT_MIX = (("A", 50), ("SRV_NAMED", 10), ("SRV_BARE", 5), ("AAAA_NODATA", 15), ("PTR", 20))
# Search forms: how the application spells the name; each expands into the resolver's walk.
SEARCH_MIX = (("svc.ns", 50), ("svc.ns.svc", 20), ("svc.ns.svc.cluster.local", 15),
              ("external", 15))


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    ip: str
    port: int
    port_name: str | None   # None: a single unnamed port

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{ZONE}"


@dataclass(frozen=True)
class Cluster:
    seed: int
    namespaces: tuple
    services: tuple


def generate(services: int = 5000, namespaces: int = 50, named: int = 1000,
             seed: int = 1) -> Cluster:
    """Deterministic: the same arguments give the same cluster."""
    if not 2 <= namespaces <= len(WORDS) + 2 or not 1 <= named <= services:
        raise ValueError("need 2..%d namespaces and 1 <= named <= services" % (len(WORDS) + 2))
    rng = random.Random(seed)
    # Namespace names never equal a service name, 'svc' or 'pod', so a search-walk candidate
    # such as <svc>.<ns>.<podns>.svc.cluster.local is always NXDOMAIN, never a hit by chance.
    nss = ["default", "kube-system"] + ["team-" + w for w in rng.sample(WORDS, namespaces - 2)]
    host_bits = 32 - SERVICE_CIDR.prefixlen
    base = int(SERVICE_CIDR.network_address)
    reserved = {int(ipaddress.ip_address(KUBERNETES_IP)) - base,
                int(ipaddress.ip_address(DNS_IP)) - base}
    offsets = [o for o in rng.sample(range(2, 2 ** host_bits - 1), services + 2)
               if o not in reserved][:services - 1]
    ips = [KUBERNETES_IP] + [str(ipaddress.ip_address(base + o)) for o in offsets]
    named_idx = {0} | set(rng.sample(range(1, services), named - 1))
    order = nss[:]
    rng.shuffle(order)
    taken = {("kubernetes", "default")}
    out = [Service("kubernetes", "default", KUBERNETES_IP, 443, "https")]
    for i in range(1, services):
        ns = order[i % namespaces]
        while True:
            name = f"{rng.choice(WORDS)}-{rng.choice(KINDS)}"
            if (name, ns) in taken:
                name += f"-{rng.randrange(100)}"
            if (name, ns) not in taken:
                break
        taken.add((name, ns))
        if i in named_idx:
            pname, port = rng.choice(NAMED_PORTS)
        else:
            pname, port = None, rng.choice(UNNAMED_PORTS)
        out.append(Service(name, ns, ips[i], port, pname))
    return Cluster(seed, tuple(nss), tuple(out))


# ------------------------------------------------------------------------ kdns input


def _meta(rng: random.Random, name: str, namespace: str | None, rv: int) -> dict:
    m = {"creationTimestamp": "2026-01-01T00:00:00Z", "name": name,
         "resourceVersion": str(rv), "uid": str(uuid.UUID(int=rng.getrandbits(128), version=4))}
    if namespace:
        m["namespace"] = namespace
    return m


def kube_list(c: Cluster) -> dict:
    """The cluster as `kubectl get namespaces,services -A -o json` would print it."""
    rng = random.Random(c.seed + 1)
    items, rv = [], 1000
    for ns in c.namespaces:
        rv += 1
        m = _meta(rng, ns, None, rv)
        m["labels"] = {"kubernetes.io/metadata.name": ns}
        items.append({"apiVersion": "v1", "kind": "Namespace", "metadata": m,
                      "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    for s in c.services:
        rv += 1
        m = _meta(rng, s.name, s.namespace, rv)
        m["labels"] = {"app": s.name}
        port = {"port": s.port, "protocol": "TCP", "targetPort": s.port}
        if s.port_name:
            port = {"name": s.port_name, **port}
        items.append({
            "apiVersion": "v1", "kind": "Service", "metadata": m,
            "spec": {"clusterIP": s.ip, "clusterIPs": [s.ip], "internalTrafficPolicy": "Cluster",
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": [port],
                     "selector": {"app": s.name}, "sessionAffinity": "None", "type": "ClusterIP"},
            "status": {"loadBalancer": {}}})
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}


# ------------------------------------------------------------------------ NSD zones


def _soa(apex: str) -> str:
    return (f"{apex}. {TTL} IN SOA ns.dns.{apex}. hostmaster.{apex}. "
            f"{SOA_SERIAL} 7200 1800 86400 {TTL}\n")


def forward_zone(c: Cluster) -> str:
    lines = [_soa(ZONE), f"{ZONE}. {TTL} IN NS ns.dns.{ZONE}.\n",
             # kdns gives the name-server name its own listening address (dns-rules §1.10).
             f"ns.dns.{ZONE}. {TTL} IN A 127.0.0.1\n",
             f'dns-version.{ZONE}. {TTL} IN TXT "1.1.0"\n']
    for s in c.services:
        lines.append(f"{s.fqdn}. {TTL} IN A {s.ip}\n")
        # Bare-name SRV: one per port, named or not (CoreDNS; weight floor(100/1) = 100).
        lines.append(f"{s.fqdn}. {TTL} IN SRV 0 100 {s.port} {s.fqdn}.\n")
        if s.port_name:
            lines.append(f"_{s.port_name}._tcp.{s.fqdn}. {TTL} IN SRV 0 100 {s.port} {s.fqdn}.\n")
    # Every namespace exists (NODATA, not NXDOMAIN) even without services: in a zone file a
    # name exists only with data below it, and every generated namespace has services.
    assert {s.namespace for s in c.services} == set(c.namespaces)
    return "".join(lines)


def reverse_zone(c: Cluster) -> str:
    apex = "in-addr.arpa"
    lines = [_soa(apex), f"{apex}. {TTL} IN NS ns.dns.{ZONE}.\n"]
    for s in c.services:
        lines.append(f"{ipaddress.ip_address(s.ip).reverse_pointer}. {TTL} IN PTR {s.fqdn}.\n")
    return "".join(lines)


# ------------------------------------------------------------------------ query files


def _pick(rng: random.Random, mix) -> str:
    return rng.choices([k for k, _ in mix], weights=[w for _, w in mix])[0]


def hit_queries(c: Cluster, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    named = [s for s in c.services if s.port_name]
    out = []
    for _ in range(n):
        kind = _pick(rng, HIT_MIX)
        s = rng.choice(named if kind == "SRV_NAMED" else c.services)
        if kind == "A":
            out.append(f"{s.fqdn} A")
        elif kind == "SRV_NAMED":
            out.append(f"_{s.port_name}._tcp.{s.fqdn} SRV")
        elif kind == "SRV_BARE":
            out.append(f"{s.fqdn} SRV")
        elif kind == "AAAA_NODATA":
            out.append(f"{s.fqdn} AAAA")
        else:
            out.append(f"{ipaddress.ip_address(s.ip).reverse_pointer} PTR")
    return out


def search_walk(name: str, podns: str) -> list[str]:
    """In-zone candidates a glibc/musl resolver with ``search <podns>.svc.Z svc.Z Z`` and
    ``ndots:5`` tries for ``name`` (fewer than 5 dots: search list first, then as is).
    Candidates outside the cluster zone (node search domains, the name itself when it is
    external) would go upstream and are left out: neither server under test answers them."""
    walk = [f"{name}.{podns}.svc.{ZONE}", f"{name}.svc.{ZONE}", f"{name}.{ZONE}"]
    if name.endswith("." + ZONE):
        walk.append(name)
    return walk


def search_queries(c: Cluster, n: int, seed: int) -> list[str]:
    """Whole lookups, each the walk up to and including the first answer (A only)."""
    rng = random.Random(seed)
    fqdns = {s.fqdn for s in c.services}
    out = []
    while len(out) < n:
        form = _pick(rng, SEARCH_MIX)
        s = rng.choice(c.services)
        podns = rng.choice(c.namespaces)
        name = {"svc.ns": f"{s.name}.{s.namespace}", "svc.ns.svc": f"{s.name}.{s.namespace}.svc",
                "svc.ns.svc.cluster.local": s.fqdn,
                "external": rng.choice(EXTERNAL)}[form]
        for cand in search_walk(name, podns):
            out.append(f"{cand} A")
            if cand in fqdns:      # the resolver stops at the first answer
                break
    return out[:n]


def check_queries(c: Cluster, seed: int) -> list[str]:
    """A few of every kind the mixes contain, plus the existence edges around them."""
    rng = random.Random(seed)
    named = [s for s in c.services if s.port_name]
    unnamed = [s for s in c.services if not s.port_name]
    picks = rng.sample(c.services, 4)
    out = []
    for s in picks:
        out += [f"{s.fqdn} A", f"{s.fqdn} AAAA", f"{s.fqdn} SRV",
                f"{ipaddress.ip_address(s.ip).reverse_pointer} PTR"]
    for s in rng.sample(named, 3):
        out.append(f"_{s.port_name}._tcp.{s.fqdn} SRV")
    s = rng.choice(unnamed)
    out.append(f"{s.fqdn} SRV")
    s = rng.choice(c.services)
    ns = rng.choice(c.namespaces)
    for name in (f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc", s.fqdn, "www.google.com"):
        out += [f"{cand} A" for cand in search_walk(name, ns)]
    out += [f"{ns}.svc.{ZONE} A", f"svc.{ZONE} A", f"nosuchservice.{ns}.svc.{ZONE} A",
            f"kubernetes.default.svc.{ZONE} A", f"_https._tcp.kubernetes.default.svc.{ZONE} SRV"]
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------ output


def write_all(out: str, services: int = 5000, namespaces: int = 50, named: int = 1000,
              seed: int = 1, queries: int = 100_000) -> dict:
    c = generate(services, namespaces, named, seed)
    os.makedirs(os.path.join(out, "nsd"), exist_ok=True)

    def put(rel: str, text: str) -> str:
        path = os.path.join(out, rel)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        return path

    paths = {
        "kdns_input": put("cluster.json", json.dumps(kube_list(c), indent=1) + "\n"),
        "nsd_forward": put("nsd/cluster.local.zone", forward_zone(c)),
        "nsd_reverse": put("nsd/in-addr.arpa.zone", reverse_zone(c)),
        "hits": put("hits.txt", "\n".join(hit_queries(c, queries, seed + 2)) + "\n"),
        "search": put("search.txt", "\n".join(search_queries(c, queries, seed + 3)) + "\n"),
        "check": put("check.txt", "\n".join(check_queries(c, seed + 4)) + "\n"),
    }
    meta = {"seed": seed, "services": services, "namespaces": namespaces,
            "named_port_services": named, "queries_per_file": queries, "zone": ZONE, "ttl": TTL,
            "hit_mix": dict(HIT_MIX), "search_forms": dict(SEARCH_MIX), "paths": paths}
    put("meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "cluster"))
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--named", type=int, default=1000, help="services with a named port")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--queries", type=int, default=100_000, help="lines per query file")
    a = ap.parse_args(argv)
    meta = write_all(a.out, a.services, a.namespaces, a.named, a.seed, a.queries)
    print(json.dumps(meta["paths"], indent=1))


if __name__ == "__main__":
    main()
