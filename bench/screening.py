"""Screening in the filing job, measured: the handshake/screening issue's part of ``make bench``.

Everything runs on 127.0.0.1: the run's private redis-server, a Knot DNS server started here with
tests/dns_server.py's configuration and helpers, serving each sender domain's DKIM key, SPF and DMARC
records, and a file:// object store in a temporary directory under the project's ./var (not /tmp:
file creates there have been far slower on these machines; every run measures the two and says by
how much).

1. In-process, one worker process: messages are stored through the real ingest
   (``bridge.postal.ingress.accept_postal_delivery``, DKIM checked against Knot), untimed; then only the
   real filing job (``bridge.jobs.inbound.file_unfiled``) draining them is timed:

   a. known senders: e-mail hashes cached in Redis, handshakes stored (accepted, revoked, request,
      none), a few contacts; one untimed message per sender first fills the job's own caches
      (SPF/DMARC verdicts, the handshake and contact sets), as in a worker that has been running;
   b. first-time senders: one message from each of N new addresses, filed by a fresh Bridge (cold DNS
      and verdict caches): ``sender_hashes.computed`` must equal N; then N more from the same senders,
      which must compute none. The two runs are the same job over the same count, cold vs warm.

   Plus the price of one ``email_lookup_hash`` and a cProfile of the job over known senders.
2. End to end: one gunicorn worker process + one ``python -m bridge worker`` screening against Knot,
   deliveries from the known senders, driven and timed by the machinery of section 2.

Every message is DKIM-signed by its sender's domain and sent from an address its SPF allows, so the
folder each lands in is known in advance; a run whose folders differ is reported as broken (screening
that failed to authenticate would put approved senders' mail in "other" and still look fast).

It must never send traffic anywhere but 127.0.0.1, never stop a process it did not start (Knot is
stopped by its PID), and never leave keys or mail outside its temporary directory, removed at the end.
"""

from __future__ import annotations

import copy
import cProfile
import json
import multiprocessing
import pstats
import re
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dkim
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.update
import redis
from dns.rdtypes.ANY.TXT import TXT

from bench import procs
from bench.pool import Pool, message_template
from bench.procs import BenchError
from bridge import context
from bridge.context import Bridge
from bridge.jobs.inbound import file_unfiled
from bridge.mailio.handshakes import parse_signed_handshake, sign_handshake
from bridge.mailio.identity import email_lookup_hash
from bridge.postal.ingress import accept_postal_delivery
from bridge.postal.payloads import parse_inbound
from bridge.settings import Settings
from bridge.store.objects import FileObjectStore
from tests.dns_server import KnotDNS, KnotServer
from tests.postal_sim import raw_payload
from tests.test_mail_auth import Signer

if TYPE_CHECKING:
    from bench.__main__ import Bench, Run

VAR = procs.ROOT / "var"
SENDER_IP = "192.0.2.44"
SENDER_ZONE = "sender.test"
POSTAL_KID = "bench-screening"
FOLDERS = ("inbox", "other", "spam", "handshake")
# The owner's standing toward known senders, in a repeating pattern of ten, and where each one's
# authenticated mail must be filed.
PATTERN = ("accepted",) * 4 + ("revoked", "request", "contact") + ("none",) * 3
EXPECTED_FOLDER = {"accepted": "inbox", "contact": "inbox", "revoked": "spam", "request": "handshake", "none": "other"}
_SIGNED = [b"From", b"To", b"Subject", b"Date", b"MIME-Version", b"Content-Type"]


@dataclass
class ScreeningConfig:
    known_senders: int = 50
    known_messages: int = 3000
    new_senders: int = 200
    profile_messages: int = 1000
    scrypt_samples: int = 10


@dataclass
class Sender:
    address: str
    domain: str
    signer: Signer
    standing: str = "none"
    email_hash: str = ""
    _signed: bytes = b""

    def prepare(self) -> None:
        """Sign this sender's message (~12 ms) once, before the ingest processes fork and inherit it."""
        if not self._signed:
            self._signed = _signed_message(self.address, self.signer)

    def message(self, number: int) -> bytes:
        """A ~20 KB message from this sender, DKIM-signed once per sender; a per-message Message-ID
        (outside the signature) keeps every delivery distinct without one RSA signing per message."""
        self.prepare()
        return f"Message-ID: <screening-{number}@{self.domain}>\r\n".encode() + self._signed


def _signed_message(address: str, signer: Signer) -> bytes:
    head, _, body = message_template().partition(b"\r\n\r\n")
    mime = [line for line in head.split(b"\r\n") if line.startswith((b"MIME-Version", b"Content-Type", b" "))]
    raw = (
        b"\r\n".join(
            [
                f"From: Sender <{address}>".encode(),
                b"To: Acme Support <support@mail.bench.test>",
                b"Subject: Order shipped",
                b"Date: Tue, 28 Apr 2026 18:19:30 +0200",
                *mime,
            ]
        )
        + b"\r\n\r\n"
        + body
    )
    header = dkim.sign(
        raw, signer.selector.encode(), signer.domain.encode(), signer.private_pem, include_headers=_SIGNED
    )
    return header + raw


@dataclass
class Lab:
    """The section's shared state: Knot, the data directory under ./var, the senders, the bridge env."""

    bench: Bench
    config: ScreeningConfig
    root: Path
    knot: KnotServer
    dns: KnotDNS
    env: dict[str, str]
    settings: Settings
    email: str
    address: str
    known: list[Sender] = field(default_factory=list)
    new: list[Sender] = field(default_factory=list)
    domains: list[tuple[str, Signer]] = field(default_factory=list)

    def payload(self, sender: Sender, number: int) -> bytes:
        """Delivery ``number`` from ``sender``: the RawMessage body Postal would post (as plain JSON:
        the bridge does not care how Ruby escapes)."""
        payload = raw_payload(
            postal_id=10_000_000 + number,
            rcpt_to=self.email,
            mail_from=sender.address,
            message=sender.message(number),
            client_ip=SENDER_IP,
        )
        return json.dumps(payload).encode()


# --------------------------------------------------------------------------------------------------
# set-up (untimed)


def make_domains(server: KnotDNS, count: int) -> list[tuple[str, Signer]]:
    """``count`` sender domains, each publishing a DKIM key, ``v=spf1 ip4:SENDER_IP -all`` and
    ``p=none`` DMARC, in one dynamic update (Knot commits each update to its journal: ~70 ms here).

    One RSA key serves every domain (generating one costs ~55 ms); each domain publishes it under its
    own name, so every DNS lookup and every verification is still one per domain and message.
    """
    key = Signer(f"k000.{SENDER_ZONE}")
    change = dns.update.UpdateMessage(SENDER_ZONE)
    domains = []
    for number in range(count):
        signer = copy.copy(key)
        signer.domain = f"k{number:03d}.{SENDER_ZONE}"
        domains.append((signer.domain, signer))
        for name, value in (
            (signer.record_name, signer.record),
            (signer.domain, f"v=spf1 ip4:{SENDER_IP} -all"),
            (f"_dmarc.{signer.domain}", "v=DMARC1; p=none"),
        ):
            data = value.encode()
            chunks = [data[i : i + 255] for i in range(0, len(data), 255)]
            change.replace(name + ".", 60, TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks))
    response = dns.query.tcp(change, server.host, port=server.port, timeout=10)
    if response.rcode() != dns.rcode.NOERROR:
        raise BenchError(f"Knot refused the sender records: {dns.rcode.to_text(response.rcode())}")
    return domains


def _hash_in_child(job: tuple[dict[str, str], list[str]]) -> tuple[dict[str, str], int]:
    env, emails = job
    bridge = Bridge(Settings.from_env(env), fsync=False)
    return bridge.sender_hashes.lookup_hashes(emails), bridge.sender_hashes.computed


def _warm_hashes(env: dict[str, str], emails: list[str], processes: int = 2) -> int:
    """Cache the senders' e-mail hashes through the bridge's own SenderHashes, in two processes
    (scrypt is ~140 ms each): returns how many were computed."""
    chunks = [emails[i::processes] for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as workers:
        return sum(computed for _, computed in workers.map(_hash_in_child, [(env, c) for c in chunks]))


def _store_standing(lab: Lab, bridge: Bridge, sender: Sender) -> None:
    owner = lab.bench.owner
    if sender.standing == "contact":
        bridge.contacts.record(lab.address, sender.email_hash)
    elif sender.standing in ("accepted", "revoked", "request"):
        document = sign_handshake(
            ed25519_private=owner.ed25519_private,
            status=sender.standing,
            sender_email_hash=sender.email_hash,
            origin_domain=lab.settings.domain,
        )
        handshake = parse_signed_handshake(document, owner_public_key=owner.ed25519_public)
        bridge.handshakes.put(lab.address, handshake)


def setup_lab(bench: Bench, config: ScreeningConfig, root: Path, email: str) -> Lab:
    knot = KnotServer(root / "knot")
    try:
        dns_server = knot.start()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    try:
        env = bench.env("screening", fsync=False, root=root, extra={"BRIDGE_DNS_NAMESERVERS": dns_server.nameserver})
        lab = Lab(bench, config, root, knot, dns_server, env, Settings.from_env(env), email, bench.address(env))
        lab.domains = make_domains(dns_server, config.known_senders)
        lab.known = [
            Sender(f"alice@{domain}", domain, signer, PATTERN[i % len(PATTERN)])
            for i, (domain, signer) in enumerate(lab.domains)
        ]
        _warm_hashes(env, [s.address for s in lab.known])
        bridge = Bridge(lab.settings, fsync=False)
        hashes = bridge.sender_hashes.lookup_hashes(s.address for s in lab.known)
        if bridge.sender_hashes.computed:
            raise BenchError("screening set-up: the known senders' e-mail hashes were not cached")
        for sender in lab.known:
            sender.email_hash = hashes[sender.address.lower()]
            _store_standing(lab, bridge, sender)
        return lab
    except BaseException:
        knot.stop()
        raise


_FORKED: dict[str, Any] = {}  # what the ingest processes inherit (set just before they fork)


def _ingest_chunk(items: list[tuple[str, int]]) -> int:
    """In an ingest process: store deliveries (sender address, number) through its own Bridge."""
    lab: Lab = _FORKED["lab"]
    if "bridge" not in _FORKED:
        _FORKED["bridge"] = Bridge(lab.settings, fsync=False)
    bridge = _FORKED["bridge"]
    senders = {s.address: s for s in (*lab.known, *lab.new)}
    limit = lab.settings.max_message_bytes
    stored = 0
    for address, number in items:
        inbound = parse_inbound(lab.payload(senders[address], number), "application/json", limit)
        if accept_postal_delivery(bridge, inbound, POSTAL_KID).result == "stored":
            stored += 1
    return stored


def ingest(lab: Lab, stream: list[tuple[Sender, int]], processes: int = 2) -> dict[str, float]:
    """Store deliveries through the real ingest (untimed for the job; ~6 ms each with a DKIM signature to
    verify, so two processes share them). Leaves the RQ queue empty: no worker runs here."""
    items = [(sender.address, number) for sender, number in stream]
    for sender, _ in stream:
        sender.prepare()
    chunks = [items[i : i + 100] for i in range(0, len(items), 100)]
    start = time.perf_counter()
    _FORKED.clear()
    _FORKED["lab"] = lab
    try:
        with multiprocessing.get_context("fork").Pool(processes) as workers:
            stored = sum(workers.imap_unordered(_ingest_chunk, chunks))
    finally:
        _FORKED.clear()
    seconds = time.perf_counter() - start
    Bridge(lab.settings, fsync=False).queue.empty()
    if stored != len(items):
        raise BenchError(f"screening ingest stored {stored} of {len(items)} deliveries")
    return {"stored": stored, "seconds": seconds, "processes": processes}


def folder_counts(bridge: Bridge, address: str) -> dict[str, int]:
    pipe = bridge.redis.pipeline(transaction=False)
    for folder in FOLDERS:
        pipe.zcard(f"bridge:idx:{address}:{folder}")
    return dict(zip(FOLDERS, (int(n) for n in pipe.execute()), strict=True))


def _known_stream(lab: Lab, count: int, first: int) -> list[tuple[Sender, int]]:
    """Deliveries ``first`` .. ``first + count - 1``, the known senders taking turns."""
    return [(lab.known[n % len(lab.known)], n) for n in range(first, first + count)]


def _expected(stream: Iterable[tuple[Sender, int]]) -> dict[str, int]:
    """Where the deliveries of ``stream`` must be filed (all are authenticated)."""
    counts = Counter(EXPECTED_FOLDER[sender.standing] for sender, _ in stream)
    return {folder: counts.get(folder, 0) for folder in FOLDERS}


# --------------------------------------------------------------------------------------------------
# 1. in-process filing job


def timed_drain(lab: Lab, bridge: Bridge) -> dict[str, float]:
    """Run the real filing job until the unfiled set is empty: wall, this process's CPU, Redis's CPU."""
    context.use(bridge)
    try:
        redis_pid = lab.bench.redis.pid
        redis_before = procs.cpu_seconds([redis_pid]) if redis_pid else 0.0
        computed = bridge.sender_hashes.computed
        cpu = time.process_time()
        start = time.perf_counter()
        filed = file_unfiled()
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        redis_cpu = (procs.cpu_seconds([redis_pid]) - redis_before) if redis_pid else 0.0
    finally:
        context.use(None)
    return {
        "filed": filed,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "redis_cpu_seconds": redis_cpu,
        "computed": bridge.sender_hashes.computed - computed,
    }


def _check_folders(run: Run, what: str, before: dict[str, int], after: dict[str, int], want: dict[str, int]) -> dict:
    got = {f: after[f] - before[f] for f in FOLDERS}
    if got != want:
        run.problems.append(f"screening {what}: filed into {got}, expected {want}")
    return got


# Delivery numbers of each phase (they make Message-IDs and Postal ids unique across the run).
WARM_UP, KNOWN, PROFILE, FIRST, AGAIN, E2E = 0, 100_000, 200_000, 300_000, 400_000, 500_000


def measure_in_process(lab: Lab, run: Run) -> dict[str, Any]:
    config = lab.config
    address = lab.address
    job = Bridge(lab.settings, fsync=False)  # what context.current() builds in a worker
    results: dict[str, Any] = {"config": config}

    # Fill the job's own caches as a running worker has them: one message per known sender, untimed.
    ingest(lab, _known_stream(lab, len(lab.known), WARM_UP))
    warm = timed_drain(lab, job)
    if warm["filed"] != len(lab.known) or warm["computed"]:
        run.problems.append(f"screening warm-up: filed {warm['filed']}, computed {warm['computed']} hashes")

    # a. known senders
    count = config.known_messages
    stream = _known_stream(lab, count, KNOWN)
    results["ingest"] = ingest(lab, stream)
    before = folder_counts(job, address)
    known = timed_drain(lab, job)
    known["folders"] = _check_folders(run, "known senders", before, folder_counts(job, address), _expected(stream))
    results["known"] = known
    if known["filed"] != count or known["computed"]:
        run.problems.append(f"screening known senders: filed {known['filed']} of {count}, {known['computed']} scrypt")
    print(f"  known senders: {_rate_line(known)}", flush=True)

    # the same job under cProfile, on fresh messages from the same senders
    ingest(lab, _known_stream(lab, config.profile_messages, PROFILE))
    results["profile"] = profile_drain(job)

    # b. first-time senders: a fresh Bridge (cold resolver and verdict caches), N new addresses
    cold = Bridge(lab.settings, fsync=False)
    lab.new = [
        Sender(f"new{i:04d}@{domain}", domain, signer)
        for i, (domain, signer) in ((i, lab.domains[i % len(lab.domains)]) for i in range(config.new_senders))
    ]
    for round_name, first in (("first", FIRST), ("again", AGAIN)):
        stream = [(sender, first + i) for i, sender in enumerate(lab.new)]
        ingest(lab, stream)
        before = folder_counts(cold, address)
        result = timed_drain(lab, cold)
        after = folder_counts(cold, address)
        _check_folders(run, f"first-time senders ({round_name})", before, after, _expected(stream))
        results[round_name] = result
        print(f"  first-time senders, {round_name}: {_rate_line(result)}; scrypt runs {result['computed']}", flush=True)
    if results["first"]["computed"] != len(lab.new) or results["again"]["computed"] != 0:
        run.problems.append(
            f"screening: {results['first']['computed']} scrypt runs for {len(lab.new)} new senders, "
            f"{results['again']['computed']} when they wrote again (want {len(lab.new)} and 0)"
        )
    results["new_senders"] = len(lab.new)

    samples = []
    for i in range(config.scrypt_samples):
        start = time.perf_counter()
        email_lookup_hash(f"scrypt-sample-{i}-{secrets.token_hex(4)}@{SENDER_ZONE}")
        samples.append((time.perf_counter() - start) * 1000)
    results["scrypt_ms"] = statistics.median(samples)
    results["file_creates"] = file_create_probe(lab.root)
    return results


def _rate_line(result: dict[str, float]) -> str:
    filed = max(1, int(result["filed"]))
    return (
        f"{result['filed']:.0f} filed in {result['seconds']:.2f} s = {filed / result['seconds']:.0f} msg/s, "
        f"{result['seconds'] * 1000 / filed:.2f} ms/msg (CPU {result['cpu_seconds'] * 1000 / filed:.2f})"
    )


def profile_drain(bridge: Bridge, top: int = 12) -> dict[str, Any]:
    """One drain under cProfile: the top functions by own time, and the bridge's by cumulative time."""
    profiler = cProfile.Profile()
    context.use(bridge)
    try:
        start = time.perf_counter()
        profiler.enable()
        filed = file_unfiled()
        profiler.disable()
        seconds = time.perf_counter() - start
    finally:
        context.use(None)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in stats.items():
        rows.append({"function": _where(filename, line, name), "calls": calls, "own": own, "cumulative": cumulative})
    by_own = sorted(rows, key=lambda r: r["own"], reverse=True)[:top]
    bridge_rows = [r for r in rows if r["function"].startswith("bridge/") and "file_unfiled" not in r["function"]]
    by_cumulative = sorted(bridge_rows, key=lambda r: r["cumulative"], reverse=True)[:top]
    total = sum(r["own"] for r in rows)
    return {"filed": filed, "seconds": seconds, "total": total, "own": by_own, "cumulative": by_cumulative}


def _where(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name  # a built-in, e.g. <method 'execute' ...>
    path = re.sub(r"^.*/lib/python3\.\d+/(site-packages/)?", "", filename).removeprefix(f"{procs.ROOT}/")
    return f"{path}:{line}({name})"


def file_create_probe(root: Path, count: int = 300) -> dict[str, float]:
    """ms per object create (27 KB, fsync off, the worker's setting) in /tmp and under ./var, interleaved."""
    samples: dict[str, list[float]] = {"/tmp": [], "./var": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-fs-", dir="/tmp") as tmp,
        tempfile.TemporaryDirectory(prefix="bench-fs-", dir=root) as var,
    ):
        stores = {"/tmp": FileObjectStore(tmp, fsync=False), "./var": FileObjectStore(var, fsync=False)}
        data = b"x" * 27_000
        for i in range(count):
            for name, store in stores.items():
                start = time.perf_counter()
                store.create(f"mail/probe/{i}.jwe", data)
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


# --------------------------------------------------------------------------------------------------
# 2. end to end with screening


def build_sender_pool(lab: Lab, directory: Path, count: int) -> Pool:
    """``count`` Postal-signed deliveries from the known senders, in bench/pool.py's on-disk format."""
    directory.mkdir(parents=True)
    pool = Pool(directory, count, lab.email)
    offset = 0
    with pool.bodies.open("wb") as data, pool.index.open("w") as index:
        for sender, number in _known_stream(lab, count, E2E):
            body = lab.payload(sender, number)
            headers = lab.bench.signer.sign_headers(body, sha1=False)
            data.write(body)
            index.write(
                f"{offset} {len(body)} {headers['X-Postal-Signature-KID']} {headers['X-Postal-Signature-256']}\n"
            )
            offset += len(body)
    return pool


def measure_e2e_screening(lab: Lab, run: Run, run_e2e: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    count = lab.bench.config.e2e_count
    pool = build_sender_pool(lab, lab.root / "pool", count)
    env = dict(lab.env, BRIDGE_FSYNC="true")  # the web process's setting in section 2
    address = lab.address
    connection = redis.Redis.from_url(env["BRIDGE_REDIS_URL"], socket_timeout=5)
    keys = [f"bridge:idx:{address}:{folder}" for folder in FOLDERS]

    def counts() -> list[int]:
        pipe = connection.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        return [int(n) for n in pipe.execute()]

    before = counts()
    result = run_e2e("e2e-screening", env, pool, count, lambda: sum(counts()) - sum(before))
    after = counts()
    got = {f: a - b for f, a, b in zip(FOLDERS, after, before, strict=True)}
    want = _expected(_known_stream(lab, result["accepted"], E2E))
    result["folders"] = got
    if got != want:
        run.problems.append(f"end to end with screening: filed into {got}, expected {want}")
    connection.close()
    return result


# --------------------------------------------------------------------------------------------------


def measure_screening(
    bench: Bench, run: Run, *, email: str, config: ScreeningConfig, run_e2e: Callable[..., dict[str, Any]]
) -> None:
    """Section 5 of ``make bench``: the in-process filing job, then end to end, sharing one Knot and store."""
    VAR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-screening-", dir=VAR) as directory:
        root = Path(directory)
        started = time.perf_counter()
        lab = setup_lab(bench, config, root, email)
        try:
            print(
                f"  set-up: {len(lab.known)} known senders (DKIM keys, SPF, DMARC in Knot; hashes cached; "
                f"handshakes stored) in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            results = measure_in_process(lab, run)
            results["e2e"] = measure_e2e_screening(lab, run, run_e2e)
            results["knot"] = lab.dns.nameserver
            results["senders"] = len(lab.known)
            results["standings"] = dict(Counter(s.standing for s in lab.known))
            run.screening = results
        finally:
            lab.knot.stop()
