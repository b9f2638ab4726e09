"""Every setting of the bridge, read once from the environment and validated.

This is the only module that reads ``os.environ`` for configuration. A missing or bad value
stops start-up with one line that names the variable (``SettingsError``), never a traceback.
The README's settings table mirrors ``SETTINGS`` below; keep them in step.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class SettingsError(ValueError):
    """A setting is missing or unusable; the message is one line naming the variable."""


# name -> (default or None if required, one-line description). The README documents the same.
SETTINGS: dict[str, tuple[str | None, str]] = {
    "BRIDGE_DOMAIN": (
        None,
        "the mail domain host this bridge serves as a Mailio server (did:web host, JWE kids)",
    ),
    "BRIDGE_DATA_DIR": ("./var", "local working directory (embedded Redis socket, filesystem object store)"),
    "BRIDGE_REDIS_URL": (
        "",
        "Redis for queues, dedupe cache and indexes; unset: `make run` starts a private one",
    ),
    "BRIDGE_STORAGE_URL": (
        "",
        "file:///path or s3://bucket[/prefix]; default file://<BRIDGE_DATA_DIR>/objects",
    ),
    "BRIDGE_POSTAL_URL": ("", "Postal's web URL (https://postal.example.com): JWKS for signatures, send API"),
    "BRIDGE_POSTAL_PUBLIC_KEY": (
        "",
        "Postal's signing public key(s): PEM paths or DNS p= values, comma separated",
    ),
    "BRIDGE_POSTAL_API_KEY": ("", "Postal API credential for the send API (outbound)"),
    "BRIDGE_POSTAL_TIMEOUT": (
        "15",
        "seconds each call to Postal's send/message API may take to connect, and to each read of its answer",
    ),
    "BRIDGE_UNKNOWN_RECIPIENT": (
        "bounce",
        "bounce (answer 404: Postal bounces) or drop (answer 429: dropped silently)",
    ),
    "BRIDGE_MAX_MESSAGE_BYTES": (
        "26214400",
        "largest accepted message in bytes after base64 decoding (413 above)",
    ),
    "BRIDGE_FSYNC": ("true", "fsync filesystem object-store writes before answering Postal (true/false)"),
    "BRIDGE_DNS_NAMESERVERS": (
        "",
        "DNS servers as IP or IP:PORT, comma separated; unset: the system resolver",
    ),
    "BRIDGE_DASHBOARD_PASSWORD": (
        "",
        "password for the RQ dashboard at /rq (user `admin`); unset: dashboard off",
    ),
    "BRIDGE_LISTEN": ("127.0.0.1:8080", "host:port the web process binds (make run / python -m bridge run)"),
    "BRIDGE_WEB_WORKERS": ("4", "gunicorn worker processes (make run / python -m bridge run)"),
    "BRIDGE_WEB_THREADS": ("8", "threads per gunicorn worker process (gthread): concurrent requests per process"),
    "BRIDGE_READ_TIMEOUT": (
        "10",
        "seconds a client may take to send a request's headers and body; slower ones get 408 and are cut off",
    ),
    "BRIDGE_DKIM_DNS_BUDGET": (
        "2",
        "seconds of DNS all of one delivery's DKIM key lookups may take before answering Postal (temperror after)",
    ),
    "BRIDGE_LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR"),
    "BRIDGE_LOG_FORMAT": ("json", "json (one JSON object a line, web and worker alike) or text (for development)"),
    "BRIDGE_METRICS_TOKEN": ("", "bearer token GET /metrics requires; unset: open (restrict it at the proxy)"),
    "BRIDGE_DISCOVERY_CANDIDATES": (
        "@,mio,mailio,didcomm",
        "Mailio discovery: where mailio._mailiokey.<prefix>.<domain> is looked up, in order; @ is the domain itself",
    ),
    "BRIDGE_DISCOVERY_MAX_TTL": ("3600", "seconds a found route (mailio or smtp) is cached at most (DNS TTLs cap it)"),
    "BRIDGE_DISCOVERY_NEGATIVE_TTL": ("300", "seconds a `none` route is cached at most (DNS negative TTLs cap it)"),
    "BRIDGE_SPOOL_KEY_FILE": (
        "",
        "key that encrypts outgoing plaintext waiting for Postal; default <BRIDGE_DATA_DIR>/spool.key (made 0600)",
    ),
    "BRIDGE_SEND_LIMIT_MESSAGES": ("200", "messages one mailbox may send per hour (429 above)"),
    "BRIDGE_SEND_LIMIT_RECIPIENTS": ("1000", "recipients one mailbox may send to per hour (429 above)"),
    "BRIDGE_OUTBOUND_RETRY_DELAYS": (
        "60,300,900,3600,14400",
        "seconds between retries of a send Postal provably did not take (and of DNS trouble), comma separated",
    ),
    "BRIDGE_UNCERTAIN_WINDOW": (
        "86400",
        "seconds an uncertain recipient's encrypted copy is kept for the owner's explicit resend",
    ),
    "BRIDGE_PEER_TIMEOUT": (
        "10",
        "seconds one call to a Mailio peer may take in all (connect, send, the whole answer)",
    ),
    "BRIDGE_PEER_MAX_ANSWER_BYTES": (
        "1048576",
        "largest answer read from a Mailio peer (DID documents, receipts); cut off above",
    ),
    "BRIDGE_PEER_ALLOWLIST": (
        "",
        "CIDRs the peer client may connect to although private, loopback, ... (comma separated); unset: none",
    ),
    "BRIDGE_PEER_URLS": (
        "",
        "host=base-url,... : where a Mailio host is reached instead of https://<host> (still guarded)",
    ),
    "BRIDGE_ALLOW_INSECURE_PEERS": (
        "false",
        "true: peers may be reached over plain http (tests only; warned at start)",
    ),
    "BRIDGE_PUBLIC_URL": (
        "",
        "the bridge's own public https base URL (DID documents' service endpoints); default https://<BRIDGE_DOMAIN>",
    ),
    "BRIDGE_SERVER_KEY_FILE": (
        "",
        "the server's Ed25519 key (MTP signatures; `keys init` makes it 0600); default <BRIDGE_DATA_DIR>/server.key",
    ),
    "BRIDGE_MTP_TIME_WINDOW": ("300", "seconds a peer's signed MTP timestamp may differ from our clock"),
    "BRIDGE_MTP_MAX_BYTES": (
        "83886080",
        "largest MTP request body in bytes (413 above, before reading); a message travels about 3.1 times its size",
    ),
    "BRIDGE_MTP_RATE_LIMIT": ("600", "MTP requests one sender domain may make per minute (429 above)"),
}

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*(:\d{1,5})?$"
)


@dataclass(frozen=True)
class Settings:
    domain: str
    data_dir: Path
    redis_url: str
    storage_url: str
    postal_url: str
    postal_public_keys: str
    postal_api_key: str
    unknown_recipient: str
    max_message_bytes: int
    fsync: bool
    dns_nameservers: tuple[str, ...]
    dashboard_password: str
    listen: str
    web_workers: int
    log_level: str
    web_threads: int = 8
    read_timeout: float = 10.0
    dkim_dns_budget: float = 2.0
    postal_timeout: float = 15.0
    discovery_candidates: tuple[str, ...] = ("", "mio", "mailio", "didcomm")
    discovery_max_ttl: int = 3600
    discovery_negative_ttl: int = 300
    spool_key_file: Path | None = None  # None: <data_dir>/spool.key
    send_limit_messages: int = 200
    send_limit_recipients: int = 1000
    outbound_retry_delays: tuple[int, ...] = (60, 300, 900, 3600, 14400)
    uncertain_window: int = 86400
    peer_timeout: float = 10.0
    peer_max_answer_bytes: int = 1048576
    peer_allowlist: str = ""  # CIDRs; bridge.mailio.peers parses and checks them
    peer_urls: str = ""  # host=base-url pairs; bridge.mailio.peers parses and checks them
    allow_insecure_peers: bool = False
    public_url: str = ""  # "": https://<domain>
    server_key_file: Path | None = None  # None: <data_dir>/server.key
    mtp_time_window: int = 300
    mtp_max_bytes: int = 83886080
    mtp_rate_limit: int = 600
    log_format: str = "json"
    metrics_token: str = ""

    @property
    def postal_jwks_url(self) -> str | None:
        return f"{self.postal_url.rstrip('/')}/.well-known/jwks.json" if self.postal_url else None

    @property
    def spool_key_path(self) -> Path:
        return self.spool_key_file or self.data_dir / "spool.key"

    @property
    def server_key_path(self) -> Path:
        return self.server_key_file or self.data_dir / "server.key"

    @property
    def public_base_url(self) -> str:
        """Where peers reach this bridge over HTTPS, without a trailing slash."""
        return (self.public_url or f"https://{self.domain}").rstrip("/")

    @property
    def unknown_recipient_status(self) -> int:
        """404 makes Postal bounce the sender; 429 makes it drop the message silently."""
        return 404 if self.unknown_recipient == "bounce" else 429

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            default, _ = SETTINGS[name]
            value = env.get(name, "").strip()
            if value:
                return value
            if default is None:
                raise SettingsError(f"{name} is required: {SETTINGS[name][1]}")
            return default

        domain = get("BRIDGE_DOMAIN").lower()
        if not _DOMAIN.match(domain):
            raise SettingsError("BRIDGE_DOMAIN must be a host name such as mail.example.com")
        data_dir = Path(get("BRIDGE_DATA_DIR")).resolve()
        storage_url = get("BRIDGE_STORAGE_URL") or f"file://{data_dir / 'objects'}"
        _check_storage_url(storage_url)
        redis_url = get("BRIDGE_REDIS_URL")
        if redis_url and urlparse(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError("BRIDGE_REDIS_URL must be a redis://, rediss:// or unix:// URL")
        postal_url = get("BRIDGE_POSTAL_URL")
        if postal_url and urlparse(postal_url).scheme not in ("http", "https"):
            raise SettingsError("BRIDGE_POSTAL_URL must be an http(s):// URL")
        unknown = get("BRIDGE_UNKNOWN_RECIPIENT").lower()
        if unknown not in ("bounce", "drop"):
            raise SettingsError("BRIDGE_UNKNOWN_RECIPIENT must be bounce or drop")
        max_bytes = _positive_int("BRIDGE_MAX_MESSAGE_BYTES", get("BRIDGE_MAX_MESSAGE_BYTES"))
        workers = _positive_int("BRIDGE_WEB_WORKERS", get("BRIDGE_WEB_WORKERS"))
        threads = _positive_int("BRIDGE_WEB_THREADS", get("BRIDGE_WEB_THREADS"))
        read_timeout = _seconds("BRIDGE_READ_TIMEOUT", get("BRIDGE_READ_TIMEOUT"), maximum=300)
        dkim_budget = _seconds("BRIDGE_DKIM_DNS_BUDGET", get("BRIDGE_DKIM_DNS_BUDGET"), maximum=4)
        fsync = _boolean("BRIDGE_FSYNC", get("BRIDGE_FSYNC"))
        nameservers = tuple(n.strip() for n in get("BRIDGE_DNS_NAMESERVERS").split(",") if n.strip())
        for ns in nameservers:
            if not re.match(r"^[0-9a-fA-F.:\[\]]+$", ns):
                raise SettingsError("BRIDGE_DNS_NAMESERVERS must be IP or IP:PORT entries, comma separated")
        listen = get("BRIDGE_LISTEN")
        if not re.match(r"^[^\s:]+:\d{1,5}$", listen):
            raise SettingsError("BRIDGE_LISTEN must be host:port")
        level = get("BRIDGE_LOG_LEVEL").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("BRIDGE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        log_format = get("BRIDGE_LOG_FORMAT").lower()
        if log_format not in ("json", "text"):
            raise SettingsError("BRIDGE_LOG_FORMAT must be json or text")
        return cls(
            domain=domain,
            data_dir=data_dir,
            redis_url=redis_url,
            storage_url=storage_url,
            postal_url=postal_url,
            postal_public_keys=get("BRIDGE_POSTAL_PUBLIC_KEY"),
            postal_api_key=get("BRIDGE_POSTAL_API_KEY"),
            unknown_recipient=unknown,
            max_message_bytes=max_bytes,
            fsync=fsync,
            dns_nameservers=nameservers,
            dashboard_password=get("BRIDGE_DASHBOARD_PASSWORD"),
            listen=listen,
            web_workers=workers,
            log_level=level,
            log_format=log_format,
            metrics_token=get("BRIDGE_METRICS_TOKEN"),
            web_threads=threads,
            read_timeout=read_timeout,
            dkim_dns_budget=dkim_budget,
            discovery_candidates=_candidates(get("BRIDGE_DISCOVERY_CANDIDATES")),
            discovery_max_ttl=_positive_int("BRIDGE_DISCOVERY_MAX_TTL", get("BRIDGE_DISCOVERY_MAX_TTL")),
            discovery_negative_ttl=_positive_int("BRIDGE_DISCOVERY_NEGATIVE_TTL", get("BRIDGE_DISCOVERY_NEGATIVE_TTL")),
            postal_timeout=_seconds("BRIDGE_POSTAL_TIMEOUT", get("BRIDGE_POSTAL_TIMEOUT"), maximum=300),
            spool_key_file=Path(get("BRIDGE_SPOOL_KEY_FILE")).resolve() if get("BRIDGE_SPOOL_KEY_FILE") else None,
            send_limit_messages=_positive_int("BRIDGE_SEND_LIMIT_MESSAGES", get("BRIDGE_SEND_LIMIT_MESSAGES")),
            send_limit_recipients=_positive_int("BRIDGE_SEND_LIMIT_RECIPIENTS", get("BRIDGE_SEND_LIMIT_RECIPIENTS")),
            outbound_retry_delays=_delays("BRIDGE_OUTBOUND_RETRY_DELAYS", get("BRIDGE_OUTBOUND_RETRY_DELAYS")),
            uncertain_window=_positive_int("BRIDGE_UNCERTAIN_WINDOW", get("BRIDGE_UNCERTAIN_WINDOW")),
            peer_timeout=_seconds("BRIDGE_PEER_TIMEOUT", get("BRIDGE_PEER_TIMEOUT"), maximum=300),
            peer_max_answer_bytes=_positive_int("BRIDGE_PEER_MAX_ANSWER_BYTES", get("BRIDGE_PEER_MAX_ANSWER_BYTES")),
            peer_allowlist=_peer_setting("BRIDGE_PEER_ALLOWLIST", get("BRIDGE_PEER_ALLOWLIST")),
            peer_urls=_peer_setting("BRIDGE_PEER_URLS", get("BRIDGE_PEER_URLS")),
            allow_insecure_peers=_boolean("BRIDGE_ALLOW_INSECURE_PEERS", get("BRIDGE_ALLOW_INSECURE_PEERS")),
            public_url=_public_url(get("BRIDGE_PUBLIC_URL")),
            server_key_file=Path(get("BRIDGE_SERVER_KEY_FILE")).resolve() if get("BRIDGE_SERVER_KEY_FILE") else None,
            mtp_time_window=_positive_int("BRIDGE_MTP_TIME_WINDOW", get("BRIDGE_MTP_TIME_WINDOW")),
            mtp_max_bytes=_positive_int("BRIDGE_MTP_MAX_BYTES", get("BRIDGE_MTP_MAX_BYTES")),
            mtp_rate_limit=_positive_int("BRIDGE_MTP_RATE_LIMIT", get("BRIDGE_MTP_RATE_LIMIT")),
        )


def client_api_url(environ: Mapping[str, str] | None = None) -> str | None:
    """Where the client commands (``mail ...``, ``handshake ...``) find the owner API.

    ``BRIDGE_API_URL``, else ``BRIDGE_PUBLIC_URL`` (the bridge's own public base URL), else
    ``http://`` + ``BRIDGE_LISTEN`` (on the bridge's machine); None when none is set: no port is guessed.
    """
    env = os.environ if environ is None else environ
    for name in ("BRIDGE_API_URL", "BRIDGE_PUBLIC_URL"):
        if value := env.get(name, "").strip():
            return value
    listen = env.get("BRIDGE_LISTEN", "").strip()
    return f"http://{listen}" if listen else None


def client_api_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The owner's bearer token for the client commands (``BRIDGE_API_TOKEN``), if set."""
    env = os.environ if environ is None else environ
    return env.get("BRIDGE_API_TOKEN", "").strip() or None


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number") from None
    if number <= 0:
        raise SettingsError(f"{name} must be greater than zero")
    return number


def _seconds(name: str, value: str, *, maximum: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds") from None
    if not 0 < number <= maximum:  # also refuses nan and inf
        raise SettingsError(f"{name} must be more than 0 and at most {maximum:g} seconds")
    return number


def _delays(name: str, value: str) -> tuple[int, ...]:
    """``60,300`` -> ``(60, 300)``: whole seconds, 0 allowed (tests retry at once), at most 20 and a day each."""
    try:
        delays = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise SettingsError(f"{name} must be whole seconds, comma separated") from None
    if not 0 < len(delays) <= 20 or any(not 0 <= d <= 86400 for d in delays):
        raise SettingsError(f"{name} must be 1 to 20 delays of 0 to 86400 seconds")
    return delays


def _candidates(value: str) -> tuple[str, ...]:
    """``@,mio,mailio`` -> ``("", "mio", "mailio")``: the prefixes of MIR-5's candidate names, ``@`` the domain."""
    prefixes = tuple("" if p.strip() == "@" else p.strip().lower().strip(".") for p in value.split(","))
    label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
    if any(p and not re.match(rf"^{label}(\.{label})*$", p) for p in prefixes) or len(set(prefixes)) != len(prefixes):
        raise SettingsError("BRIDGE_DISCOVERY_CANDIDATES must be distinct host-name prefixes or @, comma separated")
    return prefixes


def _public_url(value: str) -> str:
    """An https:// base URL without query or fragment (http only for a loopback test setup), or ""."""
    if not value:
        return ""
    parsed = urlparse(value)
    if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.query or parsed.fragment:
        raise SettingsError("BRIDGE_PUBLIC_URL must be an https:// base URL such as https://mail.example.com")
    return value.rstrip("/")


def parse_peer_allowlist(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``"127.0.0.2/32, 10.1.0.0/16"`` -> networks (BRIDGE_PEER_ALLOWLIST); ``ValueError`` naming the bad entry."""
    networks = []
    for entry in (e.strip() for e in value.split(",")):
        if entry:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry[:60]!r} is not an IP address or CIDR") from None
    return tuple(networks)


def parse_peer_urls(value: str) -> dict[str, str]:
    """``"peer.test=http://127.0.0.3:8080,..."`` -> {host: base URL without a trailing slash} (BRIDGE_PEER_URLS)."""
    urls: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, url = entry.partition("=")
        parts = urlparse(url.strip())
        if not sep or not host.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{entry[:80]!r} is not host=http(s)://base-url")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{entry[:80]!r}: a base URL has no query, fragment or credentials")
        urls[host.strip().lower().rstrip(".")] = url.strip().rstrip("/")
    return urls


def _peer_setting(name: str, value: str) -> str:
    """Checked here so a bad value stops start-up with one line; ``bridge.mailio.peers`` parses it again."""
    try:
        (parse_peer_allowlist if name == "BRIDGE_PEER_ALLOWLIST" else parse_peer_urls)(value)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return value


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false")


def _check_storage_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        return
    if parsed.scheme == "s3" and parsed.netloc:
        return
    raise SettingsError("BRIDGE_STORAGE_URL must be file:///absolute/path or s3://bucket[/prefix]")
