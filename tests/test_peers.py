"""The SSRF guard of the peer client (bridge.mailio.peers): what it refuses, and that refusing means no connection.

Private, link-local, CGNAT, multicast and metadata addresses are tested by classifying them, never by connecting:
tests send traffic to loopback only. Real connections go to listeners on 127.0.0.1/.2/.3 that count what they
accept; names resolve through the suite's Knot server, as the bridge's would.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.mailio.peers import (
    PeerAnswerTooLarge,
    PeerClient,
    PeerRefused,
    PeerUnavailable,
    refusal,
    resolve_with,
)
from bridge.settings import Settings, SettingsError, parse_peer_allowlist
from tests.dns_server import KnotDNS

ALLOWED = parse_peer_allowlist("127.0.0.2/32,127.0.0.3/32")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("168.63.129.16", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("fc00::1", "private"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - classified, never bound
        ("::", "unspecified"),
        ("240.0.0.1", "private"),  # Python counts 240/4 as private and reserved: refused either way
        ("255.255.255.255", "private"),
        ("192.0.2.1", "private"),  # documentation
        ("198.18.0.1", "private"),  # benchmarking
        ("::ffff:10.0.0.1", "IPv6 form of private"),
        ("::ffff:127.0.0.1", "IPv6 form of loopback"),
        ("::ffff:169.254.169.254", "IPv6 form of cloud metadata"),
        ("2002:a00:1::", "IPv6 form of private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "IPv6 form of cloud metadata"),  # NAT64 of 169.254.169.254
        ("::10.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        ("2001:db8::1", "private"),
    ],
)
def test_refused_addresses_are_classified_without_connecting(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


# --- listeners on loopback ------------------------------------------------------------------------------


class Listener:
    """An HTTP server on one loopback address that counts the connections it accepted and the requests seen."""

    def __init__(self, host: str, respond: Callable[[BaseHTTPRequestHandler], None], tls: ssl.SSLContext | None = None):
        outer = self
        self.accepted = 0
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Host header

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path, self.headers.get("Host")))
                respond(self)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(("POST", self.path, self.headers.get("Host")))
                respond(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, object]:
                sock, address = super().get_request()
                outer.accepted += 1
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True)
                return sock, address

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hangs up early (size cap, timeout) is the point of some tests

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(host: str, respond: Callable[[BaseHTTPRequestHandler], None] | None = None, **kw: object) -> Listener:
        listener = Listener(host, respond or _answer(b'{"ok":true}'), **kw)  # type: ignore[arg-type]
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.close()


def _answer(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Callable[..., None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {"Content-Type": "application/json"}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def _client(knot: KnotDNS | None = None, **kw: object) -> PeerClient:
    options: dict[str, object] = {"allowlist": ALLOWED, "allow_insecure": True, "timeout": 2.0}
    if knot is not None:
        options["resolve"] = resolve_with(knot.resolver())
    return PeerClient(**(options | kw))  # type: ignore[arg-type]


# --- refused without a connection ----------------------------------------------------------------------


def test_allowlisted_loopback_address_is_reached(listen: Callable[..., Listener]) -> None:
    peer = listen("127.0.0.2")
    answer = _client().get(f"http://127.0.0.2:{peer.port}/did.json")
    assert (answer.status, answer.body) == (200, b'{"ok":true}')
    assert peer.accepted == 1


def test_loopback_outside_the_allowlist_is_refused_without_a_connection(listen: Callable[..., Listener]) -> None:
    trap = listen("127.0.0.1")
    with pytest.raises(PeerRefused, match="loopback"):
        _client().get(f"http://127.0.0.1:{trap.port}/")
    with pytest.raises(PeerRefused, match="loopback"):
        _client().post(f"http://[::ffff:127.0.0.1]:{trap.port}/", b"{}")
    assert trap.accepted == 0


@pytest.mark.dns
def test_a_name_resolving_to_a_refused_address_is_refused_without_a_connection(
    knot_dns: KnotDNS, listen: Callable[..., Listener]
) -> None:
    trap = listen("127.0.0.1")
    knot_dns.set_a("evil.peer.test", "127.0.0.1")
    knot_dns.set("mixed.peer.test", "A", "127.0.0.2", "127.0.0.1")  # one good address does not launder a bad one
    client = _client(knot_dns)
    for name in ("evil.peer.test", "mixed.peer.test"):
        with pytest.raises(PeerRefused, match=r"loopback address \(127\.0\.0\.1\)"):
            client.get(f"http://{name}:{trap.port}/")
    assert trap.accepted == 0


@pytest.mark.dns
def test_the_vetted_address_is_the_one_connected_to_and_the_name_is_kept(
    knot_dns: KnotDNS, listen: Callable[..., Listener]
) -> None:
    peer = listen("127.0.0.3")
    knot_dns.set_a("good.peer.test", "127.0.0.3")
    answer = _client(knot_dns).get(f"http://good.peer.test:{peer.port}/x/did.json")
    assert answer.status == 200
    assert peer.requests == [("GET", "/x/did.json", f"good.peer.test:{peer.port}")]


def test_http_is_refused_unless_insecure_peers_are_allowed(listen: Callable[..., Listener]) -> None:
    peer = listen("127.0.0.2")
    for url in (f"http://127.0.0.2:{peer.port}/", f"ftp://127.0.0.2:{peer.port}/", "file:///etc/passwd"):
        with pytest.raises(PeerRefused, match="only https"):
            _client(allow_insecure=False).get(url)
    assert peer.accepted == 0


def test_redirects_are_refused_not_followed(listen: Callable[..., Listener]) -> None:
    trap = listen("127.0.0.1")
    target = f"http://127.0.0.2:{trap.port}/"  # even to an allowed address: a redirect is never followed
    peer = listen("127.0.0.2", _answer(b"", 302, {"Location": target}))
    with pytest.raises(PeerRefused, match="redirect"):
        _client().post(f"http://127.0.0.2:{peer.port}/api/v1/mtp/did", b"{}")
    assert peer.requests == [("POST", "/api/v1/mtp/did", f"127.0.0.2:{peer.port}")]
    assert trap.accepted == 0


def test_peer_urls_override_where_a_host_is_reached_and_stay_guarded(listen: Callable[..., Listener]) -> None:
    peer, trap = listen("127.0.0.2"), listen("127.0.0.1")
    client = _client(
        peer_urls={"peer.test": f"http://127.0.0.2:{peer.port}", "evil.test": f"http://127.0.0.1:{trap.port}"}
    )
    assert client.url("peer.test", "/api/v1/mtp/did") == f"http://127.0.0.2:{peer.port}/api/v1/mtp/did"
    assert client.url("other.test", "/.well-known/did.json") == "https://other.test/.well-known/did.json"
    assert client.get(client.url("Peer.Test", "did.json")).status == 200
    with pytest.raises(PeerRefused):
        client.get(client.url("evil.test", "/"))
    assert (peer.accepted, trap.accepted) == (1, 0)


# --- size and time -----------------------------------------------------------------------------------------


def test_an_answer_over_the_cap_is_cut(listen: Callable[..., Listener]) -> None:
    declared = listen("127.0.0.2", _answer(b"x" * 5000))

    def undeclared(handler: BaseHTTPRequestHandler) -> None:  # no Content-Length: read until the cap
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        for _ in range(200):
            handler.wfile.write(b"y" * 1000)

    streamed = listen("127.0.0.3", undeclared)
    client = _client(max_bytes=4096)
    with pytest.raises(PeerAnswerTooLarge, match="5000 bytes"):
        client.get(f"http://127.0.0.2:{declared.port}/")
    with pytest.raises(PeerAnswerTooLarge, match="larger than 4096"):
        client.get(f"http://127.0.0.3:{streamed.port}/")
    assert client.get(f"http://127.0.0.2:{declared.port}/", max_bytes=5000).body == b"x" * 5000


def test_a_compressed_answer_is_refused(listen: Callable[..., Listener]) -> None:
    peer = listen("127.0.0.2", _answer(b"\x1f\x8b", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(PeerRefused, match="compressed"):
        _client().get(f"http://127.0.0.2:{peer.port}/")


def test_a_silent_peer_times_out(listen: Callable[..., Listener]) -> None:
    release = threading.Event()
    peer = listen("127.0.0.2", lambda handler: release.wait(10))
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnavailable, match="no answer in time"):
            _client(timeout=0.5).get(f"http://127.0.0.2:{peer.port}/")
    finally:
        release.set()
    assert time.monotonic() - started < 2


def test_a_dripping_peer_is_cut_off_at_the_time_limit(listen: Callable[..., Listener]) -> None:
    """Each byte arrives well within the read timeout, but the call as a whole may not outlast it."""
    stop = threading.Event()

    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        while not stop.is_set():
            handler.wfile.write(b"z")
            handler.wfile.flush()
            time.sleep(0.05)

    peer = listen("127.0.0.2", drip)
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnavailable, match=r"no answer in time|longer than 0\.8 s"):
            _client(timeout=0.8).get(f"http://127.0.0.2:{peer.port}/")
    finally:
        stop.set()
    assert time.monotonic() - started < 2


def test_a_closed_port_is_unavailable_not_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]  # bound, never listening: connection refused
    with pytest.raises(PeerUnavailable, match="cannot connect"):
        _client().get(f"http://127.0.0.2:{port}/")


# --- TLS verifies the host name while connecting to the vetted address -------------------------------------


def _certificate(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


@pytest.mark.dns
def test_https_verifies_the_certificate_for_the_name(
    knot_dns: KnotDNS, listen: Callable[..., Listener], tmp_path: Path
) -> None:
    tls, ca = _certificate(tmp_path, "tls.peer.test")
    peer = listen("127.0.0.2", tls=tls)
    knot_dns.set_a("tls.peer.test", "127.0.0.2")
    knot_dns.set_a("other.peer.test", "127.0.0.2")
    client = _client(knot_dns, allow_insecure=False, ca_file=str(ca))
    answer = client.get(f"https://tls.peer.test:{peer.port}/.well-known/did.json")
    assert (answer.status, peer.requests[-1][2]) == (200, f"tls.peer.test:{peer.port}")
    with pytest.raises(PeerUnavailable, match="TLS failed"):
        client.get(f"https://other.peer.test:{peer.port}/")  # the same address, a name the certificate lacks
    with pytest.raises(PeerUnavailable, match="TLS failed"):
        _client(knot_dns, allow_insecure=False).get(f"https://tls.peer.test:{peer.port}/")  # not a trusted CA


# --- settings ----------------------------------------------------------------------------------------------


def test_peer_settings_are_checked_at_start(environment: dict[str, str]) -> None:
    settings = Settings.from_env(environment | {"BRIDGE_PEER_ALLOWLIST": "127.0.0.2, 127.0.0.3/32"})
    client = PeerClient.from_settings(settings)
    assert [str(n) for n in client.guard.allowlist] == ["127.0.0.2/32", "127.0.0.3/32"]
    assert client.allow_insecure is False
    for name, value in [
        ("BRIDGE_PEER_ALLOWLIST", "127.0.0.2,not-an-ip"),
        ("BRIDGE_PEER_URLS", "peer.test"),
        ("BRIDGE_PEER_URLS", "peer.test=ftp://x"),
        ("BRIDGE_PEER_URLS", "peer.test=https://user:pw@x"),
        ("BRIDGE_ALLOW_INSECURE_PEERS", "maybe"),
        ("BRIDGE_PEER_TIMEOUT", "0"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(environment | {name: value})


def test_insecure_peers_are_announced_loudly(environment: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(environment | {"BRIDGE_ALLOW_INSECURE_PEERS": "1"})
    with caplog.at_level("WARNING"):
        assert PeerClient.from_settings(settings).allow_insecure is True
    assert "BRIDGE_ALLOW_INSECURE_PEERS" in caplog.text
