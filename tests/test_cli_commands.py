"""The operator commands no other test ran: ``mailbox alias``, ``rebuild-index`` and ``run``, each as a
real ``python -m bridge`` process against the suite's Redis (``run`` starts its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import free_port
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_URL = "https://bridge.example.net"


def deliver(client: Any, signer: PostalSigner, postal_id: int, rcpt: str) -> Any:
    message = f"From: Jane <jane@example.org>\r\nTo: {rcpt}\r\nSubject: m{postal_id}\r\n\r\nhello\r\n".encode()
    body = ruby_json(raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=message))
    return client.post(
        "/postal/inbound", data=body, headers={**signer.sign_headers(body), "Content-Type": "application/json"}
    )


def ids_in(client: Any, owner: Owner, folder: str) -> list[str]:
    response = client.get(f"/api/v1/messages?folder={folder}&limit=200", headers=owner.auth)
    assert response.status_code == 200
    return sorted(r["id"] for r in response.get_json()["messages"])


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.strip() == f"mailio-bridge: {text}"


# --- mailbox alias ---------------------------------------------------------------------------------


def test_mailbox_alias_delivers_the_aliases_mail_to_the_mailbox(
    environment: dict[str, str], client: Any, bridge: Any, owner: Owner, postal_signer: PostalSigner
) -> None:
    aliased = cli(environment, "mailbox", "alias", owner.mailbox.email, f"Help@{DOMAIN.upper()}")
    assert aliased.returncode == 0, aliased.stderr
    assert json.loads(aliased.stdout) == {
        "email": owner.mailbox.email,
        "address": owner.mailbox.address,
        "aliases": [f"help@{DOMAIN}"],
    }
    listed = [json.loads(line) for line in cli(environment, "mailbox", "list").stdout.splitlines()]
    assert listed == [{"email": owner.mailbox.email, "address": owner.mailbox.address, "aliases": [f"help@{DOMAIN}"]}]

    assert deliver(client, postal_signer, 1, f"help+orders@{DOMAIN}").status_code == 200
    assert deliver(client, postal_signer, 2, f"nobody@{DOMAIN}").status_code == 404  # no alias: bounced
    run_worker(bridge)
    [record] = client.get("/api/v1/messages?folder=other", headers=owner.auth).get_json()["messages"]
    assert record["postal"]["rcpt_to"] == f"help+orders@{DOMAIN}"


def test_mailbox_alias_refuses_taken_addresses_unknown_mailboxes_and_non_addresses(
    environment: dict[str, str], bridge: Any, owner: Owner
) -> None:
    other = make_owner(bridge, f"sales@{DOMAIN}")
    assert cli(environment, "mailbox", "alias", owner.mailbox.email, f"help@{DOMAIN}").returncode == 0
    # an alias, or a mailbox's own address, belongs to one mailbox only
    one_line_error(
        cli(environment, "mailbox", "alias", other.mailbox.email, f"help@{DOMAIN}"), f"help@{DOMAIN} is taken"
    )
    one_line_error(
        cli(environment, "mailbox", "alias", other.mailbox.email, owner.mailbox.email),
        f"{owner.mailbox.email} is taken",
    )
    one_line_error(cli(environment, "mailbox", "alias", f"ghost@{DOMAIN}", f"boo@{DOMAIN}"), "no such mailbox")
    one_line_error(cli(environment, "mailbox", "alias", owner.mailbox.email, "not-an-address"), "not an e-mail address")
    # nothing changed for either mailbox
    listed = {
        json.loads(line)["email"]: json.loads(line)["aliases"]
        for line in cli(environment, "mailbox", "list").stdout.splitlines()
    }
    assert listed == {owner.mailbox.email: [f"help@{DOMAIN}"], other.mailbox.email: []}
    assert bridge.mailboxes.resolve(f"help@{DOMAIN}", cached=False).address == owner.mailbox.address


# --- rebuild-index over a stale index --------------------------------------------------------------


def test_rebuild_index_makes_every_listing_match_the_store(
    environment: dict[str, str],
    client: Any,
    bridge: Any,
    owner: Owner,
    postal_signer: PostalSigner,
    settings: Any,
    redis_url: str,
) -> None:
    for postal_id in (1, 2, 3):
        assert deliver(client, postal_signer, postal_id, owner.mailbox.email).status_code == 200
    run_worker(bridge)
    gone, moved, kept = ids_in(client, owner, "other")
    assert deliver(client, postal_signer, 4, owner.mailbox.email).status_code == 200  # stored, not yet filed
    address = owner.mailbox.address

    # Make the index stale in every way the store can differ from it:
    root = Path(settings.storage_url.removeprefix("file://")) / "mail" / address
    for stale in root.glob(f"{gone}.*"):  # a message whose objects are gone
        stale.unlink()
    record = bridge.messages.get_record(address, moved)  # a message whose folder changed in the store only
    bridge.messages.put_record({**record, "folder": "archive"})
    r = redis.Redis.from_url(redis_url)
    phantom = "a" * 32  # an index entry for a message that never existed
    r.zadd(f"bridge:idx:{address}:inbox", {phantom: time.time()})
    r.hset(f"bridge:rec:{address}", phantom, json.dumps({**record, "id": phantom, "folder": "inbox"}))
    r.zadd(f"bridge:idx:{address}:trash", {kept: time.time()})  # listed twice, once in the wrong folder
    assert ids_in(client, owner, "other") == sorted([gone, moved, kept])  # the listing lies now

    rebuilt = cli(environment, "rebuild-index")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout) == {"mailboxes": 1, "filed": 2, "queued_for_filing": 1, "outbound": 0}

    def store_folders() -> dict[str, list[str]]:
        folders: dict[str, list[str]] = {}
        for each in bridge.messages.records(address):
            if each.get("folder"):
                folders.setdefault(each["folder"], []).append(each["id"])
        return {folder: sorted(ids) for folder, ids in folders.items()}

    expected = store_folders()
    assert expected == {"other": [kept], "archive": [moved]}
    for folder in ("inbox", "other", "archive", "trash", "spam", "handshake"):
        assert ids_in(client, owner, folder) == expected.get(folder, []), folder
    assert client.get(f"/api/v1/messages/{gone}", headers=owner.auth).status_code == 404
    assert client.get(f"/api/v1/messages/{phantom}", headers=owner.auth).status_code == 404

    run_worker(bridge)  # the unfiled one was queued by the rebuild: filing it needs no new delivery
    assert len(ids_in(client, owner, "other")) == 2
    assert ids_in(client, owner, "archive") == [moved]


def test_rebuild_index_with_no_redis_configured_says_so_in_one_line(environment: dict[str, str], owner: Owner) -> None:
    env = {k: v for k, v in environment.items() if k != "BRIDGE_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "rebuild-index"],
        env={**{k: v for k, v in os.environ.items() if k != "BRIDGE_REDIS_URL"}, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("mailio-bridge: BRIDGE_REDIS_URL is required")


# --- run -------------------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@dataclass
class RunSession:
    """What one ``python -m bridge run`` did, from start to Ctrl-C, as seen from outside."""

    url: str
    data_dir: str
    env: dict[str, str]
    printed: str = ""
    filed: list[dict[str, Any]] = field(default_factory=list)
    children: set[int] = field(default_factory=set)
    exit_code: int | None = None
    survivors: list[int] = field(default_factory=list)
    stderr: str = ""
    answering_after: bool = True


def _start_and_interrupt(tmp: Path, signer: PostalSigner) -> RunSession:
    port = free_port()
    # DNS goes nowhere (nothing listens there): this delivery needs no verdict, only filing.
    env = bridge_environment(tmp, "redis://unused", signer, nameserver=f"127.0.0.1:{free_port()}")
    env.pop("BRIDGE_REDIS_URL")  # so it starts its private redis-server, as `make run` does
    env |= {"BRIDGE_LISTEN": f"127.0.0.1:{port}", "BRIDGE_WEB_WORKERS": "2", "BRIDGE_PUBLIC_URL": PUBLIC_URL}
    full_env = {**{k: v for k, v in os.environ.items() if k != "BRIDGE_REDIS_URL"}, **env, "PYTHONPATH": str(ROOT)}
    session = RunSession(url=f"http://127.0.0.1:{port}", data_dir=env["BRIDGE_DATA_DIR"], env=env)
    with (tmp / "run.out").open("wb") as out, (tmp / "run.err").open("wb") as err:
        # Its own process group, like a shell's foreground job: Ctrl-C is SIGINT to that whole group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            cwd=tmp,
            env=full_env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        seen: set[int] = set()
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (
                    f"`run` exited with {proc.returncode}: {(tmp / 'run.err').read_text()[-2000:]}"
                )
                assert time.monotonic() < deadline, f"no /healthz within 90 s: {(tmp / 'run.err').read_text()[-2000:]}"
                try:
                    if requests.get(f"{session.url}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            session.printed = (tmp / "run.out").read_text()

            # The whole bridge works: a mailbox (made by the CLI beside it), a delivery, filed by its worker.
            added = cli(env, "mailbox", "add", f"ops@{DOMAIN}", "--key-out", str(tmp / "ops.key.json"))
            assert added.returncode == 0, added.stderr
            token = cli(env, "mailbox", "token", f"ops@{DOMAIN}").stdout.splitlines()[-1]
            message = f"From: Jane <jane@example.org>\r\nTo: ops@{DOMAIN}\r\n\r\nhello\r\n".encode()
            body = ruby_json(
                raw_payload(postal_id=1, rcpt_to=f"ops@{DOMAIN}", mail_from="jane@example.org", message=message)
            )
            headers = {**signer.sign_headers(body), "Content-Type": "application/json"}
            response = requests.post(f"{session.url}/postal/inbound", data=body, headers=headers, timeout=30)
            assert (response.status_code, response.text) == (200, "stored\n")
            deadline = time.monotonic() + 60
            while not session.filed and time.monotonic() < deadline:
                time.sleep(0.3)
                session.filed = requests.get(
                    f"{session.url}/api/v1/messages?folder=other",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                ).json()["messages"]

            session.children = seen = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                session.exit_code = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                session.exit_code = None
            deadline = time.monotonic() + 10
            while [pid for pid in seen if alive(pid)] and time.monotonic() < deadline:
                time.sleep(0.1)
            session.survivors = [pid for pid in seen if alive(pid)]
            try:
                requests.get(f"{session.url}/healthz", timeout=2)
            except requests.RequestException:
                session.answering_after = False
        finally:
            # Whatever happened, leave nothing running: everything `run` started, then `run` itself.
            seen |= descendants(proc.pid)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            for pid in seen:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    session.stderr = (tmp / "run.err").read_text()
    session.printed = (tmp / "run.out").read_text()
    return session


@pytest.fixture(scope="module")
def run_session(tmp_path_factory: pytest.TempPathFactory, postal_signer: PostalSigner) -> RunSession:
    """One `run`, started, used and interrupted once for the tests below (it takes ~15 s)."""
    return _start_and_interrupt(tmp_path_factory.mktemp("run"), postal_signer)


def test_the_banner_says_what_postal_setup_says(run_session: RunSession) -> None:
    """One text for both: the endpoint and webhook URLs from BRIDGE_PUBLIC_URL, never from the mail domain."""
    setup = cli(run_session.env, "postal-setup")
    assert setup.returncode == 0, setup.stderr
    assert setup.stdout in run_session.printed
    assert f"{PUBLIC_URL}/postal/inbound" in setup.stdout and f"{PUBLIC_URL}/postal/events" in setup.stdout
    assert f"https://{DOMAIN}/postal" not in run_session.printed


def test_run_serves_and_files_mail(run_session: RunSession) -> None:
    assert f"running at {run_session.url}" in run_session.printed and "/postal/inbound" in run_session.printed
    [record] = run_session.filed  # its own worker filed the delivery, without anyone running one
    assert record["folder"] == "other" and record["status"] == "filed"
    # gunicorn 27's control socket is its own, under the data directory, never the per-user default that
    # a second instance on the host would share (and delete on its way down)
    sockets = [
        line.rsplit(" ", 1)[-1] for line in run_session.stderr.splitlines() if "Control socket listening at" in line
    ]
    assert sockets and all(path.startswith(run_session.data_dir) for path in sockets), sockets


def test_ctrl_c_stops_run_and_everything_it_started(run_session: RunSession) -> None:
    # redis-server, gunicorn's master and its two workers, the RQ worker (and whatever else it supervises)
    assert len(run_session.children) >= 5, run_session.children
    assert run_session.exit_code == 0, run_session.stderr[-2000:]
    assert run_session.survivors == [], "children outlived `run`"
    assert not run_session.answering_after


def test_ctrl_c_is_quiet(run_session: RunSession) -> None:
    """No traceback from any child on the way down (the worker once printed its pubsub thread dying)."""
    assert "Traceback" not in run_session.stderr and "KeyboardInterrupt" not in run_session.stderr, run_session.stderr[
        -3000:
    ]
