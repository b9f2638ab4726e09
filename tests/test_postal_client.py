"""The Postal send-API client against a real HTTP server on loopback (tests/postal_api.py).

Every outcome class is produced by the server doing what Postal (or its proxy) does, and every
"maybe accepted" case also checks what the server counted: an Uncertain result must be exactly the
case where Postal may hold the message, and a Temporary one the case where it provably does not.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3.connection
import urllib3.exceptions

from bridge.context import Bridge
from bridge.postal.client import (
    Accepted,
    Permanent,
    PostalClient,
    PostalMessage,
    PostalNotConfigured,
    Temporary,
    Uncertain,
    split_recipients,
)
from bridge.postal.jwks import fetch_jwks
from bridge.settings import Settings, SettingsError
from tests.postal_api import API_KEY, PostalSendAPI
from tests.postal_sim import PostalSigner

TIMEOUT = 0.5
SENDER = "jane@example.test"


def mime(sender: str = f"Jane <{SENDER}>", message_id: str = "<m1.4411@example.test>") -> bytes:
    return (
        f"From: {sender}\r\nTo: Bob <bob@example.org>\r\nSubject: hi\r\nMessage-ID: {message_id}\r\n\r\nHello.\r\n"
    ).encode()


@pytest.fixture
def postal(postal_api: PostalSendAPI) -> PostalClient:
    return PostalClient(postal_api.url, API_KEY, timeout=TIMEOUT)


def test_accepted_gives_each_recipients_postal_id_and_token(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    result = postal.send_raw(SENDER, ["bob@example.org", "carol@example.net"], mime())

    assert isinstance(result, Accepted)
    assert result.message_id == "m1.4411@example.test"
    assert set(result.recipients) == {"bob@example.org", "carol@example.net"}
    for rcpt, ref in result.recipients.items():
        stored = postal_api.messages[ref.id]
        assert (stored.rcpt_to, stored.token, stored.raw) == (rcpt, ref.token, mime())
    assert postal_api.accepted == {"bob@example.org": 1, "carol@example.net": 1}
    # What went over the wire: Postal's web host as Host, the key header, JSON, a connection not kept.
    (seen,) = postal_api.seen
    assert (seen.path, seen.host, seen.api_key, seen.connection) == ("/api/v1/send/raw", "127.0.0.1", API_KEY, "close")
    body = json.loads(seen.body)
    assert body["mail_from"] == SENDER and body["rcpt_to"] == ["bob@example.org", "carol@example.net"]
    assert base64.b64decode(body["data"]) == mime()
    assert "bounce" not in body and not any(m.bounce for m in postal_api.messages.values())


def test_a_gzipped_answer_is_read(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.gzip = True
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Accepted) and result.recipients["bob@example.org"].id in postal_api.messages
    assert isinstance(postal.message(result.recipients["bob@example.org"].id), PostalMessage)


def test_a_bounce_is_flagged(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    result = postal.send_raw("", ["bob@example.org"], mime(), bounce=True)
    assert isinstance(result, Permanent)  # Postal wants a mail_from even for a bounce
    result = postal.send_raw("postmaster@example.test", ["bob@example.org"], mime(), bounce=True)
    assert isinstance(result, Accepted) and postal_api.messages[result.recipients["bob@example.org"].id].bounce


@pytest.mark.parametrize(
    "code", ["AccessDenied", "NoRecipients", "NoContent", "FromAddressMissing", "TooManyToAddresses", "SomeFutureCode"]
)
def test_postal_error_codes_are_permanent(postal: PostalClient, postal_api: PostalSendAPI, code: str) -> None:
    postal_api.fail_next("error", code=code, message="refused")  # an error is never an acceptance, known or not
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert result == Permanent(code, "refused", 200)
    assert not postal_api.accepted


def test_sender_outside_verified_domains_is_permanent(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    result = postal.send_raw("eve@elsewhere.test", ["bob@example.org"], mime(sender="eve@elsewhere.test"))
    assert result == Permanent("UnauthenticatedFromAddress", "UnauthenticatedFromAddress", 200)
    assert not postal_api.accepted


def test_invalid_key_is_permanent_and_postals_echo_of_it_is_scrubbed(postal_api: PostalSendAPI) -> None:
    wrong = "wrong-key-Zq81xTTv"
    result = PostalClient(postal_api.url, wrong, timeout=TIMEOUT).send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Permanent) and result.code == "InvalidServerAPIKey"
    assert postal_api.seen[0].api_key == wrong
    # Postal puts the key in data.token; a proxy or another version might put it in the message.
    postal_api.fail_next("error", code="InvalidServerAPIKey", message=f"The API token {wrong} was not valid.")
    echoed = PostalClient(postal_api.url, wrong, timeout=TIMEOUT).send_raw(SENDER, ["bob@example.org"], mime())
    assert echoed == Permanent("InvalidServerAPIKey", "The API token [api key] was not valid.", 200)


def test_too_many_recipients_for_postal_is_permanent(postal_api: PostalSendAPI) -> None:
    postal_api.max_recipients = 2
    postal = PostalClient(postal_api.url, API_KEY, timeout=TIMEOUT)
    result = postal.send_raw(SENDER, ["a@example.org", "b@example.org", "c@example.org"], mime())
    assert isinstance(result, Permanent) and result.code == "TooManyToAddresses"
    assert not postal_api.accepted


def test_parameter_error_is_permanent(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    result = postal.send_raw("", ["bob@example.org"], mime())
    assert result == Permanent("parameter-error", "`mail_from` parameter is required but is missing", 200)


def test_wrong_host_is_a_permanent_403(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.web_hostname = "postal.example.test"  # the client's URL names 127.0.0.1
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert result == Permanent("HTTP 403", "Postal answered HTTP 403", 403)
    assert not postal_api.accepted


@pytest.mark.parametrize("status", [400, 404])
def test_other_4xx_are_permanent(postal_api: PostalSendAPI, status: int) -> None:
    if status == 404:
        postal = PostalClient(postal_api.url + "/not-postal", API_KEY, timeout=TIMEOUT)
    else:
        postal_api.fail_next("http", status=400)  # what Rails answers to JSON it cannot parse
        postal = PostalClient(postal_api.url, API_KEY, timeout=TIMEOUT)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Permanent) and result.http_status == status


def test_server_suspended_is_temporary(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.suspended = True
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Temporary) and result.code == "ServerSuspended"
    postal_api.suspended = False
    assert isinstance(postal.send_raw(SENDER, ["bob@example.org"], mime()), Accepted)
    assert postal_api.accepted == {"bob@example.org": 1}


def test_connection_refused_is_temporary_and_nothing_was_sent(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    with postal_api.refusing():
        result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Temporary) and result.code == "NewConnectionError"
    assert not postal_api.seen and not postal_api.accepted
    assert isinstance(postal.send_raw(SENDER, ["bob@example.org"], mime()), Accepted)  # safe to retry
    assert postal_api.accepted == {"bob@example.org": 1}


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listen queue is full: a new connection's SYN is dropped (connect times out)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # Linux keeps backlog + 1 in the accept queue; the rest would hang on connect
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    yield listener.getsockname()[1]
    for s in [*fillers, listener]:
        s.close()


def test_connect_timeout_is_temporary(unanswered_port: int) -> None:
    postal = PostalClient(f"http://127.0.0.1:{unanswered_port}", API_KEY, timeout=TIMEOUT)
    started = time.monotonic()
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Temporary) and result.code == "ConnectTimeoutError"
    assert time.monotonic() - started < 4 * TIMEOUT


class RaisingSession(requests.Session):
    """Raises what requests raises for failures loopback cannot produce (DNS, TLS, proxies), chain and all."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        raise self.error


_U3, _RQ = urllib3.exceptions, requests.exceptions
_CONN = urllib3.connection.HTTPConnection("postal.example.test")


def _pooled(wrapper: type[requests.RequestException], reason: Exception) -> requests.RequestException:
    """requests' wrapper around urllib3's MaxRetryError(reason), as its adapter raises it."""
    return wrapper(_U3.MaxRetryError(None, "/api/v1/send/raw", reason))


_TRANSPORT_ERRORS = {  # code: (outcome, error)
    "NameResolutionError": (Temporary, _pooled(_RQ.ConnectionError, _U3.NameResolutionError("p", _CONN, OSError()))),
    "SSLCertVerificationError": (Temporary, _pooled(_RQ.SSLError, _U3.SSLError(ssl.SSLCertVerificationError()))),
    "NewConnectionError": (Temporary, _pooled(_RQ.ProxyError, _U3.ProxyError("", _U3.NewConnectionError(_CONN, "")))),
    # TLS broken after the handshake, a reset, a read timeout: the request may have gone out.
    "SSLError": (Uncertain, _pooled(_RQ.SSLError, _U3.SSLError(ssl.SSLError(1, "bad record mac")))),
    "ConnectionError": (Uncertain, _RQ.ConnectionError(_U3.ProtocolError("aborted", ConnectionResetError()))),
    "ReadTimeout": (Uncertain, _pooled(_RQ.ReadTimeout, _U3.ReadTimeoutError(None, "/", "timed out"))),
}


@pytest.mark.parametrize(("code", "outcome", "error"), [(c, o, e) for c, (o, e) in _TRANSPORT_ERRORS.items()])
def test_transport_errors_are_not_sent_only_with_proof(code: str, outcome: type, error: Exception) -> None:
    postal = PostalClient("https://postal.example.test", API_KEY, session=RaisingSession(error))
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert type(result) is outcome and result.code == code


def test_a_failed_tls_handshake_is_temporary(postal_api: PostalSendAPI) -> None:
    # https:// to Postal's plain HTTP port: the handshake fails before any request byte.
    postal = PostalClient(postal_api.url.replace("http://", "https://"), API_KEY, timeout=TIMEOUT)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Temporary) and result.code == "TLSHandshake"
    assert not postal_api.seen


def test_an_unusable_url_is_temporary_not_uncertain() -> None:
    postal = PostalClient("http://127.0.0.1:99999", API_KEY, timeout=TIMEOUT)  # no such port: refused while preparing
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Temporary) and result.code == "InvalidURL"


def test_slow_answer_after_accepting_is_uncertain_and_was_sent_once(
    postal: PostalClient, postal_api: PostalSendAPI
) -> None:
    postal_api.fail_next("slow", delay=8 * TIMEOUT)
    started = time.monotonic()
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Uncertain) and result.code == "ReadTimeout"
    assert time.monotonic() - started < 4 * TIMEOUT
    assert postal_api.accepted == {"bob@example.org": 1}  # Postal holds it: resending would send twice
    assert isinstance(postal.send_raw(SENDER, ["bob@example.org"], mime()), Accepted)  # what a blind retry does
    assert postal_api.duplicates() == {"bob@example.org": 2}


@pytest.mark.parametrize(("kind", "code"), [("reset", "ProtocolError"), ("drop", "ConnectionError")])
def test_connection_reset_after_sending_is_uncertain(
    postal: PostalClient, postal_api: PostalSendAPI, kind: str, code: str
) -> None:
    # "drop" is a requests ConnectionError, like a refused connection: only the chain tells them apart.
    postal_api.fail_next(kind)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Uncertain) and result.code == code
    assert postal_api.accepted == {"bob@example.org": 1}


@pytest.mark.parametrize(("status", "accept"), [(502, False), (504, True), (500, True), (503, False)])
def test_5xx_is_uncertain(postal: PostalClient, postal_api: PostalSendAPI, status: int, accept: bool) -> None:
    postal_api.fail_next("http", status=status, accept=accept)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert result == Uncertain(f"HTTP {status}", f"Postal answered HTTP {status}", status)
    assert sum(postal_api.accepted.values()) == int(accept)


def test_trickling_answer_is_cut_at_twice_the_timeout(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.fail_next("drip", delay=0.7 * TIMEOUT)  # every piece within the read timeout, the whole not
    started = time.monotonic()
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Uncertain) and result.code == "ReadTimeout"
    assert time.monotonic() - started < 4 * TIMEOUT
    assert postal_api.accepted == {"bob@example.org": 1}


def test_oversized_answer_is_uncertain(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.fail_next("http", status=200, size=2 * 1024 * 1024, accept=True)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Uncertain) and result.code == "AnswerTooLarge"


@pytest.mark.parametrize("status", [408, 429])
def test_proxy_that_did_not_pass_it_on_is_temporary(
    postal: PostalClient, postal_api: PostalSendAPI, status: int
) -> None:
    postal_api.fail_next("http", status=status)
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert result == Temporary(f"HTTP {status}", "not passed on to Postal", status)


def test_redirect_is_permanent_and_not_followed(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.fail_next("http", status=301)  # e.g. http:// redirected to https://: fix BRIDGE_POSTAL_URL
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert result == Permanent("HTTP 301", "Postal answered HTTP 301", 301)
    assert len(postal_api.seen) == 1 and not postal_api.accepted


def test_unparseable_200_is_uncertain(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.fail_next("http", status=200, accept=True)  # an HTML page with a 200
    result = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(result, Uncertain) and result.code == "UnparseableAnswer"


@pytest.mark.parametrize(
    "body",
    [
        b'{"status":"success","time":0.01,"flags":{},"data":{"message_id":"x@y","messages":{"bob@example.org":{"id":7,"token":"t"}}}}',
        b'{"status":"success","time":0.01,"flags":{},"data":{"message_id":"x@y","messages":{}}}',
        b'{"status":"success","time":0.01,"flags":{},"data":{"message_id":"x@y","messages":{"carol@example.net":{"id":"7","token":"t"}}}}',
        b'{"status":"queued","time":0.01,"flags":{},"data":{}}',
        b'["success"]',
    ],
)
def test_a_200_that_does_not_account_for_every_recipient_is_uncertain(
    postal: PostalClient, postal_api: PostalSendAPI, body: bytes
) -> None:
    postal_api.fail_next("answer", body=body, accept=True)
    result = postal.send_raw(SENDER, ["bob@example.org", "carol@example.net"], mime())
    assert isinstance(result, Uncertain) and result.code in ("UnexpectedAnswer", "UnparseableAnswer")


def test_split_recipients_keeps_order_drops_duplicates_and_caps_at_50() -> None:
    addresses = [f"r{i}@example.org" for i in range(120)]
    batches = split_recipients([*addresses, "r3@example.org"])
    assert [len(b) for b in batches] == [50, 50, 20]
    assert [a for b in batches for a in b] == addresses


def test_send_raw_refuses_more_than_50_or_none_before_sending(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    for recipients in ([f"r{i}@example.org" for i in range(51)], [], ["a@example.org", "a@example.org"]):
        with pytest.raises(ValueError, match="1 to 50 distinct recipients"):
            postal.send_raw(SENDER, recipients, mime())
    assert not postal_api.seen


def test_batches_send_everyone_once_in_calls_of_50(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    addresses = [f"r{i}@example.org" for i in range(120)]
    results = postal.send_raw_batches(SENDER, addresses, mime())
    assert [len(batch) for batch, _ in results] == [50, 50, 20]
    assert all(isinstance(result, Accepted) for _, result in results)
    assert [len(json.loads(s.body)["rcpt_to"]) for s in postal_api.seen] == [50, 50, 20]
    assert postal_api.accepted == dict.fromkeys(addresses, 1)


def test_batches_stop_after_an_uncertain_one(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    postal_api.fail_next("http", status=502)
    results = postal.send_raw_batches(SENDER, [f"r{i}@example.org" for i in range(120)], mime())
    assert [type(r) for _, r in results] == [Uncertain, Temporary, Temporary]
    assert results[1][1].code == "NotAttempted"
    assert len(postal_api.seen) == 1


def test_message_and_deliveries_read_what_postal_accepted(postal: PostalClient, postal_api: PostalSendAPI) -> None:
    sent = postal.send_raw(SENDER, ["bob@example.org"], mime())
    assert isinstance(sent, Accepted)
    ref = sent.recipients["bob@example.org"]

    pending = postal.message(ref.id)
    assert isinstance(pending, PostalMessage)
    assert (pending.id, pending.token, pending.status, pending.held) == (ref.id, ref.token, "Pending", False)
    assert (pending.message_id, pending.rcpt_to, pending.mail_from) == (
        "m1.4411@example.test",
        "bob@example.org",
        SENDER,
    )
    assert pending.last_delivery_attempt is None
    assert postal.deliveries(ref.id) == []

    postal_api.deliver(ref.id, "SoftFail", output="451 try later")
    postal_api.deliver(ref.id, "Sent")
    sent_now = postal.message(ref.id)
    assert isinstance(sent_now, PostalMessage) and sent_now.status == "Sent"
    assert isinstance(sent_now.last_delivery_attempt, float)
    deliveries = postal.deliveries(ref.id)
    assert isinstance(deliveries, list)
    assert [(d.id, d.status, d.output, d.sent_with_ssl) for d in deliveries] == [
        (1, "SoftFail", "451 try later", True),
        (2, "Sent", "250 2.0.0 OK", True),
    ]
    raw = postal.message(ref.id, expansions=["raw_message"])
    assert isinstance(raw, PostalMessage) and raw.status is None
    assert base64.b64decode(raw.data["raw_message"]) == mime()
    assert json.loads(postal_api.seen[-1].body) == {"id": ref.id, "_expansions": ["raw_message"]}


def test_message_reads_fail_typed_and_are_temporary_when_transport_fails(
    postal: PostalClient, postal_api: PostalSendAPI
) -> None:
    assert postal.message(424242) == Permanent("MessageNotFound", "No message found matching provided ID", 200)
    assert isinstance(postal.deliveries(424242), Permanent)
    postal_api.fail_next("http", status=502)
    assert postal.message(1) == Temporary("HTTP 502", "Postal answered HTTP 502", 502)  # a read may be repeated
    postal_api.fail_next("slow", delay=8 * TIMEOUT)
    assert isinstance(postal.deliveries(1), Temporary)
    with postal_api.refusing():
        assert isinstance(postal.message(1), Temporary)


def test_the_api_key_appears_in_no_log_line_result_or_exception(
    postal_api: PostalSendAPI, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's connection lines included
    wrong = "wrong-key-Hh3kKq0e"
    postal = PostalClient(postal_api.url, API_KEY, timeout=TIMEOUT)
    impostor = PostalClient(postal_api.url, wrong, timeout=TIMEOUT)
    seen: list[object] = [postal, impostor]
    seen.append(impostor.send_raw(SENDER, ["bob@example.org"], mime()))  # Postal echoes the key back
    postal_api.fail_next("error", code="InvalidServerAPIKey", message=f"The API token {wrong} was not valid.")
    seen.append(impostor.send_raw(SENDER, ["bob@example.org"], mime()))
    seen.append(postal.send_raw(SENDER, ["bob@example.org"], mime()))
    for kind in ("slow", "reset", "drop", "http"):
        postal_api.fail_next(kind, delay=8 * TIMEOUT)
        seen.append(postal.send_raw(SENDER, ["bob@example.org"], mime()))
    with postal_api.refusing():
        seen.append(postal.send_raw(SENDER, ["bob@example.org"], mime()))
        seen.append(impostor.message(1))
    seen.append(impostor.deliveries(1))
    for call in (lambda: postal.send_raw(SENDER, [], mime()), lambda: PostalClient(postal_api.url, "")):
        with pytest.raises(Exception) as caught:
            call()
        seen.append(caught.value)
    assert {type(s) for s in seen} >= {Accepted, Permanent, Temporary, Uncertain}
    text = "\n".join([repr(s) for s in seen] + [str(s) for s in seen] + [r.getMessage() for r in caplog.records])
    assert caplog.records and wrong not in text and API_KEY not in text
    assert "[api key]" in text  # the echo was there, and was replaced


def test_the_same_url_serves_postals_jwks(postal_api: PostalSendAPI, postal_signer: PostalSigner) -> None:
    postal_api.jwks = postal_signer.jwks()
    postal_api.fail_next("http", status=502)  # meant for the next API call, not for the keys
    document = fetch_jwks(requests.Session(), f"{postal_api.url}/.well-known/jwks.json", timeout=2)
    assert json.loads(document) == postal_signer.jwks()
    assert not postal_api.seen
    postal = PostalClient(postal_api.url, API_KEY, timeout=TIMEOUT)
    assert isinstance(postal.send_raw(SENDER, ["bob@example.org"], mime()), Uncertain)


def test_settings_and_the_bridge_build_the_client_or_refuse_clearly(postal_api: PostalSendAPI, tmp_path: Path) -> None:
    base = {"BRIDGE_DOMAIN": "mail.example.test", "BRIDGE_DATA_DIR": str(tmp_path)}
    assert Settings.from_env(base).postal_timeout == 15.0
    with pytest.raises(SettingsError, match="BRIDGE_POSTAL_TIMEOUT"):
        Settings.from_env({**base, "BRIDGE_POSTAL_TIMEOUT": "soon"})
    full = {
        **base,
        "BRIDGE_POSTAL_URL": postal_api.url,
        "BRIDGE_POSTAL_API_KEY": API_KEY,
        "BRIDGE_POSTAL_TIMEOUT": "2.5",
    }
    client = Bridge(Settings.from_env(full)).postal_client
    assert (client.url, client.timeout) == (postal_api.url, 2.5)
    assert isinstance(client.send_raw(SENDER, ["bob@example.org"], mime()), Accepted)
    for missing in ("BRIDGE_POSTAL_URL", "BRIDGE_POSTAL_API_KEY"):
        bridge = Bridge(Settings.from_env({k: v for k, v in full.items() if k != missing}))
        with pytest.raises(PostalNotConfigured, match=missing):
            bridge.postal_client  # noqa: B018
        assert issubclass(PostalNotConfigured, SettingsError)  # the CLI and start-up print it as one line
