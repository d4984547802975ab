"""DNS names as text: the facts both the record rules and the zone compiler need."""
from __future__ import annotations

import socket


def reverse_name(ip: str) -> str:
    """PTR owner name of an IP in canonical text form (RFC 1035 §3.5, RFC 3596 §2.5).

    Written out rather than through ``ipaddress``: at 100,000 endpoints its objects cost more
    than the rest of a PTR's rules."""
    if ":" not in ip:
        a, b, c, d = ip.split(".")
        return f"{d}.{c}.{b}.{a}.in-addr.arpa."
    return ".".join(socket.inet_pton(socket.AF_INET6, ip).hex()[::-1]) + ".ip6.arpa."
