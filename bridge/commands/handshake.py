"""``handshake approve|revoke|list|offer``: the owner signs on their own machine (the server never sees the
private key), then uploads the signed document to the owner API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bridge.commands import CommandError, api, api_url, client_parser, load_key_file, say_none


def register(verbs: Any) -> None:
    handshake = verbs.add_parser("handshake", help="client side: approve, revoke and list senders").add_subparsers(
        dest="action", required=True
    )
    for name, helptext in (
        ("approve", "sign an 'accepted' handshake for SENDER on this machine and upload it"),
        ("revoke", "sign a 'revoked' handshake for SENDER and upload it"),
    ):
        signing = client_parser(handshake, name, helptext, cmd_handshake_sign)
        signing.set_defaults(status=name)
        signing.add_argument("sender", help="an e-mail address, or a Mailio sender's did:web:HOST#0x...")
        signing.add_argument("--key", required=True, help="your key file (from `mailbox add`)")
    client_parser(handshake, "list", "list your handshakes", cmd_handshake_list)
    client_parser(
        handshake,
        "offer",
        "ask your server for a single-use handshake offer (valid 5 minutes) to give a Mailio sender",
        cmd_handshake_offer,
    )


def cmd_handshake_sign(args: argparse.Namespace) -> int:
    from urllib.parse import urlparse

    from bridge.mailio.handshakes import HandshakeError, sign_handshake

    _, keys = load_key_file(args.key)
    sender = args.sender.strip()
    who = {"sender_did": sender} if sender.startswith("did:") else {"sender_email": sender.lower()}
    try:
        document = sign_handshake(
            ed25519_private=keys.ed25519_private,
            status="accepted" if args.status == "approve" else "revoked",
            origin_domain=urlparse(api_url(args)).hostname or "localhost",
            **who,
        )
    except HandshakeError as exc:
        raise CommandError(str(exc)) from None
    result = api("PUT", args, "/api/v1/handshakes", document)
    content = result["handshake"]["content"]
    print(json.dumps({"result": result["result"], "handshakeId": content["handshakeId"], "status": content["status"]}))
    return 0


def cmd_handshake_list(args: argparse.Namespace) -> int:
    documents = api("GET", args, "/api/v1/handshakes")["handshakes"]
    for document in documents:
        content = document["content"]
        print(json.dumps({k: content.get(k) for k in ("handshakeId", "status", "senderMetadata", "created")}))
    if not documents:
        say_none("no handshakes yet: `handshake approve SENDER --key FILE` makes one")
    return 0


def cmd_handshake_offer(args: argparse.Namespace) -> int:
    """Print the offer as the API returns it; its ``offer`` string is what the sender passes to
    ``mail send --handshake-offer``."""
    print(json.dumps(api("POST", args, "/api/v1/handshake-offers")))
    return 0
