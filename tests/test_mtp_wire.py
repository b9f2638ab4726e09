"""MTP on the wire: payloads byte for byte as the reference Go server writes them (mtp-wire.md), the worked
receipt example exactly, and every refusal of the envelope parser and the verifier."""

from __future__ import annotations

import base64
import json
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio import lookups, mtp
from bridge.mailio.did import parse_did_document, server_did_document, user_did_document
from bridge.mailio.identity import generate_user_keys, mailio_address
from bridge.mailio.mtp import MtpError
from bridge.mailio.server_key import public_key_bytes
from bridge.mailio.status import StatusCode, code, parse_status_codes

SEED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RECEIPT_HEX = (
    "a3"
    "6f7369676e6174757265536368656d65"
    "6c45644453415f583235353139"
    "6974696d657374616d70"
    "1b0000018bcfe56800"
    "6e646964436f6d6d4d657373616765"
    "a3"
    "6474797065"
    "60"
    "626964"
    "626d31"
    "6466726f6d"
    "60"
)
RECEIPT_BODY = (
    '{"didCommRequest":{"signatureScheme":"EdDSA_X25519","timestamp":1700000000000,"didCommMessage":'
    '{"type":"","id":"m1","from":""}},"cborPayloadBase64":"o29zaWduYXR1cmVTY2hlbWVsRWREU0FfWDI1NTE5aXRpbWVz'
    'dGFtcBsAAAGLz+VoAG5kaWRDb21tTWVzc2FnZaNkdHlwZWBiaWRibTFkZnJvbWA=","signatureBase64":"IC3tgeBLbY7+sw7elBsD'
    'GLvoPXHqfAIJ2FMtuwYd0KUdcDMIl60vpQlmHSRZhbe0QjNxGNOQO4829MBMQx7IDA==","senderDomain":"mio.example.com"}'
)


def keys_of(data: bytes) -> list[str]:
    """The top-level keys of a CBOR map in wire order (cbor2 keeps it)."""
    return list(cbor2.loads(data).keys())


# --- the worked example (section 3.2) ----------------------------------------------------------


def test_worked_receipt_example_byte_for_byte() -> None:
    assert base64.b64encode(public_key_bytes(SEED_KEY)).decode() == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    payload = mtp.receipt("m1", 1700000000000)
    raw = mtp.encode_cbor(payload)
    assert len(raw) == 83
    assert raw.hex() == RECEIPT_HEX
    body = mtp.sign_request(mtp.DIDCOMM_REQUEST, payload, SEED_KEY, "mio.example.com")
    assert mtp.body_bytes(body).decode() == RECEIPT_BODY


def test_worked_receipt_example_parses_and_verifies() -> None:
    signed = mtp.parse_signed(RECEIPT_BODY.encode(), mtp.DIDCOMM_REQUEST)
    assert signed.sender_domain == "mio.example.com"
    payload = mtp.verify(signed, public_key_bytes(SEED_KEY))
    assert payload == {
        "signatureScheme": "EdDSA_X25519",
        "timestamp": 1700000000000,
        "didCommMessage": {"type": "", "id": "m1", "from": ""},
    }


def test_receipt_without_an_id_omits_it_but_keeps_type_and_from() -> None:
    raw = mtp.encode_cbor(mtp.receipt("", 1))
    assert cbor2.loads(raw)["didCommMessage"] == {"type": "", "from": ""}
    assert raw.endswith(bytes.fromhex("a26474797065606466726f6d60"))


# --- CBOR rules (section 2) --------------------------------------------------------------------


def test_message_keys_in_declaration_order_with_omitempty() -> None:
    jwe = {
        "protected": "p",
        "recipients": [
            {
                "header": {
                    "kid": "did:web:b.test#0x" + "1" * 40,
                    "alg": "X",
                    "epk": {"kty": "OKP", "crv": "X25519", "x": "e"},
                },
                "encrypted_key": "k",
            }
        ],
        "iv": "i",
        "ciphertext": "c",
        "tag": "t",
        "aad": "a",
        "unprotected": {"dropped": True},
    }
    message = mtp.did_comm_message(
        type=mtp.TYPE_ENCRYPTED,
        id="id1",
        from_="did:web:a.test#0x" + "2" * 40,
        to=["did:web:b.test#0x" + "1" * 40],
        thid="id1",
        created_time=1700000000123,
        intent="message",
        body=mtp.jwe_body(jwe),
        attachments=[mtp.attachment("att1", base64_data="aGk=")],
    )
    raw = mtp.encode_cbor(mtp.did_comm_request(message, 1700000000000))
    decoded = cbor2.loads(raw)
    assert list(decoded) == ["signatureScheme", "timestamp", "didCommMessage"]
    assert list(decoded["didCommMessage"]) == [
        "type",
        "id",
        "from",
        "to",
        "thid",
        "createdTime",
        "intent",
        "body",
        "attachments",
    ]
    body = decoded["didCommMessage"]["body"]
    assert list(body) == ["aad", "ciphertext", "iv", "recipients", "tag", "protected"]
    assert body["recipients"] == [
        {
            "encrypted_key": "k",
            "header": {"kid": "did:web:b.test#0x" + "1" * 40, "epk": {"x": "e", "crv": "X25519", "kty": "OKP"}},
        }
    ]
    # links is not omitempty: null is written as f6
    assert decoded["didCommMessage"]["attachments"] == [{"id": "att1", "data": {"base64": "aGk=", "links": None}}]
    assert bytes.fromhex("656c696e6b73f6") in raw  # "links": null
    # integers are shortest-form major type 0, never floats
    assert bytes.fromhex("6b6372656174656454696d651b0000018bcfe5687b") in raw
    assert b"\xfb" not in raw


def test_empty_values_are_omitted_but_required_keys_are_written_empty() -> None:
    message = mtp.did_comm_message(type="", from_="")
    assert mtp.encode_cbor(message) == bytes.fromhex("a26474797065606466726f6d60")
    assert mtp.did_comm_message(type="t", from_="f", to=[], expires_time=0, intent="") == {"type": "t", "from": "f"}


def test_delivery_message_shape_and_status_json() -> None:
    codes = [code("2.0.0", address="0x" + "a" * 40, timestamp=1700000000000), code("5.1.1", address="0x" + "b" * 40)]
    payload = mtp.delivery_message(
        msg_id="m1",
        from_did="did:web:b.test#0x" + "c" * 40,
        to_did="did:web:a.test#0x" + "d" * 40,
        codes=codes,
        timestamp_ms=5,
    )
    message = cbor2.loads(mtp.encode_cbor(payload))["didCommMessage"]
    assert list(message) == ["type", "id", "from", "to", "intent", "plainBodyBase64"]
    assert message["type"] == "application/didcomm-signed+json"
    assert message["intent"] == "delivery"
    assert message["to"] == ["did:web:a.test#0x" + "d" * 40]
    assert base64.b64decode(message["plainBodyBase64"]).decode() == (
        '{"statusCodes":[{"class":2,"subject":0,"detail":0,"description":"other or undefined status",'
        f'"address":"0x{"a" * 40}","timestamp":1700000000000}},'
        '{"class":5,"subject":1,"detail":1,"description":"bad destination mailbox address",'
        f'"address":"0x{"b" * 40}"}}]}}'
    )
    assert parse_status_codes(message["plainBodyBase64"]) == codes


def test_status_codes_from_the_reference_parse() -> None:
    # The reference's shape: description and address present, no timestamp.
    text = '{"statusCodes":[{"class":2,"subject":3,"detail":5,"description":"user lookup failed","address":"0xab"}]}'
    [parsed] = parse_status_codes(base64.b64encode(text.encode()).decode())
    assert (parsed.code, parsed.address, parsed.success) == ("2.3.5", "0xab", True)


@pytest.mark.parametrize(
    "document",
    [
        "not base64!",
        base64.b64encode(b"[1]").decode(),
        base64.b64encode(b'{"statusCodes":[]}').decode(),
        base64.b64encode(b'{"statusCodes":[{"class":3,"subject":0,"detail":0}]}').decode(),
        base64.b64encode(b'{"statusCodes":[{"class":2,"subject":"0","detail":0}]}').decode(),
        base64.b64encode(b'{"statusCodes":[{"class":2,"subject":0,"detail":true}]}').decode(),
        base64.b64encode(b'{"statusCodes":[{"class":2,"subject":0,"detail":0,"address":7}]}').decode(),
    ],
)
def test_status_codes_refuse_junk(document: str) -> None:
    with pytest.raises(ValueError):
        parse_status_codes(document)


def test_status_code_descriptions() -> None:
    assert code("5.8.11").description == "intent not supported"
    assert code("5.1.1").permanent and not code("4.4.4").permanent
    assert StatusCode.from_json({"class": 4, "subject": 4, "detail": 4}).code == "4.4.4"


# --- look-ups (sections 6 and 7) ---------------------------------------------------------------


def test_did_lookup_request_shape() -> None:
    payload = lookups.did_lookup_request("0x" + "1" * 40, [lookups.did_lookup("hash=", "a@b.test")], 1700000000000)
    raw = mtp.encode_cbor(payload)
    decoded = cbor2.loads(raw)
    assert list(decoded) == ["senderAddress", "lookupHeader", "didLookups"]
    assert list(decoded["lookupHeader"]) == ["signatureScheme", "emailLookupHashScheme", "timestamp"]
    assert decoded["lookupHeader"]["emailLookupHashScheme"] == "SC_N32768_R8_P1_L32_B64"
    assert decoded["didLookups"] == [{"emailHash": "hash=", "email": "a@b.test"}]
    empty = mtp.encode_cbor(lookups.did_lookup_request("0x", [], 1))
    assert empty.endswith(bytes.fromhex("6a6469644c6f6f6b75707380"))  # "didLookups": []


def test_did_lookup_response_shape_covers_the_document() -> None:
    keys = generate_user_keys()
    document = user_did_document("https://b.test", keys.address, keys.ed25519_public, keys.x25519_public)
    found = lookups.did_lookup("hash=", "a@b.test", supports_mailio=True, did_document=document)
    raw = mtp.encode_cbor(lookups.did_lookup_response([found], [], 7))
    decoded = cbor2.loads(raw)
    assert list(decoded) == ["lookupHeader", "foundLookups"]
    assert list(decoded["lookupHeader"]) == ["signatureScheme", "timestamp"]
    [lookup] = decoded["foundLookups"]
    assert list(lookup) == ["emailHash", "email", "supportsMailio", "didDocument"]
    assert parse_did_document(lookup["didDocument"]).x25519_public == keys.x25519_public
    nothing = cbor2.loads(mtp.encode_cbor(lookups.did_lookup_response([], [lookups.did_lookup("h", "")], 7)))
    assert list(nothing) == ["lookupHeader", "notFoundLookups"]


def test_handshake_lookup_request_shape() -> None:
    lookup = lookups.handshake_lookup(address="0x" + "1" * 40, origin_domain="a.test")
    payload = lookups.handshake_lookup_request("0x" + "2" * 40, [lookup], 9)
    decoded = cbor2.loads(mtp.encode_cbor(payload))
    assert list(decoded) == ["lookupHeader", "handshakeLookups", "returnDefaultServerHandshake", "senderAddress"]
    assert decoded["returnDefaultServerHandshake"] is True
    assert decoded["handshakeLookups"] == [
        {"address": "0x" + "1" * 40, "email": "", "originServer": {"domain": "a.test"}}
    ]


def test_handshake_response_shape() -> None:
    content = {
        "handshakeId": "h",
        "originServer": {"domain": "b.test"},
        "type": "user",
        "status": "accepted",
        "level": "none",
        "ownerPublicKey": "k",
        "ownerAddress": "0x1",
        "created": 1709502766479.0,
        "senderMetadata": {"address": "did:web:a.test#0x2"},
        "signatureScheme": "EdDSA_X25519",
    }
    raw = mtp.encode_cbor(lookups.handshake_response([lookups.handshake_response_content(content)], 3))
    [item] = cbor2.loads(raw)["handshakes"]
    assert list(item) == [
        "handshakeId",
        "originServer",
        "status",
        "level",
        "ownerPublicKey",
        "ownerAddress",
        "senderMetadata",
        "type",
        "signatureScheme",
        "created",
    ]
    assert raw.endswith(bytes.fromhex("6763726561746564fb4278e064e1d8f000"))  # created: 8-byte float
    assert mtp.encode_cbor(lookups.handshake_response([], 3)).endswith(bytes.fromhex("6a68616e647368616b657380"))


# --- DID documents (section 8) -----------------------------------------------------------------


def test_server_did_document() -> None:
    public = public_key_bytes(SEED_KEY)
    document = server_did_document("https://bridge.b.test/", public)
    address = mailio_address(public)
    assert list(document) == ["@context", "id", "verificationMethod", "service"]
    assert document["id"] == f"did:mailio:{address}"
    [service] = document["service"]
    assert service == {
        "id": f"did:mailio:{address}#didcomm",
        "type": "DIDCommMessaging",
        "serviceEndpoint": "https://bridge.b.test/api/v1/mtp/message",
        "accept": ["didcomm/v2", "didcomm/aip2;env=rfc587"],
    }
    parsed = parse_did_document(document)
    assert (parsed.ed25519_public, parsed.x25519_public, parsed.address) == (public, None, address)
    assert parsed.messaging_endpoint == "https://bridge.b.test/api/v1/mtp/message"


def test_user_did_document_service_hangs_off_the_server() -> None:
    keys = generate_user_keys()
    document = user_did_document(
        "https://b.test", keys.address, keys.ed25519_public, keys.x25519_public, server_address="0x" + "5" * 40
    )
    assert list(document) == ["@context", "id", "authentication", "verificationMethod", "keyAgreement", "service"]
    assert document["service"][0]["id"] == "did:mailio:0x" + "5" * 40 + "#didcomm"
    parsed = parse_did_document(document)
    assert (parsed.address, parsed.x25519_public) == (keys.address, keys.x25519_public)
    del document["keyAgreement"][0]["publicKeyJwk"]  # the reference's document: bare base58 only
    assert parse_did_document(document).x25519_public == keys.x25519_public


def test_did_document_whose_address_is_not_its_keys_is_refused() -> None:
    keys, other = generate_user_keys(), generate_user_keys()
    document = user_did_document("b.test", keys.address, keys.ed25519_public, keys.x25519_public)
    document["id"] = f"did:mailio:{other.address}"
    document["verificationMethod"][0]["id"] = f"did:mailio:{other.address}#master"
    with pytest.raises(ValueError, match="derive"):
        parse_did_document(document)
    for broken in ({"id": "nope"}, {"id": "did:mailio:0x1", "verificationMethod": []}, []):
        with pytest.raises(ValueError):
            parse_did_document(broken)


# --- the envelope: round trip and refusals -----------------------------------------------------


def signed_body(payload: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    payload = payload if payload is not None else mtp.receipt("m1", 1700000000000)
    body = mtp.sign_request(mtp.DIDCOMM_REQUEST, payload, SEED_KEY, "mio.example.com")
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def refused(body: Any, status: int, reason: str, **kwargs: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(MtpError) as caught:
        signed = mtp.parse_signed(raw, mtp.DIDCOMM_REQUEST, **kwargs)
        mtp.verify(signed, public_key_bytes(SEED_KEY))
    assert caught.value.status == status
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_round_trip_returns_the_cbor_never_the_twin() -> None:
    body = signed_body()
    body[mtp.DIDCOMM_REQUEST] = {"didCommMessage": {"id": "forged", "from": "did:web:evil.test#0x1"}}
    payload = mtp.verify(mtp.parse_signed(json.dumps(body).encode(), mtp.DIDCOMM_REQUEST), public_key_bytes(SEED_KEY))
    assert payload["didCommMessage"]["id"] == "m1"


def test_answers_carry_no_sender_domain() -> None:
    body = mtp.sign_request(mtp.DID_LOOKUP_RESPONSE, lookups.did_lookup_response([], [], 1), SEED_KEY, None)
    assert "senderDomain" not in body
    signed = mtp.parse_signed(json.dumps(body).encode(), mtp.DID_LOOKUP_RESPONSE, sender_domain=False)
    assert signed.sender_domain is None
    assert mtp.verify(signed, public_key_bytes(SEED_KEY))["lookupHeader"]["timestamp"] == 1


def test_unicode_sender_domain_becomes_a_labels() -> None:
    signed = mtp.parse_signed(json.dumps(signed_body(senderDomain="Bücher.Example")).encode(), mtp.DIDCOMM_REQUEST)
    assert signed.sender_domain == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b"[" * 100000 + b"]" * 100000, "not JSON"),
        (b'{"a":1,"a":2}', "appears twice"),
        ({"cborPayloadBase64": "", "signatureBase64": ""}, "didCommRequest is missing"),
        ("no twin", "didCommRequest is missing"),
        ("no cbor", "cborPayloadBase64 is missing"),
        ("no signature", "signatureBase64 is missing"),
        ("no domain", "senderDomain is missing"),
        ("unpadded cbor", "cborPayloadBase64 is not padded"),
        ("newline in cbor", "cborPayloadBase64 is not padded"),
        ("urlsafe signature", "signatureBase64 is not padded"),
        ("short signature", "64-byte"),
        ("domain with port", "invalid domain"),
        ("domain with underscore", "invalid domain"),
        ("domain with scheme", "invalid domain"),
        ("domain with trailing dot", "invalid domain"),
        ("domain address literal", "invalid domain"),
        ("domain not text", "senderDomain is missing"),
    ],
)
def test_parse_signed_refuses(body: Any, reason: str) -> None:
    good = signed_body()
    cbor_b64 = good["cborPayloadBase64"]
    variants: dict[str, dict[str, Any]] = {
        "no twin": {mtp.DIDCOMM_REQUEST: None},
        "no cbor": {"cborPayloadBase64": None},
        "no signature": {"signatureBase64": None},
        "no domain": {"senderDomain": None},
        "unpadded cbor": {"cborPayloadBase64": cbor_b64.rstrip("=")},
        "newline in cbor": {"cborPayloadBase64": cbor_b64[:40] + "\n" + cbor_b64[40:]},
        "urlsafe signature": {
            "signatureBase64": base64.urlsafe_b64encode(base64.b64decode(good["signatureBase64"])).decode()
        },
        "short signature": {"signatureBase64": base64.b64encode(b"x" * 63).decode()},
        "domain with port": {"senderDomain": "mio.example.com:8443"},
        "domain with underscore": {"senderDomain": "mio_x.example.com"},
        "domain with scheme": {"senderDomain": "https://mio.example.com"},
        "domain with trailing dot": {"senderDomain": "mio.example.com."},
        "domain address literal": {"senderDomain": "127.0.0.1"},
        "domain not text": {"senderDomain": 5},
    }
    if isinstance(body, str):
        body = signed_body(**variants[body])
    refused(body, 400, reason)


def test_parse_signed_refuses_an_oversized_body_before_parsing() -> None:
    refused(b"x" * 1001, 413, "over 1000 bytes", max_bytes=1000)
    mtp.parse_signed(json.dumps(signed_body()).encode(), mtp.DIDCOMM_REQUEST, max_bytes=1000)


def test_verify_refuses_another_key_and_tampered_bytes() -> None:
    other = Ed25519PrivateKey.generate()
    body = mtp.sign_request(mtp.DIDCOMM_REQUEST, mtp.receipt("m1", 1), other, "mio.example.com")
    refused(body, 401, "signature does not verify")
    good = signed_body()
    raw = bytearray(base64.b64decode(good["cborPayloadBase64"]))
    raw[-3] ^= 1
    refused(signed_body(cborPayloadBase64=base64.b64encode(bytes(raw)).decode()), 401, "signature does not verify")


def _signed_raw(raw: bytes) -> dict[str, Any]:
    return signed_body(
        cborPayloadBase64=base64.b64encode(raw).decode(), signatureBase64=base64.b64encode(SEED_KEY.sign(raw)).decode()
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\x00", "not a valid CBOR item"),
        (cbor2.dumps([1, 2]), "not a CBOR map"),
        (cbor2.dumps({"a": 1}) + b"\x00", "trailing bytes"),
        (bytes.fromhex("a2616101616102"), "not a valid CBOR item"),  # duplicate key "a"
        (cbor2.dumps({1: "a"}), "cborPayloadBase64"),
        (cbor2.dumps({"a": b"bytes"}), "not text, a number"),
        (cbor2.dumps({"a": float("nan")}), "non-finite"),
        (bytes.fromhex("a16161c11a514b67b0"), "not text, a number"),  # tag 1: a datetime
        (b"\xa1\x61a" * 40 + b"\x00", "CBOR"),  # nested deeper than any payload
    ],
)
def test_verify_refuses_signed_bytes_that_are_not_a_payload(raw: bytes, reason: str) -> None:
    refused(_signed_raw(raw), 400, reason)
