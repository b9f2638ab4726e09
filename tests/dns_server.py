"""A real Knot DNS server on loopback for the test session, with records changed at run time by RFC 2136.

Use the ``knot_dns`` fixture (session-scoped; conftest lists this module in ``pytest_plugins``) and mark the tests
``dns``. It starts ``knotd`` with its config, rundir, zone files and databases in a temporary directory, listening on
``127.0.0.1@<free port>``, serving the zones in ``ZONES`` (each holds only SOA, NS and the NS's address at start).
Tests publish what they need with ``set_txt`` / ``set_a`` / ``delete`` (dynamic updates over TCP, ~4 ms each) and
query through ``knot_dns.resolver()``, the bridge's own resolver pointed at the server. Records persist for the
whole session, so a test sets every record it depends on (updates replace the whole RRset) rather than assuming
a clean zone.

Knot is a Debian package (``apt-get install -y knot knot-dnsutils``); without ``knotd`` the fixture skips, and so
do only the tests that ask for it: every other test's bridge resolves through ``RefusingDNS`` instead (see
``suite_nameserver``). The server is stopped by its PID only; nothing else is touched.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.update
import pytest
from dns.rdtypes.ANY.TXT import TXT

from bridge.dns import make_resolver

ZONES = (
    "example.test",
    "sender.test",
    "forger.test",
    "strict.test",
    "peer.test",
    "mailio.test",
    "postal.test",
)

_KNOTD_PATHS = ("/usr/sbin/knotd", "/usr/local/sbin/knotd")


def _find_knotd() -> str | None:
    return shutil.which("knotd") or next((p for p in _KNOTD_PATHS if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (DNS needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for the DNS server")


def _zone_file(zone: str) -> str:
    return (
        f"$ORIGIN {zone}.\n"
        "$TTL 60\n"
        f"@ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n"
        f"@ NS ns.{zone}.\n"
        "ns A 127.0.0.1\n"
    )


def _config(workdir: Path, port: int) -> str:
    user = "    user: root:root\n" if os.geteuid() == 0 else ""
    zones = "".join(f"  - domain: {zone}\n" for zone in ZONES)
    return (
        "server:\n"
        f'    rundir: "{workdir}/run"\n'
        f"{user}"
        f"    listen: 127.0.0.1@{port}\n"
        "log:\n"
        "  - target: stderr\n"
        "    any: warning\n"
        "database:\n"
        f'    storage: "{workdir}/db"\n'
        "acl:\n"
        "  - id: local_update\n"
        "    address: 127.0.0.1\n"
        "    action: update\n"
        "template:\n"
        "  - id: default\n"
        f'    storage: "{workdir}/zones"\n'
        '    file: "%s.zone"\n'
        "    zonefile-sync: -1\n"
        "    journal-content: all\n"
        "    acl: local_update\n"
        "zone:\n"
        f"{zones}"
    )


@dataclass
class KnotDNS:
    """Handle on the running server: where it listens and how to change its records."""

    host: str
    port: int
    zones: tuple[str, ...]

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form ``BRIDGE_DNS_NAMESERVERS`` and ``make_resolver`` take."""
        return f"{self.host}:{self.port}"

    def resolver(self, *, timeout: float = 2.0) -> dns.resolver.Resolver:
        """The bridge's resolver, pointed at this server."""
        return make_resolver([self.nameserver], timeout=timeout)

    def _zone_for(self, name: str) -> dns.name.Name:
        qname = dns.name.from_text(name)
        zones = [dns.name.from_text(z) for z in self.zones if qname.is_subdomain(dns.name.from_text(z))]
        if not zones:
            raise ValueError(f"{name} is in none of the test zones {self.zones}")
        return max(zones, key=len)

    def _send(self, name: str, change: dns.update.UpdateMessage) -> None:
        response = dns.query.tcp(change, self.host, port=self.port, timeout=5)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"DNS update of {name} refused: {dns.rcode.to_text(response.rcode())}")

    def set_txt(self, name: str, value: str, *, ttl: int = 60) -> None:
        """Make ``value`` the only TXT record at ``name`` (split into 255-byte strings, as DNS requires)."""
        data = value.encode("utf-8")
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        change = dns.update.UpdateMessage(self._zone_for(name))
        change.replace(dns.name.from_text(name), ttl, TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks))
        self._send(name, change)

    def set_a(self, name: str, address: str, *, ttl: int = 60) -> None:
        """Make ``address`` the only A (or AAAA, for an IPv6 address) record at ``name``."""
        rdtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        change = dns.update.UpdateMessage(self._zone_for(name))
        change.replace(dns.name.from_text(name), ttl, rdtype, address)
        self._send(name, change)

    def set(self, name: str, rdtype: str, *values: str, ttl: int = 60) -> None:
        """Make ``values`` (zone-file text, e.g. ``"10 mx.peer.test."`` for MX) the only ``rdtype`` records."""
        change = dns.update.UpdateMessage(self._zone_for(name))
        change.replace(dns.name.from_text(name), ttl, rdtype, *values)
        self._send(name, change)

    def delete(self, name: str, rdtype: str) -> None:
        """Remove every ``rdtype`` record at ``name`` (a no-op when there is none)."""
        change = dns.update.UpdateMessage(self._zone_for(name))
        change.delete(dns.name.from_text(name), rdtype)
        self._send(name, change)


def _wait_until_answering(server: KnotDNS, process: subprocess.Popen[bytes], log_path: Path) -> None:
    query = dns.message.make_query(f"{ZONES[0]}.", "SOA")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"knotd exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            response = dns.query.udp(query, server.host, port=server.port, timeout=0.2)
        except (OSError, dns.exception.Timeout):
            time.sleep(0.02)
            continue
        if response.rcode() == dns.rcode.NOERROR and response.answer:
            return
        time.sleep(0.02)
    raise RuntimeError(f"knotd did not answer within 10 s: {log_path.read_text()[-2000:]}")


class KnotServer:
    """knotd serving ``ZONES`` from a directory of ours on a free loopback port; start() and stop() by PID.

    The pytest fixture below and the benchmarks (bench/screening.py) both run Knot through this class.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def installed() -> bool:
        return _find_knotd() is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> KnotDNS:
        """Start knotd and wait until it answers; RuntimeError (with its log) if it does not."""
        knotd = _find_knotd()
        if knotd is None:
            raise RuntimeError("knotd is not installed (apt-get install knot)")
        for sub in ("run", "db", "zones"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        for zone in ZONES:
            (self.workdir / "zones" / f"{zone}.zone").write_text(_zone_file(zone))
        port = _free_port()
        config = self.workdir / "knot.conf"
        config.write_text(_config(self.workdir, port))
        log_path = self.workdir / "knotd.log"
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [knotd, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        server = KnotDNS(host="127.0.0.1", port=port, zones=ZONES)
        try:
            _wait_until_answering(server, self._proc, log_path)
        except RuntimeError:
            self.stop()
            raise
        return server

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


@pytest.fixture(scope="session")
def knot_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotDNS]:
    """A running Knot server serving ``ZONES`` on 127.0.0.1, for the whole session."""
    if not KnotServer.installed():
        pytest.skip("Knot not installed (make test installs it)")
    knot = KnotServer(tmp_path_factory.mktemp("knot"))
    try:
        server = knot.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        knot.stop()


class RefusingDNS:
    """Without Knot: a loopback UDP server that answers REFUSED to every question, as Knot does for names
    outside its zones, so a bridge's lookups fail at once instead of waiting out the resolver's timeout."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.nameserver = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
                response = dns.message.make_response(dns.message.from_wire(data))
            except (TimeoutError, dns.exception.DNSException):
                continue
            except OSError:
                return
            response.set_rcode(dns.rcode.REFUSED)
            self._sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture(scope="session")
def suite_nameserver(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where every bridge a test builds sends its DNS questions: Knot, or without it a server refusing them all.

    Knot is asked for only when it is installed, so a machine without it skips the tests that need real
    answers (they ask for ``knot_dns`` and carry the ``dns`` marker), not the whole suite.
    """
    if KnotServer.installed():
        yield request.getfixturevalue("knot_dns").nameserver
        return
    server = RefusingDNS()
    try:
        yield server.nameserver
    finally:
        server.close()
