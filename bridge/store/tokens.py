"""The owner API's bearer tokens: issued with a name, listed with their creation and last use, revoked one by one.

Only a token's SHA-256 is ever stored. Objects (the store is the system of record)::

    tokens/<sha256>.json                {"address", "created", "name"}: what ``authenticate`` reads, one GET
    token-names/<address>/<name>.json   {"digest"}: created only if absent, so a name is unique per mailbox
    token-uses/<sha256>.json            {"last_used"}: its last successful request, written at most once a
                                        minute per token and process

Tokens issued before tokens had names have no ``name`` and no ``token-names`` entry; they keep working
and are listed (and revoked) as ``unnamed-<first 12 hex digits of their hash>``, which says nothing of
the token itself. Listing and revoking such a token read every ``tokens/`` object: an operator's
command, not a request path.

Last use is a separate object so that recording it can never bring back a token revoked meanwhile, and
it is best effort: a store that fails to record it does not fail the request the token authenticated.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from typing import Any

from bridge.store.objects import ObjectStore, StorageUnavailable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
UNNAMED = "unnamed-"
#: How often one process records a token's last use at most (seconds): the listing's precision.
LAST_USE_PRECISION = 60.0


class TokenError(ValueError):
    """A token cannot be issued or revoked as asked (bad or taken name, no such token)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiTokens:
    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects
        self._recorded: dict[str, float] = {}  # digest -> monotonic time its last use was written here
        self._lock = threading.Lock()

    def issue(self, address: str, name: str | None = None) -> tuple[str, str]:
        """A new token for the mailbox at ``address`` and its name (given, or ``token-<n>``)."""
        # A fixed prefix makes tokens recognisable (secret scanners) and never starts with "-",
        # which a command line would take for an option.
        token = "mbx_" + secrets.token_urlsafe(32)
        hashed = digest(token)
        if name is not None:
            if not NAME.fullmatch(name) or name.startswith(UNNAMED):
                raise TokenError(f"a token name is 1-64 of A-Z a-z 0-9 . _ - and does not start with {UNNAMED}")
            if not self._objects.create(_name_key(address, name), _dump({"digest": hashed})):
                raise TokenError(f"{name} is taken: this mailbox has a token of that name already")
        else:
            taken = {self._name_of(key) for key in self._objects.list(f"token-names/{address}/")}
            number = 1
            while True:
                name = f"token-{number}"
                if name not in taken and self._objects.create(_name_key(address, name), _dump({"digest": hashed})):
                    break
                number += 1
        self._objects.put(_token_key(hashed), _dump({"address": address, "created": time.time(), "name": name}))
        return token, name

    def authenticate(self, token: str) -> str | None:
        """The address of the mailbox the token opens, or None. Reads only: see ``note_use``."""
        if not token or len(token) > 200:
            return None
        data = self._objects.get(_token_key(digest(token)))
        return str(json.loads(data)["address"]) if data else None

    def note_use(self, token: str) -> None:
        """Record that the token just served a request (the web layer calls it for successful ones only,
        so a refused or malformed request changes nothing in the store)."""
        self._note_use(digest(token))

    def listing(self, address: str) -> list[dict[str, Any]]:
        """The mailbox's tokens, oldest first: name, created, last_used (None: never, or not since upgrade)."""
        found = []
        for hashed, record in self._records(address):
            used = self._objects.get(_use_key(hashed))
            found.append(
                {
                    "name": record.get("name") or UNNAMED + hashed[:12],
                    "created": record.get("created"),
                    "last_used": json.loads(used)["last_used"] if used else None,
                }
            )
        return sorted(found, key=lambda t: (t["created"] or 0, t["name"]))

    def revoke(self, address: str, name: str) -> None:
        """Remove the token named ``name`` of this mailbox; from now on it gets 401 everywhere."""
        hashed = None
        if re.fullmatch(UNNAMED + "[0-9a-f]{12}", name):
            prefix = name.removeprefix(UNNAMED)
            hashed = next((h for h, r in self._records(address) if not r.get("name") and h.startswith(prefix)), None)
        elif NAME.fullmatch(name) and not name.startswith(UNNAMED):
            pointer = self._objects.get(_name_key(address, name))
            hashed = json.loads(pointer)["digest"] if pointer else None
        if hashed is None:
            raise TokenError(f"this mailbox has no token named {name}")
        self._objects.delete(_token_key(hashed))  # first: the token stops working even if the rest fails
        self._objects.delete(_use_key(hashed))
        if not name.startswith(UNNAMED):
            self._objects.delete(_name_key(address, name))

    def revoke_all(self, address: str) -> int:
        """Every token of the mailbox (for its removal); how many there were."""
        names = [t["name"] for t in self.listing(address)]
        for name in names:
            self.revoke(address, name)
        for key in self._objects.list(f"token-names/{address}/"):  # pointers left by an interrupted issue
            self._objects.delete(key)
        return len(names)

    def _records(self, address: str) -> list[tuple[str, dict[str, Any]]]:
        """Every token record of this mailbox (reads all ``tokens/``: see the module's docstring)."""
        found = []
        for key in self._objects.list("tokens/"):
            data = self._objects.get(key)
            record = json.loads(data) if data else None
            if record and record.get("address") == address:
                found.append((key.removeprefix("tokens/").removesuffix(".json"), record))
        return found

    def _note_use(self, hashed: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._recorded.get(hashed)
            if last is not None and now - last < LAST_USE_PRECISION:
                return
            self._recorded[hashed] = now
        try:
            self._objects.put(_use_key(hashed), _dump({"last_used": time.time()}))
        except StorageUnavailable:
            with self._lock:
                self._recorded.pop(hashed, None)

    @staticmethod
    def _name_of(key: str) -> str:
        return key.rsplit("/", 1)[1].removesuffix(".json")


def _token_key(hashed: str) -> str:
    return f"tokens/{hashed}.json"


def _use_key(hashed: str) -> str:
    return f"token-uses/{hashed}.json"


def _name_key(address: str, name: str) -> str:
    return f"token-names/{address}/{name}.json"


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
