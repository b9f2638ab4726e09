"""Property-based tests of ``POST /postal/inbound``: whatever arrives, the answer is deliberate.

Generated requests, in both encodings (BodyAsJSON, FormData) and both formats (RawMessage, Hash):

* validly signed payloads built by the Postal simulator from generated messages (header counts,
  encodings, multipart structure, DKIM-Signature headers), then mutated: fields dropped, retyped or
  added, base64 corrupted, attachments scrambled, the encoded body itself bit-flipped before signing;
* validly signed random bytes under any content type;
* unsigned, wrongly signed and tampered requests.

Properties: never 500 or 503 (Redis and the store are up), never a traceback or a source path in
the body, a refused request (>= 400) stores no object and queues nothing for filing, a bad
signature is always 401, and the app answers ``/healthz`` afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import DOMAIN
from tests.fuzzing import Blob, assert_deliberate, cases, header_safe, store_root
from tests.postal_sim import PostalSigner, form_encode, hash_payload, new_message, raw_payload, ruby_json

pytestmark = pytest.mark.fuzz
log = logging.getLogger(__name__)

UNFILED = "bridge:inbound:unfiled"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
OWNER = f"support@{DOMAIN}"
STRANGER = PostalSigner(1024)  # a key the bridge does not trust


@pytest.fixture(scope="module")
def postal_signer() -> PostalSigner:
    """Postal's key for this module: 1024 bits (Postal allows them), so signing thousands is cheap."""
    return PostalSigner(1024)


# --- messages ------------------------------------------------------------------------------------

HEADER_NAMES = [
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "DKIM-Signature",
    "Received",
    "Return-Path",
    "Auto-Submitted",
    "X-Postal-Spam",
    "X-Mailer",
]
SAMPLE_VALUES = [
    "Jane <jane@example.org>",
    "a@b.test, c@d.test",
    "=?UTF-8?B?4pyTIMOgIGxhIG1vZGU=?= <x@example.org>",
    "=?bogus?Q?=ZZ?=",
    "<>",
    "",
    "multipart/mixed; boundary=b1",
    'multipart/alternative; boundary="b2"',
    "text/plain; charset=x-unknown",
    "message/rfc822",
    "base64",
    "quoted-printable",
    "v=1; a=rsa-sha256; d=sender.test; s=sel; h=to; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; d=nowhere.invalid; s=x; h=from:to; bh=; b=",
    "from x (y [192.0.2.1]) by mx with SMTP; Tue, 28 Apr 2026 16:19:33 -0000",
    "from x (y [not-an-ip]) by mx",
    "Tue, 28 Apr 2026 18:19:30 +0200",
    "(comment) <a@b> (more",
]
# Characters the generated text is made of: ASCII, Latin-1, other scripts, controls, a lone surrogate.
PALETTE = "abcXYZ019 @<>,;:.\"'()[]=?-_+/\t\x00\x7f\x1b\u00e9\u00ff\u20ac\u2028\u4e2d\U0001f600\ud800"


def random_text(rnd: random.Random, limit: int = 60) -> str:
    return "".join(rnd.choice(PALETTE) for _ in range(rnd.randrange(limit + 1)))


def random_json(rnd: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type (no NaN: Postal never sends one, and ruby_json writes null for it)."""
    kind = rnd.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice([0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**70), rnd.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rnd.choice([0.0, -0.0, 1.5, 1e308, 5e-324, 2.0**53, rnd.uniform(-1e9, 1e9)])
    if kind in (4, 5):
        return random_text(rnd, 40).encode("utf-8", "replace").decode("utf-8")  # no lone surrogates in JSON
    if kind in (6, 7):
        return [random_json(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {random_text(rnd, 8): random_json(rnd, depth + 1) for _ in range(rnd.randrange(4))}


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Something between a plausible message and MIME garbage (bulk content from a seeded Random)."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    if draw(st.booleans()):
        attachments = [
            (
                rnd.choice(["a.pdf", "r\u00e9sum\u00e9.doc", "x" * 200, " ", "=?utf-8?q?x?="]),
                rnd.choice(["application/pdf", "image/png", "text/csv", "application/octet-stream"]),
                rnd.randbytes(rnd.randrange(300)),
            )
            for _ in range(rnd.randrange(4))
        ]
        text = random_text(rnd, 400)
        html = random_text(rnd, 200) if rnd.random() < 0.5 else None
        sender = rnd.choice(["Jane <jane@example.org>", "x@sender.test", "Weird <@>", "a@b", random_text(rnd, 30)])
        state = random.getstate()
        random.seed(0)  # the stdlib draws MIME boundaries from `random`: keep examples reproducible
        try:
            subject = header_safe(random_text(rnd)) or "s"
            return new_message(subject=subject, sender=sender, text=text, html=html, attachments=attachments)
        except Exception:  # the stdlib refuses some generated headers: take the garbage branch instead
            log.debug("new_message refused a generated header")
        finally:
            random.setstate(state)
    headers = []
    for _ in range(rnd.randrange(26)):
        name = rnd.choice(HEADER_NAMES) if rnd.random() < 0.9 else random_text(rnd, 20).replace(":", "")
        value = rnd.choice(SAMPLE_VALUES) if rnd.random() < 0.6 else random_text(rnd, 80)
        headers.append((name, value))
    if draw(st.booleans()):  # many copies of one header: counts the bridge must bound or tolerate
        name = rnd.choice(["From", "DKIM-Signature", "Received", "To", "X-Junk"])
        copies = [(name, rnd.choice(SAMPLE_VALUES))] * rnd.choice([2, 50, 200])
        headers = copies + headers if rnd.random() < 0.5 else headers + copies
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    head = "".join(f"{name}: {value}{eol}" for name, value in headers)
    body = rnd.randbytes(rnd.randrange(600))
    if rnd.random() < 0.5:
        boundary = rnd.choice(["b1", "b2", "", "--"])
        body = (f"--{boundary}{eol}Content-Type: text/plain{eol}{eol}hi{eol}--{boundary}".encode() + body)[:800]
    encoding = rnd.choice(["utf-8", "latin-1"])
    return head.encode(encoding, errors="replace") + eol.encode() + body


SIMPLE = b"From: Jane <jane@example.org>\r\nTo: support@mail.example.test\r\nSubject: hi\r\n\r\nhello\r\n"

# --- payloads ------------------------------------------------------------------------------------


def corrupt_base64(text: str, how: str, rnd: random.Random) -> str:
    if how == "truncate":
        return text[: rnd.randrange(len(text) + 1)]
    if how == "bad_char":
        at = rnd.randrange(len(text) + 1)
        return text[:at] + rnd.choice("*!%$ \t\u00e9\u0000-_") + text[at:]
    if how == "no_padding":
        return text.replace("=", "")
    if how == "extra_padding":
        return text + "=" * rnd.randrange(1, 5)
    if how == "urlsafe":
        return text.replace("+", "-").replace("/", "_")
    if how == "no_newlines":
        return text.replace("\n", "")
    if how == "crlf":
        return text.replace("\n", "\r\n")
    if how == "double":
        return base64.b64encode(text.encode()).decode()
    return ""


RAW_KEYS = ["id", "rcpt_to", "mail_from", "message", "base64", "size"]
HASH_KEYS = [
    "id",
    "rcpt_to",
    "mail_from",
    "token",
    "subject",
    "message_id",
    "timestamp",
    "size",
    "spam_status",
    "bounce",
    "received_with_ssl",
    "to",
    "cc",
    "from",
    "date",
    "in_reply_to",
    "references",
    "html_body",
    "plain_body",
    "attachment_quantity",
    "auto_submitted",
    "reply_to",
    "attachments",
]
BASE64_DAMAGE = ["truncate", "bad_char", "no_padding", "extra_padding", "urlsafe", "no_newlines", "crlf", "double"]
ENVELOPE_VALUES = [
    "",
    "support",
    f"SUPPORT+x@{DOMAIN.upper()}",
    f"support@{DOMAIN}\x00",
    f"../support@{DOMAIN}",
    "a@b@c",
    f"support@{DOMAIN}\n",
    f"support@{DOMAIN}\ud800",
]
ODD_IDS = [0, -1, 2**63, 2**64 + 1, 1.5, "12", "", True, None, float(2**53), [1], {"id": 1}]
MUTATIONS = ["drop", "retype", "extra", "base64", "attachments", "envelope", "id"]


def random_attachment(rnd: random.Random) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for key, odd in (
        ("filename", None),
        ("content_type", ["text/plain", "multipart/x", "/", "", "message/rfc822"]),
        ("size", None),
        ("data", ["", "AAAA\n", "////\n", "=\n", encode64_text(rnd.randbytes(40))]),
    ):
        if rnd.random() < 0.8:
            item[key] = rnd.choice(odd) if odd and rnd.random() < 0.6 else random_json(rnd)
    return item


def encode64_text(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "".join(encoded[i : i + 60] + "\n" for i in range(0, len(encoded), 60))


@st.composite
def mutations(draw: st.DrawFn, payload: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """0-3 damages: the kinds are drawn (so failures shrink to the damage that matters), values seeded."""
    payload = dict(payload)
    rnd = random.Random(draw(st.integers(0, 2**32)))
    # Two in five payloads go out undamaged, so that generated messages reach sealing and filing too.
    kinds = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)) if draw(st.integers(0, 4)) >= 2 else []
    for kind in kinds:
        if kind == "drop" and payload:
            payload.pop(rnd.choice(sorted(payload)), None)
        elif kind == "retype":
            payload[rnd.choice(keys)] = random_json(rnd)
        elif kind == "extra":
            payload[random_text(rnd, 12).encode("utf-8", "replace").decode()] = random_json(rnd)
        elif kind == "base64":
            how = rnd.choice(BASE64_DAMAGE)
            if isinstance(payload.get("message"), str):
                payload["message"] = corrupt_base64(payload["message"], how, rnd)
            attachments = payload.get("attachments")
            if isinstance(attachments, list) and attachments and isinstance(attachments[0], dict):
                first = dict(attachments[0])
                if isinstance(first.get("data"), str):
                    first["data"] = corrupt_base64(first["data"], how, rnd)
                payload["attachments"] = [first, *attachments[1:]]
        elif kind == "attachments":
            if rnd.random() < 0.2:
                payload["attachments"] = random_json(rnd)
            else:
                payload["attachments"] = [random_attachment(rnd) for _ in range(rnd.choice([0, 1, 2, 5, 300]))]
        elif kind == "envelope":
            field = rnd.choice(["rcpt_to", "mail_from", "token"])
            payload[field] = rnd.choice(ENVELOPE_VALUES) if rnd.random() < 0.6 else random_text(rnd, 40)
        elif kind == "id":
            payload["id"] = rnd.choice(ODD_IDS) if rnd.random() < 0.7 else rnd.randrange(-(2**80), 2**80)
    return payload


@st.composite
def postal_payloads(draw: st.DrawFn, fmt: str) -> dict[str, Any]:
    message = draw(messages())
    postal_id = draw(st.integers(1, 2**31))
    rcpt = draw(st.sampled_from([OWNER, OWNER, f"nobody@{DOMAIN}", f"Support+tag@{DOMAIN}"]))
    mail_from = draw(st.sampled_from(["jane@example.org", "", "bounce@sender.test"]))
    if fmt == "RawMessage":
        payload = raw_payload(
            postal_id=postal_id, rcpt_to=rcpt, mail_from=mail_from, message=message, spam=draw(st.booleans())
        )
        keys = RAW_KEYS
    else:
        try:
            payload = hash_payload(
                postal_id=postal_id,
                token=draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=16)),
                rcpt_to=rcpt,
                mail_from=mail_from,
                message=message,
                strip_replies=draw(st.booleans()),
                flat=draw(st.booleans()),
                include_attachments=draw(st.booleans()),
                timestamp=draw(st.sampled_from([1777400000.0, 1777400000.123456, 0.0])),  # not the clock: replayable
            )
        except Exception:  # the simulator's own MIME reader refused the garbage: send the bare minimum
            payload = {"id": postal_id, "rcpt_to": rcpt, "mail_from": mail_from, "token": "t0k3n"}
        keys = HASH_KEYS
    return draw(mutations(payload, keys))


def encode(payload: dict[str, Any], encoding: str, style: int) -> bytes:
    """The payload as Postal would encode it; values Postal could not encode (lone surrogates) go out raw."""
    if encoding == "FormData":
        try:
            return form_encode(payload)
        except (TypeError, ValueError):
            return form_encode({k: json.dumps(v) for k, v in payload.items()})
    try:
        if style == 0:
            return ruby_json(payload)
        if style == 1:
            return json.dumps(payload).encode()  # ensure_ascii: \\u escapes everywhere
    except (TypeError, ValueError):
        pass
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


@st.composite
def byte_edits(draw: st.DrawFn, body: bytes) -> bytes:
    """Flip, insert or delete a few bytes of an encoded body (it is signed afterwards)."""
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif edit == "cut":
            del data[at:]
    return bytes(data)


content_types = st.one_of(
    st.sampled_from(
        [
            JSON,
            FORM,
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/x-www-form-urlencoded; charset=ISO-8859-1",
            "multipart/form-data; boundary=xyz",
            "text/plain",
            "",
            "application/json;;;",
        ]
    ),
    st.text(max_size=30).map(header_safe),
)


@st.composite
def signed_requests(draw: st.DrawFn, fmt: str) -> tuple[bytes, dict[str, str]]:
    encoding = draw(st.sampled_from(["BodyAsJSON", "FormData"]))
    body = encode(draw(postal_payloads(fmt)), encoding, draw(st.integers(0, 2)))
    if draw(st.integers(0, 4)) == 0:
        body = draw(byte_edits(body))
    content_type = JSON if encoding == "BodyAsJSON" else FORM
    if draw(st.integers(0, 5)) == 0:
        content_type = draw(content_types)
    return Blob(body), sign(body, content_type, draw(st.sampled_from(["both", "sha256", "sha1"])))


def sign(body: bytes, content_type: str, which: str, signer: PostalSigner | None = None) -> dict[str, str]:
    options = {"both": {}, "sha256": {"sha1": False}, "sha1": {"sha256": False, "kid": False}}[which]
    headers = (signer or SIGNER[0]).sign_headers(body, **options)
    return {**headers, "Content-Type": content_type}


SIGNER: list[PostalSigner] = []


# --- the checks ----------------------------------------------------------------------------------


class Endpoint:
    """Posts to the app and checks the properties of every answer."""

    def __init__(self, client: Any, storage_url: str, redis_url: str) -> None:
        self.client = client
        self.root = store_root(storage_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.statuses: dict[int, int] = {}
        self.stored = 0

    def objects(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.root))

    def post(self, body: bytes, headers: dict[str, str], *, allowed: set[int] | None = None) -> int:
        before = self.objects()
        # A stream, not data=: the test client would re-encode a body it takes for a form.
        response = self.client.post("/postal/inbound", input_stream=io.BytesIO(body), headers=headers)
        data = response.get_data()
        assert_deliberate(response.status_code, data, allowed=allowed)
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        if response.status_code >= 400:
            assert self.objects() == before, f"{response.status_code} {data[:200]!r} but an object was stored"
        else:
            assert data in (b"stored\n", b"duplicate\n"), data[:200]
            self.stored += data == b"stored\n"
            assert self.objects() == before + (data == b"stored\n"), "one object per stored delivery, none else"
        return response.status_code

    def nothing_else_queued(self) -> None:
        """Only stored deliveries wait for filing: a refused one never reached the queue."""
        assert self.redis.zcard(UNFILED) == self.stored, (self.redis.zcard(UNFILED), self.stored)

    def still_answers(self) -> None:
        health = self.client.get("/healthz")
        assert health.status_code == 200, health.get_data()[:200]


@pytest.fixture
def endpoint(client: Any, owner: Any, settings: Any, redis_url: str, postal_signer: PostalSigner) -> Iterator[Endpoint]:
    SIGNER[:] = [postal_signer]
    checker = Endpoint(client, settings.storage_url, redis_url)
    yield checker
    checker.still_answers()
    checker.nothing_else_queued()
    SIGNER.clear()


DELIVERY = {200, 400, 404, 413}  # stored/duplicate, malformed, unknown mailbox, too large


@pytest.mark.parametrize("fmt", ["RawMessage", "Hash"])
def test_signed_structured_garbage_gets_a_deliberate_answer(endpoint: Endpoint, fmt: str) -> None:
    @settings(max_examples=cases(1200))
    @given(request=signed_requests(fmt))
    def check(request: tuple[bytes, dict[str, str]]) -> None:
        endpoint.post(*request, allowed=DELIVERY)

    check()
    assert sum(endpoint.statuses.values()) >= cases(1200) * 9 // 10  # the cases really ran
    # The generator must reach past the signature and the parser: some stored, some refused as malformed.
    assert endpoint.statuses.get(200, 0) > 0 and endpoint.statuses.get(400, 0) > 0, endpoint.statuses


deep_bodies = st.builds(
    lambda opening, depth, closed: Blob(opening * depth + (b"]" * depth if closed else b"")),
    st.sampled_from([b"[", b'{"message":', b'{"id":1,"token":"t","attachments":[']),
    st.sampled_from([100, 1000, 30000]),
    st.booleans(),
)


@settings(max_examples=cases(3000))
@given(
    body=st.one_of(st.binary(max_size=2000), deep_bodies),
    content_type=content_types,
    which=st.sampled_from(["both", "sha256", "sha1"]),
)
def test_signed_random_bytes_are_refused_as_malformed(
    endpoint: Endpoint, body: bytes, content_type: str, which: str
) -> None:
    endpoint.post(body, sign(body, content_type, which), allowed={400})


@st.composite
def bad_signatures(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    # The signature is checked before anything parses the body: the body's shape does not matter here,
    # so it is a valid delivery (which a good signature would store) or random bytes.
    encoding = draw(st.sampled_from(["BodyAsJSON", "FormData"]))
    content_type = JSON if encoding == "BodyAsJSON" else FORM
    if draw(st.booleans()):
        payload = raw_payload(
            postal_id=draw(st.integers(1, 2**31)), rcpt_to=OWNER, mail_from="jane@example.org", message=SIMPLE
        )
        body = encode(payload, encoding, 0)
    else:
        body = draw(st.binary(max_size=500))
    how = draw(st.sampled_from(["none", "stranger", "tampered", "garbage", "swapped", "truncated", "kid_only"]))
    good = sign(body, content_type, "both")
    if how == "none":
        headers = {"Content-Type": content_type}
    elif how == "stranger":
        headers = sign(body, content_type, draw(st.sampled_from(["both", "sha256", "sha1"])), STRANGER)
    elif how == "tampered":  # signed, then changed in transit
        headers = good
        tampered = draw(byte_edits(body))
        body = tampered if tampered != body else body + b" "
    elif how == "garbage":
        headers = {
            "Content-Type": content_type,
            draw(st.sampled_from(["X-Postal-Signature", "X-Postal-Signature-256"])): header_safe(
                draw(st.text(max_size=400))
            ),
        }
        if draw(st.booleans()):
            headers["X-Postal-Signature-KID"] = good["X-Postal-Signature-KID"]
    elif how == "swapped":  # the SHA-1 signature where the SHA-256 one belongs and the other way round
        headers = {
            "Content-Type": content_type,
            "X-Postal-Signature": good["X-Postal-Signature-256"],
            "X-Postal-Signature-256": good["X-Postal-Signature"],
        }
    elif how == "truncated":
        name = draw(st.sampled_from(["X-Postal-Signature", "X-Postal-Signature-256"]))
        value = good[name]
        headers = {"Content-Type": content_type, name: value[: draw(st.integers(0, len(value) - 1))]}
    else:
        headers = {"Content-Type": content_type, "X-Postal-Signature-KID": good["X-Postal-Signature-KID"]}
    return Blob(body), headers


@settings(max_examples=cases(2500))
@given(request=bad_signatures())
def test_unsigned_or_badly_signed_is_401_and_stores_nothing(
    endpoint: Endpoint, request: tuple[bytes, dict[str, str]]
) -> None:
    endpoint.post(*request, allowed={401})


def test_the_fuzz_root_is_the_store_the_app_writes(endpoint: Endpoint, postal_signer: PostalSigner) -> None:
    """The object count the properties rely on does see a stored delivery (else they prove nothing)."""
    body = ruby_json(raw_payload(postal_id=1, rcpt_to=OWNER, mail_from="jane@example.org", message=SIMPLE))
    before = endpoint.objects()
    assert endpoint.post(body, sign(body, JSON, "both")) == 200
    assert endpoint.objects() == before + 1
    assert Path(endpoint.root).is_dir()
