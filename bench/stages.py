"""Where the time of one inbound request goes: each stage of the real request path, timed in-process.

Every stage calls the bridge's own code on a ~20 KB signed delivery from the pool: signature check,
``parse_inbound``, ``sender_facts``, ``check_dkim`` (on a message without a DKIM signature, and on one
with a real signature: key fetched from Knot, and key in the resolver's cache so no DNS), sealing
(``seal`` + ``sealed_chunks``), the object-store creates of the sealed body (and of the record, while
the request path writes one), filesystem store with fsync on and off, the Redis round trip
(``MailIndex.note_received``), the whole ``accept_postal_delivery`` (unsigned and DKIM-signed), the
same for a retry of a delivery already stored (the dedupe check: whatever the bridge does before it
knows), the whole Flask view through Flask's test client (no HTTP server), and a cached Mailio discovery
lookup (``bridge.discovery.discover`` answered from Redis) beside a plain Redis GET of the same entry. Stages that store
something get a new message id every call, so only the retry stage takes the duplicate shortcut.
Figures are medians (and 90th percentiles) in milliseconds.

This module must never time anything but the bridge's code, and never write outside the data directory
it is given.
"""

from __future__ import annotations

import gc
import inspect
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.resolver

from bridge import create_app
from bridge.context import Bridge
from bridge.dns import make_resolver
from bridge.mail.auth import check_dkim
from bridge.mail.headers import sender_facts
from bridge.mailio.discovery import CACHE_PREFIX
from bridge.postal.ingress import accept_postal_delivery
from bridge.postal.payloads import parse_inbound
from bridge.sealing import seal, sealed_chunks
from bridge.settings import Settings
from bridge.store.messages import STATUS_RECEIVED, MessageStore, message_id
from bridge.store.objects import FileObjectStore
from tests.dns_server import KnotDNS

WARM_UP = 3
_SEAL_TAKES_AAD = "aad" in inspect.signature(seal).parameters
MIB = 1024 * 1024


@dataclass(frozen=True)
class StageTiming:
    name: str
    median_ms: float
    p90_ms: float
    runs: int


def _time_round_robin(
    stages: list[tuple[str, Callable[[int], object]]], runs: int, seconds: float
) -> list[StageTiming]:
    """Call every stage once per round, ``WARM_UP + runs`` rounds (fewer, but 10 at least, past
    ``seconds``): interleaving spreads this machine's noise over all stages instead of a few."""
    samples: list[list[float]] = [[] for _ in stages]
    deadline = time.monotonic() + seconds
    for i in range(WARM_UP + runs):
        for n, (_, call) in enumerate(stages):
            start = time.perf_counter()
            call(i)
            if i >= WARM_UP:
                samples[n].append((time.perf_counter() - start) * 1000.0)
        if i >= WARM_UP + 10 and time.monotonic() > deadline:
            break
    results = []
    for (name, _), values in zip(stages, samples, strict=True):
        values.sort()
        p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
        results.append(StageTiming(name, statistics.median(values), p90, len(values)))
    return results


def _record(address: str, msg_id: str, size: int) -> dict[str, Any]:
    """A message record shaped like the one accept_postal_delivery writes."""
    return {
        "id": msg_id,
        "mailbox": address,
        "status": STATUS_RECEIVED,
        "folder": None,
        "received_at": time.time(),
        "size": size,
        "source": "postal",
        "postal": {
            "kid": "0" * 64,
            "id": 1234567,
            "token": None,
            "rcpt_to": "support@example.com",
            "mail_from": "jane@example.org",
            "format": "raw",
            "rebuilt": False,
        },
        "sender": {"from": "jane@example.org", "problem": None, "client_ip": "192.0.2.44", "helo": "mail"},
        "spam": {"postal": False, "score": 0.0},
        "verdicts": {},
        "reason": None,
    }


def measure_stages(
    settings: Settings,
    deliveries: list[tuple[bytes, dict[str, str]]],
    signed_deliveries: list[tuple[bytes, dict[str, str]]],
    *,
    runs: int,
    seconds: float,
) -> list[StageTiming]:
    """Time each stage ``runs`` times (bounded by ``seconds`` in all); needs 3 * (runs + 3) deliveries
    and 2 * (runs + 3) DKIM-signed ones whose key ``settings.dns_nameservers`` serves."""
    per = WARM_UP + runs
    if len(deliveries) < 3 * per or len(signed_deliveries) < 2 * per:
        raise ValueError(f"measure_stages needs {3 * per} deliveries and {2 * per} signed ones")
    bridge = Bridge(settings, fsync=True)
    bridge_nofsync = Bridge(settings, fsync=False)
    limit = settings.max_message_bytes
    body0, headers0 = deliveries[0]
    kid = bridge.postal_keys.verify(body0, headers0)
    messages = [parse_inbound(body, headers["Content-Type"], limit) for body, headers in deliveries]
    message0 = messages[0]
    mailbox = bridge.mailboxes.resolve(message0.rcpt_to)
    if mailbox is None:
        raise ValueError("the stage bench's mailbox does not exist")
    recipient = mailbox.recipient(settings.domain)
    sealed = sealed_chunks(seal(message0.message, [recipient]))
    root = settings.storage_url.removeprefix("file://")
    stores = {
        True: MessageStore(FileObjectStore(root, fsync=True)),
        False: MessageStore(FileObjectStore(root, fsync=False)),
    }
    signed = [parse_inbound(body, headers["Content-Type"], limit) for body, headers in signed_deliveries]
    knot = make_resolver(list(settings.dns_nameservers))
    cached = make_resolver(list(settings.dns_nameservers))
    cached.cache = dns.resolver.Cache()  # the key fetched once, then answered from memory
    for resolver in (knot, cached):
        verdict = check_dkim(signed[0].message, resolver)
        if verdict[0] != "pass":
            raise RuntimeError(f"the stage bench's DKIM-signed message does not verify: {verdict}")
    for inbound in signed[:per]:  # stored once, untimed: the retry stage sends them again
        accept_postal_delivery(bridge, inbound, kid)
    app = create_app(settings)
    client = app.test_client()
    address = mailbox.address
    size = len(message0.message)

    def body_create(fsync: bool) -> Callable[[int], object]:
        return lambda i: stores[fsync].create_body(address, message_id(f"stage-body-{fsync}-{i}"), sealed)

    def record_create(fsync: bool) -> Callable[[int], object]:
        return lambda i: stores[fsync].create_record(_record(address, message_id(f"stage-record-{fsync}-{i}"), size))

    # The request path seals the message's initial record with it (as the JWE's aad) when it can.
    aad = json.dumps(_record(address, message_id("stage-aad"), size), sort_keys=True).encode()

    def sealing(i: int) -> object:
        if _SEAL_TAKES_AAD:
            return sealed_chunks(seal(messages[i].message, [recipient], aad))  # type: ignore[call-arg]
        return sealed_chunks(seal(messages[i].message, [recipient]))

    def flask_view(i: int) -> None:
        body, headers = deliveries[2 * per + i]
        response = client.post("/postal/inbound", data=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"the Flask view answered {response.status_code}")

    stages: list[tuple[str, Callable[[int], object]]] = [
        ("verify signature (postal_keys.verify)", lambda i: bridge.postal_keys.verify(*deliveries[i])),
        ("parse_inbound (JSON + base64)", lambda i: parse_inbound(deliveries[i][0], "application/json", limit)),
        ("sender_facts (header block)", lambda i: sender_facts(messages[i].message)),
        ("check_dkim (message without DKIM-Signature)", lambda i: check_dkim(messages[i].message, bridge.resolver)),
        ("check_dkim (one valid signature, key from Knot)", lambda i: check_dkim(signed[i].message, knot)),
        ("check_dkim (one valid signature, key cached: no DNS)", lambda i: check_dkim(signed[i].message, cached)),
        ("seal + sealed_chunks (JWE)", sealing),
        ("create body object, fsync on", body_create(True)),
        ("create body object, fsync off", body_create(False)),
        (
            "Redis round trip (note_received)",
            lambda i: bridge.index.note_received(address, message_id(f"stage-redis-{i}"), time.time()),
        ),
        ("accept_postal_delivery, fsync on", lambda i: accept_postal_delivery(bridge, messages[i], kid)),
        (
            "accept_postal_delivery, fsync off",
            lambda i: accept_postal_delivery(bridge_nofsync, messages[per + i], kid),
        ),
        (
            "accept_postal_delivery, DKIM-signed, fsync on",
            lambda i: accept_postal_delivery(bridge, signed[per + i], kid),
        ),
        (
            "accept_postal_delivery of a retry (DKIM-signed, already stored)",
            lambda i: _expect(accept_postal_delivery(bridge, signed[i], kid).result, "duplicate"),
        ),
        ("whole view via Flask test client, fsync on", flask_view),
    ]
    # Beside the other Redis round trip, not after a stage that allocates a lot: the cyclic collector
    # that such a stage sets off would run inside whichever call comes next.
    at = [name for name, _ in stages].index("Redis round trip (note_received)") + 1
    stages[at:at] = _discovery_stages(bridge, settings)
    if hasattr(bridge.messages, "has_body"):  # the dedupe check before DKIM, when the request path has one
        stored = [message_id(inbound.delivery_key(kid)) for inbound in signed[:per]]
        at = [name for name, _ in stages].index("accept_postal_delivery of a retry (DKIM-signed, already stored)")
        stages[at:at] = [
            ("dedupe check (messages.has_body, a stored id)", lambda i: bridge.messages.has_body(address, stored[i]))
        ]
    if hasattr(MessageStore, "create_record"):  # a separate record object on the request path
        at = [name for name, _ in stages].index("create body object, fsync on") + 1
        stages[at:at] = [("create record object, fsync on", record_create(True))]
        stages[at + 2 : at + 2] = [("create record object, fsync off", record_create(False))]
    return _time_round_robin(stages, runs, seconds)


DISCOVERY_DOMAIN = "bench.mailio.test"


def _discovery_stages(bridge: Bridge, settings: Settings) -> list[tuple[str, Callable[[int], object]]]:
    """A Mailio route published in the bench's Knot, looked up once, then timed as every later caller
    sees it (from Redis), beside a bare GET of the same Redis entry: the difference is discovery's own."""
    host, _, port = settings.dns_nameservers[0].rpartition(":")
    knot = KnotDNS(host=host, port=int(port), zones=("mailio.test",))
    knot.set_txt(f"mailio._mailiokey.{DISCOVERY_DOMAIN}", f"v=MAILIO1; k=ed25519; p={'A' * 43}=", ttl=3600)
    if bridge.discovery.discover(DISCOVERY_DOMAIN, fresh=True).route != "mailio":
        raise RuntimeError("the stage bench's Mailio record was not discovered")

    def cached(i: int) -> object:
        route = bridge.discovery.discover(DISCOVERY_DOMAIN)
        if not route.cached:
            raise RuntimeError("the stage bench's discovery lookup was not answered from the cache")
        return route

    # The bare GET first: the first Redis call after the heavy stages pays for warming the client's code
    # and the CPU caches, which is neither stage's own cost.
    return [
        (
            "plain Redis GET of the discovery cache entry (baseline)",
            lambda i: bridge.redis.get(CACHE_PREFIX + DISCOVERY_DOMAIN),
        ),
        ("cached discovery lookup (discover(), Mailio route from Redis)", cached),
    ]


def _expect(result: str, wanted: str) -> str:
    if result != wanted:
        raise RuntimeError(f"the stage bench expected {wanted!r}, the bridge answered {result!r}")
    return result


@dataclass(frozen=True)
class StageMemory:
    name: str
    peak_mib: float  # the most the stage allocated above what was live when it started
    retained_mib: float  # what it left allocated (its result, or garbage nobody collected yet)


def measure_stage_memory(settings: Settings, body: bytes, headers: dict[str, str]) -> tuple[list[StageMemory], float]:
    """Python-heap peaks (tracemalloc) of each stage for one big delivery, in the view's order.

    Returns the rows and how many MiB ``gc.collect()`` frees right after sealing: memory held by
    reference cycles, which a request keeps until the cyclic collector happens to run.
    """
    bridge = Bridge(settings, fsync=True)
    limit = settings.max_message_bytes
    mailbox = bridge.mailboxes.resolve(parse_inbound(body, headers["Content-Type"], limit).rcpt_to)
    if mailbox is None:
        raise ValueError("the stage bench's mailbox does not exist")
    recipient = mailbox.recipient(settings.domain)
    request = bytearray(body)  # the view holds the body as a bytearray while it verifies and parses
    rows: list[StageMemory] = []

    def traced(name: str, call: Callable[[], Any]) -> Any:
        gc.collect()
        tracemalloc.start()
        try:
            result = call()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        rows.append(StageMemory(name, peak / MIB, current / MIB))
        return result

    kid = traced("verify signature", lambda r=request: bridge.postal_keys.verify(r, headers))
    message = traced("parse_inbound", lambda r=request: parse_inbound(r, headers["Content-Type"], limit))
    del request
    traced("sender_facts", lambda: sender_facts(message.message))
    document = traced("seal (joserfc encrypt_json)", lambda: seal(message.message, [recipient]))
    del document

    def seal_and_collect() -> dict[str, Any]:
        sealed = seal(message.message, [recipient])
        gc.collect()
        return sealed

    document = traced("seal, then gc.collect()", seal_and_collect)
    cyclic = rows[-2].retained_mib - rows[-1].retained_mib
    chunks = traced("sealed_chunks", lambda d=document: sealed_chunks(d))
    del document
    msg_id = message_id(f"stage-memory-{time.time()}")
    traced("create body, fsync on", lambda c=chunks: bridge.messages.create_body(mailbox.address, msg_id, c))
    del chunks
    traced("accept_postal_delivery (whole)", lambda: accept_postal_delivery(bridge, message, kid))
    return rows, cyclic
