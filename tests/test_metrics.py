"""GET /metrics: counters that add up across processes, what Redis says about the worker, and no secrets.

The deployed shape runs through a real gunicorn with two web processes and a real worker process;
the finer counters are checked in-process against the same real Redis, object store and Knot.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge import create_app
from bridge.context import Bridge
from bridge.dns import lookup
from bridge.mailio.peers import PeerClient, PeerRefused
from bridge.settings import Settings
from tests.conftest import DOMAIN, bridge_environment, make_owner, run_worker
from tests.dns_server import ZONES
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import stop_process, wait_until
from tests.webproc import ROOT, gunicorn_process, worker_process

MESSAGE = b"From: Jane <jane@example.org>\r\nTo: support@mail.example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


RECEIVED_AT = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def payload(postal_id: int, rcpt: str = f"support@{DOMAIN}") -> dict:
    # A fixed time: Postal's retry resends the same bytes (a Received: line dated "now" would differ
    # when a second passes between the first delivery and its retry).
    return raw_payload(
        postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=MESSAGE, received_at=RECEIVED_AT
    )


def delivery(signer: PostalSigner, postal_id: int, rcpt: str = f"support@{DOMAIN}") -> tuple[bytes, dict[str, str]]:
    body = ruby_json(payload(postal_id, rcpt))
    return body, {**signer.sign_headers(body), "Content-Type": "application/json"}


def test_a_scrape_shows_the_totals_of_every_web_and_worker_process(environment, tmp_path, postal_signer):
    bridge = Bridge(Settings.from_env(environment))
    make_owner(bridge, f"support@{DOMAIN}")
    web_files = Path(environment["BRIDGE_DATA_DIR"]) / "metrics" / "web"
    worker = worker_process(environment, tmp_path / "worker.log")  # its counters live in a directory of their own
    try:
        with gunicorn_process(environment, tmp_path / "gunicorn.log") as (url, _pid):

            def scrape() -> str:
                return requests.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=10).text

            def ready(_: int) -> int:
                return requests.get(f"{url}/readyz", headers={"Connection": "close"}, timeout=10).status_code

            # New connections, many at once, until both web processes have counted some (each has its own file).
            readies = 0
            with ThreadPoolExecutor(8) as pool:
                while len({p.name.rsplit("_", 1)[1] for p in web_files.glob("counter_*.db")}) < 2:
                    assert readies < 400, "the second web process never answered"
                    assert set(pool.map(ready, range(16))) == {200}
                    readies += 16
            stored = sum(len(base64.b64decode(payload(postal_id)["message"])) for postal_id in range(1, 6))
            for postal_id in range(1, 6):
                body, headers = delivery(postal_signer, postal_id)
                assert requests.post(f"{url}/postal/inbound", data=body, headers=headers, timeout=10).text == "stored\n"
            body, headers = delivery(postal_signer, 1)
            assert requests.post(f"{url}/postal/inbound", data=body, headers=headers, timeout=10).text == "duplicate\n"

            def filed() -> bool:
                return value(scrape(), "bridge_filed_messages_total", job="file_unfiled") == 5

            assert wait_until(filed, 30, worker), (tmp_path / "worker.log").read_text()[-2000:]
            # Whichever process answers the scrape, it shows everyone's totals: both web processes' and the worker's.
            for _ in range(6):
                text = scrape()
                assert value(text, "bridge_http_requests_total", route="/readyz", method="GET", status="200") == readies
                assert value(text, "bridge_postal_deliveries_total", outcome="stored") == 5
                assert value(text, "bridge_postal_deliveries_total", outcome="duplicate") == 1
                assert value(text, "bridge_stored_message_bytes_total", source="postal") == stored
                assert value(text, "bridge_filed_messages_total", job="file_unfiled") == 5
                assert value(text, "bridge_screening_decisions_total", folder="other", rule="screened") == 5
            assert value(text, "bridge_filing_batch_duration_seconds_count", job="file_unfiled") >= 1
            assert value(text, "bridge_unfiled_messages") == 0 and value(text, "bridge_unfiled_oldest_age_seconds") == 0
            assert value(text, "bridge_workers_alive") == 1
            assert 0 <= value(text, "bridge_worker_heartbeat_age_seconds") < 5
            assert "@" not in text and DOMAIN not in text  # no label carries an address or a user's domain

            stop_process(worker)
            text = scrape()
            assert value(text, "bridge_workers_alive") == 0  # a worker that stops says so at once
            assert value(text, "bridge_filed_messages_total", job="file_unfiled") == 5  # its counts stay
    finally:
        stop_process(worker)


def test_the_backlog_grows_while_no_worker_runs_and_its_age_shows(client, bridge, owner, postal_signer):
    assert value(client.get("/metrics").get_data(as_text=True), "bridge_unfiled_messages") == 0
    for postal_id in (1, 2, 3):
        body, headers = delivery(postal_signer, postal_id)
        assert client.post("/postal/inbound", data=body, headers=headers).status_code == 200
        time.sleep(0.4)
    text = client.get("/metrics").get_data(as_text=True)
    assert value(text, "bridge_unfiled_messages") == 3
    assert 0.8 <= value(text, "bridge_unfiled_oldest_age_seconds") < 30  # the first one's age, not the last's
    assert value(text, "bridge_rq_queue_jobs", queue="bridge") == 1  # one filing job waits for a worker
    run_worker(bridge)
    text = client.get("/metrics").get_data(as_text=True)
    assert value(text, "bridge_unfiled_messages") == 0 and value(text, "bridge_unfiled_oldest_age_seconds") == 0


def test_failed_jobs_show_per_queue(client, bridge):
    bridge.queue.enqueue("bridge.jobs.inbound.no_such_job")
    run_worker(bridge)
    assert value(client.get("/metrics").get_data(as_text=True), "bridge_rq_failed_jobs", queue="bridge") == 1


def test_signature_failures_by_reason_and_refusals_by_outcome(client, owner, postal_signer):
    def count(reason: str) -> float:
        text = client.get("/metrics").get_data(as_text=True)
        return value(text, "bridge_postal_signature_failures_total", endpoint="postal inbound", reason=reason)

    before = {r: count(r) for r in ("unsigned", "unknown_kid", "bad_signature", "malformed")}
    body, headers = delivery(postal_signer, 7)
    assert client.post("/postal/inbound", data=body, content_type="application/json").status_code == 401
    _, stranger = delivery(PostalSigner(bits=1024), 7)
    assert client.post("/postal/inbound", data=body, headers=stranger).status_code == 401
    assert client.post("/postal/inbound", data=body.replace(b"support", b"suPport"), headers=headers).status_code == 401
    bad_kid = {**headers, "X-Postal-Signature-KID": "not a kid"}
    assert client.post("/postal/inbound", data=body, headers=bad_kid).status_code == 401
    after = {r: count(r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {
        "unsigned": 1,
        "unknown_kid": 1,
        "bad_signature": 1,
        "malformed": 1,
    }
    text = client.get("/metrics").get_data(as_text=True)
    unknown_before = value(text, "bridge_postal_deliveries_total", outcome="unknown_recipient")
    body, headers = delivery(postal_signer, 8, rcpt=f"nobody@{DOMAIN}")
    assert client.post("/postal/inbound", data=body, headers=headers).status_code == 404
    text = client.get("/metrics").get_data(as_text=True)
    assert value(text, "bridge_postal_deliveries_total", outcome="unknown_recipient") == unknown_before + 1
    assert value(text, "bridge_http_requests_total", route="/postal/inbound", method="POST", status="401") >= 4


@pytest.mark.dns
def test_dns_lookups_and_cache_hits_are_counted(client, bridge, knot_dns):
    def counts() -> tuple[float, float]:
        text = client.get("/metrics").get_data(as_text=True)
        answered = value(text, "bridge_dns_lookups_total", outcome="answer")
        return answered, value(text, "bridge_dns_cache_hits_total", rdtype="TXT")

    name = f"metrics-{time.monotonic_ns()}.{ZONES[0]}"
    knot_dns.set_txt(name, "v=counted")
    answered, hits = counts()
    assert lookup(bridge.resolver, name, "TXT").records  # asked the suite's Knot
    assert lookup(bridge.resolver, name, "TXT").records  # answered from the resolver's cache
    after_answered, after_hits = counts()
    assert (after_answered - answered, after_hits - hits) == (2, 1)


def test_the_metrics_token_guards_the_scrape_and_nothing_else(tmp_path, redis_url, postal_signer):
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_METRICS_TOKEN="scrape-token-7f3a")
    client = create_app(Settings.from_env(env)).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic scrape-token-7f3a"}).status_code == 401
    scrape = client.get("/metrics", headers={"Authorization": "Bearer scrape-token-7f3a"})
    assert scrape.status_code == 200 and b"bridge_unfiled_messages" in scrape.data
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_without_a_token_the_scrape_is_open(client):
    scrape = client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["Content-Type"].startswith("text/plain")


MONITORING = ROOT / "postal_config" / "monitoring"
_METRIC_NAME = re.compile(r"\b(bridge_[a-z0-9_]+|up)\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["panels"], list)
    queries = []
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos"} <= panel.keys(), panel
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            queries += [target["expr"] for target in panel["targets"]]
    return queries


def alert_rules() -> list[dict]:
    document = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"]
    return rules


def test_the_alerts_and_the_dashboard_ask_only_for_metrics_the_bridge_exports(client):
    text = client.get("/metrics").get_data(as_text=True)
    exported = {"up"}
    for family in text_string_to_metric_families(text):
        exported |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "MailioBridgeWorkerMissing",
        "MailioBridgeBacklogOld",
        "MailioBridge5xxRate",
        "MailioBridgeSignatureFailures",
        "MailioBridgeDNSTimeouts",
    }
    asked = {name for query in [r["expr"] for r in rules] + dashboard_queries() for name in _METRIC_NAME.findall(query)}
    assert asked - exported == set()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs prometheus)")
def test_promtool_accepts_the_rules_and_they_fire_for_a_stalled_worker_and_an_old_backlog(tmp_path):
    def promtool(*args: str, cwd: Path = MONITORING) -> None:
        done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts.test.yml")  # WorkerMissing, BacklogOld, 5xx, signature failures fire
    # The dashboard's queries are PromQL too: promtool parses them as recording rules.
    queries = [q.replace("$__rate_interval", "5m") for q in dashboard_queries()]
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)


def test_peer_calls_are_counted_by_outcome(client):
    """A real loopback HTTP server as the peer: its answer's class, and the SSRF guard's refusal."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404 if self.path == "/missing" else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"

    def counts() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {o: value(text, "bridge_peer_calls_total", outcome=o) for o in ("2xx", "4xx", "refused")}

    try:
        before = counts()
        allowed = PeerClient(allowlist=[ipaddress.ip_network("127.0.0.0/8")], allow_insecure=True, timeout=5)
        assert allowed.get(f"{base}/did.json").status == 200
        assert allowed.get(f"{base}/missing").status == 404
        with pytest.raises(PeerRefused):
            PeerClient(allow_insecure=True, timeout=5).get(f"{base}/did.json")  # loopback is not a peer
        after = counts()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert {o: after[o] - before[o] for o in before} == {"2xx": 1, "4xx": 1, "refused": 1}
