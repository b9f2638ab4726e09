"""DKIM / SPF / DMARC verdicts against a real Knot server: a forged From must never come out authenticated.

Keys are generated per run and published by RFC 2136 updates; mail is signed with dkimpy exactly as a sending
server would, then wrapped the way Postal posts it (its spam lines and Received line with the client IP on top).
"""

from __future__ import annotations

import base64
import socket

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.dns import DNSUnavailable, make_resolver, records, txt_records
from bridge.mail.auth import AuthVerdict, authenticate, organizational_domain
from bridge.mail.headers import sender_facts
from tests.dns_server import KnotDNS

pytestmark = pytest.mark.dns

SENDER_IP = "192.0.2.44"  # sender.test's outbound server
FORGER_IP = "203.0.113.66"  # forger.test's outbound server
STRANGER_IP = "198.51.100.7"  # in nobody's SPF record


class Signer:
    """A domain's DKIM key: the private half stays in memory, the public half goes into DNS."""

    def __init__(self, domain: str, selector: str = "sel") -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.domain, self.selector = domain, selector
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # ~400 characters: longer than one TXT string, so the resolver must join the pieces.
        self.record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der).decode()

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def sign(self, message: bytes) -> bytes:
        header = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"],
        )
        return header + message


def compose(from_header: str, body: str = "See you at 10.\r\n") -> bytes:
    return (
        f"From: {from_header}\r\n"
        "To: bob@example.test\r\n"
        "Subject: Meeting\r\n"
        "Date: Tue, 28 Apr 2026 18:19:30 +0200\r\n"
        "Message-ID: <m-1@mail.test>\r\n"
        "\r\n" + body
    ).encode()


def as_posted_by_postal(message: bytes, client_ip: str, helo: str = "mx.client.test") -> bytes:
    return (
        b"X-Postal-Spam: no\r\nX-Postal-Spam-Threshold: 5.0\r\nX-Postal-Spam-Score: 0.1\r\nX-Postal-Threat: no\r\n"
        + f"Received: from {helo} ({helo} [{client_ip}]) by mx.postal.example.test with SMTP; "
        "Tue, 28 Apr 2026 16:19:33 -0000\r\n".encode()
        + message
    )


def verdict(knot: KnotDNS, message: bytes, mail_from: str, **resolver_options: float) -> AuthVerdict:
    return authenticate(
        message, facts=sender_facts(message), mail_from=mail_from, resolver=knot.resolver(**resolver_options)
    )


@pytest.fixture(scope="module")
def sender_test() -> Signer:
    return Signer("sender.test")


@pytest.fixture(scope="module")
def forger_test() -> Signer:
    return Signer("forger.test")


@pytest.fixture(scope="module")
def strict_test() -> Signer:
    return Signer("strict.test")


@pytest.fixture
def knot(knot_dns: KnotDNS, sender_test: Signer, forger_test: Signer, strict_test: Signer) -> KnotDNS:
    """The published state every test starts from (updates replace RRsets, so this also undoes test changes)."""
    for signer in (sender_test, forger_test, strict_test):
        knot_dns.set_txt(signer.record_name, signer.record)
    knot_dns.set_txt("sender.test", f"v=spf1 ip4:{SENDER_IP} -all")
    knot_dns.set_txt("bounces.sender.test", f"v=spf1 ip4:{SENDER_IP} -all")
    knot_dns.set_txt("mx.sender.test", f"v=spf1 ip4:{SENDER_IP} -all")
    knot_dns.set_txt("_dmarc.sender.test", "v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@sender.test")
    knot_dns.set_txt("forger.test", f"v=spf1 ip4:{FORGER_IP} -all")
    knot_dns.set_txt("_dmarc.forger.test", "v=DMARC1; p=none")
    knot_dns.set_txt("strict.test", f"v=spf1 ip4:{SENDER_IP} -all")
    knot_dns.set_txt("bounces.strict.test", f"v=spf1 ip4:{SENDER_IP} -all")
    knot_dns.set_txt("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s")
    knot_dns.set_txt("example.test", "v=spf1 -all")
    knot_dns.delete("_dmarc.example.test", "TXT")
    return knot_dns


def test_dkim_pass_aligned(knot: KnotDNS, sender_test: Signer) -> None:
    message = as_posted_by_postal(sender_test.sign(compose("Alice <alice@sender.test>")), STRANGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert (result.dkim, result.dkim_domains) == ("pass", ("sender.test",))
    assert result.spf == "fail"  # sent through a relay SPF does not list: DKIM alone carries it
    assert (result.dmarc, result.dmarc_policy, result.aligned) == ("pass", "reject", True)
    assert result.authenticated()


def test_spf_pass_aligned(knot: KnotDNS) -> None:
    message = as_posted_by_postal(compose("alice@sender.test"), SENDER_IP)
    result = verdict(knot, message, "bounces+x@bounces.sender.test")
    assert (result.dkim, result.spf, result.spf_domain) == ("none", "pass", "bounces.sender.test")
    assert result.aligned and result.dmarc == "pass"
    assert result.authenticated()
    assert result.as_dict() == {
        "from_domain": "sender.test",
        "dkim": "none",
        "dkim_domains": [],
        "spf": "pass",
        "spf_domain": "bounces.sender.test",
        "dmarc": "pass",
        "dmarc_policy": "reject",
        "aligned": True,
        "authenticated": True,
    }


def test_both_fail(knot: KnotDNS) -> None:
    message = as_posted_by_postal(compose("alice@sender.test"), STRANGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert (result.dkim, result.spf, result.dmarc) == ("none", "fail", "fail")
    assert not result.aligned
    assert not result.authenticated()


def test_forged_from_is_not_authenticated(knot: KnotDNS, forger_test: Signer) -> None:
    # Everything the forger controls checks out, for the forger's own domain only.
    message = as_posted_by_postal(forger_test.sign(compose("Alice <alice@sender.test>")), FORGER_IP)
    result = verdict(knot, message, "eve@forger.test")
    assert (result.dkim, result.dkim_domains) == ("pass", ("forger.test",))
    assert (result.spf, result.spf_domain) == ("pass", "forger.test")
    assert result.from_domain == "sender.test"
    assert (result.aligned, result.dmarc, result.dmarc_policy) == (False, "fail", "reject")
    assert not result.authenticated()


def test_spf_through_mx_a_and_include_terms(knot: KnotDNS) -> None:
    # Every lookup pyspf makes (TXT, MX, A, AAAA) must reach our server through our resolver.
    knot.set("peer.test", "MX", "10 mx1.peer.test.")
    knot.set_a("mx1.peer.test", "192.0.2.81")
    knot.set_a("out6.peer.test", "2001:db8::25")
    knot.set_txt("_spf.peer.test", "v=spf1 ip4:192.0.2.99 -all")
    knot.set_txt("peer.test", "v=spf1 mx a:out6.peer.test include:_spf.peer.test -all")
    for client_ip, expected in (
        ("192.0.2.81", "pass"),
        ("2001:db8::25", "pass"),
        ("192.0.2.99", "pass"),
        (STRANGER_IP, "fail"),
    ):
        message = as_posted_by_postal(compose("carol@peer.test"), client_ip)
        result = verdict(knot, message, "carol@peer.test")
        assert (result.spf, result.authenticated()) == (expected, expected == "pass")


def test_forged_from_with_forged_envelope_fails_spf(knot: KnotDNS) -> None:
    message = as_posted_by_postal(compose("alice@sender.test"), FORGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert result.spf == "fail"
    assert not result.authenticated()


def test_signed_by_another_domain_is_not_aligned(knot: KnotDNS, sender_test: Signer) -> None:
    # e.g. a mailing service signing with its own domain: genuine signature, but it does not vouch for From.
    message = as_posted_by_postal(sender_test.sign(compose("bob@example.test")), STRANGER_IP)
    result = verdict(knot, message, "bob@example.test")
    assert (result.dkim, result.dkim_domains) == ("pass", ("sender.test",))
    assert (result.aligned, result.dmarc, result.dmarc_policy) == (False, "none", None)
    assert not result.authenticated()


def test_body_tampered_after_signing(knot: KnotDNS, sender_test: Signer) -> None:
    signed = sender_test.sign(compose("alice@sender.test", body="Pay invoice 1.\r\n"))
    message = as_posted_by_postal(signed.replace(b"invoice 1.", b"invoice 9."), STRANGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert (result.dkim, result.dkim_domains) == ("fail", ())
    assert not result.authenticated()


def test_header_tampered_after_signing(knot: KnotDNS, sender_test: Signer) -> None:
    signed = sender_test.sign(compose("alice@sender.test"))
    message = as_posted_by_postal(signed.replace(b"Subject: Meeting", b"Subject: Urgent"), STRANGER_IP)
    assert verdict(knot, message, "alice@sender.test").dkim == "fail"


def test_unpublished_key_is_a_permerror(knot: KnotDNS, sender_test: Signer) -> None:
    knot.delete(sender_test.record_name, "TXT")
    message = as_posted_by_postal(sender_test.sign(compose("alice@sender.test")), STRANGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert result.dkim == "permerror"
    assert not result.authenticated()


def test_one_good_signature_among_bad_ones_passes(knot: KnotDNS, sender_test: Signer) -> None:
    bogus = Signer("sender.test", selector="gone")  # its key is never published
    message = as_posted_by_postal(bogus.sign(sender_test.sign(compose("alice@sender.test"))), STRANGER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert (result.dkim, result.dkim_domains) == ("pass", ("sender.test",))
    assert result.authenticated()


def test_dns_server_unreachable_gives_temperror(sender_test: Signer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"  # bound but never answering
        message = as_posted_by_postal(sender_test.sign(compose("alice@sender.test")), SENDER_IP)
        result = authenticate(
            message,
            facts=sender_facts(message),
            mail_from="alice@sender.test",
            resolver=make_resolver([dead], timeout=0.3),
        )
    assert (result.dkim, result.spf, result.dmarc) == ("temperror", "temperror", "temperror")
    assert not result.authenticated()


def test_refused_answer_is_temporary(knot: KnotDNS) -> None:
    # Knot refuses names outside its zones: that says nothing about the domain, so it is not a "fail".
    message = as_posted_by_postal(compose("alice@sender.test"), SENDER_IP)
    result = verdict(knot, message, "alice@elsewhere.invalid")
    assert result.spf == "temperror"
    assert not result.authenticated()


def test_strict_alignment(knot: KnotDNS, strict_test: Signer) -> None:
    exact = as_posted_by_postal(strict_test.sign(compose("alice@strict.test")), STRANGER_IP)
    assert verdict(knot, exact, "alice@strict.test").authenticated()

    subdomain = as_posted_by_postal(strict_test.sign(compose("alice@news.strict.test")), STRANGER_IP)
    result = verdict(knot, subdomain, "alice@news.strict.test")
    assert result.dkim == "pass"
    assert (result.aligned, result.dmarc, result.dmarc_policy) == (False, "fail", "reject")
    assert not result.authenticated()

    spf_subdomain = as_posted_by_postal(compose("alice@strict.test"), SENDER_IP)
    result = verdict(knot, spf_subdomain, "bounce@bounces.strict.test")
    assert (result.spf, result.aligned) == ("pass", False)
    assert not result.authenticated()


def test_relaxed_alignment_across_subdomains(knot: KnotDNS, sender_test: Signer) -> None:
    # From a subdomain with no DMARC record of its own: the organizational domain's sp= applies.
    message = as_posted_by_postal(sender_test.sign(compose("alice@news.sender.test")), STRANGER_IP)
    result = verdict(knot, message, "alice@news.sender.test")
    assert (result.from_domain, result.aligned, result.dmarc, result.dmarc_policy) == (
        "news.sender.test",
        True,
        "pass",
        "quarantine",
    )
    assert result.authenticated()


def test_null_sender_uses_the_helo_domain(knot: KnotDNS) -> None:
    bounce = as_posted_by_postal(compose("MAILER-DAEMON@sender.test"), SENDER_IP, helo="mx.sender.test")
    result = verdict(knot, bounce, "")
    assert (result.spf, result.spf_domain) == ("pass", "mx.sender.test")
    assert result.authenticated()


def test_several_from_addresses_are_never_authenticated(knot: KnotDNS, sender_test: Signer) -> None:
    message = as_posted_by_postal(sender_test.sign(compose("alice@sender.test, eve@forger.test")), SENDER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert (result.dkim, result.spf) == ("pass", "pass")
    assert result.from_domain is None
    assert not result.authenticated()


def test_no_from_is_never_authenticated(knot: KnotDNS) -> None:
    message = as_posted_by_postal(b"To: bob@example.test\r\nSubject: x\r\n\r\nhi\r\n", SENDER_IP)
    result = verdict(knot, message, "alice@sender.test")
    assert result.spf == "pass"
    assert not result.authenticated()


def test_no_client_ip_means_no_spf_verdict(knot: KnotDNS, sender_test: Signer) -> None:
    message = sender_test.sign(compose("alice@sender.test"))  # not wrapped by Postal: no Received line
    result = verdict(knot, message, "alice@sender.test")
    assert (result.spf, result.dkim) == ("none", "pass")
    assert result.authenticated()


def test_garbage_never_raises(knot: KnotDNS) -> None:
    for message in (b"", b"\x00\xff" * 50, b"DKIM-Signature: v=1; d=; b=!!!\r\nFrom: a@sender.test\r\n\r\nx"):
        result = verdict(knot, message, "a@sender.test")
        assert not result.authenticated()


def test_dmarc_record_rules(knot: KnotDNS) -> None:
    message = as_posted_by_postal(compose("alice@example.test"), STRANGER_IP)
    knot.set_txt("_dmarc.example.test", "v=DMARC1; p=bogus")  # invalid p= and no rua: ignored
    assert verdict(knot, message, "alice@example.test").dmarc == "none"
    knot.set_txt("_dmarc.example.test", "v=DMARC1; p=bogus; rua=mailto:r@example.test")  # ... with rua: p=none
    assert verdict(knot, message, "alice@example.test").dmarc_policy == "none"
    knot.set_txt("_dmarc.example.test", "v=spf1 -all")  # not a DMARC record
    assert verdict(knot, message, "alice@example.test").dmarc == "none"


# --- bridge.dns --------------------------------------------------------------------------------------------


def test_txt_records_are_joined_and_missing_ones_empty(knot: KnotDNS, sender_test: Signer) -> None:
    resolver = knot.resolver()
    assert txt_records(resolver, sender_test.record_name) == [sender_test.record]
    assert txt_records(resolver, "nothing-here.sender.test") == []  # NXDOMAIN
    assert txt_records(resolver, "ns.sender.test") == []  # the name exists, without TXT
    assert txt_records(resolver, "bad..name.sender.test") == []  # cannot exist
    knot.set_a("host.sender.test", "2001:db8::1")
    assert [r.address for r in records(resolver, "host.sender.test", "AAAA")] == ["2001:db8::1"]
    with pytest.raises(DNSUnavailable):
        txt_records(resolver, "outside.invalid")  # REFUSED


@pytest.mark.parametrize(
    ("entry", "address", "port"),
    [
        ("192.0.2.1", "192.0.2.1", 53),
        ("127.0.0.1:5353", "127.0.0.1", 5353),
        ("[::1]:5300", "::1", 5300),
        ("::1", "::1", 53),
    ],
)
def test_make_resolver_reads_nameserver_entries(entry: str, address: str, port: int) -> None:
    (nameserver,) = make_resolver([entry]).nameservers
    assert (nameserver.address, nameserver.port) == (address, port)  # type: ignore[union-attr]


@pytest.mark.parametrize("entry", ["dns.example", "127.0.0.1:0", "127.0.0.1:x", "[::1"])
def test_make_resolver_refuses_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError):
        make_resolver([entry])


def test_organizational_domain() -> None:
    assert organizational_domain("a.b.sender.test") == "sender.test"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("alice.github.io") == "alice.github.io"  # a private suffix
