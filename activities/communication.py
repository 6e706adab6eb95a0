"""Telling people about an incident: the incident channel (a Slack-compatible incoming webhook),
the status page (a Statuspage-compatible API, v1) and the pager (PagerDuty Events API v2).

Every message goes out at most once per (incident, event). Chat webhooks and status-page updates
take no idempotency key, so the adapters keep a ledger in astra-ops's state database
(``astra_ops_deliveries``): under a lock per receiver and incident, a delivery is claimed, posted,
and marked delivered after the receiver's 2xx; a retried or concurrent attempt waits for the lock
and then finds the mark. Only a crash between the receiver's 2xx and the mark's commit can make a
retry post again. PagerDuty dedups triggers by ``dedup_key`` itself; the ledger still lets a
retried page answer "already delivered". The state database may be down in the very outage being
handled (it defaults to Astra's own): chat and pager deliveries then go without the ledger (a
retry may repeat a chat message), and status-page updates wait for it.

A receiver that is down or overloaded (network error, 5xx, 408, 429) fails the attempt
retryably, so the caller's retry policy delivers late, in the background; any other 4xx is
non-retryable, with the receiver's answer. Webhook URLs, API keys and routing keys are
credentials: no message, result or ledger row holds them.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import quote

from pydantic import BaseModel, Field, JsonValue, SecretStr, model_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.postgres import connect
from runtime.metrics import notification_failed
from runtime.redact import MASK, redact

if TYPE_CHECKING:
    import httpx
    import psycopg

    from runtime.settings import Settings

TIMEOUT_SECONDS = 10.0
"""Per request; callers give these activities a start-to-close timeout above it."""
CHAT_TEXT_CHARS = 4_000
"""The longest chat message text taken."""
LEDGER_CONNECT_SECONDS = 3
"""How long a delivery waits to reach the ledger before it goes without it (where it may)."""

# The receiver's answer quoted in a rejection: enough to say why, not a whole error page.
_ANSWER_CHARS = 300
_WHITESPACE = re.compile(r"\s+")

Channel = Literal["chat", "status page", "pager"]
IncidentStatus = Literal["investigating", "identified", "monitoring", "resolved"]
ComponentStatus = Literal[
    "operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance"
]


class Delivery(BaseModel):
    """One message about one incident; the pair is delivered at most once per receiver."""

    incident_id: str = Field(min_length=1, max_length=1_000)
    """Our incident's id (its workflow id), or the id of the run a runbook's notice is about;
    Temporal allows workflow ids of up to 1,000 bytes."""
    event_key: str = Field(min_length=1, max_length=200)
    """What the message is about, unique within the incident (``opened``, ``stage:contain``,
    ``page:primary``); derived from the incident's history, never from the clock."""


class ChatMessage(Delivery):
    text: str = Field(min_length=1, max_length=CHAT_TEXT_CHARS)
    """The message; also the notification text when ``blocks`` are given."""
    blocks: list[dict[str, JsonValue]] = Field(default_factory=list, max_length=50)
    """Slack Block Kit blocks (Slack shows at most 50)."""


class StatusPageUpdate(Delivery):
    name: str = Field(min_length=1, max_length=255)
    """The incident's public title."""
    status: IncidentStatus
    body: str = Field(min_length=1, max_length=4_000)
    """The public update shown under the incident."""
    impact: Literal["none", "minor", "major", "critical"] | None = None
    """Overrides the impact the status page derives from the components."""
    components: dict[str, ComponentStatus] = Field(default_factory=dict)
    """Astra component -> its status now; only components mapped to the status page are sent."""


class PageEvent(Delivery):
    action: Literal["trigger", "acknowledge", "resolve"]
    rotation: str = Field(min_length=1, max_length=100)
    """The access-policy group paged; selects the PagerDuty routing key."""
    target: str = Field(min_length=1, max_length=50)
    """Who in the escalation is paged (``primary``, ``secondary``, ``manager``). With the incident
    it makes the dedup key, so acknowledge and resolve reach the page their trigger opened."""
    summary: str = Field(default="", max_length=1_024)
    severity: Literal["critical", "error", "warning", "info"] = "critical"
    source: str = Field(default="astra-ops", min_length=1, max_length=255)
    component: str | None = Field(default=None, max_length=255)
    custom_details: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _trigger_says_what(self) -> Self:
        if self.action == "trigger" and not self.summary:
            raise ValueError("a trigger needs a summary: it is what the person paged reads")
        return self

    @property
    def dedup_key(self) -> str:
        return f"{self.incident_id}/{self.target}"


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    ALREADY_DELIVERED = "already delivered"
    NOT_CONFIGURED = "not configured"


class DeliveryResult(BaseModel):
    outcome: DeliveryOutcome
    receiver: str
    """The receiver as people may read it: host and path, no credentials."""
    status_code: int | None = None
    """The receiver's HTTP status for the delivery that counted."""
    reference: str | None = None
    """The status page's incident id, or the PagerDuty dedup key."""
    attempts: int = 0
    """Posts made for this event so far, failed ones included."""
    detail: str


@dataclass(frozen=True)
class ChatWebhook:
    url: SecretStr


@dataclass(frozen=True)
class StatusPage:
    api_url: str
    page_id: str
    api_key: SecretStr
    components: Mapping[str, str] = field(default_factory=dict)
    """Astra component -> the status page's component id."""


@dataclass(frozen=True)
class PagerDuty:
    events_url: str
    routing_keys: Mapping[str, SecretStr]
    """Rotation -> its Events v2 integration key."""


@dataclass(frozen=True)
class _Sent:
    status_code: int
    reference: str | None = None


class _Receiver:
    """Where a request goes, and how to speak of it without its credentials."""

    def __init__(self, where: str, fix: str, secrets: list[str]) -> None:
        self.where = redact(where)
        self.fix = fix
        self.secrets = [s for s in secrets if s]

    def scrub(self, text: str) -> str:
        """``text`` on one line, bounded, with our secrets and anything like one masked."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return redact(_WHITESPACE.sub(" ", text).strip()[:_ANSWER_CHARS])

    async def send(
        self, method: str, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """The receiver's 2xx answer; otherwise an ApplicationError that says whether to retry."""
        import httpx  # here, not above: the workflows import this module for its models

        try:
            async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as http:
                response = await http.request(method, url, json=body, headers=headers)
        except httpx.HTTPError as err:
            # httpx's messages may quote the URL; the exception's class says enough.
            raise ApplicationError(
                f"{self.where} could not be reached ({type(err).__name__}); "
                "delivery is retried in the background",
                type="ReceiverUnavailable",
            ) from None
        if response.is_success:
            return response
        code = response.status_code
        answer = f"{code} {response.reason_phrase}: {self.scrub(response.text) or '(no body)'}"
        if code >= 500 or code in (408, 429):
            raise ApplicationError(
                f"{self.where} answered {answer}; delivery is retried in the background",
                type="ReceiverUnavailable",
                next_retry_delay=_retry_after(response),
            )
        raise ApplicationError(
            f"{self.where} rejected the message with {answer}; retrying cannot help: {self.fix}",
            type="ReceiverRejected",
            non_retryable=True,
        )


def _retry_after(response: httpx.Response) -> timedelta | None:
    """The wait a 429 or 503 asks for in seconds (capped), else the retry policy's own."""
    value = response.headers.get("retry-after", "")
    return timedelta(seconds=min(int(value), 300)) if value.isdigit() else None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class CommunicationActivities:
    """The incident's messages to chat, the status page and the pager; a receiver left
    unconfigured answers "not configured", which is a result, not a failure."""

    def __init__(
        self,
        state_dsn: str,
        *,
        chat: ChatWebhook | None = None,
        status_page: StatusPage | None = None,
        pager: PagerDuty | None = None,
    ) -> None:
        self.state_dsn = state_dsn
        self.chat = chat
        self.status_page = status_page
        self.pager = pager

    @classmethod
    def from_settings(cls, settings: Settings) -> CommunicationActivities:
        from runtime.settings import pairs

        status_page = None
        if settings.status_page_id is not None and settings.status_page_api_key is not None:
            status_page = StatusPage(
                api_url=settings.status_page_url.rstrip("/"),
                page_id=settings.status_page_id,
                api_key=settings.status_page_api_key,
                components=pairs(settings.status_page_components, "component:id")
                if settings.status_page_components
                else {},
            )
        keys = settings.pagerduty_routing_keys
        routing = pairs(keys.get_secret_value(), "rotation:key") if keys is not None else {}
        return cls(
            settings.state_dsn,
            chat=ChatWebhook(settings.chat_webhook_url) if settings.chat_webhook_url else None,
            status_page=status_page,
            pager=PagerDuty(
                events_url=settings.pagerduty_events_url.rstrip("/"),
                routing_keys={rotation: SecretStr(key) for rotation, key in routing.items()},
            ),
        )

    @activity.defn
    async def post_to_channel(self, req: ChatMessage) -> DeliveryResult:
        """Post to the incident channel, once per event."""
        if self.chat is None:
            return DeliveryResult(
                outcome=DeliveryOutcome.NOT_CONFIGURED,
                receiver="chat",
                detail="no incident channel: set ASTRA_OPS_CHAT_WEBHOOK_URL to post there",
            )
        url = self.chat.url.get_secret_value()
        scheme, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        receiver = _Receiver(
            f"the chat webhook at {scheme}://{host}/{MASK}",
            fix="check ASTRA_OPS_CHAT_WEBHOOK_URL and the channel it posts to",
            # A receiver may echo the path or just its key segment (Slack's is 24 characters).
            secrets=[url, path, *(s for s in path.split("/") if len(s) >= 16)],
        )
        body: dict[str, Any] = {"text": req.text}
        if req.blocks:
            body["blocks"] = req.blocks

        async def post(_: object = None) -> _Sent:
            response = await receiver.send("POST", url, body)
            return _Sent(response.status_code)

        return await self._once("chat", req, receiver, post, unledgered=post)

    @activity.defn
    async def update_status_page(self, req: StatusPageUpdate) -> DeliveryResult:
        """Create the incident on the status page, or update the one made for it before."""
        page = self.status_page
        if page is None:
            return DeliveryResult(
                outcome=DeliveryOutcome.NOT_CONFIGURED,
                receiver="status page",
                detail="no status page: set ASTRA_OPS_STATUS_PAGE_ID and "
                "ASTRA_OPS_STATUS_PAGE_API_KEY to update one",
            )
        incidents = f"{page.api_url}/v1/pages/{quote(page.page_id, safe='')}/incidents"
        key = page.api_key.get_secret_value()
        receiver = _Receiver(
            f"the status page at {incidents}",
            fix="check ASTRA_OPS_STATUS_PAGE_ID and ASTRA_OPS_STATUS_PAGE_API_KEY",
            secrets=[key],
        )
        shown = {page.components[c]: s for c, s in req.components.items() if c in page.components}
        incident: dict[str, Any] = {
            "name": req.name,
            "status": req.status,
            "body": req.body,
            "component_ids": list(shown),
            "components": shown,
            "deliver_notifications": True,
        }
        if req.impact is not None:
            incident["impact_override"] = req.impact
        headers = {"Authorization": f"OAuth {key}"}

        async def create_or_update(conn: psycopg.AsyncConnection[Any]) -> _Sent:
            row = await (
                await conn.execute(
                    "SELECT status_page_incident_id FROM astra_ops_status_page_incidents"
                    " WHERE incident_id = %s AND page_id = %s",
                    (req.incident_id, page.page_id),
                )
            ).fetchone()
            if row is not None:
                existing = str(row[0])
                response = await receiver.send(
                    "PATCH",
                    f"{incidents}/{quote(existing, safe='')}",
                    {"incident": incident},
                    headers,
                )
                return _Sent(response.status_code, existing)
            response = await receiver.send("POST", incidents, {"incident": incident}, headers)
            created = _json_object(response).get("id")
            if not isinstance(created, str) or not created:
                raise ApplicationError(
                    f"{receiver.where} created an incident but answered without its id, so "
                    "later updates could not reach it; check that the API is Statuspage v1",
                    type="ReceiverRejected",
                    non_retryable=True,
                )
            await conn.execute(
                "INSERT INTO astra_ops_status_page_incidents"
                " (incident_id, page_id, status_page_incident_id) VALUES (%s, %s, %s)",
                (req.incident_id, page.page_id, created),
            )
            return _Sent(response.status_code, created)

        result = await self._once("status page", req, receiver, create_or_update)
        left_out = sorted(set(req.components) - set(page.components))
        if left_out and result.outcome == DeliveryOutcome.DELIVERED:
            result.detail += f"; not on the status page: {', '.join(left_out)}"
        return result

    @activity.defn
    async def page(self, req: PageEvent) -> DeliveryResult:
        """Trigger, acknowledge or resolve a page for the rotation, once per event."""
        pager = self.pager
        routing_key = pager.routing_keys.get(req.rotation) if pager is not None else None
        if pager is None or routing_key is None:
            return DeliveryResult(
                outcome=DeliveryOutcome.NOT_CONFIGURED,
                receiver="pager",
                reference=req.dedup_key,
                detail=f"no PagerDuty routing key for {req.rotation}: add "
                f"'{req.rotation}:<integration key>' to ASTRA_OPS_PAGERDUTY_ROUTING_KEYS",
            )
        key = routing_key.get_secret_value()
        receiver = _Receiver(
            f"PagerDuty at {pager.events_url}/v2/enqueue",
            fix=f"check {req.rotation}'s routing key in ASTRA_OPS_PAGERDUTY_ROUTING_KEYS",
            secrets=[key],
        )
        event: dict[str, Any] = {
            "routing_key": key,
            "event_action": req.action,
            "dedup_key": req.dedup_key,
        }
        if req.action == "trigger":
            payload: dict[str, Any] = {
                "summary": req.summary,
                "source": req.source,
                "severity": req.severity,
                "custom_details": req.custom_details,
            }
            if req.component:
                payload["component"] = req.component
            event |= {"payload": payload, "client": "astra-ops"}

        async def enqueue(_: object = None) -> _Sent:
            response = await receiver.send("POST", f"{pager.events_url}/v2/enqueue", event)
            return _Sent(response.status_code, req.dedup_key)

        # PagerDuty dedups by the key itself: without the ledger a retry is still one page.
        return await self._once("pager", req, receiver, enqueue, unledgered=enqueue)

    async def _once(
        self,
        channel: Channel,
        req: Delivery,
        receiver: _Receiver,
        send: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_Sent]],
        *,
        unledgered: Callable[[], Awaitable[_Sent]] | None = None,
    ) -> DeliveryResult:
        """Run ``send`` unless this event was delivered to ``channel`` before; record the outcome.

        The lock is per channel and incident, not per event: it also keeps a status page's
        create-or-update from creating twice when two events of one incident race.

        The state database may be the one an incident is about (it defaults to Astra's own):
        while it cannot be reached, a channel given ``unledgered`` is sent to without the
        ledger, at the risk of a repeat, since a message that waits for the database may come
        too late to matter; the status page, which a repeat would give a second public
        incident, waits for it.
        """
        from psycopg import OperationalError

        async with heartbeating(f"delivering to the {channel}"):
            try:
                ledger = await connect(self.state_dsn, seconds=LEDGER_CONNECT_SECONDS)
            except OperationalError as err:
                why = receiver.scrub(str(err))
                if unledgered is None:
                    raise ApplicationError(
                        f"astra-ops's state database, which keeps the {channel}'s delivery "
                        f"ledger, cannot be reached ({why}); delivery is retried in the background",
                        type="LedgerUnavailable",
                    ) from None
                return await self._without_ledger(channel, req, receiver, unledgered, why)
            return await self._with_ledger(ledger, channel, req, receiver, send)

    async def _with_ledger(
        self,
        ledger: psycopg.AsyncConnection[Any],
        channel: Channel,
        req: Delivery,
        receiver: _Receiver,
        send: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_Sent]],
    ) -> DeliveryResult:
        from psycopg.errors import UndefinedTable

        key = (req.incident_id, channel, req.event_key)
        where = "WHERE incident_id = %s AND channel = %s AND event_key = %s"
        try:
            async with ledger as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))",
                    (f"astra-ops/{channel}/{req.incident_id}",),
                )
                await conn.execute(
                    "INSERT INTO astra_ops_deliveries (incident_id, channel, event_key)"
                    " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    key,
                )
                row = await (
                    await conn.execute(
                        "SELECT attempts, status_code, reference, delivered_at"
                        f" FROM astra_ops_deliveries {where}",
                        key,
                    )
                ).fetchone()
                assert row is not None  # claimed just above, under the lock
                attempts, status_code, reference, delivered_at = row
                if delivered_at is not None:
                    return DeliveryResult(
                        outcome=DeliveryOutcome.ALREADY_DELIVERED,
                        receiver=receiver.where,
                        status_code=status_code,
                        reference=reference,
                        attempts=attempts,
                        detail=f"'{req.event_key}' reached {channel} at "
                        f"{delivered_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC; not sent again",
                    )
                try:
                    sent = await send(conn)
                except ApplicationError as err:
                    notification_failed(activity.metric_meter(), channel)
                    await conn.execute(
                        "UPDATE astra_ops_deliveries SET attempts = attempts + 1,"
                        f" last_error = %s {where}",
                        (err.message, *key),
                    )
                    failure = err
                else:
                    await conn.execute(
                        "UPDATE astra_ops_deliveries SET attempts = attempts + 1,"
                        " status_code = %s, reference = %s, delivered_at = now(),"
                        f" last_error = NULL {where}",
                        (sent.status_code, sent.reference, *key),
                    )
                    return DeliveryResult(
                        outcome=DeliveryOutcome.DELIVERED,
                        receiver=receiver.where,
                        status_code=sent.status_code,
                        reference=sent.reference,
                        attempts=attempts + 1,
                        detail=f"'{req.event_key}' delivered to {channel}"
                        + (f" after {attempts} failed attempts" if attempts else ""),
                    )
        except UndefinedTable:
            # Retryable: once the migrations are applied, the waiting deliveries go out.
            raise ApplicationError(
                "astra-ops's state database has no delivery ledger (astra_ops_deliveries); "
                "apply astra-ops's state migrations to ASTRA_OPS_STATE_DATABASE_URL",
                type="LedgerMissing",
            ) from None
        raise failure  # after the commit, so the failed attempt stays counted

    async def _without_ledger(
        self,
        channel: Channel,
        req: Delivery,
        receiver: _Receiver,
        send: Callable[[], Awaitable[_Sent]],
        why: str,
    ) -> DeliveryResult:
        try:
            sent = await send()
        except ApplicationError:
            notification_failed(activity.metric_meter(), channel)
            raise
        activity.logger.warning(
            "delivered '%s' to %s without the ledger: the state database cannot be reached (%s)",
            req.event_key,
            channel,
            why,
        )
        return DeliveryResult(
            outcome=DeliveryOutcome.DELIVERED,
            receiver=receiver.where,
            status_code=sent.status_code,
            reference=sent.reference,
            attempts=1,
            detail=f"'{req.event_key}' delivered to {channel} without the delivery ledger (the "
            f"state database cannot be reached: {why}); a retry may deliver it again",
        )
