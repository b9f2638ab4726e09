"""Hash deliveries that try to make the rebuild expensive: many parts, or big ones.

The Hash format makes the bridge rebuild MIME, so its cost is ours: the number of parts is bounded
(bridge.postal.rebuild.MAX_ATTACHMENTS, 413 beyond it, before anything is decoded), the rebuild is
linear, and the size limit applies to what Postal sent (decoded attachments and bodies), never to the
~4/3 larger base64 the bridge writes. Every request goes through the real endpoint, signed.
"""

from __future__ import annotations

import email
import email.policy
import random
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import create_app
from bridge.postal.payloads import MAX_ATTACHMENTS
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner
from tests.postal_sim import PostalSigner, encode64, form_encode, hash_payload, ruby_json
from tests.test_inbound import MESSAGE, read, signed_post

# Generous for a busy 2-core machine: before the fix 10,000 parts took 6.8 s and 50,000 took 30 s.
FAST_SECONDS = 3.0


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def store_root(settings: Settings) -> Path:
    return Path(settings.storage_url.removeprefix("file://"))


def bomb(count: int, postal_id: int = 7001) -> dict[str, Any]:
    payload = hash_payload(
        postal_id=postal_id,
        token=f"bomb{count}",
        rcpt_to=f"support@{DOMAIN}",
        mail_from="x@example.org",
        message=MESSAGE,
    )
    payload["attachments"] = [
        {"filename": f"{i}.txt", "content_type": "text/plain", "size": 1, "data": "YQ==\n"} for i in range(count)
    ]
    payload["attachment_quantity"] = count
    return payload


def encoded(payload: dict[str, Any], encoding: str) -> tuple[bytes, str]:
    if encoding == "json":
        return ruby_json(payload), "application/json"
    return form_encode(payload), "application/x-www-form-urlencoded"


def only_message(settings: Settings) -> str:
    [jwe] = [p for p in store_root(settings).rglob("*.jwe")]
    return jwe.stem


def attachments_of(plaintext: bytes) -> list[Any]:
    return list(email.message_from_bytes(plaintext, policy=email.policy.default).iter_attachments())


@pytest.mark.parametrize("encoding", ["json", "form"])
@pytest.mark.parametrize("count", [10_000, 50_000])
def test_attachment_bombs_are_refused_fast_and_store_nothing(
    client: Any, owner: Owner, postal_signer: PostalSigner, settings: Settings, count: int, encoding: str
) -> None:
    body, content_type = encoded(bomb(count), encoding)
    before = files_under(store_root(settings))
    started = time.monotonic()
    response = signed_post(client, postal_signer, body, content_type)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.get_data(as_text=True)
    assert elapsed < FAST_SECONDS, f"{count} attachments took {elapsed:.1f}s"
    assert files_under(store_root(settings)) == before


@pytest.mark.parametrize("encoding", ["json", "form"])
def test_the_most_attachments_allowed_are_rebuilt_fast_and_all_kept(
    client: Any, owner: Owner, postal_signer: PostalSigner, settings: Settings, encoding: str
) -> None:
    body, content_type = encoded(bomb(MAX_ATTACHMENTS), encoding)
    started = time.monotonic()
    response = signed_post(client, postal_signer, body, content_type)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.get_data(as_text=True)
    assert elapsed < FAST_SECONDS, f"{MAX_ATTACHMENTS} attachments took {elapsed:.1f}s"
    parts = attachments_of(read(client, owner, only_message(settings)))
    assert [p.get_filename() for p in parts] == [f"{i}.txt" for i in range(MAX_ATTACHMENTS)]
    assert {p.get_payload(decode=True) for p in parts} == {b"a"}


def big_attachment_payload(data: bytes, postal_id: int = 7100) -> dict[str, Any]:
    payload = hash_payload(
        postal_id=postal_id, token="big", rcpt_to=f"support@{DOMAIN}", mail_from="x@example.org", message=MESSAGE
    )
    payload["attachments"] = [
        {"filename": "big.bin", "content_type": "application/octet-stream", "size": len(data), "data": encode64(data)}
    ]
    return payload


def test_a_20_mb_attachment_under_the_default_25_mb_limit_is_stored_byte_exact(
    client: Any, owner: Owner, postal_signer: PostalSigner, settings: Settings
) -> None:
    assert settings.max_message_bytes == 25 * 1024 * 1024
    data = random.Random(20).randbytes(20_000_000)  # rebuilt as base64 it is ~27 MB: over the limit
    response = signed_post(client, postal_signer, ruby_json(big_attachment_payload(data)))
    assert response.status_code == 200, response.get_data(as_text=True)
    [part] = attachments_of(read(client, owner, only_message(settings)))
    assert part.get_filename() == "big.bin"
    assert part.get_payload(decode=True) == data


@pytest.mark.parametrize("encoding", ["json", "form"])
def test_the_limit_counts_decoded_bytes_and_bodies(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, encoding: str
) -> None:
    limit = 1_000_000
    settings = Settings.from_env(
        bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_MAX_MESSAGE_BYTES=str(limit))
    )
    app = create_app(settings)
    owner = make_owner(app.extensions["bridge"], f"support@{DOMAIN}")
    client = app.test_client()
    bodies = len(big_attachment_payload(b"")["plain_body"].encode()) + len(
        (big_attachment_payload(b"")["html_body"] or "").encode()
    )

    fits = random.Random(1).randbytes(limit - bodies)  # exactly at the limit; rebuilt, ~1.35 MB
    response = signed_post(client, postal_signer, *encoded(big_attachment_payload(fits, postal_id=1), encoding))
    assert response.status_code == 200, response.get_data(as_text=True)
    [part] = attachments_of(read(client, owner, only_message(settings)))
    assert part.get_payload(decode=True) == fits

    before = files_under(store_root(settings))
    over = fits + b"!"
    response = signed_post(client, postal_signer, *encoded(big_attachment_payload(over, postal_id=2), encoding))
    assert response.status_code == 413
    assert files_under(store_root(settings)) == before
