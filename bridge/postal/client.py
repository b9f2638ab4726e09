"""Postal's send API (``POST /api/v1/send/raw``) and message API, as one small HTTP client. No Flask.

Postal answers every handled outcome with HTTP 200 (``status`` and ``data.code`` say what happened) and
has no idempotency key: a call that Postal read, but whose answer never arrived, may have queued the
message, and calling again sends it twice. So each send ends in exactly one of four typed outcomes, and
the caller decides from the type alone::

    Accepted    Postal queued it: per recipient, Postal's message id and token (its events carry them)
    Permanent   refused for good (sender not on a verified domain, bad key, parameter error, HTTP 4xx)
    Temporary   provably NOT accepted: no connection was ever made, or Postal said ServerSuspended
    Uncertain   Postal may have accepted it (timeout or reset after sending, 5xx, a 200 we cannot read):
                never resend blindly; reconcile from Postal's events or ``message()``/``deliveries()``

Only errors that prove no request byte left this process are Temporary: the connection was refused,
the name did not resolve, the connect timed out, the TLS certificate was refused. Everything after the
connection was made is Uncertain, even a ConnectionError (a reset while the answer was read is one).

This module never retries, never follows redirects (a redirected POST would be re-sent as a GET) and
never reuses a connection for a send (``Connection: close``): a kept-alive socket that Postal closed
while idle fails only after the request was written, which would make a never-received send look
uncertain. The API key travels only in the ``X-Server-API-Key`` header: it is kept out of reprs, logs
and results, and scrubbed from whatever Postal sends back (``InvalidServerAPIKey`` echoes it).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import requests
import urllib3.exceptions
from requests.exceptions import InvalidHeader, InvalidSchema, InvalidURL, MissingSchema

from bridge import metrics
from bridge.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 50  # the bridge's per-call cap (Postal's own for to/cc/bcc in send/message)
TEMPORARY_CODES = frozenset({"ServerSuspended"})  # Postal refused now, may take it later
_SEND_ANSWER_BYTES = 1024 * 1024  # 50 recipients' ids and tokens are a few KB
_READ_ANSWER_BYTES = 48 * 1024 * 1024  # message(): raw_message of a 14 MB message, base64 with newlines
_REDACTED = "[api key]"
# Raised while the request is prepared, before any connection: BRIDGE_POSTAL_URL itself is unusable.
_UNUSABLE_URL = (InvalidURL, InvalidSchema, MissingSchema, InvalidHeader)


class PostalNotConfigured(SettingsError):
    """BRIDGE_POSTAL_URL or BRIDGE_POSTAL_API_KEY is missing: nothing can be sent through Postal."""


@dataclass(frozen=True)
class PostalMessageRef:
    """One recipient's message in Postal: the ``id``/``token`` its events and message API use."""

    id: int
    token: str


@dataclass(frozen=True)
class Accepted:
    """Postal queued the message (not delivered: its events say that), one Postal message per recipient."""

    message_id: str | None
    recipients: Mapping[str, PostalMessageRef]
    outcome: ClassVar[str] = "accepted"


@dataclass(frozen=True)
class _Failure:
    code: str
    reason: str
    http_status: int | None = None


@dataclass(frozen=True)
class Permanent(_Failure):
    """Refused for good; ``code`` is Postal's (``UnauthenticatedFromAddress``, ``parameter-error``) or ``HTTP 403``."""

    outcome: ClassVar[str] = "permanent"


@dataclass(frozen=True)
class Temporary(_Failure):
    """Provably not accepted (nothing reached Postal, or Postal said so): safe to try again later."""

    outcome: ClassVar[str] = "temporary"


@dataclass(frozen=True)
class Uncertain(_Failure):
    """Postal may have accepted it: never resend blindly. Only sends end here, never reads."""

    outcome: ClassVar[str] = "uncertain"


Failure = Permanent | Temporary | Uncertain
SendResult = Accepted | Permanent | Temporary | Uncertain


@dataclass(frozen=True)
class PostalMessage:
    """``/api/v1/messages/message``: the fields reconciling needs, and ``data`` as Postal sent it."""

    id: int
    token: str
    status: str | None  # Pending, Sent, SoftFail, HardFail, Held, Bounced (the "status" expansion)
    held: bool | None
    last_delivery_attempt: float | None
    message_id: str | None  # the Message-ID header, no angle brackets (the "details" expansion)
    rcpt_to: str | None
    mail_from: str | None
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PostalDelivery:
    """One delivery attempt of ``/api/v1/messages/deliveries``."""

    id: int
    status: str  # Sent, SoftFail, HardFail, Held, Bounced
    details: str | None
    output: str | None
    sent_with_ssl: bool | None
    timestamp: float | None


def split_recipients(recipients: Iterable[str], size: int = MAX_RECIPIENTS) -> list[list[str]]:
    """Recipients in calls of at most ``size`` (50): order kept, exact duplicates dropped.

    Postal keys its answer by recipient as given, so a duplicate would leave one answer for two entries.
    """
    unique = list(dict.fromkeys(recipients))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


class PostalClient:
    """Calls Postal's legacy API on ``url`` (BRIDGE_POSTAL_URL) with ``api_key`` (BRIDGE_POSTAL_API_KEY).

    The Host header is the URL's host, which must be Postal's ``web_hostname`` (Postal answers 403
    otherwise). Each call: connect within ``timeout`` seconds, each read within ``timeout``, the whole
    answer within twice that.
    """

    def __init__(self, url: str, api_key: str, *, timeout: float = 15.0, session: requests.Session | None = None):
        if not url:
            raise PostalNotConfigured("BRIDGE_POSTAL_URL is required to send through Postal")
        if not api_key:
            raise PostalNotConfigured("BRIDGE_POSTAL_API_KEY is required to send through Postal")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key
        self._session = session or requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> PostalClient:
        return cls(settings.postal_url, settings.postal_api_key, timeout=settings.postal_timeout)

    def __repr__(self) -> str:
        return f"PostalClient({self.url!r}, timeout={self.timeout:g})"

    def send_raw(self, mail_from: str, rcpt_to: Sequence[str], message: bytes, *, bounce: bool = False) -> SendResult:
        """One ``send/raw`` call for 1 to 50 distinct recipients (``split_recipients`` for more).

        ``message`` is the whole RFC 5322 message; its From (or Sender) must be on a domain verified in
        Postal. A wrong count or a duplicate is the caller's bug: ValueError, and nothing is sent.
        """
        recipients = list(rcpt_to)
        if not 0 < len(recipients) <= MAX_RECIPIENTS or len(set(recipients)) != len(recipients):
            raise ValueError(f"send_raw takes 1 to {MAX_RECIPIENTS} distinct recipients, got {len(recipients)}")
        payload: dict[str, Any] = {
            "mail_from": mail_from,
            "rcpt_to": recipients,
            "data": base64.b64encode(message).decode("ascii"),
        }
        if bounce:
            payload["bounce"] = True
        answer = self._call("/api/v1/send/raw", payload, limit=_SEND_ANSWER_BYTES, maybe=Uncertain)
        result = answer if isinstance(answer, Failure) else _accepted(answer, recipients)
        _log_send(result, len(recipients))
        return result

    def send_raw_batches(
        self, mail_from: str, rcpt_to: Iterable[str], message: bytes
    ) -> list[tuple[list[str], SendResult]]:
        """``send_raw`` per batch of 50 (``split_recipients``), each batch with its own outcome.

        After a Temporary or Uncertain batch (Postal unreachable or not answering) the remaining batches
        are not attempted (Temporary ``NotAttempted``: they were provably not sent), so a dead Postal costs
        one timeout, not one per batch. After a Permanent one the next batches are still tried: a
        refusal may concern only that batch.
        """
        results: list[tuple[list[str], SendResult]] = []
        stop: Failure | None = None
        for batch in split_recipients(rcpt_to):
            if stop is not None:
                results.append((batch, Temporary("NotAttempted", f"not sent: an earlier call ended {stop.code}")))
                continue
            result = self.send_raw(mail_from, batch, message)
            if isinstance(result, Temporary | Uncertain):
                stop = result
            results.append((batch, result))
        return results

    def message(
        self, postal_id: int, expansions: Sequence[str] = ("status", "details")
    ) -> PostalMessage | Permanent | Temporary:
        """Postal's record of one message (``MessageNotFound`` is Permanent). Reads are safe to repeat,
        so a transport failure or a 5xx is Temporary here."""
        answer = self._call(
            "/api/v1/messages/message",
            {"id": postal_id, "_expansions": list(expansions)},
            limit=_READ_ANSWER_BYTES,
            maybe=Temporary,
        )
        if isinstance(answer, Permanent | Temporary):
            return answer
        status = answer.get("status") if isinstance(answer.get("status"), dict) else {}
        details = answer.get("details") if isinstance(answer.get("details"), dict) else {}
        if not isinstance(answer.get("id"), int) or not isinstance(answer.get("token"), str):
            return Temporary("UnexpectedAnswer", "message: no id/token in Postal's answer", 200)
        return PostalMessage(
            id=answer["id"],
            token=answer["token"],
            status=_str(status.get("status")),
            held=status.get("held") if isinstance(status.get("held"), bool) else None,
            last_delivery_attempt=_float(status.get("last_delivery_attempt")),
            message_id=_str(details.get("message_id")),
            rcpt_to=_str(details.get("rcpt_to")),
            mail_from=_str(details.get("mail_from")),
            data=answer,
        )

    def deliveries(self, postal_id: int) -> list[PostalDelivery] | Permanent | Temporary:
        """Postal's delivery attempts of one message, oldest first (as Postal lists them)."""
        answer = self._call(
            "/api/v1/messages/deliveries", {"id": postal_id}, limit=_SEND_ANSWER_BYTES, maybe=Temporary, listing=True
        )
        if isinstance(answer, Permanent | Temporary):
            return answer
        deliveries = []
        for entry in answer:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not _str(entry.get("status")):
                return Temporary("UnexpectedAnswer", "deliveries: an entry without id/status", 200)
            deliveries.append(
                PostalDelivery(
                    id=entry["id"],
                    status=entry["status"],
                    details=_str(entry.get("details")),
                    output=_str(entry.get("output")),
                    sent_with_ssl=entry.get("sent_with_ssl") if isinstance(entry.get("sent_with_ssl"), bool) else None,
                    timestamp=_float(entry.get("timestamp")),
                )
            )
        return deliveries

    @metrics.postal_call
    def _call(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        limit: int,
        maybe: type[Uncertain] | type[Temporary],
        listing: bool = False,
    ) -> Any:
        """POST one JSON call; Postal's ``data`` on success (a dict, or a list with ``listing``), else a Failure.

        ``maybe`` is what "Postal may have processed it" means: Uncertain for a send; Temporary for a read,
        which is safe to ask again.
        """
        started = time.monotonic()
        try:
            response = self._session.post(
                self.url + path,
                data=json.dumps(payload).encode("utf-8"),
                headers={
                    "X-Server-API-Key": self._api_key,
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "Connection": "close",
                },
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
                stream=True,
            )
        except requests.RequestException as exc:
            proof = _never_sent(exc)
            if proof:
                return Temporary(proof, "not sent: no connection to Postal")
            return maybe(type(exc).__name__, "no answer after the request was sent")
        with response:
            status = response.status_code
            body = bytearray()
            try:
                # read1: whatever has arrived, so a trickling answer meets the deadline (read() would wait
                # for all 64 KB, each socket read within the timeout but the whole without a bound).
                while chunk := response.raw.read1(65536, decode_content=True):  # gzip from a proxy, too
                    body += chunk
                    if len(body) > limit:
                        return maybe("AnswerTooLarge", "Postal's answer was too large", status)
                    if time.monotonic() - started > 2 * self.timeout:
                        return maybe("ReadTimeout", "Postal's answer took too long", status)
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # all come after the request went out
                return maybe(type(exc).__name__, "the answer broke off", status)
        if status != 200:
            return _http_failure(status, maybe)
        try:
            envelope = json.loads(body)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict):
            return maybe("UnparseableAnswer", "HTTP 200 without a JSON envelope", 200)
        data = envelope.get("data")
        kind = envelope.get("status")
        if kind == "success" and isinstance(data, list if listing else dict):
            return data
        if kind == "error" and isinstance(data, dict):
            code = self._scrub(str(data.get("code") or "error"))
            reason = self._scrub(str(data.get("message") or code))
            return (Temporary if code in TEMPORARY_CODES else Permanent)(code, reason, 200)
        if kind == "parameter-error":
            message = data.get("message") if isinstance(data, dict) else None
            return Permanent("parameter-error", self._scrub(str(message or "parameter error")), 200)
        return maybe("UnexpectedAnswer", "HTTP 200 with an envelope Postal does not send", 200)

    def _scrub(self, text: str) -> str:
        """Postal's own words, without the API key (InvalidServerAPIKey echoes it), one short line."""
        return " ".join(text.replace(self._api_key, _REDACTED).split())[:200]


def _never_sent(exc: BaseException) -> str | None:
    """The name of the error proving the connection was never made (so no request byte left), or None.

    requests wraps urllib3's errors (``ConnectionError(MaxRetryError(reason=NewConnectionError))``), so
    the chain is walked through ``args``, ``reason`` and ``__cause__``; a plain ConnectionError proves
    nothing (a reset while reading the answer is one too).
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        # NewConnectionError (refused, unreachable) and NameResolutionError subclass ConnectTimeoutError.
        if isinstance(current, urllib3.exceptions.ConnectTimeoutError):
            return type(current).__name__
        if isinstance(current, (ssl.SSLCertVerificationError, *_UNUSABLE_URL)):  # the handshake; before connecting
            return type(current).__name__
        if isinstance(current, ssl.SSLError) and _raised_in_handshake(current):  # https:// to a plain port, ...
            return "TLSHandshake"
        reason = getattr(current, "reason", None)
        pending.extend(e for e in (*current.args, reason, current.__cause__) if isinstance(e, BaseException))
    return None


def _raised_in_handshake(exc: BaseException) -> bool:
    """A TLS error from the handshake: no application byte is sent before it ends (no 0-RTT in Python's ssl).

    Other TLS errors (a bad record while reading the answer) prove nothing, and urllib3 wraps both alike.
    """
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "do_handshake":
            return True
        frame = frame.tb_next
    return False


def _http_failure(status: int, maybe: type[Uncertain] | type[Temporary]) -> Failure:
    """A status Postal's API never answers itself: its proxy's, its framework's, or a crash's."""
    if status in (408, 429):  # a proxy that did not pass the request on (too slow, rate limited)
        return Temporary(f"HTTP {status}", "not passed on to Postal", status)
    if 300 <= status < 500:  # 400 bad JSON, 403 wrong Host, 404 wrong URL, 3xx a misconfigured URL
        return Permanent(f"HTTP {status}", f"Postal answered HTTP {status}", status)
    return maybe(f"HTTP {status}", f"Postal answered HTTP {status}", status)  # 5xx: may have been processed


def _accepted(data: dict[str, Any], recipients: list[str]) -> Accepted | Uncertain:
    """Postal's success data, which must name every recipient sent (it keys them as given)."""
    messages = data.get("messages")
    refs: dict[str, PostalMessageRef] = {}
    for rcpt in recipients:
        entry = messages.get(rcpt) if isinstance(messages, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not _str(entry.get("token")):
            return Uncertain("UnexpectedAnswer", "success without an id and token for every recipient", 200)
        refs[rcpt] = PostalMessageRef(entry["id"], entry["token"])
    return Accepted(message_id=_str(data.get("message_id")), recipients=refs)


def _log_send(result: SendResult, count: int) -> None:
    # Counts and codes only: recipients are personal data, and reasons are Postal's words.
    if isinstance(result, Accepted):
        log.info("postal send/raw: accepted for %d recipient(s)", count)  # no Message-ID: it reads as an address
    elif isinstance(result, Permanent):
        log.warning("postal send/raw: refused for %d recipient(s): %s (permanent)", count, result.code)
    elif isinstance(result, Temporary):
        log.warning("postal send/raw: not sent to %d recipient(s): %s (temporary)", count, result.code)
    else:
        log.error("postal send/raw: outcome unknown for %d recipient(s): %s (never resend blindly)", count, result.code)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
