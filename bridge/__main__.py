"""The operator's and the owner's command line: ``python -m bridge <verb>``.

Server side (reads the bridge's settings): ``mailbox add|list|alias|token``, ``postal-keys``,
``rebuild-index``, ``rescreen``, ``discover``, ``worker``, ``run``. Client side (talks to the API over HTTP, holds
the owner's key, which never leaves that machine): ``mail list|read|move|send|status|resend``,
``handshake approve|revoke|list``.
Errors print one line to stderr and exit 1 or 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bridge.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"mailio-bridge: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"mailio-bridge: {exc}", file=sys.stderr)
        return 1


#: sysexits.h: a temporary failure, try again later (``discover`` when DNS did not answer).
EX_TEMPFAIL = 75


class CommandError(Exception):
    """A command cannot do what was asked; the message is shown as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bridge", description="The Mailio bridge for Postal.")
    verbs = parser.add_subparsers(dest="verb", required=True)

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

    mail = verbs.add_parser("mail", help="client side: list and read your mail").add_subparsers(
        dest="action", required=True
    )
    listing = _client(mail, "list", "list a folder", cmd_mail_list)
    listing.add_argument("--folder", default="inbox")
    reading = _client(mail, "read", "fetch and decrypt one message to stdout", cmd_mail_read)
    reading.add_argument("id")
    reading.add_argument("--key", required=True, help="your key file (from `mailbox add`)")
    moving = _client(mail, "move", "move one message to another folder", cmd_mail_move)
    moving.add_argument("id")
    moving.add_argument("folder")
    sending = _client(mail, "send", "send a message (202: queued; `mail status ID` follows it)", cmd_mail_send)
    for name in ("--to", "--cc", "--bcc"):
        sending.add_argument(name, action="append", default=[], help="a recipient (repeatable)")
    sending.add_argument("--from", dest="sender", help="your address or one of its aliases (default: yours)")
    sending.add_argument("--subject", default="")
    sending.add_argument("--text", help="the plain-text body")
    sending.add_argument("--html-file", help="an HTML body from a file")
    sending.add_argument("--attach", action="append", default=[], help="a file to attach (repeatable)")
    sending.add_argument("--in-reply-to", help="the Message-ID this answers")
    sending.add_argument("--raw", help="send this RFC 5322 file as it is (recipients from its To/Cc/Bcc)")
    status = _client(mail, "status", "each recipient's delivery state of a sent message", cmd_mail_status)
    status.add_argument("id")
    resend = _client(mail, "resend", "send one recipient again (an explicit act: it may arrive twice)", cmd_mail_resend)
    resend.add_argument("id")
    resend.add_argument("address")

    verbs.add_parser(
        "postal-keys", help="list the Postal signing keys the bridge trusts, with their KIDs (compare with Postal's)"
    ).set_defaults(func=cmd_postal_keys)
    verbs.add_parser("rebuild-index", help="restore Redis indexes from the object store").set_defaults(
        func=cmd_rebuild_index
    )
    rescreen = verbs.add_parser("rescreen", help="re-file a mailbox's screened mail by its current handshakes")
    rescreen.add_argument("email")
    rescreen.set_defaults(func=cmd_rescreen)
    discover = verbs.add_parser(
        "discover", help="how mail to DOMAIN travels (Mailio, SMTP or none), as one JSON object; 75: retry later"
    )
    discover.add_argument("domain")
    discover.add_argument("--fresh", action="store_true", help="ask DNS even if an answer is cached")
    discover.set_defaults(func=cmd_discover)

    handshake = verbs.add_parser("handshake", help="client side: approve, revoke and list senders").add_subparsers(
        dest="action", required=True
    )
    for name, helptext in (
        ("approve", "sign an 'accepted' handshake for SENDER on this machine and upload it"),
        ("revoke", "sign a 'revoked' handshake for SENDER and upload it"),
    ):
        signing = _client(handshake, name, helptext, cmd_handshake_sign)
        signing.set_defaults(status=name)
        signing.add_argument("sender", help="an e-mail address, or a Mailio sender's did:web:HOST#0x...")
        signing.add_argument("--key", required=True, help="your key file (from `mailbox add`)")
    _client(handshake, "list", "list your handshakes", cmd_handshake_list)
    worker = verbs.add_parser("worker", help="run the RQ worker for every bridge queue, with its scheduler")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)
    verbs.add_parser("run", help="embedded mode: Redis (if needed), web and worker; Ctrl-C stops all").set_defaults(
        func=cmd_run
    )
    return parser


def _client(parent: Any, name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
    """A client-side command: it talks to the owner API at --url with --token."""
    sub: argparse.ArgumentParser = parent.add_parser(name, help=helptext)
    sub.add_argument("--url", default=os.environ.get("BRIDGE_API_URL", "http://127.0.0.1:8080"))
    sub.add_argument("--token", default=os.environ.get("BRIDGE_API_TOKEN"), help="or BRIDGE_API_TOKEN")
    sub.set_defaults(func=func)
    return sub


# --- mailboxes -------------------------------------------------------------------------------


def _bridge() -> Any:
    from bridge.context import Bridge

    settings = Settings.from_env()
    return Bridge(settings)


def _directory() -> Any:
    return _bridge().mailboxes


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


def write_private_file(path: Path, data: bytes) -> None:
    """Create a file only its owner can read; refuse to overwrite an existing key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists already; not overwriting a key file") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


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


# --- client side -----------------------------------------------------------------------------


def _api(method: str, url: str, token: str | None, path: str, document: Any = None) -> Any:
    """One call to the owner API; any failure becomes a one-line CommandError."""
    import requests

    if not token:
        raise CommandError("an API token is needed: --token or BRIDGE_API_TOKEN")
    try:
        response = requests.request(
            method, f"{url.rstrip('/')}{path}", json=document, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
    except requests.RequestException as exc:
        raise CommandError(f"cannot reach {url}: {exc.__class__.__name__}") from None
    if response.status_code not in (200, 201, 202):
        try:
            reason = response.json().get("error", "")
        except ValueError:
            reason = response.text[:100]
        raise CommandError(f"{response.status_code}: {reason}")
    return response.json()


def cmd_handshake_sign(args: argparse.Namespace) -> int:
    """Sign on the owner's machine (the server never sees the private key), then upload."""
    from urllib.parse import urlparse

    from bridge.mailio.handshakes import HandshakeError, sign_handshake
    from bridge.mailio.identity import UserKeys

    try:
        keys = UserKeys.from_key_file(json.loads(Path(args.key).read_text()))
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot use key file: {exc.__class__.__name__}") from None
    sender = args.sender.strip()
    who = {"sender_did": sender} if sender.startswith("did:") else {"sender_email": sender.lower()}
    try:
        document = sign_handshake(
            ed25519_private=keys.ed25519_private,
            status="accepted" if args.status == "approve" else "revoked",
            origin_domain=urlparse(args.url).hostname or "localhost",
            **who,
        )
    except HandshakeError as exc:
        raise CommandError(str(exc)) from None
    result = _api("PUT", args.url, args.token, "/api/v1/handshakes", document)
    content = result["handshake"]["content"]
    print(json.dumps({"result": result["result"], "handshakeId": content["handshakeId"], "status": content["status"]}))
    return 0


def cmd_handshake_list(args: argparse.Namespace) -> int:
    for document in _api("GET", args.url, args.token, "/api/v1/handshakes")["handshakes"]:
        content = document["content"]
        print(json.dumps({k: content.get(k) for k in ("handshakeId", "status", "senderMetadata", "created")}))
    return 0


def cmd_mail_list(args: argparse.Namespace) -> int:
    data = _api("GET", args.url, args.token, f"/api/v1/messages?folder={args.folder}")
    for record in data["messages"]:
        print(json.dumps(record))
    return 0


def cmd_mail_move(args: argparse.Namespace) -> int:
    record = _api("POST", args.url, args.token, f"/api/v1/messages/{args.id}/move", {"folder": args.folder})
    print(json.dumps({"id": record["id"], "folder": record["folder"]}))
    return 0


def cmd_mail_send(args: argparse.Namespace) -> int:
    import base64
    import mimetypes

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
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read a file: {exc.__class__.__name__}") from None
    print(json.dumps(_api("POST", args.url, args.token, "/api/v1/messages", document)))
    return 0


def cmd_mail_status(args: argparse.Namespace) -> int:
    data = _api("GET", args.url, args.token, f"/api/v1/messages/{args.id}")
    print(json.dumps({"id": data["id"], "folder": data.get("folder"), "recipients": data.get("recipients")}))
    return 0


def cmd_mail_resend(args: argparse.Namespace) -> int:
    document = {"address": args.address}
    print(json.dumps(_api("POST", args.url, args.token, f"/api/v1/messages/{args.id}/resend", document)))
    return 0


def cmd_mail_read(args: argparse.Namespace) -> int:
    from bridge.mailio.identity import UserKeys
    from bridge.sealing import SealingError, open_sealed

    try:
        key_file = json.loads(Path(args.key).read_text())
        UserKeys.from_key_file(key_file)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot use key file: {exc.__class__.__name__}") from None
    data = _api("GET", args.url, args.token, f"/api/v1/messages/{args.id}")
    try:
        plaintext = open_sealed(data["body"], key_file["encryption_key"])
    except SealingError as exc:
        raise CommandError(str(exc)) from None
    sys.stdout.buffer.write(plaintext)
    sys.stdout.buffer.flush()
    return 0


# --- operations ------------------------------------------------------------------------------


def cmd_postal_keys(args: argparse.Namespace) -> int:
    for key in _bridge().postal_keys.describe():
        print(json.dumps(key))
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from bridge.maintenance import rebuild_index

    counts = rebuild_index(_bridge())
    print(json.dumps(counts))
    return 0


def cmd_rescreen(args: argparse.Namespace) -> int:
    from bridge import context
    from bridge.jobs.inbound import rescreen_mailbox

    bridge = _bridge()
    mailbox = bridge.mailboxes.resolve(args.email, cached=False)
    if mailbox is None:
        raise CommandError("no such mailbox")
    context.use(bridge)
    print(json.dumps({"email": mailbox.email, "moved": rescreen_mailbox(mailbox.address)}))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from bridge.mailio.discovery import InvalidDomain

    try:
        route = _bridge().discovery.discover(args.domain, fresh=args.fresh)
    except InvalidDomain as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(route.to_json()))
    return EX_TEMPFAIL if route.temporary else 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bridge.worker import run_worker

    return run_worker(burst=args.burst)


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.embedded import run_embedded

    return run_embedded()


if __name__ == "__main__":
    sys.exit(main())
