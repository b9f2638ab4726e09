"""The installed console script ``mailio-bridge``: the same verbs as ``python -m bridge`` from any directory,
the client commands finding the bridge from the environment (never a fixed port), and errors that name the
file or the key problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.__main__ import main
from tests.conftest import DOMAIN, Owner, make_owner, run_worker
from tests.postal_sim import PostalSigner
from tests.test_cli_commands import deliver

SCRIPT = Path(sys.executable).parent / "mailio-bridge"


def script(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script as an operator runs it: no PYTHONPATH, not from the repository, no BRIDGE_* but env's."""
    assert SCRIPT.exists(), "the package is not installed into the venv (make test runs pip install -e .)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_") and k != "PYTHONPATH"}
    return subprocess.run(
        [str(SCRIPT), *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_script_has_the_same_verbs_and_works_from_any_directory(
    environment: dict[str, str], owner: Owner, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal's width: the same for both
    installed = script({}, "--help", cwd=tmp_path)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert installed.returncode == 0 and installed.stdout == capsys.readouterr().out
    assert "{mailbox,mail,handshake," in installed.stdout and "postal-setup" in installed.stdout
    listed = script(environment, "mailbox", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["email"] == owner.mailbox.email


def run(monkeypatch: Any, capsys: Any, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """One command in this process (the same main() the script calls), with exactly ``env`` of BRIDGE_*."""
    for name in [k for k in os.environ if k.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_client_commands_find_the_bridge_from_the_environment_or_say_so(
    live_url: str, owner: Owner, monkeypatch: Any, capsys: Any
) -> None:
    host_port = live_url.removeprefix("http://")
    dead = "http://127.0.0.1:9"
    token = {"BRIDGE_API_TOKEN": owner.token}
    for env in (
        {"BRIDGE_LISTEN": host_port},  # on the bridge's own machine
        {"BRIDGE_PUBLIC_URL": live_url, "BRIDGE_LISTEN": "127.0.0.1:9"},  # the public URL comes first
        {"BRIDGE_API_URL": live_url, "BRIDGE_PUBLIC_URL": dead, "BRIDGE_LISTEN": "127.0.0.1:9"},
    ):
        found = run(monkeypatch, capsys, {**token, **env}, "mail", "list")
        assert found == (0, "", "mailio-bridge: no messages in inbox"), env  # an empty answer says so
    code, _, err = run(monkeypatch, capsys, {**token, "BRIDGE_API_URL": dead}, "mail", "list")
    assert code == 1 and err.startswith(f"mailio-bridge: cannot reach {dead}")
    code, _, err = run(monkeypatch, capsys, token, "mail", "list")
    assert code == 1 and err.startswith("mailio-bridge: which bridge? give --url or set BRIDGE_API_URL")
    missing = Path("/nonexistent/notes.txt")
    attach = ("mail", "send", "--to", "kim@example.org", "--text", "hi", "--attach", str(missing))
    assert run(monkeypatch, capsys, {**token, "BRIDGE_API_URL": live_url}, *attach) == (
        1,
        "",
        f"mailio-bridge: cannot read {missing}: No such file or directory",
    )


def test_mail_read_names_the_file_or_the_key_problem(
    live_url: str,
    client: Any,
    bridge: Any,
    owner: Owner,
    postal_signer: PostalSigner,
    tmp_path: Path,
    monkeypatch: Any,
    capsysbinary: Any,
) -> None:
    assert deliver(client, postal_signer, 1, owner.mailbox.email).status_code == 200
    run_worker(bridge)
    [record] = client.get("/api/v1/messages?folder=other", headers=owner.auth).get_json()["messages"]
    monkeypatch.setenv("BRIDGE_API_URL", live_url)
    monkeypatch.setenv("BRIDGE_API_TOKEN", owner.token)

    def read(key: Path) -> tuple[int, bytes, str]:
        code = main(["mail", "read", record["id"], "--key", str(key)])
        out, err = capsysbinary.readouterr()
        return code, out, err.decode().strip()

    mine = tmp_path / "mine.key.json"
    mine.write_text(json.dumps(owner.keys.to_key_file(owner.mailbox.email)))
    code, out, _ = read(mine)
    assert code == 0 and b"hello" in out

    nowhere = tmp_path / "nowhere.key.json"
    assert read(nowhere) == (1, b"", f"mailio-bridge: cannot read key file {nowhere}: No such file or directory")
    garbled = tmp_path / "garbled.key.json"
    garbled.write_text("{not json")
    assert read(garbled) == (1, b"", f"mailio-bridge: {garbled} is not a key file: not JSON")
    broken = tmp_path / "broken.key.json"
    broken.write_text(json.dumps({**owner.keys.to_key_file(owner.mailbox.email), "encryption_key": {"kty": "RSA"}}))
    assert read(broken) == (
        1,
        b"",
        f"mailio-bridge: {broken} is not a usable key file: encryption_key is not an X25519 OKP JWK",
    )

    other = make_owner(bridge, f"sales@{DOMAIN}")
    theirs = tmp_path / "theirs.key.json"
    theirs.write_text(json.dumps(other.keys.to_key_file(other.mailbox.email)))
    assert read(theirs) == (
        1,
        b"",
        f"mailio-bridge: this key does not open that message (the key file is {other.mailbox.address}'s, "
        f"the message is sealed to {owner.mailbox.address})",
    )
