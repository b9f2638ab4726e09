"""The server's Mailio identity: ``keys init`` makes a private key only its owner reads and never replaces it;
``dns-records`` prints the exact TXT record, and a peer resolving it through DNS (Knot) gets the key that
verifies our signatures."""

from __future__ import annotations

import base64
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bridge.context import Bridge
from bridge.mailio import mtp
from bridge.mailio.discovery import parse_mailio_record
from bridge.mailio.server_key import ServerKeyError, load_server_key, public_key_bytes
from bridge.settings import Settings, SettingsError
from tests.test_cli import cli


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"BRIDGE_DOMAIN": "b.example.test", "BRIDGE_DATA_DIR": str(tmp_path / "data")}


def test_keys_init_creates_a_private_key_and_never_overwrites_it(env: dict[str, str], tmp_path: Path) -> None:
    created = cli(env, "keys", "init")
    assert created.returncode == 0, created.stderr
    out = json.loads(created.stdout)
    path = tmp_path / "data" / "server.key"
    assert out["key_file"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_server_key(path)
    public = base64.b64encode(public_key_bytes(key)).decode()
    assert out["txt"] == f"v=MAILIO1; k=ed25519; p={public}"
    before = path.read_bytes()

    again = cli(env, "keys", "init")
    assert again.returncode == 1
    assert again.stderr.strip() == f"mailio-bridge: {path} exists already; not overwriting the server key"
    assert path.read_bytes() == before


def test_keys_init_writes_where_the_setting_says(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "mtp.pem"
    created = cli({**env, "BRIDGE_SERVER_KEY_FILE": str(path)}, "keys", "init")
    assert created.returncode == 0, created.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "data" / "server.key").exists()


def test_dns_records_without_a_key_says_how_to_make_one(env: dict[str, str]) -> None:
    result = cli(env, "dns-records")
    assert result.returncode == 1
    assert "run `python -m bridge keys init`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dns_records_publish_the_key_that_verifies_our_signatures(
    env: dict[str, str], tmp_path: Path, knot_dns: Any, redis_url: str
) -> None:
    domain = f"s{uuid.uuid4().hex[:10]}.mailio.test"
    env = {**env, "BRIDGE_DOMAIN": domain}
    assert cli(env, "keys", "init").returncode == 0
    printed = cli(env, "dns-records")
    assert printed.returncode == 0, printed.stderr
    first, *notes = printed.stdout.splitlines()
    key = load_server_key(tmp_path / "data" / "server.key")
    value = f"v=MAILIO1; k=ed25519; p={base64.b64encode(public_key_bytes(key)).decode()}"
    assert first == f'mailio._mailiokey.{domain}. IN TXT "{value}"'
    assert all(line.startswith("; ") for line in notes)
    assert parse_mailio_record(value) == public_key_bytes(key)

    # Published as printed, a peer's discovery finds the key and our signed receipt verifies with it.
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", value)
    peer = Bridge(
        Settings.from_env({**env, "BRIDGE_REDIS_URL": redis_url, "BRIDGE_DNS_NAMESERVERS": knot_dns.nameserver})
    )
    route = peer.discovery.discover(domain, fresh=True)
    assert (route.route, route.host) == ("mailio", domain)
    body = mtp.sign_request(mtp.DIDCOMM_REQUEST, mtp.receipt("m1", 1), key, domain)
    signed = mtp.parse_signed(mtp.body_bytes(body), mtp.DIDCOMM_REQUEST)
    assert mtp.verify(signed, route.public_key)["didCommMessage"]["id"] == "m1"


def test_a_key_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "x25519.pem"
    wrong.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ServerKeyError, match="not an Ed25519 key"):
        load_server_key(wrong)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ServerKeyError, match="not a PEM private key"):
        load_server_key(junk)


def test_public_url_setting(env: dict[str, str]) -> None:
    assert Settings.from_env(env).public_base_url == "https://b.example.test"
    assert Settings.from_env({**env, "BRIDGE_PUBLIC_URL": "https://bridge.b.test/"}).public_base_url == (
        "https://bridge.b.test"
    )
    for bad in ("ftp://b.test", "bridge.b.test", "https://b.test/?x=1", "https://"):
        with pytest.raises(SettingsError, match="BRIDGE_PUBLIC_URL"):
            Settings.from_env({**env, "BRIDGE_PUBLIC_URL": bad})
