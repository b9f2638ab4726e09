"""Who really sent a message: DKIM, SPF and DMARC verdicts for the From: address.

Screening files mail from an approved sender into the inbox, so an approved address in From: must not be
enough: ``AuthVerdict.authenticated()`` is true only when DKIM or SPF passes for a domain aligned with the
From domain (RFC 7489's rule), which a forger cannot arrange. DKIM is checked with dkimpy, SPF with pyspf,
DMARC records and organizational domains here (``publicsuffixlist``, which ships its list: nothing is
downloaded at run time).

All DNS goes through ``bridge.dns`` and the resolver the caller passes in, pyspf included: its module-level
``DNSLookup`` is replaced (once, at import) by a function that uses the resolver set for the current call in a
context variable, and falls back to pyspf's own lookup for anyone else using pyspf in this process.

Cost, in DNS queries per verdict (each bounded by the resolver's lifetime; nothing is cached here, the caller
caches verdicts):

* DKIM: one TXT (``<s>._domainkey.<d>``) per signature, at most ``MAX_DKIM_SIGNATURES`` signatures;
* SPF: none without a client IP; else one TXT, plus one per ``include``/``a``/``mx``/``ptr``/``exists``/
  ``redirect`` term (RFC 7208 caps these at 10, each ``mx``/``ptr`` at 10 names, and void answers at 2);
* DMARC: one TXT at ``_dmarc.<From domain>``, plus one at the organizational domain when the first is empty.

A plain message with one signature and a simple SPF record takes 3 or 4 queries; the worst case is about
5 (DKIM) + 111 (SPF: record, 10 terms, 10 names each) + 2 (DMARC). DNS trouble becomes a ``temperror`` in the
verdict; this module never raises out of ``authenticate``. It never reads From itself (``bridge.mail.headers``
does) and never stores anything.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import dkim
import dns.resolver
import spf
from rq.timeouts import BaseTimeoutException

from bridge.dns import DNSUnavailable, organizational_domain, records, txt_records
from bridge.mail.headers import SenderFacts

__all__ = [
    "MAX_DKIM_SIGNATURES",
    "AuthVerdict",
    "authenticate",
    "authenticate_sender",
    "check_dkim",
    "has_dkim_signature",
    "organizational_domain",
]

log = logging.getLogger(__name__)

#: Signatures beyond this many are ignored: each costs a DNS query and an RSA verification, and a sender
#: who needs more than five to get one to verify is not one we need to please.
MAX_DKIM_SIGNATURES = 5

#: Total seconds pyspf may spend on one SPF check (RFC 7208 4.6.4 suggests at least 20).
SPF_TIME_LIMIT = 20.0

_POLICIES = ("none", "quarantine", "reject")

#: RQ's job time limit arrives as an exception inside whatever the job is doing; the broad handlers
#: below (hostile input makes dkimpy and pyspf raise anything) must let it through.
_TIMEOUTS = (BaseTimeoutException,)


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """DKIM, SPF and DMARC results for one message, and whether they vouch for its From domain."""

    from_domain: str | None
    """The From address's domain in A-label (ASCII) form; None when there is not exactly one From address."""
    dkim: str
    """"pass" | "fail" | "none" | "temperror" | "permerror", the best result over the signatures checked."""
    dkim_domains: tuple[str, ...]
    """d= of the signatures that verified."""
    spf: str
    """pyspf's result: "pass" | "fail" | "softfail" | "neutral" | "none" | "temperror" | "permerror"."""
    spf_domain: str | None
    """The envelope (MAIL FROM) domain, or the HELO domain for a null sender."""
    dmarc: str
    """"pass" | "fail" | "none" (no DMARC policy published) | "temperror" | "unknown" (missing evidence: SPF could
    not be checked for want of a client IP — the Hash format, or no Received: line — and no aligned DKIM passed;
    DMARC cannot fail a sender on a check it never made)."""
    dmarc_policy: str | None
    """What the From domain asks for failing mail (sp= for a subdomain covered by its parent's record)."""
    aligned: bool
    """A passing DKIM d= or SPF domain is aligned with the From domain (relaxed unless adkim/aspf=s)."""

    def authenticated(self) -> bool:
        """True iff DKIM or SPF passes for a domain aligned with the From domain: the only proof we accept."""
        return self.from_domain is not None and self.aligned

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the message record, ``authenticated`` included."""
        data = asdict(self)
        data["dkim_domains"] = list(self.dkim_domains)
        data["authenticated"] = self.authenticated()
        return data


def _aligned(domain: str, from_domain: str, strict: bool) -> bool:
    domain = domain.lower().rstrip(".")
    if strict:
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def _ascii_domain(domain: str) -> str | None:
    """The domain in A-label form for DNS and comparison; None when it cannot be one."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        return None
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


# --- DKIM -------------------------------------------------------------------------------------------------

_DKIM_RANK = ("pass", "temperror", "fail", "permerror", "none")


def _dkim_one(signer: dkim.DKIM, idx: int, resolver: dns.resolver.Resolver) -> tuple[str, str | None]:
    """Verify signature ``idx``: (result, d= when it passed)."""
    key_missing = False

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        nonlocal key_missing
        try:
            text_name = name.decode("ascii")
        except UnicodeDecodeError:
            key_missing = True
            return None
        values = txt_records(resolver, text_name)  # DNSUnavailable propagates: dkimpy does not catch it
        if not values:
            key_missing = True
            return None
        return values[0].encode("utf-8")

    try:
        ok = signer.verify(idx=idx, dnsfunc=dnsfunc)
    except DNSUnavailable:
        return "temperror", None
    except dkim.ValidationError as exc:
        # dkimpy reports a body altered after signing as a ValidationError; other ones are malformed tags.
        return ("fail" if "body hash mismatch" in str(exc) else "permerror"), None
    except _TIMEOUTS:
        raise  # a job's time limit (RQ's SIGALRM) must end the job, not become a verdict
    except Exception:  # dkimpy raises many types on hostile input; none of them is a pass
        return "permerror", None
    if key_missing:
        return "permerror", None  # RFC 6376 6.1.2: no key record is a permanent error
    if not ok:
        return "fail", None
    signed = [h.strip().lower() for h in signer.signature_fields.get(b"h", b"").split(b":")]
    if b"from" not in signed:
        return "permerror", None  # RFC 6376 5.4: a signature must cover From, else it vouches for nothing
    domain = _ascii_domain(signer.domain.decode("ascii", errors="replace"))
    return ("pass", domain) if domain else ("permerror", None)


def _dkim(message: bytes, resolver: dns.resolver.Resolver) -> tuple[str, tuple[str, ...]]:
    try:
        signer = dkim.DKIM(message)
        count = sum(1 for name, _ in signer.headers if name.lower() == b"dkim-signature")
    except _TIMEOUTS:
        raise
    except Exception:  # an unparseable header block: nothing can verify
        return "permerror", ()
    if count == 0:
        return "none", ()
    results: list[str] = []
    domains: list[str] = []
    for idx in range(min(count, MAX_DKIM_SIGNATURES)):
        result, domain = _dkim_one(signer, idx, resolver)
        results.append(result)
        if domain is not None and domain not in domains:
            domains.append(domain)
    return min(results, key=_DKIM_RANK.index), tuple(domains)


# --- SPF --------------------------------------------------------------------------------------------------

_SPF_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "bridge_spf_resolver", default=None
)
_PYSPF_LOOKUP: Callable[..., list[Any]] = spf.DNSLookup


def _spf_dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float | None = None) -> list[Any]:
    """pyspf's DNSLookup contract, answered through our resolver: [((name, qtype), value), ...].

    The values mirror pyspf's own dnspython driver (addresses as text, MX as (preference, Name), PTR as text,
    TXT as the list of byte strings); temporary trouble is pyspf's TempError, which it reports as temperror.
    """
    resolver = _SPF_RESOLVER.get()
    if resolver is None:
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    try:
        answers = records(resolver, name, qtype)
    except DNSUnavailable as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    result: list[Any] = []
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            value: Any = rdata.address  # type: ignore[attr-defined]
        elif qtype == "MX":
            value = (rdata.preference, rdata.exchange)  # type: ignore[attr-defined]
        elif qtype == "PTR":
            value = rdata.target.to_text(True)  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            value = rdata.strings  # type: ignore[attr-defined]
        else:
            continue
        result.append(((name, qtype), value))
    return result


spf.DNSLookup = _spf_dns_lookup


def _spf(
    resolver: dns.resolver.Resolver, client_ip: str | None, mail_from: str, helo: str | None
) -> tuple[str, str | None]:
    sender = mail_from.strip().strip("<>").strip()
    helo = (helo or "").strip()
    domain = _ascii_domain(sender.rpartition("@")[2] if "@" in sender else helo)
    if not client_ip or not domain:
        return "none", domain  # nothing to check against: no verdict rather than a guess
    token = _SPF_RESOLVER.set(resolver)
    try:
        result, _explanation = spf.check2(i=client_ip, s=sender, h=helo, querytime=SPF_TIME_LIMIT)
    except _TIMEOUTS:
        raise
    except Exception:  # pyspf turns DNS and record errors into results; anything else is its bug
        log.warning("SPF check crashed for domain %s", domain, exc_info=True)
        return "permerror", domain
    finally:
        _SPF_RESOLVER.reset(token)
    return str(result), domain


# --- DMARC ------------------------------------------------------------------------------------------------


def _dmarc_tags(values: list[str]) -> dict[str, str] | bool | None:
    """The one DMARC record among TXT ``values`` as tags; None when there is none; False when several."""
    found: list[dict[str, str]] = []
    for value in values:
        tags: dict[str, str] = {}
        for part in value.split(";"):
            key, sep, val = part.partition("=")
            if sep:
                tags.setdefault(key.strip().lower(), val.strip())
        first = value.split(";", 1)[0].replace(" ", "").replace("\t", "")
        if first == "v=DMARC1":
            found.append(tags)
    if not found:
        return None
    return found[0] if len(found) == 1 else False


def _dmarc_policy(resolver: dns.resolver.Resolver, from_domain: str) -> tuple[str | None, bool, bool]:
    """(policy, strict DKIM alignment?, strict SPF alignment?) for ``from_domain``; policy None if none.

    RFC 7489 6.6.3: look at ``_dmarc.<From domain>``, and only when nothing is there at the organizational
    domain, whose ``sp=`` (else ``p=``) then applies. Several records mean no policy. Raises DNSUnavailable.
    """
    tags = _dmarc_tags(txt_records(resolver, f"_dmarc.{from_domain}"))
    inherited = False
    if tags is None:
        org = organizational_domain(from_domain)
        if org != from_domain:
            tags = _dmarc_tags(txt_records(resolver, f"_dmarc.{org}"))
            inherited = True
    if not isinstance(tags, dict) or not tags:
        return None, False, False  # none, or several records: no policy
    policy = tags.get("p", "").lower()
    if inherited and tags.get("sp", "").lower() in _POLICIES:
        policy = tags["sp"].lower()
    if policy not in _POLICIES:
        if "rua" not in tags:
            return None, False, False  # RFC 7489 6.6.3: a record without a valid p= is ignored ...
        policy = "none"  # ... unless it asks for reports, in which case it means p=none
    return policy, tags.get("adkim", "r").lower() == "s", tags.get("aspf", "r").lower() == "s"


def check_dkim(message: bytes, resolver: dns.resolver.Resolver) -> tuple[str, tuple[str, ...]]:
    """DKIM alone: (best result, d= of the signatures that verified).

    The one part of authentication that needs the message itself, so the bridge runs it before
    sealing; SPF and DMARC need only envelope facts and run later (``authenticate_sender``).
    A message without a DKIM-Signature header is answered without parsing it (it may be 25 MB).
    """
    if not has_dkim_signature(message):
        return "none", ()
    return _dkim(message, resolver)


def has_dkim_signature(message: bytes) -> bool:
    """Whether the header block mentions DKIM-Signature (a cheap scan: only then is DNS asked)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message[: end if end >= 0 else len(message)]
    return b"dkim-signature" in head.lower()


def authenticate(message: bytes, *, facts: SenderFacts, mail_from: str, resolver: dns.resolver.Resolver) -> AuthVerdict:
    """Check DKIM, SPF and DMARC for ``message`` and say whether they vouch for its From domain.

    ``facts`` are the message's sender facts (From, client IP, HELO); ``mail_from`` the envelope sender
    (``""`` for a bounce). Never raises: DNS trouble yields ``temperror`` results, and a missing or multiple
    From yields a verdict that is not authenticated.
    """
    dkim_result, dkim_domains = check_dkim(message, resolver)
    return authenticate_sender(
        from_address=facts.from_address,
        client_ip=facts.client_ip,
        helo=facts.helo,
        mail_from=mail_from,
        dkim_result=dkim_result,
        dkim_domains=dkim_domains,
        resolver=resolver,
    )


def authenticate_sender(
    *,
    from_address: str | None,
    client_ip: str | None,
    helo: str | None,
    mail_from: str,
    dkim_result: str,
    dkim_domains: tuple[str, ...],
    resolver: dns.resolver.Resolver,
) -> AuthVerdict:
    """SPF and DMARC for a message whose DKIM result is known: no message bytes needed. Never raises."""
    from_domain = _ascii_domain(from_address.rpartition("@")[2]) if from_address else None
    spf_result, spf_domain = _spf(resolver, client_ip, mail_from, helo)

    policy: str | None = None
    dmarc_result = "none"
    aligned = False
    if from_domain is not None:
        policy_unknown = False
        try:
            policy, strict_dkim, strict_spf = _dmarc_policy(resolver, from_domain)
        except DNSUnavailable:
            # Without the record we cannot know whether the domain asks for strict alignment: assume it does.
            policy_unknown, strict_dkim, strict_spf = True, True, True
        aligned = any(_aligned(d, from_domain, strict_dkim) for d in dkim_domains) or (
            spf_result == "pass" and spf_domain is not None and _aligned(spf_domain, from_domain, strict_spf)
        )
        if aligned and (policy is not None or policy_unknown):
            dmarc_result = "pass"
        elif policy_unknown or (policy is not None and "temperror" in (dkim_result, spf_result)):
            dmarc_result = "temperror"
        elif policy is not None and not client_ip:
            dmarc_result = "unknown"  # missing evidence is no verdict, not a failure
        elif policy is not None:
            dmarc_result = "fail"
    return AuthVerdict(
        from_domain=from_domain,
        dkim=dkim_result,
        dkim_domains=dkim_domains,
        spf=spf_result,
        spf_domain=spf_domain,
        dmarc=dmarc_result,
        dmarc_policy=policy,
        aligned=aligned,
    )
