"""People's actions on an incident: each validated before it enters history (a refused one changes
nothing), stages in the seed's order, and the lifecycle from opening to the closed review with
its postmortem draft."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from runtime.identity import statement
from tests.conftest_incident import Desk, incident_worker, kinds, state
from tests.helpers import TEST_SIGNER
from workflows.incident_models import (
    ActionKind,
    IncidentAction,
    IncidentState,
    Severity,
    Stage,
)


async def refused(desk: Desk, handle: WorkflowHandle[Any, Any], kind: ActionKind, actor: str,
                  **fields: Any) -> str:  # fmt: skip
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await desk.act(handle, kind, actor, **fields)
    return str(getattr(failed.value.cause, "message", failed.value.cause))


async def updates_in_history(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(e.HasField("workflow_execution_update_accepted_event_attributes")
               for e in history.events)  # fmt: skip


async def test_a_severity_change_needs_a_reason_and_a_refusal_changes_nothing(desk: Desk) -> None:
    async with incident_worker(desk):
        handle = await desk.open(severity=Severity.SEV3, components=["tasks"])
        await desk.until(handle, lambda s: "page" in kinds(s), "opened")
        before, accepted = await state(handle), await updates_in_history(handle)

        why = await refused(desk, handle, ActionKind.SEVERITY, "alice", severity=Severity.SEV2)
        same = await refused(
            desk, handle, ActionKind.SEVERITY, "alice", severity=Severity.SEV3, text="again"
        )
        unchanged, still = await state(handle), await updates_in_history(handle)

        said = await desk.act(
            handle, ActionKind.SEVERITY, "alice", severity=Severity.SEV2, text="elevated failures"
        )
        after = await state(handle)
        await desk.chat_said("SEV3 → SEV2 by alice: elevated failures")

    assert why == "a severity change needs a reason"
    assert same == "the incident is already SEV3"
    assert unchanged.timeline == before.timeline and still == accepted
    assert said == "severity SEV3 → SEV2"
    assert after.severity == Severity.SEV2
    assert [(e.actor, e.text) for e in after.timeline if e.kind == "severity"] == [
        ("alice", "SEV3 → SEV2: elevated failures")
    ]


async def test_stages_follow_the_seed_order(desk: Desk) -> None:
    async with incident_worker(desk):
        handle = await desk.open(components=["scheduler"])
        await desk.until(handle, lambda s: "page" in kinds(s), "opened")

        early = await refused(desk, handle, ActionKind.REMEDIATE, "bob")
        unresolved = await refused(desk, handle, ActionKind.RESOLVE, "bob")
        not_yet = await refused(desk, handle, ActionKind.REOPEN, "bob", text="why not")
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
        await desk.act(handle, ActionKind.CONTAIN, "bob", text="traffic drained")
        twice = await refused(desk, handle, ActionKind.CONTAIN, "bob")
        await desk.act(handle, ActionKind.REMEDIATE, "bob", text="leader re-elected")
        now = await state(handle)

    assert early == (
        "cannot remediate an incident in stage detect: it must be contained "
        "(`astra-ops incident contain`) first"
    )
    assert "cannot resolve an incident in stage detect: it must be remediated" in unresolved
    assert "cannot reopen an incident in stage detect" in not_yet
    assert "cannot contain an incident in stage contain" in twice
    assert now.stage == Stage.REMEDIATE
    assert [e.text.split(" (")[0] for e in now.timeline if e.kind == "stage"] == [
        "triage",
        "contain",
        "remediate",
    ]


async def test_only_proven_responders_act(desk: Desk) -> None:
    async with incident_worker(desk):
        handle = await desk.open(components=["scheduler"])
        await desk.until(handle, lambda s: "page" in kinds(s), "opened")
        before = await updates_in_history(handle)

        outsider = await refused(desk, handle, ActionKind.NOTE, "dave", text="hello")
        with pytest.raises(WorkflowUpdateFailedError) as no_signature:
            await handle.execute_update(
                ActionKind.ACKNOWLEDGE.value, IncidentAction(actor="alice"), result_type=str
            )
        # Signed for bob's note, sent as bob's acknowledgement: another act.
        note = IncidentAction(actor="bob", text="hi")
        run_id = (await handle.describe()).run_id
        said = statement("incident.note", "bob", handle.id, note.signed_payload(), run_id=run_id)
        forged = IncidentAction(actor="bob", authorization=TEST_SIGNER.sign(said))
        with pytest.raises(WorkflowUpdateFailedError) as other_act:
            await handle.execute_update(ActionKind.ACKNOWLEDGE.value, forged, result_type=str)
        # Signed for this note, with the text changed afterwards.
        tampered = note.model_copy(
            update={"text": "rm -rf", "authorization": TEST_SIGNER.sign(said)}
        )
        with pytest.raises(WorkflowUpdateFailedError) as changed:
            await handle.execute_update(ActionKind.NOTE.value, tampered, result_type=str)
        after = await state(handle)

    assert outsider.startswith("dave may not act on this incident")
    assert "acknowledge by alice is not signed by the astra-ops API" in str(
        no_signature.value.cause
    )
    assert "the signed statement is for another act" in str(other_act.value.cause)
    assert "the signed statement is for another digest" in str(changed.value.cause)
    assert after.acknowledged_by is None and "note" not in kinds(after)
    assert await updates_in_history(handle) == before


async def test_resolution_drafts_the_postmortem_and_the_review_closes_when_items_settle(
    desk: Desk, tmp_path: Path
) -> None:
    due = datetime.now(UTC) + timedelta(days=3)
    async with incident_worker(desk):
        handle = await desk.open(
            "Scheduler lost its leader", Severity.SEV2, components=["scheduler"], reason="pager"
        )
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
        await desk.act(handle, ActionKind.COMMAND, "alice", person="bob")
        await desk.act(handle, ActionKind.NOTE, "bob", text="leader election stuck | etcd slow")
        await desk.act(handle, ActionKind.CONTAIN, "bob", text="failed over")
        await desk.act(handle, ActionKind.REMEDIATE, "bob", text="etcd disk replaced")
        await desk.act(handle, ActionKind.RESOLVE, "bob", text="healthy for 30 min")
        drafted = await desk.until(handle, lambda s: s.stage == Stage.REVIEW, "the review")

        unknown = await refused(desk, handle, ActionKind.COMPLETE_ITEM, "bob", item="item-9")
        late = await refused(
            desk, handle, ActionKind.ADD_ITEM, "bob", text="x", person="carol",
            due=datetime.now(UTC) - timedelta(days=1),
        )  # fmt: skip
        await desk.act(
            handle, ActionKind.ADD_ITEM, "bob", text="alert on etcd fsync", person="carol", due=due
        )
        await desk.act(
            handle, ActionKind.ADD_ITEM, "bob", text="runbook for etcd", person="erin", due=due
        )
        no_reason = await refused(desk, handle, ActionKind.DROP_ITEM, "bob", item="item-2")
        await desk.act(handle, ActionKind.COMPLETE_ITEM, "carol", item="item-1")
        open_still = await state(handle)
        await desk.act(handle, ActionKind.DROP_ITEM, "bob", item="item-2", text="covered by item-1")
        closed: IncidentState = await handle.result()

    assert drafted.postmortem is not None
    draft = Path(drafted.postmortem).read_text()
    assert Path(drafted.postmortem).parent == tmp_path / "postmortems"
    written = kinds(drafted).index("postmortem")
    assert {"opened", "page", "ack", "commander", "note", "stage"} <= set(kinds(drafted)[:written])
    for entry in drafted.timeline[:written]:
        assert f"{entry.at:%Y-%m-%d %H:%M:%S}Z · {entry.kind}" in draft
        assert " ".join(entry.text.split()) in draft, entry
    for section in ("## Summary", "## Severity changes", "## Impact window", "## Timeline",
                    "## Alerts", "## Runbooks", "## Causes", "## Lessons"):  # fmt: skip
        assert section in draft
    assert "commander: bob" in draft
    assert any("postmortem draft: " + drafted.postmortem in t for t in desk.chat_texts())

    assert unknown == "no action item 'item-9' (items: none)"
    assert "is in the past" in late
    assert no_reason == "dropping an action item needs a reason"
    assert open_still.stage == Stage.REVIEW
    assert closed.stage == Stage.CLOSED
    assert [(i.id, i.state, i.note) for i in closed.items] == [
        ("item-1", "done", ""),
        ("item-2", "dropped", "covered by item-1"),
    ]
    assert closed.timeline[-1].text.startswith("closed (from remediation_review)")
    # Resolution resolved the page it opened; the rotation was told of each stage.
    assert desk.pages()[-1] == ("resolve", f"{handle.id}/primary")
    assert all(
        any(f"stage {s}:" in t for t in desk.chat_texts())
        for s in ("triage", "contain", "remediate", "postmortem", "remediation_review", "closed")
    )


async def test_dev_mode_trusts_names_but_not_past_the_policy(desk: Desk) -> None:
    desk.settings = desk.settings.model_copy(update={"dev_mode": True})
    async with incident_worker(desk):
        handle = await desk.open(signed=False, components=["workers"])
        said = await handle.execute_update(
            ActionKind.ACKNOWLEDGE.value, IncidentAction(actor="erin"), result_type=str
        )
        with pytest.raises(WorkflowUpdateFailedError) as outsider:
            await handle.execute_update(
                ActionKind.NOTE.value, IncidentAction(actor="dave", text="hi"), result_type=str
            )

    assert said == "acknowledged by erin; escalation stopped"
    assert "dave may not act on this incident" in str(outsider.value.cause)
