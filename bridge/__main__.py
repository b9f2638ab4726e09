"""The operator's and the owner's command line: ``mailio-bridge <verb>`` (or ``python -m bridge <verb>``).

Server side (reads the bridge's settings): ``mailbox add|list|alias|token|tokens|revoke-token|remove``,
``postal-keys``, ``postal-setup``, ``rebuild-index``, ``rescreen``, ``discover``, ``worker``, ``run``. Client side
(talks to the API over HTTP, holds the owner's key, which never leaves that machine):
``mail list|read|move|send|status|resend``, ``handshake approve|revoke|list``.
The verbs live in ``bridge.commands``, one module per group; this module only builds the parser and
turns an error into one line on stderr with exit 1 or 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import redis

from bridge.commands import EX_TEMPFAIL, CommandError, admin, handshake, mail, mailbox, server
from bridge.errors import DependencyUnavailable, RedisUnavailable
from bridge.settings import SettingsError
from bridge.store.objects import StorageUnavailable

__all__ = ["EX_TEMPFAIL", "CommandError", "build_parser", "main"]


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
    except (DependencyUnavailable, StorageUnavailable, redis.exceptions.RedisError) as exc:
        what = (
            "the object store"
            if isinstance(exc, StorageUnavailable)
            else "Redis"
            if isinstance(exc, RedisUnavailable | redis.exceptions.RedisError)
            else "a dependency"
        )
        print(f"mailio-bridge: {what} does not answer ({exc.__class__.__name__}); try again", file=sys.stderr)
        return EX_TEMPFAIL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailio-bridge", description="The Mailio bridge for Postal.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    mailbox.register(verbs)
    mail.register(verbs)
    handshake.register(verbs)
    admin.register(verbs)
    server.register(verbs)
    return parser


if __name__ == "__main__":
    sys.exit(main())
