"""The owner API answers every malformed request with a deliberate 4xx, never a 5xx.

A 503 tells a client "retry later": for input that can never succeed that is a lie, and it hides
the bug behind the dependency-down alarm. Each case here goes through the real app and Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.settings import Settings
from tests.conftest import Owner

MESSAGE_ID = "a" * 32  # well formed, absent
JSON_ENDPOINTS = [
    ("post", f"/api/v1/messages/{MESSAGE_ID}/move"),
    ("put", "/api/v1/handshakes"),
]
DEEP = 30_000  # fits in the API's 64 KB body limit many times over
MALFORMED_BODIES = [
    pytest.param(b"[" * DEEP, id="open-brackets"),
    pytest.param(b"[" * DEEP + b"]" * DEEP, id="deep-valid-array"),
    pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, id="deep-valid-object"),
    pytest.param(b'{"folder": "inbox"', id="truncated"),
    pytest.param(b'{"folder": "\xff\xfe"}', id="not-utf8"),
    pytest.param(b"1" * 5000, id="huge-integer"),
    pytest.param(b" ", id="blank"),
]


def stored_files(settings: Settings) -> set[str]:
    root = Path(settings.storage_url.removeprefix("file://"))
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS, ids=["move", "handshake"])
@pytest.mark.parametrize("body", MALFORMED_BODIES)
def test_malformed_json_is_400_and_changes_nothing(
    client: Any, owner: Owner, settings: Settings, method: str, path: str, body: bytes
) -> None:
    before = stored_files(settings)
    response = getattr(client, method)(path, data=body, headers={**owner.auth, "Content-Type": "application/json"})
    assert response.status_code == 400, response.get_data(as_text=True)
    assert set(response.get_json()) == {"error"}
    assert stored_files(settings) == before


@pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS, ids=["move", "handshake"])
def test_a_body_that_is_not_json_is_400(client: Any, owner: Owner, method: str, path: str) -> None:
    response = getattr(client, method)(
        path, data=b'{"folder": "inbox"}', headers={**owner.auth, "Content-Type": "text/plain"}
    )
    assert response.status_code == 400


BAD_REQUESTS = [
    ("get", "/api/v1/messages?limit=abc", 400),
    ("get", "/api/v1/messages?limit=" + "9" * 5000, 400),
    ("get", "/api/v1/messages?limit=0", 400),
    ("get", "/api/v1/messages?before=nan", 400),
    ("get", "/api/v1/messages?before=inf", 400),
    ("get", "/api/v1/messages?before=1e999", 400),
    ("get", "/api/v1/messages?before=" + "9" * 5000, 400),  # overflows to inf
    ("get", "/api/v1/messages?folder=../inbox", 400),
    ("get", "/api/v1/messages?folder=%ff", 400),
    ("get", "/api/v1/messages/..%2f..%2fetc", 404),
    ("get", "/api/v1/messages/" + "A" * 32, 404),
    ("get", "/api/v1/messages/" + "a" * 5000, 404),
    ("post", "/api/v1/messages/" + "A" * 32 + "/move", 411),  # no body, so no length: refused unread
    ("put", "/api/v1/handshakes", 411),
]


@pytest.mark.parametrize(("method", "path", "status"), BAD_REQUESTS)
def test_bad_queries_and_ids_are_4xx(client: Any, owner: Owner, method: str, path: str, status: int) -> None:
    response = getattr(client, method)(path, headers=owner.auth)
    assert response.status_code == status, response.get_data(as_text=True)


def test_a_move_with_a_good_body_but_an_odd_id_is_404(client: Any, owner: Owner) -> None:
    for msg_id in ("A" * 32, "nope", "a" * 33):
        response = client.post(f"/api/v1/messages/{msg_id}/move", json={"folder": "inbox"}, headers=owner.auth)
        assert response.status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer " + "x" * 10_000,
        "Bearer \x7f\x01",
        "Bearer mbx_é",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer",
        "",
    ],
)
def test_odd_authorization_headers_are_401(client: Any, owner: Owner, authorization: str) -> None:
    for method, path in [
        ("get", "/api/v1/messages"),
        ("put", "/api/v1/handshakes"),
        ("post", "/api/v1/handshake-offers"),
    ]:
        response = getattr(client, method)(path, headers={"Authorization": authorization}, json={})
        assert response.status_code == 401
