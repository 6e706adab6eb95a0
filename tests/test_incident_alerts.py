"""Later notifications of an incident's alert group: new alerts and resolutions reach the
timeline once however often Alertmanager repeats them, and only the alert sender's count."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType

from tests.conftest_incident import Desk, incident_worker, kinds, notification, settled, state
from workflows.incident_models import Severity, Stage

GROUP = '{}:{alertname="AstraHighErrorRate"}'


def error_rate(status: str = "firing", shard: str = "1") -> dict[str, object]:
    return {
        "fingerprint": f"fp-shard-{shard}",
        "status": status,
        "labels": {"alertname": "AstraHighErrorRate", "severity": "SEV2", "shard": shard},
        "annotations": {"summary": f"7% of task outcomes failed on shard {shard}"},
    }


async def test_repeats_change_nothing_and_the_group_resolving_contains_the_incident(
    desk: Desk,
) -> None:
    first = notification(GROUP, error_rate())
    async with incident_worker(desk):
        handle = await desk.open(
            "High error rate", Severity.SEV2, opened_by="alertmanager", notification=first
        )
        for _ in range(5):
            await desk.alert(handle, first)
        await desk.alert(handle, notification(GROUP, error_rate(), error_rate(shard="2")))
        both = await desk.until(handle, lambda s: s.firing == 2, "two alerts firing")
        await desk.alert(
            handle,
            notification(
                GROUP,
                error_rate("resolved"),
                error_rate("resolved", shard="2"),
                status="resolved",
            ),
        )
        resolved = await desk.until(handle, lambda s: s.stage == Stage.CONTAIN, "contained")

    assert [e.text for e in both.timeline if e.kind == "alert"] == [
        "AstraHighErrorRate firing: 7% of task outcomes failed on shard 1",
        "AstraHighErrorRate firing: 7% of task outcomes failed on shard 2",
    ]
    assert resolved.firing == 0 and len(resolved.alerts) == 2
    assert [e.text for e in resolved.timeline if e.kind == "resolved_alert"] == [
        "AstraHighErrorRate resolved",
        "AstraHighErrorRate resolved",
        "every alert of the group resolved",
    ]
    [stage] = [e for e in resolved.timeline if e.kind == "stage"]
    assert (stage.actor, stage.text) == (
        "alertmanager",
        "contain (from detect): every alert of the group resolved",
    )


A_REPEAT_TAKES = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
    # The patch that made repeats quiet, once per run: its marker, and TemporalChangeVersion.
    EventType.EVENT_TYPE_MARKER_RECORDED,
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
}


async def test_a_repeat_adds_its_signal_to_the_history_and_nothing_more(desk: Desk) -> None:
    """Alertmanager repeats a firing group every ``repeat_interval``, for as long as it fires:
    a repeat must not make the incident cancel and start its escalation timer again."""
    first = notification(GROUP, error_rate())
    async with incident_worker(desk):
        handle = await desk.open(
            "High error rate", Severity.SEV2, opened_by="alertmanager", notification=first
        )
        await desk.until(handle, lambda s: s.firing == 1, "the first alert")
        before = len([e async for e in (await settled(handle)).fetch_history_events()])
        for _ in range(5):
            await desk.alert(handle, first)
        events = [e async for e in (await settled(handle)).fetch_history_events()]
        after = await state(handle)

    added = events[before:]
    assert sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in added) == 5
    assert {e.event_type for e in added} <= A_REPEAT_TAKES
    assert kinds(after).count("alert") == 1 and after.refused_alerts == 0


async def test_an_unsigned_notification_is_counted_and_ignored(desk: Desk) -> None:
    async with incident_worker(desk):
        handle = await desk.open(
            "High error rate",
            Severity.SEV2,
            opened_by="alertmanager",
            notification=notification(GROUP, error_rate()),
        )
        await desk.until(handle, lambda s: s.firing == 1, "the first alert")
        await handle.signal(
            "alerts", notification(GROUP, error_rate("resolved"), status="resolved")
        )
        ignored = await desk.until(handle, lambda s: s.refused_alerts == 1, "the forgery counted")
        still = await state(handle)

    assert ignored.firing == 1 and still.stage == Stage.DETECT
    assert "resolved_alert" not in kinds(still)
