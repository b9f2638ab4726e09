"""A Postal simulator for the test suite: what Postal 3.3.6 would put on the wire, byte for byte.

Postal itself cannot run here (its Ruby gems are out of reach), so this module reproduces, from postal.md and
Postal's source, everything the bridge sees of it: Rails' ``to_json`` (HTML-safe escapes, Ruby floats, key
order), Ruby's ``Base64.encode64`` (a newline every 60 characters), ``URI.encode_www_form`` for FormData,
the headers Postal prepends to a stored message, the three signature headers, and the retry rules
(2xx sent, 5xx/timeout/connection/TLS retried 18 times at 5 min x 1.3^n, 429 dropped, other 3xx/4xx
bounced). tests/test_postal_sim.py proves it against the captured fixtures.

It must never be imported by the service, and it keeps its private keys in memory only.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import hashlib
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote_from_bytes

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

POSTAL_VERSION = "3.3.6"
RETRY_BASE_SECONDS = 5 * 60  # HasLocking#calculate_retry_time: (1.3 ** attempts) * 5.minutes
RETRY_FACTOR = 1.3
MAX_DELIVERY_ATTEMPTS = 18  # postal.default_maximum_delivery_attempts

# ----------------------------------------------------------------------------------------- signing


class PostalSigner:
    """Postal's signing key (``postal.signing_key_path``): a throw-away RSA key generated in memory."""

    def __init__(self, bits: int = 2048) -> None:
        if bits not in (1024, 2048, 3072, 4096):
            raise ValueError("Postal keys are 1024 or 2048 bits (3072/4096 allowed for tests)")
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.public_key = self.private_key.public_key()
        der = self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        self.kid: str = hashlib.sha256(der).hexdigest()  # ruby-jwt's key_digest KID

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def dns_p_value(self) -> str:
        """The ``p=`` of ``postal._domainkey.<return-path domain>``: base64 DER SubjectPublicKeyInfo."""
        der = self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode("ascii")

    def dkim_record(self) -> str:
        return f"v=DKIM1; t=s; h=sha256; p={self.dns_p_value()};"

    def jwk(self) -> dict[str, str]:
        numbers = self.public_key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
        }

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """What ``GET /.well-known/jwks.json`` answers."""
        return {"keys": [self.jwk()]}

    def sign(self, body: bytes, *, sha256: bool = True) -> str:
        algorithm = hashes.SHA256() if sha256 else hashes.SHA1()  # noqa: S303 - Postal's legacy header
        return base64.b64encode(self.private_key.sign(body, padding.PKCS1v15(), algorithm)).decode("ascii")

    def sign_headers(self, body: bytes, *, sha256: bool = True, sha1: bool = True, kid: bool = True) -> dict[str, str]:
        """The signature headers, in the order Postal::HTTP adds them (strict base64, no newlines)."""
        headers: dict[str, str] = {}
        if kid:
            headers["X-Postal-Signature-KID"] = self.kid
        if sha1:
            headers["X-Postal-Signature"] = self.sign(body, sha256=False)
        if sha256:
            headers["X-Postal-Signature-256"] = self.sign(body, sha256=True)
        return headers


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# ----------------------------------------------------------------------------------------- Ruby encodings


def encode64(data: bytes) -> str:
    """Ruby's ``Base64.encode64`` (``pack("m")``): 60 characters per line, every line ending in a newline."""
    encoded = base64.b64encode(data).decode("ascii")
    return "".join(encoded[i : i + 60] + "\n" for i in range(0, len(encoded), 60))


def ruby_float(value: float) -> str:
    """``Float#to_s``: shortest round-trip digits like Python, but ``1.0e+16`` where Python says ``1e+16``.

    Both switch to exponent form at the same thresholds (decimal exponent < -4 or >= 16).
    """
    text = repr(float(value))
    if "e" in text:
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{exponent}"
    return text


_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    # ActiveSupport (escape_html_entities_in_json) and its JS line separators:
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_ESCAPE = re.compile('[\\x00-\\x1f"\\\\<>&\u2028\u2029]')


def _json_string(text: str) -> str:
    return '"' + _JSON_ESCAPE.sub(lambda m: _JSON_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text) + '"'


def _json_parts(obj: Any) -> Iterator[str]:
    if obj is None:
        yield "null"
    elif obj is True:
        yield "true"
    elif obj is False:
        yield "false"
    elif isinstance(obj, int):
        yield str(obj)
    elif isinstance(obj, float):
        yield ruby_float(obj) if math.isfinite(obj) else "null"  # ActiveSupport: Float#as_json
    elif isinstance(obj, str):
        yield _json_string(obj)
    elif isinstance(obj, dict):
        yield "{"
        for i, (key, value) in enumerate(obj.items()):
            if i:
                yield ","
            yield _json_string(str(key))
            yield ":"
            yield from _json_parts(value)
        yield "}"
    elif isinstance(obj, list | tuple):
        yield "["
        for i, value in enumerate(obj):
            if i:
                yield ","
            yield from _json_parts(value)
        yield "]"
    else:
        raise TypeError(f"ruby_json cannot encode {type(obj).__name__}")


def ruby_json(obj: Any) -> bytes:
    """Exactly what Postal's ``hash.to_json`` (Rails' JSON encoder over the json gem) writes.

    No spaces, key order kept, non-ASCII as raw UTF-8, ``<``/``>``/``&``/U+2028/U+2029 as ``\\uXXXX``,
    other control characters as ``\\u00xx`` (lower-case hex) or their short forms, floats as Ruby prints them.
    """
    return "".join(_json_parts(obj)).encode("utf-8")


_BASE64_TEXT = re.compile(r"[A-Za-z0-9*._+/=\n-]*")


def _form_component(value: Any) -> str:
    """``URI.encode_www_form_component`` of ``value.to_s``: only ``*-._`` and alphanumerics stay, space is +."""
    if value is True:
        text = "true"
    elif value is False:
        text = "false"
    elif isinstance(value, float):
        text = ruby_float(value)
    else:
        text = str(value)
    if _BASE64_TEXT.fullmatch(text):  # fast path for big base64 values: urllib quotes byte by byte
        return text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D").replace("\n", "%0A")
    # urllib always keeps "~" (Ruby does not) and writes space as %20 (Ruby: +); both are unambiguous to fix.
    return quote_from_bytes(text.encode("utf-8"), safe="*").replace("~", "%7E").replace("%20", "+")


def _flatten(payload: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Nested values to Postal's flat keys: ``attachments[0][filename]``; arrays of scalars stay arrays."""
    for key, value in payload.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                yield f"{key}[{sub_key}]", sub_value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                for sub_key, sub_value in item.items():
                    yield f"{key}[{index}][{sub_key}]", sub_value
        else:
            yield str(key), value


def form_encode(payload: dict[str, Any]) -> bytes:
    """A FormData body as Net::HTTP#set_form_data (``URI.encode_www_form``) writes it.

    nil is the bare key (no ``=``), an array repeats its key (an empty array leaves an empty segment,
    ``a=1&&b=2``, as Ruby does), everything else is ``to_s``.
    """
    segments = []
    for key, value in _flatten(payload):
        name = _form_component(key)
        if value is None:
            segments.append(name)
        elif isinstance(value, list | tuple):
            segments.append("&".join(name if v is None else f"{name}={_form_component(v)}" for v in value))
        else:
            segments.append(f"{name}={_form_component(value)}")
    return "&".join(segments).encode("ascii")


# ----------------------------------------------------------------------------------------- stored message


def rfc2822_utc(moment: datetime) -> str:
    """Ruby's ``Time#utc.rfc2822``: zero-padded day and ``-0000`` for UTC."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%a, %d %b %Y %H:%M:%S -0000")


def received_header(
    *,
    client_ip: str = "192.0.2.44",
    helo: str = "mail.example.org",
    rdns: str | None = None,
    smtp_hostname: str = "mx.postal.example.com",
    received_at: datetime | None = None,
    privacy_mode: bool = False,
) -> str:
    """The value of the Received: header Postal's SMTP server writes (ReceivedHeader.generate)."""
    moment = received_at or datetime.now(UTC)
    header = f"by {smtp_hostname} with SMTP; {rfc2822_utc(moment)}"
    if not privacy_mode:
        header = f"from {helo} ({rdns or helo} [{client_ip}]) {header}"
    return header


def stored_message(message: bytes, **received: Any) -> bytes:
    """The message as Postal stores it after SMTP: its Received: line first. ``size`` is this length."""
    return f"Received: {received_header(**received)}\r\n".encode() + message


def _ruby_number(value: float) -> str:
    return str(value) if isinstance(value, int) else ruby_float(value)


def inspection_headers(
    *, spam: bool = False, spam_score: float = 0, spam_threshold: float = 5.0, threat: bool = False
) -> bytes:
    """The headers the inspection step prepends (IncomingMessageProcessor#inspect_message).

    ``spam_score`` is the Integer 0 when no spam check ran (as in the fixture) and a Float sum otherwise;
    the threshold is a decimal(8,2) column, printed by ActiveSupport as ``5.0``.
    """
    lines = [
        f"X-Postal-Spam: {'yes' if spam else 'no'}",
        f"X-Postal-Spam-Threshold: {_ruby_number(spam_threshold)}",
        f"X-Postal-Spam-Score: {_ruby_number(spam_score)}",
        f"X-Postal-Threat: {'yes' if threat else 'no'}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def raw_payload(
    *,
    postal_id: int,
    rcpt_to: str,
    mail_from: str,
    message: bytes,
    spam: bool = False,
    spam_score: float = 0,
    spam_threshold: float = 5.0,
    threat: bool = False,
    client_ip: str = "192.0.2.44",
    helo: str = "mail.example.org",
    rdns: str | None = None,
    smtp_hostname: str = "mx.postal.example.com",
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """The RawMessage hash of HTTPSender#parameters, for ``message`` as the SMTP client sent it.

    ``message`` is base64 of inspection headers + Received: + the message; ``size`` (a Ruby Integer) is the
    stored size, which counts the Received: line but not the inspection headers added later.
    """
    stored = stored_message(
        message,
        client_ip=client_ip,
        helo=helo,
        rdns=rdns,
        smtp_hostname=smtp_hostname,
        received_at=received_at,
    )
    full = inspection_headers(spam=spam, spam_score=spam_score, spam_threshold=spam_threshold, threat=threat)
    return {
        "id": postal_id,
        "rcpt_to": rcpt_to,
        "mail_from": mail_from,
        "message": encode64(full + stored),
        "base64": True,
        "size": len(stored),
    }


# ----------------------------------------------------------------------------------------- Hash format

_REPLY_RULES = [
    re.compile(r"^-{2,10} $.*", re.M | re.S),
    re.compile(r"^>*\s*----- ?Original Message ?-----.*", re.M | re.S),
    re.compile(r"^>*\s*From:[^\r\n]*[\r\n]+Sent:.*", re.M | re.S),
    re.compile(r"^>*\s*From:[^\r\n]*[\r\n]+Date:.*", re.M | re.S),
    re.compile(r"^>*\s*-----Urspr.ngliche Nachricht----- .*", re.M | re.S),
    re.compile(r"^>*\s*Le[^\r\n]{10,200}a .crit ?:\s*$.*", re.M),
    re.compile(r"^>*\s*__________________.*", re.M | re.S),
    re.compile(r"^>*\s*On.{10,200}wrote:\s*$.*", re.M | re.S),
    re.compile(r"^>*\s*Sent from my.*", re.M | re.S),
    re.compile(r"^>*\s*=== Please reply above this line ===.*", re.M | re.S),
    re.compile(r"(^>.*\n?){10,}", re.M),
]
_REPLY_RULES = [re.compile(rule.pattern, (rule.flags & ~re.UNICODE) | re.ASCII) for rule in _REPLY_RULES]
_RUBY_SPACE = " \t\n\v\f\r\0"


def separate_replies(text: str | None) -> tuple[str, str | None]:
    """Postal's ReplySeparator.separate: (text without quoted replies, the replies or None).

    Ruby's ``/m`` is Python's DOTALL; Ruby's ``^``/``$`` are always line anchors; ``\\s`` is ASCII.
    """
    if not isinstance(text, str):
        return "", None  # Ruby returns "" and the multiple assignment leaves the replies nil
    text = text.replace("\r", "")
    stripped = ""
    for rule in _REPLY_RULES:
        found: list[str] = []

        def cut(match: re.Match[str], found: list[str] = found) -> str:
            found.append(match.group(0))
            return ""

        text = rule.sub(cut, text)
        for piece in found:
            stripped = piece + "\n" + stripped
    stripped = stripped.strip(_RUBY_SPACE)
    return text.strip(_RUBY_SPACE), (stripped or None)


def _mail_parts(msg: EmailMessage) -> Iterable[EmailMessage]:
    yield msg
    if msg.is_multipart():
        for part in msg.iter_parts():
            yield from _mail_parts(part)  # type: ignore[arg-type]


def _is_attachment(part: EmailMessage) -> bool:
    return bool(part.get_filename()) or part.get_content_type() == "message/rfc822"


def _decoded_text(part: EmailMessage) -> str:
    """The part's text in UTF-8 with LF line ends, as Mail's ``decoded`` gives it (odd charsets: replaced)."""
    try:
        text = part.get_content()
    except (LookupError, ValueError, AssertionError):
        text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    return str(text).replace("\r\n", "\n")


def _flat_content_type(part: EmailMessage) -> str:
    """Mail's ``content_type``: the type with its parameters, quoted only when needed."""
    params = [
        f"{k}={v if re.fullmatch(r'[!#$%&*+.^_`|~0-9A-Za-z-]+', v) else chr(34) + v + chr(34)}"
        for k, v in part.get_params()[1:]
    ]
    return "; ".join([part.get_content_type(), *params])


def _decoded_header(name: str, raw: str) -> str:
    """Mail's ``field.decoded``; a header the stdlib cannot parse is decoded as unstructured text."""
    try:
        return str(email.policy.default.header_fetch_parse(name, raw))
    except Exception:
        text = str(email.header.make_header(email.header.decode_header(raw.replace("\r\n", ""))))
        return text.replace("\n", "").strip()


def mail_facts(message: bytes) -> dict[str, Any]:
    """What Postal's Mail gem extensions read from a stored message for the Hash payload."""
    msg: EmailMessage = email.message_from_bytes(message, policy=email.policy.default)  # type: ignore[assignment]
    headers: dict[str, list[str]] = {}
    for name, raw in msg.raw_items():
        headers.setdefault(name.lower(), []).append(_decoded_header(name, raw))
    parts = list(_mail_parts(msg))
    attachments = [p for p in parts if not p.is_multipart() and _is_attachment(p)]
    if msg.is_multipart():
        plain_part = next((p for p in parts if p.get_content_type() == "text/plain" and not _is_attachment(p)), None)
        html_part = next((p for p in parts if p.get_content_type() == "text/html" and not _is_attachment(p)), None)
        plain = _decoded_text(plain_part) if plain_part else None
        html = _decoded_text(html_part) if html_part else None
    else:
        plain = _decoded_text(msg) if msg.get_content_type() == "text/plain" else None
        html = _decoded_text(msg) if msg.get_content_type() == "text/html" else None
    message_id = (headers.get("message-id") or [None])[-1]
    return {
        "headers": headers,
        "subject": (headers.get("subject") or [None])[-1],
        "message_id": message_id.strip().strip("<>") if message_id else None,
        "plain_body": plain,
        "html_body": html,
        "attachments": attachments,
    }


def hash_payload(
    *,
    postal_id: int,
    token: str,
    rcpt_to: str,
    mail_from: str,
    message: bytes,
    spam: bool = False,
    spam_checked: bool = True,
    strip_replies: bool = False,
    include_attachments: bool = True,
    flat: bool = False,
    timestamp: float | None = None,
    bounce: bool = False,
    received_with_ssl: bool = True,
    size: int | None = None,
    **received: Any,
) -> dict[str, Any]:
    """The Hash of HTTPSender#parameters for ``message`` (as the SMTP client sent it), keys in Postal's order.

    ``size`` is a String here; ``reply_to`` the array of every Reply-To header or nil; header fields the last
    occurrence, decoded. With ``flat=True`` the attachments are flattened the way Postal does it for FormData
    (``attachments[0][content_type]`` then carries the parameters, ``size`` is a String); otherwise
    :func:`form_encode` flattens the nested array itself. ``received`` goes to :func:`received_header`.
    """
    facts = mail_facts(message)
    headers = facts["headers"]

    def last(name: str) -> str | None:
        values = headers.get(name)
        return values[-1] if values else None

    if size is None:
        size = len(stored_message(message, **received))
    payload: dict[str, Any] = {
        "id": postal_id,
        "rcpt_to": rcpt_to,
        "mail_from": mail_from,
        "token": token,
        "subject": facts["subject"],
        "message_id": facts["message_id"],
        "timestamp": time.time() if timestamp is None else float(timestamp),
        "size": str(size),
        "spam_status": ("Spam" if spam else "NotSpam") if spam_checked else "NotChecked",
        "bounce": bounce,
        "received_with_ssl": received_with_ssl,
        "to": last("to"),
        "cc": last("cc"),
        "from": last("from"),
        "date": last("date"),
        "in_reply_to": last("in-reply-to"),
        "references": last("references"),
        "html_body": facts["html_body"],
        "attachment_quantity": len(facts["attachments"]),
        "auto_submitted": last("auto-submitted"),
        "reply_to": headers.get("reply-to"),
    }
    if strip_replies:
        payload["plain_body"], payload["replies_from_plain_body"] = separate_replies(facts["plain_body"])
    else:
        payload["plain_body"] = facts["plain_body"]
    if include_attachments:
        parts = facts["attachments"]
        if flat:
            for i, part in enumerate(parts):
                data = part.get_payload(decode=True) or b""
                payload[f"attachments[{i}][filename]"] = part.get_filename()
                payload[f"attachments[{i}][content_type]"] = _flat_content_type(part)
                payload[f"attachments[{i}][size]"] = str(len(data))
                payload[f"attachments[{i}][data]"] = encode64(data)
        else:
            payload["attachments"] = [
                {
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "size": len(data),
                    "data": encode64(data),
                }
                for part in parts
                for data in [part.get_payload(decode=True) or b""]
            ]
    return payload


# ----------------------------------------------------------------------------------------- HTTP delivery


SENT = "sent"
RETRY = "retry"
HARD_FAIL_NO_BOUNCE = "hard_fail_no_bounce"
HARD_FAIL_BOUNCE = "hard_fail_bounce"


def outcome_for(status: int) -> str:
    """HTTPSender#send_message's verdict for one response code (negative: Postal's connection errors)."""
    if 200 <= status < 300:
        return SENT
    if 500 <= status < 600 or status < 0:
        return RETRY
    if status == 429:
        return HARD_FAIL_NO_BOUNCE
    return HARD_FAIL_BOUNCE


def retry_delay_seconds(attempts_so_far: int) -> float:
    """How long Postal waits after the (attempts_so_far + 1)-th soft failure."""
    return RETRY_BASE_SECONDS * RETRY_FACTOR**attempts_so_far


@dataclass(frozen=True)
class Attempt:
    """One POST as Postal records it: -1 timeout, -2 connection error, -3 TLS error, else the HTTP status."""

    status: int
    body_text: str
    outcome: str
    retry_after_seconds: float | None = None  # the delay Postal would wait before trying again
    headers: dict[str, str] = field(default_factory=dict)


def final_outcome(attempts: list[Attempt], max_attempts: int = MAX_DELIVERY_ATTEMPTS) -> str:
    """The delivery's fate: the last verdict, or a bounce once every attempt soft-failed."""
    last = attempts[-1].outcome
    if last == RETRY and len(attempts) >= max_attempts:
        return HARD_FAIL_BOUNCE  # "Maximum number of delivery attempts": incoming mail gets an NDR
    return last


class PostalSimulator:
    """An HTTP endpoint as Postal drives it: one signed POST per message and recipient, no redirects."""

    def __init__(
        self,
        url: str,
        signer: PostalSigner,
        *,
        encoding: str = "BodyAsJSON",
        format: str = "RawMessage",  # Postal's own setting name
        timeout: float = 5.0,
        verify: bool | str = True,
    ) -> None:
        if encoding not in ("BodyAsJSON", "FormData"):
            raise ValueError("encoding is BodyAsJSON or FormData")
        if format not in ("RawMessage", "Hash"):
            raise ValueError("format is RawMessage or Hash")
        self.url = url
        self.signer = signer
        self.encoding = encoding
        self.format = format
        self.timeout = timeout
        self.verify = verify
        self.session = requests.Session()

    def encode(self, payload: dict[str, Any]) -> tuple[bytes, str]:
        """(body, Content-Type) as Postal::HTTP builds them for this endpoint's encoding."""
        if self.encoding == "BodyAsJSON":
            return ruby_json(payload), "application/json"
        return form_encode(payload), "application/x-www-form-urlencoded"

    def wire_headers(self, body: bytes, content_type: str, **sign_options: bool) -> dict[str, str]:
        """The request headers, with the names Net::HTTP puts on the wire (``X-Postal-Signature-Kid``)."""
        headers = {
            "Accept-Encoding": "gzip;q=1.0,deflate;q=0.6,identity;q=0.3",
            "Accept": "*/*",
            "Content-Type": content_type,
        }
        for name, value in self.signer.sign_headers(body, **sign_options).items():
            headers["-".join(w.capitalize() for w in name.split("-"))] = value
        headers["User-Agent"] = f"Postal/{POSTAL_VERSION}"
        return headers

    def send(self, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST exact bytes with exact headers (for tampering tests); Postal's error codes on failure."""
        try:
            response = self.session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                verify=self.verify,
            )
        except requests.exceptions.SSLError:
            return Attempt(-3, "Invalid SSL certificate", RETRY)
        except requests.exceptions.Timeout:
            return Attempt(-1, f"Timed out after {self.timeout}s", RETRY)
        except requests.exceptions.ConnectionError as exc:
            return Attempt(-2, type(exc).__name__, RETRY)
        return Attempt(
            response.status_code,
            response.text,
            outcome_for(response.status_code),
            None,
            dict(response.headers),
        )

    def post(self, payload: dict[str, Any], **sign_options: bool) -> Attempt:
        """One signed POST of ``payload`` (see raw_payload/hash_payload)."""
        body, content_type = self.encode(payload)
        return self.send(body, self.wire_headers(body, content_type, **sign_options))

    def deliver(self, payload: dict[str, Any], *, max_attempts: int = MAX_DELIVERY_ATTEMPTS) -> list[Attempt]:
        """Post until sent, hard-failed or out of attempts, as Postal's queue would (without the waiting).

        Each retried attempt records in ``retry_after_seconds`` the delay Postal would have waited.
        """
        attempts: list[Attempt] = []
        while len(attempts) < max_attempts:
            attempt = self.post(payload)
            if attempt.outcome == RETRY:
                attempt = Attempt(
                    attempt.status,
                    attempt.body_text,
                    attempt.outcome,
                    retry_delay_seconds(len(attempts)),
                    attempt.headers,
                )
            attempts.append(attempt)
            if attempt.outcome != RETRY:
                break
        return attempts


def new_message(
    *,
    subject: str = "Hello",
    sender: str = "Jane Doe <jane@example.org>",
    to: str = "support@example.com",
    text: str = "Hi there.\n",
    html: str | None = None,
    attachments: Iterable[tuple[str, str, bytes]] = (),
    message_id: str | None = None,
) -> bytes:
    """A plain RFC 5322 message (CRLF) for tests that need one quickly: (filename, type, data) attachments."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Date"] = "Tue, 28 Apr 2026 18:19:30 +0200"
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or f"<{hashlib.sha256(text.encode()).hexdigest()[:16]}@example.org>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, content_type, data in attachments:
        maintype, subtype = content_type.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


class PostalWebServer:
    """Postal's web host as far as the bridge sees it: ``GET /.well-known/jwks.json`` on 127.0.0.1.

    ``jwks`` may be replaced at any time (key rotation); ``status`` other than 200 makes it fail (Postal
    down behind its proxy); ``hits`` counts JWKS requests. Stop it with ``close()`` (or use ``with``).
    """

    def __init__(self, jwks: dict[str, Any] | None = None) -> None:
        self.jwks: dict[str, Any] | bytes = jwks if jwks is not None else {"keys": []}
        self.status = 200
        self.hits = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hits += 1
                    status, document = owner.status, owner.jwks
                if self.path != "/.well-known/jwks.json":
                    status = 404
                body = document if isinstance(document, bytes) else ruby_json(document)
                if status != 200:
                    body = b"error"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test output is for assertions."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self.jwks_url = f"{self.url}/.well-known/jwks.json"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PostalWebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
