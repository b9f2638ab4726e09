"""Adding the bridge to a Postal: ``postal-setup`` says what to set up for this deployment, and
``postal_config/console.rb`` (which sets it up from ``postal console``) is valid Ruby."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bridge.__main__ import main
from bridge.mailio.server_key import load_server_key, txt_record
from tests.conftest import DOMAIN
from tests.postal_sim import PostalSigner

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_URL = "https://bridge.example.net"


@pytest.fixture
def setup_text(environment: dict[str, str], monkeypatch: Any, capsys: Any, tmp_path: Path) -> Any:
    """``mailio-bridge postal-setup`` (or another verb) with the test's settings plus ``extra``."""
    for name in [k for k in os.environ if k.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)

    def run(*args: str, **extra: str) -> str:
        for name, value in {**environment, "BRIDGE_SERVER_KEY_FILE": str(tmp_path / "server.key"), **extra}.items():
            monkeypatch.setenv(name, value)
        assert main(list(args or ["postal-setup"])) == 0
        return str(capsys.readouterr().out)

    return run


def test_postal_setup_prints_this_deployments_urls_settings_kids_and_records(
    setup_text: Any, postal_signer: PostalSigner, tmp_path: Path
) -> None:
    text = setup_text(BRIDGE_PUBLIC_URL=PUBLIC_URL + "/")
    for line in (
        f"URL                  {PUBLIC_URL}/postal/inbound",
        "Encoding             BodyAsJSON",
        "Format               RawMessage",
        "Timeout              30 s",
        f"URL                  {PUBLIC_URL}/postal/events",
        "Events               MessageSent, MessageDelayed, MessageDeliveryFailed, MessageHeld, MessageBounced",
        f"BRIDGE_POSTAL_PUBLIC_KEY  kid {postal_signer.kid}",
        "[x] Postal's signing key trusted (step 3)",
        "[ ] BRIDGE_POSTAL_API_KEY set (an API credential of the mail server: sending)",
    ):
        assert line in text, line
    assert f"https://{DOMAIN}/postal" not in text and "BRIDGE_PUBLIC_URL is not set" not in text
    # No server key yet: said so, with what to do; once made, its record exactly as peers look it up.
    assert "Mailio TXT: no server key yet. Run `mailio-bridge keys init`, then this command again." in text
    assert "[ ] server key made and its TXT record published (step 4)" in text
    setup_text("keys", "init", BRIDGE_PUBLIC_URL=PUBLIC_URL)
    record = txt_record(load_server_key(tmp_path / "server.key"))
    text = setup_text(BRIDGE_PUBLIC_URL=PUBLIC_URL, BRIDGE_POSTAL_API_KEY="k")
    assert f'mailio._mailiokey.{DOMAIN}. IN TXT "{record}"' in text and "no server key" not in text
    assert "[x] server key made" in text and "[x] BRIDGE_POSTAL_API_KEY set" in text


def test_postal_setup_without_a_public_url_or_keys_says_so_instead_of_guessing(
    setup_text: Any, tmp_path: Path
) -> None:
    (tmp_path / "server.key").write_text("not a key")
    text = setup_text(BRIDGE_POSTAL_PUBLIC_KEY="", BRIDGE_POSTAL_URL="http://127.0.0.1:9")
    assert "!! BRIDGE_PUBLIC_URL is not set." in text
    assert "<BRIDGE_PUBLIC_URL>/postal/inbound" in text and f"https://{DOMAIN}" not in text
    assert "jwks                      cannot fetch:" in text
    assert "none yet: every delivery gets 503" in text and "[ ] Postal's signing key trusted" in text
    assert f"Mailio TXT: the server key cannot be used: {tmp_path / 'server.key'} is not a PEM private key" in text
