"""Shared fixtures: a bridge wired to the suite's real Redis and a temporary object store.

The servers themselves (Redis, moto, Ceph RGW, Knot) live in tests/servers.py and
tests/dns_server.py; the Postal simulator in tests/postal_sim.py.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from rq import SimpleWorker
from werkzeug.serving import make_server

from bridge import context, create_app
from bridge.context import Bridge
from bridge.mailio.identity import UserKeys, generate_user_keys
from bridge.settings import Settings
from bridge.store.mailboxes import Mailbox
from tests.loghygiene import SessionLog, leaking_lines, process_logs, report
from tests.postal_sim import PostalSigner

pytest_plugins = ["tests.servers", "tests.dns_server", "tests.postal_api"]

SESSION_LOG = SessionLog()


def pytest_configure(config: pytest.Config) -> None:
    """Every line logged in this process goes through the log-hygiene check (``tests.loghygiene``)."""
    root = logging.getLogger()
    root.addHandler(SESSION_LOG)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # the bridge's default BRIDGE_LOG_LEVEL


def pytest_runtest_setup(item: pytest.Item) -> None:
    SESSION_LOG.current_test = item.nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if any line of this process or of a process a test started holds a secret."""
    found = list(SESSION_LOG.found)
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and factory._basetemp is not None:
        found += list(leaking_lines(process_logs(factory.getbasetemp())))
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"log hygiene: {len(found)} log line(s) hold what must never be logged:\n{report(found)}"
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


DOMAIN = "mail.example.test"


@pytest.fixture(scope="session")
def postal_signer() -> PostalSigner:
    return PostalSigner()


def bridge_environment(
    tmp_path: Path, redis_url: str, signer: PostalSigner, nameserver: str | None = None, **extra: str
) -> dict[str, str]:
    pem = tmp_path / "postal-signing.pem"
    if not pem.exists():
        pem.write_bytes(signer.public_pem())
    return {
        "BRIDGE_DOMAIN": DOMAIN,
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_POSTAL_PUBLIC_KEY": str(pem),
        "BRIDGE_FSYNC": "false",
        # Never the machine's resolver: tests ask only the suite's own Knot server.
        "BRIDGE_DNS_NAMESERVERS": nameserver or _suite_nameserver(),
        **extra,
    }


_NAMESERVER: list[str] = []


def _suite_nameserver() -> str:
    if not _NAMESERVER:
        raise RuntimeError("use the `environment` fixture (or pass nameserver=) so DNS goes to the suite's Knot")
    return _NAMESERVER[0]


@pytest.fixture(autouse=True)
def _dns_for_bridges(suite_nameserver: str) -> Iterator[None]:
    """Every bridge a test builds resolves through the suite's Knot server (a refusing one without Knot)."""
    _NAMESERVER[:] = [suite_nameserver]
    yield
    _NAMESERVER.clear()


@pytest.fixture
def environment(tmp_path: Path, redis_url: str, postal_signer: PostalSigner) -> dict[str, str]:
    return bridge_environment(tmp_path, redis_url, postal_signer)


@pytest.fixture
def settings(environment: dict[str, str]) -> Settings:
    return Settings.from_env(environment)


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    context.use(app.extensions["bridge"])
    yield app
    context.use(None)


@pytest.fixture
def bridge(app: Flask) -> Bridge:
    return app.extensions["bridge"]


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


@pytest.fixture
def live_url(app: Flask) -> Iterator[str]:
    """The app behind a real HTTP server on loopback, so the Postal simulator talks HTTP to it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@dataclass
class Owner:
    mailbox: Mailbox
    keys: UserKeys
    token: str

    @property
    def private_jwk(self) -> dict[str, Any]:
        return self.keys.to_key_file(self.mailbox.email)["encryption_key"]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_owner(bridge: Bridge, email: str) -> Owner:
    keys = generate_user_keys()
    mailbox = bridge.mailboxes.add(email, keys.ed25519_public, keys.x25519_public)
    return Owner(mailbox=mailbox, keys=keys, token=bridge.mailboxes.issue_token(mailbox))


@pytest.fixture
def owner(bridge: Bridge) -> Owner:
    return make_owner(bridge, f"support@{DOMAIN}")


def run_worker(bridge: Bridge) -> None:
    """Run the real RQ worker until the queues are empty (jobs run in this process)."""
    # As bridge.worker's does: RQ would log each job's arguments (a mailbox's address, say).
    worker = SimpleWorker([bridge.queue], connection=bridge.redis, log_job_description=False)
    worker.work(burst=True, with_scheduler=False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
