"""Escalation and command: who is paged, in what order, when it stops, and the commander request,
on the dev server with the pager and chat receivers recording what they took."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import replace
from datetime import timedelta

import pytest
from temporalio.client import WorkflowFailureError

from runtime import search_attributes as sa
from tests.conftest import OwnTemporal
from tests.conftest_incident import Desk, incident_worker, kinds, state
from tests.conftest_kube import eventually
from workflows.incident_models import ActionKind, IncidentState, Severity, Stage


async def test_nobody_acknowledges_so_primary_then_secondary_then_manager_are_paged(
    desk: Desk,
) -> None:
    desk.policy(ack_timeout_seconds=1.5)
    async with incident_worker(desk):
        handle = await desk.open(components=["scheduler"])
        paged = await desk.until(
            handle, lambda s: kinds(s).count("page") == 3, "three levels paged", timeout=30
        )
        await desk.pager_took(3)

    assert paged.rotation == "kernel-sre"
    pages = [e for e in paged.timeline if e.kind == "page"]
    assert [e.text for e in pages] == [
        "paged alice (primary of kernel-sre)",
        "paged bob (secondary of kernel-sre): not acknowledged within 1.5 s",
        "paged frank (manager of kernel-sre): not acknowledged within 1.5 s",
    ]
    assert pages[1].at - pages[0].at >= timedelta(seconds=1.5) and pages[2].at - pages[
        1
    ].at >= timedelta(seconds=1.5)
    assert desk.pages() == [
        ("trigger", f"{handle.id}/primary"),
        ("trigger", f"{handle.id}/secondary"),
        ("trigger", f"{handle.id}/manager"),
    ]
    trigger = desk.pager.accepted[0].body
    assert trigger["routing_key"] == "Rkernel" and trigger["payload"]["severity"] == "warning"
    assert "alice (primary)" in trigger["payload"]["summary"]


async def test_an_acknowledgement_stops_the_escalation_and_acknowledges_the_page(
    desk: Desk,
) -> None:
    desk.policy(ack_timeout_seconds=2)
    async with incident_worker(desk):
        handle = await desk.open(components=["workers"])
        await desk.until(handle, lambda s: "page" in kinds(s), "primary paged")
        said = await desk.act(handle, ActionKind.ACKNOWLEDGE, "carol", text="looking")
        await desk.pager_took(2)
        after = await state(handle)
        # Past the ack timeout: nobody else is paged.
        await desk.act(handle, ActionKind.NOTE, "carol", text="still just me")
        desc = await handle.describe()

    assert said == "acknowledged by carol; escalation stopped"
    assert after.acknowledged_by == "carol" and after.stage == Stage.TRIAGE
    assert [e.kind for e in after.timeline if e.kind in ("page", "ack")] == ["page", "ack"]
    assert desk.pages() == [
        ("trigger", f"{handle.id}/primary"),
        ("acknowledge", f"{handle.id}/primary"),
    ]
    assert desc.typed_search_attributes.get(sa.STEP) == "triage"
    assert desc.typed_search_attributes.get(sa.INCIDENT_ID) == handle.id
    assert desc.typed_search_attributes.get(sa.SEVERITY) == "SEV3"


async def test_a_sev2_asks_for_a_commander_until_someone_takes_the_role(desk: Desk) -> None:
    desk.policy(commander_request_interval_seconds=1)
    async with incident_worker(desk):
        handle = await desk.open(severity=Severity.SEV2, components=["tasks"])
        await desk.until(
            handle, lambda s: kinds(s).count("commander_request") >= 3, "three requests"
        )
        said = await desk.act(handle, ActionKind.COMMAND, "bob")
        taken = await state(handle)
        await desk.act(handle, ActionKind.NOTE, "bob", text="a later action")
        later = await desk.until(handle, lambda s: "note" in kinds(s), "the note")
        await desk.chat_said("bob is the incident commander")

    requests = [e for e in taken.timeline if e.kind == "commander_request"]
    assert said == "bob is the incident commander"
    assert taken.commander == "bob"
    assert kinds(later).count("commander_request") == len(requests)
    assert [e.text for e in requests][:3] == [
        f"asked kernel-sre for an incident commander (request {n})" for n in (1, 2, 3)
    ]
    asked = [t for t in desk.chat_texts() if "needs an incident commander" in t]
    assert len(asked) == len(set(asked)) >= 3


async def test_a_worker_stopped_during_the_ack_wait_resumes_without_a_lost_or_repeated_page(
    desk: Desk,
) -> None:
    desk.policy(ack_timeout_seconds=3)
    async with incident_worker(desk):
        handle = await desk.open(components=["scheduler"])
        await desk.pager_took(1)
        before = await state(handle)

    async def timer_fired_without_a_worker() -> bool:
        history = await handle.fetch_history()
        return any(e.HasField("timer_fired_event_attributes") for e in history.events)

    await eventually(timer_fired_without_a_worker, timeout=20, message="the ack timer fired")
    async with incident_worker(desk):
        paged = await desk.until(
            handle, lambda s: kinds(s).count("page") == 3, "all levels paged", timeout=30
        )
        await desk.pager_took(3)

    assert kinds(before).count("page") == 1
    assert [e.text.split(" (")[0] for e in paged.timeline if e.kind == "page"] == [
        "paged alice",
        "paged bob",
        "paged frank",
    ]
    assert Counter(key for _, key in desk.pages()) == {
        f"{handle.id}/primary": 1,
        f"{handle.id}/secondary": 1,
        f"{handle.id}/manager": 1,
    }


@pytest.mark.slow
async def test_the_dev_server_down_through_the_ack_wait_pages_each_level_once_and_not_early(
    desk: Desk, own_temporal: OwnTemporal
) -> None:
    """The server stopped right after the primary's page and kept down past the ack timeout,
    then started again on its file: the timer still fires (late, never early), and each level
    is paged once."""
    ack = 3.0
    desk.policy(ack_timeout_seconds=ack)
    here = replace(desk, client=own_temporal.env.client, opened=[])
    async with incident_worker(here):
        handle = await here.open(components=["scheduler"])
        await desk.pager_took(1)
    await own_temporal.stop()
    await asyncio.sleep(ack + 1)  # the outage itself: the ack timer falls due while it lasts
    here = replace(here, client=await own_temporal.start_again())
    handle = here.client.get_workflow_handle(handle.id, result_type=IncidentState)
    async with incident_worker(here):
        paged = await here.until(
            handle, lambda s: kinds(s).count("page") == 3, "all levels paged", timeout=30
        )
        await desk.pager_took(3)
        await handle.terminate("the test is over")

    pages = [e for e in paged.timeline if e.kind == "page"]
    assert [e.text.split(" (")[0] for e in pages] == ["paged alice", "paged bob", "paged frank"]
    assert all(b.at - a.at >= timedelta(seconds=ack) for a, b in itertools.pairwise(pages))
    assert Counter(key for _, key in desk.pages()) == {
        f"{handle.id}/primary": 1,
        f"{handle.id}/secondary": 1,
        f"{handle.id}/manager": 1,
    }


async def test_an_unsigned_or_unknown_opener_is_refused_and_pages_nobody(desk: Desk) -> None:
    async with incident_worker(desk):
        unsigned = await desk.open(signed=False)
        outsider = await desk.open(opened_by="dave")
        for handle, why in (
            (unsigned, "incident.open by alice is not signed by the astra-ops API"),
            (outsider, "dave may not open incidents"),
        ):
            try:
                await handle.result()
            except WorkflowFailureError as failed:
                assert f"incident refused: {why}" in str(failed.cause)
            else:
                raise AssertionError("the incident opened")
    assert desk.pages() == []
