"""The approval gate: who may decide, how, and what happens when nobody does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.worker import Worker

from activities.notify import NotifyActivities
from runtime import search_attributes as sa
from runtime.settings import Settings
from tests.conftest import TEMPORAL, ChatReceiver
from tests.conftest_kube import eventually
from tests.gate_probe import GateProbe, GateProbeRequest
from tests.helpers import awaiting_approval, status
from workflows.models import (
    ApprovalPolicy,
    ApprovalSignal,
    Decision,
    Outcome,
    RunbookResult,
    StepState,
)

STEP = "approve change"
KERNEL_SRE = ApprovalPolicy(groups=["kernel-sre"])


@pytest.fixture
async def probe_worker(
    client: Client, settings: Settings, task_queue: str
) -> AsyncIterator[Worker]:
    approvals = NotifyActivities(settings.access_policy, settings.chat_webhook_url)
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[GateProbe],
        activities=[approvals.request_approval],
    ) as worker:
        yield worker


async def start_probe(
    client: Client,
    task_queue: str,
    policy: ApprovalPolicy = KERNEL_SRE,
    requester: str = "alice",
    timeout_seconds: float = 600,
) -> WorkflowHandle[Any, RunbookResult]:
    request = GateProbeRequest(
        requester=requester,
        subject=uuid.uuid4().hex,
        policy=policy,
        approval_timeout_seconds=timeout_seconds,
    )
    handle = await client.start_workflow(
        GateProbe.run, request, id=f"gate-probe/{request.subject}", task_queue=task_queue
    )
    await awaiting_approval(handle, STEP)
    return handle


async def refused(handle: WorkflowHandle[Any, Any], decision: Decision) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update(GateProbe.decide, decision)
    return str(failure.value.cause)


async def test_update_validator_refuses_bad_decisions_before_history(
    client: Client, task_queue: str, probe_worker: Worker
) -> None:
    handle = await start_probe(client, task_queue)

    assert "not awaiting approval" in await refused(
        handle, Decision(approver="bob", step="no such step")
    )
    assert "requester cannot approve" in await refused(handle, Decision(approver="alice"))
    assert "not in the group(s) allowed" in await refused(handle, Decision(approver="carol"))
    assert "not in the group(s) allowed" in await refused(handle, Decision(approver="dave"))
    assert "needs an approver" in await refused(handle, Decision(approver=""))
    # Refused updates never reached the handler: nothing recorded, still waiting.
    current = await status(handle)
    assert current.decisions == []
    assert [p.step for p in current.pending_approvals] == [STEP]

    said = await handle.execute_update(GateProbe.decide, Decision(approver="bob", step=STEP))
    assert said == f"step '{STEP}' approved by bob (1 of 1)"
    assert (await handle.result()).outcome == Outcome.DONE


async def test_second_decision_by_the_same_person_is_refused(
    client: Client, task_queue: str, probe_worker: Worker
) -> None:
    policy = ApprovalPolicy(groups=["kernel-sre", "agent-platform"], required=2)
    handle = await start_probe(client, task_queue, policy, requester="dave")

    await handle.execute_update(GateProbe.decide, Decision(approver="bob"))
    assert "bob has already approved" in await refused(handle, Decision(approver="bob"))
    assert (await status(handle)).pending_approvals[0].approvers == ["bob"]

    await handle.execute_update(GateProbe.decide, Decision(approver="carol"))
    result = await handle.result()
    assert result.outcome == Outcome.DONE
    step = next(s for s in result.steps if s.name == STEP)
    assert step.detail == "approved by bob, carol"


async def test_invalid_signal_is_recorded_and_ignored(
    client: Client, task_queue: str, probe_worker: Worker
) -> None:
    handle = await start_probe(client, task_queue)

    await handle.signal(GateProbe.approve, ApprovalSignal(approver="alice", comment="mine"))
    await handle.signal(GateProbe.approve, ApprovalSignal(approver="carol"))

    async def recorded() -> bool:
        return len((await status(handle)).decisions) == 2

    await eventually(recorded, message="both refused signals recorded")
    current = await status(handle)
    assert [(d.approver, d.accepted) for d in current.decisions] == [
        ("alice", False),
        ("carol", False),
    ]
    assert "requester cannot approve" in current.decisions[0].why
    assert current.pending_approvals, "the run still waits for a valid decision"

    await handle.signal(GateProbe.reject, ApprovalSignal(approver="bob", comment="too risky"))
    result = await handle.result()
    assert result.outcome == Outcome.REJECTED
    assert result.summary == f"step '{STEP}' rejected by bob: too risky"
    assert next(s for s in result.steps if s.name == "change").state == StepState.SKIPPED


async def test_plain_json_signal_from_the_stock_cli_approves(
    client: Client, task_queue: str, probe_worker: Worker
) -> None:
    handle = await start_probe(client, task_queue)
    target = client.service_client.config.target_host
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL), "workflow", "signal", "--address", target,
        "--workflow-id", handle.id, "--name", "approve",
        "--input", json.dumps({"approver": "bob", "step": STEP, "comment": "from the CLI"}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()

    result = await handle.result()
    assert result.outcome == Outcome.DONE
    assert (await status(handle)).decisions[0].comment == "from the CLI"


async def test_timeout_aborts_safely(client: Client, task_queue: str, probe_worker: Worker) -> None:
    handle = await start_probe(client, task_queue, timeout_seconds=1)
    result = await handle.result()
    assert result.outcome == Outcome.ABORTED
    assert result.summary == "no decision on step 'approve change' within 0:00:01; aborted safely"
    assert next(s for s in result.steps if s.name == "change").state == StepState.SKIPPED


async def test_timeout_escalates_to_the_next_group_and_keeps_waiting(
    client: Client, task_queue: str, probe_worker: Worker, chat: ChatReceiver
) -> None:
    policy = ApprovalPolicy(
        groups=["kernel-sre"], on_timeout="escalate", escalate_to=["agent-platform"]
    )
    handle = await start_probe(client, task_queue, policy, timeout_seconds=1)
    assert "carol" in await refused(handle, Decision(approver="carol"))  # not yet eligible

    async def escalated() -> bool:
        return "carol" in (await status(handle)).pending_approvals[0].members

    await eventually(escalated, timeout=10, message="escalation to agent-platform")
    texts = [m["text"] for m in chat.messages]
    assert texts[0].startswith("Approval needed") and "bob" in texts[0]
    assert texts[1].startswith("Escalated: approval") and "carol" in texts[1]

    await handle.execute_update(GateProbe.decide, Decision(approver="carol"))
    assert (await handle.result()).outcome == Outcome.DONE


async def test_awaiting_approval_is_searchable_and_shown_in_details(
    client: Client, task_queue: str, probe_worker: Worker
) -> None:
    handle = await start_probe(client, task_queue)
    query = f"{sa.AWAITING_APPROVAL.name} = true AND WorkflowId = '{handle.id}'"

    async def listed(expected: int) -> bool:
        return len([w async for w in client.list_workflows(query)]) == expected

    await eventually(lambda: listed(1), timeout=10, message="run listed as awaiting approval")
    metadata = await handle.query("__temporal_workflow_metadata")
    assert "Awaiting approval of 'approve change' from kernel-sre" in metadata.current_details

    await handle.execute_update(GateProbe.decide, Decision(approver="bob"))
    await handle.result()
    await eventually(lambda: listed(0), timeout=10, message="run no longer awaiting approval")
