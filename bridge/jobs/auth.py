"""SPF and DMARC for a batch of messages, with DNS that cannot hold the batch (or the worker) hostage.

Against a resolver that never answers, each new sender used to cost ~4 s in series, and a whole
batch of new senders ran for many minutes; RQ's SIGALRM job timeout fired inside a DNS lookup and
was swallowed there. So, for the distinct senders of a batch:

* each sender's SPF + DMARC runs in a pool thread, inside its own ``dns_budget(SENDER_BUDGET)``
  (the budget is a context variable: it must be entered in the thread that asks);
* the main thread only waits, at most ``BATCH_BUDGET`` for the whole batch. It asks DNS nothing,
  so RQ's job timeout (a signal, delivered to the main thread) interrupts that wait and fires;
* a sender not done in time gets an honest ``temperror`` verdict now, computed without DNS (the
  message is filed; not authenticated, so screened into ``other``), and the message is queued for
  re-evaluation (``RECHECK_DELAYS``): the recheck job asks again later and re-screens it.

Pool threads left running past the batch budget end on their own within their sender budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import dns.resolver

from bridge.context import Bridge
from bridge.dns import dns_budget
from bridge.mail.auth import AuthVerdict, authenticate_sender

log = logging.getLogger(__name__)

#: Seconds of DNS one sender's SPF and DMARC may take in all.
SENDER_BUDGET = 5.0
#: Seconds a batch waits for all of its senders' verdicts (well under the filing job's time limit).
BATCH_BUDGET = 20.0
#: Senders asked about at once (threads mostly wait on sockets: more than cores is right).
THREADS = 16
#: How long a verdict is reused for the same sender and server; temperror ones only briefly.
CACHE_SECONDS = 300.0
TEMPERROR_CACHE_SECONDS = 30.0
#: Seconds after filing (then after each re-evaluation) to ask DNS again for a temperror verdict;
#: its length is the number of re-evaluations before the verdict stays as it is.
RECHECK_DELAYS = (60, 300, 1800, 3 * 3600, 12 * 3600)

Key = tuple[Any, ...]


def sender_key(record: dict[str, Any]) -> Key:
    """Everything SPF/DMARC depend on: one sender's mail from one server gets the same answer."""
    sender, postal, verdicts = record["sender"], record["postal"], record["verdicts"]
    mail_from = postal.get("mail_from") or ""
    return (
        sender.get("from") if not sender.get("problem") else None,
        mail_from,
        sender.get("client_ip"),
        sender.get("helo"),
        verdicts.get("dkim", "none"),
        tuple(verdicts.get("dkim_domains", ())),
    )


def authenticate_records(
    bridge: Bridge, records: Iterable[dict[str, Any]], *, use_cache: bool = True
) -> dict[Key, AuthVerdict]:
    """Verdicts for the records' distinct senders, within the batch budget; never raises for DNS."""
    keys = list(dict.fromkeys(sender_key(r) for r in records))
    cache = bridge.auth_cache
    now = time.monotonic()
    verdicts: dict[Key, AuthVerdict] = {}
    todo = []
    for key in keys:
        hit = cache.get(key) if use_cache else None
        if hit and hit[0] > now:
            verdicts[key] = hit[1]
        else:
            todo.append(key)
    if todo:
        verdicts.update(_ask(bridge, todo))
        if len(cache) > 100_000:
            cache.clear()
        now = time.monotonic()
        for key in todo:
            ttl = TEMPERROR_CACHE_SECONDS if needs_recheck(verdicts[key].as_dict()) else CACHE_SECONDS
            cache[key] = (now + ttl, verdicts[key])
    return verdicts


def needs_recheck(verdicts: dict[str, Any]) -> bool:
    """DNS could not answer for SPF, or for the DMARC policy: asking again may change the verdict.

    (A DKIM temperror cannot change here: DKIM needs the message, which is sealed by now.)
    """
    return verdicts.get("spf") == "temperror" or (
        verdicts.get("dmarc") == "temperror" and verdicts.get("dmarc_policy") is None
    )


def _ask(bridge: Bridge, keys: list[Key]) -> dict[Key, AuthVerdict]:
    resolver = bridge.resolver  # built here, not raced for by the pool's threads
    pool = ThreadPoolExecutor(max_workers=min(THREADS, len(keys)), thread_name_prefix="bridge-dns")
    try:
        futures: dict[Future[AuthVerdict], Key] = {
            pool.submit(_verdict, resolver, key, SENDER_BUDGET): key for key in keys
        }
        # The only wait of the main thread: RQ's job-timeout signal interrupts it.
        done, late = wait(futures, timeout=BATCH_BUDGET)
    finally:
        # Never wait for stragglers (each ends within its own budget); queued senders are dropped.
        pool.shutdown(wait=False, cancel_futures=True)
    verdicts: dict[Key, AuthVerdict] = {}
    for future in done:
        key = futures[future]
        error = future.exception()
        if error is None:
            verdicts[key] = future.result()
        else:  # authenticate_sender does not raise for DNS; anything else is a bug, not a verdict
            log.error("SPF/DMARC check failed unexpectedly: %s", type(error).__name__)
            verdicts[key] = _verdict(resolver, key, 0.0)
    for future in late:
        verdicts[futures[future]] = _verdict(resolver, futures[future], 0.0)
    if late:
        log.warning(
            "DNS: %d of %d senders not checked within %.0f s: temperror now, asked again later",
            len(late),
            len(keys),
            BATCH_BUDGET,
        )
    return verdicts


def _verdict(resolver: dns.resolver.Resolver, key: Key, budget: float) -> AuthVerdict:
    """SPF + DMARC for one sender within ``budget`` seconds of DNS.

    With a budget of 0 no query is sent: every lookup is "unavailable" at once, which yields the
    honest verdict for a sender DNS could not be asked about (SPF/DMARC temperror, and DKIM counted
    only under strict alignment, as when the DMARC record is unknown).
    """
    from_address, mail_from, client_ip, helo, dkim_result, dkim_domains = key
    with dns_budget(budget):
        return authenticate_sender(
            from_address=from_address,
            client_ip=client_ip,
            helo=helo,
            mail_from=mail_from,
            dkim_result=dkim_result,
            dkim_domains=dkim_domains,
            resolver=resolver,
        )
