"""What to set up in Postal and DNS for this deployment: ``mailio-bridge postal-setup`` and ``make run``'s banner.

One text for both, built from the settings, the Postal signing keys the bridge trusts and the server key, so
the two never disagree. URLs come from ``BRIDGE_PUBLIC_URL`` (the bridge's own https base URL as Postal and
peers reach it) and never from the mail domain: the bridge usually sits on another host name than the one
the mail domain's MX points at. Without it the text says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.settings import Settings

INBOUND_PATH = "/postal/inbound"
EVENTS_PATH = "/postal/events"
#: What the events webhook must carry: the outbound delivery states the bridge follows.
WEBHOOK_EVENTS = ("MessageSent", "MessageDelayed", "MessageDeliveryFailed", "MessageHeld", "MessageBounced")
ENDPOINT_SETTINGS = (
    ("Encoding", "BodyAsJSON"),
    ("Format", "RawMessage"),
    ("Strip replies", "off"),
    ("Include attachments", "on"),
    ("Timeout", "30 s"),
)
MISSING_URL = "<BRIDGE_PUBLIC_URL>"


@dataclass(frozen=True)
class Facts:
    """Everything the text depends on; gathered by ``gather`` or given by a test."""

    domain: str
    public_url: str  # "" when BRIDGE_PUBLIC_URL is unset
    keys: list[dict[str, str]]  # from PostalKeyring.describe(): {"source", "kid"} or {"source", "error"}
    mailio_txt: tuple[str, str] | None  # (name, value) of the Mailio TXT record; None: no server key yet
    server_key_problem: str = ""
    postal_api_key: bool = False


def gather(settings: Settings, describe_keys: Callable[[], list[dict[str, str]]]) -> Facts:
    """Read what the text needs: the trusted KIDs (fetching Postal's JWKS now) and the server key, if any."""
    from bridge.mailio.server_key import RECORD_NAME, ServerKeyError, load_server_key, txt_record

    mailio_txt, problem = None, ""
    try:
        key = load_server_key(settings.server_key_path)
        mailio_txt = (RECORD_NAME.format(domain=settings.domain.split(":")[0]) + ".", txt_record(key))
    except ServerKeyError as exc:
        problem = str(exc)
    return Facts(
        domain=settings.domain,
        public_url=settings.public_url.rstrip("/"),
        keys=describe_keys(),
        mailio_txt=mailio_txt,
        server_key_problem=problem,
        postal_api_key=bool(settings.postal_api_key),
    )


def render(facts: Facts) -> str:
    """The whole text: endpoint, webhook, trusted keys, DNS records, check list."""
    base = facts.public_url or MISSING_URL
    domain = facts.domain.split(":")[0]
    lines = [f"Mailio bridge for Postal: what to set up for {domain}", ""]
    if not facts.public_url:
        lines += [
            "!! BRIDGE_PUBLIC_URL is not set. It is this bridge's own https base URL, as Postal and Mailio peers",
            "   reach it (e.g. https://bridge.example.com, served by your TLS proxy); it is not derived from the",
            "   mail domain. Set it and run `mailio-bridge postal-setup` again.",
            "",
        ]
    lines += ["1. HTTP endpoint (Postal: the mail server -> Routing -> HTTP Endpoints -> Add)"]
    lines += [f"     {'URL':<21}{base}{INBOUND_PATH}"]
    lines += [f"     {name:<21}{value}" for name, value in ENDPOINT_SETTINGS]
    lines += [f"   and a route: *@{domain} (or one address) -> that endpoint, spam mode Mark.", ""]
    lines += [
        "2. Events webhook (Postal: the mail server -> Webhooks -> Add): delivery status of sent mail",
        f"     {'URL':<21}{base}{EVENTS_PATH}",
        f"     {'Events':<21}{', '.join(WEBHOOK_EVENTS)}",
        "",
        "3. Postal signing keys the bridge trusts (compare each KID with Postal's /.well-known/jwks.json)",
    ]
    trusted = [k for k in facts.keys if "kid" in k]
    lines += [f"     {k['source']:<26}kid {k['kid']}" for k in facts.keys if "kid" in k]
    lines += [f"     {k['source']:<26}cannot fetch: {k['error']}" for k in facts.keys if "error" in k]
    if not trusted:
        lines += ["     none yet: every delivery gets 503 (Postal retries) until BRIDGE_POSTAL_URL or"]
        lines += ["     BRIDGE_POSTAL_PUBLIC_KEY names Postal's signing key (postal_config/README.md, step 1)"]
    lines += ["", "4. DNS records to publish"]
    if facts.mailio_txt:
        name, value = facts.mailio_txt
        lines += [f'     {name} IN TXT "{value}"   (Mailio peers verify this bridge with it)']
    else:
        if facts.server_key_problem.startswith("no server key"):
            lines += ["     Mailio TXT: no server key yet. Run `mailio-bridge keys init`, then this command again."]
        else:
            lines += [f"     Mailio TXT: the server key cannot be used: {facts.server_key_problem}"]
    lines += [
        f"     MX for {domain} -> Postal; SPF, DKIM and return-path records as Postal's domain page lists them",
        "     (without them Postal's outgoing mail is refused or filed as spam by receivers).",
        "",
        "5. Check list",
        _check(bool(facts.public_url), "BRIDGE_PUBLIC_URL set; `curl <it>/healthz` answers from Postal's host"),
        _check(bool(trusted), "Postal's signing key trusted (step 3)"),
        _check(facts.mailio_txt is not None, "server key made and its TXT record published (step 4)"),
        _check(facts.postal_api_key, "BRIDGE_POSTAL_API_KEY set (an API credential of the mail server: sending)"),
        "   [ ] the mail server is in Live mode; endpoint, route and webhook made (or postal_config/console.rb,",
        "       which also lowers Postal's raw message retention: see postal_config/README.md)",
        "   [ ] a worker runs (`mailio-bridge worker`): without one, mail is stored but never filed",
        f"   [ ] a mailbox exists: `mailio-bridge mailbox add <name>@{domain}`",
    ]
    return "\n".join(lines) + "\n"


def _check(done: bool, text: str) -> str:
    return f"   [{'x' if done else ' '}] {text}"
