"""Operations on the server: ``postal-keys``, ``postal-setup``, ``rebuild-index``, ``rescreen``, ``discover``,
``worker``, ``run``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bridge.commands import EX_TEMPFAIL, CommandError, open_bridge


def register(verbs: Any) -> None:
    verbs.add_parser(
        "postal-keys", help="list the Postal signing keys the bridge trusts, with their KIDs (compare with Postal's)"
    ).set_defaults(func=cmd_postal_keys)
    verbs.add_parser(
        "postal-setup", help="what to set up in Postal and DNS for this deployment: URLs, settings, KIDs, records"
    ).set_defaults(func=cmd_postal_setup)
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
    worker = verbs.add_parser("worker", help="run the RQ worker for every bridge queue, with its scheduler")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)
    verbs.add_parser("run", help="embedded mode: Redis (if needed), web and worker; Ctrl-C stops all").set_defaults(
        func=cmd_run
    )


def cmd_postal_keys(args: argparse.Namespace) -> int:
    for key in open_bridge().postal_keys.describe():
        print(json.dumps(key))
    return 0


def cmd_postal_setup(args: argparse.Namespace) -> int:
    from bridge.postal_setup import gather, render

    bridge = open_bridge()
    print(render(gather(bridge.settings, bridge.postal_keys.describe)), end="")
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from bridge.maintenance import rebuild_index

    counts = rebuild_index(open_bridge())
    print(json.dumps(counts))
    return 0


def cmd_rescreen(args: argparse.Namespace) -> int:
    from bridge import context
    from bridge.jobs.inbound import rescreen_mailbox

    bridge = open_bridge()
    mailbox = bridge.mailboxes.resolve(args.email, cached=False)
    if mailbox is None:
        raise CommandError("no such mailbox")
    context.use(bridge)
    print(json.dumps({"email": mailbox.email, "moved": rescreen_mailbox(mailbox.address)}))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from bridge.mailio.discovery import InvalidDomain

    try:
        route = open_bridge().discovery.discover(args.domain, fresh=args.fresh)
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
