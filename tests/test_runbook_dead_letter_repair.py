"""Dead-letter Repair end to end: requeue what died of transient errors, once; report the rest."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from sandbox.faults import DeadLettersFault, dead_letters
from sandbox.loadgen import SandboxKeys
from tests.conftest_sandbox import RunningAstra
from tests.helpers import decide, start
from workflows.dead_letter_repair import DeadLetterRepair, DeadLetterRepairRequest
from workflows.models import Outcome

pytestmark = pytest.mark.usefixtures("astra_worker")


async def publish(astra: RunningAstra) -> DeadLettersFault:
    async with astra.between_ticks():
        return await dead_letters(astra.target, count=10, retryable_share=0.5)


def request(group: str, **overrides: object) -> DeadLetterRepairRequest:
    return DeadLetterRepairRequest.model_validate(
        {"requester": "alice", "group": group, "batch_size": 2, **overrides}
    )


async def statuses(astra: RunningAstra, fault: DeadLettersFault) -> dict[str, str]:
    rows = await astra.query("SELECT id, status FROM tasks WHERE id = ANY(%s)", fault.task_ids)
    return {task_id: status for task_id, status in rows}


async def unacknowledged(astra: RunningAstra, client: aioredis.Redis, group: str) -> int:
    pending = await client.xpending(SandboxKeys(astra.target.key_prefix).dead_letter, group)
    return int(pending["pending"])


@pytest.fixture
def group() -> str:
    return f"repair-{uuid.uuid4().hex[:8]}"


async def test_retryable_requeued_once_rest_reported_all_acknowledged(
    client: Client,
    task_queue: str,
    astra: RunningAstra,
    redis_client: aioredis.Redis,
    group: str,
) -> None:
    fault = await publish(astra)
    retryable = {e.task_id for e in fault.entries if e.retryable}
    handle = await start(client, DeadLetterRepair, request(group), task_queue)
    await decide(handle, "approve handling the dead letters", "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    after = await statuses(astra, fault)
    assert {t for t, s in after.items() if s != "dead_letter"} == retryable
    requeued = await astra.query("SELECT task_id FROM astra_ops_requeues")
    assert sorted(r[0] for r in requeued) == sorted(retryable)
    assert await unacknowledged(astra, redis_client, group) == 0
    for task_id in set(fault.task_ids) - retryable:
        assert task_id in result.summary

    again = await (await start(client, DeadLetterRepair, request(group), task_queue)).result()
    assert again.outcome == Outcome.NO_CHANGE
