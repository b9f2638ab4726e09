"""``mail list|read|move|send|status|resend``: the owner's side, over HTTP to the owner API.

These run on the owner's machine with the owner's key file, which never leaves it: ``mail read``
decrypts there. They need no bridge settings, only where the API is and a token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bridge.commands import CommandError, api, client_parser, load_key_file, say_none


def register(verbs: Any) -> None:
    mail = verbs.add_parser("mail", help="client side: list and read your mail").add_subparsers(
        dest="action", required=True
    )
    listing = client_parser(mail, "list", "list a folder", cmd_mail_list)
    listing.add_argument("--folder", default="inbox")
    reading = client_parser(mail, "read", "fetch and decrypt one message to stdout", cmd_mail_read)
    reading.add_argument("id")
    reading.add_argument("--key", required=True, help="your key file (from `mailbox add`)")
    moving = client_parser(mail, "move", "move one message to another folder", cmd_mail_move)
    moving.add_argument("id")
    moving.add_argument("folder")
    sending = client_parser(mail, "send", "send a message (202: queued; `mail status ID` follows it)", cmd_mail_send)
    for name in ("--to", "--cc", "--bcc"):
        sending.add_argument(name, action="append", default=[], help="a recipient (repeatable)")
    sending.add_argument("--from", dest="sender", help="your address or one of its aliases (default: yours)")
    sending.add_argument("--subject", default="")
    sending.add_argument("--text", help="the plain-text body")
    sending.add_argument("--html-file", help="an HTML body from a file")
    sending.add_argument("--attach", action="append", default=[], help="a file to attach (repeatable)")
    sending.add_argument("--in-reply-to", help="the Message-ID this answers")
    sending.add_argument("--raw", help="send this RFC 5322 file as it is (recipients from its To/Cc/Bcc)")
    sending.add_argument("--key", help="your key file: seal here, to Mailio recipients' keys and yours (end to end)")
    sending.add_argument(
        "--handshake-offer",
        metavar="OFFER",
        help="the recipient's offer (NONCE:DOMAIN:0xADDRESS): send it to that Mailio user as a handshake request",
    )
    status = client_parser(mail, "status", "each recipient's delivery state of a sent message", cmd_mail_status)
    status.add_argument("id")
    resend = client_parser(
        mail, "resend", "send one recipient again (an explicit act: it may arrive twice)", cmd_mail_resend
    )
    resend.add_argument("id")
    resend.add_argument("address")


def cmd_mail_list(args: argparse.Namespace) -> int:
    data = api("GET", args, f"/api/v1/messages?folder={args.folder}")
    for record in data["messages"]:
        print(json.dumps(record))
    if not data["messages"]:
        say_none(f"no messages in {args.folder}")
    return 0


def cmd_mail_move(args: argparse.Namespace) -> int:
    record = api("POST", args, f"/api/v1/messages/{args.id}/move", {"folder": args.folder})
    print(json.dumps({"id": record["id"], "folder": record["folder"]}))
    return 0


def cmd_mail_send(args: argparse.Namespace) -> int:
    import base64
    import mimetypes

    if args.key:
        from bridge.commands.sealed_send import cmd_mail_send_sealed

        return cmd_mail_send_sealed(args)
    try:
        if args.raw:
            document: dict[str, Any] = {"raw": base64.b64encode(Path(args.raw).read_bytes()).decode()}
        else:
            document = {"to": args.to, "cc": args.cc, "bcc": args.bcc, "subject": args.subject}
            document |= {"text": args.text} if args.text is not None else {}
            document |= {"html": Path(args.html_file).read_text()} if args.html_file else {}
            document |= {"from": args.sender} if args.sender else {}
            document |= {"in_reply_to": args.in_reply_to} if args.in_reply_to else {}
            document["attachments"] = [
                {
                    "filename": Path(path).name,
                    "content_type": mimetypes.guess_type(path)[0] or "application/octet-stream",
                    "data": base64.b64encode(Path(path).read_bytes()).decode(),
                }
                for path in args.attach
            ]
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename}: {exc.strerror or exc.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{args.html_file} is not UTF-8 text") from None
    document |= {"handshake_offer": args.handshake_offer} if args.handshake_offer else {}
    print(json.dumps(api("POST", args, "/api/v1/messages", document)))
    return 0


def cmd_mail_status(args: argparse.Namespace) -> int:
    data = api("GET", args, f"/api/v1/messages/{args.id}")
    print(json.dumps({"id": data["id"], "folder": data.get("folder"), "recipients": data.get("recipients")}))
    return 0


def cmd_mail_resend(args: argparse.Namespace) -> int:
    document = {"address": args.address}
    print(json.dumps(api("POST", args, f"/api/v1/messages/{args.id}/resend", document)))
    return 0


def cmd_mail_read(args: argparse.Namespace) -> int:
    from bridge.sealing import SealingError, open_sealed

    key_file, keys = load_key_file(args.key)
    data = api("GET", args, f"/api/v1/messages/{args.id}")
    try:
        plaintext = open_sealed(data["body"], key_file["encryption_key"])
    except SealingError:
        raise CommandError(f"this key does not open that message ({_whose(data['body'], keys.address)})") from None
    sys.stdout.buffer.write(plaintext)
    sys.stdout.buffer.flush()
    return 0


def _whose(sealed: Any, key_address: str) -> str:
    """Whom a sealed body is for, against whom the key is for: the usual mistake is another mailbox's key."""
    kids = []
    if isinstance(sealed, dict):
        for recipient in sealed.get("recipients") or []:
            header = recipient.get("header") if isinstance(recipient, dict) else None
            if isinstance(header, dict) and isinstance(header.get("kid"), str):
                kids.append(header["kid"].rpartition("#")[2])
    sealed_to = ", ".join(kids) or "an unknown recipient"
    return f"the key file is {key_address}'s, the message is sealed to {sealed_to}"
