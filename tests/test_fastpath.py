"""The compiled packet path against its oracle (kdns/zone/refpath.py) and against DNS meaning.

Golden captures (tests/golden/*.txt) pin the exact bytes of representative replies; each is
decoded with dnspython and checked for what it must mean, and both packet paths must
reproduce it. A Hypothesis property and a mutation sweep then hold _fastpath.answer to
refpath.answer, action and bytes, over arbitrary and damaged queries.

Regenerate the captures (after an intended change of the wire output) with
``KDNS_REGEN_GOLDEN=1 pytest tests/test_fastpath.py -k golden`` and review the diff.
"""
import math
import mmap
import os
import struct
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdns.settings import EDNS_UDP_SIZE
from kdns.dns.names import reverse_name
from kdns.packet import _fastpath as F
from kdns.zone import refpath as P
from tests import zonefixtures as Z

GOLDEN = Path(__file__).parent / "golden"
SEND, HANDOFF, DROP = P.ACTION_SEND, P.ACTION_HANDOFF, P.ACTION_DROP

IMAGE_KINDS = {
    "insecure": dict(pods="insecure"),
    "verified": dict(pods="verified"),
    "disabled": dict(pods="disabled"),
    "unsynced": dict(pods="insecure", synced=False),
}
_IMAGES = {}


def images(kind: str):
    """(bytes, refpath.Image, _fastpath.Image) for one sample image, built once."""
    if kind not in _IMAGES:
        buf = Z.sample_image(**IMAGE_KINDS[kind])
        _IMAGES[kind] = (buf, P.Image(buf), F.Image(buf))
    return _IMAGES[kind]


def both(kind: str, q: bytes, tcp: bool = False, edns_max: int = EDNS_UDP_SIZE):
    _, ref, fast = images(kind)
    return (P.answer(ref, q, tcp=tcp, edns_max=edns_max),
            F.answer(fast, q, tcp=tcp, edns_max=edns_max))


def query(name, rdtype="A", *, edns=-1, payload=1232, options=None, qid=0x1234, opcode=0,
          ednsflags=0, want_dnssec=False) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload, options=options,
                               want_dnssec=want_dnssec, ednsflags=ednsflags)
    m.id = qid
    m.set_opcode(opcode)
    return m.to_wire()


# ------------------------------------------------------------------------ golden captures

S = "kubernetes.default.svc.cluster.local."
SOA_TEXT = "30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30"


def case(q, *, kind="insecure", action=SEND, rcode=dns.rcode.NOERROR, flags=("QR", "AA", "RD"),
         answer=(), authority=(), additional=(), edns=None, tcp=False):
    return dict(query=q, kind=kind, action=action, rcode=rcode, flags=set(flags),
                answer=list(answer), authority=list(authority), additional=list(additional),
                edns=edns, tcp=tcp)


def big_formerr_query() -> bytes:
    # Two questions: RFC 1035 leaves it undefined; kdns says FORMERR with a bare header.
    q = bytearray(query(S))
    q[5] = 2
    return bytes(q + q[12:])


CASES = {
    "hit_a": case(query(S, edns=0), edns=1232,
                  answer=[f"{S} 30 IN A 10.96.0.1"]),
    "nxdomain": case(query("nope.default.svc.cluster.local."), rcode=dns.rcode.NXDOMAIN,
                     authority=[f"cluster.local. {SOA_TEXT}"]),
    "nodata": case(query(S, "TXT"), authority=[f"cluster.local. {SOA_TEXT}"]),
    "ent_nodata": case(query("default.svc.cluster.local."),
                       authority=[f"cluster.local. {SOA_TEXT}"]),
    "srv_additional": case(query("_https._tcp." + S, "SRV", edns=0), edns=1232,
                           answer=[f"_https._tcp.{S} 30 IN SRV 0 100 443 {S}"],
                           additional=[f"{S} 30 IN A 10.96.0.1"]),
    "cname_chain": case(query("ext.default.svc.cluster.local."),
                        answer=[f"ext.default.svc.cluster.local. 30 IN CNAME {S}",
                                f"{S} 30 IN A 10.96.0.1"]),
    # A chain leaving the cluster is completed by the forwarder; a
    # CNAME query is still answered by the CNAME alone.
    "cname_outside": case(query("outside.default.svc.cluster.local."), action=HANDOFF),
    "cname_outside_cname": case(query("outside.default.svc.cluster.local.", "CNAME"),
                                answer=["outside.default.svc.cluster.local. 30 IN CNAME "
                                        "www.example.com."]),
    "pod_v4": case(query("1-2-3-4.default.pod.cluster.local."),
                   answer=["1-2-3-4.default.pod.cluster.local. 30 IN A 1.2.3.4"]),
    "pod_v6": case(query("fd00-10-244--5.default.pod.cluster.local.", "AAAA"),
                   answer=["fd00-10-244--5.default.pod.cluster.local. 30 IN AAAA fd00:10:244::5"]),
    "pod_verified_miss": case(query("1-2-3-4.default.pod.cluster.local."), kind="verified",
                              rcode=dns.rcode.NXDOMAIN,
                              authority=[f"cluster.local. {SOA_TEXT}"]),
    "ptr": case(query("1.0.96.10.in-addr.arpa.", "PTR"),
                answer=[f"1.0.96.10.in-addr.arpa. 30 IN PTR {S}"]),
    "reverse_miss_handoff": case(query("2.0.96.10.in-addr.arpa.", "PTR"), action=HANDOFF),
    "outside_handoff": case(query("google.com."), action=HANDOFF),
    # 120 A records do not fit 512 bytes: the 29 whole ones that do are sent, with TC.
    "tc_big_plain": case(query("big.default.svc.cluster.local."), answer=["big", 29],
                         flags=("QR", "AA", "RD", "TC")),
    # The client offers 4096 but kdns caps EDNS at 1232 (edns_max): 73 of the 120 fit.
    "big_edns_capped": case(query("big.default.svc.cluster.local.", edns=0, payload=4096),
                            answer=["big", 73], edns=1232, flags=("QR", "AA", "RD", "TC")),
    "big_tcp": case(query("big.default.svc.cluster.local."), tcp=True, answer=["big"]),
    "badvers": case(query(S, edns=1), rcode=dns.rcode.BADVERS, flags=("QR", "RD"), edns=1232),
    "notimp": case(query(S, opcode=dns.opcode.NOTIFY), rcode=dns.rcode.NOTIMP,
                   flags=("QR", "RD")),
    "formerr_two_questions": case(big_formerr_query(), rcode=dns.rcode.FORMERR,
                                  flags=("QR", "RD")),
    "unknown_edns_option": case(query(S, edns=0, options=[dns.edns.GenericOption(65001, b"hi")]),
                                edns=1232, answer=[f"{S} 30 IN A 10.96.0.1"]),
    "mixed_case": case(query("KuBeRnEtEs.DeFaUlT.sVc.Cluster.LOCAL."),
                       answer=["KuBeRnEtEs.DeFaUlT.sVc.Cluster.LOCAL. 30 IN A 10.96.0.1"]),
    "mixed_case_nxdomain": case(query("NoPe.Default.SVC.Cluster.Local."),
                                rcode=dns.rcode.NXDOMAIN,
                                # Every apex pointer in the SOA lands in the question.
                                authority=["Cluster.Local. " + SOA_TEXT.replace(
                                    "cluster.local.", "Cluster.Local.")]),
    "axfr_refused": case(query("cluster.local.", "AXFR"), rcode=dns.rcode.REFUSED,
                         flags=("QR", "RD")),
    "unsynced_servfail": case(query(S), kind="unsynced", rcode=dns.rcode.SERVFAIL,
                              flags=("QR", "RD")),
}


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.txt"


def write_golden(name: str, c: dict) -> None:
    _, ref, _ = images(c["kind"])
    action, reply = P.answer(ref, c["query"], tcp=c["tcp"])
    GOLDEN.mkdir(exist_ok=True)
    golden_path(name).write_text(
        f"# {name}: image={c['kind']} tcp={int(c['tcp'])}; hex query, action, hex reply\n"
        f"query {c['query'].hex()}\naction {action}\nreply {reply.hex()}\n")


def read_golden(name: str):
    fields = {}
    for line in golden_path(name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value
    return bytes.fromhex(fields["query"]), int(fields["action"]), bytes.fromhex(fields["reply"])


def rrset_texts(section):
    return [line for rrset in section for line in rrset.to_text().splitlines()]


def check_meaning(name: str, c: dict, action: int, reply: bytes) -> None:
    assert action == c["action"], name
    if action != SEND:
        assert reply == b""
        return
    m = dns.message.from_wire(reply)
    assert m.id == 0x1234
    assert m.rcode() == c["rcode"], name
    assert set(dns.flags.to_text(m.flags).split()) == c["flags"], name
    expected_question = dns.message.from_wire(c["query"], question_only=True).question
    if c["rcode"] != dns.rcode.FORMERR:
        assert m.question == expected_question
        assert str(m.question[0].name) == str(expected_question[0].name)   # case echoed
    if c["answer"][:1] == ["big"]:
        (rrset,) = m.answer
        want = c["answer"][1] if len(c["answer"]) > 1 else 120
        assert len(rrset) == want and rrset.rdtype == dns.rdatatype.A
    else:
        assert rrset_texts(m.answer) == c["answer"], name
    assert rrset_texts(m.authority) == c["authority"], name
    assert rrset_texts(m.additional) == c["additional"], name
    assert (m.edns >= 0) == (c["edns"] is not None)
    if c["edns"] is not None:
        assert m.payload == c["edns"]
        assert m.options == ()             # unknown options are never echoed


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    c = CASES[name]
    if os.environ.get("KDNS_REGEN_GOLDEN") == "1":
        write_golden(name, c)
    q, action, reply = read_golden(name)
    assert q == c["query"], "the capture's query drifted from the case; regenerate"
    check_meaning(name, c, action, reply)
    _, ref, fast = images(c["kind"])
    assert P.answer(ref, q, tcp=c["tcp"]) == (action, reply)
    assert F.answer(fast, q, tcp=c["tcp"], edns_max=EDNS_UDP_SIZE) == (action, reply)


def test_golden_files_are_all_cases():
    assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(CASES)


# ------------------------------------------------------------------------ sweeps


QTYPES = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "CNAME", "MX", "AXFR", "IXFR", "ANY",
          "HTTPS", "CAA"]


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_every_sample_name_and_type(kind):
    for name in Z.SAMPLE_NAMES:
        for qt in QTYPES:
            for edns in (-1, 0):
                for tcp in (False, True):
                    q = query(name.swapcase() if qt == "AAAA" else name, qt, edns=edns)
                    ref, fast = both(kind, q, tcp=tcp)
                    assert fast == ref, (name, qt, edns, tcp)


def test_every_truncation_and_byte_mutation():
    """Cut every valid query at every length and overwrite every byte with values that sit on
    parser boundaries: both paths agree on each (action and bytes)."""
    seeds = [CASES[n]["query"] for n in ("hit_a", "srv_additional", "unknown_edns_option",
                                          "pod_v4", "pod_v6", "ptr", "badvers")]
    for q in seeds:
        for cut in range(len(q) + 1):
            ref, fast = both("insecure", q[:cut])
            assert fast == ref, (q.hex(), cut)
        for pos in range(len(q)):
            for v in (0x00, 0x01, 0x29, 0x3F, 0x40, 0x80, 0xC0, 0xC1, 0xFF):
                m = bytearray(q)
                m[pos] = v
                ref, fast = both("insecure", bytes(m))
                assert fast == ref, (q.hex(), pos, v)


POD_LABELS = ["1-2-3-4", "01-2-3-4", "1-2-3-04", "0-0-0-0", "255-255-255-255", "256-1-1-1",
              "1-2-3", "1-2-3-4-5", "1--2-3", "1-2--3", "--1-2", "1-2-3--", "1-2-3-4-",
              "-1-2-3", "a-b-c-d", "1-2-3-4a", "1:2:3:4", "fd00--5", "fd00-10-244--5",
              "FD00-10-244--5", "fd00-10-244-0-0-0-0-5", "fd00-10-244-0-0-0-0-0-5",
              "fd00-0-0-0-0-0-0-00005", "fd00-0-0-0-0-0-0-0005", "fd00:10:244::5", "--", "---",
              "----", "0--0", "--1", "1--", "1---2", "1--2--3",
              "ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff",
              "g--1", "1-2-3-4-5-6-7", "1-2-3-4-5-6-7-8", "1-2-3-4-5-6-7-8-9", "1--2-3-4-5-6-7",
              "1--2-3-4-5-6-7-8", "-fd00--5", "fd00--5-"]
REVERSE_NAMES = ["1.0.96.10", "01.0.96.10", "1.0.96.010", "256.0.96.10", "1.0.96", "1.1.0.96.10",
                 "a.0.96.10", "1.0.96.1o"]


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_pod_and_reverse_names_at_the_parsers_edges(kind):
    names = [f"{lab}.{ns}.pod.cluster.local." for lab in POD_LABELS
             for ns in ("default", "kube-system", "nons")]
    names += [f"{r}.in-addr.arpa." for r in REVERSE_NAMES]
    v6 = reverse_name("fd00::20")
    names += [v6, v6.upper(), "00." + v6[2:], "g" + v6[1:], v6[2:], "0." + v6]
    for name in names:
        for qt in ("A", "AAAA", "PTR"):
            ref, fast = both(kind, query(name, qt))
            assert fast == ref, (name, qt)


# ------------------------------------------------------------------------ property


LABEL_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789-_ABCZ:"


@st.composite
def qnames(draw):
    """Wire labels: sample names with random case and extra labels, or random labels."""
    if draw(st.booleans()):
        return draw(synthesised_names())
    if draw(st.booleans()):
        base = draw(st.sampled_from(Z.SAMPLE_NAMES)).encode()
        labels = [bytes(c ^ 0x20 if chr(c).isalpha() and draw(st.booleans()) else c for c in lab)
                  for lab in base.split(b".")]
        extra = [] if not rarely(draw, 3) else draw(st.lists(st.one_of(
            st.binary(min_size=1, max_size=20),
            st.text("0123456789abcdef-", min_size=1, max_size=40).map(str.encode),
            st.sampled_from([b"1-2-3-4", b"10-244-0-5", b"fd00-10-244--5", b"0", b"ff",
                             b"a", b"_tcp", b"pod", b"default", b"1--2", b"::1"]),
        ), min_size=1, max_size=4))
        labels = extra + labels
    elif rarely(draw, 5):                   # long labels, names near and past 255 bytes
        labels = draw(st.lists(st.binary(min_size=1, max_size=63), min_size=3, max_size=6))
    else:
        labels = draw(st.lists(st.binary(min_size=1, max_size=12) | st.sampled_from(
            [b"cluster", b"local", b"svc", b"in-addr", b"arpa", b"ip6", b"pod", b"10", b"0"]),
            max_size=8))
    return labels


DECIMAL = st.sampled_from(["0", "1", "5", "10", "96", "244", "255", "256", "01", "00", "1000",
                           "", "2a", "-1"]) | st.text("0123456789", min_size=1, max_size=4)
HEXGROUP = st.sampled_from(["fd00", "FD00", "10", "244", "5", "0", "", "00000", "g", "ffff"]) | \
    st.text("0123456789abcdefABCDEF", min_size=0, max_size=5)
NIBBLE = st.sampled_from(list("0123456789abcdefABCDEF")) | st.sampled_from(["g", "00", ""])


@st.composite
def synthesised_names(draw):
    """Pod and reverse names near the parsers' edges: leading zeros, overflows, empty or
    long groups, '--' anywhere, too many or too few parts, nibbles that are not one hex."""
    kind = draw(st.sampled_from(["pod4", "pod6", "rev4", "rev6"]))
    if kind == "pod4":
        label = "-".join(draw(st.lists(DECIMAL, min_size=3, max_size=5)))
    elif kind == "pod6":
        groups = draw(st.lists(HEXGROUP, min_size=8, max_size=8))
        if draw(st.booleans()):               # '::' for a run of groups, RFC 4291 §2.2
            i = draw(st.integers(0, 8))
            j = draw(st.integers(i, 8))
            groups[i:j] = [""] * (1 + (i == 0) + (j == 8) if i < j else 1)
        if rarely(draw, 4):
            groups = draw(st.lists(HEXGROUP, min_size=1, max_size=10))
        label = draw(st.sampled_from(["-", "-", "-", ":"])).join(groups)
    if kind.startswith("pod"):
        ns = draw(st.sampled_from(["default", "kube-system", "nons", "Default"]))
        return [lab.encode() for lab in [label, ns, "pod", "cluster", "local"] if lab] or [b"x"]
    if kind == "rev4":
        known, pool, tail = ["1", "0", "96", "10"], DECIMAL, ["in-addr", "arpa"]
    else:
        known, pool, tail = reverse_name("fd00::20").split(".")[:32], NIBBLE, ["ip6", "arpa"]
    if draw(st.booleans()):   # a name the image holds, with a few parts redrawn
        octets = list(known)
        for _ in range(draw(st.integers(0, 2))):
            octets[draw(st.integers(0, len(octets) - 1))] = draw(pool)
    else:
        octets = draw(st.lists(pool, min_size=len(known) - 1, max_size=len(known) + 1))
    return [lab.encode() for lab in octets + tail if lab] or [b"x"]


def encode_name(labels) -> bytes:
    return b"".join(bytes([len(lab) & 0xFF]) + lab[:63] for lab in labels) + b"\0"


def rarely(draw, one_in: int) -> bool:
    # Hypothesis favours boundary integers (0 comes up far more than 1/n), so weights are
    # written out as a list to keep most queries well formed.
    return draw(st.sampled_from([True] + [False] * (one_in - 1)))


@st.composite
def queries(draw):
    labels = draw(qnames())
    qtype = draw(st.sampled_from([1, 28, 33, 12, 16, 6, 2, 5, 15, 251, 252, 255, 65]) |
                 st.integers(0, 0xFFFF))
    qclass = draw(st.sampled_from([3, 255, 254])) if rarely(draw, 10) else 1
    opcode = draw(st.sampled_from([1, 2, 4, 5, 15])) if rarely(draw, 8) else 0
    flags = (opcode << 11) | draw(st.integers(0, 0x07FF))
    if rarely(draw, 20):
        flags |= 0x8000
    body = encode_name(labels) + struct.pack("!HH", qtype, qclass)
    records, an_ns = [], 0
    if rarely(draw, 6):                     # junk in answer/authority before any OPT
        an_ns = 1
        records.append(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + b"\1\2\3\4")
    if rarely(draw, 12):                    # OPT outside the additional section: FORMERR
        an_ns += 1
        records.append(b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0))
    if draw(st.booleans()):
        size = draw(st.sampled_from([0, 100, 512, 1232, 4096, 65535]) | st.integers(0, 0xFFFF))
        version = draw(st.sampled_from([1, 255])) if rarely(draw, 8) else 0
        do = draw(st.booleans())
        opts = b"".join(struct.pack("!HH", code, len(data)) + data for code, data in draw(
            st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12)), max_size=3)))
        records.append(b"\0" + struct.pack("!HHIH", 41, size, (version << 16) | (do << 15),
                                           len(opts)) + opts)
    qd = draw(st.sampled_from([0, 2])) if rarely(draw, 10) else 1
    counts = [qd, an_ns, 0, len(records) - an_ns]
    if rarely(draw, 10):
        counts[draw(st.integers(1, 3))] = draw(st.integers(0, 0xFFFF))
    q = bytearray(struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)), flags, *counts) + body +
                  b"".join(records))
    for _ in range(draw(st.sampled_from([1, 3])) if rarely(draw, 4) else 0):   # damage
        pos = draw(st.integers(0, len(q) - 1))
        q[pos] = draw(st.integers(0, 255))
    if rarely(draw, 8):
        del q[draw(st.integers(0, len(q))):]
    return bytes(q)


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
@settings(max_examples=int(os.environ.get("KDNS_HYPOTHESIS_EXAMPLES", "1000")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(q=queries(), tcp=st.booleans(),
       edns_max=st.sampled_from([1232, 1232, 512, 4096, 65535, 0, 100, 70000]))
def test_fastpath_matches_refpath(kind, q, tcp, edns_max):
    ref, fast = both(kind, q, tcp=tcp, edns_max=edns_max)
    assert fast == ref


# ------------------------------------------------------------------------ Image object


def test_image_properties_and_buffers():
    buf = Z.sample_image()
    img = F.Image(buf)
    assert img.nbytes == len(buf)
    assert img.synced is True and F.Image(Z.sample_image(synced=False)).synced is False
    assert img.serial == struct.unpack_from("<Q", buf, 48)[0]
    assert img.verify() is True
    with mmap.mmap(-1, len(buf)) as mm:      # shared memory is how workers get images
        mm[:] = buf
        mimg = F.Image(mm)
        q = query(S)
        assert F.answer(mimg, q, edns_max=EDNS_UDP_SIZE) == F.answer(img, q, edns_max=EDNS_UDP_SIZE)
        with pytest.raises(BufferError):
            mm.close()                       # the image keeps its buffer exported
        del mimg


def test_image_rejects_bad_input():
    buf = Z.sample_image()
    with pytest.raises(ValueError, match="magic"):
        F.Image(b"X" + buf[1:])
    with pytest.raises(ValueError, match="length"):
        F.Image(buf + b"\0")
    with pytest.raises(ValueError, match="shorter"):
        F.Image(b"KDNSIMG1")
    damaged = bytearray(buf)
    damaged[-1] ^= 0xFF
    with pytest.raises(ValueError, match="crc32"):
        F.Image(bytes(damaged)).verify()


def test_image_rejects_offsets_outside_it():
    buf = bytearray(Z.sample_image())
    struct.pack_into("<I", buf, 20, 10 ** 6)             # nnodes far past the end
    with pytest.raises(ValueError, match="node table"):
        F.Image(bytes(buf))
    buf = bytearray(Z.sample_image())
    struct.pack_into("<I", buf, 40, len(buf) - 4)         # SERVFAIL blob past the end
    with pytest.raises(ValueError, match="SERVFAIL"):
        F.Image(bytes(buf))


def test_bench_answer_measures_the_real_path():
    _, _, fast = images("insecure")
    ns = F.bench_answer(fast, query(S), 2000, edns_max=EDNS_UDP_SIZE)
    assert math.isfinite(ns) and 0 < ns < 1e6


def test_none_is_refused_at_the_boundary():
    # The C path dereferences the image: None must stop at the Python edge, not crash.
    with pytest.raises(TypeError):
        F.answer(None, query(S), edns_max=EDNS_UDP_SIZE)
    with pytest.raises(TypeError):
        F.tcp_answer(None, F.Counters(bytearray(8192)), query(S), EDNS_UDP_SIZE)


@pytest.mark.parametrize("owner", ["c000", "c019", "c018", "ffff", "0161c018"],
                         ids=["header", "forward", "self", "outside", "loop"])
def test_bad_pointers_in_a_query_are_formerr_in_both_paths(owner):
    """RFC 1035 §4.1.4: pointers only backwards to a prior name inside the message (the
    owner of an additional-section record here, at offset 24)."""
    q = bytearray(query("a.test."))
    q[10:12] = b"\x00\x01"                                      # ARCOUNT 1
    q += bytes.fromhex(owner) + bytes.fromhex("0010 0001 00000000 0000")
    (ra, pa), (rb, pb) = both("insecure", bytes(q))
    assert (ra, pa) == (rb, pb) and pa[3] & 0xF == dns.rcode.FORMERR
    q[24:24 + len(bytes.fromhex(owner))] = b""
    q[24:24] = b"\xc0\x0c"                                    # a valid pointer still parses
    (ra, pa), (rb, pb) = both("insecure", bytes(q))
    assert (ra, pa) == (rb, pb) and (ra != SEND or pa[3] & 0xF != dns.rcode.FORMERR)


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_ra_flag_is_the_only_difference_and_both_paths_agree(kind):
    """A forwarding worker sets RA (RFC 1035 §4.1.1) on every reply of the image, in both
    paths alike; nothing else in the reply changes."""
    _, ref, fast = images(kind)
    qs = [query(S), query("nope." + S), query("x.example.", "A"), query(S, edns=0),
          query(S, opcode=2), b"\x12\x34\x00\x00\x00\x02" + bytes(6)]
    for q in qs:
        plain = P.answer(ref, q)
        ra_p = P.answer(ref, q, ra=True)
        assert ra_p == F.answer(fast, q, edns_max=EDNS_UDP_SIZE, ra=True)
        assert F.answer(fast, q, edns_max=EDNS_UDP_SIZE) == plain
        if plain[0] == SEND:
            assert ra_p[1][3] & 0x80 and not plain[1][3] & 0x80
            assert ra_p[1][:3] + ra_p[1][4:] == plain[1][:3] + plain[1][4:]
        else:
            assert ra_p == plain


# ------------------------------------------------------------------------ rotation
# A, AAAA and SRV answers rotate (CoreDNS loadbalance; kdns/zone/layout.py, Rotation). The
# two paths must give the same bytes for the same rotation state, and every rotated reply
# must mean what the compiled order means, records moved cyclically.

_ROT = {}


def rotating_images():
    if not _ROT:
        buf = Z.sample_image(rotating=True)
        _ROT["img"] = (buf, P.Image(buf), F.Image(buf))
    return _ROT["img"]


def records_of(reply: bytes):
    m = dns.message.from_wire(reply)          # every record whole, or this raises
    return m, [rd.to_text() for rrset in m.answer for rd in rrset]


ROT_CASES = Z.ROTATING_NAMES + [("big.default.svc.cluster.local", "A")]


@pytest.mark.parametrize("name, rdtype", ROT_CASES)
def test_rotated_replies_are_the_same_bytes_in_both_paths_at_every_size(name, rdtype):
    _, ref, fast = rotating_images()
    for tcp in (False, True):
        for size in ((512,) if tcp else range(512, 1300, 13)):
            q = query(name, rdtype, edns=0, payload=size)
            base = None
            for r in range(0, 13):
                want = P.answer(ref, q, tcp=tcp, edns_max=4096, rotation=r)
                assert F.answer(fast, q, tcp=tcp, edns_max=4096, rotation=r) == want, (size, r)
                assert len(want[1]) <= (65535 if tcp else size)
                m, recs = records_of(want[1])
                if base is None:
                    base = m
                assert m.flags & dns.flags.TC or sum(len(s) for s in m.answer) == sum(
                    len(s) for s in base.answer) or tcp


@pytest.mark.parametrize("name, rdtype", ROT_CASES)
def test_a_rotated_reply_is_the_compiled_order_turned(name, rdtype):
    """Over TCP (whole): the last answer RRset's records turned by the counter, everything
    before it (a CNAME) in place; SRV glue still names the SRV targets with their
    addresses, so its compression pointers stay valid."""
    _, ref, fast = rotating_images()
    q = query(name, rdtype)
    m0 = dns.message.from_wire(P.answer(ref, q, tcp=True, edns_max=1232)[1])
    run = [rd.to_text() for rd in m0.answer[-1]]
    assert len(run) >= 2
    glue0 = sorted(rr.to_text() for rr in m0.additional)
    for r in range(2 * len(run) + 1):
        reply = F.answer(fast, q, tcp=True, edns_max=1232, rotation=r)[1]
        assert reply == P.answer(ref, q, tcp=True, edns_max=1232, rotation=r)[1]
        m = dns.message.from_wire(reply)
        k = r % len(run)
        assert [rd.to_text() for rd in m.answer[-1]] == run[k:] + run[:k]
        assert [s.to_text() for s in m.answer[:-1]] == [s.to_text() for s in m0.answer[:-1]]
        assert sorted(rr.to_text() for rr in m.additional) == glue0
        if rdtype == "SRV":
            targets = {rd.target for rd in m.answer[-1]}
            assert {rrset.name for rrset in m.additional} == targets


@pytest.mark.parametrize("name, rdtype", [("_http._tcp.hl.default.svc.cluster.local", "SRV"),
                                          ("big.default.svc.cluster.local", "A")])
def test_a_truncated_rotated_reply_keeps_the_most_whole_records_that_fit(name, rdtype):
    """SRV targets differ in length, so each rotation cuts elsewhere: the reply holds the
    longest run of whole rotated records within the size, with TC (RFC 2181 §9)."""
    _, ref, fast = rotating_images()
    whole = dns.message.from_wire(P.answer(ref, query(name, rdtype), tcp=True,
                                           edns_max=1232)[1])
    run = list(whole.answer[-1])
    sizes = [len(rd.to_wire()) + 12 for rd in run]      # owner pointer, fixed part, rdata
    for r in range(len(run)):
        order = list(range(r, len(run))) + list(range(r))
        for size in range(512, 700, 5):
            q = query(name, rdtype, edns=0, payload=size)
            reply = F.answer(fast, q, edns_max=4096, rotation=r)[1]
            assert reply == P.answer(ref, q, edns_max=4096, rotation=r)[1]
            m = dns.message.from_wire(reply)
            got = list(m.answer[-1]) if m.answer else []
            fit, room = 0, size - len(q)              # the echoed question and OPT (11 bytes)
            while fit < len(run) and sum(sizes[i] for i in order[:fit + 1]) <= room:
                fit += 1
            assert [rd.to_text() for rd in got] == [run[i].to_text() for i in order[:fit]]
            if fit < len(run):
                assert m.flags & dns.flags.TC and not m.additional


def test_rotation_state_advances_per_answer_and_matches_the_reference():
    """A Rotation's counters: one per hashed blob, advanced by each answer that rotates and
    by nothing else; the compiled and reference paths keep the same counters."""
    _, ref, fast = rotating_images()
    rf, rp = F.Rotation(), P.Rotation()
    asks = [query(n, t) for n, t in ROT_CASES] + [query(S), query("nope.default.svc.cluster.local")]
    for i in range(60):
        q = asks[i * 7 % len(asks)]
        tcp = bool(i % 5 == 0)
        assert F.answer(fast, q, tcp=tcp, edns_max=1232, rotation=rf) == \
            P.answer(ref, q, tcp=tcp, edns_max=1232, rotation=rp)
    assert rf.slots == rp.slots and any(rp.slots)
    # Answers that do not rotate leave the counters alone.
    rf, rp = F.Rotation(), P.Rotation()
    for q in asks[len(ROT_CASES):]:
        assert F.answer(fast, q, edns_max=1232, rotation=rf) == \
            P.answer(ref, q, edns_max=1232, rotation=rp)
    assert not any(rf.slots) and not any(rp.slots)
    # Each name rotates on its own: its answers step through every order in turn.
    rf = F.Rotation()
    q = query("hl.default.svc.cluster.local")
    firsts = [records_of(F.answer(fast, q, edns_max=1232, rotation=rf)[1])[1][0]
              for _ in range(12)]
    for _ in range(3):
        F.answer(fast, query("_http._tcp.hl.default.svc.cluster.local", "SRV"), edns_max=1232,
                 rotation=rf)
    assert firsts[:6] == firsts[6:] and len(set(firsts)) == 6
    assert records_of(F.answer(fast, q, edns_max=1232, rotation=rf)[1])[1][0] == firsts[0]


def test_without_rotation_state_the_compiled_order():
    _, ref, fast = rotating_images()
    for name, rdtype in ROT_CASES:
        q = query(name, rdtype)
        assert F.answer(fast, q, edns_max=1232) == F.answer(fast, q, edns_max=1232, rotation=0)
        assert P.answer(ref, q, edns_max=1232) == P.answer(ref, q, edns_max=1232, rotation=0)
        n = len(records_of(P.answer(ref, q, tcp=True, edns_max=1232)[1])[0].answer[-1])
        assert F.answer(fast, q, edns_max=1232, rotation=n) == F.answer(fast, q, edns_max=1232)


def blob_of(img: P.Image, name: str, qtype: int) -> int:
    from kdns.zone import layout as L
    node = 0
    for label in reversed(name.split(".")):
        node = img.child(img.node(node), label.encode())
        assert node >= 0
    n = img.node(node)
    return img.lookup_rr(img.u32(n + L.NODE_RR_OFF), img.u16(n + L.NODE_NRR), qtype)


@pytest.mark.parametrize("rot_at, rot_n", [(0, 1), (0, 7), (5, 2), (3, 0), (0, 65535)])
def test_image_check_refuses_a_rotation_outside_the_segments(rot_at, rot_n):
    from kdns.zone import layout as L
    buf, ref, _ = rotating_images()
    blob = blob_of(ref, "hl.default.svc.cluster.local", dns.rdatatype.A)
    assert struct.unpack_from("<HH", buf, blob + L.BLOB_ROT_AT) == (0, 6)
    bad = bytearray(buf)
    struct.pack_into("<HH", bad, blob + L.BLOB_ROT_AT, rot_at, rot_n)
    with pytest.raises(ValueError):
        F.Image(bytes(bad))
