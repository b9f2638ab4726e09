"""The inbox by inclusion, end to end: handshakes signed by the owner, DKIM/SPF/DMARC answered by
the suite's real Knot server, mail delivered by the Postal simulator and filed by the real worker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio.handshakes import sign_handshake
from bridge.mailio.identity import email_lookup_hash
from tests.conftest import DOMAIN, Owner, run_worker
from tests.dns_server import KnotDNS
from tests.postal_sim import PostalSimulator, hash_payload, raw_payload
from tests.test_mail_auth import Signer

pytestmark = pytest.mark.dns

SENDER_IP = "192.0.2.44"
FORGER_IP = "203.0.113.66"
ROOT = Path(__file__).resolve().parents[1]


class Sender:
    """A sending domain of its own in the shared Knot zones: DKIM key, SPF and DMARC records."""

    def __init__(self, knot: KnotDNS, *, dmarc: str = "v=DMARC1; p=none") -> None:
        self.domain = f"s{uuid.uuid4().hex[:10]}.sender.test"
        self.address = f"alice@{self.domain}"
        self.signer = Signer(self.domain)
        knot.set_txt(self.signer.record_name, self.signer.record)
        knot.set_txt(self.domain, f"v=spf1 ip4:{SENDER_IP} -all")
        knot.set_txt(f"_dmarc.{self.domain}", dmarc)

    def message(self, subject: str = "Meeting", *, from_header: str | None = None, sign: bool = True) -> bytes:
        raw = (
            f"From: {from_header or 'Alice <' + self.address + '>'}\r\n"
            f"To: support@{DOMAIN}\r\nSubject: {subject}\r\nDate: Tue, 28 Apr 2026 18:19:30 +0200\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@{self.domain}>\r\n\r\nSee you at 10.\r\n"
        ).encode()
        return self.signer.sign(raw) if sign else raw


class Mailroom:
    """Delivers through the endpoint and reads folders back through the API."""

    def __init__(self, live_url: str, client, bridge, owner: Owner, postal_signer) -> None:
        self.postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
        self.client, self.bridge, self.owner = client, bridge, owner
        self.next_id = 1000

    def deliver(self, message: bytes, *, mail_from: str, client_ip: str = SENDER_IP, spam: bool = False) -> None:
        self.next_id += 1
        payload = raw_payload(
            postal_id=self.next_id,
            rcpt_to=f"support@{DOMAIN}",
            mail_from=mail_from,
            message=message,
            spam=spam,
            client_ip=client_ip,
        )
        attempt = self.postal.post(payload)
        assert attempt.status == 200, attempt.body_text
        run_worker(self.bridge)

    def folder(self, name: str) -> list[dict]:
        response = self.client.get(f"/api/v1/messages?folder={name}", headers=self.owner.auth)
        assert response.status_code == 200
        return response.get_json()["messages"]

    def folders(self) -> dict[str, int]:
        return {f: len(self.folder(f)) for f in ("inbox", "other", "spam", "handshake") if self.folder(f)}

    def put_handshake(self, document: dict) -> tuple[int, dict]:
        response = self.client.put("/api/v1/handshakes", json=document, headers=self.owner.auth)
        run_worker(self.bridge)  # the re-screening job queued by the upload
        return response.status_code, response.get_json()

    def sign(self, status: str, sender: str, **kwargs) -> dict:
        return sign_handshake(
            ed25519_private=self.owner.keys.ed25519_private,
            status=status,
            sender_email=sender,
            origin_domain=DOMAIN,
            **kwargs,
        )


@pytest.fixture
def mailroom(live_url, client, bridge, owner, postal_signer) -> Mailroom:
    return Mailroom(live_url, client, bridge, owner, postal_signer)


@pytest.fixture
def sender(knot_dns) -> Sender:
    return Sender(knot_dns)


def test_approved_authenticated_sender_lands_in_the_inbox_with_its_verdicts(mailroom, sender):
    status, body = mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    assert status == 201 and body["result"] == "created"
    mailroom.deliver(sender.message(), mail_from=sender.address)
    [record] = mailroom.folder("inbox")
    verdicts = record["verdicts"]
    assert verdicts["dkim"] == "pass" and verdicts["dkim_domains"] == [sender.domain]
    assert verdicts["spf"] == "pass" and verdicts["authenticated"] is True
    assert verdicts["handshake"] == "accepted" and verdicts["rule"] == "handshake"


def test_the_same_approved_sender_forged_is_screened_not_delivered_to_the_inbox(mailroom, sender):
    mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    # From says alice, but no DKIM signature and sent from a server her SPF does not allow
    forged = sender.message(sign=False)
    mailroom.deliver(forged, mail_from="bounce@forger.test", client_ip=FORGER_IP)
    # ... and a copy signed by the forger's own domain, envelope aligned with the forger
    forger = Signer("forger.test", selector=f"f{uuid.uuid4().hex[:8]}")
    mailroom.deliver(forger.sign(sender.message(sign=False)), mail_from="x@forger.test", client_ip=FORGER_IP)
    assert mailroom.folder("inbox") == []
    screened = mailroom.folder("other") + mailroom.folder("spam")
    assert len(screened) == 2
    assert all(not r["verdicts"]["authenticated"] for r in screened)
    assert any("not authenticated" in r["reason"] for r in screened)


def test_spf_alone_authenticates_an_approved_sender(mailroom, sender):
    mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    mailroom.deliver(sender.message(sign=False), mail_from=sender.address)
    [record] = mailroom.folder("inbox")
    assert record["verdicts"]["dkim"] == "none" and record["verdicts"]["spf"] == "pass"


def test_unknown_sender_is_screened_into_other_with_the_reason(mailroom, sender):
    mailroom.deliver(sender.message(), mail_from=sender.address)
    [record] = mailroom.folder("other")
    assert record["reason"] == "sender not approved by a handshake"
    assert record["verdicts"]["handshake"] is None and record["verdicts"]["authenticated"] is True


def test_revoking_moves_existing_and_future_mail_out_of_the_inbox(mailroom, sender):
    mailroom.put_handshake(mailroom.sign("accepted", sender.address, created_ms=1_000_000))
    mailroom.deliver(sender.message("one"), mail_from=sender.address)
    mailroom.deliver(sender.message("two"), mail_from=sender.address)
    assert mailroom.folders() == {"inbox": 2}

    status, body = mailroom.put_handshake(mailroom.sign("revoked", sender.address, created_ms=2_000_000))
    assert status == 200 and body["result"] == "replaced"
    assert mailroom.folders() == {"spam": 2}  # the upload's re-screening job moved them
    mailroom.deliver(sender.message("three"), mail_from=sender.address)
    assert mailroom.folders() == {"spam": 3}


def test_a_replayed_older_approval_cannot_undo_a_revocation(mailroom, sender):
    approval = mailroom.sign("accepted", sender.address, created_ms=1_000_000)
    assert mailroom.put_handshake(approval)[0] == 201
    assert mailroom.put_handshake(mailroom.sign("revoked", sender.address, created_ms=2_000_000))[0] == 200
    status, body = mailroom.put_handshake(approval)
    assert status == 403 and "newer" in body["error"]
    [stored] = mailroom.client.get("/api/v1/handshakes", headers=mailroom.owner.auth).get_json()["handshakes"]
    assert stored["content"]["status"] == "revoked"
    mailroom.deliver(sender.message(), mail_from=sender.address)
    assert mailroom.folders() == {"spam": 1}


def test_the_same_document_uploaded_twice_is_unchanged(mailroom, sender):
    document = mailroom.sign("accepted", sender.address)
    assert mailroom.put_handshake(document)[0] == 201
    status, body = mailroom.put_handshake(document)
    assert status == 200 and body["result"] == "unchanged"


def test_a_handshake_request_files_into_the_handshake_folder(mailroom, sender):
    mailroom.put_handshake(mailroom.sign("request", sender.address))
    mailroom.deliver(sender.message(), mail_from=sender.address)
    assert mailroom.folders() == {"handshake": 1}


def test_dmarc_reject_failure_is_spam(mailroom, knot_dns):
    strict = Sender(knot_dns, dmarc="v=DMARC1; p=reject")
    mailroom.put_handshake(mailroom.sign("accepted", strict.address))
    mailroom.deliver(strict.message(sign=False), mail_from="x@forger.test", client_ip=FORGER_IP)
    [record] = mailroom.folder("spam")
    assert record["verdicts"]["dmarc"] == "fail" and record["verdicts"]["rule"] == "dmarc"


def test_a_hash_delivery_from_a_dmarc_reject_domain_is_screened_not_spam(mailroom, knot_dns, postal_signer):
    # The Hash format carries neither DKIM signatures nor Postal's Received: line (no client IP): DMARC has
    # no evidence to fail on, so the message is screened like any unknown sender's, never spam for that.
    strict = Sender(knot_dns, dmarc="v=DMARC1; p=reject")
    postal = PostalSimulator(mailroom.postal.url, postal_signer, format="Hash")
    payload = hash_payload(
        postal_id=5001,
        token="tok5001",
        rcpt_to=f"support@{DOMAIN}",
        mail_from=strict.address,
        message=strict.message(),
    )
    assert postal.post(payload).status == 200
    run_worker(mailroom.bridge)
    [record] = mailroom.folder("other")
    assert record["verdicts"]["dmarc"] == "unknown" and record["verdicts"]["dmarc_policy"] == "reject"
    assert record["verdicts"]["rule"] == "screened"


def test_a_raw_message_without_a_client_ip_gets_no_dmarc_verdict(mailroom, knot_dns):
    strict = Sender(knot_dns, dmarc="v=DMARC1; p=reject")
    # Postal's Received: line names no address we can read: SPF cannot be checked.
    mailroom.deliver(strict.message(sign=False), mail_from=strict.address, client_ip="unknown")
    [record] = mailroom.folder("other")
    assert record["verdicts"]["spf"] == "none" and record["verdicts"]["dmarc"] == "unknown"


def test_postal_spam_verdict_wins_over_an_approval(mailroom, sender):
    mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    mailroom.deliver(sender.message(), mail_from=sender.address, spam=True)
    assert mailroom.folders() == {"spam": 1}


@pytest.mark.parametrize(
    "from_header",
    [None, "a@x.test, b@y.test", "=?utf-8?b?/w==?= <\udcff@x>"],
    ids=["no-from", "several-from", "undecodable"],
)
def test_mail_without_one_clear_from_is_screened_never_dropped_never_inbox(mailroom, sender, from_header):
    raw = sender.message(sign=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"From:")]
    if from_header is not None:
        lines.insert(0, b"From: " + from_header.encode("utf-8", "surrogateescape"))
    mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    mailroom.deliver(b"\r\n".join(lines) + b"\r\n\r\n" + body, mail_from=sender.address)
    assert mailroom.folders() == {"other": 1}


def test_a_contact_the_owner_wrote_to_reaches_the_inbox_when_authenticated(mailroom, sender, bridge, owner):
    bridge.contacts.record(owner.mailbox.address, email_lookup_hash(sender.address))
    mailroom.deliver(sender.message(), mail_from=sender.address)
    mailroom.deliver(sender.message(sign=False), mail_from="x@forger.test", client_ip=FORGER_IP)
    assert mailroom.folders() == {"inbox": 1, "other": 1}


def test_the_email_hash_is_computed_once_per_sender(mailroom, sender, bridge):
    for subject in ("a", "b", "c"):
        mailroom.deliver(sender.message(subject), mail_from=sender.address)
    assert bridge.sender_hashes.computed == 1
    assert bridge.redis.keys("bridge:ehash:*") and not bridge.redis.keys(f"*{sender.address}*")


def test_an_owner_move_sticks_through_rescreening(mailroom, sender, client, owner):
    mailroom.deliver(sender.message(), mail_from=sender.address)
    [record] = mailroom.folder("other")
    moved = client.post(f"/api/v1/messages/{record['id']}/move", json={"folder": "archive"}, headers=owner.auth)
    assert moved.status_code == 200 and moved.get_json()["folder"] == "archive"
    assert [r["id"] for r in mailroom.folder("archive")] == [record["id"]] and mailroom.folder("other") == []
    mailroom.put_handshake(mailroom.sign("revoked", sender.address))
    assert [r["id"] for r in mailroom.folder("archive")] == [record["id"]]
    bad = client.post(f"/api/v1/messages/{record['id']}/move", json={"folder": "nowhere"}, headers=owner.auth)
    assert bad.status_code == 400


# --- bad handshakes -------------------------------------------------------------------------------


def test_bad_handshake_documents_get_a_reason_and_nothing_is_stored(mailroom, sender, bridge, owner):
    from tests.conftest import make_owner

    other = make_owner(bridge, f"sales@{DOMAIN}")
    good = mailroom.sign("accepted", sender.address)
    junk = b"\xb9\x00\x01junk"  # not CBOR that decodes, but signed by the owner: gets past the signature
    signed_junk = dict(
        good,
        cborPayloadBase64=base64.b64encode(junk).decode(),
        signatureBase64=base64.b64encode(
            Ed25519PrivateKey.from_private_bytes(owner.keys.ed25519_private).sign(junk)
        ).decode(),
    )
    tampered = dict(good, cborPayloadBase64=base64.b64encode(junk).decode())
    by_other_owner = sign_handshake(
        ed25519_private=other.keys.ed25519_private, status="accepted", sender_email=sender.address, origin_domain=DOMAIN
    )
    cases = [
        ({"content": {}}, 400),
        (signed_junk, 400),  # malformed CBOR
        (tampered, 403),  # the signature is checked over the received bytes before anything decodes them
        (dict(good, signatureBase64=base64.b64encode(b"\x00" * 64).decode()), 403),
        (by_other_owner, 403),  # a document for another owner (signed by another key)
        ("not an object", 400),
    ]
    for document, expected in cases:
        status, body = mailroom.put_handshake(document)
        assert status == expected, (document, body)
        assert "\n" not in body["error"]
    assert bridge.handshakes.all(owner.mailbox.address) == []
    no_token = mailroom.client.put("/api/v1/handshakes", json=good)
    assert no_token.status_code == 401


def test_handshake_offers_are_single_use_csprng_nonces(client, owner, bridge):
    first = client.post("/api/v1/handshake-offers", headers=owner.auth).get_json()
    second = client.post("/api/v1/handshake-offers", headers=owner.auth).get_json()
    nonce, domain, address = first["offer"].split(":")
    assert len(nonce) == 16 and nonce.isalpha() and domain == DOMAIN and address == owner.mailbox.address
    assert first["nonce"] != second["nonce"]
    assert bridge.offers.redeem(nonce) == owner.mailbox.address
    assert bridge.offers.redeem(nonce) is None
    assert 0 < bridge.redis.ttl(f"bridge:offer:{second['nonce']}") <= 300


# --- the owner's CLI ------------------------------------------------------------------------------


def test_owner_cli_approves_and_revokes_over_the_api(environment, live_url, mailroom, sender, owner, tmp_path):
    key_file = tmp_path / "owner.key.json"
    key_file.write_text(json.dumps(owner.keys.to_key_file(owner.mailbox.email)))
    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    approved = cli(
        "handshake", "approve", sender.address, "--key", str(key_file), "--url", live_url, "--token", owner.token
    )
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "accepted"
    mailroom.deliver(sender.message(), mail_from=sender.address)
    assert mailroom.folders() == {"inbox": 1}

    revoked = cli(
        "handshake", "revoke", sender.address, "--key", str(key_file), "--url", live_url, "--token", owner.token
    )
    assert revoked.returncode == 0, revoked.stderr
    run_worker(mailroom.bridge)
    assert mailroom.folders() == {"spam": 1}
    listed = cli("handshake", "list", "--url", live_url, "--token", owner.token)
    assert [json.loads(line)["status"] for line in listed.stdout.splitlines()] == ["revoked"]

    rescreened = cli("rescreen", owner.mailbox.email)
    assert rescreened.returncode == 0 and json.loads(rescreened.stdout)["moved"] == 0


def test_handshake_upload_without_a_length_or_too_large_is_refused_unread(live_url, owner):
    headers = {**owner.auth, "Content-Type": "application/json"}
    too_large = requests.put(
        f"{live_url}/api/v1/handshakes", data=b"{" + b" " * 70_000 + b"}", headers=headers, timeout=10
    )
    assert too_large.status_code == 413
    chunked = requests.put(f"{live_url}/api/v1/handshakes", data=iter([b"{}"]), headers=headers, timeout=10)
    assert chunked.status_code == 411
