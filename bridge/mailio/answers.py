"""Answering peers' signed look-ups: ``POST /api/v1/mtp/did`` and ``POST /api/v1/mtp/handshake``.

Authenticated like messages (``bridge.mailio.accept.authenticate``: the asking server's signature over the
CBOR, its key from DNS), counted against the same per-domain rate limit, the ``lookupHeader`` timestamp
inside the window; answered with our signed ``didLookupResponse`` / ``handshakeResponse`` (mtp-wire.md
sections 6 and 7). What they disclose, and no more:

* ``/did``: a mailbox's DID document only for an address the asker sends together with its e-mail
  lookup hash, i.e. one it already knows; anything else comes back as asked (``notFoundLookups``).
  Nothing lists mailboxes, and the directory is never hashed as a whole (``_owner``). Our CBOR carries
  the real document, so the signature covers the DID and its keys (the reference's does not).
* ``/handshake``: only the handshake an owner signed for the *asking* sender, whose key is
  ``did:web:<senderDomain>#<senderAddress>``: a server can learn its own senders' standing, never anyone
  else's. The owner is named by ``address`` or by ``email`` with its ``emailHash``; an ``id`` that is not
  that handshake's id finds nothing.
"""

from __future__ import annotations

import base64
from typing import Any

from bridge.context import Bridge
from bridge.mailio import lookups, mtp
from bridge.mailio.accept import authenticate, check_rate, now_ms, server_key
from bridge.mailio.did import user_did_document
from bridge.mailio.handshakes import HandshakeError, decode_content
from bridge.mailio.identity import handshake_id, is_mailio_address
from bridge.mailio.received import check_fresh
from bridge.mailio.server_key import server_address
from bridge.store.mailboxes import Mailbox

#: Look-ups one request may carry (the reference asks per recipient of one message).
MAX_LOOKUPS = 50


def _bad(message: str) -> mtp.MtpError:
    return mtp.MtpError(400, message)


def _checked(bridge: Bridge, body: bytes, payload_key: str, list_key: str) -> tuple[str, dict[str, Any], list[Any]]:
    """Authenticate, rate-limit and check the common shape; returns (sender domain, payload, look-ups)."""
    signed, payload = authenticate(bridge, body, payload_key)
    domain = signed.sender_domain
    assert domain is not None
    header = payload.get("lookupHeader")
    if not isinstance(header, dict) or header.get("signatureScheme") != mtp.SIGNATURE_SCHEME:
        raise _bad(f"lookupHeader is missing or its signatureScheme is not {mtp.SIGNATURE_SCHEME}")
    timestamp = header.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp <= 0:
        raise _bad("lookupHeader.timestamp is not a positive whole number of milliseconds")
    sender = payload.get("senderAddress")
    if not isinstance(sender, str) or not sender:
        raise _bad("senderAddress is missing")
    items = payload.get(list_key)
    if not isinstance(items, list) or len(items) > MAX_LOOKUPS or not all(isinstance(i, dict) for i in items):
        raise _bad(f"{list_key} is not a list of at most {MAX_LOOKUPS} objects")
    check_fresh(timestamp, now_ms(), bridge.settings.mtp_time_window)
    check_rate(bridge, domain)
    return domain, payload, items


def _owner(bridge: Bridge, email: Any, email_hash: Any) -> Mailbox | None:
    """The mailbox of the address the asker sends, if the asker's hash is that address's lookup hash.

    Resolving by the address (the reference always sends it with the hash) means we never hash our
    whole directory to find a hash: one scrypt per real mailbox asked about, cached in Redis for every
    process (``SenderHashes``); an unknown address costs one store read and no scrypt. Not cached in
    this process, so peers' questions cannot grow its memory.
    """
    if not isinstance(email, str) or not isinstance(email_hash, str) or not email or not email_hash:
        return None
    if len(email) > 320 or len(email_hash) > 100:
        raise _bad("a look-up's email or emailHash is too long")
    mailbox = bridge.mailboxes.resolve(email, cached=False)
    if mailbox is None:
        return None
    return mailbox if bridge.sender_hashes.lookup_hashes([email])[email.lower()] == email_hash else None


def answer_did_lookup(bridge: Bridge, body: bytes) -> dict[str, Any]:
    _, _, items = _checked(bridge, body, mtp.DID_LOOKUP_REQUEST, "didLookups")
    key = server_key(bridge)
    found, missing = [], []
    for item in items:
        email_hash, email = item.get("emailHash"), item.get("email", "")
        if not isinstance(email_hash, str) or not isinstance(email, str):
            raise _bad("didLookups has an entry whose emailHash or email is not text")
        mailbox = _owner(bridge, email, email_hash)
        if mailbox is None:
            missing.append(lookups.did_lookup(email_hash, email))
            continue
        document = user_did_document(
            bridge.settings.public_base_url,
            mailbox.address,
            _raw(mailbox.ed25519_public),
            _raw(mailbox.x25519_public),
            server_address=server_address(key),
        )
        entry = lookups.did_lookup(
            email_hash, email, supports_mailio=True, supports_standard_email=True, did_document=document
        )
        found.append(entry)
    payload = lookups.did_lookup_response(found, missing, now_ms())
    return mtp.sign_request(mtp.DID_LOOKUP_RESPONSE, payload, key, None)


def answer_handshake_lookup(bridge: Bridge, body: bytes) -> dict[str, Any]:
    domain, payload, items = _checked(bridge, body, mtp.HANDSHAKE_REQUEST, "handshakeLookups")
    sender_address = payload["senderAddress"]
    if not is_mailio_address(sender_address):
        raise _bad("senderAddress is not a 0x address")
    sender_key = f"did:web:{domain}#{sender_address}"
    answers = []
    for item in items:
        address, email_hash, wanted = item.get("address"), item.get("emailHash"), item.get("id")
        if is_mailio_address(address):
            owner: str | None = address
        elif isinstance(email_hash, str) and email_hash:
            mailbox = _owner(bridge, item.get("email"), email_hash)
            owner = mailbox.address if mailbox else None
        else:
            raise _bad("a handshake look-up needs address or emailHash")
        if owner is None:
            continue
        hid = handshake_id(owner, sender_key)
        if wanted not in (None, "", hid):
            continue
        handshake = bridge.handshakes.get(owner, hid)
        if handshake is None:
            continue
        try:
            answers.append(lookups.handshake_response_content(decode_content(handshake.cbor_payload)))
        except HandshakeError:
            continue
    response = lookups.handshake_response(answers, now_ms())
    return mtp.sign_request(mtp.HANDSHAKE_RESPONSE, response, server_key(bridge), None)


def _raw(value: str) -> bytes:
    return base64.b64decode(value)
