"""The bridge's one door to DNS: a configured resolver and lookups whose failures mean one thing.

Every DNS question the bridge asks (DKIM keys, SPF, DMARC, Mailio discovery, Postal's key) goes through here,
so that tests can point the whole bridge at a private server (``BRIDGE_DNS_NAMESERVERS``) and so that
dnspython's many exception types collapse into two answers: "no such record" (an empty list) and
:class:`DNSUnavailable` (try again later). "No record" and "could not ask" must never be confused: the first
is a verdict, the second is not.

Nothing a sender controls may hold a process for long, so two things bound every lookup:

* a **time budget** (``dns_budget(seconds)``, a context variable): every lookup made inside shares one deadline
  and raises :class:`DNSUnavailable` once it is spent, however many names a message makes us ask about;
* a shared memory of **unreachable zones** (``UnreachableZones``, in Redis so that every web and worker process
  learns from the first one that waited): after a timeout or SERVFAIL under an organizational domain, lookups
  under it fail at once for ``UNREACHABLE_SECONDS`` instead of each waiting out the resolver's lifetime.
  Answers already in the resolver's own cache are served regardless.

It never retries on its own beyond what dnspython does within the resolver's lifetime.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.ttl
from publicsuffixlist import PublicSuffixList
from redis.exceptions import RedisError

from bridge import metrics
from bridge.errors import DependencyUnavailable

__all__ = [
    "DNSUnavailable",
    "Lookup",
    "UnreachableZones",
    "dns_budget",
    "lookup",
    "make_resolver",
    "organizational_domain",
    "records",
    "txt_records",
]

log = logging.getLogger(__name__)

#: How long a zone that timed out (or SERVFAILed) is answered "unavailable" without asking again.
UNREACHABLE_SECONDS = 60.0

#: A lookup that waited this long without an answer convicts its zone (a nearly spent budget does not).
_CONVICTING_WAIT = 0.5

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("bridge_dns_deadline", default=None)


@contextlib.contextmanager
def dns_budget(seconds: float) -> Iterator[None]:
    """Bound every lookup made inside to ``seconds`` in all (nested budgets keep the earlier deadline).

    The deadline lives in a context variable: a thread pool's task must enter its own ``dns_budget``.
    """
    deadline = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(deadline if outer is None else min(deadline, outer))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@functools.cache
def _psl() -> PublicSuffixList:
    # Loading the shipped list takes ~70 ms: do it once, on first use rather than at import.
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489's organizational domain: public suffix + one label, or the name itself."""
    name = domain.lower().rstrip(".")
    return _psl().privatesuffix(name) or name


class UnreachableZones:
    """Organizational domains whose DNS did not answer lately, shared by every process through Redis.

    Redis trouble never makes a lookup fail: the memory is an optimisation, so it degrades to this process's
    own copy. The Redis client should have short timeouts (it is asked before a DNS query, not instead).
    """

    PREFIX = "bridge:dns:unreachable:"

    def __init__(self, connection: Any | None, seconds: float = UNREACHABLE_SECONDS) -> None:
        self._redis = connection
        self._seconds = seconds
        self._local: dict[str, float] = {}

    def is_unreachable(self, zone: str) -> bool:
        now = time.monotonic()
        until = self._local.get(zone)
        if until is not None:
            if until > now:
                return True
            self._local.pop(zone, None)
        if self._redis is None:
            return False
        try:
            ttl = self._redis.pttl(self.PREFIX + zone)
        except (RedisError, OSError):  # ask DNS as if nothing were known
            return False
        if ttl and ttl > 0:
            self._remember(zone, now + ttl / 1000)
            return True
        return False

    def mark(self, zone: str) -> None:
        self._remember(zone, time.monotonic() + self._seconds)
        if self._redis is not None:
            try:
                self._redis.set(self.PREFIX + zone, b"1", px=int(self._seconds * 1000))
            except (RedisError, OSError):  # the local copy still protects this process
                log.debug("could not share an unreachable zone through Redis")

    def _remember(self, zone: str, until: float) -> None:
        if len(self._local) > 10_000:
            self._local.clear()
        self._local[zone] = until


class Resolver(dns.resolver.Resolver):
    """dnspython's resolver plus the bridge's shared memory of unreachable zones (None: no memory)."""

    unreachable: UnreachableZones | None = None


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


def make_resolver(nameservers: list[str] | None, *, timeout: float = 2.0) -> Resolver:
    """Build the resolver the bridge uses everywhere.

    ``nameservers`` entries are ``"IP"`` or ``"IP:PORT"`` (``"[IPv6]:PORT"`` for IPv6 with a port); ``None``
    means the system's resolver (``/etc/resolv.conf``). ``timeout`` bounds one whole lookup, retries included,
    so a dead server costs at most that long per question. Raises ``ValueError`` for a malformed entry and
    :class:`DNSUnavailable` when the system has no resolver configured.
    """
    if nameservers is None:
        try:
            resolver = Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise DNSUnavailable("no system DNS resolver is configured") from exc
    else:
        if not nameservers:
            raise ValueError("an explicit nameserver list must not be empty")
        resolver = Resolver(configure=False)
        resolver.nameservers = [_parse_nameserver(entry) for entry in nameservers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


def records(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
    """Return the ``rdtype`` records at ``name`` (CNAMEs followed); ``[]`` when there are none.

    NXDOMAIN, an empty answer and a name that cannot exist in DNS (an empty or over-long label, which a
    hostile From: domain can carry) all mean "no record". Timeouts, SERVFAIL and unreachable servers raise
    :class:`DNSUnavailable`, and so does a spent ``dns_budget`` or a zone remembered as unreachable.
    """
    return lookup(resolver, name, rdtype).records


@dataclass(frozen=True)
class Lookup:
    """What :func:`lookup` learnt beyond the records: how long the answer holds and who vouched for it."""

    records: list[dns.rdata.Rdata] = field(default_factory=list)
    #: Seconds the answer may be kept: the records' TTL, or for "no record" the zone's negative TTL (RFC 2308;
    #: 0 when the answer carried no SOA to take it from).
    ttl: float = 0.0
    #: The resolver set the AD flag: it validated the answer with DNSSEC (only a validating resolver that
    #: was asked with AD or DO sets it; a plain one leaves it clear, which proves nothing either way).
    authenticated: bool = False
    #: The name does not exist (NXDOMAIN, or a name that cannot exist in DNS), as opposed to "no such record".
    nxdomain: bool = False


def lookup(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> Lookup:
    """:func:`records` plus the answer's TTL, AD flag and NXDOMAIN-ness, with the same errors.

    For callers that cache what they learn (Mailio discovery) and must not keep an answer longer than DNS
    allows, or that report whether DNSSEC vouched for it.
    """
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return Lookup(nxdomain=True)
    lifetime = None
    deadline = _DEADLINE.get()
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0.005:
            metrics.DNS_LOOKUPS.labels(outcome="budget_spent").inc()
            raise DNSUnavailable(f"DNS time budget spent before asking {rdtype} {name}")
        lifetime = min(resolver.lifetime, left)
    cached = _cached(resolver, qname, rdtype)
    if cached:
        metrics.DNS_CACHE_HITS.labels(rdtype=rdtype).inc()
    memory = getattr(resolver, "unreachable", None)
    zone = None
    if memory is not None and not cached:
        zone = organizational_domain(qname.to_text(omit_final_dot=True))
        if memory.is_unreachable(zone):
            metrics.DNS_LOOKUPS.labels(outcome="skipped").inc()
            raise DNSUnavailable(f"DNS for {zone} did not answer lately")
    started = time.monotonic()
    try:
        answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False, lifetime=lifetime)
    except dns.resolver.NXDOMAIN as exc:
        metrics.DNS_LOOKUPS.labels(outcome="nxdomain").inc()
        return _negative(exc)
    except (dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        metrics.DNS_LOOKUPS.labels(outcome="nodata").inc()
        return Lookup()
    except dns.exception.Timeout as exc:
        _reraise_foreign(exc)
        metrics.DNS_LOOKUPS.labels(outcome="timeout").inc()
        # A budget nearly spent is this delivery's limit, not evidence about the zone: remember real waits.
        if memory is not None and zone is not None and time.monotonic() - started >= _CONVICTING_WAIT:
            memory.mark(zone)
        raise DNSUnavailable(f"DNS timeout asking {rdtype} {name}") from exc
    except dns.resolver.NoNameservers as exc:
        _reraise_foreign(exc)
        metrics.DNS_LOOKUPS.labels(outcome="servfail").inc()
        if memory is not None and zone is not None:
            memory.mark(zone)
        raise DNSUnavailable(f"no DNS server answered {rdtype} {name} (SERVFAIL or refused)") from exc
    except dns.exception.DNSException as exc:
        metrics.DNS_LOOKUPS.labels(outcome="error").inc()
        raise DNSUnavailable(f"DNS error asking {rdtype} {name}: {type(exc).__name__}") from exc
    metrics.DNS_LOOKUPS.labels(outcome="answer" if answer.rrset is not None else "nodata").inc()
    return Lookup(
        records=[] if answer.rrset is None else list(answer.rrset),
        # From the resolver's cache too: the expiration was set when the answer arrived.
        ttl=max(0.0, answer.expiration - time.time()),
        authenticated=bool(answer.response.flags & dns.flags.AD),
    )


def _negative(exc: dns.resolver.NXDOMAIN) -> Lookup:
    """NXDOMAIN with the negative TTL and AD flag of the response that said so (the last name asked)."""
    try:
        response = exc.response(exc.qnames()[-1])
        ttl = float(response.resolve_chaining().minimum_ttl)
    except (dns.exception.DNSException, KeyError, IndexError, TypeError):
        return Lookup(nxdomain=True)
    # Without an SOA, dnspython reports the maximum TTL: no negative TTL was given, so keep it for none.
    ttl = 0.0 if ttl >= dns.ttl.MAX_TTL else ttl
    return Lookup(ttl=ttl, authenticated=bool(response.flags & dns.flags.AD), nxdomain=True)


_QUERY_ERRORS = (dns.exception.DNSException, OSError, EOFError, NotImplementedError, ValueError)


def _reraise_foreign(exc: dns.exception.DNSException) -> None:
    """Re-raise an exception that interrupted a query but is no DNS trouble (RQ's job time limit, say).

    dnspython catches every exception a query raises, records it against the name server and tries
    again until the lifetime ends: a job's time limit (SIGALRM raising inside the socket wait) would
    otherwise become "DNS timeout" and the job would run on past its limit.
    """
    errors = getattr(exc, "kwargs", {}).get("errors") or ()
    for error in errors:
        raised = error[3] if isinstance(error, tuple) and len(error) > 3 else None
        if isinstance(raised, BaseException) and not isinstance(raised, _QUERY_ERRORS):
            raise raised


def _cached(resolver: dns.resolver.Resolver, qname: dns.name.Name, rdtype: str) -> bool:
    cache = resolver.cache
    if cache is None:
        return False
    try:
        return cache.get((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)) is not None
    except dns.rdatatype.UnknownRdatatype:
        return False


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
