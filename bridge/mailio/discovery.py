"""Mailio discovery (MIR-5): does a Mailio server serve a mail domain, or SMTP, or nothing at all?

A domain ``D`` served by Mailio publishes ``mailio._mailiokey.<candidate> TXT "v=MAILIO1; k=ed25519; p=<key>"``
at the first of its candidates (``D``, ``mio.D``, ``mailio.D``, ``didcomm.D`` by default) that names its
Mailio host. One lookup answers with a :class:`Route`:

* ``mailio``: the first candidate with a usable record; ``host`` is that candidate, ``key`` the server's
  Ed25519 key (32 bytes, standard base64) with which its messages and receipts must verify;
* ``smtp``: no usable Mailio record, but MX hosts (sorted by preference) - Postal delivers;
* ``none``, a permanent verdict: no Mailio record and no MX, a null MX (``0 .``, RFC 7505) or a domain
  that does not exist. There is deliberately no A-record fallback: the route is MIR-5's, not RFC 5321's;
* ``temporary``: DNS timed out or SERVFAILed before the answer was known: retry later, never ``none``.

The TXT and MX lookups are independent: a Mailio-only domain needs no MX (the reference server looks up
MX first and gives up without one, mailio.md section 7). A candidate whose record is unusable (a key that
is not 32 bytes, bad base64, another key type or version) is skipped with its reason, as if absent.
Records are read by tag name in any order, and also positionally as the reference server reads them
(whatever contains ``v=MAILIO1``, then ``k=``, then ``p=``, separated by ``;``).

Answers are cached in Redis (``bridge:discovery:<A-label domain>``, JSON, nothing secret) so that every
process shares them, for no longer than the DNS answers that decided them allow and than the settings'
ceilings (``max_ttl`` for ``mailio``/``smtp``, ``negative_ttl`` for ``none``). Temporary failures are never
cached. ``discover(domain, fresh=True)`` skips every cache (this process's, Redis and the resolver's) once:
the caller saw a signature fail against the cached key, and the domain may have rotated it. Redis trouble
costs only the cache: the answer then comes from DNS.

In front of Redis each process keeps what it read for at most ``local_seconds`` (default LOCAL_SECONDS,
and never past the Redis entry's own expiry), so that a message with many recipients at one domain, or a
busy worker, does not pay a Redis round trip per lookup. The price: another process's forced refresh
reaches this one within ``local_seconds`` (at once if this one forces its own, as a caller does after a
signature failure).

Protocol code: no Flask, no request context, no logging of keys (only public keys exist here anyway).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import dns.exception
import dns.flags
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from redis.exceptions import RedisError

from bridge.dns import DNSUnavailable, Lookup, dns_budget, lookup

__all__ = [
    "CACHE_PREFIX",
    "DEFAULT_CANDIDATES",
    "Discovery",
    "InvalidDomain",
    "Route",
    "mail_exchangers",
    "normalize_domain",
    "parse_mailio_record",
]

log = logging.getLogger(__name__)

CACHE_PREFIX = "bridge:discovery:"
#: Candidate prefixes of MIR-5, in order; "" is the domain itself.
DEFAULT_CANDIDATES: tuple[str, ...] = ("", "mio", "mailio", "didcomm")
#: Seconds of DNS one discovery may take in all (five lookups; a dead zone is remembered after the first).
DNS_SECONDS = 5.0
KEY_LENGTH = 32
#: Seconds a process answers from its own memory before asking Redis again; entries kept at most.
LOCAL_SECONDS = 1.0
LOCAL_ENTRIES = 4096

MAILIO, SMTP, NONE, TEMPORARY = "mailio", "smtp", "none", "temporary"

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class InvalidDomain(ValueError):
    """The text is not a mail domain (empty, an address literal, a label that is not letters, digits and
    hyphens, too long): nothing was asked of DNS."""


@dataclass(frozen=True)
class Route:
    """How mail for ``domain`` travels, and why.

    ``ttl``: seconds a route just learnt from DNS may be kept (0: not at all, or a route read from the cache).
    ``refused``: why records that were found could not be used (also in ``reason``).
    """

    route: str
    domain: str
    reason: str
    host: str | None = None
    key: str | None = None
    mx: tuple[str, ...] = ()
    dnssec: bool | None = None  # every deciding answer carried the AD flag; None: no answer (temporary)
    cached: bool = False
    ttl: float = 0.0
    refused: tuple[str, ...] = field(default=(), repr=False)

    @property
    def temporary(self) -> bool:
        return self.route == TEMPORARY

    @property
    def public_key(self) -> bytes:
        """The Mailio server's raw Ed25519 key (a ``mailio`` route only)."""
        if self.key is None:
            raise ValueError(f"a {self.route} route has no Mailio key")
        return base64.b64decode(self.key)

    def to_json(self) -> dict[str, Any]:
        """The CLI's and the cache's shape: host and key only for ``mailio``, mx only for ``smtp``."""
        out: dict[str, Any] = {"route": self.route, "domain": self.domain}
        if self.route == MAILIO:
            out.update(host=self.host, key=self.key)
        if self.route == SMTP:
            out["mx"] = list(self.mx)
        out.update(cached=self.cached, dnssec=self.dnssec, reason=self.reason)
        return out


def normalize_domain(domain: str) -> str:
    """``domain`` as DNS knows it: lower-case A-labels (IDNA 2008, UTS 46), no trailing dot.

    Raises :class:`InvalidDomain` for anything that is not a host name of letters, digits and hyphens.
    """
    if not isinstance(domain, str):
        raise InvalidDomain("a domain must be text")
    text = domain.strip().rstrip(".")
    if text.isascii():
        name = text.lower()  # the common case, without the IDNA codec's cost (a cached lookup is ~0.1 ms)
    else:
        try:
            name = dns.name.from_unicode(text, idna_codec=dns.name.IDNA_DEFAULT).to_text(omit_final_dot=True).lower()
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise InvalidDomain(f"not an internationalized domain name: {text[:80]!r}") from None
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise InvalidDomain(f"not a mail domain: {text[:80]!r}")
    if name.rpartition(".")[2].isdigit():
        raise InvalidDomain(f"an address literal is not a mail domain: {text[:80]!r}")
    return name


def parse_mailio_record(text: str) -> bytes:
    """The Ed25519 key of a ``v=MAILIO1`` TXT record (its strings already joined).

    Tags are read by name, in any order; failing that, positionally as the reference server reads them.
    Raises ``ValueError`` saying what is wrong, never quoting the record's key material at length.
    """
    parts = [part.strip() for part in text.split(";")]
    tags = _tags(parts)
    if tags is None or tags.get("v") != "MAILIO1":
        # The reference server's reading: the text contains v=MAILIO1, then k= second and p= third.
        if len(parts) >= 3 and "v=MAILIO1" in parts[0] and parts[1][:2] == "k=" and parts[2][:2] == "p=":
            tags = {"v": "MAILIO1", "k": parts[1][2:].strip(), "p": parts[2][2:].strip()}
        elif tags is not None and "v" in tags:
            raise ValueError(f"version {tags['v'][:20]!r} is not MAILIO1")
        else:
            raise ValueError("not a tag list v=MAILIO1; k=...; p=...")
    if tags.get("k", "").lower() != "ed25519":
        raise ValueError(f"key type {tags.get('k', '(none)')[:20]!r} is not ed25519")
    value = "".join(tags.get("p", "").split())  # whitespace inside p= is folding, as in DKIM
    if not value:
        raise ValueError("no key (p= is missing or empty)")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key (p=) is not standard base64") from None
    if len(key) != KEY_LENGTH:
        raise ValueError(f"the key is {len(key)} bytes; an Ed25519 key is {KEY_LENGTH}")
    return key


def mail_exchangers(mx: list[Any]) -> tuple[str, ...]:
    """MX hosts, most preferred first (then by name, for a stable answer), each once, without the final dot.

    Servers may return an RRset in any order; the order of delivery attempts is the preference's.
    """
    exchanges = sorted((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in mx)
    return tuple(dict.fromkeys(host for _, host in exchanges))


def _tags(parts: list[str]) -> dict[str, str] | None:
    """``name=value`` tags by (lower-case) name; None unless every non-empty part is one, each name once."""
    tags: dict[str, str] = {}
    for part in filter(None, parts):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not name.isalnum() or name in tags:
            return None
        tags[name] = value.strip()
    return tags


class Discovery:
    """Routes for mail domains, from DNS through a cache in Redis shared by every process."""

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        connection: Any | None = None,
        *,
        candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
        max_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        dns_seconds: float = DNS_SECONDS,
        local_seconds: float = LOCAL_SECONDS,
    ) -> None:
        # A copy asking for the AD flag (RFC 6840 5.7: a validating resolver sets it only when asked);
        # it shares the original's answer cache and memory of unreachable zones, and leaves its flags alone.
        self._resolver = copy.copy(resolver)
        self._resolver.flags = (dns.flags.RD if resolver.flags is None else resolver.flags) | dns.flags.AD
        self._redis = connection
        self.candidates = candidates
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.dns_seconds = dns_seconds
        self.local_seconds = local_seconds
        self._local: dict[str, tuple[float, Route]] = {}  # name -> (until, route); GIL-atomic operations

    def discover(self, domain: str, *, fresh: bool = False) -> Route:
        """The route for ``domain`` (an e-mail address's domain part, Unicode or A-labels).

        ``fresh``: ask DNS even if an answer is cached (after a signature failed against the cached key).
        Raises :class:`InvalidDomain` only; DNS trouble is a ``temporary`` route.
        """
        if not fresh:
            local = self._local.get(domain)
            if local is not None and local[0] > time.time():
                return local[1]
        name = normalize_domain(domain)
        if not fresh:
            cached = self._cached(name)
            if cached is not None:
                return self._keep_local(domain, cached[1], cached[0])
        route = self.lookup(name, fresh=fresh)
        if int(route.ttl * 1000) > 0 and not route.temporary:  # a TTL of 0 means: do not keep it
            self._remember(route)
            self._keep_local(domain, replace(route, cached=True, ttl=0.0), time.time() + route.ttl)
        else:
            self._local.pop(domain, None)
        return route

    def _keep_local(self, domain: str, route: Route, expires: float | None) -> Route:
        """Keep ``route`` (as a cached answer) for ``domain`` as given, until LOCAL_SECONDS or ``expires``."""
        until = time.time() + self.local_seconds
        if len(self._local) >= LOCAL_ENTRIES:
            self._local.clear()  # a crude bound; the entries are seconds old anyway
        self._local[domain] = (until if expires is None else min(until, expires), route)
        return route

    def lookup(self, domain: str, *, fresh: bool = False) -> Route:
        """Ask DNS (no Redis): the TXT candidates in order, then MX if no candidate had a usable record."""
        name = normalize_domain(domain)
        answers: list[Lookup] = []
        refused: list[str] = []
        try:
            with dns_budget(self.dns_seconds):
                for prefix in self.candidates:
                    host = f"{prefix}.{name}" if prefix else name
                    answer = self._ask(f"mailio._mailiokey.{host}", "TXT", fresh)
                    answers.append(answer)
                    key = self._key_at(host, answer, refused)
                    if key is not None:
                        reason = f"Mailio key published at mailio._mailiokey.{host}"
                        return self._route(MAILIO, name, reason, answers, refused, host=host, key=key)
                answer = self._ask(name, "MX", fresh)
                answers.append(answer)
        except DNSUnavailable as exc:
            return Route(TEMPORARY, name, f"{exc}: retry later", refused=tuple(refused))
        return self._mx_route(name, answer, answers, refused)

    # --- DNS -----------------------------------------------------------------------------------

    def _ask(self, name: str, rdtype: str, fresh: bool) -> Lookup:
        cache = self._resolver.cache
        if fresh and cache is not None:
            # The resolver keeps answers for their TTL too: a forced lookup must reach the server.
            qname = dns.name.from_text(name)
            for kind in (dns.rdatatype.from_text(rdtype), dns.rdatatype.ANY):
                cache.flush((qname, kind, dns.rdataclass.IN))
        return lookup(self._resolver, name, rdtype)

    @staticmethod
    def _key_at(host: str, answer: Lookup, refused: list[str]) -> str | None:
        """The one usable key at a candidate, or None (and why, when a Mailio record was there)."""
        keys: set[bytes] = set()
        for rdata in answer.records:
            text = b"".join(rdata.strings).decode("utf-8", errors="replace")  # type: ignore[attr-defined]
            if "v=mailio" not in text.lower():
                continue  # some other TXT record at that name: not ours to judge
            try:
                keys.add(parse_mailio_record(text))
            except ValueError as exc:
                refused.append(f"mailio._mailiokey.{host}: {exc}")
        if len(keys) > 1:
            refused.append(f"mailio._mailiokey.{host}: {len(keys)} different keys published")
            return None
        return base64.b64encode(keys.pop()).decode() if keys else None

    def _mx_route(self, name: str, answer: Lookup, answers: list[Lookup], refused: list[str]) -> Route:
        skipped = f"; refused: {'; '.join(refused)}" if refused else ""
        if answer.nxdomain:
            return self._route(NONE, name, f"{name} does not exist (NXDOMAIN){skipped}", answers, refused)
        mx: list[Any] = [r for r in answer.records if r.rdtype == dns.rdatatype.MX]  # MX rdata
        if any(r.exchange == dns.name.root for r in mx):
            reason = f"{name} accepts no mail (null MX, RFC 7505){skipped}"
            return self._route(NONE, name, reason, answers, refused)
        if not mx:
            reason = f"no Mailio record and no MX for {name}{skipped}"
            return self._route(NONE, name, reason, answers, refused)
        reason = f"no Mailio record; MX for {name}{skipped}"
        return self._route(SMTP, name, reason, answers, refused, mx=mail_exchangers(mx))

    def _route(
        self, route: str, name: str, reason: str, answers: list[Lookup], refused: list[str], **found: Any
    ) -> Route:
        # The answer holds only as long as every DNS answer that decided it (a Mailio record appearing
        # at an earlier candidate changes it too), and never longer than the operator allows.
        ceiling = self.negative_ttl if route == NONE else self.max_ttl
        ttl = min([ceiling, *(a.ttl for a in answers)])
        dnssec = all(a.authenticated for a in answers)
        return Route(route, name, reason, dnssec=dnssec, ttl=max(0.0, ttl), refused=tuple(refused), **found)

    # --- the shared cache ----------------------------------------------------------------------

    def _cached(self, name: str) -> tuple[float | None, Route] | None:
        """(when the entry expires, if it says, and the route) from Redis."""
        if self._redis is None:
            return None
        try:
            raw = self._redis.get(CACHE_PREFIX + name)
        except (RedisError, OSError):
            log.debug("discovery: Redis unavailable, asking DNS")
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return data.get("expires"), Route(
                data["route"],
                name,
                data["reason"],
                host=data.get("host"),
                key=data.get("key"),
                mx=tuple(data.get("mx", ())),
                dnssec=data.get("dnssec"),
                cached=True,
            )
        except (ValueError, KeyError, TypeError):
            return None  # an entry of another version or damaged: ask DNS and overwrite it

    def _remember(self, route: Route) -> None:
        if self._redis is None:
            return
        document = replace(route, cached=False).to_json() | {"expires": time.time() + route.ttl}
        data = json.dumps(document, separators=(",", ":"))
        try:
            self._redis.set(CACHE_PREFIX + route.domain, data, px=int(route.ttl * 1000))
        except (RedisError, OSError):
            log.debug("discovery: could not cache an answer in Redis")
