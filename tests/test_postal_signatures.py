"""Postal signature verification: the captured fixtures, every key source, key rotation over a real JWKS server.

A request the bridge wrongly accepts lets anyone inject mail; one it wrongly rejects bounces a real sender
(401 is a hard failure for Postal). Both directions are tested here, through bridge.postal.signatures only.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from flask import Flask
from werkzeug.datastructures import EnvironHeaders

from bridge import create_app
from bridge.postal.jwks import SharedJwks
from bridge.postal.signatures import (
    KeysUnavailable,
    PostalKeyring,
    SignatureError,
    key_id,
    load_public_keys,
)
from bridge.settings import Settings
from tests.conftest import DOMAIN, bridge_environment, make_owner
from tests.postal_sim import PostalSigner, PostalWebServer, raw_payload, ruby_json
from tests.test_inbound import MESSAGE

DATA = Path(__file__).parent / "data" / "postal"
FIXTURE_KID = "27bda43fb78619f6ecbe1c823d607621838d78649b1e8e7e0f76bec0822faac4"
SIGNED = json.loads((DATA / "signatures.json").read_text())
PEM_PATH = DATA / "test_signing_public.pem"


def fixture_request(name: str) -> tuple[bytes, dict[str, str]]:
    return (DATA / name).read_bytes(), dict(SIGNED[name])


def signature_headers(headers: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in names}


def fixture_key_pem_der() -> tuple[str, str]:
    key = load_public_keys(str(PEM_PATH))[0]
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pkcs1 = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    return base64.b64encode(spki).decode(), pkcs1.decode()


@pytest.fixture(scope="module")
def signer() -> PostalSigner:
    return PostalSigner(bits=1024)  # Postal still issues 1024-bit keys; also keeps the suite fast


@pytest.fixture(scope="module")
def other_signer() -> PostalSigner:
    return PostalSigner(bits=1024)


@pytest.fixture
def web() -> Iterator[PostalWebServer]:
    server = PostalWebServer()
    yield server
    server.close()


def free_port_url() -> str:
    """A loopback URL where nothing listens (the port was just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/.well-known/jwks.json"


# --------------------------------------------------------------------------- key ids and loading


def test_key_id_is_postals_kid_for_the_fixture_key() -> None:
    (key,) = load_public_keys(str(PEM_PATH))
    assert key_id(key) == FIXTURE_KID
    assert json.loads((DATA / "test_signing_jwks.json").read_text())["keys"][0]["kid"] == FIXTURE_KID


def test_key_sources_all_load_the_same_key(tmp_path: Path) -> None:
    p_value, pkcs1_pem = fixture_key_pem_der()
    pkcs1_file = tmp_path / "pkcs1.pem"
    pkcs1_file.write_text(pkcs1_pem)
    dkim = f"v=DKIM1; t=s; h=sha256; p={p_value};"
    dig_style = f'"v=DKIM1; t=s; h=sha256; p={p_value[:200]}" "{p_value[200:]};"'  # long TXT: two strings
    for spec in (str(PEM_PATH), str(pkcs1_file), p_value, dkim, dig_style, PEM_PATH.read_text()):
        keys = load_public_keys(spec)
        assert [key_id(k) for k in keys] == [FIXTURE_KID], spec[:30]


def test_several_keys_separated_by_commas_or_newlines(signer: PostalSigner, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(signer.public_pem())
    spec = f"{PEM_PATH}, {other}\n{signer.dkim_record()}\n"
    assert [key_id(k) for k in load_public_keys(spec)] == [FIXTURE_KID, signer.kid, signer.kid]
    assert load_public_keys("") == []


@pytest.mark.parametrize(
    ("bad_item", "reason"),
    [
        ("/nonexistent/secret-dir/postal.pem", "not a readable file"),
        ("v=DKIM1; t=s; p=", "revoked"),
        ("v=DKIM1; k=ed25519; p=MCowBQYDK2VwAyEA", "non-RSA"),
        ("v=DKIM1; t=s; h=sha256", "without a p= value"),
        ("QUJD" * 40, "not a PEM/DER public key"),
    ],
)
def test_a_bad_key_item_names_its_position_not_its_content(bad_item: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        load_public_keys(f"{PEM_PATH},{bad_item}")
    message = str(caught.value)
    assert "#2" in message
    assert bad_item not in message and "secret-dir" not in message
    assert "\n" not in message


def test_a_private_key_is_refused(tmp_path: Path, signer: PostalSigner) -> None:
    private = signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "signing.key"
    path.write_bytes(private)
    with pytest.raises(ValueError, match=r"#1.*private key"):
        load_public_keys(str(path))


# --------------------------------------------------------------------------- the captured fixtures


@pytest.mark.parametrize("name", sorted(SIGNED))
@pytest.mark.parametrize("source", ["pem", "dns_p", "dkim_record"])
def test_fixture_signatures_verify_with_configured_keys(name: str, source: str) -> None:
    p_value, _ = fixture_key_pem_der()
    spec = {"pem": str(PEM_PATH), "dns_p": p_value, "dkim_record": f"v=DKIM1; t=s; h=sha256; p={p_value};"}
    keyring = PostalKeyring(load_public_keys(spec[source]), None)
    body, headers = fixture_request(name)
    assert keyring.verify(body, headers) == FIXTURE_KID


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_fixture_signatures_verify_with_postals_jwks(name: str, web: PostalWebServer) -> None:
    web.jwks = json.loads((DATA / "test_signing_jwks.json").read_text())
    keyring = PostalKeyring([], web.jwks_url)
    body, headers = fixture_request(name)
    assert keyring.verify(body, headers) == FIXTURE_KID
    assert keyring.verify(body, headers) == FIXTURE_KID
    assert web.hits == 1  # fetched lazily once, then cached


def test_header_names_are_case_insensitive_for_dicts_and_werkzeug() -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_raw.json")
    lowered = {k.lower(): v for k, v in headers.items()}
    assert keyring.verify(body, lowered) == FIXTURE_KID
    # What arrives through WSGI: Net::HTTP capitalizes the KID header to X-Postal-Signature-Kid.
    environ = {
        "HTTP_X_POSTAL_SIGNATURE_KID": headers["X-Postal-Signature-KID"],
        "HTTP_X_POSTAL_SIGNATURE": headers["X-Postal-Signature"],
        "HTTP_X_POSTAL_SIGNATURE_256": headers["X-Postal-Signature-256"],
    }
    assert keyring.verify(body, EnvironHeaders(environ)) == FIXTURE_KID


def test_sha1_only_request_from_old_postal_verifies() -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_hash.json")
    assert keyring.verify(body, signature_headers(headers, "X-Postal-Signature")) == FIXTURE_KID
    with_kid = signature_headers(headers, "X-Postal-Signature", "X-Postal-Signature-KID")
    assert keyring.verify(body, with_kid) == FIXTURE_KID


# --------------------------------------------------------------------------- rejections


def test_tampered_body_is_rejected() -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_raw.json")
    for tampered in (body + b"\n", body.replace(b'"id":4821', b'"id":4822'), body[:-1], b""):
        with pytest.raises(SignatureError):
            keyring.verify(tampered, headers)


def test_the_256_signature_wins_even_when_sha1_would_match() -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_raw.json")
    _, other_headers = fixture_request("inbound_hash.json")
    downgraded = {**headers, "X-Postal-Signature-256": other_headers["X-Postal-Signature-256"]}
    with pytest.raises(SignatureError, match="does not match"):
        keyring.verify(body, downgraded)
    with pytest.raises(SignatureError):
        keyring.verify(body, {**headers, "X-Postal-Signature-256": ""})


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:100] + "\n" + s[100:],  # not strict base64
        lambda s: s.rstrip("="),  # padding dropped
        lambda s: "!" + s[1:],
        lambda s: s[:-4],  # truncated signature
        lambda s: s + "AAAA",
        lambda s: "A" * 3000,  # absurdly long
    ],
)
def test_malformed_signatures_are_rejected(mangle) -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_raw.json")
    bad = {**headers, "X-Postal-Signature-256": mangle(headers["X-Postal-Signature-256"])}
    with pytest.raises(SignatureError):
        keyring.verify(body, bad)


def test_missing_signature_and_malformed_kid_are_rejected() -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, headers = fixture_request("inbound_raw.json")
    with pytest.raises(SignatureError, match="missing"):
        keyring.verify(body, {"Content-Type": "application/json"})
    with pytest.raises(SignatureError, match="key id"):
        keyring.verify(body, {**headers, "X-Postal-Signature-KID": "../../etc/passwd"})


def test_a_signature_by_another_key_is_rejected(signer: PostalSigner) -> None:
    keyring = PostalKeyring(load_public_keys(str(PEM_PATH)), None)
    body, _ = fixture_request("inbound_raw.json")
    with pytest.raises(SignatureError, match="unknown"):
        keyring.verify(body, signer.sign_headers(body))  # its own (unknown) KID
    forged = {**signer.sign_headers(body), "X-Postal-Signature-KID": FIXTURE_KID}
    with pytest.raises(SignatureError, match="does not match"):
        keyring.verify(body, forged)  # claims the trusted KID
    with pytest.raises(SignatureError, match="does not match"):
        keyring.verify(body, signer.sign_headers(body, kid=False))  # old-style, no KID


def test_nothing_configured_is_unavailable_not_unauthorized() -> None:
    body, headers = fixture_request("inbound_raw.json")
    with pytest.raises(KeysUnavailable):
        PostalKeyring([], None).verify(body, headers)
    with pytest.raises(KeysUnavailable):
        PostalKeyring([], None).verify(body, signature_headers(headers, "X-Postal-Signature-256"))


# --------------------------------------------------------------------------- rotation and JWKS


def test_two_configured_keys_both_verify(signer: PostalSigner, other_signer: PostalSigner) -> None:
    keyring = PostalKeyring([signer.public_key, other_signer.public_key], None)
    body = b'{"id":1}'
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid
    assert keyring.verify(body, other_signer.sign_headers(body)) == other_signer.kid
    # An old Postal sends no KID: every key is tried.
    assert keyring.verify(body, other_signer.sign_headers(body, kid=False, sha256=False)) == other_signer.kid


def test_unknown_kid_refetches_the_jwks_and_picks_up_a_rotated_key(
    web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    web.jwks = signer.jwks()
    keyring = PostalKeyring([], web.jwks_url, refresh_seconds=0.0)
    body = b'{"id":2}'
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid
    assert web.hits == 1
    web.jwks = other_signer.jwks()  # Postal's signing key was rotated
    assert keyring.verify(body, other_signer.sign_headers(body)) == other_signer.kid
    assert web.hits == 2
    # Postal signs every attempt with its current key: a key gone from the JWKS is no longer trusted.
    with pytest.raises(SignatureError, match="unknown"):
        keyring.verify(body, signer.sign_headers(body))
    assert web.hits == 3


def test_refetch_is_rate_limited(web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner) -> None:
    web.jwks = signer.jwks()
    keyring = PostalKeyring([], web.jwks_url, refresh_seconds=0.5)
    body = b'{"id":3}'
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid
    web.jwks = {"keys": [signer.jwk(), other_signer.jwk()]}
    for _ in range(20):  # a burst of unknown KIDs (forged or just rotated) within the window
        with pytest.raises(SignatureError, match="unknown"):
            keyring.verify(body, other_signer.sign_headers(body))
    assert web.hits == 1
    time.sleep(0.6)
    assert keyring.verify(body, other_signer.sign_headers(body)) == other_signer.kid
    assert web.hits == 2


def test_one_fetch_for_a_crowd_of_threads(web: PostalWebServer, signer: PostalSigner) -> None:
    web.jwks = signer.jwks()
    keyring = PostalKeyring([], web.jwks_url)
    body = b'{"id":4}'
    headers = signer.sign_headers(body)
    results: list[str] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        results.append(keyring.verify(body, headers))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [signer.kid] * 16
    assert web.hits == 1


def test_jwks_down_with_an_unknown_kid_is_unavailable(signer: PostalSigner) -> None:
    keyring = PostalKeyring([], free_port_url(), timeout=1.0)
    body = b'{"id":5}'
    with pytest.raises(KeysUnavailable):
        keyring.verify(body, signer.sign_headers(body))
    with pytest.raises(KeysUnavailable):
        keyring.verify(body, signer.sign_headers(body, kid=False))


def test_jwks_down_but_a_configured_key_still_verifies(signer: PostalSigner) -> None:
    keyring = PostalKeyring([signer.public_key], free_port_url(), timeout=1.0)
    body = b'{"id":6}'
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid


@pytest.mark.parametrize("failure", ["status", "garbage", "not_jwks"])
def test_a_broken_jwks_is_unavailable_then_recovers(web: PostalWebServer, signer: PostalSigner, failure: str) -> None:
    if failure == "status":
        web.status = 502
    elif failure == "garbage":
        web.jwks = b"<html>Bad gateway</html>"
    else:
        web.jwks = {"keys": "nope"}
    keyring = PostalKeyring([], web.jwks_url, failure_retry_seconds=0.2)
    body = b'{"id":7}'
    with pytest.raises(KeysUnavailable):
        keyring.verify(body, signer.sign_headers(body))
    web.status, web.jwks = 200, signer.jwks()
    time.sleep(0.3)
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid


def test_a_jwks_kid_that_does_not_match_its_key_is_not_trusted(
    web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    lying = {**other_signer.jwk(), "kid": signer.kid}  # other's key published under signer's name
    web.jwks = {"keys": [lying]}
    keyring = PostalKeyring([], web.jwks_url)
    body = b'{"id":8}'
    forged = {**other_signer.sign_headers(body), "X-Postal-Signature-KID": signer.kid}
    with pytest.raises(SignatureError):
        keyring.verify(body, forged)
    with pytest.raises(SignatureError):
        keyring.verify(body, other_signer.sign_headers(body))
    assert keyring.known_kids == []


def test_verification_is_fast(signer: PostalSigner) -> None:
    keyring = PostalKeyring([PostalSigner(bits=2048).public_key, signer.public_key], None)
    body = b"x" * 20_000
    headers = signer.sign_headers(body)
    start = time.perf_counter()
    for _ in range(200):
        keyring.verify(body, headers)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 0.002, f"{per_call * 1000:.3f} ms per verification"


# --- the last good JWKS, shared between processes through Redis ----------------------------------------
#
# Each Bridge below stands for one web process: its own keyring, its own in-process copy, the suite's
# real Redis between them. Postal's web host is a real HTTP server, stopped or failing mid-test.


def _two_processes(tmp_path: Path, redis_url: str, web: PostalWebServer) -> tuple[Flask, Flask]:
    env = bridge_environment(tmp_path, redis_url, PostalSigner(bits=1024), BRIDGE_POSTAL_URL=web.url)
    env.pop("BRIDGE_POSTAL_PUBLIC_KEY")  # JWKS only, as a Postal >= 3.2 install is usually configured
    first, second = create_app(Settings.from_env(env)), create_app(Settings.from_env(env))
    make_owner(first.extensions["bridge"], f"support@{DOMAIN}")
    return first, second


def _deliver(app: Flask, signer: PostalSigner, postal_id: int) -> int:
    body = ruby_json(
        raw_payload(postal_id=postal_id, rcpt_to=f"support@{DOMAIN}", mail_from="a@example.org", message=MESSAGE)
    )
    headers = {**signer.sign_headers(body), "Content-Type": "application/json"}
    return app.test_client().post("/postal/inbound", data=body, headers=headers).status_code


def test_with_postal_down_a_process_uses_the_keys_another_process_fetched(
    tmp_path: Path, redis_url: str, web: PostalWebServer, signer: PostalSigner
) -> None:
    web.jwks = signer.jwks()
    first, second = _two_processes(tmp_path, redis_url, web)
    assert _deliver(first, signer, 1) == 200  # fetched Postal's JWKS, and shared it
    web.close()  # Postal's web host goes away; the second process has never fetched
    assert _deliver(second, signer, 2) == 200  # before: 503 here while the first process said 200
    assert _deliver(first, signer, 3) == 200
    assert web.hits == 1


def test_a_rotation_another_process_fetched_is_picked_up_without_refetching(
    tmp_path: Path, redis_url: str, web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    web.jwks = signer.jwks()
    first, second = _two_processes(tmp_path, redis_url, web)
    assert _deliver(first, signer, 1) == 200
    web.jwks = other_signer.jwks()  # Postal rotated its key; only the second process has fetched since
    assert _deliver(second, other_signer, 2) == 200
    assert web.hits == 2
    # The first process may not refetch yet (rate limit), and used to answer 401 (a bounce) here.
    assert _deliver(first, other_signer, 3) == 200
    assert web.hits == 2
    web.status = 502  # then Postal's web host fails: both keep answering alike
    assert _deliver(first, other_signer, 4) == 200
    assert _deliver(second, other_signer, 5) == 200


def test_refetches_stay_rate_limited_when_the_shared_set_stands_in(
    redis_url: str, web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    connection = redis.Redis.from_url(redis_url)
    web.jwks = signer.jwks()
    body = b'{"id":20}'
    assert PostalKeyring([], web.jwks_url, shared_redis=lambda: connection).verify(body, signer.sign_headers(body))
    web.status = 502
    late = PostalKeyring([], web.jwks_url, shared_redis=lambda: connection)
    assert late.verify(body, signer.sign_headers(body)) == signer.kid  # its fetch failed; the shared set
    assert web.hits == 2
    for _ in range(20):  # forged or rotated KIDs while Postal is down: one failed fetch, then the limit
        with pytest.raises(KeysUnavailable):
            late.verify(body, other_signer.sign_headers(body))
    assert web.hits == 2


def test_with_redis_down_each_process_keeps_its_own_copy(
    web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    dead = redis.Redis.from_url(free_port_url().replace("http://", "redis://"), socket_connect_timeout=0.5)
    web.jwks = signer.jwks()
    body = b'{"id":21}'
    keyring = PostalKeyring([], web.jwks_url, shared_redis=lambda: dead, refresh_seconds=0.0)
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid  # sharing failed, quietly
    web.status = 502
    assert keyring.verify(body, signer.sign_headers(body)) == signer.kid  # its in-process copy
    with pytest.raises(KeysUnavailable):  # unknown KID, no JWKS, no Redis: Postal retries later
        keyring.verify(body, other_signer.sign_headers(body))
    fresh = PostalKeyring([], web.jwks_url, shared_redis=lambda: dead)
    with pytest.raises(KeysUnavailable):
        fresh.verify(body, signer.sign_headers(body))


def test_a_shared_set_is_parsed_again_and_its_claimed_kids_are_not_trusted(
    redis_url: str, web: PostalWebServer, signer: PostalSigner, other_signer: PostalSigner
) -> None:
    connection = redis.Redis.from_url(redis_url)
    lying = json.dumps({"keys": [{**other_signer.jwk(), "kid": signer.kid}]}).encode()
    SharedJwks(lambda: connection, web.jwks_url).store(lying, time.time())
    web.status = 502
    keyring = PostalKeyring([], web.jwks_url, shared_redis=lambda: connection)
    body = b'{"id":22}'
    forged = {**other_signer.sign_headers(body), "X-Postal-Signature-KID": signer.kid}
    with pytest.raises(KeysUnavailable):  # signer's KID is nowhere: the lying entry was dropped
        keyring.verify(body, forged)
    assert keyring.known_kids == []
