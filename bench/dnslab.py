"""DNS for ``make bench``'s DKIM rows: a Knot server with one sender's DKIM key and a zone that never answers.

* **Knot** (tests/dns_server.py's ``KnotServer``, on 127.0.0.1) publishes ``sel._domainkey.signed.sender.test``:
  the public half of a throw-away 2048-bit RSA key (its private half stays in this process's memory). The
  DKIM-signed pool's messages carry one real signature by it (``dkim.sign``), so the bridge verifies a
  real signature against a real DNS answer.
* **A dead zone**: Knot delegates ``dead.forger.test`` to ``ns.dead.forger.test`` (127.0.0.1), a UDP socket
  this module binds and never reads: nothing under that name is ever answered. The hostile pool's messages
  carry ``MAX_SIGNATURES`` DKIM-Signature headers whose ``d=`` are names under it, new ones for every delivery
  (one spammer's zone: a cache keyed by the exact name never hits, one keyed by the zone does).
* **Dead domains**: names in no zone Knot serves (Knot refuses them) are taken to be delegated, as the root
  would, to the same silent socket. The fresh pool's ``d=`` are a new such domain for every delivery
  (``<number>.test``: no cache of unreachable zones can know them in advance; only a time budget helps).
* **The resolver the hostile mix's bridge asks** (``BRIDGE_DNS_NAMESERVERS``): the bridge resolves as a stub,
  so something must follow Knot's referral as a recursive resolver would. ``DeadZoneResolver`` relays every
  query to Knot, and when Knot answers with the referral into the dead zone (or refuses the name) it sends
  the query on to the silent socket, which never answers, so the bridge gets no answer either. It counts both,
  so the report can say how often the bridge asked a dead server (a bridge that remembers unreachable zones
  asks less).

Signing one delivery's message costs ~10 ms per signature, so each template is signed once, with the
pool's number mark only in headers the signatures do not cover (Subject, Message-ID; the hostile ``d=``
too: those signatures can never be checked, their key never arrives); bench/pool.py numbers the copies.

It must never send traffic anywhere but 127.0.0.1, never keep a private key outside memory, and never stop a
process it did not start (Knot is stopped by its PID).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from bench.pool import MARK, message_template
from bench.procs import BenchError
from tests.dns_server import KnotDNS, KnotServer
from tests.servers import LOOPBACK
from tests.test_mail_auth import Signer

SIGNED_DOMAIN = "signed.sender.test"
DEAD_ZONE = "dead.forger.test"
MAX_SIGNATURES = 5  # the bridge checks at most five (bridge.mail.auth.MAX_DKIM_SIGNATURES)
# Signed header fields: every one the template has but Subject and Message-ID, which carry the mark.
_COVERED = [b"From", b"To", b"Date", b"MIME-Version", b"Content-Type"]


def _goes_dead(reply: bytes) -> bool:
    """Knot's answer sends a resolver on to a dead server: a delegation (no answer, not authoritative, NS
    records in the authority section), or a refusal (a name in no zone Knot serves)."""
    try:
        message = dns.message.from_wire(reply)
    except Exception:  # not parseable: relay it as it is
        return False
    if message.rcode() == dns.rcode.REFUSED:
        return True
    return (
        message.rcode() == dns.rcode.NOERROR
        and not message.answer
        and not message.flags & dns.flags.AA
        and any(rrset.rdtype == dns.rdatatype.NS for rrset in message.authority)
    )


@dataclass
class DeadZoneResolver:
    """A UDP resolver on 127.0.0.1 in front of Knot that follows referrals to the silent socket."""

    knot: KnotDNS
    silent: tuple[str, int]
    relayed: int = 0
    dead: int = 0
    _server: socketserver.ThreadingUDPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nameserver(self) -> str:
        if self._server is None:
            raise BenchError("the dead-zone resolver is not running")
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    def counts(self) -> tuple[int, int]:
        """(queries relayed to Knot and answered, queries sent on to the dead zone's server) so far."""
        with self._lock:
            return self.relayed, self.dead

    def _handle(self, query: bytes, client: socket.socket, address: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(2.0)
            try:
                upstream.sendto(query, (self.knot.host, self.knot.port))
                reply = upstream.recv(65535)
            except OSError:
                return  # Knot did not answer: neither do we (the bridge times out)
            if _goes_dead(reply):
                upstream.sendto(query, self.silent)  # the delegated server: it never answers
                with self._lock:
                    self.dead += 1
                return
        client.sendto(reply, address)
        with self._lock:
            self.relayed += 1

    def start(self) -> DeadZoneResolver:
        resolver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                query, client = self.request
                resolver._handle(query, client, self.client_address)

        self._server = socketserver.ThreadingUDPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="dead-zone-resolver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class DnsLab:
    """Knot with the signing key and the delegation, the silent socket, and the dead-zone resolver."""

    def __init__(self, workdir: Path) -> None:
        self.knot = KnotServer(workdir)
        self.signer = Signer(SIGNED_DOMAIN)
        self.dns: KnotDNS | None = None
        self._silent: socket.socket | None = None
        self.resolver: DeadZoneResolver | None = None

    @property
    def knot_nameserver(self) -> str:
        if self.dns is None:
            raise BenchError("Knot is not running")
        return self.dns.nameserver

    def start(self) -> DnsLab:
        try:
            self.dns = self.knot.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        try:
            self.dns.set_txt(self.signer.record_name, self.signer.record)
            self._silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._silent.bind((LOOPBACK, 0))  # bound, never read: the dead zone's name server
            self.dns.set(DEAD_ZONE, "NS", f"ns.{DEAD_ZONE}.")
            self.dns.set_a(f"ns.{DEAD_ZONE}", LOOPBACK)
            self.resolver = DeadZoneResolver(self.dns, self._silent.getsockname()).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.resolver is not None:
            self.resolver.stop()
            self.resolver = None
        if self._silent is not None:
            self._silent.close()
            self._silent = None
        self.knot.stop()
        self.dns = None

    def signed_template(self) -> bytes:
        """message_template() with one valid DKIM signature by SIGNED_DOMAIN over the unmarked headers."""
        template = message_template()
        header = dkim.sign(
            template,
            self.signer.selector.encode(),
            SIGNED_DOMAIN.encode(),
            self.signer.private_pem,
            include_headers=_COVERED,
        )
        signed = header + template
        numbered = signed.replace(MARK, b"BENCH000000000042")
        if not dkim.verify(numbered, dnsfunc=lambda name, timeout=5: self.signer.record.encode()):
            raise BenchError("the DKIM-signed template does not verify once numbered")
        return signed

    def hostile_template(self, *, fresh: bool = False, signatures: int = MAX_SIGNATURES) -> bytes:
        """message_template() with ``signatures`` DKIM-Signature headers for names in the dead zone (``fresh``:
        in a dead domain of their own), each delivery's own (the mark is in every d=)."""
        template = message_template()
        zone = f"{MARK.decode().lower()}.test" if fresh else DEAD_ZONE
        headers = b"".join(
            dkim.sign(
                template,
                self.signer.selector.encode(),
                f"{MARK.decode().lower()}-{n}.{zone}".encode(),
                self.signer.private_pem,
                include_headers=_COVERED,
            )
            for n in range(signatures)
        )
        return headers + template
