"""CoreDNS's ``rewrite name`` rules: what they match, the name they ask instead, and how the
reply is rewritten back for the client.

Why: operators alias names with ``rewrite name`` (``exact db.example.org
db.prod.svc.cluster.local``, ``suffix .corp.internal. .svc.cluster.local.``). kdns compiles
an exact rule whose target is a name of its image into the image (``alias_rrsets``: the
alias answers like the target, with the client's name as owner), and applies every other
rule here, on the worker's Python side, before the lookup or the forward.

CoreDNS's rules (plugin/rewrite: rewrite.go, name.go, reverter.go), which kdns follows:

- ``rewrite [continue|stop] name [exact|prefix|suffix|substring|regex] FROM TO [answer auto
  | answer name FROM TO | answer value FROM TO ...]``, or the block form ``rewrite
  [continue|stop] { name ...; answer ... }``. Without a type, ``exact``. FROM and TO are
  lower-cased and made absolute (a trailing dot), except a regex's FROM; a regex's TO may
  use ``{N}``, the pattern's groups.
- Every rule matches the client's name (lower case, absolute): CoreDNS's ``state.Name()``
  keeps the first name it read, so a ``continue`` rule after a matching one still sees the
  client's name, and the question becomes the last matching rule's TO. ``stop`` (the
  default) ends the rules at its match. A TO that is not a domain name: SERVFAIL.
- The reply's question is the client's again (always). Its records' names are rewritten
  back when: the rule is ``exact`` (always), or has ``answer auto`` (suffix: TO's suffix
  back to FROM's; the others: the asked name, and names under it, back to the client's), or
  ``answer name`` (owner names) / ``answer value`` (CNAME, DNAME, NS, PTR, MX, SRV, NAPTR
  targets and the SOA's primary name) regexes. Several rules' reverts run last rule first.
  Without any of these the records keep the rewritten name (the client sees a mismatch, as
  with CoreDNS).

What this must not do: open sockets or read the image; it maps names and messages.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from kdns.dns import rr as R

KINDS = ("exact", "prefix", "suffix", "substring", "regex")
MAX_REGEX = 10000           # CoreDNS maxRegexpLen

T_CNAME, T_NS, T_PTR, T_DNAME, T_MX, T_SRV, T_SOA, T_NAPTR, T_OPT = 5, 2, 12, 39, 15, 33, 6, 35, 41
# RFC 3597 §4: only these types' names may be compressed; SRV's never (RFC 2782).
_COMPRESSED = (T_CNAME, T_NS, T_PTR, T_MX, T_SOA)


class RewriteError(ValueError):
    """A rule kdns cannot use; ``str()`` is one sentence naming file:line."""


def _fqdn(text: str) -> str:
    # CoreDNS plugin.Name.Normalize: lower case, fully qualified.
    text = text.lower()
    return text if text.endswith(".") else text + "."


def _groups(repl: str, m: re.Match) -> str:
    """CoreDNS: ``{N}`` in the replacement is the N-th group of the match (``{0}``: all)."""
    out = repl
    for i in range(len(m.groups()) + 1):
        out = out.replace("{%d}" % i, m.group(i) or "")
    return out


def _compile(pattern: str, repl: str, where: str) -> re.Pattern:
    if len(pattern) > MAX_REGEX:
        raise RewriteError(f"{where}: the regex pattern is longer than {MAX_REGEX} characters.")
    try:
        pat = re.compile(pattern)
    except re.error as e:
        raise RewriteError(f"{where}: {pattern!r} is not a regular expression ({e}).") from None
    used = sum(1 for i in range(101) if "{%d}" % i in repl)
    if used > pat.groups:
        raise RewriteError(f"{where}: {repl!r} uses more groups than {pattern!r} has.")
    return pat


@dataclass(frozen=True)
class NameRule:
    """One ``rewrite name`` rule. ``answers``: (field, FROM, TO) for each ``answer name`` /
    ``answer value`` option, field "name" or "value"."""
    where: str
    kind: str
    frm: str
    to: str
    stop: bool = True
    auto: bool = False
    answers: tuple = ()

    def as_list(self) -> list:
        """A JSON form (the forwarding channel carries the rules to the workers)."""
        return [self.where, self.kind, self.frm, self.to, self.stop, self.auto,
                [list(a) for a in self.answers]]

    @classmethod
    def from_list(cls, v) -> "NameRule":
        return cls(v[0], v[1], v[2], v[3], bool(v[4]), bool(v[5]),
                   tuple(tuple(a) for a in v[6]))

    def pattern(self) -> re.Pattern:
        return _compile(self.frm, self.to, self.where)

    def apply(self, name: str) -> str | None:
        """The question name this rule asks instead of ``name``, or None: no match."""
        k = self.kind
        if k == "exact":
            return self.to if name == self.frm else None
        if k == "prefix":
            return self.to + name[len(self.frm):] if name.startswith(self.frm) else None
        if k == "suffix":
            return name[:-len(self.frm)] + self.to if name.endswith(self.frm) else None
        if k == "substring":
            return name.replace(self.frm, self.to) if self.frm in name else None
        m = _pattern(self).search(name)
        return _fqdn(_groups(self.to, m)) if m else None

    def reverts(self, asked: str, client: str) -> list:
        """The response rules this match adds: (field, how, a, b) with how "remap",
        "suffix" or "regex" (CoreDNS's remap, suffix and regex string rewriters)."""
        out = []
        if self.kind == "exact" or (self.auto and self.kind != "suffix"):
            out += [("name", "remap", asked, client), ("value", "remap", asked, client)]
        elif self.auto:
            out += [("name", "suffix", self.to, self.frm), ("value", "suffix", self.to, self.frm)]
        out += [(f, "regex", a, b) for f, a, b in self.answers]
        return out


_PATTERNS: dict = {}


def _pattern(rule: NameRule) -> re.Pattern:
    p = _PATTERNS.get((rule.frm, rule.to))
    if p is None:
        p = _PATTERNS[(rule.frm, rule.to)] = rule.pattern()
    return p


def parse_rule(args: list[str], where: str) -> NameRule:
    """``[continue|stop] name [TYPE] FROM TO [answer ...]`` (tokens after ``rewrite``)."""
    stop = True
    if args and args[0].lower() in ("stop", "continue"):
        stop = args[0].lower() == "stop"
        args = args[1:]
    if not args or args[0].lower() != "name":
        field = args[0] if args else "nothing"
        raise RewriteError(f"{where}: rewrite {field} is not supported by kdns (only rewrite "
                           f"name rules are).")
    args = args[1:]
    if len(args) < 2:
        raise RewriteError(f"{where}: a rewrite name rule needs FROM and TO.")
    if len(args) == 2:
        kind, frm, to, rest = "exact", args[0], args[1], []
    else:
        kind, frm, to, rest = args[0].lower(), args[1], args[2], args[3:]
    if kind not in KINDS:
        raise RewriteError(f"{where}: {args[0]!r} is no rewrite name type ({', '.join(KINDS)}).")
    if kind != "regex":
        frm = _fqdn(frm)
    to = _fqdn(to)
    auto, answers, i = False, [], 0
    if rest and len(rest) < 2:
        raise RewriteError(f"{where}: {' '.join(rest)!r} is no answer rule; write answer auto, "
                           f"answer name FROM TO or answer value FROM TO.")
    last = ""
    while i < len(rest):
        if last == "" and rest[i] != "answer":
            raise RewriteError(f"{where}: {rest[i]!r} after TO; only answer rules may follow.")
        if rest[i] == "answer":
            i += 1
        if i >= len(rest):
            raise RewriteError(f"{where}: answer without auto, name or value.")
        last = rest[i]
        i += 1
        if last == "auto":
            auto = True
        elif last in ("name", "value"):
            if len(rest) - i < 2:
                raise RewriteError(f"{where}: answer {last} needs FROM and TO.")
            _compile(rest[i], rest[i + 1], where)
            answers.append((last, rest[i], _fqdn(rest[i + 1])))
            i += 2
        else:
            raise RewriteError(f"{where}: {last!r} is no answer rule (auto, name or value).")
    if auto and any(f == "name" for f, _, _ in answers):
        raise RewriteError(f"{where}: answer auto cannot be combined with answer name.")
    rule = NameRule(where, kind, frm, to, stop, auto, tuple(answers))
    if kind in ("regex", "exact"):
        _compile(frm if kind == "regex" else re.escape(frm), to, where)
    return rule


def valid_name(name: str) -> bool:
    try:
        R.name_labels(name)
        name.encode("ascii")
    except (R.NameError_, UnicodeEncodeError):
        return False
    return True


def rewrite(rules, name: str):
    """``name`` (lower case, absolute) -> (the name to ask, the response rules), None when no
    rule matches, or ("", ()) when a matching rule makes a name that is not a domain name
    (CoreDNS answers SERVFAIL)."""
    asked, back, hit = name, [], False
    for rule in rules:
        new = rule.apply(name)
        if new is None:
            continue
        if not valid_name(new):
            return "", ()
        hit, asked = True, new
        back += rule.reverts(new, name)
        if rule.stop:
            break
    return (asked, tuple(back)) if hit else None


def revert_name(back, field: str, name: str) -> str:
    """``name`` through the response rules of ``field``, last rule first (reverter.go)."""
    low = name.lower()
    out = low
    for f, how, a, b in reversed(back):
        if f != field:
            continue
        if how == "remap":
            if out == a:
                out = b
            elif out.endswith("." + a):
                out = out[:-len(a)] + b
        elif how == "suffix":
            if out.endswith(a):
                out = out[:-len(a)] + b
        else:
            m = re.search(a, out)
            if m:
                out = _fqdn(_groups(b, m))
    return name if out == low else out


# --------------------------------------------------------------------------- compile time


def rdata_with(rd, back):
    """A record's rdata with its target names reverted (CoreDNS ``answer value``)."""
    if isinstance(rd, R.Target):
        return R.Target(revert_name(back, "value", rd.target))
    if isinstance(rd, R.Srv):
        return R.Srv(rd.priority, rd.weight, rd.port, revert_name(back, "value", rd.target))
    if isinstance(rd, R.Soa):
        return R.Soa(revert_name(back, "value", rd.mname), rd.rname, rd.serial, rd.refresh,
                     rd.retry, rd.expire, rd.minimum)
    return rd


def compiled_aliases(rules) -> dict:
    """alias name -> (target name, response rules) for every exact rule: the rules decide
    these at compile time (the name is fixed), so the image can answer them."""
    out = {}
    for rule in rules:
        if rule.kind != "exact" or rule.frm in out:
            continue
        res = rewrite(rules, rule.frm)
        if res is None or not res[0] or res[0] == rule.frm:
            continue
        out[rule.frm] = res
    return out


def alias_rrsets(alias: str, back, target_sets) -> list:
    """The alias's RRsets: the target's, owned by the alias (the client's name, as the
    reverted answer has it) and their targets reverted."""
    return [R.RRset(alias, s.rtype, s.ttl, tuple(rdata_with(rd, back) for rd in s.rdatas))
            for s in target_sets]


# --------------------------------------------------------------------------- wire


def _read_name(m: bytes, off: int) -> tuple[str, int]:
    """(absolute name, offset after it), following compression pointers (RFC 1035 §4.1.4)."""
    labels, end, jumps = [], None, 0
    while True:
        if off >= len(m):
            raise ValueError("name runs past the message")
        n = m[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(m) or jumps > 64:
                raise ValueError("bad pointer")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | m[off + 1]
            jumps += 1
            continue
        if n & 0xC0:
            raise ValueError("bad label")
        if n == 0:
            return ("".join(lab + "." for lab in labels) or "."), (off + 1 if end is None else end)
        labels.append(m[off + 1:off + 1 + n].decode("latin-1"))
        off += 1 + n


class _Writer:
    def __init__(self, head: bytes):
        self.buf = bytearray(head)
        self.names: dict = {}

    def name(self, name: str, compress: bool = True) -> None:
        labels = [lab for lab in name.split(".") if lab]
        for i in range(len(labels)):
            key = ".".join(labels[i:]).lower()
            at = self.names.get(key)
            if at is not None and compress:
                self.buf += struct.pack("!H", 0xC000 | at)
                return
            if len(self.buf) < 0x3FFF:
                self.names.setdefault(key, len(self.buf))
            raw = labels[i].encode("latin-1")
            self.buf.append(len(raw))
            self.buf += raw
        self.buf.append(0)


def revert_reply(reply: bytes, client_question: bytes, back, limit: int) -> bytes:
    """``reply`` (to the rewritten question) as the client gets it: the client's question
    (its case too), the records' names reverted by ``back``, cut to ``limit`` bytes with TC
    when answer or authority records had to go (RFC 2181 §9)."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", reply, 4)
    off = 12
    for _ in range(qd):
        _, off = _read_name(reply, off)
        off += 4
    recs = []
    for i in range(an + ns + ar):
        owner, off = _read_name(reply, off)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", reply, off)
        off += 10
        rdata = reply[off:off + rdlen]
        if len(rdata) != rdlen:
            raise ValueError("record runs past the message")
        recs.append((i, owner, rtype, rclass, ttl, off, rdlen))
        off += rdlen
    w = _Writer(reply[:12])
    w.buf += client_question
    # The client's question holds the name its reverted owners mostly are: point at it.
    qname, _ = _read_name(bytes(w.buf), 12)
    w.names.setdefault(qname.lower().rstrip("."), 12)
    ends, kept_opt = [], None
    for i, owner, rtype, rclass, ttl, start, rdlen in recs:
        if rtype == T_OPT:
            kept_opt = (owner, rtype, rclass, ttl, reply[start:start + rdlen])
            ends.append(None)
            continue
        w.name(revert_name(back, "name", owner))
        w.buf += struct.pack("!HHI", rtype, rclass, ttl)
        len_at = len(w.buf)
        w.buf += b"\0\0"
        _rdata(w, reply, rtype, start, rdlen, back)
        struct.pack_into("!H", w.buf, len_at, len(w.buf) - len_at - 2)
        ends.append(len(w.buf))
    opt = b""
    if kept_opt is not None:
        opt = b"\0" + struct.pack("!HHIH", T_OPT, kept_opt[2], kept_opt[3], len(kept_opt[4])) \
            + kept_opt[4]
    counts = [an, ns, ar - (1 if kept_opt is not None else 0)]
    body = w.buf
    flags = struct.unpack_from("!H", body, 2)[0]
    if len(body) + len(opt) > limit:
        room = limit - len(opt)
        real = [e for e in ends if e is not None]
        k = 0
        while k < len(real) and real[k] <= room:
            k += 1
        cut = real[k - 1] if k else 12 + len(client_question)
        if k < an + ns:
            flags |= 0x0200                                     # TC
        counts = [min(k, an), min(max(k - an, 0), ns), max(k - an - ns, 0)]
        body = body[:cut]
    struct.pack_into("!HHHHH", body, 2, flags, 1, counts[0], counts[1],
                     counts[2] + (1 if opt else 0))
    return bytes(body) + opt


def _rdata(w: _Writer, m: bytes, rtype: int, start: int, rdlen: int, back) -> None:
    end = start + rdlen
    if rtype in (T_CNAME, T_NS, T_PTR, T_DNAME):
        name, _ = _read_name(m, start)
        w.name(revert_name(back, "value", name), compress=rtype in _COMPRESSED)
    elif rtype == T_MX:
        w.buf += m[start:start + 2]
        name, _ = _read_name(m, start + 2)
        w.name(revert_name(back, "value", name))
    elif rtype == T_SRV:
        w.buf += m[start:start + 6]
        name, _ = _read_name(m, start + 6)
        w.name(revert_name(back, "value", name), compress=False)
    elif rtype == T_SOA:
        mname, off = _read_name(m, start)
        rname, off = _read_name(m, off)
        w.name(revert_name(back, "value", mname))
        w.name(rname)
        w.buf += m[off:end]
    else:
        # Other types carry no compressed names (RFC 3597 §4): their rdata as it is.
        w.buf += m[start:end]


def rewrite_query(query: bytes, qend: int, name: str) -> bytes:
    """``query`` asking ``name`` instead (the rest of it, EDNS included, as it was);
    ``qend``: where the client's question name ends."""
    return query[:12] + _wire(name) + query[qend:]


def _wire(name: str) -> bytes:
    out = bytearray()
    for lab in R.name_labels(name):
        out.append(len(lab))
        out += lab
    return bytes(out) + b"\0"


class Rewriter:
    """A worker's rules: ``match`` a handed-off query, and which names the compiled
    forwarder must leave to Python (``python_zones``; None: every name)."""

    def __init__(self, rules):
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def python_zones(self):
        """The zones whose names a rule may rewrite: an exact rule's name, a suffix rule's
        zone (the labels after its first dot, as a suffix need not start at a label); any
        other rule may match every name (None)."""
        zones = set()
        for r in self.rules:
            if r.kind == "exact":
                zones.add(r.frm.rstrip("."))
            elif r.kind == "suffix":
                z = r.frm.lstrip(".").rstrip(".") if r.frm.startswith(".") else \
                    r.frm.partition(".")[2].rstrip(".")
                if not z:
                    return None
                zones.add(z)
            else:
                return None
        return sorted(zones)
