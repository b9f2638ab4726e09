"""``mailbox add|list|alias|token``: the operator creates mailboxes and issues their API tokens (server side)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bridge.commands import CommandError, open_bridge, write_private_file


def register(verbs: Any) -> None:
    mailbox = verbs.add_parser("mailbox", help="create and list mailboxes, issue API tokens").add_subparsers(
        dest="action", required=True
    )
    add = mailbox.add_parser("add", help="create a mailbox (generates the owner's keys unless given)")
    add.add_argument("email")
    add.add_argument("--ed25519-public", help="the owner's Ed25519 public key, standard base64")
    add.add_argument("--x25519-public", help="the owner's X25519 public key, standard base64")
    add.add_argument("--key-out", help="where to write generated private keys (default ./<address>.key.json)")
    add.set_defaults(func=cmd_mailbox_add)
    mailbox.add_parser("list", help="list mailboxes as JSON lines").set_defaults(func=cmd_mailbox_list)
    alias = mailbox.add_parser("alias", help="deliver mail for ALIAS to EMAIL's mailbox")
    alias.add_argument("email")
    alias.add_argument("alias")
    alias.set_defaults(func=cmd_mailbox_alias)
    token = mailbox.add_parser("token", help="issue an API bearer token (printed alone on the last line)")
    token.add_argument("email")
    token.set_defaults(func=cmd_mailbox_token)


def _directory() -> Any:
    return open_bridge().mailboxes


def cmd_mailbox_add(args: argparse.Namespace) -> int:
    from bridge.mailio.identity import generate_user_keys, parse_public_key_b64
    from bridge.store.mailboxes import MailboxError

    directory = _directory()
    key_path = None
    if args.ed25519_public or args.x25519_public:
        if not (args.ed25519_public and args.x25519_public):
            raise CommandError("give both --ed25519-public and --x25519-public, or neither")
        try:
            ed_public = parse_public_key_b64(args.ed25519_public, name="--ed25519-public")
            x_public = parse_public_key_b64(args.x25519_public, name="--x25519-public")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        keys = None
    else:
        keys = generate_user_keys()
        ed_public, x_public = keys.ed25519_public, keys.x25519_public
    try:
        mailbox = directory.add(args.email, ed_public, x_public)
    except MailboxError as exc:
        raise CommandError(str(exc)) from None
    if keys is not None:
        key_path = Path(args.key_out or f"{mailbox.address}.key.json").resolve()
        write_private_file(key_path, json.dumps(keys.to_key_file(mailbox.email), indent=2).encode())
    out = {
        "email": mailbox.email,
        "address": mailbox.address,
        "ed25519_public": mailbox.ed25519_public,
        "x25519_public": mailbox.x25519_public,
    }
    if key_path is not None:
        out["key_file"] = str(key_path)
    print(json.dumps(out))
    return 0


def cmd_mailbox_list(args: argparse.Namespace) -> int:
    for mailbox in _directory().all():
        print(json.dumps({"email": mailbox.email, "address": mailbox.address, "aliases": list(mailbox.aliases)}))
    return 0


def cmd_mailbox_alias(args: argparse.Namespace) -> int:
    from bridge.store.mailboxes import MailboxError

    try:
        mailbox = _directory().add_alias(args.email, args.alias)
    except MailboxError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"email": mailbox.email, "address": mailbox.address, "aliases": list(mailbox.aliases)}))
    return 0


def cmd_mailbox_token(args: argparse.Namespace) -> int:
    directory = _directory()
    mailbox = directory.resolve(args.email, cached=False)
    if mailbox is None:
        raise CommandError("no such mailbox")
    token = directory.issue_token(mailbox)
    print(f"API token for {mailbox.email} (shown once; store it safely):")
    print(token)
    return 0
