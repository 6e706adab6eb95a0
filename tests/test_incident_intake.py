"""The incident front doors over HTTP: Alertmanager's webhook and the incident routes, in-process
over ASGI against the real dev server, with a stand-in incident workflow (tests/incident_stub.py).

The notifications are what Debian's Alertmanager 0.25 posted for an AstraWorkerLost alert routed
by deploy/alertmanager/alertmanager.yml (tests/alertmanager/: firing, then resolved), each test
renaming the worker so that its alert group, and so its incident, is its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, get_args

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from runtime import search_attributes as sa
from runtime.identity import Act
from runtime.settings import REPO_ROOT, Settings
from starters.api import create_app
from starters.incidents import act_of, incident_from_alerts
from tests.conftest_kube import eventually
from tests.incident_stub import Received
from tests.test_api import ALERT_SENDERS, ALERTMANAGER, TOKENS, asgi, auth
from workflows.incident_models import (
    ActionKind,
    AlertNotification,
    Severity,
    incident_id_for_group,
)

RECORDED = REPO_ROOT / "tests" / "alertmanager"


def recorded(status: str, worker: str) -> dict[str, Any]:
    """A notification Alertmanager posted, about ``worker`` instead of astra-worker-7."""
    text = (RECORDED / f"{status}.json").read_text().replace("astra-worker-7", worker)
    payload: dict[str, Any] = json.loads(text)
    return payload


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def worker_name() -> str:
    return f"astra-worker-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_tokens": SecretStr(TOKENS), **ALERT_SENDERS})


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi(create_app(api_settings)) as http:
        yield http


async def received(client: Client, incident_id: str) -> Received:
    answer: Received = await client.get_workflow_handle(incident_id).query(
        "received", result_type=Received
    )
    return answer


async def runs_of(client: Client, incident_id: str) -> int:
    """How many executions the incident's workflow id has had."""
    return (await client.count_workflows(f"WorkflowId = '{incident_id}'")).count


async def never_started(client: Client, incident_id: str) -> bool:
    try:
        await client.get_workflow_handle(incident_id).describe()
    except RPCError as err:
        return err.status == RPCStatusCode.NOT_FOUND
    return False


async def test_a_notification_from_alertmanager_opens_one_signed_incident(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    payload = recorded("firing", worker_name)
    answer = await api.post("/v1/alerts/alertmanager", json=payload, headers=ALERTMANAGER)
    assert answer.status_code == 202, answer.text
    incident = incident_id_for_group(payload["groupKey"])
    assert answer.json() == {
        "incident_id": incident,
        "status": "firing",
        "delivered": True,
        "message": f"{incident} has the notification",
    }
    got = await received(client, incident)
    opened = got.opened
    assert opened.title == f"Worker {worker_name} has not heartbeat for 42s"
    assert (opened.severity, opened.components, opened.opened_by) == (
        Severity.SEV3,
        ["workers"],
        "alertmanager",
    )
    assert opened.notification is not None and opened.notification.group_key == payload["groupKey"]
    assert got.open_refusal is None  # signed by the API for exactly this opening
    # The notification that opened it also arrives as the signal, as every later one does.
    assert [n.status for n in got.notifications] == ["firing"]
    desc = await client.get_workflow_handle(incident).describe()
    attrs = desc.typed_search_attributes
    assert (attrs.get(sa.SEVERITY), attrs.get(sa.INCIDENT_ID)) == ("SEV3", incident)

    async def listed() -> bool:
        found = (await api.get("/v1/incidents", headers=auth("dave"))).json()
        return any(i["incident_id"] == incident for i in found)

    await eventually(listed, timeout=10, message="the incident is listed")


async def test_repeats_retries_and_concurrent_deliveries_open_one_incident(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    payload = recorded("firing", worker_name)
    incident = incident_id_for_group(payload["groupKey"])

    async def deliver() -> httpx.Response:
        return await api.post("/v1/alerts/alertmanager", json=payload, headers=ALERTMANAGER)

    concurrent = await asyncio.gather(*(deliver() for _ in range(20)))
    repeated = [await deliver() for _ in range(50)]
    for answer in [*concurrent, *repeated]:
        assert answer.status_code == 202, answer.text
        assert answer.json()["incident_id"] == incident
    # Concurrent deliveries each reach the one run (none knew of another); once one was
    # delivered, its repeats are answered by the intake and cost Temporal nothing.
    assert 1 <= len((await received(client, incident)).notifications) <= 20
    assert {a.json()["message"] for a in repeated} == {
        "a repeat: the incident has these alerts already"
    }
    # A change is delivered at once.
    changed = recorded("firing", worker_name)
    changed["alerts"][0]["annotations"]["summary"] += " (and counting)"
    before = len((await received(client, incident)).notifications)
    answer = await api.post("/v1/alerts/alertmanager", json=changed, headers=ALERTMANAGER)
    assert answer.json()["message"] == f"{incident} has the notification"
    assert len((await received(client, incident)).notifications) == before + 1

    async def visible() -> bool:
        return await runs_of(client, incident) >= 1

    await eventually(visible, timeout=10, message="the incident is visible")
    assert await runs_of(client, incident) == 1


async def test_a_resolved_notification_reaches_the_open_incident_and_opens_none(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    firing, resolved = recorded("firing", worker_name), recorded("resolved", worker_name)
    incident = incident_id_for_group(firing["groupKey"])
    assert (await api.post("/v1/alerts/alertmanager", json=firing, headers=ALERTMANAGER)).is_success
    answer = await api.post("/v1/alerts/alertmanager", json=resolved, headers=ALERTMANAGER)
    assert answer.status_code == 202, answer.text
    assert answer.json()["delivered"] is True
    notifications = (await received(client, incident)).notifications
    assert [n.status for n in notifications] == ["firing", "resolved"]
    assert notifications[-1].alerts[0].ends_at is not None

    other = recorded("resolved", f"{worker_name}-gone")
    answer = await api.post("/v1/alerts/alertmanager", json=other, headers=ALERTMANAGER)
    assert answer.status_code == 202, answer.text
    assert answer.json()["delivered"] is False
    assert "no open incident" in answer.json()["message"]
    assert await never_started(client, incident_id_for_group(other["groupKey"]))


async def test_a_malformed_notification_is_refused_naming_the_field_and_starts_nothing(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    good = recorded("firing", worker_name)
    incident = incident_id_for_group(good["groupKey"])
    alert = good["alerts"][0]
    cases: list[tuple[Any, str]] = [
        ({**good, "version": "3"}, "body.version: Input should be '4'"),
        ({**good, "status": "burning"}, "body.status"),
        ({**good, "alerts": []}, "body.alerts: List should have at least 1 item"),
        ({**good, "alerts": [{**alert, "startsAt": "yesterday"}]}, "body.alerts.0.startsAt"),
        ({**good, "alerts": [{k: v for k, v in alert.items() if k != "fingerprint"}]},
         "body.alerts.0.fingerprint: Field required"),
        ({**good, "alerts": [{**alert, "labels": "x"}]}, "body.alerts.0.labels"),
        ({**good, "groupKey": ""}, "body.groupKey"),
        ({k: v for k, v in good.items() if k != "groupKey"}, "body.groupKey: Field required"),
        ([good], "body: Input should be a valid dictionary"),
    ]  # fmt: skip
    for body, needle in cases:
        answer = await api.post("/v1/alerts/alertmanager", json=body, headers=ALERTMANAGER)
        assert answer.status_code == 422, (needle, answer.text)
        assert needle in answer.json()["error"]["message"], answer.text
    junk = await api.post(
        "/v1/alerts/alertmanager",
        content=b"{not json",
        headers={**ALERTMANAGER, "content-type": "application/json"},
    )
    assert junk.status_code == 422 and "JSON" in junk.json()["error"]["message"]
    assert await never_started(client, incident)


async def test_only_the_configured_sender_may_post_alerts(
    api: httpx.AsyncClient,
    api_settings: Settings,
    client: Client,
    incident_stub: Worker,
    worker_name: str,
) -> None:
    payload = recorded("firing", worker_name)
    incident = incident_id_for_group(payload["groupKey"])
    for headers, needle in [
        ({}, "send Authorization: Bearer"),
        ({"Authorization": "Bearer wrong"}, "unknown alert sender credentials"),
        (auth("alice"), "unknown alert sender credentials"),  # a person's API token
        (basic("alertmanager", "wrong"), "unknown alert sender credentials"),
        (basic("mallory", "am-password"), "unknown alert sender credentials"),
        ({"Authorization": "Basic !!!"}, "unknown alert sender credentials"),
        ({"Authorization": "Token am-token"}, "send Authorization: Bearer"),
    ]:
        answer = await api.post("/v1/alerts/alertmanager", json=payload, headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert needle in answer.json()["error"]["message"], answer.text
        assert "Basic" in answer.headers["www-authenticate"]
    assert await never_started(client, incident)

    # Nobody may post alerts to an API that names no sender.
    closed = api_settings.model_copy(
        update={"alertmanager_tokens": None, "alertmanager_basic_auth": None}
    )
    async with asgi(create_app(closed)) as shut:
        answer = await shut.post("/v1/alerts/alertmanager", json=payload, headers=ALERTMANAGER)
        assert answer.status_code == 401
        assert "ASTRA_OPS_ALERTMANAGER_TOKENS" in answer.json()["error"]["message"]
    assert await never_started(client, incident)

    answer = await api.post(
        "/v1/alerts/alertmanager", json=payload, headers=basic("alertmanager", "am-password")
    )
    assert answer.status_code == 202, answer.text
    assert (await received(client, incident)).opened.opened_by == "alertmanager"


def test_an_alert_group_becomes_an_incident_as_severe_as_its_worst_alert() -> None:
    payload = recorded("firing", "w-1")
    first = payload["alerts"][0]
    second = {
        **first,
        "fingerprint": "2",
        "labels": {**first["labels"], "severity": "sev1", "component": "scheduler"},
    }
    third = {**first, "fingerprint": "3", "labels": {**first["labels"], "severity": "critical"}}
    group = AlertNotification.model_validate(
        {
            **payload,
            "alerts": [first, second, third],
            "commonLabels": {"alertname": "AstraWorkerLost"},
            "commonAnnotations": {"description": "lost\r\nfor a while\x00"},
        }
    )
    opened = incident_from_alerts(group, "alertmanager")
    assert opened.severity == Severity.SEV1  # the worst of SEV3, sev1 and a non-SEV label
    assert opened.title == "AstraWorkerLost"  # no common summary: the alert's name
    assert opened.components == ["scheduler", "workers"]
    assert opened.reason == "lost \nfor a while"
    plain = group.model_copy(
        update={"alerts": group.alerts[2:], "common_annotations": {"summary": "x" * 999}}
    )
    opened = incident_from_alerts(plain, "alertmanager")
    assert opened.severity == Severity.SEV3 and len(opened.title) == 300


async def test_a_person_opens_an_incident_once_per_idempotency_key(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker
) -> None:
    key = f"bridge-call-{uuid.uuid4().hex[:8]}"
    body = {"title": "task failures at 9%", "severity": "SEV2", "components": ["tasks"]}
    headers = {**auth("alice"), "Idempotency-Key": key}
    first = await api.post("/v1/incidents", json=body, headers=headers)
    again = await api.post("/v1/incidents", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
    incident = first.json()["incident_id"]
    assert again.json() == {"incident_id": incident, "existing": True}
    got = await received(client, incident)
    assert (got.opened.opened_by, got.opened.severity, got.open_refusal) == ("alice", "SEV2", None)
    for reused in (
        await api.post("/v1/incidents", json={**body, "severity": "SEV1"}, headers=headers),
        await api.post("/v1/incidents", json=body, headers={**auth("bob"), "Idempotency-Key": key}),
    ):
        assert reused.status_code == 422, reused.text
        assert "Idempotency-Key was used for another request" in reused.text
    without_key = [
        (await api.post("/v1/incidents", json=body, headers=auth("bob"))).json()["incident_id"]
        for _ in range(2)
    ]
    assert len({incident, *without_key}) == 3

    for bad, needle in [
        ({**body, "severity": "SEV4"}, "body.severity"),
        ({**body, "title": ""}, "body.title"),
        ({**body, "opened_by": "bob"}, "body.opened_by: Extra inputs are not permitted"),
    ]:
        refused = await api.post("/v1/incidents", json=bad, headers=auth("alice"))
        assert refused.status_code == 422 and needle in refused.text, refused.text
    stranger = await api.post("/v1/incidents", json=body, headers=auth("mallory"))
    assert stranger.status_code == 403


async def test_actions_are_signed_updates_and_each_refusal_has_its_status(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    payload = recorded("firing", worker_name)
    opened = await api.post("/v1/alerts/alertmanager", json=payload, headers=ALERTMANAGER)
    incident = opened.json()["incident_id"]
    bare = incident.removeprefix("incident/")  # as people may copy it

    async def shown() -> bool:
        """People act on an incident they have seen: once it has begun, not in the moment its
        start is still queued (the stub would take an early action before its opening)."""
        view = (await api.get(f"/v1/incidents/{bare}", headers=auth("dave"))).json()
        timeline = (view.get("incident") or {}).get("timeline", [])
        return any(entry["kind"] == "opened" for entry in timeline)

    await eventually(shown, timeout=20, message="the incident has opened")

    async def act(kind: str, user: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await api.post(
            f"/v1/incidents/{bare}/actions/{kind}", json=body or {}, headers=auth(user)
        )

    acked = await act("acknowledge", "carol")
    assert acked.status_code == 200 and acked.json() == {"message": "acknowledge by carol"}
    for answer, status, needle in [
        (await act("acknowledge", "erin"), 409, "already acknowledged by carol"),
        (await act("severity", "alice", {"text": "all pools"}), 422,
         "severity: required to severity"),
        (await act("severity", "dave", {"severity": "SEV1", "text": "x"}), 403,
         "dave may not severity: in no rotation"),
        (await act("explode", "alice"), 422, "kind"),
        (await act("note", "alice", {"text": "x", "actor": "bob"}), 422, "body.actor"),
        (await api.post("/v1/incidents/nope/actions/note", json={"text": "x"},
                        headers=auth("alice")), 404, "no incident 'incident/nope'"),
        (await act("note", "mallory", {"text": "x"}), 403, "access policy"),
    ]:  # fmt: skip
        assert answer.status_code == status, (needle, answer.text)
        assert needle in answer.json()["error"]["message"], answer.text
    changed = await act("severity", "alice", {"severity": "SEV1", "text": "every pool"})
    assert changed.status_code == 200, changed.text
    assert (await act("note", "bob", {"text": "replica lag back to 0"})).status_code == 200

    view = (await api.get(f"/v1/incidents/{bare}", headers=auth("dave"))).json()
    assert (view["incident_id"], view["severity"], view["state"]) == (incident, "SEV1", "running")
    timeline = [(e["kind"], e["actor"], e["text"]) for e in view["incident"]["timeline"]]
    # Signal-with-start hands the workflow its first signal before its run method begins.
    assert sorted(timeline[:2]) == [
        ("alert", "", "firing: 1 alert(s)"),
        ("opened", "alertmanager", f"Worker {worker_name} has not heartbeat for 42s"),
    ]
    assert timeline[2:] == [
        ("acknowledge", "carol", ""),
        ("severity", "alice", "every pool"),
        ("note", "bob", "replica lag back to 0"),
    ]
    assert view["incident"]["alerts"][0]["startsAt"]  # Alertmanager's own field names
    actions = (await received(client, incident)).actions
    assert [(a.kind.value, a.action.actor) for a in actions] == [
        ("acknowledge", "carol"),
        ("severity", "alice"),
        ("note", "bob"),
    ]


async def test_a_closed_incident_takes_no_action_and_its_group_may_open_a_new_one(
    api: httpx.AsyncClient, client: Client, incident_stub: Worker, worker_name: str
) -> None:
    firing = recorded("firing", worker_name)
    incident = incident_id_for_group(firing["groupKey"])
    assert (await api.post("/v1/alerts/alertmanager", json=firing, headers=ALERTMANAGER)).is_success
    resolve = await api.post(
        f"/v1/incidents/{incident}/actions/resolve", json={}, headers=auth("alice")
    )
    assert resolve.status_code == 200, resolve.text
    await client.get_workflow_handle(incident).result()

    late = await api.post(
        f"/v1/incidents/{incident}/actions/note", json={"text": "x"}, headers=auth("alice")
    )
    assert late.status_code == 409 and "is completed" in late.json()["error"]["message"]
    view = (await api.get(f"/v1/incidents/{incident}", headers=auth("dave"))).json()
    assert (view["state"], view["incident"]["stage"]) == ("completed", "closed")
    resolved = recorded("resolved", worker_name)
    answer = await api.post("/v1/alerts/alertmanager", json=resolved, headers=ALERTMANAGER)
    assert answer.json()["delivered"] is False

    # The group fires again (a new alert: Prometheus starts it anew): a new incident under the
    # group's id.
    firing["alerts"][0]["startsAt"] = "2026-11-28T11:02:00Z"
    again = await api.post("/v1/alerts/alertmanager", json=firing, headers=ALERTMANAGER)
    assert again.status_code == 202
    desc = await client.get_workflow_handle(incident).describe()
    assert desc.status == WorkflowExecutionStatus.RUNNING

    async def both() -> bool:
        return await runs_of(client, incident) == 2

    await eventually(both, timeout=10, message="the group's second incident is visible")


def test_every_action_is_signed_as_an_act_the_statement_knows() -> None:
    assert {act_of(kind) for kind in ActionKind} <= set(get_args(Act))


async def test_alertmanager_is_told_to_retry_while_temporal_is_down(
    api_settings: Settings, worker_name: str
) -> None:
    dead = api_settings.model_copy(update={"temporal_address": "127.0.0.1:1"})
    async with asgi(create_app(dead)) as api:
        answer = await api.post(
            "/v1/alerts/alertmanager", json=recorded("firing", worker_name), headers=ALERTMANAGER
        )
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "Temporal is not reachable" in answer.json()["error"]["message"]
