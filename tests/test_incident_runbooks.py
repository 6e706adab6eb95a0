"""Runbooks on an incident's timeline: an alert that names one starts it as the incident's child
when the policy allows (else proposes it), a person starts one by hand, the runbook's approvals
apply as always, and its steps and outcome come back to the incident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from runtime import search_attributes as sa
from sandbox.faults import worker_lost
from tests.conftest_incident import Desk, incident_worker, kinds, lost_worker_alert, notification
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import RunningAstra, worker_pods
from tests.helpers import decide, shard_count, status, wait_for_step
from workflows.incident_models import ActionKind, AlertNotification, IncidentState, Severity
from workflows.models import Outcome, StepState


def on_astra(desk: Desk, astra: RunningAstra) -> None:
    """Point the desk's worker at the test's simulated Astra."""
    target = astra.target
    desk.settings = desk.settings.model_copy(
        update={
            "database_url": target.dsn,
            "redis_url": target.redis_url,
            "redis_key_prefix": target.key_prefix,
        }
    )


async def test_an_alert_naming_a_runbook_starts_it_as_the_incidents_child(
    desk: Desk, astra: RunningAstra, kube: KubeSandbox
) -> None:
    on_astra(desk, astra)
    async with incident_worker(desk):
        handle, done, lost = await desk.runbook_from_alert(astra)
        child = desk.client.get_workflow_handle(f"worker-lost/{lost}")
        described = await child.describe()
        child_status = await status(child)
        await desk.chat_said(f"worker-lost/{lost}: done")

    assert done.rotation == "agent-platform"
    [run] = done.runs
    assert (run.runbook, run.run_id, run.outcome) == (
        "worker-lost",
        f"worker-lost/{lost}",
        Outcome.DONE.value,
    )
    assert run.started_by == f"{handle.id} (alert AstraWorkerLost)"
    assert lost not in worker_pods(kube)
    # Temporal records the incident as the parent; the run carries the incident's id, and the
    # incident itself is the requester.
    assert described.parent_id == handle.id
    assert described.typed_search_attributes.get(sa.INCIDENT_ID) == handle.id
    assert child_status.requester == handle.id
    steps = [e.text for e in done.timeline if e.kind == "runbook_step"]
    assert f"{run.run_id} · requeue the worker's tasks: done" in " ".join(steps)
    assert (
        kinds(done).index("alert")
        < kinds(done).index("runbook")
        < kinds(done).index("runbook_outcome")
    )


async def test_an_incidents_runbook_may_be_approved_by_anyone_eligible(
    desk: Desk, astra: RunningAstra, kube: KubeSandbox
) -> None:
    on_astra(desk, astra)
    async with astra.between_ticks():
        fault = await worker_lost(astra.target)
        other = sorted(worker_pods(kube) - {fault.worker_id})[0]
        await worker_lost(astra.target, worker_id=other)
    alert = lost_worker_alert('{}:{alertname="AstraWorkerLost"}', fault.worker_id)
    async with incident_worker(desk):
        handle = await desk.open(
            "Worker pool stuck", Severity.SEV2, opened_by="alertmanager", notification=alert
        )
        await desk.until(handle, lambda s: bool(s.runs), "the runbook started")
        child = desk.client.get_workflow_handle(f"worker-lost/{fault.worker_id}")
        step = "approve replacing workers of a stuck pool"
        await wait_for_step(child, step, StepState.AWAITING_APPROVAL, within=30)
        [pending] = (await status(child)).pending_approvals
        await decide(child, step, "erin")
        done = await desk.until(
            handle, lambda s: s.runs[0].outcome is not None, "the outcome", timeout=90
        )

    # Two of three workers lost: a stuck pool. The incident asked, so nobody is the requester
    # whom four eyes would exclude: all of Agent Platform may approve.
    assert pending.members == ["carol", "erin"]
    assert done.runs[0].outcome == Outcome.DONE.value
    approval = {s.name: s for s in done.runs[0].steps}[step]
    assert approval.detail == "approved by erin"


async def proposal(
    desk: Desk, title: str, alert: AlertNotification
) -> tuple[str, IncidentState, str]:
    """Open an incident from ``alert`` and wait for the runbook it proposes: the incident's id,
    its state then, and the proposal's text."""
    async with incident_worker(desk):
        handle = await desk.open(title, Severity.SEV3, opened_by="alertmanager", notification=alert)
        proposed = await desk.until(
            handle, lambda s: "runbook_proposed" in kinds(s), "the proposal"
        )
        # The channel hears it after the opening message: one message at a time, in order.
        await eventually(
            lambda: any("astra-ops incident runbook" in t for t in desk.chat_texts()),
            timeout=20,
            message="the proposal in the channel",
        )
    [entry] = [e for e in proposed.timeline if e.kind == "runbook_proposed"]
    return handle.id, proposed, entry.text


async def test_an_alert_whose_runbook_is_left_to_people_is_proposed_not_started(
    desk: Desk,
) -> None:
    desk.policy(runbooks={"worker-lost": {"on_alert": "propose"}})
    alert = lost_worker_alert('{}:{alertname="AstraWorkerLost"}', "astra-worker-zz9")
    incident, proposed, text = await proposal(desk, "Worker lost", alert)

    assert proposed.runs == []
    command = (
        f"`astra-ops incident runbook {incident} worker-lost --param worker_id=astra-worker-zz9`"
    )
    assert text == (
        "AstraWorkerLost names worker-lost for astra-worker-zz9; the policy leaves starting it "
        f"to a person: {command}"
    )
    assert any(command in t for t in desk.chat_texts())


async def test_an_alert_that_cannot_choose_a_runbooks_input_proposes_it_for_a_person(
    desk: Desk,
) -> None:
    """The shard-imbalance rule names Shard Scaling, but the new shard count is a person's
    choice: whatever the policy allows, the incident proposes the command and starts nothing."""
    desk.policy(runbooks={"shard-scaling": {"on_alert": "start"}})
    labels = {
        "alertname": "AstraShardImbalance",
        "severity": "SEV3",
        "rotation": "kernel-sre",
        "runbook": "shard-scaling",
        "component": "scheduler",
    }
    alert = notification(
        '{}:{alertname="AstraShardImbalance"}', {"fingerprint": "fp-shards", "labels": labels}
    )
    incident, proposed, text = await proposal(desk, "Shard imbalance", alert)

    assert proposed.runs == []
    command = f"`astra-ops incident runbook {incident} shard-scaling --param shards=<shards>`"
    assert text == (f"AstraShardImbalance names shard-scaling; a person chooses shards: {command}")
    assert any(command in t for t in desk.chat_texts())


async def test_a_person_starts_a_runbook_for_the_incident_and_its_approvals_apply(
    desk: Desk, kube: KubeSandbox, namespace: str
) -> None:
    async with incident_worker(desk):
        handle = await desk.open("Shard imbalance", Severity.SEV3, components=["scheduler"])
        params = {"shards": "12", "namespace": namespace}
        for actor, runbook, why in (
            ("carol", "shard-scaling", "carol may not start shard-scaling"),
            ("alice", "nope", "no runbook 'nope' in the access policy"),
        ):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await desk.act(handle, ActionKind.RUNBOOK, actor, runbook=runbook, params=params)
            assert why in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as bad:
            await desk.act(
                handle, ActionKind.RUNBOOK, "alice", runbook="shard-scaling", params={"shards": "0"}
            )
        said = await desk.act(
            handle, ActionKind.RUNBOOK, "alice", runbook="shard-scaling", params=params
        )
        child: WorkflowHandle[Any, Any] = desk.client.get_workflow_handle(
            f"shard-scaling/{namespace}"
        )
        # alice asked for it, so four eyes: bob approves.
        await decide(child, "approve scaling", "bob")
        done: IncidentState = await desk.until(
            handle, lambda s: s.runs[0].outcome is not None, "the outcome", timeout=60
        )
        await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
        for kind in (ActionKind.CONTAIN, ActionKind.REMEDIATE, ActionKind.RESOLVE):
            await desk.act(handle, kind, "alice", text="rebalanced")
        drafted = await desk.until(handle, lambda s: s.postmortem is not None, "the draft")

    assert "bad parameters for shard-scaling: shards" in str(bad.value.cause)
    assert said == f"started shard-scaling/{namespace}"
    assert shard_count(kube, namespace) == "12"
    [run] = done.runs
    assert (run.started_by, run.outcome) == ("alice", Outcome.DONE.value)
    approval = {s.name: s for s in run.steps}["approve scaling"]
    assert (approval.state, approval.detail) == (StepState.DONE, "approved by bob")
    assert f"shard-scaling/{namespace} · approve scaling: done — approved by bob" in [
        e.text for e in done.timeline
    ]
    assert drafted.postmortem is not None
    draft = Path(drafted.postmortem).read_text()
    assert f"### shard-scaling: `shard-scaling/{namespace}`" in draft
    assert "- Outcome: **done**" in draft
    assert "  - approve scaling: done — approved by bob" in draft
