"""Autopath, forwarder side: the search steps the image cannot answer.

Why: with ``--autopath`` (CoreDNS ``autopath @kubernetes``) a pod's query for
``<base>.<ns>.svc.<zone>`` that no cluster name answers walks the rest of the pod's search
path: ``<base>.svc.<zone>``, ``<base>.<zone>``, ``<base>`` under each of the server's search
domains, ``<base>`` alone. The packet path answers the steps its image can
(``refpath.autopath``) and hands the query off at the first it cannot (a name outside the
served zones, an ExternalName). Here each step is asked again in order: of the image, and
from the first it hands off of the forwarder (and so its cache) or the ExternalName
completion; the first answer that is not a failure or NXDOMAIN is sent, behind a CNAME from
the asked name to the candidate (TTL: the first answer record's), so the pod's resolver
stops after one query.
A NODATA answers without the CNAME, as CoreDNS's (its cnamer has no record to point at).
When every step fails, the asked name's own NXDOMAIN is the answer and the client goes on
searching, as with CoreDNS.

What it must not do: cache an answer composed from the image (cluster data comes from the
live image every time; ``_cache`` keeps upstream answers only), or decide which queries are
autopath's (``refpath.autopath_plan`` does, from the image).
"""
from __future__ import annotations

import struct

from kdns import settings
from kdns.dns.wire import CD, QR, RA, RD, T_CNAME, TC
from kdns.forward.external import ExternalNames, fit, read_rr, reply_limit, sections
from kdns.forward.forwarder import Forwarder, opt_rr, parse_query
from kdns.packet import counters as C, engine
from kdns.zone import refpath
from kdns.zone.encode import ip_key
from kdns.zone.refpath import Malformed

CLASS_IN = 1
OPCODE = 0x7800


class AutoPath:
    """Completes the autopath queries the image hands off (see the module docstring)."""

    def __init__(self, forwarder: Forwarder, external: ExternalNames,
                 edns_max: int = settings.EDNS_UDP_SIZE):
        self.forwarder, self.external, self.edns_max = forwarder, external, edns_max

    @property
    def counters(self):
        """The forwarder's page region, where the success counter lives beside its own."""
        return self.forwarder.counters

    # Replies answered from a later search step (CoreDNS's coredns_autopath_success_total).
    success = C.Counted("autopath_success")

    def plan(self, img, query: bytes, client) -> tuple | None:
        ref = self.external.ref_image(img) if img is not None else None
        if ref is None or client is None:
            return None
        try:
            key = ip_key(client) if isinstance(client, str) else client
            # The worker's own packet path decides (compiled: a few microseconds).
            return refpath.autopath_plan(
                ref, query, key, lambda q, k: engine.answer(img, q, True, edns_max=self.edns_max,
                                                            client=k)[0])
        except (Malformed, struct.error, IndexError, ValueError):
            return None

    def first_reply(self, img, query: bytes, proto: str) -> bytes:
        """The asked name's own answer (NXDOMAIN), as the image gives it without autopath."""
        return engine.answer(img, query, proto == "tcp", edns_max=self.edns_max,
                             ra=bool(self.forwarder.upstreams or self.forwarder.stubs))[1]

    async def answer(self, img, query: bytes, proto: str, client) -> bytes | None:
        """The reply, or None when the query is not autopath's."""
        plan = self.plan(img, query, client)
        if plan is None:
            return None
        first = self.first_reply(img, query, proto)
        fw = self.forwarder
        forwards = bool(fw.upstreams or fw.stubs)
        q = parse_query(query)
        if q is None:
            return None
        for cand, cluster in plan[1]:
            sub = self._subquery(q, cand, query)
            # The image first (the steps before the one it handed off are NXDOMAIN there
            # again); from there, an ExternalName's completion or the forwarder.
            action, up = engine.answer(img, sub, True, edns_max=self.edns_max)
            upstream = False
            if action != engine.SEND:
                if not forwards:
                    continue            # nobody to ask: a failure
                up = await self.external.answer(img, sub, "tcp") if cluster else None
                if up is None:
                    up = await fw.resolve(sub, "tcp")
                    upstream = True
            if up is None or len(up) < 12 or up[3] & 0xF:
                continue                # failed, or NXDOMAIN: the next step
            try:
                reply = self._compose(q, cand, up, first, proto)
            except (Malformed, struct.error, IndexError):
                continue                # a reply we cannot read: as a failure
            self.success += 1
            if upstream and not reply[2] & (TC >> 8) and fw.cache is not None:
                self._cache(q, reply)
            return reply
        return first

    def _cache(self, q, reply: bytes) -> None:
        """The composed answer, under the asked name, in the worker's cache (the one the
        compiled path answers from): only a pod of the name's namespace is ever handed off
        for that name (every other client gets the image's NXDOMAIN), so the entry serves
        exactly the clients it was composed for, at the compiled path's speed, until the
        upstream TTLs run out. The packet path still tries its own steps before it looks
        there, so a cluster name created at <base>.svc.<zone> or <base>.<zone> answers at
        once; only a name of a served zone at a later step (after a search domain outside
        them) waits for the entry to expire, as behind CoreDNS's cache. Answers from the
        image (cluster names, ExternalNames) are never cached here."""
        key = (q.name, q.qtype, q.qclass, q.edns[1] if q.edns else 0, 1 if q.flags & CD else 0)
        try:
            self.forwarder.cache.put(key, reply)
        except (Malformed, struct.error, IndexError, ValueError):
            pass                        # not cacheable as it is: answered, not kept

    @staticmethod
    def _subquery(q, target: bytes, query: bytes) -> bytes:
        # The client's type, class, CD and DO; a fresh question for the candidate.
        flags = RD | (q.flags & CD)
        opt = opt_rr(q.edns[0], q.edns[1]) if q.edns else b""
        head = struct.pack("!HHHHHH", q.qid, flags, 1, 0, 0, 1 if opt else 0)
        return head + target + q.qbytes[-4:] + opt

    def _compose(self, q, cand: bytes, up: bytes, first: bytes, proto: str) -> bytes:
        _, rrs = sections(up)
        answers = [read_rr(up, s)[0] for sec, s, _ in rrs if sec == 0]
        auth = [read_rr(up, s)[0] for sec, s, _ in rrs if sec == 1]
        records = []
        if answers:
            owner_len = refpath.skip_name(answers[0], 0)
            ttl = struct.unpack_from("!I", answers[0], owner_len + 4)[0]
            records.append(struct.pack("!HHHIH", 0xC00C, T_CNAME, CLASS_IN, ttl, len(cand))
                           + cand)
        records += answers
        nans = len(records)
        records += auth
        opt = first[-11:] if q.edns else b""
        flags = QR | (q.flags & (OPCODE | RD | CD)) | RA
        body = bytearray(q.qbytes)
        kept, cut_off = fit(body, records, opt, reply_limit(q, proto, self.edns_max))
        if cut_off:
            flags |= TC
        an = min(kept, nans)
        head = struct.pack("!HHHHHH", q.qid, flags, 1, an, kept - an, 1 if opt else 0)
        return head + bytes(body) + opt
