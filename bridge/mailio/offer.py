"""Handshake offers as a requester holds them (mailio.md section 4): ``<nonce>:<server domain>:<owner address>``.

The owner of a mailbox asks their server for an offer (``POST /api/v1/handshake-offers``) and hands the
string to someone who may write to them; that sender's server then sends its message with intent
``handshake_request`` and the nonce in ``plainBodyBase64`` (mtp-wire.md section 3), and the owner's server
files it in the ``handshake`` folder once (the nonce is single-use and lives five minutes). Parsing only:
no network, no Redis.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from bridge.mailio.discovery import InvalidDomain, normalize_domain
from bridge.mailio.identity import is_mailio_address

_NONCE = re.compile(r"[A-Za-z]{16}")


@dataclass(frozen=True)
class Offer:
    nonce: str
    domain: str  # the owner's server domain
    address: str  # the owner's 0x address

    def __str__(self) -> str:
        return f"{self.nonce}:{self.domain}:{self.address}"


def parse_offer(text: object) -> Offer:
    """An offer string, checked; ``ValueError`` with a one-line reason (without the nonce) otherwise."""
    if not isinstance(text, str) or text.count(":") != 2:
        raise ValueError("must be <nonce>:<server domain>:<owner address>, as `POST /api/v1/handshake-offers` gives")
    nonce, domain, address = text.strip().split(":")
    if not _NONCE.fullmatch(nonce):
        raise ValueError("the nonce must be 16 letters")
    try:
        domain = normalize_domain(domain)
    except InvalidDomain:
        raise ValueError("the server domain is not a domain name") from None
    if not is_mailio_address(address.lower()):
        raise ValueError("the owner address must be 0x and 40 hex digits")
    return Offer(nonce, domain, address.lower())


def nonce_body(nonce: str) -> str:
    """``plainBodyBase64`` of a handshake request: padded standard base64 of compact JSON ``{"nonce": ...}``."""
    return base64.b64encode(json.dumps({"nonce": nonce}, separators=(",", ":")).encode()).decode()
