"""The operator's side of mailboxes and tokens: named tokens with their creation and last use, revoking one
(401 on every owner endpoint from then on), tokens issued before names keep working, removing an alias, and
removing a mailbox (refused while it holds mail; ``--purge`` leaves nothing of it in the store or in Redis).

The commands run in this process through the same ``main()`` the console script calls, against the suite's
real Redis and a filesystem store; the API is the real app."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge import create_app
from bridge.__main__ import main
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, make_owner, run_worker
from tests.test_isolation import ROUTES, assert_refused, call, deliver


@pytest.fixture
def mail(client: Any, bridge: Any, owner: Owner, postal_signer: Any) -> dict[str, Any]:
    """Two mailboxes with one filed message each, as ``test_isolation.call`` wants them."""
    stranger = make_owner(bridge, f"sales@{DOMAIN}")
    deliver(client, postal_signer, 1, owner.mailbox.email)
    deliver(client, postal_signer, 2, stranger.mailbox.email)
    run_worker(bridge)
    [mine] = list(bridge.messages.records(owner.mailbox.address))
    return {"owner": owner, "stranger": stranger, "mine": mine["id"]}


@pytest.fixture
def cli(environment: dict[str, str], monkeypatch: Any, capsys: Any) -> Any:
    """``mailio-bridge ARGS`` with the test's settings: (exit code, stdout lines as JSON when they are, stderr)."""
    for name in [k for k in os.environ if k.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    def run(*args: str) -> tuple[int, list[Any], str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        lines = [json.loads(line) if line.startswith("{") else line for line in out.splitlines()]
        return code, lines, err.strip()

    return run


def test_tokens_are_named_listed_with_their_last_use_and_names_are_unique(cli: Any, client: Any, owner: Owner) -> None:
    email = owner.mailbox.email
    code, lines, _ = cli("mailbox", "token", email, "--name", "laptop")
    assert code == 0 and lines[0] == f"API token laptop for {email} (shown once; store it safely):"
    laptop = lines[-1]
    assert cli("mailbox", "token", email)[1][0].startswith("API token token-2 for")  # the fixture's is token-1
    assert cli("mailbox", "token", email, "--name", "laptop")[2] == (
        "mailio-bridge: laptop is taken: this mailbox has a token of that name already"
    )
    assert cli("mailbox", "token", email, "--name", "../x")[0] == 1

    _, listed, _ = cli("mailbox", "tokens", email)
    assert [t["name"] for t in listed] == ["token-1", "laptop", "token-2"]
    assert all(t["created"].endswith("+00:00") and t["last_used"] is None for t in listed)
    assert laptop not in json.dumps(listed)

    assert client.get("/api/v1/messages", headers={"Authorization": f"Bearer {laptop}"}).status_code == 200
    second = {"Authorization": f"Bearer {cli('mailbox', 'token', email, '--name', 'second')[1][-1]}"}
    assert client.get("/api/v1/messages?folder=nope", headers=second).status_code == 400  # not a use
    used = {t["name"]: t["last_used"] for t in cli("mailbox", "tokens", email)[1]}
    assert used["second"] is None
    assert used["laptop"] is not None and used["token-1"] is None and used["token-2"] is None
    assert cli("mailbox", "tokens", f"nobody@{DOMAIN}")[2] == "mailio-bridge: no such mailbox"


def test_a_revoked_token_is_401_on_every_owner_endpoint(cli: Any, client: Any, mail: dict[str, Any]) -> None:
    owner: Owner = mail["owner"]
    kept = cli("mailbox", "token", owner.mailbox.email, "--name", "phone")[1][-1]
    assert call(client, ROUTES[0], mail, f"Bearer {owner.token}").status_code == 200  # works until revoked
    assert cli("mailbox", "revoke-token", owner.mailbox.email, "token-1") == (
        0,
        [{"email": owner.mailbox.email, "revoked": "token-1"}],
        "",
    )
    for route in ROUTES:  # test_isolation's table, which a new owner endpoint must join
        assert_refused(call(client, route, mail, f"Bearer {owner.token}"))
    assert call(client, ROUTES[0], mail, f"Bearer {kept}").status_code == 200  # the other token still works
    assert [t["name"] for t in cli("mailbox", "tokens", owner.mailbox.email)[1]] == ["phone"]
    assert cli("mailbox", "revoke-token", owner.mailbox.email, "token-1")[2] == (
        "mailio-bridge: this mailbox has no token named token-1"
    )
    # a name is per mailbox: the stranger's token-1 is not the owner's to revoke, and still works
    assert call(client, ROUTES[0], mail, f"Bearer {mail['stranger'].token}").status_code == 200


def test_a_token_issued_before_names_keeps_working_until_revoked(
    cli: Any, client: Any, bridge: Any, owner: Owner
) -> None:
    """What earlier versions stored for a token: its hash, the mailbox and when; no name, no name entry."""
    old = "mbx_" + "o" * 43
    digest = hashlib.sha256(old.encode()).hexdigest()
    record = {"address": owner.mailbox.address, "created": 1_700_000_000.0}
    bridge.objects.put(f"tokens/{digest}.json", json.dumps(record).encode())
    auth = {"Authorization": f"Bearer {old}"}
    assert client.get("/api/v1/messages", headers=auth).status_code == 200

    listed = {t["name"]: t for t in cli("mailbox", "tokens", owner.mailbox.email)[1]}
    assert set(listed) == {"token-1", f"unnamed-{digest[:12]}"}
    assert listed[f"unnamed-{digest[:12]}"]["created"] == "2023-11-14T22:13:20+00:00"
    assert cli("mailbox", "revoke-token", owner.mailbox.email, f"unnamed-{digest[:12]}")[0] == 0
    assert client.get("/api/v1/messages", headers=auth).status_code == 401
    assert client.get("/api/v1/messages", headers=owner.auth).status_code == 200


def test_an_alias_can_be_removed_and_its_mail_then_bounces(
    cli: Any, settings: Settings, owner: Owner, postal_signer: Any
) -> None:
    email, alias = owner.mailbox.email, f"help@{DOMAIN}"
    assert cli("mailbox", "alias", email, alias)[0] == 0
    assert cli("mailbox", "alias", email, f"other@{DOMAIN}", "--remove")[2] == (
        f"mailio-bridge: other@{DOMAIN} is not an alias of {email}"
    )
    code, [shown], _ = cli("mailbox", "alias", email, alias.upper(), "--remove")
    assert code == 0 and shown == {"email": email, "address": owner.mailbox.address, "aliases": []}
    fresh = create_app(settings).test_client()  # no cached resolution of the alias from before
    with pytest.raises(AssertionError):
        deliver(fresh, postal_signer, 9, alias)  # 404: Postal bounces it
    assert cli("mailbox", "alias", email, alias)[0] == 0  # the address is free again


def test_removing_a_mailbox_with_mail_needs_purge_which_leaves_nothing_of_it(
    cli: Any, client: Any, bridge: Any, settings: Settings, redis_url: str, mail: dict[str, Any], postal_signer: Any
) -> None:
    owner, stranger = mail["owner"], mail["stranger"]
    address = owner.mailbox.address
    assert call(client, ROUTES[3], mail, f"Bearer {owner.token}").status_code == 201  # a handshake too
    assert cli("mailbox", "alias", owner.mailbox.email, f"help@{DOMAIN}")[0] == 0
    root = Path(settings.storage_url.removeprefix("file://"))

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    before = files()
    assert cli("mailbox", "remove", owner.mailbox.email) == (
        1,
        [],
        f"mailio-bridge: {owner.mailbox.email} holds mail; --purge deletes it with the mailbox",
    )
    assert files() == before and client.get("/api/v1/messages", headers=owner.auth).status_code == 200

    stranger_files = {k: v for k, v in before.items() if stranger.mailbox.address in k}
    code, [removed], _ = cli("mailbox", "remove", owner.mailbox.email, "--purge")
    assert code == 0 and removed["tokens"] == 1 and removed["objects"] >= 3, removed
    after = files()
    assert not [k for k, v in after.items() if address in k or address.encode() in v]
    assert {k: v for k, v in after.items() if stranger.mailbox.address in k} == stranger_files
    connection = redis.Redis.from_url(redis_url)
    leftovers = [k for k in connection.scan_iter("bridge:*") if address.encode() in k]
    for key in connection.scan_iter("bridge:*"):
        kind = connection.type(key)
        if kind == b"zset":
            leftovers += [m for m, _ in connection.zscan_iter(key) if address.encode() in m]
        elif kind == b"hash":
            leftovers += [f for f, _ in connection.hscan_iter(key) if address.encode() in f]
    assert leftovers == []

    assert_refused(client.get("/api/v1/messages", headers=owner.auth))
    assert [m["email"] for m in cli("mailbox", "list")[1]] == [stranger.mailbox.email]
    assert cli("mailbox", "remove", owner.mailbox.email)[2] == "mailio-bridge: no such mailbox"
    fresh = create_app(settings).test_client()
    for rcpt in (owner.mailbox.email, f"help@{DOMAIN}"):
        with pytest.raises(AssertionError):
            deliver(fresh, postal_signer, 10, rcpt)  # bounced, not stored
    assert client.get("/api/v1/messages?folder=other", headers=stranger.auth).get_json()["messages"]


def test_a_mailbox_without_mail_is_removed_without_purge(cli: Any, owner: Owner) -> None:
    code, [removed], _ = cli("mailbox", "remove", owner.mailbox.email)
    assert code == 0 and removed["email"] == owner.mailbox.email
    assert cli("mailbox", "list") == (0, [], "mailio-bridge: no mailboxes yet: `mailbox add EMAIL` makes one")
