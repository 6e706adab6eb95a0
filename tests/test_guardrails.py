"""Guardrails: the access policy owns who may start what and every threshold that decides whether
a person is asked; the kill switch holds every mutating step; unattended actions are budgeted."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from activities.access import KILL_SWITCH_ID
from runtime import search_attributes as sa
from runtime.access import AccessPolicy, Limit, load_policy
from runtime.settings import REPO_ROOT, Settings
from sandbox.faults import worker_lost
from starters.run_views import DecisionRefused, InvalidInput, NotAllowed
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import RunningAstra, worker_pods
from tests.helpers import awaiting_approval, decide, handle_of, shard_count, start, status
from workflows.catalogue import RUNBOOKS
from workflows.models import Decision, Outcome, StepState
from workflows.worker_lost import WorkerLost, WorkerLostRequest

POLICY = REPO_ROOT / "deploy" / "access-policy.yaml"


def test_the_example_policy_covers_every_runbook_and_names_only_real_steps_and_parameters() -> None:
    policy = load_policy(POLICY)
    assert set(policy.runbooks) == set(RUNBOOKS)
    for name, runbook in RUNBOOKS.items():
        access = policy.runbook(name)
        steps = runbook.spec.steps_for()
        approval_steps = {s for s in steps if s.startswith("approve ")}
        assert set(access.approvals) == approval_steps, name
        assert set(access.automatic) <= set(steps), name
        fields = runbook.spec.request.model_fields
        for param, limit in access.limits.items():
            assert param in fields, (name, param)
            # The runbook's own default must be one the policy allows, so a run started
            # without the API (dev mode) is not looser than the policy either.
            assert limit.violation(param, fields[param].default) is None, (name, param)


def test_a_limit_allows_only_the_stricter_side_of_its_default() -> None:
    share = Limit(default=0.5, min=0.05)
    assert share.violation("stuck_pool_share", 0.2) is None
    assert "outside the access policy's bounds [0.05, 0.5]" in str(
        share.violation("stuck_pool_share", 1)
    )
    classes = Limit(default=["TimeoutError", "ConnectionError"])
    assert classes.violation("retryable_errors", ["TimeoutError"]) is None
    assert "ValueError is not allowed" in str(
        classes.violation("retryable_errors", ["TimeoutError", "ValueError"])
    )
    with pytest.raises(ValueError, match="min <= default <= max"):
        Limit(default=0.5, max=0.4)


@pytest.mark.parametrize(
    ("runbook", "params", "refusal"),
    [
        ("worker-lost", {"worker_id": "w-1", "stuck_pool_share": 1}, "stuck_pool_share=1.0 is"),
        (
            "worker-lost",
            {"worker_id": "w-1", "heartbeat_threshold_seconds": 1},
            "heartbeat_threshold_seconds=1.0 is outside",
        ),
        ("dead-letter-repair", {"retryable_errors": "ValueError"}, "ValueError is not allowed"),
        ("dead-letter-repair", {"batch_size": 500}, "batch_size=500 is outside"),
        ("high-error-rate", {"threshold": 0.9}, "threshold=0.9 is outside"),
        ("llm-cost-spike", {"multiplier": 10}, "multiplier=10.0 is outside"),
    ],
)
async def test_a_request_cannot_loosen_a_policy_threshold(
    runs: Runs, runbook: str, params: dict[str, object], refusal: str
) -> None:
    with pytest.raises(InvalidInput, match=refusal):
        await runs.start(runbook, params, requester="alice")


async def test_people_outside_the_start_groups_may_only_dry_run(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    params = {"shards": 4, "namespace": namespace}
    with pytest.raises(NotAllowed, match="dave may not start shard-scaling"):
        await runs.start("shard-scaling", params, requester="dave")
    with pytest.raises(NotAllowed, match="carol may not start shard-scaling"):
        await runs.start("shard-scaling", params, requester="carol")
    dry = await runs.start("shard-scaling", params, requester="dave", dry_run=True)
    result = await handle_of(client, dry.run_id).result()
    assert result.outcome == Outcome.DONE and result.dry_run


def test_operators_come_from_the_policy() -> None:
    policy: AccessPolicy = load_policy(POLICY)
    assert policy.is_operator("alice") and not policy.is_operator("carol")


async def test_the_kill_switch_holds_mutating_steps_refuses_starts_and_resumes(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    run_id = (
        await runs.start("shard-scaling", {"shards": 12, "namespace": namespace}, requester="alice")
    ).run_id
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")

    with pytest.raises(NotAllowed, match="carol is not an operator"):
        await runs.freeze("carol", "no")
    said = await runs.freeze("alice", "database failover in progress")
    assert said.startswith("frozen by alice")
    try:
        with pytest.raises(DecisionRefused, match="already frozen by alice"):
            await runs.freeze("bob", "me too")

        async def told() -> bool:
            return (await status(handle)).frozen_by == "alice"

        await eventually(told, timeout=10, message="the open run heard the freeze")
        # Deciding still works; the change itself waits.
        await runs.decide(run_id, Decision(approver="bob"))

        async def held() -> bool:
            steps = {s.name: s for s in (await status(handle)).steps}
            return steps["set TASK_SHARD_COUNT"].state == StepState.FROZEN

        await eventually(held, timeout=10, message="the first mutating step held")
        held_step = {s.name: s for s in (await status(handle)).steps}["set TASK_SHARD_COUNT"]
        assert held_step.detail == "frozen by alice: database failover in progress"
        description = await handle.describe()
        assert description.typed_search_attributes.get(sa.STEP) == (
            "frozen before: set TASK_SHARD_COUNT"
        )
        metadata = await handle.query("__temporal_workflow_metadata")
        assert "FROZEN by alice: database failover in progress" in metadata.current_details
        assert shard_count(kube, namespace) == "8"

        other = f"{namespace}-x"
        with pytest.raises(DecisionRefused, match="only dry runs start until"):
            await runs.start("shard-scaling", {"shards": 3, "namespace": other}, requester="bob")
    finally:
        with pytest.raises(NotAllowed, match="carol is not an operator"):
            await runs.unfreeze("carol")
        assert "unfrozen by bob" in await runs.unfreeze("bob", "failover done")

    result = await handle.result()
    assert result.outcome == Outcome.DONE
    assert shard_count(kube, namespace) == "12"
    switch = await client.get_workflow_handle(KILL_SWITCH_ID).result()
    assert switch == (
        "frozen by alice (database failover in progress); lifted by bob (failover done)"
    )
    with pytest.raises(DecisionRefused, match="not frozen"):
        await runs.unfreeze("bob")


async def test_a_freeze_straight_to_a_run_without_an_operator_signature_is_ignored(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    from workflows.models import FreezeNotice

    run_id = (
        await runs.start("shard-scaling", {"shards": 12, "namespace": namespace}, requester="alice")
    ).run_id
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")
    await handle.signal("unfreeze", FreezeNotice(actor="alice", reason="forged"))
    await handle.signal("freeze", FreezeNotice(actor="mallory", reason="forged"))

    async def counted() -> bool:
        return (await status(handle)).refused_decisions == 2

    await eventually(counted, message="both forged notices refused")
    assert (await status(handle)).frozen_by is None
    await runs.cancel(run_id, "alice")
    await handle.result()


@pytest.mark.usefixtures("astra_worker")
async def test_unattended_pod_deletions_past_the_budget_ask_a_person(
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
) -> None:
    async with astra.between_ticks():
        fault = await worker_lost(astra.target)
    # Three deletions in this pool within the hour already happened without a person.
    scope = "worker-lost/delete the worker's pod/astra/astra-worker"
    async with await psycopg.AsyncConnection.connect(astra_settings.state_dsn) as conn:
        for _ in range(3):
            await conn.execute(
                "INSERT INTO astra_ops_automatic_actions (token, scope) VALUES (%s, %s)",
                (uuid.uuid4().hex, scope),
            )
        await conn.commit()
    request = WorkerLostRequest(
        requester="alice", worker_id=fault.worker_id, verify_timeout_seconds=20
    )
    handle = await start(client, WorkerLost, request, task_queue)
    step = "approve deleting more pods than the automatic limit"
    await decide(handle, step, "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    approval = {s.name: s for s in result.steps}[step]
    assert approval.detail == "approved by carol"
    assert fault.worker_id not in worker_pods(kube)
    pending = await status(handle)
    assert pending.pending_approvals == []


async def test_an_unsigned_start_straight_to_temporal_is_refused_outside_dev_mode(
    client: Client, task_queue: str, worker: Worker, namespace: str
) -> None:
    from workflows.shard_scaling import ShardScalingRequest

    request = ShardScalingRequest(requester="bob", shards=5, namespace=namespace)
    handle = await client.start_workflow(
        "shard-scaling", request, id=f"shard-scaling/{namespace}", task_queue=task_queue
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    assert "refused: start by bob is not signed by the astra-ops API" in str(failure.value.cause)
