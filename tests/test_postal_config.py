"""Adding the bridge to a Postal: ``postal-setup`` says what to set up for this deployment, and
``postal_config/console.rb`` (which sets it up from ``postal console``) is valid Ruby."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def test_postal_setup_without_a_public_url_or_keys_says_so_instead_of_guessing(setup_text: Any, tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("not a key")
    text = setup_text(BRIDGE_POSTAL_PUBLIC_KEY="", BRIDGE_POSTAL_URL="http://127.0.0.1:9")
    assert "!! BRIDGE_PUBLIC_URL is not set." in text
    assert "<BRIDGE_PUBLIC_URL>/postal/inbound" in text and f"https://{DOMAIN}" not in text
    assert "jwks                      cannot fetch:" in text
    assert "none yet: every delivery gets 503" in text and "[ ] Postal's signing key trusted" in text
    assert f"Mailio TXT: the server key cannot be used: {tmp_path / 'server.key'} is not a PEM private key" in text


# --- console.rb ------------------------------------------------------------------------------------

RUBY = shutil.which("ruby")
needs_ruby = pytest.mark.skipif(RUBY is None, reason="ruby is not installed (make test installs Debian's ruby)")
CONSOLE = ROOT / "postal_config" / "console.rb"


@needs_ruby
def test_console_rb_is_valid_ruby() -> None:
    checked = subprocess.run([str(RUBY), "-wc", str(CONSOLE)], capture_output=True, text=True, timeout=60, check=False)
    assert (checked.returncode, checked.stdout.strip(), checked.stderr) == (0, "Syntax OK", "")


@needs_ruby
def test_console_rb_lowers_raw_message_retention_and_never_raises_it() -> None:
    """Its own logic, run against stand-ins for Postal's Server (no Postal here): twice each, the second a no-op."""
    cases = [
        {"env": {}, "days": 30, "size": 2048},  # Postal's defaults -> 1 day, the size cap left
        {"env": {"RAW_RETENTION_DAYS": "0"}, "days": 1, "size": 2048},
        {"env": {}, "days": 0, "size": None},  # an admin's lower choice is kept
        {"env": {"RAW_RETENTION_DAYS": "keep", "RAW_RETENTION_MB": "100"}, "days": 30, "size": 2048},
        {"env": {"RAW_RETENTION_DAYS": "-1"}, "days": 1, "size": 1},
        {"env": {"RAW_RETENTION_MB": "x"}, "days": 1, "size": 1},
        {"env": {"EVENTS_WEBHOOK": "0"}, "days": None, "size": 2048},  # no day limit at all -> 1 day
    ]
    harness = ROOT / "tests" / "data" / "postal_console_harness.rb"
    run = subprocess.run(
        [str(RUBY), str(harness), str(CONSOLE), json.dumps(cases)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert [(r.get("days"), r.get("size"), r.get("updates")) for r in results[:4]] == [
        (1, 2048, 1),
        (0, 2048, 1),
        (0, None, 0),
        (30, 100, 1),
    ]
    assert results[0]["printed"].splitlines() == [
        "Lowered raw message retention: 1 day(s), at most 2048 MB (Postal drops older raw messages daily at 03:00; "
        "message metadata is kept 60 days)",
        "Raw message retention is right: 1 day(s), at most 2048 MB (Postal drops older raw messages daily at 03:00; "
        "message metadata is kept 60 days)",
    ]
    assert results[4] == {"error": "RAW_RETENTION_DAYS must be a whole number of days from 0 to 30, or keep"}
    assert results[5] == {"error": "RAW_RETENTION_MB must be a whole number of megabytes from 1"}
    assert (results[6]["days"], results[6]["webhook"]) == (1, False) and results[0]["webhook"] is True


# --- systemd units ---------------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_verify_and_run_this_installs_commands(tmp_path: Path) -> None:
    """systemd's own check, with the install path pointed at this checkout (whose venv has both commands)."""
    units = []
    for unit in sorted((ROOT / "postal_config" / "systemd").glob("*.service")):
        text = unit.read_text()
        assert "EnvironmentFile=/etc/mailio-bridge/env" in text and "User=mailio-bridge" in text
        (tmp_path / unit.name).write_text(
            text.replace("/opt/mailio-bridge/.venv", str(Path(sys.executable).parents[1]))
        )
        units.append(str(tmp_path / unit.name))
    assert [Path(u).name for u in units] == ["mailio-bridge-web.service", "mailio-bridge-worker.service"]
    web, worker = (Path(u).read_text() for u in units)
    assert "/bin/gunicorn -c /opt/mailio-bridge/gunicorn.conf.py wsgi:app" in web
    assert "/bin/mailio-bridge worker" in worker
    checked = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert (checked.returncode, checked.stderr) == (0, "")
