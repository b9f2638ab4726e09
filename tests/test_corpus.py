"""Real-world mail from other projects' test suites, through the endpoint as Postal sends it,
opened again byte for byte. The corpus lives beside the project (../shared/corpus/mime) and is
not part of it: without it this test skips."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.conftest import DOMAIN, run_worker
from tests.postal_sim import PostalSimulator, raw_payload

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "mime"


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name not in ("INDEX.tsv", "SOURCES.md"))


@pytest.mark.skipif(
    not CORPUS.is_dir(), reason="the shared MIME corpus (../shared/corpus/mime) is not beside the project"
)
@pytest.mark.parametrize("encoding", ["BodyAsJSON", "FormData"])
def test_every_corpus_message_is_stored_and_opens_byte_exact(live_url, client, bridge, owner, postal_signer, encoding):
    files = corpus_files()
    assert len(files) > 250
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer, encoding=encoding)
    sent = {}
    for postal_id, path in enumerate(files, start=1):
        payload = raw_payload(
            postal_id=postal_id,
            rcpt_to=f"support@{DOMAIN}",
            mail_from="sender@example.org",
            message=path.read_bytes(),
        )
        attempt = postal.post(payload)
        assert attempt.status == 200, f"{path.name}: {attempt.status} {attempt.body_text}"
        sent[postal_id] = base64.b64decode(payload["message"])
    run_worker(bridge)
    from bridge.sealing import open_sealed

    seen = {}
    cursor = None
    while True:
        query = "/api/v1/messages?folder=other&limit=200" + (f"&before={cursor}" if cursor is not None else "")
        page = client.get(query, headers=owner.auth).get_json()
        for record in page["messages"]:
            body = client.get(f"/api/v1/messages/{record['id']}", headers=owner.auth).get_json()["body"]
            seen[record["postal"]["id"]] = open_sealed(body, owner.private_jwk)
        cursor = page["next"]
        if cursor is None:
            break
    spam = client.get("/api/v1/messages?folder=spam&limit=200", headers=owner.auth).get_json()["messages"]
    assert spam == []
    assert seen == sent
