"""The bridge's one door to DNS: a configured resolver and lookups whose failures mean one thing.

Every DNS question the bridge asks (DKIM keys, SPF, DMARC, Mailio discovery, Postal's key) goes through here,
so that tests can point the whole bridge at a private server (``BRIDGE_DNS_NAMESERVERS``) and so that
dnspython's many exception types collapse into two answers: "no such record" (an empty list) and
:class:`DNSUnavailable` (try again later). "No record" and "could not ask" must never be confused: the first
is a verdict, the second is not.

This module caches nothing (the resolver is built without a cache); callers that want caching own it. It never
retries on its own beyond what dnspython does within the resolver's lifetime.
"""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from bridge.errors import DependencyUnavailable

__all__ = ["DNSUnavailable", "make_resolver", "records", "txt_records"]


class DNSUnavailable(DependencyUnavailable):
    """The question could not be answered now (timeout, SERVFAIL, no reachable server): a temporary error.

    A ``DependencyUnavailable`` (HTTP 503: Postal retries) for code that lets it reach the web layer.
    """


def _parse_nameserver(entry: str) -> dns.nameserver.Do53Nameserver:
    """Read ``"IP"``, ``"IP:PORT"`` or ``"[IPv6]:PORT"`` into a plain-DNS nameserver (port 53 by default)."""
    text = entry.strip()
    port = 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {entry!r}: expected [IPv6]:PORT")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    ipaddress.ip_address(host)  # ValueError for names: a nameserver must be an address
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver {entry!r}: port out of range")
    return dns.nameserver.Do53Nameserver(host, port=port)


def make_resolver(nameservers: list[str] | None, *, timeout: float = 2.0) -> dns.resolver.Resolver:
    """Build the resolver the bridge uses everywhere.

    ``nameservers`` entries are ``"IP"`` or ``"IP:PORT"`` (``"[IPv6]:PORT"`` for IPv6 with a port); ``None``
    means the system's resolver (``/etc/resolv.conf``). ``timeout`` bounds one whole lookup, retries included,
    so a dead server costs at most that long per question. Raises ``ValueError`` for a malformed entry and
    :class:`DNSUnavailable` when the system has no resolver configured.
    """
    if nameservers is None:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise DNSUnavailable("no system DNS resolver is configured") from exc
    else:
        if not nameservers:
            raise ValueError("an explicit nameserver list must not be empty")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [_parse_nameserver(entry) for entry in nameservers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


def records(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
    """Return the ``rdtype`` records at ``name`` (CNAMEs followed); ``[]`` when there are none.

    NXDOMAIN, an empty answer and a name that cannot exist in DNS (an empty or over-long label, which a
    hostile From: domain can carry) all mean "no record". Timeouts, SERVFAIL and unreachable servers raise
    :class:`DNSUnavailable`.
    """
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return []
    try:
        answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return []
    except dns.exception.Timeout as exc:
        raise DNSUnavailable(f"DNS timeout asking {rdtype} {name}") from exc
    except dns.resolver.NoNameservers as exc:
        raise DNSUnavailable(f"no DNS server answered {rdtype} {name} (SERVFAIL or refused)") from exc
    except dns.exception.DNSException as exc:
        raise DNSUnavailable(f"DNS error asking {rdtype} {name}: {type(exc).__name__}") from exc
    if answer.rrset is None:
        return []
    return list(answer.rrset)


def txt_records(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """Return the TXT records at ``name``, each record's strings joined (long values arrive split in 255s).

    Bytes that are not UTF-8 become U+FFFD: every record the bridge reads is ASCII, so such a record simply
    fails to parse later instead of raising here. ``[]`` for NXDOMAIN / no TXT; :class:`DNSUnavailable` for
    temporary trouble.
    """
    return [
        b"".join(rdata.strings).decode("utf-8", errors="replace")  # type: ignore[attr-defined]
        for rdata in records(resolver, name, "TXT")
    ]
