"""A mailbox reaches only its own mail, and only with its own token used as a bearer token.

Every owner endpoint is tried with no token, an unknown token, near misses of a real token (a
prefix, extra characters, another case), other schemes, and another mailbox's token; the move
endpoint is tried on another mailbox's message, which must stay exactly as it was in the store
and in the index.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from bridge.mailio.handshakes import sign_handshake
from tests.conftest import DOMAIN, Owner, make_owner, run_worker
from tests.postal_sim import PostalSigner, raw_payload, ruby_json


def deliver(client: Any, signer: PostalSigner, postal_id: int, rcpt: str) -> None:
    message = f"From: Jane <jane@example.org>\r\nTo: {rcpt}\r\nSubject: m{postal_id}\r\n\r\nhello\r\n".encode()
    body = ruby_json(raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=message))
    response = client.post(
        "/postal/inbound", data=body, headers={**signer.sign_headers(body), "Content-Type": "application/json"}
    )
    assert response.status_code == 200


@pytest.fixture
def mail(client: Any, bridge: Any, owner: Owner, postal_signer: PostalSigner) -> dict[str, Any]:
    """Two mailboxes with one filed message each (both in ``other``)."""
    stranger = make_owner(bridge, f"sales@{DOMAIN}")
    deliver(client, postal_signer, 1, owner.mailbox.email)
    deliver(client, postal_signer, 2, stranger.mailbox.email)
    run_worker(bridge)
    [mine] = list(bridge.messages.records(owner.mailbox.address))
    [theirs] = list(bridge.messages.records(stranger.mailbox.address))
    return {"owner": owner, "stranger": stranger, "mine": mine["id"], "theirs": theirs["id"]}


def record_file(settings: Any, address: str, msg_id: str) -> Path:
    return Path(settings.storage_url.removeprefix("file://")) / "mail" / address / f"{msg_id}.json"


def listing(client: Any, who: Owner, folder: str) -> list[str]:
    response = client.get(f"/api/v1/messages?folder={folder}", headers=who.auth)
    assert response.status_code == 200
    return [r["id"] for r in response.get_json()["messages"]]


# --- moving another mailbox's message -------------------------------------------------------------


@pytest.mark.parametrize("folder", ["archive", "inbox", "trash", "other"])
def test_moving_another_mailboxs_message_is_404_and_changes_nothing(
    client: Any, bridge: Any, settings: Any, redis_url: str, mail: dict[str, Any], folder: str
) -> None:
    owner, stranger, theirs = mail["owner"], mail["stranger"], mail["theirs"]
    stored = record_file(settings, stranger.mailbox.address, theirs)
    before = stored.read_bytes()
    indexed = redis.Redis.from_url(redis_url).hget(f"bridge:rec:{stranger.mailbox.address}", theirs)
    assert indexed is not None  # the key layout this test reads is the index's

    response = client.post(f"/api/v1/messages/{theirs}/move", json={"folder": folder}, headers=owner.auth)
    assert response.status_code == 404
    assert theirs.encode() not in response.get_data() and stranger.mailbox.address.encode() not in response.get_data()

    assert stored.read_bytes() == before  # the system of record is untouched
    assert redis.Redis.from_url(redis_url).hget(f"bridge:rec:{stranger.mailbox.address}", theirs) == indexed
    assert listing(client, stranger, "other") == [theirs]
    for elsewhere in ("archive", "inbox", "trash"):
        assert listing(client, stranger, elsewhere) == []
        assert theirs not in listing(client, owner, elsewhere)
    # nothing was written under the mover's own mailbox for it either
    assert not record_file(settings, owner.mailbox.address, theirs).exists()
    assert listing(client, owner, "other") == [mail["mine"]]


def test_the_owner_can_move_their_own_message(client: Any, mail: dict[str, Any]) -> None:
    """The same request with the right mailbox works: the 404 above is isolation, not a broken endpoint."""
    owner, mine = mail["owner"], mail["mine"]
    response = client.post(f"/api/v1/messages/{mine}/move", json={"folder": "archive"}, headers=owner.auth)
    assert response.status_code == 200 and response.get_json()["folder"] == "archive"
    assert listing(client, owner, "archive") == [mine] and listing(client, owner, "other") == []


# --- every owner endpoint, every authorization boundary --------------------------------------------

# (endpoint, method, path template, JSON body). {mine} is the owner's message id.
ROUTES = [
    ("api.list_messages", "GET", "/api/v1/messages?folder=other", None),
    ("api.get_message", "GET", "/api/v1/messages/{mine}", None),
    ("api.move_message", "POST", "/api/v1/messages/{mine}/move", {"folder": "archive"}),
    ("api.put_handshake", "PUT", "/api/v1/handshakes", "handshake"),
    ("api.list_handshakes", "GET", "/api/v1/handshakes", None),
    ("api.create_handshake_offer", "POST", "/api/v1/handshake-offers", None),
    ("send.send_message", "POST", "/api/v1/messages", {"to": ["kim@example.org"], "subject": "s", "text": "t"}),
    ("send.resend_message", "POST", "/api/v1/messages/{mine}/resend", {"address": "kim@example.org"}),
    ("recipients.resolve_recipients", "POST", "/api/v1/recipients/resolve", {"addresses": ["kim@example.org"]}),
]
ROUTE_IDS = [route[0] for route in ROUTES]


def test_the_table_covers_every_owner_endpoint(app: Flask) -> None:
    endpoints = {
        rule.endpoint for rule in app.url_map.iter_rules() if rule.endpoint.startswith(("api.", "send.", "recipients."))
    }
    assert endpoints == set(ROUTE_IDS), "a new owner endpoint needs its row in ROUTES"


def call(client: Any, route: tuple[str, str, str, Any], mail: dict[str, Any], authorization: str | None) -> Any:
    _, method, template, body = route
    if body == "handshake":
        body = sign_handshake(
            ed25519_private=mail["owner"].keys.ed25519_private,
            status="accepted",
            sender_email_hash=base64.b64encode(b"\x01" * 32).decode(),
            origin_domain=DOMAIN,
        )
    headers = {"Authorization": authorization} if authorization is not None else {}
    path = template.format(mine=mail["mine"])
    if body is None:
        return client.open(path, method=method, headers=headers)
    return client.open(path, method=method, headers=headers, json=body)


def assert_refused(response: Any) -> None:
    assert response.status_code == 401, response.get_data()[:200]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json() == {"error": "missing or unknown bearer token"}


def near_misses(token: str) -> list[str]:
    return [
        token[:-1],  # a prefix one character short
        token[:20],
        token[:4],  # only the "mbx_" prefix every token shares
        token + "x",  # a real token with characters appended
        token + token,
        token.upper(),
        token.swapcase(),
        token[:-1] + ("A" if token[-1] != "A" else "B"),  # same length, last character differs
    ]


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_no_token_or_an_unknown_token_is_401_on_every_endpoint(
    client: Any, settings: Any, mail: dict[str, Any], route: tuple[str, str, str, Any]
) -> None:
    root = Path(settings.storage_url.removeprefix("file://"))
    objects = sorted(root.rglob("*"))
    for authorization in (None, "", "Bearer", "Bearer ", "Bearer nope", "Bearer mbx_" + "A" * 43):
        assert_refused(call(client, route, mail, authorization))
    assert sorted(root.rglob("*")) == objects  # nothing stored by a refused request


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_a_near_miss_of_a_real_token_is_401_on_every_endpoint(
    client: Any, mail: dict[str, Any], route: tuple[str, str, str, Any]
) -> None:
    token = mail["owner"].token
    for candidate in near_misses(token):
        assert_refused(call(client, route, mail, f"Bearer {candidate}"))


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_only_the_bearer_scheme_authenticates_on_every_endpoint(
    client: Any, mail: dict[str, Any], route: tuple[str, str, str, Any]
) -> None:
    """RFC 7235: the scheme name is case-insensitive, so ``bearer`` and ``BEARER`` are the Bearer scheme and
    are accepted (api.authenticated_mailbox compares it lower-cased); any other scheme, or a token without
    a scheme, is refused even when it carries the real token."""
    token = mail["owner"].token
    wrong = [
        f"Basic {base64.b64encode(f'admin:{token}'.encode()).decode()}",
        f"Basic {base64.b64encode(f'{token}:'.encode()).decode()}",
        f"Token {token}",
        f"Bearer: {token}",
        f"Bearer-{token}",
        f"Bearer\t{token}",  # the scheme ends at a space (RFC 7235: 1*SP), not at a tab
        f"Digest {token}",
        token,
        f"{token} Bearer",
        f"Bearer {token} {token}",
    ]
    for authorization in wrong:
        assert_refused(call(client, route, mail, authorization))
    for authorization in (f"bearer {token}", f"BEARER {token}", f"Bearer {token} ", f"Bearer  {token}"):
        response = call(client, route, mail, authorization)
        assert response.status_code in AS_OWNER.get(route[0], {200}), (authorization, response.get_data()[:200])


# The owner's own token: what each route answers (resending an inbound message: not one it sent).
AS_OWNER = {
    "api.create_handshake_offer": {201},
    "api.put_handshake": {200, 201},  # created, then unchanged
    "send.send_message": {202},
    "send.resend_message": {404},
}

# Another mailbox's valid token: authenticated, but the owner's data does not exist for it.
AS_STRANGER = {
    "api.list_messages": 200,  # its own (empty of the owner's mail) listing
    "api.get_message": 404,
    "api.move_message": 404,
    "api.put_handshake": 403,  # signed by the owner's key, not the stranger's
    "api.list_handshakes": 200,
    "api.create_handshake_offer": 201,  # an offer for its own mailbox
    "send.send_message": 202,  # its own message, from its own address
    "send.resend_message": 404,
    "recipients.resolve_recipients": 200,  # its own look-up: routes, nothing of the owner's
}


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_another_mailboxs_token_never_reaches_the_owners_data(
    client: Any, bridge: Any, settings: Any, mail: dict[str, Any], route: tuple[str, str, str, Any]
) -> None:
    owner, stranger, mine = mail["owner"], mail["stranger"], mail["mine"]
    # the owner has a handshake stored, which the stranger must not see either
    put = call(client, ROUTES[3], mail, f"Bearer {owner.token}")
    assert put.status_code == 201
    owner_files = sorted(
        (p, p.read_bytes())
        for p in Path(settings.storage_url.removeprefix("file://")).rglob("*")
        if p.is_file() and owner.mailbox.address in str(p)
    )

    response = call(client, route, mail, f"Bearer {stranger.token}")
    assert response.status_code == AS_STRANGER[route[0]], response.get_data()[:300]
    text = response.get_data(as_text=True)
    assert mine not in text and owner.mailbox.address not in text and owner.mailbox.email not in text
    if route[0] == "api.list_messages":
        assert [r["id"] for r in response.get_json()["messages"]] == [mail["theirs"]]
    if route[0] == "api.list_handshakes":
        assert response.get_json() == {"handshakes": []}
    after = sorted(
        (p, p.read_bytes())
        for p in Path(settings.storage_url.removeprefix("file://")).rglob("*")
        if p.is_file() and owner.mailbox.address in str(p)
    )
    assert after == owner_files
    assert bridge.messages.get_record(owner.mailbox.address, mine)["folder"] == "other"
    assert json.dumps(bridge.handshakes.all(owner.mailbox.address)[0].to_document())  # still there
