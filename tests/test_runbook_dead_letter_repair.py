"""Dead-letter Repair end to end: requeue what died of transient errors, once; report the rest."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from runtime.access import load_policy
from runtime.settings import Settings
from sandbox.faults import DeadLettersFault, dead_letters
from sandbox.loadgen import SandboxKeys
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.conftest_sandbox import RunningAstra, decide, start
from tests.helpers import TEST_SIGNER, awaiting_approval
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


async def test_rejected_repair_leaves_entries_for_the_next_run(
    client: Client,
    task_queue: str,
    astra: RunningAstra,
    redis_client: aioredis.Redis,
    group: str,
) -> None:
    fault = await publish(astra)
    handle = await start(client, DeadLetterRepair, request(group), task_queue)
    await decide(handle, "approve handling the dead letters", "bob", "reject")
    assert (await handle.result()).outcome == Outcome.REJECTED

    assert set((await statuses(astra, fault)).values()) == {"dead_letter"}
    assert await unacknowledged(astra, redis_client, group) == len(fault.entries)


async def test_a_narrow_retryable_list_still_asks_before_acknowledging_anything(
    client: Client,
    task_queue: str,
    astra: RunningAstra,
    redis_client: aioredis.Redis,
    group: str,
) -> None:
    """An attack from the issue: a request that calls nothing retryable used to skip the approval
    and acknowledge every dead letter. Now a person decides before anything leaves the stream."""
    fault = await publish(astra)
    narrow = request(group, retryable_errors=["RateLimitError"])
    handle = await start(client, DeadLetterRepair, narrow, task_queue)
    await awaiting_approval(handle, "approve handling the dead letters")
    assert await unacknowledged(astra, redis_client, group) == len(fault.entries)
    await decide(handle, "approve handling the dead letters", "bob", "reject")
    assert (await handle.result()).outcome == Outcome.REJECTED
    assert await unacknowledged(astra, redis_client, group) == len(fault.entries)


async def test_dry_run_changes_nothing(
    client: Client,
    task_queue: str,
    astra: RunningAstra,
    redis_client: aioredis.Redis,
    group: str,
) -> None:
    fault = await publish(astra)
    handle = await start(client, DeadLetterRepair, request(group, dry_run=True), task_queue)
    result = await handle.result()

    assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run:")
    assert set((await statuses(astra, fault)).values()) == {"dead_letter"}
    assert await astra.query("SELECT count(*) FROM astra_ops_requeues") == [(0,)]
    assert await unacknowledged(astra, redis_client, group) == len(fault.entries)


async def test_bad_batch_size_is_refused(client: Client, astra_settings: Settings) -> None:
    runs = Runs(
        client, astra_settings.task_queue, load_policy(astra_settings.access_policy), TEST_SIGNER
    )
    with pytest.raises(InvalidInput, match="batch_size"):
        await runs.start("dead-letter-repair", {"batch_size": "-1"}, requester="alice")
