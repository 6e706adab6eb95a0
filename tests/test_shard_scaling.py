"""Shard Scaling end to end: the production worker, the real dev server, the sandbox cluster."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import CancelledError
from temporalio.worker import Worker

from starters.run_views import NotAllowed, OpenRunConflict
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.helpers import (
    awaiting_approval,
    current_config_hash,
    handle_of,
    pod_hashes,
    shard_count,
    status,
    wait_for_step,
)
from workflows.models import CancelRequest, Decision, Outcome, StepState


async def start(runs: Runs, namespace: str, shards: int = 12, **params: object) -> str:
    started = await runs.start(
        "shard-scaling",
        {"shards": shards, "namespace": namespace, **params},
        requester="alice",
        reason="rebalance hot shards",
    )
    return started.run_id


async def test_scales_after_approval_and_restarts_scheduler_before_workers(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    run_id = await start(runs, namespace)
    assert run_id == f"shard-scaling/{namespace}"
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")
    assert shard_count(kube, namespace) == "8"  # nothing changes before a person says so

    said = await runs.decide(run_id, Decision(approver="bob", decision="approve", comment="ok"))
    assert "approved by bob" in said
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert shard_count(kube, namespace) == "12"
    expected = current_config_hash(kube, namespace)
    assert pod_hashes(kube, namespace, "astra-scheduler") == {expected}
    assert pod_hashes(kube, namespace, "astra-worker") == {expected}
    steps = {s.name: s for s in result.steps}
    assert all(s.state == StepState.DONE for s in steps.values()), steps
    scheduler_ready = steps["wait for astra-scheduler"].finished_at
    workers_restarted = steps["restart astra-worker"].started_at
    assert scheduler_ready and workers_restarted and scheduler_ready <= workers_restarted
    # Lists filter on AstraStep: it names what changes or waits for people, not every reading.
    assert await astra_steps(handle) == [
        "approve scaling",
        "set TASK_SHARD_COUNT",
        "restart astra-scheduler",
        "restart astra-worker",
    ]

    assert "approved by bob" in steps["approve scaling"].detail
    assert steps["read current shard count"].detail == "TASK_SHARD_COUNT=8"
    assert "ready 1" in steps["check astra-scheduler health"].detail


async def test_cancel_after_the_change_rolls_back(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    kube.cluster.stall("astra-worker")
    run_id = await start(runs, namespace)
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")
    await runs.decide(run_id, Decision(approver="bob"))
    await wait_for_step(handle, "wait for astra-worker", StepState.RUNNING)
    assert shard_count(kube, namespace) == "12"

    said = await runs.cancel(run_id, "bob", "wrong cluster")
    assert said == "cancelled by bob; undoing what the run changed"
    await wait_for_step(handle, "roll back: set TASK_SHARD_COUNT", StepState.DONE)
    kube.cluster.unstall("astra-worker")
    result = await handle.result()

    assert result.outcome == Outcome.CANCELLED
    assert result.summary.startswith("cancelled by bob: wrong cluster; rolled back")
    steps = {s.name: s for s in result.steps}
    assert steps["wait for astra-worker"].state == StepState.FAILED
    assert steps["wait for astra-worker"].detail == "cancelled by bob"
    assert steps["verify astra-worker runs the new config"].state == StepState.SKIPPED
    assert (await status(handle)).cancelled_by == "bob"
    assert shard_count(kube, namespace) == "8"
    expected = current_config_hash(kube, namespace)
    assert pod_hashes(kube, namespace, "astra-worker") == {expected}


async def test_a_cancel_is_refused_to_whom_the_policy_does_not_allow_it(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    run_id = await start(runs, namespace)
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")
    with pytest.raises(NotAllowed, match="carol may not cancel this shard-scaling run"):
        await runs.cancel(run_id, "carol")
    # Straight to Temporal, unsigned, as someone allowed: the run's validator refuses it too.
    with pytest.raises(WorkflowUpdateFailedError) as unsigned:
        await handle.execute_update("cancel", CancelRequest(actor="bob"), result_type=str)
    assert "not signed by the astra-ops API" in str(unsigned.value.cause)
    assert (await status(handle)).cancelled_by is None

    await runs.cancel(run_id, "alice", "changed my mind")  # the requester may
    assert (await handle.result()).outcome == Outcome.CANCELLED


async def test_temporal_cancel_is_shown_as_by_an_unknown_identity(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    run_id = await start(runs, namespace)
    handle = handle_of(client, run_id)
    await awaiting_approval(handle, "approve scaling")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    final = await status(handle)
    assert final.outcome == Outcome.CANCELLED
    assert final.summary == "cancelled by an unknown identity (a Temporal cancel request)"
    assert {s.name: s.state for s in final.steps}["approve scaling"] == StepState.FAILED


async def test_a_second_start_returns_the_open_run_only_for_the_same_request(
    runs: Runs, client: Client, worker: Worker, namespace: str
) -> None:
    params = {"shards": 12, "namespace": namespace}
    first = await runs.start("shard-scaling", params, requester="alice")
    again = await runs.start("shard-scaling", params, requester="alice")
    assert (first.existing, again.existing) == (False, True)
    assert first.run_id == again.run_id

    with pytest.raises(OpenRunConflict, match="already open, started by alice") as other_user:
        await runs.start("shard-scaling", params, requester="bob")
    assert other_user.value.details["requester"] == "alice"
    assert other_user.value.details["params"]["shards"] == 12
    with pytest.raises(OpenRunConflict, match="shards=12"):
        await runs.start("shard-scaling", {**params, "shards": 16}, requester="alice")

    await handle_of(client, first.run_id).cancel()
    await asyncio.gather(handle_of(client, first.run_id).result(), return_exceptions=True)


async def astra_steps(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Each value the run gave ``AstraStep``, in order, from its history."""
    values = []
    async for event in handle.fetch_history_events():
        if event.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
            if "AstraStep" in fields.indexed_fields:
                values.append(json.loads(fields.indexed_fields["AstraStep"].data))
    return values
