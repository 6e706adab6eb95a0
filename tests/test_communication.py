"""The incident's communication adapters against local receivers and the real PostgreSQL: what
each protocol receives, that an event reaches each receiver once however often it is retried,
and that an outage is retried while a rejection is not, with no credential in any message."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.communication import (
    ChatMessage,
    ChatWebhook,
    CommunicationActivities,
    DeliveryOutcome,
    DeliveryResult,
    PageEvent,
    StatusPageUpdate,
)
from activities.mutation import MutationResult
from activities.notify import NotifyActivities, RotationNotice
from activities.postgres import connect
from runtime.redact import redact_logs
from runtime.settings import REPO_ROOT, Settings, SettingsError, load_settings
from sandbox.servers.process import free_port
from tests.conftest_data import NewDatabase
from tests.delivery_probe import DeliveryProbe, ProbeMessages
from tests.receivers import Receiver
from tests.stubs import POLICY
from workers.worker import workflow_options

CANARY = f"CANARY{uuid.uuid4().hex}"
"""In every credential: the webhook's path, the status page key, the routing key."""
LEDGER = REPO_ROOT / "runtime" / "migrations" / "state" / "0002_astra_ops_deliveries.sql"
INCIDENT = "incident/5d0c2f9e"
PAGE_ID = "astrastatus01"
DELIVERED, ALREADY = DeliveryOutcome.DELIVERED, DeliveryOutcome.ALREADY_DELIVERED


@pytest.fixture
async def ledger(pg_dsn: str) -> str:
    """A state database with the delivery ledger."""
    async with await connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(LEDGER.read_text().encode())
    return pg_dsn


@pytest.fixture
def comms_settings(
    ledger: str, chat_receiver: Receiver, status_page_receiver: Receiver, pager_receiver: Receiver
) -> Settings:
    return Settings(
        state_database_url=ledger,
        chat_webhook_url=SecretStr(f"{chat_receiver.url}/services/T000/B000/{CANARY}"),
        status_page_url=status_page_receiver.url,
        status_page_id=PAGE_ID,
        status_page_api_key=SecretStr(f"key-{CANARY}"),
        status_page_components="scheduler:cmpsched,gateway:cmpgate",
        pagerduty_events_url=pager_receiver.url,
        pagerduty_routing_keys=SecretStr(f"kernel-sre:R{CANARY},agent-platform:Rother"),
    )


@pytest.fixture
def comms(comms_settings: Settings) -> CommunicationActivities:
    return CommunicationActivities.from_settings(comms_settings)


@pytest.fixture
def env() -> ActivityEnvironment:
    redact_logs()  # as every worker does: httpx logs each request's URL, the webhook's key
    return ActivityEnvironment()


def chat_message(event_key: str = "opened") -> ChatMessage:
    return ChatMessage(
        incident_id=INCIDENT, event_key=event_key, text="SEV2 opened: Redis replica lost"
    )


def status_update(event_key: str = "opened") -> StatusPageUpdate:
    return StatusPageUpdate(
        incident_id=INCIDENT,
        event_key=event_key,
        name="Tasks are delayed",
        status="investigating",
        body="We are investigating delayed tasks.",
        impact="major",
        components={"scheduler": "partial_outage", "state-manager": "major_outage"},
    )


def page_event(event_key: str = "page:primary") -> PageEvent:
    return PageEvent(
        incident_id=INCIDENT,
        event_key=event_key,
        action="trigger",
        rotation="kernel-sre",
        target="primary",
        summary="SEV1: Postgres primary unreachable",
        component="postgres",
        custom_details={"runbook": "postgres-outage", "stage": "triage"},
    )


Send = Callable[[], Awaitable[DeliveryResult]]


def sending(
    channel: str,
    env: ActivityEnvironment,
    comms: CommunicationActivities,
    receivers: list[Receiver],
) -> tuple[Receiver, Send]:
    """The receiver of ``channel``, and a call that sends it one message."""
    chat, status_page, pager = receivers
    if channel == "chat":
        return chat, lambda: env.run(comms.post_to_channel, chat_message())
    if channel == "status page":
        return status_page, lambda: env.run(comms.update_status_page, status_update())
    return pager, lambda: env.run(comms.page, page_event())


async def retried(send: Send, limit: int = 10) -> tuple[list[ApplicationError], DeliveryResult]:
    """Send as Temporal retries an activity: again after every retryable failure."""
    failures: list[ApplicationError] = []
    for _ in range(limit):
        try:
            return failures, await send()
        except ApplicationError as err:
            assert not err.non_retryable, err.message
            failures.append(err)
    raise AssertionError(f"not delivered in {limit} attempts: {failures[-1].message}")


CHANNELS = ["chat", "status page", "pager"]


@pytest.fixture
def receivers(
    chat_receiver: Receiver, status_page_receiver: Receiver, pager_receiver: Receiver
) -> list[Receiver]:
    return [chat_receiver, status_page_receiver, pager_receiver]


async def test_chat_message_is_a_slack_webhook_post(
    env: ActivityEnvironment, comms: CommunicationActivities, chat_receiver: Receiver
) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*SEV2* Redis replica"}}]
    message = chat_message().model_copy(update={"blocks": blocks})

    result = await env.run(comms.post_to_channel, message)

    [request] = chat_receiver.requests
    assert (request.method, request.path) == ("POST", f"/services/T000/B000/{CANARY}")
    assert request.headers["content-type"] == "application/json"
    assert request.body == {"text": "SEV2 opened: Redis replica lost", "blocks": blocks}
    assert (result.outcome, result.status_code) == (DELIVERED, 200)
    assert result.receiver == f"the chat webhook at {chat_receiver.url}/***"


async def test_one_event_posts_once_however_often_and_concurrently_sent(
    env: ActivityEnvironment, comms: CommunicationActivities, chat_receiver: Receiver
) -> None:
    results = await asyncio.gather(
        *(env.run(comms.post_to_channel, chat_message()) for _ in range(5))
    )
    again = await env.run(comms.post_to_channel, chat_message())
    other = await env.run(comms.post_to_channel, chat_message("stage:contain"))

    assert Counter(r.outcome for r in results) == {DELIVERED: 1, ALREADY: 4}
    assert again.outcome == ALREADY and again.status_code == 200
    assert "'opened' reached chat at" in again.detail
    assert other.outcome == DELIVERED
    assert len(chat_receiver.requests) == 2


async def test_status_page_create_then_update_is_one_incident(
    env: ActivityEnvironment, comms: CommunicationActivities, status_page_receiver: Receiver
) -> None:
    created = await env.run(comms.update_status_page, status_update())
    repeated = await env.run(comms.update_status_page, status_update())
    identified = status_update("stage:contain").model_copy(
        update={
            "status": "identified",
            "body": "The scheduler lost its leader; failing over.",
            "components": {"scheduler": "degraded_performance"},
        }
    )
    updated = await env.run(comms.update_status_page, identified)

    post, patch = status_page_receiver.requests
    assert (post.method, post.path) == ("POST", f"/v1/pages/{PAGE_ID}/incidents")
    assert post.headers["authorization"] == f"OAuth key-{CANARY}"
    assert post.body == {
        "incident": {
            "name": "Tasks are delayed",
            "status": "investigating",
            "body": "We are investigating delayed tasks.",
            "impact_override": "major",
            "component_ids": ["cmpsched"],
            "components": {"cmpsched": "partial_outage"},
            "deliver_notifications": True,
        }
    }
    assert (patch.method, patch.path) == (
        "PATCH",
        f"/v1/pages/{PAGE_ID}/incidents/{created.reference}",
    )
    assert patch.body["incident"]["status"] == "identified"
    assert patch.body["incident"]["components"] == {"cmpsched": "degraded_performance"}
    assert (created.outcome, created.status_code) == (DELIVERED, 201)
    assert "not on the status page: state-manager" in created.detail
    assert (repeated.outcome, repeated.reference) == (ALREADY, created.reference)
    assert (updated.outcome, updated.status_code) == (DELIVERED, 200)
    assert updated.reference == created.reference


async def test_racing_events_of_a_new_incident_create_one_status_page_incident(
    env: ActivityEnvironment, comms: CommunicationActivities, status_page_receiver: Receiver
) -> None:
    events = [status_update(f"event-{n}") for n in range(4)]
    results = await asyncio.gather(*(env.run(comms.update_status_page, e) for e in events))

    assert sorted(r.method for r in status_page_receiver.requests) == ["PATCH"] * 3 + ["POST"]
    assert len({r.reference for r in results}) == 1


async def test_status_page_outage_during_create_still_makes_one_incident(
    env: ActivityEnvironment, comms: CommunicationActivities, status_page_receiver: Receiver
) -> None:
    status_page_receiver.fail_next(2)
    failures, created = await retried(lambda: env.run(comms.update_status_page, status_update()))
    await env.run(comms.update_status_page, status_update("stage:contain"))

    assert len(failures) == 2 and created.attempts == 3
    assert "after 2 failed attempts" in created.detail
    assert [(r.method, r.status) for r in status_page_receiver.requests] == [
        ("POST", 503),
        ("POST", 503),
        ("POST", 201),
        ("PATCH", 200),
    ]
    assert status_page_receiver.requests[-1].path.endswith(f"/{created.reference}")


async def test_pages_share_a_dedup_key_per_incident_and_target(
    env: ActivityEnvironment, comms: CommunicationActivities, pager_receiver: Receiver
) -> None:
    trigger = page_event()
    await env.run(comms.page, trigger)
    retried_trigger = await env.run(comms.page, trigger)
    for event_key, action in [("ack:primary", "acknowledge"), ("resolve:primary", "resolve")]:
        await env.run(
            comms.page, trigger.model_copy(update={"event_key": event_key, "action": action})
        )
    secondary = trigger.model_copy(update={"event_key": "page:secondary", "target": "secondary"})
    await env.run(comms.page, secondary)

    assert retried_trigger.outcome == ALREADY
    assert {r.path for r in pager_receiver.requests} == {"/v2/enqueue"}
    first, ack, resolve, second = (r.body for r in pager_receiver.requests)
    assert first == {
        "routing_key": f"R{CANARY}",
        "event_action": "trigger",
        "dedup_key": f"{INCIDENT}/primary",
        "payload": {
            "summary": "SEV1: Postgres primary unreachable",
            "source": "astra-ops",
            "severity": "critical",
            "component": "postgres",
            "custom_details": {"runbook": "postgres-outage", "stage": "triage"},
        },
        "client": "astra-ops",
    }
    key = {"routing_key": f"R{CANARY}", "dedup_key": f"{INCIDENT}/primary"}
    assert ack == {**key, "event_action": "acknowledge"}
    assert resolve == {**key, "event_action": "resolve"}
    assert second["dedup_key"] == f"{INCIDENT}/secondary"


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (403, False), (408, True), (429, True), (503, True)]
)
async def test_failure_says_whether_to_retry_and_quotes_no_credential(
    env: ActivityEnvironment,
    comms: CommunicationActivities,
    receivers: list[Receiver],
    channel: str,
    status: int,
    retryable: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, send = sending(channel, env, comms, receivers)
    receiver.fail_next(1, status)

    with pytest.raises(ApplicationError) as raised:
        await send()

    err = raised.value
    assert CANARY in str(receiver.requests[0])  # the credential was sent, and echoed back
    assert err.non_retryable is not retryable
    assert err.type == ("ReceiverUnavailable" if retryable else "ReceiverRejected")
    assert f"{status} " in err.message and "cannot take POST" in err.message
    what_next = "retried in the background" if retryable else "retrying cannot help: check"
    assert what_next in err.message
    assert CANARY not in err.message
    assert CANARY not in caplog.text


async def test_receiver_down_then_up_delivers_once(
    env: ActivityEnvironment,
    comms: CommunicationActivities,
    receivers: list[Receiver],
) -> None:
    for channel in CHANNELS:
        receiver, send = sending(channel, env, comms, receivers)
        receiver.fail_next(3)

        failures, result = await retried(send)

        assert len(failures) == 3, channel
        assert (result.outcome, result.attempts) == (DELIVERED, 4)
        assert len(receiver.accepted) == 1 and len(receiver.requests) == 4
        assert (await send()).outcome == ALREADY
        assert len(receiver.requests) == 4


async def test_retry_after_sets_the_next_attempt(
    env: ActivityEnvironment, comms: CommunicationActivities, pager_receiver: Receiver
) -> None:
    pager_receiver.fail_next(1, 429, retry_after=7)
    with pytest.raises(ApplicationError) as raised:
        await env.run(comms.page, page_event())
    assert raised.value.next_retry_delay == timedelta(seconds=7)


async def test_unreachable_receiver_is_retried(
    env: ActivityEnvironment, ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}/services/T000/B000/{CANARY}"
    comms = CommunicationActivities(ledger, chat=ChatWebhook(SecretStr(url)))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(ApplicationError) as raised:
        await env.run(comms.post_to_channel, chat_message())

    assert not raised.value.non_retryable
    assert raised.value.message == (
        f"the chat webhook at http://127.0.0.1:{port}/*** could not be reached (ConnectError); "
        "delivery is retried in the background"
    )
    assert CANARY not in caplog.text


async def test_unconfigured_receivers_are_a_result_not_an_error(
    env: ActivityEnvironment,
    ledger: str,
    comms: CommunicationActivities,
    receivers: list[Receiver],
) -> None:
    bare = CommunicationActivities.from_settings(Settings(state_database_url=ledger))
    results = [
        await env.run(bare.post_to_channel, chat_message()),
        await env.run(bare.update_status_page, status_update()),
        await env.run(bare.page, page_event()),
        await env.run(comms.page, page_event().model_copy(update={"rotation": "security"})),
    ]

    assert {r.outcome for r in results} == {DeliveryOutcome.NOT_CONFIGURED}
    assert "set ASTRA_OPS_CHAT_WEBHOOK_URL" in results[0].detail
    assert "set ASTRA_OPS_STATUS_PAGE_ID and ASTRA_OPS_STATUS_PAGE_API_KEY" in results[1].detail
    assert "no PagerDuty routing key for kernel-sre" in results[2].detail
    assert "add 'security:<integration key>' to ASTRA_OPS_PAGERDUTY_ROUTING_KEYS" in (
        results[3].detail
    )
    assert all(not r.requests for r in receivers)


async def test_without_the_ledger_nothing_is_sent(
    env: ActivityEnvironment, new_database: NewDatabase, chat_receiver: Receiver
) -> None:
    url = SecretStr(f"{chat_receiver.url}/services/T000/B000/{CANARY}")
    # A database astra-ops's migrations never reached.
    comms = CommunicationActivities(await new_database(), chat=ChatWebhook(url))

    with pytest.raises(ApplicationError, match="apply astra-ops's state migrations") as raised:
        await env.run(comms.post_to_channel, chat_message())

    assert not raised.value.non_retryable  # delivered once the migrations are applied
    assert chat_receiver.requests == []


async def test_with_the_state_database_down_chat_and_pager_still_go_and_the_status_page_waits(
    env: ActivityEnvironment,
    comms_settings: Settings,
    receivers: list[Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The state database may be Astra's own PostgreSQL, down in the outage being handled.
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/astra_state"
    comms = CommunicationActivities.from_settings(
        comms_settings.model_copy(update={"state_database_url": down})
    )
    chat, status_page, pager = receivers
    caplog.set_level(logging.DEBUG)

    told = await env.run(comms.post_to_channel, chat_message())
    paged = await env.run(comms.page, page_event())
    with pytest.raises(ApplicationError) as waiting:
        await env.run(comms.update_status_page, status_update())

    for result in (told, paged):
        assert result.outcome == DELIVERED, result
        assert "without the delivery ledger (the state database cannot be reached" in result.detail
        assert "a retry may deliver it again" in result.detail
    assert len(chat.requests) == len(pager.requests) == 1
    assert pager.requests[0].body["dedup_key"] == f"{INCIDENT}/primary"
    err = waiting.value
    assert (err.type, err.non_retryable) == ("LedgerUnavailable", False)
    assert "delivery is retried in the background" in err.message
    assert status_page.requests == []
    assert CANARY not in caplog.text


def in_activity(env: ActivityEnvironment, run_id: str, activity_id: str) -> ActivityEnvironment:
    """``env`` as one attempt of activity ``activity_id`` of a run of llm-cost-spike."""
    env.info = dataclasses.replace(
        env.info,
        workflow_id="llm-cost-spike/astra/coder-1",
        workflow_run_id=run_id,
        activity_id=activity_id,
        workflow_type="LlmCostSpike",
    )
    return env


async def test_a_runbook_notice_retried_after_its_worker_died_posts_once(
    env: ActivityEnvironment, comms: CommunicationActivities, chat_receiver: Receiver
) -> None:
    notify = NotifyActivities(POLICY, comms)
    notice = RotationNotice(rotation="agent-platform", text="Budget guard on coder-1")
    run = str(uuid.uuid4())

    # The first attempt posted and its worker died before reporting; Temporal retries it.
    first = await in_activity(env, run, "7").run(notify.notify_rotation, notice)
    retry = await in_activity(env, run, "7").run(notify.notify_rotation, notice)
    # Another notice step of the run, and the same step in a later run, are new messages.
    other_step = await in_activity(env, run, "9").run(notify.notify_rotation, notice)
    next_run = await in_activity(env, str(uuid.uuid4()), "7").run(notify.notify_rotation, notice)

    told = MutationResult(changed=True, detail="told agent-platform (carol, erin)")
    assert [first, retry, other_step, next_run] == [told] * 4
    assert len(chat_receiver.requests) == 3
    assert chat_receiver.requests[0].body == {
        "text": "[agent-platform: carol, erin] Budget guard on coder-1"
    }


async def test_an_approval_notice_that_fails_is_reported_not_raised(
    env: ActivityEnvironment,
    comms: CommunicationActivities,
    chat_receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    notify = NotifyActivities(POLICY, comms)
    chat_receiver.fail_next(1, 404)
    caplog.set_level(logging.DEBUG)

    posted, detail = await in_activity(env, "run-1", "3").run(notify.tell, "Approval needed")

    assert not posted
    assert detail.startswith(f"the chat webhook at {chat_receiver.url}/*** rejected the message")
    assert CANARY not in detail and CANARY not in caplog.text


async def test_a_runbook_notice_the_chat_refuses_fails_without_retrying(
    env: ActivityEnvironment, comms: CommunicationActivities, chat_receiver: Receiver
) -> None:
    notify = NotifyActivities(POLICY, comms)
    notice = RotationNotice(rotation="agent-platform", text="Budget guard on coder-1")
    chat_receiver.fail_next(1, 403)

    with pytest.raises(ApplicationError) as raised:
        await in_activity(env, "run-2", "4").run(notify.notify_rotation, notice)

    assert raised.value.non_retryable and raised.value.type == "ReceiverRejected"
    assert raised.value.message.startswith("could not tell agent-platform: the chat webhook at")
    assert CANARY not in raised.value.message


def test_receiver_settings_fail_at_start_without_quoting_keys() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(pagerduty_routing_keys=f"kernel-sre:R{CANARY},agent-platform")
    assert "ASTRA_OPS_PAGERDUTY_ROUTING_KEYS: Value error, entry 2 is not 'rotation:key'" in str(
        raised.value
    )
    assert CANARY not in str(raised.value)
    with pytest.raises(SettingsError, match="STATUS_PAGE_ID and ASTRA_OPS_STATUS_PAGE_API_KEY go"):
        load_settings(status_page_api_key=CANARY)


async def test_temporal_retries_an_outage_and_each_receiver_gets_each_message_once(
    client: Client,
    task_queue: str,
    comms: CommunicationActivities,
    receivers: list[Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redact_logs()
    caplog.set_level(logging.INFO)
    chat, status_page, pager = receivers
    chat.fail_next(3)
    status_page.fail_for(1.0)
    pager.fail_next(2, 429)
    messages = ProbeMessages(chat=chat_message(), status=status_update(), page=page_event())

    options = workflow_options()
    options["workflows"] = [DeliveryProbe]
    async with Worker(
        client,
        task_queue=task_queue,
        activities=[comms.post_to_channel, comms.update_status_page, comms.page],
        **options,
    ):
        first = await client.start_workflow(
            DeliveryProbe.run, messages, id=f"delivery-probe/{uuid.uuid4()}", task_queue=task_queue
        )
        done = await first.result()
        again = await client.execute_workflow(
            DeliveryProbe.run, messages, id=f"delivery-probe/{uuid.uuid4()}", task_queue=task_queue
        )

    assert (done.chat.outcome, done.chat.attempts) == (DELIVERED, 4)
    assert done.status.outcome == DELIVERED and done.status.attempts >= 2
    assert (done.page.outcome, done.page.attempts) == (DELIVERED, 3)
    assert {again.chat.outcome, again.status.outcome, again.page.outcome} == {ALREADY}
    assert [len(r.accepted) for r in receivers] == [1, 1, 1]

    # Temporal ran the retries: the chat activity's last start was its fourth attempt, and the
    # failure it recorded names the receiver without its URL.
    events = (await first.fetch_history()).events
    types = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name for e in events
    }
    [chat_start] = [
        e.activity_task_started_event_attributes
        for e in events
        if e.HasField("activity_task_started_event_attributes")
        and types[e.activity_task_started_event_attributes.scheduled_event_id] == "post_to_channel"
    ]
    assert chat_start.attempt == 4
    recorded = await client.data_converter.decode_failure(chat_start.last_failure)
    assert f"the chat webhook at {chat.url}/*** answered 503" in str(recorded)
    assert CANARY not in str(recorded)
    assert CANARY not in caplog.text
