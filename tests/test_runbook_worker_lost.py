"""Worker Lost end to end: a real lost worker in the sandbox, the runbook, the platform after."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import Client, WorkflowFailureError

from runtime.access import load_policy
from runtime.settings import Settings
from sandbox.faults import WorkerLostFault, worker_lost
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import RunningAstra, decide, start, worker_pods
from tests.helpers import TEST_SIGNER
from workflows.models import Outcome
from workflows.worker_lost import WorkerLost, WorkerLostRequest

pytestmark = pytest.mark.usefixtures("astra_worker")


def request(fault: WorkerLostFault, **overrides: object) -> WorkerLostRequest:
    return WorkerLostRequest.model_validate(
        {
            "requester": "alice",
            "worker_id": fault.worker_id,
            "verify_timeout_seconds": 20,
            **overrides,
        }
    )


async def lose_a_worker(astra: RunningAstra) -> WorkerLostFault:
    async with astra.between_ticks():
        fault = await worker_lost(astra.target)
    assert fault.leased_task_ids, "the busiest worker holds tasks"
    return fault


async def test_stuck_pool_approved_requeues_once_and_replaces_the_pod(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    fault = await lose_a_worker(astra)
    # One of three lost is more than a 20 % share: a stuck pool, so Agent Platform decides.
    handle = await start(client, WorkerLost, request(fault, stuck_pool_share=0.2), task_queue)
    await decide(handle, "approve replacing workers of a stuck pool", "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    after = worker_pods(kube)
    assert fault.worker_id not in after and len(after) == 3
    requeued = sorted(r[0] for r in await astra.query("SELECT task_id FROM astra_ops_requeues"))
    assert requeued == fault.leased_task_ids
    picked = await astra.query(
        "SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'pending'", requeued
    )
    assert picked == [(0,)]

    again = await (await start(client, WorkerLost, request(fault), task_queue)).result()
    assert again.outcome == Outcome.DONE and "requeued 0 tasks" in again.summary
    assert len(await astra.query("SELECT task_id FROM astra_ops_requeues")) == len(requeued)


async def test_dry_run_changes_nothing(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    fault = await lose_a_worker(astra)
    before = worker_pods(kube)
    handle = await start(client, WorkerLost, request(fault, dry_run=True), task_queue)
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert f"would requeue {len(fault.leased_task_ids)} tasks" in result.summary
    held = await astra.query(
        "SELECT id FROM tasks WHERE worker_id = %s AND status = 'running' ORDER BY id",
        fault.worker_id,
    )
    assert [r[0] for r in held] == fault.leased_task_ids
    assert worker_pods(kube) == before


async def test_unknown_worker_fails_clearly_and_changes_nothing(
    client: Client, astra_settings: Settings, kube: KubeSandbox, astra: RunningAstra
) -> None:
    runs = Runs(
        client, astra_settings.task_queue, load_policy(astra_settings.access_policy), TEST_SIGNER
    )
    before = worker_pods(kube)
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    started = await runs.start("worker-lost", {"worker_id": ghost}, requester="alice")
    with pytest.raises(WorkflowFailureError) as failed:
        await client.get_workflow_handle(started.run_id).result()
    assert f"unknown worker {ghost}" in str(failed.value.cause)
    assert worker_pods(kube) == before
    assert await astra.query("SELECT count(*) FROM astra_ops_requeues") == [(0,)]

    with pytest.raises(InvalidInput, match="heartbeat_threshold_seconds"):
        await runs.start(
            "worker-lost",
            {"worker_id": ghost, "heartbeat_threshold_seconds": "-30"},
            requester="alice",
        )
