"""The operator's and owner's command line, run as real processes against the suite's Redis."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import DOMAIN, run_worker
from tests.postal_sim import PostalSimulator, raw_payload

MESSAGE = b"From: Jane <jane@example.org>\r\nTo: ops@mail.example.test\r\nSubject: hi\r\n\r\nhello ops\r\n"


ROOT = Path(__file__).resolve().parents[1]


def cli(environment: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_owner_flow_through_the_cli(environment, live_url, bridge, postal_signer, tmp_path):
    key_file = tmp_path / "owner" / "ops.key.json"
    key_file.parent.mkdir()
    added = cli(environment, "mailbox", "add", f"Ops@{DOMAIN}", "--key-out", str(key_file))
    assert added.returncode == 0, added.stderr
    out = json.loads(added.stdout)
    assert out["email"] == f"ops@{DOMAIN}"
    assert out["address"].startswith("0x") and len(out["address"]) == 42
    assert out["key_file"] == str(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = json.loads(key_file.read_text())["encryption_key"]["d"]
    assert secret not in added.stdout + added.stderr

    listed = cli(environment, "mailbox", "list")
    assert json.loads(listed.stdout.splitlines()[0])["address"] == out["address"]

    token = cli(environment, "mailbox", "token", f"ops@{DOMAIN}").stdout.splitlines()[-1]

    payload = raw_payload(postal_id=7, rcpt_to=f"ops@{DOMAIN}", mail_from="jane@example.org", message=MESSAGE)
    assert PostalSimulator(f"{live_url}/postal/inbound", postal_signer).post(payload).status == 200
    run_worker(bridge)

    listing = cli(environment, "mail", "list", "--folder", "other", "--url", live_url, "--token", token)
    msg_id = json.loads(listing.stdout.splitlines()[0])["id"]
    env = {**os.environ, **environment}
    read = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "mail",
            "read",
            msg_id,
            "--key",
            str(key_file),
            "--url",
            live_url,
            "--token",
            token,
        ],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout == base64.b64decode(payload["message"])

    wrong = cli(environment, "mail", "read", msg_id, "--key", str(key_file), "--url", live_url, "--token", "nope")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr


def test_mailbox_add_with_given_public_keys_writes_no_key_file(environment, tmp_path):
    from bridge.mailio.identity import generate_user_keys, mailio_address

    keys = generate_user_keys()
    added = cli(
        environment,
        "mailbox",
        "add",
        f"sales@{DOMAIN}",
        "--ed25519-public",
        base64.b64encode(keys.ed25519_public).decode(),
        "--x25519-public",
        base64.b64encode(keys.x25519_public).decode(),
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    out = json.loads(added.stdout)
    assert out["address"] == mailio_address(keys.ed25519_public)
    assert "key_file" not in out and list(tmp_path.glob("*.key.json")) == []
    again = cli(environment, "mailbox", "add", f"Sales+x@{DOMAIN}", cwd=tmp_path)
    assert again.returncode == 1 and "already has a mailbox" in again.stderr


def test_a_bad_setting_stops_start_up_with_one_line(environment):
    bad = cli({**environment, "BRIDGE_UNKNOWN_RECIPIENT": "maybe"}, "mailbox", "list")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "mailio-bridge: BRIDGE_UNKNOWN_RECIPIENT must be bounce or drop"
    bad_dns = cli({**environment, "BRIDGE_DNS_NAMESERVERS": "1.2.3.4.5"}, "mailbox", "list")
    assert bad_dns.returncode == 2 and bad_dns.stderr.startswith("mailio-bridge: BRIDGE_DNS_NAMESERVERS:")
    assert len(bad_dns.stderr.strip().splitlines()) == 1
    missing = {k: v for k, v in environment.items() if k != "BRIDGE_DOMAIN"}
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_DOMAIN"} | missing
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("mailio-bridge: BRIDGE_DOMAIN is required")


def test_postal_keys_lists_the_kids_the_operator_compares_with_postal(environment, postal_signer):
    listed = cli(environment, "postal-keys")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [
        {"source": "BRIDGE_POSTAL_PUBLIC_KEY", "kid": postal_signer.kid}
    ]
    unreachable = cli({**environment, "BRIDGE_POSTAL_URL": "http://127.0.0.1:9"}, "postal-keys")
    assert json.loads(unreachable.stdout.splitlines()[-1])["source"] == "jwks"
    assert "error" in json.loads(unreachable.stdout.splitlines()[-1])
