"""Sending to Mailio peers: find the recipients' keys, seal, post the signed envelope, verify the receipt.

The steps, each through the guarded peer client (``bridge.mailio.peers``):

1. **Resolve.** Discovery names the recipient domain's Mailio host and its server key. The bridge asks that
   host's ``POST /api/v1/mtp/did`` (signed by our server key) for each recipient's e-mail lookup hash, and
   verifies the signed answer with the discovered key (once more after a forced rediscovery: key rotation)
   before decoding anything. A ``did:web:<host>#<address>`` recipient is read from
   ``https://<host>/<address>/did.json`` instead.
2. **Trust a key.** The reference's signed DID answers cover neither the DID nor its keys (mtp-wire.md
   section 6: the CBOR holds ``"id": {}`` and empty JWKs). So an X25519 key is used only when the signed
   CBOR itself carries a document that parses (our peers' answers do), or when it comes from the document
   fetched from the discovered host over verified TLS, with the same DID and ``#master`` key as the
   answer's JSON twin. Every document's ``did:mailio`` address must derive from its ``#master`` key.
3. **Seal.** Body = a JWE (``alg`` in the protected header, as a reference client expects, since the
   reference keeps only ``kid``/``epk`` per recipient) to the recipients on that host, kid
   ``did:web:<host>#<address>``. A body the owner's client sealed is sent as it is, trimmed to that host's
   recipient entries (trimming a General JSON JWE's recipient list leaves it valid and hides the others).
4. **Post** the ``didCommRequest`` (CBOR, in the reference's field order, signed by the server key) to the
   host's ``/api/v1/mtp/message`` and accept only a 2xx whose receipt verifies with the host's key and
   names the same ``id``. Resending the same ``id`` is safe: the peer dedupes on it.

Outcomes say what the caller may do: :class:`Sent`, or :class:`NotSent` with ``temporary`` (retry later)
or not (fail the recipient). Protocol code: no Flask, no Redis; never logs bodies or keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwe

from bridge.mailio.did import MESSAGING_PATH, DidDocument, parse_did_document
from bridge.mailio.discovery import MAILIO, TEMPORARY, Discovery, InvalidDomain, Route, normalize_domain
from bridge.mailio.identity import did_web, is_mailio_address
from bridge.mailio.lookups import did_lookup, did_lookup_request
from bridge.mailio.mtp import (
    DID_LOOKUP_REQUEST,
    DID_LOOKUP_RESPONSE,
    DIDCOMM_REQUEST,
    INTENT_HANDSHAKE_REQUEST,
    INTENT_MESSAGE,
    TYPE_ENCRYPTED,
    MtpError,
    body_bytes,
    did_comm_message,
    did_comm_request,
    jwe_body,
    parse_signed,
    sign_request,
    verify,
)
from bridge.mailio.offer import nonce_body
from bridge.mailio.peers import PeerClient, PeerError, PeerUnavailable
from bridge.sealing import CONTENT_ENCRYPTION, KEY_ALGORITHM, Recipient

DID_LOOKUP_PATH = "/api/v1/mtp/did"
JWE_MEMBERS = ("aad", "ciphertext", "iv", "recipients", "tag", "protected")
_RETRY_STATUSES = frozenset({401, 408, 425, 429})  # 401: our new key may not have reached the peer's cache


@dataclass(frozen=True)
class Resolution:
    """Where one recipient's mail goes and, for Mailio, the key it is sealed to."""

    address: str
    route: str  # mailio | smtp | none | temporary (as discovery's), or "mailio" with no key: not found
    reason: str
    host: str | None = None
    kid: str | None = None  # did:web:<host>#<address>
    x25519: bytes | None = field(default=None, repr=False)
    document: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def sealable(self) -> bool:
        return self.route == MAILIO and self.x25519 is not None and self.kid is not None

    @property
    def temporary(self) -> bool:
        return self.route == TEMPORARY

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "route": self.route,
            "reason": self.reason,
            "host": self.host,
            "kid": self.kid,
            "did_document": self.document,
        }


@dataclass(frozen=True)
class Sent:
    """The peer took the message: its receipt verified and named our id."""

    host: str


@dataclass(frozen=True)
class NotSent:
    reason: str
    temporary: bool


class PeerSender:
    """Resolves and sends for one bridge: its peer client, discovery, server key and domain."""

    def __init__(self, peers: PeerClient, discovery: Discovery, server_key: Ed25519PrivateKey, domain: str) -> None:
        self.peers = peers
        self.discovery = discovery
        self.server_key = server_key
        self.domain = domain

    # --- resolving ---------------------------------------------------------------------------------------

    def resolve(
        self, sender_address: str, hashes: Mapping[str, str], *, deadline: float | None = None
    ) -> dict[str, Resolution]:
        """E-mail address -> :class:`Resolution`, one signed DID lookup per Mailio domain.

        ``hashes``: each address's e-mail lookup hash (``bridge.mailio.identity.email_lookup_hash``,
        which the caller caches); ``sender_address``: the owner's Mailio address, as the reference asks.
        ``deadline`` (``time.monotonic()``): domains not asked by then answer ``temporary`` (a web request
        must not wait on every slow peer in turn; each call is bounded by BRIDGE_PEER_TIMEOUT).
        """
        by_domain: dict[str, list[str]] = defaultdict(list)
        for address in hashes:
            by_domain[address.rpartition("@")[2].lower()].append(address)
        found: dict[str, Resolution] = {}
        for domain, addresses in by_domain.items():
            if deadline is not None and time.monotonic() > deadline:
                found |= {a: Resolution(a, TEMPORARY, "no time left to ask its server: ask again") for a in addresses}
                continue
            try:
                route = self.discovery.discover(domain)
            except InvalidDomain:
                found |= {a: Resolution(a, "none", "not a mail domain") for a in addresses}
                continue
            if route.route != MAILIO or not route.host or not route.key:
                found |= {a: Resolution(a, route.route, route.reason) for a in addresses}
                continue
            try:
                found |= self._lookup(route, sender_address, {a: hashes[a] for a in addresses}, deadline)
            except (PeerError, MtpError, ValueError) as exc:
                temporary = _is_temporary(exc)
                reason = f"DID lookup at {route.host} failed: {exc}"
                found |= {a: Resolution(a, TEMPORARY if temporary else "none", reason) for a in addresses}
        return found

    def _lookup(
        self, route: Route, sender_address: str, hashes: Mapping[str, str], deadline: float | None = None
    ) -> dict[str, Resolution]:
        host = str(route.host)
        lookups = [did_lookup(email_hash, address) for address, email_hash in hashes.items()]
        payload = did_lookup_request(sender_address, lookups, _now_ms())
        body = body_bytes(sign_request(DID_LOOKUP_REQUEST, payload, self.server_key, self.domain))
        answer = self.peers.post(self.peers.url(host, DID_LOOKUP_PATH), body)
        if answer.status != 200:
            raise _http_error(host, answer.status, answer.body)
        signed = self._verified(answer.body, DID_LOOKUP_RESPONSE, route, sender_domain=False)
        twins = _twin(answer.body, DID_LOOKUP_RESPONSE).get("foundLookups") or []
        twin_by_hash = {t.get("emailHash"): t for t in twins if isinstance(t, dict)}
        found_signed = {
            item.get("emailHash"): item for item in signed.get("foundLookups") or () if isinstance(item, dict)
        }
        result: dict[str, Resolution] = {}
        for address, email_hash in hashes.items():
            item = found_signed.get(email_hash)
            if item is None or item.get("supportsMailio") is not True:
                result[address] = Resolution(address, MAILIO, f"no such Mailio user at {host} (5.1.1)", host=host)
                continue
            if deadline is not None and time.monotonic() > deadline:
                result[address] = Resolution(address, TEMPORARY, "no time left to check its key: ask again")
                continue
            twin_document = (twin_by_hash.get(email_hash) or {}).get("didDocument")
            try:
                document, raw = self._trusted_document(host, item.get("didDocument"), twin_document)
            except (PeerError, ValueError) as exc:
                temporary = isinstance(exc, PeerUnavailable)
                result[address] = Resolution(address, TEMPORARY if temporary else "none", f"{host}: {exc}")
                continue
            result[address] = _resolution(address, host, document, raw, f"Mailio user at {host}")
        return result

    def resolve_did_web(self, did: str) -> Resolution:
        """A ``did:web:<host>#<0x address>`` recipient: its document from ``https://<host>/<address>/did.json``."""
        host, _, address = did.removeprefix("did:web:").partition("#")
        try:
            host = normalize_domain(host)
        except InvalidDomain:
            return Resolution(did, "none", "not a did:web:<host>#<address> of a mail host")
        if not did.startswith("did:web:") or not is_mailio_address(address):
            return Resolution(did, "none", "not a did:web:<host>#<address> of a mail host")
        route = self.discovery.discover(host)
        if route.route != MAILIO or route.host != host:
            return Resolution(did, route.route if route.route != MAILIO else "none", f"{host} is no Mailio host")
        try:
            raw = self._fetch_document(host, address)
            document = parse_did_document(raw)
        except (PeerError, ValueError) as exc:
            return Resolution(did, TEMPORARY if isinstance(exc, PeerUnavailable) else "none", f"{host}: {exc}")
        if document.address != address or document.x25519_public is None:
            return Resolution(did, "none", f"{host}: the document is not {address}'s or has no X25519 key")
        return _resolution(did, host, document, raw, f"Mailio user at {host}")

    def _trusted_document(self, host: str, signed: Any, twin: Any) -> tuple[DidDocument, dict[str, Any]]:
        """The document whose X25519 key may be used (see the module docstring, step 2)."""
        try:
            document = parse_did_document(signed)
            if document.address is not None and document.x25519_public is not None:
                return document, signed  # the signature covers the DID and its keys
        except ValueError:
            pass  # the reference's form: the DID and keys are in the unsigned twin only
        claimed = parse_did_document(twin)
        if claimed.address is None:
            raise ValueError("the looked-up document is not a did:mailio document")
        raw = self._fetch_document(host, claimed.address)
        fetched = parse_did_document(raw)
        if (fetched.id, fetched.ed25519_public) != (claimed.id, claimed.ed25519_public):
            raise ValueError("the document it serves differs from its lookup answer")
        if fetched.x25519_public is None:
            raise ValueError("the recipient's document has no X25519 key")
        return fetched, raw

    def _fetch_document(self, host: str, address: str) -> dict[str, Any]:
        answer = self.peers.get(self.peers.url(host, f"/{address}/did.json"))
        if answer.status != 200:
            raise _http_error(host, answer.status, answer.body)
        try:
            document = json.loads(answer.body)
        except (ValueError, RecursionError):
            raise ValueError("the DID document is not JSON") from None
        if not isinstance(document, dict):
            raise ValueError("the DID document is not a JSON object")
        return document

    # --- sending -----------------------------------------------------------------------------------------

    def deliver(
        self, host: str, msg_id: str, from_did: str, sealed: dict[str, Any], kids: list[str], nonce: str = ""
    ) -> Sent | NotSent:
        """POST one message to ``host``; a fresh timestamp each call, the same ``id`` (the peer dedupes on it).

        ``nonce``: a handshake offer's (mailio.md section 4): the message goes as intent ``handshake_request``
        with ``plainBodyBase64`` = base64 of JSON ``{"nonce": ...}`` (mtp-wire.md section 3), and the peer
        files it in its owner's ``handshake`` folder if the nonce is live and theirs.
        """
        try:
            route = self.discovery.discover(host)
        except InvalidDomain:
            return NotSent(f"{host} is not a mail host", temporary=False)
        if route.route != MAILIO or not route.key:
            return NotSent(f"{host} publishes no Mailio key now: {route.reason}", temporary=route.temporary)
        now = _now_ms()
        message = did_comm_message(
            type=TYPE_ENCRYPTED,
            id=msg_id,
            from_=from_did,
            to=kids,
            thid=msg_id,
            created_time=now,
            intent=INTENT_HANDSHAKE_REQUEST if nonce else INTENT_MESSAGE,
            body=jwe_body(sealed),
            plain_body_base64=nonce_body(nonce) if nonce else "",
        )
        body = body_bytes(sign_request(DIDCOMM_REQUEST, did_comm_request(message, now), self.server_key, self.domain))
        try:
            answer = self.peers.post(self.peers.url(host, MESSAGING_PATH), body)
            if answer.status == 409:
                return Sent(host)  # the peer has this id already (a resend after a lost receipt)
            if not 200 <= answer.status < 300:
                raise _http_error(host, answer.status, answer.body)
            receipt = self._verified(answer.body, DIDCOMM_REQUEST, route, sender_domain=True)
        except (PeerError, MtpError, ValueError) as exc:
            return NotSent(f"{host}: {exc}", temporary=_is_temporary(exc) or isinstance(exc, MtpError))
        named = (receipt.get("didCommMessage") or {}).get("id") if isinstance(receipt, dict) else None
        if named != msg_id:
            return NotSent(f"{host}: the receipt names another message id", temporary=True)
        return Sent(host)

    def _verified(self, body: bytes, payload_key: str, route: Route, *, sender_domain: bool) -> dict[str, Any]:
        """The payload decoded from a signed answer once it verifies with the host's key (rediscovered once)."""
        signed = parse_signed(body, payload_key, sender_domain=sender_domain)
        try:
            return verify(signed, base64.b64decode(str(route.key)))
        except MtpError as exc:
            if exc.status != 401:
                raise
            fresh = self.discovery.discover(route.domain, fresh=True)
            if fresh.route != MAILIO or not fresh.key or fresh.key == route.key:
                raise
            return verify(signed, base64.b64decode(fresh.key))


# --- sealing for peers (client and server alike) -----------------------------------------------------------


def seal_for_peers(plaintext: bytes, recipients: Iterable[Recipient], aad: bytes) -> dict[str, Any]:
    """A General JSON JWE with ``alg`` and ``enc`` in the protected header, one entry (``kid``, ``epk``)
    per recipient: the shape the reference keeps (it drops per-recipient ``alg``). joserfc does the work."""
    document = jwe.GeneralJSONEncryption({"enc": CONTENT_ENCRYPTION, "alg": KEY_ALGORITHM}, plaintext, aad=aad)
    for recipient in recipients:
        document.add_recipient({"kid": recipient.kid}, recipient.jwk())
    if not document.recipients:
        raise ValueError("no recipient to seal to")
    sealed = dict(jwe.encrypt_json(document, None))
    document.recipients.clear()
    return sealed


def check_client_sealed(document: Any, owner_kid: str) -> dict[str, Any]:
    """A JWE the owner's client sealed, checked before it is stored or sent; ``ValueError`` says what is wrong.

    Shape only (the server cannot open it): the six members, ``alg``/``enc`` in the protected header, a
    ``kid`` and ``epk`` per recipient, one of them the owner's own (so the sent copy opens for the owner).
    """
    if not isinstance(document, dict):
        raise ValueError("sealed: must be a General JSON JWE object")
    for name in JWE_MEMBERS:
        if not document.get(name):
            raise ValueError(f"sealed: {name} is missing or empty")
    if any(not isinstance(document[n], str) for n in JWE_MEMBERS if n != "recipients"):
        raise ValueError("sealed: aad, ciphertext, iv, tag and protected must be base64url strings")
    try:
        protected = json.loads(
            base64.urlsafe_b64decode(document["protected"] + "=" * (-len(document["protected"]) % 4))
        )
    except (ValueError, binascii.Error, RecursionError):
        raise ValueError("sealed: protected is not base64url JSON") from None
    if not isinstance(protected, dict) or (protected.get("alg"), protected.get("enc")) != (
        KEY_ALGORITHM,
        CONTENT_ENCRYPTION,
    ):
        raise ValueError(f"sealed: the protected header must say alg {KEY_ALGORITHM} and enc {CONTENT_ENCRYPTION}")
    recipients = document["recipients"]
    if not isinstance(recipients, list) or len(recipients) > 1000:
        raise ValueError("sealed: recipients must be a list (at most 1000)")
    kids = []
    for entry in recipients:
        header = entry.get("header") if isinstance(entry, dict) else None
        if not isinstance(header, dict) or not isinstance(header.get("kid"), str) or not entry.get("encrypted_key"):
            raise ValueError("sealed: every recipient needs header.kid and encrypted_key")
        if not isinstance(header.get("epk"), dict):
            raise ValueError("sealed: every recipient needs header.epk")
        kids.append(header["kid"])
    if owner_kid not in kids:
        raise ValueError("sealed: it must be sealed to the owner's own key too (kid " + owner_kid + ")")
    return {name: document[name] for name in JWE_MEMBERS}


def for_host(sealed: dict[str, Any], host: str) -> tuple[dict[str, Any], list[str]]:
    """The JWE with only ``host``'s recipient entries (the others' kids stay hidden), and those kids."""
    prefix = f"did:web:{host}#"
    entries = [r for r in sealed.get("recipients") or () if str(r.get("header", {}).get("kid", "")).startswith(prefix)]
    return {**sealed, "recipients": entries}, [r["header"]["kid"] for r in entries]


# --- helpers -----------------------------------------------------------------------------------------------


def _resolution(address: str, host: str, document: DidDocument, raw: dict[str, Any], reason: str) -> Resolution:
    kid = did_web(host, str(document.address))
    return Resolution(address, MAILIO, reason, host=host, kid=kid, x25519=document.x25519_public, document=raw)


def _twin(body: bytes, payload_key: str) -> dict[str, Any]:
    """The JSON twin of a verified answer (only for what the signature does not cover: the caller checks)."""
    try:
        twin = json.loads(body).get(payload_key)
    except (ValueError, AttributeError, RecursionError):
        return {}
    return twin if isinstance(twin, dict) else {}


def _http_error(host: str, status: int, body: bytes) -> Exception:
    reason = ""
    try:
        document = json.loads(body)
        if isinstance(document, dict):
            said = str(document.get("error") or document.get("message") or "")[:200]
            reason = "".join(c if c.isprintable() else " " for c in said)  # the peer chose it: one plain line
    except (ValueError, RecursionError):
        pass
    text = f"{host} answered {status}" + (f": {reason}" if reason else "")
    if status in _RETRY_STATUSES or status >= 500:
        return PeerUnavailable(text)
    return ValueError(text)


def _is_temporary(exc: Exception) -> bool:
    return isinstance(exc, PeerUnavailable)


def _now_ms() -> int:
    return int(time.time() * 1000)
