"""Mailboxes: who we deliver to, their public keys, aliases and API tokens.

The object store is the system of record (``mailboxes/<address>.json``); lookups by e-mail go
through ``addresses/<sha256 of the normalized e-mail>.json`` so that no e-mail address appears
in a key, and API tokens are stored only as SHA-256 hashes (``bridge.store.tokens``). A small
in-process cache keeps the inbound hot path from reading the store on every request.

This module never holds a private key: the owner keeps theirs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bridge.mailio.identity import mailio_address
from bridge.sealing import Recipient
from bridge.store.objects import ObjectStore
from bridge.store.tokens import ApiTokens

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.][^@\s]*$")
_CACHE_SECONDS = 30.0
_NEGATIVE_CACHE_SECONDS = 5.0


class MailboxError(ValueError):
    """A mailbox cannot be created as asked (bad e-mail, taken address...)."""


def normalize_email(email: str) -> str:
    """Lower-case and drop a ``+tag``: ``Jane+news@Example.COM`` -> ``jane@example.com``.

    Postal keeps the ``+tag`` in ``rcpt_to`` and matches routes case-insensitively, so the
    bridge resolves mailboxes the same way.
    """
    email = email.strip().lower()
    local, sep, domain = email.rpartition("@")
    if not sep or not local or not domain:
        raise MailboxError("not an e-mail address")
    local = local.split("+", 1)[0]
    if not local:
        raise MailboxError("not an e-mail address")
    return f"{local}@{domain}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Mailbox:
    email: str
    address: str
    ed25519_public: str  # standard base64, 32 bytes
    x25519_public: str  # standard base64, 32 bytes
    aliases: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)

    def recipient(self, domain: str) -> Recipient:
        """The JWE recipient that seals mail to this mailbox's owner."""
        return Recipient(kid=f"did:web:{domain}#{self.address}", x25519_public=base64.b64decode(self.x25519_public))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mailbox:
        return cls(
            email=data["email"],
            address=data["address"],
            ed25519_public=data["ed25519_public"],
            x25519_public=data["x25519_public"],
            aliases=tuple(data.get("aliases", ())),
            created=float(data.get("created", 0.0)),
        )


class MailboxDirectory:
    """Create, find and authenticate mailboxes; backed by the object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects
        self.tokens = ApiTokens(objects)
        self._cache: dict[str, tuple[float, Mailbox | None]] = {}
        self._lock = threading.Lock()

    # --- creation -------------------------------------------------------------------------

    def add(self, email: str, ed25519_public: bytes, x25519_public: bytes) -> Mailbox:
        if not _EMAIL.match(email.strip()):
            raise MailboxError("not an e-mail address")
        if len(ed25519_public) != 32 or len(x25519_public) != 32:
            raise MailboxError("public keys must be 32 bytes each")
        normalized = normalize_email(email)
        mailbox = Mailbox(
            email=normalized,
            address=mailio_address(ed25519_public),
            ed25519_public=base64.b64encode(ed25519_public).decode(),
            x25519_public=base64.b64encode(x25519_public).decode(),
        )
        if not self._objects.create(self._address_key(normalized), self._pointer(mailbox.address)):
            raise MailboxError(f"{normalized} already has a mailbox")
        if not self._objects.create(self._mailbox_key(mailbox.address), _dump(mailbox.to_json())):
            self._objects.delete(self._address_key(normalized))
            raise MailboxError("a mailbox with this signing key exists already")
        return mailbox

    def add_alias(self, email: str, alias: str) -> Mailbox:
        mailbox = self.resolve(email, cached=False)
        if mailbox is None:
            raise MailboxError("no such mailbox")
        normalized = normalize_email(alias)
        if not self._objects.create(self._address_key(normalized), self._pointer(mailbox.address)):
            raise MailboxError(f"{normalized} is taken")
        updated = Mailbox(**{**mailbox.to_json(), "aliases": (*mailbox.aliases, normalized)})
        self._objects.put(self._mailbox_key(mailbox.address), _dump(updated.to_json()))
        return updated

    # --- lookups --------------------------------------------------------------------------

    def resolve(self, email: str, *, cached: bool = True) -> Mailbox | None:
        """The mailbox an envelope recipient belongs to (case-insensitive, +tag stripped, aliases)."""
        try:
            normalized = normalize_email(email)
        except MailboxError:
            return None
        now = time.monotonic()
        if cached:
            with self._lock:
                hit = self._cache.get(normalized)
            if hit is not None and hit[0] > now:
                return hit[1]
        pointer = self._objects.get(self._address_key(normalized))
        mailbox = self.get(json.loads(pointer)["address"]) if pointer else None
        ttl = _CACHE_SECONDS if mailbox else _NEGATIVE_CACHE_SECONDS
        with self._lock:
            self._cache[normalized] = (now + ttl, mailbox)
        return mailbox

    def get(self, address: str) -> Mailbox | None:
        if not re.fullmatch(r"0x[0-9a-f]{40}", address):
            return None
        data = self._objects.get(self._mailbox_key(address))
        return Mailbox.from_json(json.loads(data)) if data else None

    def all(self) -> list[Mailbox]:
        mailboxes = []
        for key in self._objects.list("mailboxes/"):
            data = self._objects.get(key)
            if data:
                mailboxes.append(Mailbox.from_json(json.loads(data)))
        return sorted(mailboxes, key=lambda m: m.email)

    # --- API tokens (bridge.store.tokens) -------------------------------------------------------

    def issue_token(self, mailbox: Mailbox, name: str | None = None) -> str:
        """A new bearer token for the owner's API; only its hash is stored."""
        return self.tokens.issue(mailbox.address, name)[0]

    def authenticate(self, token: str) -> Mailbox | None:
        """The mailbox a bearer token opens: None for an unknown or revoked token, or a removed mailbox."""
        address = self.tokens.authenticate(token)
        return self.get(address) if address else None

    def note_token_use(self, token: str) -> None:
        """The token served a request successfully: its ``last_used`` (best effort, at most once a minute)."""
        self.tokens.note_use(token)

    # --- removal --------------------------------------------------------------------------

    def remove_alias(self, email: str, alias: str) -> Mailbox:
        """Stop delivering ``alias`` to the mailbox; the address is free again afterwards."""
        mailbox = self.resolve(email, cached=False)
        if mailbox is None:
            raise MailboxError("no such mailbox")
        normalized = normalize_email(alias)
        if normalized not in mailbox.aliases:
            raise MailboxError(f"{normalized} is not an alias of {mailbox.email}")
        updated = Mailbox(**{**mailbox.to_json(), "aliases": tuple(a for a in mailbox.aliases if a != normalized)})
        self._objects.put(self._mailbox_key(mailbox.address), _dump(updated.to_json()))
        self._objects.delete(self._address_key(normalized))  # after: a crash leaves it taken, never half-owned
        self._forget(normalized)
        return updated

    def remove(self, mailbox: Mailbox) -> None:
        """Forget the mailbox itself: its tokens, its addresses, then its record (the owner's mail is
        ``bridge.store.removal``'s business). Each step can be run again after an interruption."""
        self.tokens.revoke_all(mailbox.address)
        for email in (*mailbox.aliases, mailbox.email):
            self._objects.delete(self._address_key(email))
            self._forget(email)
        self._objects.delete(self._mailbox_key(mailbox.address))

    def _forget(self, normalized: str) -> None:
        with self._lock:
            self._cache.pop(normalized, None)

    # --- keys -----------------------------------------------------------------------------

    @staticmethod
    def _mailbox_key(address: str) -> str:
        return f"mailboxes/{address}.json"

    @staticmethod
    def _address_key(normalized_email: str) -> str:
        return f"addresses/{_digest(normalized_email)}.json"

    @staticmethod
    def _pointer(address: str) -> bytes:
        return _dump({"address": address})


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
