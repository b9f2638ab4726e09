"""DID documents peers fetch: ``GET /.well-known/did.json`` (the server's) and ``GET /<address>/did.json``.

Public by design (mailio.md section 2): a mailbox's document holds only public keys and where to send.
Unknown or malformed addresses are 404, alike. Documents are built by ``bridge.mailio.did`` with the
service endpoint under ``BRIDGE_PUBLIC_URL``; no server key configured -> 503.
"""

from __future__ import annotations

import base64

from flask import Blueprint, Response, current_app, jsonify

from bridge.context import Bridge
from bridge.mailio.accept import server_key
from bridge.mailio.did import server_did_document, user_did_document
from bridge.mailio.identity import is_mailio_address
from bridge.mailio.server_key import public_key_bytes, server_address

blueprint = Blueprint("wellknown", __name__)

#: Peers may cache a document this long (keys change rarely; a rotation is also announced in DNS).
CACHE_SECONDS = 300


def _document(document: dict[str, object]) -> Response:
    response = jsonify(document)
    response.headers["Cache-Control"] = f"public, max-age={CACHE_SECONDS}"
    return response


@blueprint.get("/.well-known/did.json")
def server_document() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    key = server_key(bridge)
    return _document(server_did_document(bridge.settings.public_base_url, public_key_bytes(key)))


@blueprint.get("/<address>/did.json")
def user_document(address: str) -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    key = server_key(bridge)
    mailbox = bridge.mailboxes.get(address) if is_mailio_address(address) else None
    if mailbox is None:
        response = jsonify({"error": "no such mailbox"})
        response.status_code = 404
        return response
    document = user_did_document(
        bridge.settings.public_base_url,
        mailbox.address,
        base64.b64decode(mailbox.ed25519_public),
        base64.b64decode(mailbox.x25519_public),
        server_address=server_address(key),
    )
    return _document(document)
