"""Postal endpoint payloads: four shapes to one InboundMessage, the Hash rebuild, strictness, limits, keys.

A payload the parser mishandles either loses mail (a 400 bounces the sender) or stores something other than
what was sent; these tests drive bridge.postal.payloads with the captured fixtures and the Postal simulator.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import random
import time
import tracemalloc
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from bridge.postal.payloads import (
    MAX_HEADER_CHARS,
    REBUILT_HEADER,
    InboundMessage,
    MessageTooLarge,
    PayloadError,
    decode_base64,
    parse_inbound,
)
from tests.postal_sim import encode64, form_encode, hash_payload, new_message, raw_payload, ruby_json

DATA = Path(__file__).parent / "data" / "postal"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
LIMIT = 1_000_000
KID_A = "a" * 64
KID_B = "b" * 64

RAW_FIXTURE = (DATA / "inbound_raw.json").read_bytes()
HASH_FIXTURE = (DATA / "inbound_hash.json").read_bytes()
STRIP_FIXTURE = (DATA / "inbound_hash_strip_replies_no_attachments.json").read_bytes()
STORED = base64.b64decode(json.loads(RAW_FIXTURE)["message"])  # what Postal stored, its headers first
ORIGINAL = STORED[STORED.index(b"Date:") :]  # what the sender's SMTP client sent
RECEIVED = {
    "client_ip": "192.0.2.44",
    "helo": "mail-ej1-f44.example.org",
    "received_at": datetime(2026, 4, 28, 16, 19, 33, tzinfo=UTC),
}
ENVELOPE = {"postal_id": 4821, "rcpt_to": "support@example.com", "mail_from": "jane@example.org"}


def parse_mime(message: bytes) -> EmailMessage:
    return email.message_from_bytes(message, policy=email.policy.default)  # type: ignore[return-value]


def body_text(msg: EmailMessage, subtype: str) -> str | None:
    """A body's text; MIME text ends in a line break where Postal's bodies need not, so that is dropped."""
    part = msg.get_body(preferencelist=(subtype,))
    return None if part is None else part.get_content().replace("\r\n", "\n").removesuffix("\n")


def hash_json(**overrides: Any) -> bytes:
    payload = json.loads(HASH_FIXTURE)
    payload.update(overrides)
    return ruby_json(payload)


# --------------------------------------------------------------------------- the four shapes


def all_shapes() -> dict[str, tuple[bytes, str]]:
    raw = raw_payload(message=ORIGINAL, **ENVELOPE, **RECEIVED)
    hashed = hash_payload(message=ORIGINAL, token="p1ZqkR7vW3sYb9Lm", timestamp=1777393173.4, **ENVELOPE, **RECEIVED)
    flat = hash_payload(
        message=ORIGINAL, token="p1ZqkR7vW3sYb9Lm", timestamp=1777393173.4, flat=True, **ENVELOPE, **RECEIVED
    )
    return {
        "raw-json": (ruby_json(raw), JSON),
        "raw-form": (form_encode(raw), FORM),
        "hash-json": (ruby_json(hashed), JSON),
        "hash-form": (form_encode(flat), FORM),  # Postal's own flattening
        "hash-form-nested": (form_encode(hashed), FORM),  # the simulator's generic flattening
    }


def test_the_fixtures_parse() -> None:
    raw = parse_inbound(RAW_FIXTURE, JSON, LIMIT)
    assert (raw.postal_id, raw.rcpt_to, raw.mail_from, raw.token) == (
        4821,
        "support@example.com",
        "jane@example.org",
        None,
    )
    assert (raw.format, raw.rebuilt, raw.spam_status) == ("raw", False, None)
    assert raw.message == STORED  # byte for byte, Postal's X-Postal-Spam and Received: headers included
    assert raw.message.startswith(b"X-Postal-Spam: no\r\n")

    hashed = parse_inbound(HASH_FIXTURE, JSON, LIMIT)
    assert (hashed.postal_id, hashed.token, hashed.format, hashed.rebuilt) == (4821, "p1ZqkR7vW3sYb9Lm", "hash", True)
    assert hashed.spam_status == "NotSpam"


def test_four_shapes_give_the_same_message_facts() -> None:
    parsed = {name: parse_inbound(body, ctype, LIMIT) for name, (body, ctype) in all_shapes().items()}
    for message in parsed.values():
        assert (message.postal_id, message.rcpt_to, message.mail_from) == (
            4821,
            "support@example.com",
            "jane@example.org",
        )
    assert parsed["raw-json"] == parsed["raw-form"]
    assert parsed["raw-json"].message.endswith(ORIGINAL)
    assert parsed["hash-json"] == parsed["hash-form"] == parsed["hash-form-nested"]

    original = parse_mime(ORIGINAL)
    for name in ("raw-json", "hash-json"):
        msg = parse_mime(parsed[name].message)
        for header in ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "In-Reply-To", "References"):
            assert str(msg[header]) == str(original[header]), (name, header)
        assert body_text(msg, "plain") == body_text(original, "plain")
        assert body_text(msg, "html") == body_text(original, "html")
        (attachment,) = msg.iter_attachments()
        assert attachment.get_filename() == "order-4411-note.txt"
        assert attachment.get_content_type() == "text/plain"
        assert attachment.get_payload(decode=True) == b"Order 4411: received size 42, expected size 43.\n"


def test_null_sender_and_plus_tags_survive() -> None:
    body = ruby_json(raw_payload(postal_id=9, rcpt_to="support+billing@example.com", mail_from="", message=ORIGINAL))
    message = parse_inbound(body, JSON, LIMIT)
    assert (message.mail_from, message.rcpt_to) == ("", "support+billing@example.com")


# --------------------------------------------------------------------------- the Hash rebuild


def test_hash_rebuild_is_a_complete_mime_message() -> None:
    message = parse_inbound(HASH_FIXTURE, JSON, LIMIT).message
    assert b"\n" not in message.replace(b"\r\n", b"")  # CRLF line endings throughout
    assert max(len(line) for line in message.split(b"\r\n")) <= 998
    message.decode("ascii")  # 7bit clean
    msg = parse_mime(message)
    assert msg[REBUILT_HEADER] == "postal-hash"
    assert msg["X-Postal-Spam"] == "no"
    assert msg["Message-ID"] == "<20260428161930.7f3c2a@mail.example.org>"
    assert msg["Reply-To"] == "Jane Doe <jane.doe+replies@example.org>"
    assert msg["In-Reply-To"] == "<b8d1e2c0-3f4a-4c61-9d1e-0a6f5c2e9b11@rp.postal.example.com>"
    assert msg.get_content_type() == "multipart/mixed"
    alternative = next(msg.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    assert body_text(msg, "html") == json.loads(HASH_FIXTURE)["html_body"]
    assert body_text(msg, "plain") == json.loads(HASH_FIXTURE)["plain_body"]
    assert not msg.defects and not any(part.defects for part in msg.walk())


def test_hash_rebuild_is_deterministic_for_a_retried_delivery() -> None:
    first = parse_inbound(HASH_FIXTURE, JSON, LIMIT)
    assert parse_inbound(HASH_FIXTURE, JSON, LIMIT).message == first.message
    other = parse_inbound(hash_json(token="another-token"), JSON, LIMIT)
    assert other.message != first.message  # boundaries follow the delivery, content is the same


def test_strip_replies_fixture_keeps_the_quoted_reply() -> None:
    message = parse_inbound(STRIP_FIXTURE, JSON, LIMIT)
    msg = parse_mime(message.message)
    assert msg.get_content_type() == "multipart/alternative"  # include_attachments was off
    plain = body_text(msg, "plain")
    assert plain == json.loads(HASH_FIXTURE)["plain_body"]  # plain + "\n\n" + replies = the unsplit text
    assert list(msg.iter_attachments()) == []


def test_hash_rebuild_keeps_non_ascii_and_encodes_it() -> None:
    payload = json.loads(HASH_FIXTURE)
    payload.update(
        subject="Größe 42 – falsch geliefert 💡",
        **{"from": "Jörg Müller <joerg@example.de>"},
        to='"Ünïcødé, Team" <support@example.com>',
        plain_body="Grüße aus Köln\nZeile zwei",
        html_body="<p>Grüße</p>",
        spam_status="Spam",
        attachments=[
            {
                "filename": "Rechnung-März.txt",
                "content_type": "text/plain",
                "size": 6,
                "data": encode64("März".encode()),
            }
        ],
    )
    message = parse_inbound(ruby_json(payload), JSON, LIMIT).message
    message.decode("ascii")  # every non-ASCII character was encoded
    msg = parse_mime(message)
    assert msg["Subject"] == "Größe 42 – falsch geliefert 💡"
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["To"].addresses[0].display_name == "Ünïcødé, Team"
    assert body_text(msg, "plain") == "Grüße aus Köln\nZeile zwei"
    assert body_text(msg, "html") == "<p>Grüße</p>"
    (attachment,) = msg.iter_attachments()
    assert attachment.get_filename() == "Rechnung-März.txt"
    assert attachment.get_payload(decode=True) == "März".encode()
    assert msg["X-Postal-Spam"] == "yes"


@pytest.mark.parametrize(
    ("overrides", "content_type", "check"),
    [
        ({"plain_body": None}, "multipart/mixed", lambda m: body_text(m, "plain") is None and body_text(m, "html")),
        ({"html_body": None}, "multipart/mixed", lambda m: body_text(m, "html") is None and body_text(m, "plain")),
        (
            {"html_body": None, "plain_body": None, "attachments": []},
            "text/plain",
            lambda m: m.get_content().strip() == "",
        ),
        ({"spam_status": "NotChecked"}, "multipart/mixed", lambda m: m["X-Postal-Spam"] is None),
        ({"message_id": None, "date": None}, "multipart/mixed", lambda m: m["Message-ID"] is None and m["Date"]),
        ({"reply_to": None, "cc": None}, "multipart/mixed", lambda m: m["Reply-To"] is None and m["Cc"] is None),
        (
            {"reply_to": ["a@example.org", "b@example.org"]},
            "multipart/mixed",
            lambda m: len(m["Reply-To"].addresses) == 2,
        ),
        ({"auto_submitted": "auto-replied"}, "multipart/mixed", lambda m: m["Auto-Submitted"] == "auto-replied"),
        ({"date": "yesterday-ish"}, "multipart/mixed", lambda m: m["Date"] == "yesterday-ish"),
        ({"message_id": "<already@bracketed>"}, "multipart/mixed", lambda m: m["Message-ID"] == "<already@bracketed>"),
        (
            {"attachments": [{"filename": None, "content_type": None, "size": 3, "data": encode64(b"abc")}]},
            "multipart/mixed",
            lambda m: (
                [(a.get_filename(), a.get_content_type()) for a in m.iter_attachments()]
                == [(None, "application/octet-stream")]
            ),
        ),
        (
            {
                "attachments": [
                    {"filename": "fwd.eml", "content_type": "message/rfc822", "size": 3, "data": encode64(b"abc")}
                ]
            },
            "multipart/mixed",
            lambda m: [a.get_payload(decode=True) for a in m.iter_attachments()] == [b"abc"],
        ),
    ],
)
def test_hash_rebuild_variants(overrides: dict[str, Any], content_type: str, check: Any) -> None:
    message = parse_inbound(hash_json(**overrides), JSON, LIMIT)
    msg = parse_mime(message.message)
    assert msg.get_content_type() == content_type
    assert msg[REBUILT_HEADER] == "postal-hash"
    assert check(msg)


@pytest.mark.parametrize(
    "hostile",
    [
        "Evil\r\nBcc: victim@example.org",
        '<<<>>>, @@@, ;;; "unterminated',
        "=?utf-8?b?broken",
        "\x00\x01\x7f" + "x" * 5000,
        "\ud800 lone surrogate",
        "a" * 2000 + "@" + "b" * 2000,
        "Jörg <jörg@exämple.de>",
        "(comment (nested) \\",
    ],
)
def test_hostile_header_values_never_break_the_rebuild(hostile: str) -> None:
    overrides = {name: hostile for name in ("from", "to", "cc", "subject", "date", "in_reply_to", "references")}
    overrides.update(message_id=hostile, reply_to=[hostile, hostile], auto_submitted=hostile)
    overrides["attachments"] = [{"filename": hostile, "content_type": hostile, "size": 1, "data": encode64(b"x")}]
    body = json.dumps({**json.loads(HASH_FIXTURE), **overrides}).encode()  # json.dumps keeps the lone surrogate
    message = parse_inbound(body, JSON, LIMIT).message
    msg = parse_mime(message)
    assert msg[REBUILT_HEADER] == "postal-hash"
    assert msg["Bcc"] is None  # no header injection
    assert b"\n" not in message.replace(b"\r\n", b"")


def test_huge_header_values_are_capped_and_cheap() -> None:
    """A sender controls these values; rebuilding must stay linear (the stdlib folder takes seconds)."""
    many = ", ".join(f"Jörg {i} <u{i}@exämple.com>" for i in range(5000))
    started = time.perf_counter()
    message = parse_inbound(hash_json(to=many, subject="ü" * 100_000, references="<a@b> " * 20_000), JSON, 10**7)
    assert time.perf_counter() - started < 2.0
    msg = parse_mime(message.message)
    assert msg["Subject"] == "ü" * MAX_HEADER_CHARS
    assert msg["To"].addresses[0].display_name == "Jörg 0"
    assert msg["To"].addresses[0].domain == "xn--exmple-cua.com"  # IDNA: the message stays 7-bit


# --------------------------------------------------------------------------- malformed input


def raw_json(**overrides: Any) -> bytes:
    payload = json.loads(RAW_FIXTURE)
    payload.update(overrides)
    return ruby_json({k: v for k, v in payload.items() if v is not _DROP})


_DROP = object()
GOOD_B64 = json.loads(RAW_FIXTURE)["message"]

MALFORMED: list[tuple[str, bytes, str]] = [
    ("text/plain", RAW_FIXTURE, "text/plain"),
    ("no content type", RAW_FIXTURE, ""),
    ("multipart", RAW_FIXTURE, "multipart/form-data; boundary=x"),
    ("truncated JSON", RAW_FIXTURE[:-1], JSON),
    ("empty body", b"", JSON),
    ("JSON array", b"[]", JSON),
    ("JSON string", b'"hello"', JSON),
    ("JSON null", b"null", JSON),
    ("not UTF-8", b'{"id":\xff}', JSON),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("NaN id", b'{"id":NaN,"rcpt_to":"a@b","mail_from":"","message":"QQ==","base64":true}', JSON),
    ("neither format", b'{"id":1,"rcpt_to":"a@b","mail_from":""}', JSON),
    ("both formats", raw_json(token="abc"), JSON),
    ("missing id", raw_json(id=_DROP), JSON),
    ("string id", raw_json(id="4821"), JSON),
    ("bool id", raw_json(id=True), JSON),
    ("float id", raw_json(id=4821.0), JSON),
    ("missing rcpt_to", raw_json(rcpt_to=_DROP), JSON),
    ("null rcpt_to", raw_json(rcpt_to=None), JSON),
    ("empty rcpt_to", raw_json(rcpt_to=""), JSON),
    ("int rcpt_to", raw_json(rcpt_to=5), JSON),
    ("list mail_from", raw_json(mail_from=["a"]), JSON),
    ("rcpt_to with CRLF", raw_json(rcpt_to="a@example.com\r\nBcc: x@example.com"), JSON),
    ("mail_from with NUL", raw_json(mail_from="a\u0000@example.com"), JSON),
    ("token with a lone surrogate", hash_json(token="abc").replace(b'"abc"', b'"ab\\ud800c"'), JSON),
    ("missing message", raw_json(message=_DROP, token=_DROP), JSON),
    ("int message", raw_json(message=5), JSON),
    ("null message", raw_json(message=None), JSON),
    ("empty message", raw_json(message=""), JSON),
    ("base64 false", raw_json(base64=False), JSON),
    ("base64 string", raw_json(base64="yes"), JSON),
    ("b64 with a space", raw_json(message=GOOD_B64[:10] + " " + GOOD_B64[10:]), JSON),
    ("b64 with a bang", raw_json(message="!" + GOOD_B64[1:]), JSON),
    ("b64 url-safe alphabet", raw_json(message="ab-_" * 4), JSON),
    ("b64 truncated quantum", raw_json(message="QUJ"), JSON),
    ("b64 padding in the middle", raw_json(message="QQ==QUJD"), JSON),
    ("b64 triple padding", raw_json(message="Q==="), JSON),
    ("b64 non-ASCII", raw_json(message="QUJDé==="), JSON),
    ("hash int token", hash_json(token=5), JSON),
    ("hash empty token", hash_json(token=""), JSON),
    ("hash int subject", hash_json(subject=5), JSON),
    ("hash string timestamp", hash_json(timestamp="now"), JSON),
    ("hash reply_to dict", hash_json(reply_to={"a": "b"}), JSON),
    ("hash reply_to of ints", hash_json(reply_to=[1, 2]), JSON),
    ("hash attachments dict", hash_json(attachments={"a": 1}), JSON),
    ("hash attachment not object", hash_json(attachments=["x"]), JSON),
    ("hash attachment no data", hash_json(attachments=[{"filename": "a", "content_type": "text/plain"}]), JSON),
    ("hash attachment bad data", hash_json(attachments=[{"filename": "a", "content_type": None, "data": "!!"}]), JSON),
    (
        "hash attachment int filename",
        hash_json(attachments=[{"filename": 1, "content_type": None, "data": "QQ=="}]),
        JSON,
    ),
    ("form non-numeric id", b"id=abc&rcpt_to=a%40b&mail_from=&message=QQ%3D%3D&base64=true", FORM),
    ("form missing id", b"rcpt_to=a%40b&mail_from=&message=QQ%3D%3D&base64=true", FORM),
    ("form nil id", b"id&rcpt_to=a%40b&mail_from=&message=QQ%3D%3D&base64=true", FORM),
    ("form duplicate rcpt_to", b"id=1&rcpt_to=a%40b&rcpt_to=c%40d&mail_from=&message=QQ%3D%3D", FORM),
    ("form nil message", b"id=1&rcpt_to=a%40b&mail_from=&message&base64=true", FORM),
    ("form + in base64", b"id=1&rcpt_to=a%40b&mail_from=&message=ab+c&base64=true", FORM),
    ("form bad escape", b"id=1&rcpt_to=a%40b&mail_from=&message=QQ%ZZ&base64=true", FORM),
    ("form bad flag", b"id=1&rcpt_to=a%40b&mail_from=&message=QQ%3D%3D&base64=maybe", FORM),
    ("form bad utf-8 name", b"id=1&rcpt_to=a%40b&%FF=1&mail_from=&message=QQ%3D%3D", FORM),
    ("form bad utf-8 value", b"id=1&rcpt_to=%FF&mail_from=&message=QQ%3D%3D", FORM),
    ("form odd attachment key", b"id=1&token=t&rcpt_to=a%40b&mail_from=&attachments%5Bx%5D=1", FORM),
    ("form attachment without data", b"id=1&token=t&rcpt_to=a%40b&mail_from=&attachments%5B0%5D%5Bfilename%5D=a", FORM),
    ("form bad timestamp", b"id=1&token=t&rcpt_to=a%40b&mail_from=&timestamp=soon", FORM),
    ("garbage", bytes(range(256)), FORM),
]


@pytest.mark.parametrize(("body", "content_type"), [(b, c) for _, b, c in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_payloads_are_payload_errors(body: bytes, content_type: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_inbound(body, content_type, LIMIT)
    assert type(caught.value) is PayloadError
    message = str(caught.value)
    assert len(message) < 80 and "\n" not in message
    assert "jane" not in message and "QQ" not in message  # never echoes the payload


def test_random_corruptions_only_ever_raise_payload_errors() -> None:
    rng = random.Random(4821)
    bodies = [
        (RAW_FIXTURE, JSON),
        (HASH_FIXTURE, JSON),
        (STRIP_FIXTURE, JSON),
        *((body, ctype) for body, ctype in all_shapes().values() if ctype == FORM),
    ]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(800):
        body, ctype = rng.choice(bodies)
        mutable = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(mutable))
            action = rng.random()
            if action < 0.5:
                mutable[position] = rng.randrange(256)
            elif action < 0.75:
                del mutable[position : position + rng.randint(1, 40)]
            else:
                mutable[position:position] = rng.choice([b"\\u0000", b"%", b"&", b"=", b'"', b"\\ud800", b"[", b"}"])
        try:
            result = parse_inbound(bytes(mutable), ctype, LIMIT)
        except PayloadError:
            outcomes["error"] += 1
        else:
            assert isinstance(result, InboundMessage) and result.message
            outcomes["ok"] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 50  # both paths were really exercised


# --------------------------------------------------------------------------- base64 and limits


def test_base64_as_ruby_writes_it_and_without_newlines() -> None:
    data = bytes(range(256)) * 3
    assert decode_base64(encode64(data), field="x") == data
    assert decode_base64(encode64(data).replace("\n", ""), field="x") == data
    assert decode_base64(encode64(data).replace("\n", "\r\n"), field="x") == data
    assert decode_base64(encode64(data).encode(), field="x") == data
    assert decode_base64("", field="x") == b""


def test_oversize_messages_are_refused_before_decoding() -> None:
    decoded_size = len(STORED)
    assert parse_inbound(RAW_FIXTURE, JSON, decoded_size).message == STORED  # exactly at the limit
    with pytest.raises(MessageTooLarge):
        parse_inbound(RAW_FIXTURE, JSON, decoded_size - 1)
    form = form_encode(json.loads(RAW_FIXTURE))
    with pytest.raises(MessageTooLarge):
        parse_inbound(form, FORM, decoded_size - 1)


def test_oversize_hash_payloads_are_refused() -> None:
    big = encode64(b"\0" * 50_000)
    with pytest.raises(MessageTooLarge):
        parse_inbound(
            hash_json(attachments=[{"filename": "a", "content_type": None, "size": 1, "data": big}]), JSON, 40_000
        )
    with pytest.raises(MessageTooLarge):
        parse_inbound(hash_json(plain_body="x" * 50_000), JSON, 40_000)
    assert parse_inbound(hash_json(plain_body="x" * 50_000), JSON, 100_000).message


@pytest.mark.parametrize("encoding", ["json", "form"])
def test_peak_memory_stays_near_twice_the_body(encoding: str) -> None:
    message = new_message(attachments=[("blob.bin", "application/octet-stream", random.Random(1).randbytes(3_000_000))])
    payload = raw_payload(postal_id=1, rcpt_to="a@example.com", mail_from="", message=message)
    body, ctype = (ruby_json(payload), JSON) if encoding == "json" else (form_encode(payload), FORM)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        parsed = parse_inbound(body, ctype, 10_000_000)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert parsed.message.endswith(message)
    assert peak < 2.3 * len(body), f"peak {peak / len(body):.2f}x the body"


# --------------------------------------------------------------------------- delivery keys


def test_delivery_keys() -> None:
    raw = parse_inbound(RAW_FIXTURE, JSON, LIMIT)
    hashed = parse_inbound(HASH_FIXTURE, JSON, LIMIT)
    # A retried identical delivery has the same key; the key carries no address or token in clear.
    assert parse_inbound(RAW_FIXTURE, JSON, LIMIT).delivery_key(KID_A) == raw.delivery_key(KID_A)
    assert parse_inbound(HASH_FIXTURE, JSON, LIMIT).delivery_key(KID_A) == hashed.delivery_key(KID_A)
    assert "support" not in raw.delivery_key(KID_A) and "p1Zq" not in hashed.delivery_key(KID_A)

    def raw_key(**overrides: Any) -> str:
        payload = raw_payload(**{**ENVELOPE, "message": ORIGINAL, **RECEIVED, **overrides})
        return parse_inbound(ruby_json(payload), JSON, LIMIT).delivery_key(KID_A)

    def hash_key(kid: str = KID_A, **overrides: Any) -> str:
        return parse_inbound(hash_json(**overrides), JSON, LIMIT).delivery_key(kid)

    raw_keys = {
        raw.delivery_key(KID_A),
        raw.delivery_key(KID_B),  # another Postal install
        raw_key(postal_id=4822),  # ids are per Postal mail server
        raw_key(rcpt_to="sales@example.com"),
        raw_key(message=ORIGINAL + b"\r\n"),  # same id, different bytes
    }
    assert len(raw_keys) == 5
    hash_keys = {hash_key(), hash_key(KID_B), hash_key(id=4822), hash_key(token="other-token")}
    assert len(hash_keys) == 4
    assert hash_key(subject="changed by an admin retry") == hash_key()  # Hash: (server, id, token) only
    assert not raw_keys & hash_keys


CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "mime"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared real-world MIME corpus is not on this machine")
def test_real_world_mail_survives_the_hash_format() -> None:
    """Every corpus message, as Postal's Hash would carry it, rebuilds into a parseable message (both encodings)."""
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name not in ("INDEX.tsv", "SOURCES.md"))
    assert len(files) > 100
    for number, path in enumerate(files):
        payload = hash_payload(
            postal_id=number, token=f"t{number}", rcpt_to="a@example.com", mail_from="", message=path.read_bytes()
        )
        from_json = parse_inbound(ruby_json(payload), JSON, 50_000_000)
        assert from_json == parse_inbound(form_encode(payload), FORM, 50_000_000), path.name
        msg = parse_mime(from_json.message)
        assert msg[REBUILT_HEADER] == "postal-hash", path.name
        assert len(list(msg.iter_attachments())) <= payload["attachment_quantity"], path.name


# --------------------------------------------------------------------------- attachment names


@pytest.mark.parametrize(
    "filename",
    [
        "plain.txt",
        'quote " and back\\slash.txt',
        "Grüße aus Köln — Übersicht.pdf",
        "x" * 300 + ".bin",
        "日本語のファイル名" * 30 + ".txt",
        "%41 not an escape; name=ugly.txt",
    ],
)
def test_attachment_names_survive_the_rebuild_with_short_lines(filename: str) -> None:
    attachments = [{"filename": filename, "content_type": "text/plain", "size": 2, "data": encode64(b"hi")}]
    message = parse_inbound(hash_json(attachments=attachments), JSON, LIMIT).message
    assert max(len(line) for line in message.split(b"\r\n")) <= 78
    (part,) = parse_mime(message).iter_attachments()
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == b"hi"
    assert not any(p.defects for p in parse_mime(message).walk())
