"""``mail send --key FILE``: seal on the owner's machine, so the bridge never holds the plaintext.

The client composes the message itself (``bridge.mail.compose``, as the server would), asks the bridge for
every recipient's key (``POST /api/v1/recipients/resolve``: each DID document checked there, checked here
again: the address must derive from its ``#master`` key), seals the message as recipients get it (Bcc
removed) to each recipient's X25519 key plus the owner's own, and submits only the JWE with the envelope
recipients. Every recipient must be a Mailio one: SMTP recipients need the plaintext, so such a message is
refused here with their addresses (send it without ``--key``).
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
from pathlib import Path
from typing import Any

from bridge.commands import CommandError, api, load_key_file

RESOLVE_BATCH = 20  # the resolve endpoint's MAX_ADDRESSES


def cmd_mail_send_sealed(args: argparse.Namespace) -> int:
    from bridge.mail.compose import ComposeError, from_fields, from_raw
    from bridge.mailio.did import parse_did_document
    from bridge.mailio.peer_send import seal_for_peers
    from bridge.sealing import Recipient

    key_file, keys = load_key_file(args.key)
    sender = args.sender or key_file.get("email") or ""
    message_id = f"{secrets.token_hex(16)}@{sender.rpartition('@')[2] or 'localhost'}"
    try:
        if args.raw:
            outgoing = from_raw(Path(args.raw).read_bytes(), message_id=message_id)
        else:
            fields: dict[str, Any] = {"to": args.to, "cc": args.cc, "bcc": args.bcc, "subject": args.subject}
            fields |= {"text": args.text} if args.text is not None else {}
            fields |= {"html": Path(args.html_file).read_text()} if args.html_file else {}
            fields |= {"in_reply_to": args.in_reply_to} if args.in_reply_to else {}
            fields["attachments"] = [_attachment(path) for path in args.attach]
            outgoing = from_fields(fields, default_from=sender, message_id=message_id)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read a file: {exc.__class__.__name__}") from None
    except ComposeError as exc:
        raise CommandError(str(exc)) from None
    if not outgoing.recipients:
        raise CommandError("no recipients (--to, --cc, --bcc)")
    recipients, owner_kid = [], ""
    for start in range(0, len(outgoing.recipients), RESOLVE_BATCH):
        batch = outgoing.recipients[start : start + RESOLVE_BATCH]
        answer = api("POST", args, "/api/v1/recipients/resolve", {"addresses": batch})
        owner_kid = answer["owner"]["kid"]
        for found in answer["recipients"]:
            if found.get("route") != "mailio" or not found.get("kid"):
                raise CommandError(
                    f"{found.get('address')} cannot get mail sealed on this machine ({found.get('route')}: "
                    f"{found.get('reason')}); send without --key"
                )
            try:
                document = parse_did_document(found.get("did_document"))
            except ValueError as exc:
                raise CommandError(f"{found.get('address')}: the bridge's DID document is unusable: {exc}") from None
            if document.x25519_public is None or found["kid"].rpartition("#")[2] != document.address:
                raise CommandError(f"{found.get('address')}: the DID document does not match its kid")
            recipients.append(Recipient(found["kid"], document.x25519_public))
    recipients.append(Recipient(owner_kid, keys.x25519_public))
    aad = json.dumps({"from": owner_kid}, separators=(",", ":")).encode()
    sealed = seal_for_peers(outgoing.wire, recipients, aad)
    lists = {"to": args.to, "cc": args.cc, "bcc": args.bcc} if not args.raw else {"to": outgoing.recipients}
    submission = {"sealed": sealed, **{k: v for k, v in lists.items() if v}, "from": outgoing.from_address}
    submission |= {"handshake_offer": args.handshake_offer} if args.handshake_offer else {}
    print(json.dumps(api("POST", args, "/api/v1/messages", submission)))
    return 0


def _attachment(path: str) -> dict[str, str]:
    import mimetypes

    return {
        "filename": Path(path).name,
        "content_type": mimetypes.guess_type(path)[0] or "application/octet-stream",
        "data": base64.b64encode(Path(path).read_bytes()).decode(),
    }
