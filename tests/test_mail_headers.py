"""Sender facts from raw messages as Postal posts them: what is trusted, what is refused, and that it never breaks."""

from __future__ import annotations

import random
import time

import pytest

from bridge.mail.headers import MAX_HEADER_BYTES, SenderFacts, sender_facts

# The header block of the shared fixture postal/inbound_raw.json (decoded `message`), copied so the suite does
# not need the shared fixtures: Postal's prepended lines, then the sender's own headers.
POSTAL_MESSAGE = (
    b"X-Postal-Spam: no\r\n"
    b"X-Postal-Spam-Threshold: 5.0\r\n"
    b"X-Postal-Spam-Score: 0\r\n"
    b"X-Postal-Threat: no\r\n"
    b"Received: from mail-ej1-f44.example.org (mail-ej1-f44.example.org [192.0.2.44]) by mx.postal.example.com"
    b" with SMTP; Tue, 28 Apr 2026 16:19:33 -0000\r\n"
    b"Date: Tue, 28 Apr 2026 18:19:30 +0200\r\n"
    b"From: Jane Doe <jane@example.org>\r\n"
    b"To: Acme Support <support@example.com>\r\n"
    b"Cc: ops@example.net\r\n"
    b"Reply-To: Jane Doe <jane.doe+replies@example.org>\r\n"
    b"Subject: Re: Order #4411 - wrong size\r\n"
    b"Message-ID: <20260428161930.7f3c2a@mail.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="=_mixed_4411"\r\n'
    b"\r\n"
    b"--=_mixed_4411\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"\r\n"
    b"Hi, the shoes arrived but they are a 42, I ordered a 43.\r\n"
    b"--=_mixed_4411--\r\n"
)

POSTAL_RECEIVED = (
    b"Received: from mx.sender.test (mx.sender.test [192.0.2.44]) by mx.postal.example.com with SMTP;"
    b" Tue, 28 Apr 2026 16:19:33 -0000\r\n"
)


def postal(
    sender_part: bytes, *, spam: bytes = b"no", score: bytes = b"0.4", received: bytes = POSTAL_RECEIVED
) -> bytes:
    """What Postal posts: its spam lines and Received line on top of what the sender wrote."""
    return (
        b"X-Postal-Spam: " + spam + b"\r\n"
        b"X-Postal-Spam-Threshold: 5.0\r\n"
        b"X-Postal-Spam-Score: " + score + b"\r\n"
        b"X-Postal-Threat: no\r\n" + received + sender_part
    )


def sender_message(from_lines: bytes = b"From: Alice <alice@sender.test>\r\n", body: bytes = b"Hello\r\n") -> bytes:
    return from_lines + b"To: bob@example.test\r\nSubject: hi\r\nMessage-ID: <m1@sender.test>\r\n\r\n" + body


def test_facts_of_a_message_as_postal_posts_it() -> None:
    facts = sender_facts(POSTAL_MESSAGE)
    assert facts == SenderFacts(
        from_addresses=("jane@example.org",),
        from_problem=None,
        postal_spam=False,
        postal_spam_score=0.0,
        client_ip="192.0.2.44",
        helo="mail-ej1-f44.example.org",
        message_id="20260428161930.7f3c2a@mail.example.org",
    )
    assert facts.from_address == "jane@example.org"


def test_postal_verdict_wins_over_a_forged_one_later_in_the_header() -> None:
    forged = b"X-Postal-Spam: no\r\nX-Postal-Spam-Score: -10\r\n" + sender_message()
    facts = sender_facts(postal(forged, spam=b"yes", score=b"8.7"))
    assert facts.postal_spam is True
    assert facts.postal_spam_score == 8.7


def test_forged_spam_headers_are_ignored_when_postal_did_not_inspect() -> None:
    # With spam inspection off Postal writes only its Received line: the sender's X-Postal-* are below it.
    message = POSTAL_RECEIVED + b"X-Postal-Spam: no\r\nX-Postal-Spam-Score: 0\r\n" + sender_message()
    facts = sender_facts(message)
    assert (facts.postal_spam, facts.postal_spam_score) == (None, None)
    assert facts.client_ip == "192.0.2.44"
    assert facts.helo == "mx.sender.test"


def test_client_ip_comes_only_from_postals_received_line() -> None:
    sender_received = b"Received: from laptop ([10.9.9.9]) by mx.sender.test with ESMTP; date\r\n"
    facts = sender_facts(postal(sender_received + sender_message()))
    assert facts.client_ip == "192.0.2.44"
    # No Received straight after Postal's block: a later (sender-written) one is not trusted.
    facts = sender_facts(b"X-Postal-Spam: no\r\n" + sender_message().replace(b"To:", sender_received + b"To:"))
    assert facts.client_ip is None
    assert facts.helo is None


def test_a_helo_name_cannot_inject_an_address() -> None:
    received = (
        b"Received: from evil (fake.example [198.51.100.1]) by x (rdns.forger.test [203.0.113.66])"
        b" by mx.postal.example.com with SMTP; Tue, 28 Apr 2026 16:19:33 -0000\r\n"
    )
    facts = sender_facts(postal(sender_message(), received=received))
    assert facts.client_ip == "203.0.113.66"
    assert facts.helo == "evil (fake.example [198.51.100.1]) by x"


@pytest.mark.parametrize(
    ("received", "ip", "helo"),
    [
        (
            b"Received: from mx.sender.test (192.0.2.44 [192.0.2.44]) by h with SMTP; d\r\n",
            "192.0.2.44",
            "mx.sender.test",
        ),
        (
            b"Received: from [192.0.2.7] ( [2001:db8::25]) by h with SMTP; d\r\n",
            "2001:db8::25",
            "[192.0.2.7]",
        ),
        (b"Received: from h1 (h1 [::ffff:192.0.2.9]) by h with SMTP; d\r\n", "192.0.2.9", "h1"),
        # Postal's privacy mode leaves the client out entirely.
        (b"Received: by mx.postal.example.com with SMTP; Tue, 28 Apr 2026 16:19:33 -0000\r\n", None, None),
        (b"Received: from h1 (h1 [999.1.1.1]) by h with SMTP; d\r\n", None, None),
    ],
)
def test_postal_received_line_shapes(received: bytes, ip: str | None, helo: str | None) -> None:
    facts = sender_facts(postal(sender_message(), received=received))
    assert (facts.client_ip, facts.helo) == (ip, helo)


@pytest.mark.parametrize(
    ("from_lines", "expected"),
    [
        (b"From: =?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <Joerg@Sender.TEST>\r\n", "joerg@sender.test"),
        # An encoded display name that looks like an address does not become the address.
        (b"From: =?utf-8?q?ceo=40bank=2Etest?= <eve@forger.test>\r\n", "eve@forger.test"),
        (b'From: "Bank, Support <ceo@bank.test>" <eve@forger.test>\r\n', "eve@forger.test"),
        (b"From: alice@sender.test (Alice)\r\n", "alice@sender.test"),
        (b"From: Alice\r\n <alice@sender.test>\r\n", "alice@sender.test"),
        ("From: Jörg <jörg@exämple.test>\r\n".encode(), "jörg@exämple.test"),
    ],
)
def test_from_address_is_the_lower_cased_addr_spec(from_lines: bytes, expected: str) -> None:
    facts = sender_facts(postal(sender_message(from_lines)))
    assert facts.from_problem is None
    assert facts.from_address == expected
    assert facts.from_addresses == (expected,)


@pytest.mark.parametrize(
    ("from_lines", "problem", "addresses"),
    [
        (b"", "no From", ()),
        (b"From: undisclosed-recipients:;\r\n", "no From", ()),
        (b"From: <>\r\n", "no From", ()),
        (
            b"From: alice@sender.test\r\nFrom: eve@forger.test\r\n",
            "several From addresses",
            ("alice@sender.test", "eve@forger.test"),
        ),
        (
            b"From: alice@sender.test, bob@sender.test\r\n",
            "several From addresses",
            ("alice@sender.test", "bob@sender.test"),
        ),
        (
            b"From: Team: alice@sender.test, eve@forger.test;\r\n",
            "several From addresses",
            ("alice@sender.test", "eve@forger.test"),
        ),
        (b"From: not an address\r\n", "undecodable From", ()),
        (b"From: alice@sender.test@forger.test\r\n", "undecodable From", ()),
        (b"From: alice@[192.0.2.1]\r\n", "undecodable From", ()),
        (b"From: \xe9ve <\xe9ve@forger.test>\r\n", "undecodable From", ()),  # Latin-1, not UTF-8
        ("From: <alice\u202e@sender.test>\r\n".encode(), "undecodable From", ()),  # a bidi override
    ],
)
def test_from_problems(from_lines: bytes, problem: str, addresses: tuple[str, ...]) -> None:
    facts = sender_facts(postal(sender_message(from_lines)))
    assert facts.from_problem == problem
    assert facts.from_addresses == addresses
    assert facts.from_address is None


def test_crlf_and_lf_messages_give_the_same_facts() -> None:
    lf = POSTAL_MESSAGE.replace(b"\r\n", b"\n")
    assert sender_facts(lf) == sender_facts(POSTAL_MESSAGE)


def test_only_the_header_block_is_read() -> None:
    # A From line in the body (after the empty line) is not a header.
    message = postal(b"To: bob@example.test\r\nSubject: x\r\n\r\nFrom: alice@sender.test\r\n")
    assert sender_facts(message).from_problem == "no From"


def test_first_message_id_wins_and_loses_its_brackets() -> None:
    message = postal(sender_message().replace(b"\r\n\r\n", b"\r\nMessage-ID: <second@x.test>\r\n\r\n", 1))
    assert sender_facts(message).message_id == "m1@sender.test"


@pytest.mark.parametrize(
    ("spam", "score", "expected"),
    [(b"YES", b"5.5", (True, 5.5)), (b"maybe", b"nan", (None, None)), (b"no", b"-1.5", (False, -1.5))],
)
def test_spam_values(spam: bytes, score: bytes, expected: tuple[bool | None, float | None]) -> None:
    facts = sender_facts(postal(sender_message(), spam=spam, score=score))
    assert (facts.postal_spam, facts.postal_spam_score) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\r\n\r\n",
        b"\x00" * 1000,
        b"\xff\xfe\x00garbage: \x80\x81\r\n\r\n",
        b"no header block at all, just words",
        b"From: \r\n\r\n",
        b"From:\r\n\tfolded nothing\r\n\r\n",
        b"From: " + b"<" * 100_000 + b"\r\n\r\n",
        b"Received: from (((( [[[[ by\r\n\r\n",
        b"X-Postal-Spam: yes\r\n" * 10_000,
        b"Subject: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\nbody",
    ],
)
def test_never_raises_on_odd_bytes(message: bytes) -> None:
    facts = sender_facts(message)
    assert isinstance(facts, SenderFacts)
    assert facts.from_address is None


def test_never_raises_on_random_bytes() -> None:
    rng = random.Random(5322)
    for _ in range(300):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
        blob = blob.replace(b"\x00", b"From: ", 1)
        assert isinstance(sender_facts(blob), SenderFacts)


def test_a_from_beyond_the_header_cap_is_not_read() -> None:
    padding = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    message = postal(padding * (MAX_HEADER_BYTES // len(padding) + 10) + sender_message())
    facts = sender_facts(message)
    assert facts.from_problem == "no From"
    assert facts.client_ip == "192.0.2.44"  # Postal's own lines are at the top, within the cap


def test_a_25_mb_body_is_not_parsed() -> None:
    small = postal(sender_message(body=b"hi\r\n"))
    huge = postal(sender_message(body=(b"From: eve@forger.test\r\n" + b"x" * 998 + b"\r\n") * 25_000))
    assert len(huge) > 25_000_000
    assert sender_facts(huge) == sender_facts(small)
    # Loose bound: parsing a 25 MB body with the email package takes seconds; reading headers takes < 1 ms.
    best = min(_seconds(lambda: sender_facts(huge)) for _ in range(3))
    assert best < 0.25


def _seconds(call: object) -> float:
    start = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - start
