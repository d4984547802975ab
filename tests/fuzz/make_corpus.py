"""Write the seed corpus (tests/fuzz/corpus/<target>/), from real queries and replies.

Seeds are small on purpose: libFuzzer grows its own corpus from them in a scratch
directory (``run.py``); these files are what the sanitizer build replays and what CI
starts from. Re-run after a change of a target's input format:
``.venv/bin/python tests/fuzz/make_corpus.py``.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import common  # noqa: F401  (import path)

import dns.message
from dnslib import RR, DNSRecord, EDNS0

import zonefixtures as Z

CORPUS = common.HERE / "corpus"
QTYPES = ("A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "CNAME", "ANY", "MX", "HINFO")

# The two upstream replies of the hardening defects: an answer owner that points outside
# the message (0x3fff), and a NOERROR reply whose only answer RR has TYPE 41 (OPT).
BAD_POINTER = ("43218180000100010000000003626164076578616d706c65036f72670000010001"
               "ffff000100010000012c000401020304")
OPT_IN_ANSWER = ("1234810000010001000000000178076578616d706c6503636f6d0000010001"
                 "c00c002900010000012c000401020304")


def query(name: str, rdtype: str = "A", *, edns: int = -1, payload: int = 1232,
          do: bool = False, qid: int = 0x1234) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload, want_dnssec=do)
    m.id = qid
    return m.to_wire()


def queries() -> list[bytes]:
    out = []
    for i, name in enumerate(Z.SAMPLE_NAMES):
        t = QTYPES[i % len(QTYPES)]
        out.append(query(name, t))
        out.append(query(name.upper(), "A", edns=0, do=bool(i & 1)))
    s = "kubernetes.default.svc.cluster.local"
    out += [query(s, t, edns=0) for t in QTYPES]
    q = bytearray(query(s))
    q[5] = 2                                     # two questions: FORMERR
    out.append(bytes(q + q[12:]))
    q = bytearray(query("a.test."))
    q[10:12] = b"\x00\x01"                       # an additional RR whose owner points outside
    out.append(bytes(q + bytes.fromhex("ffff 0010 0001 00000000 0000")))
    out.append(query(s, edns=1, payload=512))    # EDNS version 1: BADVERS
    out.append(b"\x12\x34\x81\x00" + bytes(8))   # a response: dropped
    return out


def scan_input(raw: bytes, opts: int = 1) -> bytes:
    """An upstream reply as fuzz_scan's input: options, flags and counts, what follows the
    question (the target puts its own ID and question in)."""
    qend = 12
    while raw[qend]:
        qend += 1 + raw[qend]
    qend += 5
    return bytes([opts]) + raw[2:4] + raw[6:12] + raw[qend:]


def replies() -> list[bytes]:
    out = []

    def rec(qtype, answer=(), auth=(), extra=(), rcode=0, tc=False, edns=False):
        r = DNSRecord.question("f1.fuzz.example", qtype).reply()
        r.header.rcode, r.header.tc = rcode, int(tc)
        for text in answer:
            r.add_answer(*RR.fromZone(text))
        for text in auth:
            r.add_auth(*RR.fromZone(text))
        for text in extra:
            r.add_ar(*RR.fromZone(text))
        if edns:
            r.add_ar(EDNS0(udp_len=1232))
        return bytes(r.pack())

    n = "f1.fuzz.example."
    soa = "fuzz.example. 300 IN SOA ns.fuzz.example. host.fuzz.example. 1 7200 1800 86400 60"
    out.append(rec("A", [f"{n} 30 IN A 1.2.3.4", f"{n} 40 IN A 1.2.3.5"], edns=True))
    out.append(rec("A", [f"{n} 30 IN CNAME www.fuzz.example.", "www.fuzz.example. 60 IN A 5.6.7.8"]))
    out.append(rec("MX", [f"{n} 30 IN MX 10 mail.fuzz.example."],
                   extra=["mail.fuzz.example. 30 IN A 9.9.9.9"]))
    out.append(rec("SRV", [f"{n} 30 IN SRV 0 5 443 t.fuzz.example."], edns=True))
    out.append(rec("A", auth=[soa], rcode=3))
    out.append(rec("AAAA", auth=[soa]))
    out.append(rec("A", auth=["fuzz.example. 30 IN NS ns.fuzz.example."],
                   extra=["ns.fuzz.example. 30 IN A 1.1.1.1"]))
    out.append(rec("A", rcode=2))
    out.append(rec("A", [f"{n} 30 IN A 1.2.3.4"], tc=True))
    out.append(rec("A", [f"{n} 30 IN A 10.0.0.{i}" for i in range(1, 100)], edns=True))
    out.append(rec("PTR", [f"{n} 30 IN PTR host.fuzz.example."]))
    out.append(rec("TXT", [f'{n} 30 IN TXT "hello" "world"']))
    seeds = [scan_input(r, opts) for r, opts in zip(out, (1, 0, 3, 9, 1, 0, 1, 1, 0, 0, 4, 1))]
    seeds += [scan_input(bytes.fromhex(BAD_POINTER)), scan_input(bytes.fromhex(OPT_IN_ANSWER))]
    return seeds


def streams(qs: list[bytes]) -> list[bytes]:
    framed = [len(q).to_bytes(2, "big") + q for q in qs]
    out = [bytes([k]) + framed[k % len(framed)] for k in range(8)]
    out.append(bytes([1]) + b"".join(framed[:6]))                 # pipelined, 1-byte chunks
    out.append(bytes([3]) + b"".join(framed[6:10]) + framed[10][:9])   # an incomplete tail
    out.append(bytes([0]) + b"\x00\x00" + framed[0])              # an empty message first
    out.append(bytes([0x84]) + b"".join(framed[10:14]))           # RA set
    return out


def zonefiles() -> list[bytes]:
    example = (common.ROOT / "examples" / "cluster.yaml").read_bytes()
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.1.2", "ports": [{"name": "http", "port": 80,
                                                         "protocol": "TCP"}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-1", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": ["10.244.0.9"], "conditions": {"ready": True},
                          "hostname": "w0"}]}
    headless = json.loads(json.dumps(svc))
    headless["metadata"]["name"] = "db"
    headless["spec"]["clusterIP"] = "None"
    ext = {"kind": "Service", "metadata": {"name": "out"},
           "spec": {"type": "ExternalName", "externalName": "www.example.com"}}
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
           "status": {"podIP": "10.244.0.9", "podIPs": [{"ip": "10.244.0.9"}]}}
    return [
        example,
        json.dumps({"kind": "List", "items": [svc, eps, headless, ext, pod]}).encode(),
        json.dumps([svc, {"kind": "Namespace", "metadata": {"name": "shop"}}]).encode(),
        json.dumps({"kind": "ServiceList",
                    "items": [{k: v for k, v in svc.items() if k != "kind"}]}).encode(),
        b"kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 53}]}\n---\n"
        b"kind: Endpoints\nmetadata: {name: a}\nsubsets: [{addresses: [{ip: 10.1.1.1}], ports: [{port: 53}]}]\n",
        b"",
        b"{not json",
        b"a: [1, 2\n",
    ]


def write(target: str, seeds: list[bytes]) -> None:
    d = CORPUS / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for s in seeds:
        (d / hashlib.sha1(s).hexdigest()[:16]).write_bytes(s)


def main() -> None:
    qs = queries()
    opts = (0, 4, 8, 1, 2, 3, 0x20, 0x1C)
    # Two option bytes: the first as the target reads it (bit 6: the image with custom
    # records, bit 0 then synced or not), the second the rotation state.
    hosts = [bytes([0x40 | (i & 1), 0]) + query(n, QTYPES[i % len(QTYPES)])
             for i, n in enumerate(Z.HOSTS_NAMES)]
    # The rotating answers under each rotation state, plain and EDNS, UDP.
    rotating = [bytes([8 if edns == 0 else 0, rot]) + query(name, t, edns=edns)
                for name, t in Z.ROTATING_NAMES for rot in range(4) for edns in (-1, 0)]
    # Autopath: each client (second byte's bits 2-3) over the walk's names, plain and EDNS,
    # UDP and TCP, under two rotation states.
    autopath = [bytes([0x80 | (4 if tcp else 0) | (8 if edns == 0 else 0), c << 2 | rot])
                + query(name, t, edns=edns)
                for name, t in Z.AUTOPATH_NAMES for c in range(4) for rot in (0, 1)
                for edns, tcp in ((-1, False), (0, True))]
    write("answer", [bytes([opts[i % len(opts)], i % 4]) + q for i, q in enumerate(qs)]
          + hosts + rotating + autopath)
    write("tcp", streams(qs))
    write("scan", replies())
    write("zonefile", zonefiles())
    for t in ("answer", "tcp", "scan", "zonefile"):
        d = CORPUS / t
        print(f"{t}: {len(list(d.iterdir()))} seeds, {sum(f.stat().st_size for f in d.iterdir())} bytes")


if __name__ == "__main__":
    main()
