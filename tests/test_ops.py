"""Operations: the RQ dashboard behind the operator's password, liveness (/healthz) and readiness (/readyz)."""

from __future__ import annotations

import base64
import shutil
import time

from bridge import create_app
from bridge.settings import Settings
from tests.conftest import bridge_environment
from tests.servers import RedisServer, kill_redis


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_dashboard_is_off_without_a_password(client):
    assert client.get("/rq/").status_code == 404


def test_dashboard_needs_the_operator_password(tmp_path, redis_url, postal_signer):
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_DASHBOARD_PASSWORD="s3cret-pass")
    client = create_app(Settings.from_env(env)).test_client()
    assert client.get("/rq/").status_code == 401
    assert client.get("/rq/", headers=basic("admin", "wrong")).status_code == 401
    page = client.get("/rq/", headers=basic("admin", "s3cret-pass"))
    assert page.status_code == 200 and b"RQ" in page.data
    queues = client.get("/rq/0/data/queues.json", headers=basic("admin", "s3cret-pass"))
    assert queues.status_code == 200 and "queues" in queues.get_json()
    # the Postal endpoint and the API are not behind the operator's password
    assert client.get("/healthz").status_code == 200


def test_a_bug_is_a_short_500_not_a_503(app, caplog):
    # A 503 tells Postal "a dependency is down, retry for a day": a bug must not hide behind it.
    @app.get("/test-bug")
    def bug() -> str:
        raise KeyError("secret-value")

    with caplog.at_level("ERROR", logger="bridge"):
        response = app.test_client().get("/test-bug")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "unexpected KeyError at" in logged
    assert "secret-value" not in logged and "Traceback" not in logged
    assert not any(r.exc_info for r in caplog.records)


def test_readyz_is_503_while_redis_is_dead_and_recovers(tmp_path, postal_signer):
    """A private Redis, SIGKILLed and restarted: the load balancer's probe follows it; /healthz does not."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = create_app(Settings.from_env(bridge_environment(tmp_path, server.url, postal_signer))).test_client()
        assert client.get("/readyz").get_json() == {"status": "ok", "redis": "ok", "storage": "ok"}
        kill_redis(server)
        started = time.monotonic()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.get_json() == {"status": "unavailable", "redis": "unavailable", "storage": "ok"}
        assert time.monotonic() - started < 3  # a probe is answered promptly, not after Redis's long timeouts
        assert client.get("/healthz").status_code == 200  # the process itself is fine: no restart wanted
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and b"bridge_redis_up 0.0" in scrape.data
        server.start()
        assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_readyz_is_503_while_the_object_store_is_gone(client, settings):
    objects = settings.data_dir / "objects"
    assert client.get("/readyz").status_code == 200
    shutil.rmtree(objects)
    try:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.get_json()["storage"] == "unavailable"
        assert client.get("/healthz").get_json() == {"status": "ok"}
    finally:
        objects.mkdir()
    assert client.get("/readyz").status_code == 200
