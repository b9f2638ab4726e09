"""The server's Mailio identity: ``keys init`` creates its Ed25519 key, ``dns-records`` says what to publish.

Server side: both read the bridge's settings (``BRIDGE_DOMAIN``, ``BRIDGE_SERVER_KEY_FILE``,
``BRIDGE_PUBLIC_URL``) and nothing else; neither needs Redis or the object store.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import urlparse

from bridge.commands import CommandError
from bridge.mailio.server_key import (
    RECORD_NAME,
    ServerKeyError,
    create_server_key,
    load_server_key,
    server_address,
    txt_record,
)
from bridge.settings import Settings


def register(verbs: Any) -> None:
    keys = verbs.add_parser("keys", help="the server's Ed25519 key that signs Mailio protocol traffic").add_subparsers(
        dest="action", required=True
    )
    keys.add_parser(
        "init", help="create the server key at BRIDGE_SERVER_KEY_FILE (0600; never overwrites one)"
    ).set_defaults(func=cmd_keys_init)
    verbs.add_parser(
        "dns-records", help="the TXT record peers verify our signatures with, and what else to publish"
    ).set_defaults(func=cmd_dns_records)


def cmd_keys_init(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    path = settings.server_key_path
    try:
        key = create_server_key(path)
    except ServerKeyError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"key_file": str(path), "address": server_address(key), "txt": txt_record(key)}))
    return 0


def cmd_dns_records(args: argparse.Namespace) -> int:
    """A zone-file line to paste, then ``;`` comments: what else must be true for peers to reach us."""
    settings = Settings.from_env()
    try:
        key = load_server_key(settings.server_key_path)
    except ServerKeyError as exc:
        raise CommandError(str(exc)) from None
    domain = settings.domain.split(":")[0]
    name = RECORD_NAME.format(domain=domain)
    public_host = urlparse(settings.public_base_url).hostname or domain
    print(f'{name}. IN TXT "{txt_record(key)}"')
    print(f"; Peers find this bridge by that record (MIR-5) and then POST to https://{domain}/api/v1/mtp/...")
    print(
        f"; so https://{domain} must reach the bridge for /api/v1/mtp/, /.well-known/did.json and /<address>/did.json."
    )
    if public_host != domain:
        print(f"; BRIDGE_PUBLIC_URL names {public_host}: DID documents point peers there; both must serve the bridge.")
    print(f"; SMTP senders need an MX for {domain} pointing at Postal (unchanged by the Mailio protocol).")
    print(f"; The server's Mailio address is {server_address(key)} (did:mailio:{server_address(key)}).")
    print("; After a key rotation (a new key file), replace the TXT value; peers look it up again on a bad signature.")
    return 0
