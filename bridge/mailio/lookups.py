"""MTP look-ups on the wire: DID documents by e-mail hash (section 6) and handshakes (section 7).

Payload builders in the reference's key order and omissions (see ``bridge.mailio.mtp`` for the CBOR rules
and the signed envelope). Protocol code: no I/O.
"""

from __future__ import annotations

from typing import Any

from bridge.mailio.mtp import SIGNATURE_SCHEME, go_struct
from bridge.mailio.status import StatusCode

EMAIL_LOOKUP_HASH_SCHEME = "SC_N32768_R8_P1_L32_B64"


def lookup_header(timestamp_ms: int, *, request: bool = True) -> dict[str, Any]:
    """Requests name the e-mail hash scheme; answers carry only scheme and time."""
    scheme = EMAIL_LOOKUP_HASH_SCHEME if request else ""
    return go_struct(
        ("signatureScheme", SIGNATURE_SCHEME, False),
        ("emailLookupHashScheme", scheme, True),
        ("timestamp", int(timestamp_ms), False),
    )


def did_lookup(
    email_hash: str,
    email: str = "",
    *,
    supports_mailio: bool = False,
    supports_standard_email: bool = False,
    did_document: dict[str, Any] | None = None,
    status: StatusCode | None = None,
) -> dict[str, Any]:
    """``DIDLookup``: the asked hash and address always, the findings when there are any."""
    return go_struct(
        ("emailHash", email_hash, False),
        ("email", email, False),
        ("supportsMailio", supports_mailio, True),
        ("supportsStandardEmail", supports_standard_email, True),
        ("didDocument", did_document, True),
        ("mtpStatusCode", status.to_json() if status else None, True),
    )


def did_lookup_request(sender_address: str, lookups: list[dict[str, Any]], timestamp_ms: int) -> dict[str, Any]:
    """``didLookupRequest``: ``didLookups`` is always written (an empty list is ``80``)."""
    return {"senderAddress": sender_address, "lookupHeader": lookup_header(timestamp_ms), "didLookups": list(lookups)}


def did_lookup_response(
    found: list[dict[str, Any]], not_found: list[dict[str, Any]], timestamp_ms: int
) -> dict[str, Any]:
    """``didLookupResponse``. Our ``didDocument`` in the CBOR is the real document, so the signature
    covers the DID and its keys (the reference's covers neither: mtp-wire.md section 6)."""
    return go_struct(
        ("lookupHeader", lookup_header(timestamp_ms, request=False), False),
        ("foundLookups", list(found), True),
        ("notFoundLookups", list(not_found), True),
    )


def handshake_lookup(
    *,
    id: str = "",
    address: str = "",
    email_hash: str = "",
    email: str = "",
    origin_domain: str = "",
    origin_ip: str = "",
) -> dict[str, Any]:
    """``HandshakeLookup``: ``email`` and ``originServer`` always written."""
    return go_struct(
        ("id", id, True),
        ("address", address, True),
        ("emailHash", email_hash, True),
        ("email", email, False),
        ("originServer", go_struct(("domain", origin_domain, False), ("ip", origin_ip, True)), False),
    )


def handshake_lookup_request(sender_address: str, lookups: list[dict[str, Any]], timestamp_ms: int) -> dict[str, Any]:
    """``handshakeRequest``: ``returnDefaultServerHandshake`` always written and true, as the reference sends."""
    return {
        "lookupHeader": lookup_header(timestamp_ms),
        "handshakeLookups": list(lookups),
        "returnDefaultServerHandshake": True,
        "senderAddress": sender_address,
    }


def handshake_response_content(content: dict[str, Any]) -> dict[str, Any]:
    """A handshake's decoded ``content`` in the answer's order (section 7); ``created`` a float (``fb``)."""
    origin: dict[str, Any] = content["originServer"] if isinstance(content.get("originServer"), dict) else {}
    metadata = content.get("senderMetadata") if isinstance(content.get("senderMetadata"), dict) else None
    rules = content.get("signupRules") if isinstance(content.get("signupRules"), dict) else None
    return go_struct(
        ("handshakeId", content.get("handshakeId", ""), True),
        (
            "originServer",
            go_struct(("domain", origin.get("domain", ""), False), ("ip", origin.get("ip", ""), True)),
            False,
        ),
        ("signupSubType", content.get("signupSubType", 0), True),
        (
            "signupRules",
            go_struct(("frequencyMinutes", rules.get("frequencyMinutes", 0), True)) if rules else None,
            True,
        ),
        ("status", content.get("status", ""), False),
        ("level", content.get("level", ""), False),
        ("ownerPublicKey", content.get("ownerPublicKey", ""), False),
        ("ownerAddress", content.get("ownerAddress", ""), False),
        (
            "senderMetadata",
            go_struct(
                ("emailHash", metadata.get("emailHash", ""), True), ("address", metadata.get("address", ""), True)
            )
            if metadata
            else None,
            True,
        ),
        ("signatureBase64", content.get("signatureBase64", ""), True),
        ("type", content.get("type", ""), True),
        ("signatureScheme", content.get("signatureScheme", SIGNATURE_SCHEME), False),
        ("created", float(content.get("created", 0.0)), False),
    )


def handshake_response(handshakes: list[dict[str, Any]], timestamp_ms: int) -> dict[str, Any]:
    """``handshakeResponse``: ``handshakes`` always a list (``80`` when none was found)."""
    return {"lookupHeader": lookup_header(timestamp_ms, request=False), "handshakes": list(handshakes)}
