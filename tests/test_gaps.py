"""Gaps that deliberately broken code showed the suite did not catch: each test here fails when the
one check it names is removed.

* A DKIM signature that does not cover ``From:`` vouches for nothing: dkimpy verifies it, the bridge
  must not count it as a pass (bridge/mail/auth.py), so an approved address forged in ``From:`` with
  such a signature stays screened.
* Re-screening (a handshake upload, or ``rescreen``) never moves a message its owner moved by hand,
  also when the owner moved it into a folder screening itself uses (``spam``, ``other``).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import dkim
import pytest
from dkim.crypto import parse_pem_private_key

from bridge import context
from bridge.jobs.inbound import rescreen_mailbox
from bridge.mail.auth import authenticate
from bridge.mail.headers import sender_facts
from tests.dns_server import KnotDNS
from tests.test_mail_auth import Signer
from tests.test_screening import FORGER_IP, SENDER_IP, Mailroom, Sender

pytestmark = pytest.mark.dns


def sign_without_from(
    signer: Signer, message: bytes, include: tuple[bytes, ...] = (b"to", b"subject", b"date")
) -> bytes:
    """A valid DKIM signature over ``include`` only. dkimpy's sign() refuses to leave out From (RFC 6376
    5.4 says it MUST be signed), so this does what sign() does, without that check, with dkimpy's own
    canonicalization and header hashing."""
    assert b"from" not in include
    d = dkim.DKIM(message)
    d.signature_algorithm = b"rsa-sha256"
    d.hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    body_hash = d.hasher()
    body_hash.update(canon.canonicalize_body(d.body))
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/simple"),
        (b"d", signer.domain.encode()),
        (b"i", b"@" + signer.domain.encode()),
        (b"q", b"dns/txt"),
        (b"s", signer.selector.encode()),
        (b"t", str(int(time.time())).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_hash.digest())),
        (b"b", b"0" * 60),
    ]
    header = d.gen_header(fields, include, canon, b"DKIM-Signature", parse_pem_private_key(signer.private_pem))
    return b"DKIM-Signature: " + header + message


def dnsfunc_for(knot: KnotDNS) -> Any:
    resolver = knot.resolver()

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


@pytest.fixture
def sender(knot_dns: KnotDNS) -> Sender:
    return Sender(knot_dns, dmarc="v=DMARC1; p=none")


@pytest.fixture
def mailroom(live_url: str, client: Any, bridge: Any, owner: Any, postal_signer: Any) -> Mailroom:
    return Mailroom(live_url, client, bridge, owner, postal_signer)


def test_dkim_that_does_not_cover_from_is_not_a_pass(knot_dns: KnotDNS, sender: Sender) -> None:
    message = sign_without_from(sender.signer, sender.message(sign=False))
    # dkimpy itself accepts the signature: the refusal below is the bridge's own check.
    assert dkim.DKIM(message).verify(dnsfunc=dnsfunc_for(knot_dns)) is True
    posted = (
        f"Received: from mx.forger.test (mx.forger.test [{FORGER_IP}]) by mx.postal.example.test with SMTP; "
        "Tue, 28 Apr 2026 16:19:33 -0000\r\n"
    ).encode() + message
    verdict = authenticate(posted, facts=sender_facts(posted), mail_from=sender.address, resolver=knot_dns.resolver())
    assert verdict.dkim != "pass" and verdict.dkim_domains == ()
    assert verdict.spf == "fail"  # sent from a server its SPF does not list: nothing else vouches for it
    assert not verdict.authenticated()


def test_an_approved_sender_forged_under_a_signature_without_from_stays_screened(
    mailroom: Mailroom, sender: Sender
) -> None:
    status, _ = mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    assert status == 201
    # From an IP the sender's SPF does not list, so only DKIM could authenticate it.
    mailroom.deliver(sender.message("covered"), mail_from=sender.address, client_ip=FORGER_IP)
    mailroom.deliver(
        sign_without_from(sender.signer, sender.message("not covered", sign=False)),
        mail_from=sender.address,
        client_ip=FORGER_IP,
    )
    [inbox] = mailroom.folder("inbox")  # the control: the same sender signing From reaches the inbox
    [other] = mailroom.folder("other")
    assert inbox["verdicts"]["dkim"] == "pass"
    assert other["verdicts"]["dkim"] != "pass" and other["verdicts"]["authenticated"] is False


# --- re-screening leaves the owner's moves alone --------------------------------------------------


@pytest.mark.parametrize(
    ("before", "arrives_in", "moved_to", "then"),
    [
        (None, "other", "spam", "accepted"),  # approving the sender would file it into the inbox
        ("accepted", "inbox", "other", "revoked"),  # revoking the sender would file it into spam
        ("accepted", "inbox", "spam", "accepted"),  # re-approving would put it back into the inbox
        ("revoked", "spam", "other", "revoked"),  # re-revoking would put it back into spam
        (None, "other", "inbox", "revoked"),
    ],
)
def test_rescreening_never_moves_what_the_owner_moved_into_a_screened_folder(
    mailroom: Mailroom,
    sender: Sender,
    bridge: Any,
    owner: Any,
    before: str | None,
    arrives_in: str,
    moved_to: str,
    then: str,
) -> None:
    if before:
        assert mailroom.put_handshake(mailroom.sign(before, sender.address))[0] == 201
    mailroom.deliver(sender.message(), mail_from=sender.address, client_ip=SENDER_IP)
    [record] = mailroom.folder(arrives_in)
    moved = mailroom.client.post(f"/api/v1/messages/{record['id']}/move", json={"folder": moved_to}, headers=owner.auth)
    assert moved.status_code == 200

    status, _ = mailroom.put_handshake(mailroom.sign(then, sender.address))  # queues and runs the re-screening
    assert status in (200, 201)
    assert [r["id"] for r in mailroom.folder(moved_to)] == [record["id"]]
    context.use(bridge)
    assert rescreen_mailbox(owner.mailbox.address) == 0  # the whole mailbox, as `python -m bridge rescreen`
    assert [r["id"] for r in mailroom.folder(moved_to)] == [record["id"]]
    stored = bridge.messages.get_record(owner.mailbox.address, record["id"])
    assert stored["folder"] == moved_to and stored["moved_by_owner"] is True


def test_rescreening_does_move_what_screening_filed(mailroom: Mailroom, sender: Sender) -> None:
    """The control for the test above: without the owner's move, the same upload does re-file."""
    mailroom.deliver(sender.message(), mail_from=sender.address, client_ip=SENDER_IP)
    [record] = mailroom.folder("other")
    mailroom.put_handshake(mailroom.sign("accepted", sender.address))
    assert [r["id"] for r in mailroom.folder("inbox")] == [record["id"]]
