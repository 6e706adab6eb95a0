"""Worker Lost end to end: a real lost worker in the sandbox, the runbook, the platform after."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from sandbox.faults import WorkerLostFault, worker_lost
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import RunningAstra, worker_pods
from tests.helpers import decide, start
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
