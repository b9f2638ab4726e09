"""Mailio discovery (MIR-5) against a real Knot server whose records change at run time, with the suite's Redis.

Every test publishes its own records under a fresh name (Knot keeps them for the whole session). Dead DNS is
``tests/dead_dns.py``'s relay: Knot's answers, silence for a zone delegated to a server that never answers.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rdata
import pytest
import redis

from bridge.context import Bridge
from bridge.dns import UnreachableZones, make_resolver
from bridge.mailio.discovery import (
    CACHE_PREFIX,
    LOCAL_SECONDS,
    Discovery,
    InvalidDomain,
    mail_exchangers,
    normalize_domain,
    parse_mailio_record,
)
from bridge.settings import Settings
from tests.dead_dns import RelayResolver, delegate_dead

pytestmark = pytest.mark.dns

ROOT = Path(__file__).resolve().parents[1]


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def record(key: str) -> str:
    return f"v=MAILIO1; k=ed25519; p={key}"


def fresh_domain(parent: str = "mailio.test") -> str:
    return f"d{uuid.uuid4().hex[:10]}.{parent}"


@pytest.fixture
def bridge(environment: dict[str, str], knot_dns: Any) -> Bridge:
    """A bridge resolving through Knot, with the resolver's answer cache on (as deployed)."""
    return Bridge(Settings.from_env(environment))


@pytest.fixture
def relay(knot_dns: Any, redis_url: str) -> Iterator[RelayResolver]:
    resolver = RelayResolver(knot_dns)
    yield resolver
    resolver.stop()
    connection = redis.Redis.from_url(redis_url)  # forget the dead zones this test taught the suite's Redis
    for key in connection.scan_iter(match=UnreachableZones.PREFIX + "*"):
        connection.delete(key)


def relayed_discovery(relay: RelayResolver, redis_url: str) -> Discovery:
    resolver = make_resolver([relay.nameserver], timeout=1.0)
    resolver.unreachable = UnreachableZones(redis.Redis.from_url(redis_url))
    # These tests expire Redis entries by hand: no copy in this process's memory in front of Redis.
    return Discovery(resolver, redis.Redis.from_url(redis_url), local_seconds=0)


# --- records ----------------------------------------------------------------------------------


def test_tag_form_without_mx_is_a_mailio_route(bridge: Bridge, knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(key))
    route = bridge.discovery.discover(domain)
    assert (route.route, route.host, route.key, route.domain) == ("mailio", domain, key, domain)
    assert route.public_key == base64.b64decode(key) and route.mx == ()
    assert route.dnssec is False  # Knot is authoritative, not a validating resolver: no AD flag


def test_tags_by_name_in_any_order(bridge: Bridge, knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", f"p={key};K=ed25519 ;v=MAILIO1;")
    assert bridge.discovery.discover(domain).key == key


def test_the_reference_servers_positional_form(bridge: Bridge, knot_dns: Any) -> None:
    # The reference reads `;`-separated fields by position (v=MAILIO1 somewhere in the first, k= second,
    # p= third) and ignores the rest: a trailing note that is no tag still works there, so here too.
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", f"v=MAILIO1;k=ed25519;p={key}; our Mailio server")
    assert bridge.discovery.discover(domain).key == key


def test_a_record_split_into_several_strings_is_joined(bridge: Bridge, knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    name = f"mailio._mailiokey.{domain}"
    # 24 + 207 + 4 bytes before the key: the 255-byte boundary falls inside it.
    knot_dns.set_txt(name, f"v=MAILIO1; k=ed25519; x={'a' * 207}; p={key}")
    answer = dns.query.udp(dns.message.make_query(name, "TXT"), knot_dns.host, port=knot_dns.port, timeout=2)
    assert len(answer.answer[0][0].strings) == 2  # really split on the wire
    assert bridge.discovery.discover(domain).key == key


BAD_RECORDS = {
    "31-byte key": (f"v=MAILIO1; k=ed25519; p={base64.b64encode(b'k' * 31).decode()}", "31 bytes"),
    "33-byte key": (f"v=MAILIO1; k=ed25519; p={base64.b64encode(b'k' * 33).decode()}", "33 bytes"),
    "bad base64": ("v=MAILIO1; k=ed25519; p=not*base64*at*all*not*base64*at*all*xxxxxx=", "not standard base64"),
    "wrong k=": (f"v=MAILIO1; k=rsa; p={base64.b64encode(b'k' * 32).decode()}", "not ed25519"),
    "wrong v=": (f"v=MAILIO2; k=ed25519; p={base64.b64encode(b'k' * 32).decode()}", "not MAILIO1"),
    "empty p=": ("v=MAILIO1; k=ed25519; p=", "no key"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_is_refused_with_its_reason(bridge: Bridge, knot_dns: Any, case: str) -> None:
    text, why = BAD_RECORDS[case]
    with pytest.raises(ValueError, match=why):
        parse_mailio_record(text)
    domain = fresh_domain()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", text)
    nothing = bridge.discovery.discover(domain)
    assert nothing.route == "none" and why in nothing.reason
    knot_dns.set(domain, "MX", f"10 mx.{domain}.")
    smtp = bridge.discovery.discover(domain, fresh=True)
    assert smtp.route == "smtp" and smtp.key is None and why in smtp.reason


def test_other_txt_records_beside_the_mailio_one_are_ignored(bridge: Bridge, knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set(f"mailio._mailiokey.{domain}", "TXT", '"hello world"', f'"{record(key)}"')
    assert bridge.discovery.discover(domain).key == key


def test_two_different_keys_at_one_candidate_are_refused(bridge: Bridge, knot_dns: Any) -> None:
    domain = fresh_domain()
    knot_dns.set(f"mailio._mailiokey.{domain}", "TXT", f'"{record(new_key())}"', f'"{record(new_key())}"')
    route = bridge.discovery.discover(domain)
    assert route.route == "none" and "2 different keys" in route.reason


# --- candidates and MX ------------------------------------------------------------------------


def test_candidates_in_order_mio_before_mailio(bridge: Bridge, knot_dns: Any) -> None:
    domain, mio, mailio = fresh_domain(), new_key(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.mailio.{domain}", record(mailio))
    knot_dns.set_txt(f"mailio._mailiokey.mio.{domain}", record(mio))
    route = bridge.discovery.discover(domain)
    assert (route.host, route.key) == (f"mio.{domain}", mio)
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(first := new_key()))  # the domain itself: first
    assert bridge.discovery.discover(domain, fresh=True).key == first


def test_a_bad_record_at_an_earlier_candidate_is_skipped(bridge: Bridge, knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", "v=MAILIO1; k=ed25519; p=AAAA")
    knot_dns.set_txt(f"mailio._mailiokey.didcomm.{domain}", record(key))
    route = bridge.discovery.discover(domain)
    assert (route.route, route.host, route.key) == ("mailio", f"didcomm.{domain}", key)


def test_candidates_come_from_the_setting(environment: dict[str, str], knot_dns: Any) -> None:
    domain = fresh_domain()
    knot_dns.set_txt(f"mailio._mailiokey.mio.{domain}", record(new_key()))
    knot_dns.set_txt(f"mailio._mailiokey.mx.{domain}", record(key := new_key()))
    settings = Settings.from_env({**environment, "BRIDGE_DISCOVERY_CANDIDATES": "mx, @"})
    assert settings.discovery_candidates == ("mx", "")
    assert Bridge(settings).discovery.discover(domain).key == key


def test_mx_only_is_smtp_sorted_by_preference(bridge: Bridge, knot_dns: Any) -> None:
    domain = fresh_domain()
    knot_dns.set(domain, "MX", f"20 b.{domain}.", f"10 Z.{domain}.", f"10 a.{domain}.")
    route = bridge.discovery.discover(domain)
    assert route.route == "smtp" and route.mx == (f"a.{domain}", f"z.{domain}", f"b.{domain}")


def test_mx_hosts_are_ordered_by_preference_whatever_order_they_arrive_in() -> None:
    # Knot sends an RRset in canonical order (preference first), so the order of another server is built here.
    arrived = [
        dns.rdata.from_text("IN", "MX", text) for text in ("30 c.test.", "10 B.test.", "20 a.test.", "10 b.test.")
    ]
    assert mail_exchangers(arrived) == ("b.test", "a.test", "c.test")


def test_null_mx_is_none(bridge: Bridge, knot_dns: Any) -> None:
    domain = fresh_domain()
    knot_dns.set(domain, "MX", "0 .")
    route = bridge.discovery.discover(domain)
    assert route.route == "none" and "null MX" in route.reason


def test_a_domain_that_does_not_exist_is_none(bridge: Bridge) -> None:
    route = bridge.discovery.discover(fresh_domain())
    assert route.route == "none" and "NXDOMAIN" in route.reason


def test_a_domain_without_mailio_record_or_mx_is_none(bridge: Bridge, knot_dns: Any) -> None:
    domain = fresh_domain()
    knot_dns.set_a(domain, "192.0.2.1")  # it exists; an A record is no mail route
    route = bridge.discovery.discover(domain)
    assert route.route == "none" and "no Mailio record and no MX" in route.reason


def test_idna_domains_are_asked_and_cached_as_a_labels(bridge: Bridge, knot_dns: Any, redis_url: str) -> None:
    key = new_key()
    knot_dns.set_txt("mailio._mailiokey.xn--bcher-kva.mailio.test", record(key))
    route = bridge.discovery.discover("Bücher.Mailio.Test.")
    assert (route.domain, route.host, route.key) == ("xn--bcher-kva.mailio.test", "xn--bcher-kva.mailio.test", key)
    assert redis.Redis.from_url(redis_url).exists(CACHE_PREFIX + "xn--bcher-kva.mailio.test")
    assert bridge.discovery.discover("xn--bcher-kva.mailio.test").cached


GARBAGE = ["", " ", "a b.test", "foo..bar", "-x.test", "x_y.test", f"{'x' * 64}.test", "1.2.3.4", "u@x.test"]
GARBAGE += ["http://x.test", "x.test:25", "a.\u2615\u0000.test", "\ud800.test", "a." * 130 + "test"]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_domains_are_refused_before_any_dns(garbage: str) -> None:
    with pytest.raises(InvalidDomain):
        normalize_domain(garbage)


# --- temporary failures -------------------------------------------------------------------------


def test_dead_dns_is_temporary_never_none_and_never_cached(relay: RelayResolver, knot_dns: Any, redis_url: str) -> None:
    domain = fresh_domain("peer.test")
    knot_dns.set(domain, "MX", f"10 mx.{domain}.")
    discovery = relayed_discovery(relay, redis_url)
    assert discovery.discover(domain).route == "smtp"  # answered, and cached
    delegate_dead(knot_dns, domain)  # from now on its zone's server never answers
    connection = redis.Redis.from_url(redis_url)
    connection.delete(CACHE_PREFIX + domain)
    started = time.monotonic()
    route = discovery.discover(domain)
    assert route.route == "temporary" and route.dnssec is None and "retry later" in route.reason
    assert time.monotonic() - started < 3
    assert not connection.exists(CACHE_PREFIX + domain)  # not cached: the next caller asks again
    assert discovery.discover(domain).temporary
    # A forced lookup that fails keeps what was known: temporary is never written over an answer.
    dead_too = fresh_domain("peer.test")
    knot_dns.set(dead_too, "MX", f"10 mx.{dead_too}.")
    connection.delete(UnreachableZones.PREFIX + "peer.test")
    fresh = relayed_discovery(relay, redis_url)
    assert fresh.discover(dead_too).route == "smtp"
    delegate_dead(knot_dns, dead_too)
    assert fresh.discover(dead_too, fresh=True).temporary
    assert fresh.discover(dead_too).route == "smtp"


# --- the cache ----------------------------------------------------------------------------------


def test_a_changed_record_is_served_from_the_cache_until_a_fresh_lookup(
    environment: dict[str, str], knot_dns: Any
) -> None:
    domain, old, new = fresh_domain(), new_key(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(old))
    web, worker = Bridge(Settings.from_env(environment)), Bridge(Settings.from_env(environment))
    first = web.discovery.discover(domain)
    assert (first.key, first.cached) == (old, False)
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(new))  # a key rotation
    shared = worker.discovery.discover(domain)  # another process: the cache is Redis, not memory
    assert (shared.key, shared.cached) == (old, True)
    # A signature failed against the old key: look once more, past Redis and the resolver's own cache.
    rotated = web.discovery.discover(domain, fresh=True)
    assert (rotated.key, rotated.cached) == (new, False)
    assert (web.discovery.discover(domain).key, web.discovery.discover(domain).cached) == (new, True)
    # The other process holds what it read in memory for at most LOCAL_SECONDS, then reads Redis again.
    assert worker.discovery.discover(domain).key == old
    time.sleep(LOCAL_SECONDS + 0.05)
    assert (worker.discovery.discover(domain).key, worker.discovery.discover(domain).cached) == (new, True)


def test_each_process_answers_from_memory_for_at_most_a_second(bridge: Bridge, knot_dns: Any, redis_url: str) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(key))
    bridge.discovery.discover(domain)
    connection = redis.Redis.from_url(redis_url)
    connection.delete(CACHE_PREFIX + domain)  # nobody asks Redis within the second...
    assert (bridge.discovery.discover(domain).key, bridge.discovery.discover(domain).cached) == (key, True)
    assert not connection.exists(CACHE_PREFIX + domain)
    time.sleep(LOCAL_SECONDS + 0.05)  # ... then the process asks again: Redis has nothing, so DNS, and shares it
    route = bridge.discovery.discover(domain)
    assert (route.key, route.cached) == (key, False) and connection.exists(CACHE_PREFIX + domain)


def test_none_is_cached_no_longer_than_the_negative_ttl(
    environment: dict[str, str], knot_dns: Any, redis_url: str
) -> None:
    domain = fresh_domain()
    knot_dns.set_a(domain, "192.0.2.1")
    discovery = Bridge(Settings.from_env({**environment, "BRIDGE_DISCOVERY_NEGATIVE_TTL": "7"})).discovery
    assert discovery.discover(domain).route == "none"
    assert 0 < redis.Redis.from_url(redis_url).pttl(CACHE_PREFIX + domain) <= 7000
    knot_dns.set(domain, "MX", f"10 mx.{domain}.")
    cached = discovery.discover(domain)
    assert (cached.route, cached.cached) == ("none", True)
    assert discovery.discover(domain, fresh=True).route == "smtp"


def test_a_route_expires_with_its_records_ttl(bridge: Bridge, knot_dns: Any, redis_url: str) -> None:
    domain, old, new = fresh_domain(), new_key(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(old), ttl=2)
    assert bridge.discovery.discover(domain).key == old
    assert 0 < redis.Redis.from_url(redis_url).pttl(CACHE_PREFIX + domain) <= 2000
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(new), ttl=2)
    assert bridge.discovery.discover(domain).cached
    time.sleep(2.1)
    route = bridge.discovery.discover(domain)
    assert (route.key, route.cached) == (new, False)


def test_a_one_second_ttl_is_kept_one_second(bridge: Bridge, knot_dns: Any, redis_url: str) -> None:
    domain = fresh_domain()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(new_key()), ttl=1)
    bridge.discovery.discover(domain)
    assert 0 < redis.Redis.from_url(redis_url).pttl(CACHE_PREFIX + domain) <= 1000


def test_the_max_ttl_setting_caps_found_routes(environment: dict[str, str], knot_dns: Any, redis_url: str) -> None:
    domain = fresh_domain()
    knot_dns.set(domain, "MX", f"10 mx.{domain}.", ttl=600)
    discovery = Bridge(Settings.from_env({**environment, "BRIDGE_DISCOVERY_MAX_TTL": "5"})).discovery
    assert discovery.discover(domain).route == "smtp"
    assert 0 < redis.Redis.from_url(redis_url).pttl(CACHE_PREFIX + domain) <= 5000


def test_redis_down_still_answers_from_dns(knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", record(key))
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    discovery = Discovery(knot_dns.resolver(), nowhere)
    route = discovery.discover(domain)
    assert (route.key, route.cached) == (key, False)
    assert discovery.discover(domain, fresh=True).key == key


def test_the_cache_holds_json_without_anything_secret(bridge: Bridge, knot_dns: Any, redis_url: str) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.mio.{domain}", record(key))
    bridge.discovery.discover(domain)
    stored = json.loads(redis.Redis.from_url(redis_url).get(CACHE_PREFIX + domain) or b"")
    assert 0 < stored.pop("expires") - time.time() <= 3600  # when the entry expires (for each process's memory)
    assert stored == _mio_route(domain, key)


# --- DNSSEC -------------------------------------------------------------------------------------


class ValidatingRelay(RelayResolver):
    """Knot's answers with the AD flag set when the question asked for it, as a validating resolver
    in front of a signed zone answers (RFC 6840 5.7); it records the flags of what it was asked."""

    def __init__(self, knot: Any) -> None:
        super().__init__(knot)
        self.asked_ad: list[bool] = []

    def _answer(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        wire = super()._answer(data, tcp=tcp)
        if wire is None:
            return None
        asked = bool(dns.message.from_wire(data).flags & dns.flags.AD)
        self.asked_ad.append(asked)
        reply = dns.message.from_wire(wire)
        if asked:
            reply.flags |= dns.flags.AD
        return reply.to_wire()


def test_dnssec_is_reported_from_the_ad_flag(knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.mailio.{domain}", record(key))
    relay = ValidatingRelay(knot_dns)
    try:
        route = Discovery(make_resolver([relay.nameserver])).discover(domain)
    finally:
        relay.stop()
    assert (route.key, route.dnssec) == (key, True)
    assert relay.asked_ad == [True, True, True]  # D (NXDOMAIN), mio.D (NXDOMAIN), mailio.D (the record)


# --- the command line ---------------------------------------------------------------------------


def cli(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "discover", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_prints_one_json_object(environment: dict[str, str], knot_dns: Any) -> None:
    domain, key = fresh_domain(), new_key()
    knot_dns.set_txt(f"mailio._mailiokey.mio.{domain}", record(key))
    first = cli(environment, domain)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == _mio_route(domain, key)
    assert first.stdout.count("\n") == 1
    assert json.loads(cli(environment, domain).stdout)["cached"] is True
    assert json.loads(cli(environment, domain, "--fresh").stdout)["cached"] is False
    smtp = fresh_domain()
    knot_dns.set(smtp, "MX", f"10 mx.{smtp}.")
    assert json.loads(cli(environment, smtp).stdout)["mx"] == [f"mx.{smtp}"]
    none = cli(environment, fresh_domain())
    assert none.returncode == 0 and json.loads(none.stdout)["route"] == "none"
    bad = cli(environment, "not a domain")
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.count("\n") == 1


def test_the_cli_exits_non_zero_for_a_temporary_failure(
    environment: dict[str, str], knot_dns: Any, relay: RelayResolver
) -> None:
    domain = fresh_domain("peer.test")
    delegate_dead(knot_dns, domain)
    result = cli({**environment, "BRIDGE_DNS_NAMESERVERS": relay.nameserver}, domain)
    assert result.returncode == 75, result.stderr
    out = json.loads(result.stdout)
    assert (out["route"], out["domain"], out["cached"], out["dnssec"]) == ("temporary", domain, False, None)


def _mio_route(domain: str, key: str) -> dict[str, object]:
    """What a fresh lookup says of a domain whose key is published at its ``mio.`` candidate."""
    return {
        "route": "mailio",
        "domain": domain,
        "host": f"mio.{domain}",
        "key": key,
        "cached": False,
        "dnssec": False,
        "reason": f"Mailio key published at mailio._mailiokey.mio.{domain}",
    }
