"""Wiring: the one place that turns settings into connected stores, shared by web and worker.

``Bridge`` holds the long-lived clients of one process (object store, Redis, Postal's keys).
The web app builds one in ``create_app``; RQ jobs get the worker's through ``current()`` so
a job and a request see the same stores configured the same way.
"""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import dns.resolver
import redis
from rq import Queue

from bridge.dns import UnreachableZones, make_resolver
from bridge.mailio.discovery import Discovery
from bridge.mailio.peers import PeerClient
from bridge.postal.client import PostalClient
from bridge.postal.signatures import PostalKeyring, load_public_keys
from bridge.settings import Settings, SettingsError
from bridge.store.contacts import ContactBook
from bridge.store.handshakes import HandshakeOffers, HandshakeStore, SenderHashes
from bridge.store.index import MailIndex
from bridge.store.mailboxes import MailboxDirectory
from bridge.store.messages import MessageStore
from bridge.store.objects import ObjectStore, open_object_store
from bridge.store.outbound import OutboundStore
from bridge.store.spool import Spool

QUEUE_NAME = "bridge"


class Bridge:
    """The connected services of one process."""

    def __init__(self, settings: Settings, *, fsync: bool | None = None) -> None:
        self.settings = settings
        try:
            self.objects: ObjectStore = open_object_store(
                settings.storage_url, fsync=settings.fsync if fsync is None else fsync
            )
        except ValueError as exc:
            raise SettingsError(f"BRIDGE_STORAGE_URL: {exc}") from None
        try:
            keys = load_public_keys(settings.postal_public_keys) if settings.postal_public_keys else []
        except ValueError as exc:
            raise SettingsError(f"BRIDGE_POSTAL_PUBLIC_KEY: {exc}") from None
        # Redis lazily: the last good JWKS is shared between processes, but only a fetch ever needs it.
        self.postal_keys = PostalKeyring(keys, settings.postal_jwks_url, shared_redis=lambda: self.redis)
        if settings.dns_nameservers:
            try:
                self.resolver  # noqa: B018 - built now so that a bad entry stops start-up, not a request
            except ValueError as exc:
                raise SettingsError(f"BRIDGE_DNS_NAMESERVERS: {exc}") from None
        self.mailboxes = MailboxDirectory(self.objects)
        self.messages = MessageStore(self.objects)

    @cached_property
    def redis_url(self) -> str:
        """BRIDGE_REDIS_URL, or the private Redis that `make run` started in the data directory."""
        if self.settings.redis_url:
            return self.settings.redis_url
        socket = embedded_redis_socket(self.settings)
        if socket.exists():
            return f"unix://{socket}"
        raise SettingsError("BRIDGE_REDIS_URL is required (`make run` starts a private Redis when it is unset)")

    @cached_property
    def outbound_redis(self) -> redis.Redis:
        """Short timeouts: Postal waits 5 s for an event's answer, and a quick 503 makes it retry."""
        return redis.Redis.from_url(self.redis_url, socket_timeout=1.5, socket_connect_timeout=1)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.redis_url,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
        )

    @cached_property
    def index(self) -> MailIndex:
        return MailIndex(self.redis)

    @cached_property
    def queue(self) -> Queue:
        return Queue(QUEUE_NAME, connection=self.redis)

    @cached_property
    def handshakes(self) -> HandshakeStore:
        return HandshakeStore(self.objects, self.redis)

    @cached_property
    def offers(self) -> HandshakeOffers:
        return HandshakeOffers(self.redis, self.settings.domain)

    @cached_property
    def sender_hashes(self) -> SenderHashes:
        return SenderHashes(self.objects, self.redis)

    @cached_property
    def contacts(self) -> ContactBook:
        return ContactBook(self.objects, self.redis)

    @cached_property
    def postal_client(self) -> PostalClient:
        """Postal's send and message API; PostalNotConfigured (a SettingsError) without URL and API key."""
        return PostalClient.from_settings(self.settings)

    @cached_property
    def outbound(self) -> OutboundStore:
        """Outbound records and their per-recipient delivery states (``bridge.store.outbound``)."""
        return OutboundStore(self.objects, self.outbound_redis)

    @cached_property
    def spool(self) -> Spool:
        """Outgoing plaintext waiting for Postal, encrypted under the server's spool key (``bridge.store.spool``)."""
        return Spool(self.objects, self.settings.spool_key_path)

    @cached_property
    def auth_cache(self) -> dict[Any, Any]:
        """SPF/DMARC verdicts by sender and server, kept a few minutes by the filing job."""
        return {}

    @cached_property
    def resolver(self) -> dns.resolver.Resolver:
        """The bridge's DNS resolver (BRIDGE_DNS_NAMESERVERS), caching answers for their TTL.

        Zones that stop answering are remembered in Redis for every process (``bridge.dns``); that
        client has short timeouts because it is asked before DNS, and its failure only costs the memory.
        """
        resolver = make_resolver(list(self.settings.dns_nameservers) or None)
        resolver.cache = dns.resolver.LRUCache(50_000)
        try:
            shared = redis.Redis.from_url(self.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25)
        except SettingsError:
            shared = None  # no Redis configured (a CLI command): this process's own memory only
        resolver.unreachable = UnreachableZones(shared)
        return resolver

    @cached_property
    def peers(self) -> PeerClient:
        """The guarded HTTP client for every call to a Mailio peer (``bridge.mailio.peers``), resolving
        names through the bridge's resolver as discovery does."""
        return PeerClient.from_settings(self.settings, self.resolver)

    @cached_property
    def discovery(self) -> Discovery:
        """Mailio discovery (MIR-5): routes per mail domain, cached in Redis for every process.

        Without a configured Redis (a CLI command) it answers from DNS alone.
        """
        try:
            shared: redis.Redis | None = self.redis
        except SettingsError:
            shared = None
        return Discovery(
            self.resolver,
            shared,
            candidates=self.settings.discovery_candidates,
            max_ttl=self.settings.discovery_max_ttl,
            negative_ttl=self.settings.discovery_negative_ttl,
        )


def embedded_redis_socket(settings: Settings) -> Path:
    return settings.data_dir / "redis" / "redis.sock"


_current: Bridge | None = None
_lock = threading.Lock()


def current() -> Bridge:
    """The worker process's Bridge, built from the environment on first use.

    Worker-side object-store writes skip fsync: everything a job writes can be derived again
    from what the request path wrote (and fsynced) before it answered Postal.
    """
    global _current
    with _lock:
        if _current is None:
            _current = Bridge(Settings.from_env(), fsync=False)
        return _current


def use(bridge: Bridge | None) -> None:
    """Set the process's Bridge explicitly (the worker command, tests)."""
    global _current
    with _lock:
        _current = bridge
