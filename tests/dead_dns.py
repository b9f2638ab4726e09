"""A resolver in front of the suite's Knot that follows delegations into zones whose server never answers.

The bridge resolves as a stub: it asks one recursive resolver. Here that resolver is ``RelayResolver``: it
relays every query to Knot (UDP and TCP) and returns Knot's answer, except when Knot answers with a referral
(a delegation: no answer, not authoritative, NS records in the authority section) or refuses the name (one in
no zone Knot serves: the root would delegate it elsewhere). A real resolver would then
ask the delegated server; here every delegated server is ``silent``, a UDP socket bound on loopback that never
reads, so the query is sent there and the bridge never gets an answer, exactly as with a spammer's zone whose
name servers are dead. ``delegate_dead(knot, zone)`` publishes such a delegation in Knot.

Everything stays on 127.0.0.1; ``stop()`` closes the sockets this module opened.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.dns_server import KnotDNS

LOOPBACK = "127.0.0.1"


def delegate_dead(knot: KnotDNS, zone: str) -> None:
    """Delegate ``zone`` (under one of Knot's zones) to a name server on loopback that will never answer."""
    knot.set(zone, "NS", f"ns.{zone}.")
    knot.set_a(f"ns.{zone}", LOOPBACK)


def _is_referral(reply: dns.message.Message) -> bool:
    return (
        reply.rcode() == dns.rcode.NOERROR
        and not reply.answer
        and not reply.flags & dns.flags.AA
        and any(rrset.rdtype == dns.rdatatype.NS for rrset in reply.authority)
    )


class RelayResolver:
    """A stub-facing resolver on a free loopback port: Knot's answers, silence for dead delegations."""

    def __init__(self, knot: KnotDNS) -> None:
        self.knot = knot
        self.silenced = 0  # queries that went into a dead zone (answered by nobody)
        relay = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                answer = relay._answer(data)
                if answer is not None:
                    sock.sendto(answer, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = self.request
                conn.settimeout(10)
                try:
                    (length,) = struct.unpack("!H", _read(conn, 2))
                    answer = relay._answer(_read(conn, length), tcp=True)
                except (OSError, struct.error, ValueError):
                    return
                if answer is not None:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)

        self._udp, self._tcp = _bind_pair(Udp, Tcp)
        self._silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._silent.bind((LOOPBACK, 0))  # bound and never read: the dead zone's name server
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True) for server in (self._udp, self._tcp)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self._udp.server_address[1]}"

    def _answer(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # garbage: a resolver drops it
            return None
        ask: Any = dns.query.tcp if tcp else dns.query.udp
        try:
            reply = ask(query, self.knot.host, port=self.knot.port, timeout=5)
        except (OSError, dns.exception.DNSException):
            return None
        # A referral into a delegated zone, or a name in no zone Knot serves (the root would delegate
        # it elsewhere): a recursive resolver would ask that zone's servers, which here never answer.
        if _is_referral(reply) or reply.rcode() == dns.rcode.REFUSED:
            self.silenced += 1
            self._silent.sendto(data, self._silent.getsockname())  # asked; it will never answer
            return None
        reply.id = query.id
        return reply.to_wire()

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.shutdown()
            server.server_close()
        self._silent.close()


def _bind_pair(
    udp_handler: type[socketserver.BaseRequestHandler], tcp_handler: type[socketserver.BaseRequestHandler]
) -> tuple[socketserver.ThreadingUDPServer, socketserver.ThreadingTCPServer]:
    """UDP and TCP servers on one free port (DNS clients fall back to TCP on the same port)."""
    for _ in range(50):
        udp = socketserver.ThreadingUDPServer((LOOPBACK, 0), udp_handler)
        try:
            return udp, socketserver.ThreadingTCPServer((LOOPBACK, udp.server_address[1]), tcp_handler)
        except OSError:
            udp.server_close()  # that port is taken for TCP: try another
    raise RuntimeError("no free port for both UDP and TCP on loopback")


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data
