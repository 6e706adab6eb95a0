"""A long incident continues as new without losing its state, its timers or its messages."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from tests.conftest_incident import Desk, incident_worker, kinds, state
from workflows.incident_models import ActionKind, Severity, Stage


async def test_continue_as_new_keeps_state_deadlines_and_items(desk: Desk) -> None:
    desk.policy(continue_as_new_after_events=50, ack_timeout_seconds=4, item_reminder_seconds=2)
    async with incident_worker(desk):
        handle = await desk.open("Actors restart in a loop", Severity.SEV2, components=["actors"])
        first_run = (await handle.describe()).run_id
        await desk.act(handle, ActionKind.COMMAND, "bob")
        due = datetime.now(UTC) + timedelta(seconds=5)
        await desk.act(
            handle, ActionKind.ADD_ITEM, "bob", text="mailbox alert", person="carol", due=due
        )
        notes = await desk.continue_with_notes(handle, "bob", first_run)
        carried = await state(handle)
        # The escalation and the item's reminder and overdue notice fall due in the new run.
        later = await desk.until(
            handle,
            lambda s: kinds(s).count("page") == 3 and kinds(s).count("item") == 3,
            "the escalation and the item's notices",
            timeout=30,
        )
        await desk.pager_took(3)
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "bob")
        final = await state(handle)

    assert carried.commander == "bob" and carried.severity == Severity.SEV2
    assert [e.text for e in carried.timeline if e.kind == "note"] == [
        f"note {n}" for n in range(1, notes + 1)
    ]
    assert carried.timeline[0].kind == "opened" and carried.items[0].owner == "carol"
    assert [e.text.split(" (")[0] for e in later.timeline if e.kind == "page"] == [
        "paged alice",
        "paged bob",
        "paged frank",
    ]
    notices = [e.text for e in later.timeline if e.kind == "item"][1:]
    assert notices[0].startswith("reminder: item-1 (mailbox alert) is due")
    assert notices[1].startswith("overdue: item-1 (mailbox alert) of carol was due")
    assert notices[1].endswith("told bob")
    assert Counter(key for _, key in desk.pages() if _ == "trigger") == {
        f"{handle.id}/primary": 1,
        f"{handle.id}/secondary": 1,
        f"{handle.id}/manager": 1,
    }
    assert len(desk.chat_texts()) == len(set(desk.chat_texts()))
    assert final.stage == Stage.TRIAGE and final.acknowledged_by == "bob"
