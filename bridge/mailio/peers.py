"""The one door for every HTTP call the bridge makes because of DNS, a DID document or a peer's answer.

Whatever a peer, a DNS record or a DID document names is attacker-chosen: a Mailio host can point its
name at ``127.0.0.1``, at a cloud metadata service or at a database on the operator's private network,
and a peer can answer with a redirect there or with an endless body. So every such call goes through
:class:`PeerClient`, which enforces, on each call:

* **https only** (``BRIDGE_ALLOW_INSECURE_PEERS`` permits ``http``: for tests, said loudly at start);
* **the address actually connected to is vetted**: the client resolves the host itself, refuses the
  whole host if *any* of its addresses is loopback, private, link-local, CGNAT, multicast, reserved,
  unspecified, a cloud metadata address, or an IPv6 form embedding one of those (IPv4-mapped, 6to4,
  NAT64) - unless ``BRIDGE_PEER_ALLOWLIST`` covers it - and then connects to that vetted address.
  There is no second resolution for DNS rebinding to slip into; TLS still verifies the certificate
  against the *host name* and sends it as SNI and ``Host``;
* **no redirects** (a 3xx is refused, never followed), no proxies from the environment, no retries;
* a **time limit** for the whole call (``BRIDGE_PEER_TIMEOUT``: connect, send and the whole answer;
  each socket wait is bounded by what is left of it) and a **size cap** on the answer (checked against
  ``Content-Length`` before reading, then while reading; compressed answers are not asked for and
  refused, so the cap counts the bytes a peer really sends).

``BRIDGE_PEER_URLS`` (``host=base-url,...``) overrides where a host is reached (tests, split DNS); the
overriding URL goes through the same guard. Errors: :class:`PeerRefused` (the guard said no: do not
retry the same URL), :class:`PeerUnavailable` (could not reach it now: retry later),
:class:`PeerAnswerTooLarge`. Their messages name the host and the reason, never a body.

Protocol code: no Flask, no logging of bodies or keys.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import dns.resolver
import urllib3
import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from bridge import metrics
from bridge.dns import DNSUnavailable, dns_budget, records
from bridge.settings import Settings, parse_peer_allowlist, parse_peer_urls

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str], list[str]]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 1024 * 1024
_CHUNK = 64 * 1024

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Cloud instance-metadata and platform addresses that are not link-local (those are refused anyway).
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ...
        "169.254.170.2",  # AWS ECS task metadata
        "168.63.129.16",  # Azure wire server: a public address
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)


class PeerError(Exception):
    """A call to a peer did not give a usable answer; ``str(exc)`` names the host and why, nothing more."""


class PeerRefused(PeerError):
    """The guard refused the call (scheme, address, redirect): trying the same URL again will not help."""


class PeerUnavailable(PeerError):
    """The peer could not be reached or did not answer in time: try again later."""


class PeerAnswerTooLarge(PeerError):
    """The answer is larger than the call's cap; it was cut off unread."""


def refusal(address: IPAddress) -> str | None:
    """Why the bridge must not connect to ``address``, or None for a public unicast address. Pure."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refusal(embedded)
            return f"IPv6 form of {inner}" if inner else None
        if address.is_site_local:
            return "site-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address in _METADATA:
        return "cloud metadata"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _CGNAT:
        return "CGNAT"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not global"
    return None


def resolve_with_system(host: str) -> list[str]:
    """The host's addresses from the system resolver (the default when no resolver is given)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise PeerUnavailable(f"{host}: cannot resolve the name") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def resolve_with(resolver: dns.resolver.Resolver, seconds: float = 5.0) -> Resolve:
    """A host's A and AAAA addresses through the bridge's own resolver (BRIDGE_DNS_NAMESERVERS), so the
    peer client asks the same DNS as discovery, within ``seconds`` for both questions."""

    def resolve(host: str) -> list[str]:
        try:
            with dns_budget(seconds):
                found = [r.to_text() for kind in ("A", "AAAA") for r in records(resolver, host, kind)]
        except DNSUnavailable as exc:
            raise PeerUnavailable(f"{host}: DNS did not answer") from exc
        return list(dict.fromkeys(found))

    return resolve


@dataclass(frozen=True)
class PeerResponse:
    """A peer's whole answer (never larger than the call's cap)."""

    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)
    url: str

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


class Guard:
    """Which addresses may be connected to: public unicast ones and what the allow-list names."""

    def __init__(self, allowlist: Iterable[IPNetwork] = (), resolve: Resolve | None = None) -> None:
        self.allowlist = tuple(allowlist)
        self.resolve = resolve or resolve_with_system

    def allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an allow-listed IPv4 address is reached by either spelling
        return any(address.version == n.version and address in n for n in self.allowlist)

    def check(self, address: IPAddress, host: str) -> None:
        """Raise :class:`PeerRefused` unless the bridge may connect to ``address`` (on behalf of ``host``)."""
        if self.allowed(address):
            return
        reason = refusal(address)
        if reason is not None:
            raise PeerRefused(f"{host}: refused to connect to a {reason} address ({address})")

    def addresses(self, host: str) -> list[IPAddress]:
        """Every address of ``host``, each vetted; refuses the host if any one of them is refused."""
        try:
            found = [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            found = [ipaddress.ip_address(a) for a in self.resolve(host)]
        if not found:
            raise PeerUnavailable(f"{host}: the name has no address")
        for address in found:
            self.check(address, host)
        return found


class _GuardedMixin:
    """urllib3 connection whose socket goes to an address the guard vetted, resolved exactly once here.

    Only the socket's destination changes: ``self.host`` stays the name, so TLS verifies the certificate
    for it and sends it as SNI, and ``Host:`` carries it.
    """

    guard: Guard
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        last: OSError | None = None
        for address in self.guard.addresses(self.host):
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(self.timeout if isinstance(self.timeout, int | float) else None)
                sock.connect((str(address), self.port))
                return sock
            except TimeoutError as exc:
                sock.close()
                raise PeerUnavailable(f"{self.host}: connecting timed out") from exc
            except OSError as exc:
                sock.close()
                last = exc
        raise PeerUnavailable(f"{self.host}: cannot connect ({type(last).__name__})") from last


def _pool_classes(guard: Guard) -> dict[str, type[HTTPConnectionPool]]:
    http_conn = type("GuardedHTTPConnection", (_GuardedMixin, HTTPConnection), {"guard": guard})
    https_conn = type("GuardedHTTPSConnection", (_GuardedMixin, HTTPSConnection), {"guard": guard})
    http_pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
    return {"http": http_pool, "https": https_pool}


class PeerClient:
    """HTTP(S) to Mailio peers through the guard; thread-safe (urllib3's pools are)."""

    def __init__(
        self,
        *,
        allowlist: Iterable[IPNetwork] = (),
        allow_insecure: bool = False,
        peer_urls: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        resolve: Resolve | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.guard = Guard(allowlist, resolve)
        self.allow_insecure = allow_insecure
        self.peer_urls = dict(peer_urls or {})
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._pool = urllib3.PoolManager(num_pools=50, maxsize=4, ca_certs=ca_file, cert_reqs="CERT_REQUIRED")
        self._pool.pool_classes_by_scheme = _pool_classes(self.guard)

    @classmethod
    def from_settings(cls, settings: Settings, resolver: dns.resolver.Resolver | None = None) -> PeerClient:
        """The client the bridge uses (``Bridge.peers``); resolving through ``resolver`` when given."""
        if settings.allow_insecure_peers:
            log.warning("BRIDGE_ALLOW_INSECURE_PEERS is on: Mailio peers may be reached over plain http (tests only)")
        return cls(
            allowlist=parse_peer_allowlist(settings.peer_allowlist),
            allow_insecure=settings.allow_insecure_peers,
            peer_urls=parse_peer_urls(settings.peer_urls),
            timeout=settings.peer_timeout,
            max_bytes=settings.peer_max_answer_bytes,
            resolve=None if resolver is None else resolve_with(resolver, settings.peer_timeout),
        )

    def url(self, host: str, path: str) -> str:
        """Where ``path`` of the Mailio host ``host`` is reached: ``https://host/path`` or BRIDGE_PEER_URLS'."""
        base = self.peer_urls.get(host.lower().rstrip(".")) or f"https://{host}"
        return base + (path if path.startswith("/") else "/" + path)

    def get(self, url: str, *, max_bytes: int | None = None) -> PeerResponse:
        return self.request("GET", url, max_bytes=max_bytes)

    def post(
        self, url: str, body: bytes, *, content_type: str = "application/json", max_bytes: int | None = None
    ) -> PeerResponse:
        return self.request("POST", url, body=body, headers={"Content-Type": content_type}, max_bytes=max_bytes)

    @metrics.peer_call
    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> PeerResponse:
        """One call, no redirects, no retries; the whole answer within the time limit and the size cap."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        host = self._check_url(url)
        deadline = time.monotonic() + self.timeout
        sent = {"Accept-Encoding": "identity", "User-Agent": "mailio-bridge", **(headers or {})}
        try:
            response = self._pool.request(
                method,
                url,
                body=body,
                headers=sent,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )
        except PeerError:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise PeerUnavailable(f"{host}: {_describe(exc)}") from exc
        try:
            return self._read(response, url, host, cap, deadline)
        finally:
            response.release_conn()

    def _check_url(self, url: str) -> str:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            _ = parts.port  # ValueError for a port out of range
        except ValueError:
            raise PeerRefused("not a usable URL") from None
        allowed = ("https", "http") if self.allow_insecure else ("https",)
        if parts.scheme not in allowed:
            raise PeerRefused(f"{host or 'a peer'}: only https URLs are fetched, not {parts.scheme or 'none'}")
        if not host or parts.username or parts.password:
            raise PeerRefused("not a usable URL (no host, or credentials in it)")
        return host

    def _read(self, response: Any, url: str, host: str, cap: int, deadline: float) -> PeerResponse:
        headers = {k.lower(): v for k, v in response.headers.items()}
        if 300 <= response.status < 400:
            raise PeerRefused(f"{host}: answered with a redirect ({response.status}); redirects are not followed")
        if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            raise PeerRefused(f"{host}: answered with a compressed body, which was not asked for")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise PeerAnswerTooLarge(f"{host}: the answer is {int(length)} bytes; at most {cap} are read")
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerUnavailable(f"{host}: the answer took longer than {self.timeout:g} s")
                sock = getattr(response.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(left)  # each wait is bounded by what is left of the call's time
                chunk = response.read1(min(_CHUNK, cap + 1 - size))
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise PeerAnswerTooLarge(f"{host}: the answer is larger than {cap} bytes; cut off")
                chunks.append(chunk)
        except PeerError:
            response.close()  # never read the rest: the connection is closed, not reused
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            response.close()
            raise PeerUnavailable(f"{host}: {_describe(exc)}") from exc
        return PeerResponse(response.status, headers, b"".join(chunks), url)


def _describe(exc: BaseException) -> str:
    """A short, secret-free account of a transport failure (urllib3 messages can be long)."""
    while isinstance(exc, urllib3.exceptions.HTTPError) and exc.__context__ is not None and not str(exc):
        exc = exc.__context__
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "no answer in time"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS failed (certificate not valid for this host, or handshake refused)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "the connection broke"
    return type(exc).__name__
