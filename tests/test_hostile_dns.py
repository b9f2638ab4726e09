"""Senders whose DNS never answers must not slow anyone else (issue: DNS on the request path).

DKIM is checked before the bridge answers Postal, and every DKIM-Signature makes it ask the signer's DNS.
A spammer's domain with dead name servers used to hold a web process for the resolver's whole lifetime per
signature. Here the deployed web process (gunicorn, 2 processes) resolves through ``RelayResolver``: Knot for
the test zones, silence for zones delegated to a dead server and for names in no zone at all. Margins are
sized for a busy 2-core machine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from bridge import create_app
from bridge.context import Bridge
from bridge.dns import DNSUnavailable, UnreachableZones, dns_budget, make_resolver, records
from bridge.mail.auth import authenticate_sender
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, make_owner
from tests.dead_dns import RelayResolver, delegate_dead
from tests.postal_sim import PostalSimulator, raw_payload
from tests.test_mail_auth import Signer
from tests.webproc import gunicorn_process

pytestmark = pytest.mark.dns

DEAD_ZONE = "dead.strict.test"
BUDGET = 2.0
_ids = itertools.count(1)


@pytest.fixture
def relay(knot_dns: Any, redis_url: str) -> Iterator[RelayResolver]:
    delegate_dead(knot_dns, DEAD_ZONE)
    resolver = RelayResolver(knot_dns)
    yield resolver
    resolver.stop()
    # The shared memory of unreachable zones outlives this test in the suite's Redis: forget it.
    connection = redis.Redis.from_url(redis_url)
    for key in connection.scan_iter(match=UnreachableZones.PREFIX + "*"):
        connection.delete(key)


@pytest.fixture
def signer(knot_dns: Any) -> Signer:
    good = Signer("sender.test", selector=f"s{uuid.uuid4().hex[:8]}")
    knot_dns.set_txt(good.record_name, good.record)
    return good


@pytest.fixture
def hostile_web(
    relay: RelayResolver, environment: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, Owner, Bridge]]:
    env = {**environment, "BRIDGE_DNS_NAMESERVERS": relay.nameserver, "BRIDGE_DKIM_DNS_BUDGET": str(BUDGET)}
    bridge = Bridge(Settings.from_env(env))
    owner = make_owner(bridge, f"support@{DOMAIN}")
    with gunicorn_process(env, tmp_path / "gunicorn.log", BRIDGE_WEB_WORKERS="2") as (url, _pid):
        yield url, owner, bridge


def _dead_signatures(domains: list[str]) -> bytes:
    """DKIM-Signature headers whose keys live under ``domains`` (nothing there will ever answer)."""
    return b"".join(
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={d}; s=sel; h=from:to:subject; "
        f"bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n".encode()
        for d in domains
    )


def _body(subject: str) -> bytes:
    return (
        f"From: Jane <jane@sender.test>\r\nTo: support@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@sender.test>\r\n\r\nhello\r\n"
    ).encode()


def _deliver(url: str, owner: Owner, signer_: Any, message: bytes, postal_id: int | None = None) -> tuple[int, float]:
    payload = raw_payload(
        postal_id=postal_id or next(_ids), rcpt_to=owner.mailbox.email, mail_from="jane@sender.test", message=message
    )
    simulator = PostalSimulator(f"{url}/postal/inbound", signer_, timeout=30)
    started = time.monotonic()
    attempt = simulator.post(payload)
    return attempt.status, time.monotonic() - started


def test_dead_dns_neither_blocks_normal_deliveries_nor_takes_longer_than_its_budget(
    hostile_web: tuple[str, Owner, Bridge], postal_signer: Any, signer: Signer, relay: RelayResolver
) -> None:
    url, owner, bridge = hostile_web
    # Each hostile delivery: five signatures in dead domains of its own (no memory of dead zones can help).
    hostile = [
        _dead_signatures([f"x{i}-{n}-{uuid.uuid4().hex[:6]}.test" for n in range(5)]) + _body(f"spam {i}")
        for i in range(8)
    ]
    normal = [signer.sign(_body(f"normal {i}")) for i in range(6)] + [_body(f"plain {i}") for i in range(4)]

    with ThreadPoolExecutor(8) as spam_pool, ThreadPoolExecutor(2) as normal_pool:
        spam = [spam_pool.submit(_deliver, url, owner, postal_signer, m) for m in hostile]
        time.sleep(0.3)  # the hostile deliveries are in the web processes' threads, waiting on DNS
        ok = list(normal_pool.map(lambda m: _deliver(url, owner, postal_signer, m), normal))
        spammed = [f.result() for f in spam]

    assert [status for status, _ in ok] == [200] * len(normal)
    assert max(elapsed for _, elapsed in ok) < 2.0, ok
    assert [status for status, _ in spammed] == [200] * len(hostile)  # stored: screening decides, not DNS
    # Every DKIM lookup of a delivery shares one budget: about BUDGET, never 5 x the resolver's lifetime.
    assert max(elapsed for _, elapsed in spammed) < BUDGET + 2.5, spammed
    assert relay.silenced >= len(hostile)  # the dead servers really were asked

    verdicts = {r["verdicts"]["dkim"] for r in bridge.messages.records(owner.mailbox.address)}
    assert "temperror" in verdicts  # honest: unknown, not fail and not pass
    assert "pass" in verdicts  # the live signatures verified meanwhile


def test_a_retry_of_a_stored_delivery_asks_dns_nothing(
    hostile_web: tuple[str, Owner, Bridge], postal_signer: Any, relay: RelayResolver, environment: dict[str, str]
) -> None:
    url, owner, _bridge = hostile_web
    zone = f"r{uuid.uuid4().hex[:8]}.{DEAD_ZONE}"
    message = _dead_signatures([zone]) + _body("retry me")
    payload = raw_payload(
        postal_id=next(_ids), rcpt_to=owner.mailbox.email, mail_from="jane@sender.test", message=message
    )
    # The first attempt was stored by a bridge asking Knot directly (a referral, no key: permerror at
    # once), so nothing remembers this zone as dead: only the duplicate check can spare the retry.
    first = PostalSimulator("", postal_signer)
    body, content_type = first.encode(payload)
    with create_app(Settings.from_env(environment)).test_client() as client:
        answer = client.post("/postal/inbound", data=body, headers=first.wire_headers(body, content_type))
    assert (answer.status_code, answer.text) == (200, "stored\n")
    asked = relay.silenced
    started = time.monotonic()
    retry = PostalSimulator(f"{url}/postal/inbound", postal_signer, timeout=30).post(payload)  # now DNS is dead
    elapsed = time.monotonic() - started
    assert (retry.status, retry.body_text) == (200, "duplicate\n")
    assert relay.silenced == asked  # no DNS at all
    assert elapsed < 0.5


def test_a_zone_that_did_not_answer_is_not_waited_for_again(
    hostile_web: tuple[str, Owner, Bridge], postal_signer: Any, relay: RelayResolver
) -> None:
    url, owner, _bridge = hostile_web
    first = _dead_signatures([f"a{n}.{DEAD_ZONE}" for n in range(5)]) + _body("first")
    status, elapsed = _deliver(url, owner, postal_signer, first)
    assert status == 200 and elapsed >= 0.4
    asked = relay.silenced
    # Later deliveries signed under the same zone, whichever web process takes them: no waiting.
    later = [
        _deliver(url, owner, postal_signer, _dead_signatures([f"b{i}.{DEAD_ZONE}"]) + _body("x")) for i in range(6)
    ]
    assert [s for s, _ in later] == [200] * 6
    assert max(e for _, e in later) < 0.5, later
    assert relay.silenced == asked


def test_the_memory_of_unreachable_zones_is_shared_through_redis(relay: RelayResolver, redis_url: str) -> None:
    first, second = (make_resolver([relay.nameserver], timeout=1.0) for _ in range(2))
    first.unreachable = UnreachableZones(redis.Redis.from_url(redis_url))
    second.unreachable = UnreachableZones(redis.Redis.from_url(redis_url))  # another process's resolver
    with pytest.raises(DNSUnavailable):
        records(first, f"sel._domainkey.z.{DEAD_ZONE}", "TXT")
    started = time.monotonic()
    with pytest.raises(DNSUnavailable):
        records(second, f"other._domainkey.{DEAD_ZONE}", "TXT")
    assert time.monotonic() - started < 0.2


def test_a_budget_bounds_every_lookup_inside_it(relay: RelayResolver) -> None:
    resolver = make_resolver([relay.nameserver], timeout=2.0)  # no memory: only the budget helps
    started = time.monotonic()
    with dns_budget(0.6):
        for n in range(5):
            with pytest.raises(DNSUnavailable):
                records(resolver, f"k{n}.budget-{uuid.uuid4().hex[:6]}.test", "TXT")
    assert time.monotonic() - started < 1.5


def test_a_job_time_limit_fires_inside_spf_and_dmarc_lookups(relay: RelayResolver) -> None:
    # RQ enforces a job's time limit with SIGALRM, raised wherever the job is: pyspf's and DMARC's
    # broad error handling must let it end the job instead of turning it into a verdict.
    resolver = make_resolver([relay.nameserver], timeout=2.0)
    domain = f"spf-{uuid.uuid4().hex[:8]}.test"  # in no zone: the lookup goes to a server that never answers
    started = time.monotonic()
    with pytest.raises(JobTimeoutException), UnixSignalDeathPenalty(1, JobTimeoutException):
        authenticate_sender(
            from_address=f"a@{domain}",
            client_ip="192.0.2.1",
            helo=domain,
            mail_from=f"a@{domain}",
            dkim_result="none",
            dkim_domains=(),
            resolver=resolver,
        )
    # dnspython holds the exception until the lookup's lifetime (2 s) ends, then it is raised: not 2 x 2 s
    # of SPF and DMARC, and never the verdict of a finished job.
    assert time.monotonic() - started < 3.5
