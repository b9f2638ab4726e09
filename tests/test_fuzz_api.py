"""Property-based tests of the owner API (``/api/v1``): random methods, paths, queries, headers, auth
schemes and bodies against every endpoint in bridge/web/api.py, with two mailboxes holding mail.

Properties of every answer: never 500 or 503, never a traceback; a refused request (>= 400) changes
no object in the store; a request on an owner route without one of the two real tokens, used exactly
as ``Bearer <token>``, is 401 (with ``WWW-Authenticate``) whatever else it carries; a request made
as one mailbox never changes the other mailbox's objects and never shows the other's address or
message ids; the app keeps answering ``/healthz``.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import HTTPException

from bridge.mailio.handshakes import sign_handshake
from tests.conftest import DOMAIN, Owner, make_owner, run_worker
from tests.fuzzing import Blob, assert_deliberate, cases, header_safe, snapshot_diff, store_root, store_snapshot
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.test_fuzz_inbound import random_json, random_text

pytestmark = pytest.mark.fuzz

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
FOLDER_VALUES = ["inbox", "other", "spam", "archive", "INBOX", "", "nope", "inbox\x00", "../other", "handshake"]
NUMBER_VALUES = ["1", "0", "-1", "200", "201", "50", "1e3", "nan", "inf", "-inf", "1e309", "0x10", " 5", "9" * 40, ""]


@pytest.fixture(scope="module")
def postal_signer() -> PostalSigner:
    return PostalSigner(1024)


@dataclass
class World:
    app: Flask
    client: Any
    owner: Owner
    other: Owner
    ids: dict[str, list[str]]  # mailbox address -> its message ids
    handshakes: list[dict[str, Any]]  # documents the owner signed
    root: Any
    statuses: dict[int, int] = field(default_factory=dict)

    def token_of(self, authorization: str | None) -> Owner | None:
        """Whose mailbox a request authenticates as, by the scheme the API documents: ``Bearer <token>``."""
        for who in (self.owner, self.other):
            if authorization is not None and authorization.strip().partition(" ")[2].strip() == who.token:
                scheme = authorization.strip().partition(" ")[0]
                if scheme.lower() == "bearer":
                    return who
        return None


def _deliver(client: Any, signer: PostalSigner, postal_id: int, rcpt: str) -> None:
    message = f"From: Jane <jane@example.org>\r\nTo: {rcpt}\r\nSubject: m{postal_id}\r\n\r\nhello\r\n".encode()
    body = ruby_json(raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=message))
    headers = {**signer.sign_headers(body), "Content-Type": "application/json"}
    assert client.post("/postal/inbound", data=body, headers=headers).status_code == 200


@pytest.fixture
def world(
    app: Flask, client: Any, bridge: Any, owner: Owner, postal_signer: PostalSigner, settings: Any
) -> Iterator[World]:
    other = make_owner(bridge, f"sales@{DOMAIN}")
    for postal_id, rcpt in ((1, owner.mailbox.email), (2, owner.mailbox.email), (3, other.mailbox.email)):
        _deliver(client, postal_signer, postal_id, rcpt)
    run_worker(bridge)
    ids = {
        who.mailbox.address: [r["id"] for r in bridge.messages.records(who.mailbox.address)] for who in (owner, other)
    }
    assert len(ids[owner.mailbox.address]) == 2 and len(ids[other.mailbox.address]) == 1
    handshakes = [
        sign_handshake(
            ed25519_private=owner.keys.ed25519_private,
            status=status,
            sender_email_hash=base64.b64encode(bytes([n]) * 32).decode(),
            origin_domain=DOMAIN,
        )
        for n, status in enumerate(["accepted", "revoked"])
    ]
    world = World(app, client, owner, other, ids, handshakes, store_root(settings.storage_url))
    yield world
    health = client.get("/healthz")
    assert health.status_code == 200, health.get_data()[:200]
    # The owner's mail is still listed and readable after everything the fuzzer sent.
    for folder in ("other", "inbox", "archive", "trash", "spam"):
        assert client.get(f"/api/v1/messages?folder={folder}", headers=owner.auth).status_code == 200


# --- requests ------------------------------------------------------------------------------------


def _message_id(world: World, rnd: random.Random) -> str:
    own = world.ids[world.owner.mailbox.address]
    theirs = world.ids[world.other.mailbox.address]
    return rnd.choice(
        [
            rnd.choice(own),
            rnd.choice(theirs),
            "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(32)),
            rnd.choice(own).upper(),
            rnd.choice(own)[:-1],
            rnd.choice(own) + "a",
            "..",
            "%2e%2e",
            quote(f"../../{world.other.mailbox.address}/{rnd.choice(theirs)}", safe=""),
            quote(random_text(rnd, 40).encode("utf-8", "replace"), safe=""),
            "x" * 5000,
        ]
    )


def _path(world: World, rnd: random.Random) -> str:
    msg_id = _message_id(world, rnd)
    return rnd.choice(
        [
            "/api/v1/messages",
            f"/api/v1/messages/{msg_id}",
            f"/api/v1/messages/{msg_id}/move",
            f"/api/v1/messages/{msg_id}/move/",
            "/api/v1/handshakes",
            "/api/v1/handshake-offers",
            "/api/v1/messages/",
            "/API/V1/messages",
            "/api/v1//messages",
            "/api/v1/" + quote(random_text(rnd, 30).encode("utf-8", "replace"), safe="/"),
            "/api/v2/messages",
        ]
    )


def _utf8(text: str) -> str:
    """A URL can carry any bytes, but not a lone surrogate: make the text encodable."""
    return text.encode("utf-8", "replace").decode()


def _query(rnd: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for key in ("folder", "limit", "before"):
        for _ in range(rnd.choice([0, 0, 1, 1, 2]) if rnd.random() < 0.5 else 0):  # absent, once or repeated
            pool = FOLDER_VALUES if key == "folder" else NUMBER_VALUES
            pairs.append((key, rnd.choice(pool) if rnd.random() < 0.8 else _utf8(random_text(rnd, 20))))
    if rnd.random() < 0.2:
        pairs.append((_utf8(random_text(rnd, 8)), _utf8(random_text(rnd, 20))))
    rnd.shuffle(pairs)
    return pairs


def _authorization(world: World, rnd: random.Random) -> str | None:
    token = rnd.choice([world.owner.token, world.other.token])
    return rnd.choice(
        [
            None,
            f"Bearer {world.owner.token}",
            f"Bearer {world.other.token}",
            f"Bearer {token[:-1]}",
            f"Bearer {token[: rnd.randrange(len(token))]}",
            f"Bearer {token}{rnd.choice(['x', '=', ' x', '%00', token])}",
            f"Bearer {token.upper()}",
            f"bearer {token}",
            f"BEARER {token}",
            f"Basic {base64.b64encode(f'admin:{token}'.encode()).decode()}",
            f"Token {token}",
            f"Bearer\t{token}",
            f"Bearer  {token}",
            f"{token}",
            "Bearer ",
            "Bearer",
            "Bearer mbx_" + "A" * 43,
            "Bearer " + "x" * 5000,
            header_safe(random_text(rnd, 80)),
        ]
    )


def _body(world: World, rnd: random.Random) -> tuple[bytes | None, str | None]:
    kind = rnd.randrange(9)
    if kind == 0:
        return None, None
    if kind == 8:  # nesting deeper than any parser's recursion limit
        depth = rnd.choice([100, 1000, 30000])
        return rnd.choice([b"[" * depth, b'{"folder":' * depth, b"[" * depth + b"]" * depth]), "application/json"
    if kind == 1:
        return json.dumps({"folder": rnd.choice(FOLDER_VALUES)}).encode(), "application/json"
    if kind == 2:
        return json.dumps(random_json(rnd)).encode(), rnd.choice(["application/json", "text/plain", None])
    if kind == 3:
        return rnd.randbytes(rnd.randrange(300)), rnd.choice(["application/json", "application/octet-stream", None])
    if kind == 4:
        return b"x" * (64 * 1024 + 1), "application/json"
    # a handshake the owner signed: as signed, or with one member replaced
    document = json.loads(json.dumps(rnd.choice(world.handshakes)))
    if kind != 5:
        target = document if rnd.random() < 0.5 else document["content"]
        target[rnd.choice([*sorted(target), random_text(rnd, 8)])] = random_json(rnd)
    return json.dumps(document).encode(), "application/json"


# The API's routes with their methods: half the requests take one of them with a real token, so that
# most of the generated input reaches the views rather than stopping at authentication or routing.
ROUTES = [
    ("GET", "/api/v1/messages"),
    ("GET", "/api/v1/messages/{id}"),
    ("POST", "/api/v1/messages/{id}/move"),
    ("PUT", "/api/v1/handshakes"),
    ("GET", "/api/v1/handshakes"),
    ("POST", "/api/v1/handshake-offers"),
]


@st.composite
def api_requests(draw: st.DrawFn, world: World) -> dict[str, Any]:
    rnd = random.Random(draw(st.integers(0, 2**32)))
    body, content_type = _body(world, rnd)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        method, template = draw(st.sampled_from(ROUTES))
        path = template.format(id=_message_id(world, rnd))
        who = rnd.choice([world.owner, world.owner, world.other])
        authorization: str | None = f"{rnd.choice(['Bearer', 'Bearer', 'bearer'])} {who.token}"
    else:
        method, path = draw(st.sampled_from(METHODS)), _path(world, rnd)
        authorization = _authorization(world, rnd)
    if authorization is not None:
        headers["Authorization"] = authorization
    if content_type is not None:
        headers["Content-Type"] = content_type
    if rnd.random() < 0.1:
        headers[rnd.choice(["X-Forwarded-For", "Cookie", "Accept", "X-Mailbox", "Origin"])] = header_safe(
            random_text(rnd, 40)
        )
    return {
        "method": method,
        "path": path,
        "query": _query(rnd),
        "headers": headers,
        "body": Blob(body) if body is not None else None,
    }


# --- the property --------------------------------------------------------------------------------


def _owner_route(app: Flask, path: str, method: str) -> bool:
    """Whether the request reaches one of the API's views (so authentication must answer it)."""
    try:
        endpoint, _ = app.url_map.bind("localhost").match(path, method=method)
    except HTTPException:  # no route, wrong method, or a redirect to the canonical path
        return False
    return str(endpoint).startswith("api.")


def send(world: World, request: dict[str, Any]) -> None:
    before = store_snapshot(world.root)
    body = request["body"]
    response = world.client.open(
        request["path"],
        method=request["method"],
        query_string=request["query"],
        headers=request["headers"],
        input_stream=io.BytesIO(body) if body is not None else None,
    )
    data = response.get_data()
    status = response.status_code
    world.statuses[status] = world.statuses.get(status, 0) + 1
    assert_deliberate(status, data)
    changed = snapshot_diff(before, store_snapshot(world.root))
    if status >= 400:
        assert changed == [], f"{status} {data[:200]!r} but the store changed: {changed}"

    who = world.token_of(request["headers"].get("Authorization"))
    routed = _owner_route(world.app, response.request.path, request["method"])  # the path as the app decoded it
    if who is None and request["method"] != "OPTIONS" and routed:
        assert status == 401, f"no valid bearer token, yet {status}: {data[:200]!r}"
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    for mailbox in (world.owner, world.other):
        if mailbox is who:
            continue
        address = mailbox.mailbox.address
        # Nobody but the mailbox itself changes its objects or sees its address or message ids.
        assert not [path for path in changed if f"/{address}/" in path], (status, changed)
        assert address.encode() not in data, f"{status}: another mailbox's address in {data[:200]!r}"
        for msg_id in world.ids[address]:
            assert msg_id.encode() not in data, f"{status}: another mailbox's message id in {data[:200]!r}"


def test_the_owner_api_answers_every_request_deliberately(world: World) -> None:
    @settings(max_examples=cases(4500))
    @given(request=api_requests(world))
    def check(request: dict[str, Any]) -> None:
        send(world, request)

    check()
    assert sum(world.statuses.values()) >= cases(4500) * 9 // 10  # the cases really ran
    # The generator must get past authentication too, not only be refused at the door.
    assert {200, 400, 401, 404, 405}.issubset(world.statuses), world.statuses
