"""Removing a mailbox: ``mailbox remove EMAIL [--purge]``.

Without ``--purge`` a mailbox that holds mail (``mail/<address>/``) is refused: removing it would leave
sealed mail no one can list. With it, everything of the owner goes: every object whose key has the
mailbox's address as a segment (mail, sent-mail records, the encrypted spool, handshakes, contacts, and
whatever later kinds follow that layout), its API tokens, its Redis index entries, then its addresses and
its record, last, so that running the command again after an interruption finds the mailbox and finishes.

Finding the owner's objects reads the listing of the whole store: an operator's rare act, not a request
path. Remove the Postal route for the address first: mail that arrives while this runs (web processes
cache a mailbox for 30 s) can be left behind, and running the command again deletes it.
"""

from __future__ import annotations

from typing import Any

import redis

from bridge.store.index import PREFIX, RECHECK, RECHECK_TRIES, UNFILED
from bridge.store.mailboxes import Mailbox, MailboxDirectory, MailboxError
from bridge.store.objects import ObjectStore
from bridge.store.outbound_records import WAITING


def remove_mailbox(
    objects: ObjectStore, connection: redis.Redis, directory: MailboxDirectory, mailbox: Mailbox, *, purge: bool
) -> dict[str, Any]:
    """Remove ``mailbox``; what was deleted, as counts (no addresses, no contents)."""
    address = mailbox.address
    if not purge and next(iter(objects.list(f"mail/{address}/")), None) is not None:
        raise MailboxError(f"{mailbox.email} holds mail; --purge deletes it with the mailbox")
    tokens = directory.tokens.revoke_all(address)  # first: the owner API stops answering at once
    record = f"mailboxes/{address}.json"
    deleted = 0
    for key in list(objects.list("")):
        segments = key.split("/")
        if key != record and (address in segments or f"{address}.json" in segments):
            objects.delete(key)
            deleted += 1
    redis_keys = _forget_in_redis(connection, address)
    directory.remove(mailbox)
    return {"email": mailbox.email, "address": address, "objects": deleted, "tokens": tokens, "redis_keys": redis_keys}


def _forget_in_redis(connection: redis.Redis, address: str) -> int:
    """Drop the mailbox's index keys and its entries in the shared queues (all rebuildable from the store)."""
    keys = list(connection.scan_iter(match=f"{PREFIX}*{address}*", count=1000))
    if keys:
        connection.delete(*keys)
    member = f"{address}/*"
    for queue in (UNFILED, RECHECK, WAITING):
        members = [m for m, _ in connection.zscan_iter(queue, match=member)]
        if members:
            connection.zrem(queue, *members)
    tries = [field for field, _ in connection.hscan_iter(RECHECK_TRIES, match=member)]
    if tries:
        connection.hdel(RECHECK_TRIES, *tries)
    return len(keys)
