"""Cross-site request forgery against the RQ dashboard at /rq.

A browser that holds the operator's basic auth sends it with any request a hostile page makes, so the
password alone does not show that the operator meant it: every state-changing dashboard route must also
come from a page of the bridge itself (Origin, else Referer). The routes come from rq-dashboard's own
url_map, so a route added by a new rq-dashboard version is covered (or fails here for want of arguments).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import rq_dashboard
from flask import Flask
from rq import Queue, SimpleWorker
from rq.job import Job

from bridge import create_app
from bridge.settings import Settings
from tests.conftest import bridge_environment
from tests.postal_sim import PostalSigner

PASSWORD = "s3cret-pass"
SAME_ORIGIN = "http://localhost"  # the Host werkzeug's test client sends


def basic(user: str = "admin", password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def explode() -> None:
    """A job that fails, so the failed registry has something to requeue or empty."""
    raise RuntimeError("boom")


@dataclass
class Jobs:
    queue: Queue
    queued: Job
    failed: Job

    def state(self) -> tuple[Any, ...]:
        return (
            sorted(self.queue.job_ids),
            sorted(self.queue.failed_job_registry.get_job_ids()),
            Job.exists(self.queued.id, connection=self.queue.connection),
            Job.exists(self.failed.id, connection=self.queue.connection),
        )


@pytest.fixture
def dashboard(tmp_path: Any, redis_url: str, postal_signer: PostalSigner) -> Flask:
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_DASHBOARD_PASSWORD=PASSWORD)
    return create_app(Settings.from_env(env))


@pytest.fixture
def jobs(dashboard: Flask) -> Iterator[Jobs]:
    bridge = dashboard.extensions["bridge"]
    queue = Queue(f"csrf-{uuid.uuid4().hex[:8]}", connection=bridge.redis)  # other tests share this Redis
    failed = queue.enqueue(explode)
    SimpleWorker([queue], connection=bridge.redis).work(burst=True, with_scheduler=False)
    queued = queue.enqueue(explode)
    jobs = Jobs(queue, queued, failed)
    assert jobs.state() == ([queued.id], [failed.id], True, True)
    yield jobs
    queue.delete(delete_jobs=True)
    bridge.redis.delete(queued.key, failed.key, queue.failed_job_registry.key)


def state_changing_routes(app: Flask) -> list[tuple[str, str]]:
    """(endpoint, method) for every rq-dashboard route that accepts a method other than GET/HEAD/OPTIONS."""
    return sorted(
        (rule.endpoint, method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("rq_dashboard.")
        for method in rule.methods or ()
        if method not in ("GET", "HEAD", "OPTIONS")
    )


def url(app: Flask, endpoint: str, jobs: Jobs) -> str:
    [rule] = [r for r in app.url_map.iter_rules() if r.endpoint == endpoint]
    values = {"job_id": jobs.failed.id, "queue_name": jobs.queue.name, "registry_name": "failed"}
    missing = rule.arguments - values.keys()
    assert not missing, f"new dashboard route {rule.rule}: choose values for {missing}"
    with app.test_request_context():
        from flask import url_for

        return url_for(endpoint, **{k: values[k] for k in rule.arguments})


def _routes() -> list[tuple[str, str]]:
    """rq-dashboard's blueprint mounted as bridge.web.ops mounts it (parametrizing needs them at import)."""
    app = Flask(__name__)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    return state_changing_routes(app)


ROUTES = _routes()


def test_the_known_state_changing_routes_are_all_covered(dashboard: Flask) -> None:
    assert state_changing_routes(dashboard) == ROUTES  # the bridge's own mount has exactly these
    endpoints = {endpoint for endpoint, _ in ROUTES}
    assert {"rq_dashboard.delete_job_view", "rq_dashboard.requeue_job_view", "rq_dashboard.requeue_all"} <= endpoints
    assert {"rq_dashboard.empty_queue", "rq_dashboard.compact_queue"} <= endpoints


HOSTILE = [
    pytest.param({"Origin": "http://evil.example"}, id="evil-origin"),
    pytest.param({"Origin": "http://evil.example", "Referer": f"{SAME_ORIGIN}/rq/"}, id="evil-origin-good-referer"),
    pytest.param({"Origin": "null"}, id="null-origin"),
    pytest.param({"Origin": "http://localhost.evil.example"}, id="lookalike-origin"),
    pytest.param({"Origin": "http://localhost:8081"}, id="other-port"),
    pytest.param({"Referer": "http://evil.example/page"}, id="evil-referer"),
    pytest.param({"Referer": "not a url"}, id="garbage-referer"),
    pytest.param({}, id="neither"),
]


@pytest.mark.parametrize(("endpoint", "method"), ROUTES)
@pytest.mark.parametrize("headers", HOSTILE)
def test_cross_site_requests_are_403_and_change_nothing(
    dashboard: Flask, jobs: Jobs, endpoint: str, method: str, headers: dict[str, str]
) -> None:
    client = dashboard.test_client()
    before = jobs.state()
    response = client.open(url(dashboard, endpoint, jobs), method=method, headers={**basic(), **headers})
    assert response.status_code == 403
    assert response.get_data() == b"cross-site request refused\n"
    assert jobs.state() == before


@pytest.mark.parametrize(("endpoint", "method"), ROUTES)
def test_without_the_password_it_is_401_first(dashboard: Flask, jobs: Jobs, endpoint: str, method: str) -> None:
    client = dashboard.test_client()
    before = jobs.state()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": SAME_ORIGIN}, {**basic(password="wrong")}):
        response = client.open(url(dashboard, endpoint, jobs), method=method, headers=headers)
        assert response.status_code == 401
    assert jobs.state() == before


@pytest.mark.parametrize(("endpoint", "method"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Origin": SAME_ORIGIN}, id="origin"),
        pytest.param({"Origin": "https://localhost:443"}, id="origin-behind-tls-proxy"),
        pytest.param({"Referer": f"{SAME_ORIGIN}/rq/0/view/jobs"}, id="referer-only"),
    ],
)
def test_the_operators_own_page_still_works(
    dashboard: Flask, jobs: Jobs, endpoint: str, method: str, headers: dict[str, str]
) -> None:
    client = dashboard.test_client()
    response = client.open(url(dashboard, endpoint, jobs), method=method, headers={**basic(), **headers})
    assert response.status_code == 200, response.get_data(as_text=True)


def test_same_origin_actions_take_effect(dashboard: Flask, jobs: Jobs) -> None:
    client = dashboard.test_client()
    headers = {**basic(), "Origin": SAME_ORIGIN}
    assert client.post(f"/rq/requeue/{jobs.queue.name}", headers=headers).get_json()["count"] == 1
    assert sorted(jobs.queue.job_ids) == sorted([jobs.queued.id, jobs.failed.id])
    assert client.post(f"/rq/job/{jobs.queued.id}/delete", headers=headers).status_code == 200
    assert not Job.exists(jobs.queued.id, connection=jobs.queue.connection)


def test_requeue_all_refuses_get_which_any_img_tag_could_send(dashboard: Flask, jobs: Jobs) -> None:
    client = dashboard.test_client()
    before = jobs.state()
    for method in ("GET", "HEAD"):
        response = client.open(f"/rq/requeue/{jobs.queue.name}", method=method, headers=basic())
        assert response.status_code == 405
    assert jobs.state() == before


def test_reading_the_dashboard_needs_no_origin(dashboard: Flask, jobs: Jobs) -> None:
    client = dashboard.test_client()
    assert client.get("/rq/", headers=basic()).status_code == 200
    assert client.get("/rq/0/data/queues.json", headers=basic()).status_code == 200
