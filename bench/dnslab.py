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
  so something must follow Knot's referral as a recursive resolver would: the test suite's ``RelayResolver``
  (tests/dead_dns.py) relays every query to Knot, and when Knot answers with the referral into the dead zone
  (or refuses the name) it sends the query on to a silent socket, which never answers, so the bridge gets no
  answer either. It counts those, so the report can say how often the bridge asked a dead server (a bridge
  that remembers unreachable zones asks less).

Signing one delivery's message costs ~10 ms per signature, so each template is signed once, with the
pool's number mark only in headers the signatures do not cover (Subject, Message-ID; the hostile ``d=``
too: those signatures can never be checked, their key never arrives); bench/pool.py numbers the copies.

It must never send traffic anywhere but 127.0.0.1, never keep a private key outside memory, and never stop a
process it did not start (Knot is stopped by its PID).
"""

from __future__ import annotations

from pathlib import Path

import dkim

from bench.pool import MARK, message_template
from bench.procs import BenchError
from tests.dead_dns import RelayResolver, delegate_dead
from tests.dns_server import KnotDNS, KnotServer
from tests.test_mail_auth import Signer

SIGNED_DOMAIN = "signed.sender.test"
DEAD_ZONE = "dead.forger.test"
MAX_SIGNATURES = 5  # the bridge checks at most five (bridge.mail.auth.MAX_DKIM_SIGNATURES)
# Signed header fields: every one the template has but Subject and Message-ID, which carry the mark.
_COVERED = [b"From", b"To", b"Date", b"MIME-Version", b"Content-Type"]


class DnsLab:
    """Knot with the signing key and the delegation, the silent socket, and the dead-zone resolver."""

    def __init__(self, workdir: Path) -> None:
        self.knot = KnotServer(workdir)
        self.signer = Signer(SIGNED_DOMAIN)
        self.dns: KnotDNS | None = None
        self.resolver: RelayResolver | None = None

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
            delegate_dead(self.dns, DEAD_ZONE)
            self.resolver = RelayResolver(self.dns)  # the test suite's: follows referrals into silence
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.resolver is not None:
            self.resolver.stop()
            self.resolver = None
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
