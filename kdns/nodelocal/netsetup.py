"""The node set-up NodeLocal DNSCache's node-cache does: a dummy interface holding the
listen addresses, and iptables rules that keep the node's DNS traffic out of conntrack.

Why: pods reach the node-local at a link-local address (169.254.20.10) that must be local
on every node, hence an interface of its own (``nodelocaldns``, type dummy) holding it and,
optionally, the kube-dns ClusterIP. UDP DNS through conntrack is what causes the 5-second
lookup stalls (two packets of one socket racing for the same conntrack entry), so the raw
table's NOTRACK takes packets to and from the listen addresses on port 53 out of it, and
filter ACCEPTs let them in and out past a default-deny firewall (node-cache's rules).

Created at start, removed at exit, idempotent: an address or rule already there is left as
it is and not added twice (``iptables -C`` before ``-I``), and a removal deletes every copy.
What it must not do: touch rules or addresses it did not add (only those with its comment,
only its interface).
"""
from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger("kdns.nodelocal.netsetup")

COMMENT = "kdns node-local"


class SetupError(Exception):
    """The node cannot be set up; one sentence saying what to change."""


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} is not installed; install it or pass "
                         f"--setup-interface=false/--setup-iptables=false") from None
    if check and r.returncode:
        raise SetupError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}")
    return r


def rules(addresses, port: int = 53, health_port: int = 0) -> list[tuple[str, list[str]]]:
    """(table, rule) pairs, as node-cache adds them for each listen address: NOTRACK of
    queries to it and replies from it (raw PREROUTING and OUTPUT, the node's own queries
    too), ACCEPT of both in filter INPUT and OUTPUT."""
    out = []
    for ip in addresses:
        for proto in ("udp", "tcp"):
            m = ["-p", proto, "-m", proto]
            out += [("raw", ["PREROUTING", *m, "-d", ip, "--dport", str(port), "-j", "NOTRACK"]),
                    ("filter", ["INPUT", *m, "-d", ip, "--dport", str(port), "-j", "ACCEPT"]),
                    ("raw", ["OUTPUT", *m, "-s", ip, "--sport", str(port), "-j", "NOTRACK"]),
                    ("filter", ["OUTPUT", *m, "-s", ip, "--sport", str(port), "-j", "ACCEPT"]),
                    ("raw", ["OUTPUT", *m, "-d", ip, "--dport", str(port), "-j", "NOTRACK"])]
        if health_port:
            m = ["-p", "tcp", "-m", "tcp"]
            out += [("raw", ["PREROUTING", *m, "-d", ip, "--dport", str(health_port), "-j", "NOTRACK"]),
                    ("raw", ["OUTPUT", *m, "-s", ip, "--sport", str(health_port), "-j", "NOTRACK"])]
    return [(t, r[:-2] + ["-m", "comment", "--comment", COMMENT] + r[-2:]) for t, r in out]


class NodeSetup:
    """What ``kdns node-local`` sets up on its node; ``undo`` removes exactly that."""

    def __init__(self, addresses, *, interface: str = "nodelocaldns", kind: str = "dummy",
                 setup_interface: bool = True, setup_iptables: bool = True, port: int = 53,
                 health_port: int = 0, iptables: str = "iptables",
                 ip6tables: str = "ip6tables", ip: str = "ip"):
        self.addresses = list(addresses)
        self.interface, self.kind = interface, kind
        self.setup_interface, self.setup_iptables = setup_interface, setup_iptables
        self.port, self.health_port = port, health_port
        self.iptables = shutil.which(iptables) or iptables
        self.ip6tables = shutil.which(ip6tables) or ip6tables
        self.ip = shutil.which(ip) or ip
        self.created_link = False

    def apply(self) -> None:
        if self.setup_interface:
            self._interface()
        if self.setup_iptables:
            for binary, table, rule in self._rules():
                base = [binary, "-w", "60", "-t", table]
                if _run(base + ["-C", *rule], check=False).returncode:
                    _run(base + ["-I", rule[0], "1", *rule[1:]])
        log.info("node set up: %s%s", f"interface {self.interface} with "
                 f"{', '.join(self.addresses)}" if self.setup_interface else "no interface",
                 "; NOTRACK and ACCEPT rules for port %d" % self.port
                 if self.setup_iptables else "; no iptables rules")

    def _rules(self):
        """(iptables or ip6tables, table, rule) for every listen address."""
        for ip in self.addresses:
            binary = self.ip6tables if ":" in ip else self.iptables
            for table, rule in rules([ip], self.port, self.health_port):
                yield binary, table, rule

    def _interface(self) -> None:
        have = _run([self.ip, "link", "show", "dev", self.interface], check=False)
        if have.returncode:
            r = _run([self.ip, "link", "add", self.interface, "type", self.kind], check=False)
            if r.returncode:
                raise SetupError(f"cannot create the {self.kind} interface {self.interface} "
                                 f"({r.stderr.strip()}); load the {self.kind} module, or "
                                 f"create it yourself and pass --setup-interface=false")
            self.created_link = True
        _run([self.ip, "link", "set", "dev", self.interface, "up"])
        shown = _run([self.ip, "-o", "addr", "show", "dev", self.interface]).stdout
        for ip in self.addresses:
            bits = 128 if ":" in ip else 32
            if f" {ip}/{bits} " not in shown:
                _run([self.ip, "addr", "add", f"{ip}/{bits}", "dev", self.interface])

    def undo(self) -> None:
        """Remove our rules (every copy) and our interface; errors are logged, not raised:
        this runs on the way out."""
        if self.setup_iptables:
            for binary, table, rule in self._rules():
                base = [binary, "-w", "60", "-t", table]
                for _ in range(16):
                    try:
                        if _run(base + ["-C", *rule], check=False).returncode:
                            break
                        _run(base + ["-D", *rule])
                    except SetupError as e:
                        log.warning("node clean-up: %s", e)
                        break
        if self.setup_interface:
            try:
                # node-cache deletes the interface on exit; a restarted node-local makes it
                # anew (pods' queries meanwhile get ICMP unreachable, and retry).
                _run([self.ip, "link", "del", "dev", self.interface], check=False)
            except SetupError as e:
                log.warning("node clean-up: %s", e)
