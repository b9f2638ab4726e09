"""The command line's verbs, one module per group; ``bridge.__main__`` only builds the parser from them.

Each module has ``register(verbs)``, which adds its sub-commands to the top-level sub-parsers and sets
``func`` on each. Server-side commands open the bridge from its settings (``open_bridge``); client-side
ones talk to the owner API over HTTP (``client_parser`` and ``api``) and never need the bridge's settings.
A command that cannot do what was asked raises ``CommandError``: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bridge.settings import Settings, client_api_token, client_api_url

#: sysexits.h: a temporary failure, try again later (``discover`` when DNS did not answer).
EX_TEMPFAIL = 75


class CommandError(Exception):
    """A command cannot do what was asked; the message is shown as one line."""


def say_none(what: str) -> None:
    """An empty answer says so on stderr (stdout keeps its JSON lines, none here), with exit status 0."""
    import sys

    print(f"mailio-bridge: {what}", file=sys.stderr)


def open_bridge() -> Any:
    """The bridge as the web and worker processes see it, from the same settings."""
    from bridge.context import Bridge

    return Bridge(Settings.from_env())


def client_parser(parent: Any, name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
    """A client-side command: it talks to the owner API at --url with --token."""
    sub: argparse.ArgumentParser = parent.add_parser(name, help=helptext)
    sub.add_argument(
        "--url",
        default=None,
        help="the bridge's base URL; default BRIDGE_API_URL, else BRIDGE_PUBLIC_URL, else http://BRIDGE_LISTEN",
    )
    sub.add_argument("--token", default=None, help="or BRIDGE_API_TOKEN")
    sub.set_defaults(func=func)
    return sub


def api_url(args: argparse.Namespace) -> str:
    """Where the owner API is: --url, else what the environment names; never a guessed port."""
    url = args.url or client_api_url()
    if not url:
        raise CommandError(
            "which bridge? give --url or set BRIDGE_API_URL (or BRIDGE_PUBLIC_URL, or BRIDGE_LISTEN as host:port)"
        )
    return str(url)


def api(method: str, args: argparse.Namespace, path: str, document: Any = None) -> Any:
    """One call to the owner API; any failure becomes a one-line CommandError."""
    import requests

    url = api_url(args)
    token = args.token or client_api_token()
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


def load_key_file(path: str) -> tuple[dict[str, Any], Any]:
    """The owner's key file as JSON and as ``UserKeys``; an error names the file and what is wrong with it."""
    import json

    from bridge.mailio.identity import UserKeys

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"cannot read key file {path}: {exc.strerror or exc.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not a key file: not text") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise CommandError(f"{path} is not a key file: not JSON") from None
    try:
        return data, UserKeys.from_key_file(data)
    except ValueError as exc:  # the reasons name fields, never key material
        raise CommandError(f"{path} is not a usable key file: {exc}") from None


def write_private_file(path: Path, data: bytes) -> None:
    """Create a file only its owner can read; refuse to overwrite an existing key."""
    from bridge.mailio.server_key import create_private_file

    try:
        create_private_file(path, data)
    except FileExistsError:
        raise CommandError(f"{path} exists already; not overwriting a key file") from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
