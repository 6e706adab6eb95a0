"""The approval gate: who may decide, how, and what happens when nobody does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.worker import Worker

from activities.access import Trust
from runtime import search_attributes as sa
from runtime.access import ApprovalPolicy
from runtime.identity import load_signer, new_signing_key_line, parse_trusted_keys
from runtime.settings import Settings
from tests.conftest import TEMPORAL, ChatReceiver
from tests.conftest_kube import eventually
from tests.gate_probe import STEP, GateProbe, GateProbeRequest, probe_worker, write_policy
from tests.helpers import (
    TEST_SIGNER,
    awaiting_approval,
    signed_decision,
    signed_start,
    status,
)
from workflows.approval import KEEP_REFUSED_PER_STEP
from workflows.models import (
    MAX_COMMENT,
    MAX_NAME,
    ApprovalSignal,
    Decision,
    Outcome,
    RunbookResult,
    StepState,
)

KERNEL_SRE = ApprovalPolicy(groups=["kernel-sre"])
DEV = Trust(dev_mode=True)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """This test's access policy; a test may rewrite the probe's rule before it starts."""
    path = tmp_path / "access-policy.yaml"
    write_policy(path, KERNEL_SRE)
    return path


@pytest.fixture
async def probe(
    client: Client, settings: Settings, task_queue: str, policy_file: Path
) -> AsyncIterator[Worker]:
    """The gate on a dev-mode worker: names are trusted, so these tests are about the rules."""
    async with probe_worker(client, settings, task_queue, DEV, policy_file) as worker:
        yield worker


@pytest.fixture
async def proving_probe(
    client: Client, settings: Settings, task_queue: str, policy_file: Path
) -> AsyncIterator[Worker]:
    """The gate as production runs it: only decisions signed by the API's key count."""
    trust = Trust(dev_mode=False, keys=parse_trusted_keys(TEST_SIGNER.public_line()))
    async with probe_worker(client, settings, task_queue, trust, policy_file) as worker:
        yield worker


async def start_probe(
    client: Client,
    task_queue: str,
    requester: str = "alice",
    timeout_seconds: float = 600,
    signed: bool = False,
) -> WorkflowHandle[Any, RunbookResult]:
    request = GateProbeRequest(
        requester=requester, subject=uuid.uuid4().hex, approval_timeout_seconds=timeout_seconds
    )
    workflow_id = f"gate-probe/{request.subject}"
    handle = await client.start_workflow(
        GateProbe.run,
        signed_start(request, workflow_id) if signed else request,
        id=workflow_id,
        task_queue=task_queue,
    )
    await awaiting_approval(handle, STEP)
    return handle


async def refused(handle: WorkflowHandle[Any, Any], decision: Decision) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update(GateProbe.decide, decision)
    return str(failure.value.cause)


async def test_update_validator_refuses_bad_decisions_before_history(
    client: Client, task_queue: str, probe: Worker
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
    client: Client, task_queue: str, probe: Worker, policy_file: Path
) -> None:
    rule = ApprovalPolicy(groups=["kernel-sre", "agent-platform"], required=2)
    write_policy(policy_file, rule)
    handle = await start_probe(client, task_queue, requester="dave")

    await handle.execute_update(GateProbe.decide, Decision(approver="bob"))
    assert "bob has already approved" in await refused(handle, Decision(approver="bob"))
    assert (await status(handle)).pending_approvals[0].approvers == ["bob"]

    await handle.execute_update(GateProbe.decide, Decision(approver="carol"))
    result = await handle.result()
    assert result.outcome == Outcome.DONE
    step = next(s for s in result.steps if s.name == STEP)
    assert step.detail == "approved by bob, carol"


async def test_invalid_signal_is_recorded_and_ignored(
    client: Client, task_queue: str, probe: Worker
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
    client: Client, task_queue: str, probe: Worker
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


async def test_timeout_aborts_safely(client: Client, task_queue: str, probe: Worker) -> None:
    handle = await start_probe(client, task_queue, timeout_seconds=1)
    result = await handle.result()
    assert result.outcome == Outcome.ABORTED
    assert result.summary == "no decision on step 'approve change' within 0:00:01; aborted safely"
    assert next(s for s in result.steps if s.name == "change").state == StepState.SKIPPED


async def test_timeout_escalates_to_the_next_group_and_keeps_waiting(
    client: Client, task_queue: str, probe: Worker, chat: ChatReceiver, policy_file: Path
) -> None:
    rule = ApprovalPolicy(
        groups=["kernel-sre"], on_timeout="escalate", escalate_to=["agent-platform"]
    )
    write_policy(policy_file, rule)
    handle = await start_probe(client, task_queue, timeout_seconds=1)
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
    client: Client, task_queue: str, probe: Worker
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


async def test_outside_dev_mode_only_a_decision_the_api_signed_for_this_run_counts(
    client: Client, task_queue: str, proving_probe: Worker
) -> None:
    handle = await start_probe(client, task_queue, signed=True)
    bob = Decision(approver="bob", step=STEP, comment="ok")
    genuine = await signed_decision(handle, bob)
    assert genuine.authorization is not None
    statement = genuine.authorization.statement
    forger = load_signer(new_signing_key_line("test-api"))  # same key id, another key

    attacks = {
        "not signed by the astra-ops API": bob,
        "does not match the statement": genuine.model_copy(
            update={"authorization": forger.sign(statement)}
        ),
        "for another digest": genuine.model_copy(update={"comment": "ok, and more"}),
        "for another decision": genuine.model_copy(update={"decision": "reject"}),
        "expired": bob.model_copy(
            update={
                "authorization": TEST_SIGNER.sign(
                    statement.model_copy(update={"expires_at": datetime.now(UTC)})
                )
            }
        ),
        "for another workflow id": bob.model_copy(
            update={
                "authorization": TEST_SIGNER.sign(
                    statement.model_copy(update={"workflow_id": "gate-probe/other"})
                )
            }
        ),
        "for another run id": bob.model_copy(
            update={
                "authorization": TEST_SIGNER.sign(
                    statement.model_copy(update={"run_id": "an-earlier-run"})
                )
            }
        ),
        "for another actor": bob.model_copy(
            update={
                "authorization": TEST_SIGNER.sign(statement.model_copy(update={"actor": "carol"}))
            }
        ),
    }
    for why, decision in attacks.items():
        assert why in await refused(handle, decision), why
    # The stock CLI's plain JSON is a claim too: recorded as refused, nothing approved.
    await handle.signal(GateProbe.approve, ApprovalSignal(approver="bob", step=STEP))

    async def counted() -> bool:
        return (await status(handle)).refused_decisions == 1

    await eventually(counted, message="the unsigned signal counted as refused")
    assert (await status(handle)).pending_approvals[0].approvers == []

    said = await handle.execute_update(GateProbe.decide, genuine)
    assert said == f"step '{STEP}' approved by bob (1 of 1)"
    assert (await handle.result()).outcome == Outcome.DONE


async def test_outside_dev_mode_an_unsigned_start_is_refused_before_any_step(
    client: Client, task_queue: str, proving_probe: Worker
) -> None:
    request = GateProbeRequest(requester="alice", subject=uuid.uuid4().hex)
    handle = await client.start_workflow(
        GateProbe.run, request, id=f"gate-probe/{request.subject}", task_queue=task_queue
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "refused: start by alice is not signed by the astra-ops API" in str(failure.value.cause)
    assert all(s.state == StepState.SKIPPED for s in (await status(handle)).steps)


async def test_a_flood_of_junk_signals_cannot_wedge_or_bloat_a_run(
    client: Client, task_queue: str, probe: Worker
) -> None:
    """1,000 refused signals, ten of them 1 MB: the run still answers `status`, keeps only a
    bounded record, and completes after one valid approval."""
    handle = await start_probe(client, task_queue)
    big = "x" * 1_000_000
    for i in range(1_000):
        junk = ApprovalSignal(
            approver=big if i % 200 == 0 else f"mallory-{i}",
            step=STEP if i % 2 else f"no such step {i}",
            comment=big if i % 200 == 100 else "let me in",
        )
        await handle.signal(GateProbe.approve, junk)

    async def all_counted() -> bool:
        return (await status(handle)).refused_decisions == 1_000

    await eventually(all_counted, timeout=120, message="every junk signal counted")
    current = await status(handle)
    assert len(current.decisions) <= 2 * KEEP_REFUSED_PER_STEP
    assert all(
        len(d.approver) <= MAX_NAME and len(d.comment) <= MAX_COMMENT for d in current.decisions
    )
    assert len(current.model_dump_json()) < 20_000

    await handle.execute_update(GateProbe.decide, Decision(approver="bob"))
    assert (await handle.result()).outcome == Outcome.DONE
    size = (await handle.describe()).raw_description.workflow_execution_info.history_size_bytes
    # The signals' own payloads are in history (Temporal stores every signal it accepts); the
    # run adds nothing that grows with them. Ten 1 MB signals and 990 small ones: ~10.5 MB,
    # a fifth of Temporal's 50 MB history limit.
    assert size < 12_000_000, size
