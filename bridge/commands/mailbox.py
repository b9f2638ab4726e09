"""``mailbox add|list|alias|token|tokens|revoke-token|remove``: the operator's side of mailboxes and their
API tokens (server side, from the bridge's settings)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bridge.commands import CommandError, open_bridge, say_none, write_private_file


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
    alias = mailbox.add_parser("alias", help="deliver mail for ALIAS to EMAIL's mailbox (--remove: stop)")
    alias.add_argument("email")
    alias.add_argument("alias")
    alias.add_argument("--remove", action="store_true", help="remove the alias instead")
    alias.set_defaults(func=cmd_mailbox_alias)
    token = mailbox.add_parser("token", help="issue an API bearer token (printed alone on the last line)")
    token.add_argument("email")
    token.add_argument("--name", help="what the token is for, unique per mailbox (default token-<n>)")
    token.set_defaults(func=cmd_mailbox_token)
    tokens = mailbox.add_parser("tokens", help="list EMAIL's API tokens (name, created, last used) as JSON lines")
    tokens.add_argument("email")
    tokens.set_defaults(func=cmd_mailbox_tokens)
    revoke = mailbox.add_parser("revoke-token", help="revoke EMAIL's token NAME: it gets 401 from then on")
    revoke.add_argument("email")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_mailbox_revoke_token)
    remove = mailbox.add_parser("remove", help="remove a mailbox (refused while it holds mail, unless --purge)")
    remove.add_argument("email")
    remove.add_argument("--purge", action="store_true", help="also delete its mail and everything else it owns")
    remove.set_defaults(func=cmd_mailbox_remove)


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
    mailboxes = _directory().all()
    for mailbox in mailboxes:
        print(json.dumps({"email": mailbox.email, "address": mailbox.address, "aliases": list(mailbox.aliases)}))
    if not mailboxes:
        say_none("no mailboxes yet: `mailbox add EMAIL` makes one")
    return 0


def cmd_mailbox_alias(args: argparse.Namespace) -> int:
    from bridge.store.mailboxes import MailboxError

    directory = _directory()
    try:
        mailbox = (
            directory.remove_alias(args.email, args.alias)
            if args.remove
            else directory.add_alias(args.email, args.alias)
        )
    except MailboxError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"email": mailbox.email, "address": mailbox.address, "aliases": list(mailbox.aliases)}))
    return 0


def _mailbox(directory: Any, email: str) -> Any:
    mailbox = directory.resolve(email, cached=False)
    if mailbox is None:
        raise CommandError("no such mailbox")
    return mailbox


def cmd_mailbox_token(args: argparse.Namespace) -> int:
    from bridge.store.tokens import TokenError

    directory = _directory()
    mailbox = _mailbox(directory, args.email)
    try:
        token, name = directory.tokens.issue(mailbox.address, args.name)
    except TokenError as exc:
        raise CommandError(str(exc)) from None
    print(f"API token {name} for {mailbox.email} (shown once; store it safely):")
    print(token)
    return 0


def cmd_mailbox_tokens(args: argparse.Namespace) -> int:
    directory = _directory()
    mailbox = _mailbox(directory, args.email)
    tokens = directory.tokens.listing(mailbox.address)
    for token in tokens:
        print(json.dumps({k: _iso(v) if k != "name" else v for k, v in token.items()}))
    if not tokens:
        say_none(f"{mailbox.email} has no API tokens: `mailbox token EMAIL` issues one")
    return 0


def _iso(when: float | None) -> str | None:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds") if when else None


def cmd_mailbox_revoke_token(args: argparse.Namespace) -> int:
    from bridge.store.tokens import TokenError

    directory = _directory()
    mailbox = _mailbox(directory, args.email)
    try:
        directory.tokens.revoke(mailbox.address, args.name)
    except TokenError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"email": mailbox.email, "revoked": args.name}))
    return 0


def cmd_mailbox_remove(args: argparse.Namespace) -> int:
    from bridge.store.mailboxes import MailboxError
    from bridge.store.removal import remove_mailbox

    bridge = open_bridge()
    mailbox = _mailbox(bridge.mailboxes, args.email)
    try:
        removed = remove_mailbox(bridge.objects, bridge.redis, bridge.mailboxes, mailbox, purge=args.purge)
    except MailboxError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(removed))
    return 0
