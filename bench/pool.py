"""Pre-generated, signed Postal deliveries for the load generators (wrk and bench/drive.py).

Each delivery is what Postal 3.3.6 puts on the wire for a ~20 KB message (RawMessage, BodyAsJSON,
Ruby's base64 with a newline every 60 characters, the KID and X-Postal-Signature-256), built with
tests/postal_sim.py and signed with a throw-away key. Every delivery has its own Postal id and
Message-ID, so the bridge stores each one (no duplicate shortcut) as long as a run does not wrap.

On disk: ``bodies.bin`` (the bodies back to back) and ``index.txt`` (one line per body:
``offset length kid sig_sha256``), which post.lua and drive.py read. Signing costs ~2 ms per body,
so the pool is built by two processes (fork: the key never leaves memory). The legacy SHA-1
``X-Postal-Signature`` is left out: the bridge ignores it when the SHA-256 one is there.

This module must never write outside the directory it is given.
"""

from __future__ import annotations

import base64
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tests.postal_sim import PostalSigner, new_message, raw_payload, ruby_json

MESSAGE_BYTES = 20 * 1024
MARK = b"BENCHID0000000000"  # fixed width, replaced by each delivery's own number
_WORDS = (
    "order shipment invoice meeting tomorrow report quarterly thanks regards please attached "
    "update project budget review customer support ticket delivery schedule the a of and to in "
    "is for on with as we you your our this that will be are from at by have"
).split()

_signer: PostalSigner | None = None  # set before the worker processes fork


@dataclass(frozen=True)
class Pool:
    directory: Path
    count: int
    rcpt_to: str
    template: bytes = b""  # the message each delivery numbers (b"": message_template())
    numbers_from: int = 0  # delivery i is number numbers_from + i (Postal id, Message-ID, mark)

    @property
    def index(self) -> Path:
        return self.directory / "index.txt"

    @property
    def bodies(self) -> Path:
        return self.directory / "bodies.bin"

    def read(self, first: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
        """Bodies and headers of deliveries ``first`` .. ``first + count - 1``."""
        return read_pool(self.index, self.bodies, first, count)


def read_pool(index: Path | str, bodies: Path | str, first: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
    rows = index_rows(index, first, count)
    with open(bodies, "rb") as data:
        return [read_delivery(data, row) for row in rows]


def index_rows(index: Path | str, first: int, count: int) -> list[list[str]]:
    """Index lines ``first`` .. ``first + count - 1``, split: (offset, length, kid, sig_sha256)."""
    with open(index) as lines:
        rows = [line.split() for line in lines][first : first + count]
    if len(rows) < count:
        raise IndexError(f"the pool holds {len(rows)} deliveries from {first}, not {count}")
    return rows


def read_delivery(data: BinaryIO, row: list[str]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the delivery an index row names, read from the open bodies file."""
    offset, length, kid, sig256 = row
    data.seek(int(offset))
    return data.read(int(length)), signed_headers(kid, sig256)


def signed_headers(kid: str, sig256: str) -> dict[str, str]:
    """The headers Postal sends, but for X-Postal-Signature (SHA-1): the bridge never reads it when
    X-Postal-Signature-256 is present, and signing it too would double the pool's build time."""
    return {
        "Content-Type": "application/json",
        "X-Postal-Signature-Kid": kid,
        "X-Postal-Signature-256": sig256,
    }


def message_template(size: int = MESSAGE_BYTES, seed: int = 20) -> bytes:
    """A text + HTML message of about ``size`` bytes of random-ish prose, with a marker to number it."""
    rng = random.Random(seed)

    def prose(chars: int) -> str:
        out, n = [], 0
        while n < chars:
            line = " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + "."
            out.append(line)
            n += len(line) + 1
        return "\n".join(out) + "\n"

    text = prose(size // 2 - 600)
    html = "<html><body><p>" + prose(size // 2 - 900).replace("\n", "</p>\n<p>") + "</p></body></html>\n"
    mark = MARK.decode()
    return new_message(
        subject=f"Order {mark} shipped",
        to="Acme Support <support@example.com>",
        text=text,
        html=html,
        message_id=f"<{mark}@mail.example.org>",
    )


def encode_delivery(message: bytes, postal_id: int, rcpt_to: str, *, exact: bool = False) -> bytes:
    """The RawMessage body Postal's ``to_json`` writes for ``message``.

    ``ruby_json`` escapes character by character (~1 ms for 28 KB, seconds for 35 MB); the base64
    message holds no character it escapes but the newline, so the fast path serializes the payload
    with a placeholder and splices the message in. ``exact=True`` runs ``ruby_json`` on the whole
    payload (build_pool checks that both agree).
    """
    payload = raw_payload(postal_id=postal_id, rcpt_to=rcpt_to, mail_from="jane@example.org", message=message)
    if exact:
        return ruby_json(payload)
    encoded = payload["message"]
    payload["message"] = _PLACEHOLDER
    head, _, tail = ruby_json(payload).partition(_PLACEHOLDER.encode())
    return head + encoded.replace("\n", "\\n").encode("ascii") + tail


def delivery_body(number: int, template: bytes, rcpt_to: str, *, exact: bool = False) -> bytes:
    """Delivery ``number`` of the pool: its own Postal id, Message-ID and subject."""
    mark = f"BENCH{number:012d}".encode()
    message = template.replace(MARK, mark).replace(MARK.lower(), mark.lower())
    return encode_delivery(message, 1_000_000 + number, rcpt_to, exact=exact)


_PLACEHOLDER = "@@MESSAGE@@"


def _build(job: tuple[int, bytes, str]) -> tuple[bytes, str]:
    number, template, rcpt_to = job
    assert _signer is not None
    body = delivery_body(number, template, rcpt_to)
    headers = _signer.sign_headers(body, sha1=False)
    return body, f"{headers['X-Postal-Signature-KID']} {headers['X-Postal-Signature-256']}"


def build_pool(
    directory: Path,
    signer: PostalSigner,
    count: int,
    rcpt_to: str,
    *,
    template: bytes = b"",
    numbers_from: int = 0,
    processes: int = 2,
) -> Pool:
    """Write ``count`` signed deliveries to ``directory`` (two processes; ~1.5 ms per body here).

    ``template`` is the message to number (its ``MARK`` replaced per delivery); by default
    ``message_template()``. A DKIM-signed template keeps its signatures valid as long as the mark
    appears only in headers the signatures do not cover (bench/dnslab.py). Two pools of one template
    posted to one bridge need apart ``numbers_from`` (else their deliveries are the same ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    template = template or message_template()
    if MARK not in template and MARK.lower() not in template:
        raise ValueError("bench pool: the template has no mark to number deliveries by")
    if delivery_body(0, template, rcpt_to) != delivery_body(0, template, rcpt_to, exact=True):
        raise RuntimeError("bench pool: the fast JSON path differs from ruby_json")
    pool = Pool(directory, 0, rcpt_to, template, numbers_from)
    return extend_pool(pool, signer, count, processes=processes)


def extend_pool(pool: Pool, signer: PostalSigner, count: int, *, processes: int = 2) -> Pool:
    """Append deliveries until the pool holds ``count`` (numbers continue, so all stay unique)."""
    if count <= pool.count:
        return pool
    global _signer
    _signer = signer
    template = pool.template or message_template()
    first = pool.numbers_from
    jobs = ((first + n, template, pool.rcpt_to) for n in range(pool.count, count))
    offset = pool.bodies.stat().st_size if pool.bodies.exists() else 0
    context = multiprocessing.get_context("fork")
    try:
        with (
            context.Pool(processes) as workers,
            pool.bodies.open("ab") as data,
            pool.index.open("a") as index,
        ):
            for body, line in workers.imap(_build, jobs, chunksize=64):
                data.write(body)
                index.write(f"{offset} {len(body)} {line}\n")
                offset += len(body)
    finally:
        _signer = None
    return Pool(pool.directory, count, pool.rcpt_to, pool.template, pool.numbers_from)


def big_message(total: int, seed: int = 25) -> bytes:
    """A MIME message of about ``total`` bytes: a short text part and one base64 attachment of random
    bytes (what a PDF or a zip looks like to the bridge), in 76-character CRLF lines."""
    boundary = "=_bench_boundary_7f3c2a"
    head = (
        "Date: Tue, 28 Apr 2026 18:19:30 +0200\r\n"
        "From: Jane Doe <jane@example.org>\r\n"
        "To: Acme Support <support@example.com>\r\n"
        "Subject: The scans you asked for\r\n"
        "Message-ID: <bench-big-25mb@mail.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Hi, the scans are attached.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        'Content-Type: application/pdf; name="scans.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="scans.pdf"\r\n'
        "\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    raw = (total - len(head) - len(tail)) // 78 * 57  # 57 bytes -> 76 characters + CRLF
    encoded = base64.encodebytes(random.Random(seed).randbytes(raw)).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    return head + encoded + tail
