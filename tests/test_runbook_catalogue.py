"""The catalogue shows the steps a run really takes.

Every runbook runs in dry-run on the simulated Astra, with the fault it exists for, and records
exactly the steps its catalogue entry lists for that request, in that order: a step the code
runs that the entry omits shows up, and so does one the entry lists but no run can reach under
that name.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from temporalio.client import Client

from sandbox.faults import cost_spike, dead_letters, error_spike, worker_lost
from starters.runbook_cards import runbook_card
from tests.conftest_data import delete_prefix
from tests.conftest_sandbox import TICK_SECONDS, RunningAstra
from tests.helpers import start, status
from workflows.catalogue import RUNBOOKS
from workflows.models import Outcome, StepState
from workflows.shard_scaling import ShardScalingRequest


async def first_vault_setup(astra: RunningAstra) -> dict[str, Any]:
    # A path nothing is stored at yet, so every step has something to do (the session's OpenBao).
    return {"path": f"astra-{uuid.uuid4().hex[:8]}", "source": "directory:astra"}


Scenario = Callable[[RunningAstra], Awaitable[dict[str, Any]]]


async def scaling(astra: RunningAstra) -> dict[str, Any]:
    # A scheduler under another name (another Deployment of the sandbox): its steps carry it.
    return {"shards": 12, "scheduler": "goal-service"}


async def lost_worker(astra: RunningAstra) -> dict[str, Any]:
    async with astra.between_ticks():
        fault = await worker_lost(astra.target)
    return {"worker_id": fault.worker_id}


async def stuck_pool(astra: RunningAstra) -> dict[str, Any]:
    async with astra.between_ticks():
        await error_spike(astra.target, share=0.5, window_seconds=3, tasks=40, stuck_pool=True)
    return {"window_seconds": 3, "settle_seconds": 1}


async def spend_spike(astra: RunningAstra) -> dict[str, Any]:
    async with astra.between_ticks():
        await astra.generator.seed_history(days=3600 / 86_400, step_interval=TICK_SECONDS)
        await cost_spike(astra.target, multiplier=10, window_seconds=3, baseline_seconds=3600)
    return {"window_seconds": 3, "baseline_seconds": 3600, "route_to": "gpt-4o-mini"}


async def published_dead_letters(astra: RunningAstra) -> dict[str, Any]:
    async with astra.between_ticks():
        await dead_letters(astra.target, count=10, retryable_share=0.5)
    return {"group": f"repair-{uuid.uuid4().hex[:8]}", "batch_size": 2}


async def flushed_redis(astra: RunningAstra) -> dict[str, Any]:
    # The test's Redis is shared: its own keys go, as a FLUSHALL would take them.
    async with astra.between_ticks():
        await delete_prefix(astra.target.key_prefix, astra.target.redis_url)
    return {}


async def certificates_in_window(astra: RunningAstra) -> dict[str, Any]:
    # The sandbox's certificates are a third into their life: a wider window makes all three due.
    return {"renewal_window_share": 0.9}


DRY_RUNS: dict[str, Scenario] = {
    "shard-scaling": scaling,
    "worker-lost": lost_worker,
    "high-error-rate": stuck_pool,
    "llm-cost-spike": spend_spike,
    "dead-letter-repair": published_dead_letters,
    "redis-failure": flushed_redis,
    "vault-setup": first_vault_setup,
    "tls-rotation": certificates_in_window,
}
"""What each runbook's dry-run needs, so that it takes its whole path: the fault it is for."""


def test_steps_are_named_after_the_request() -> None:
    spec = RUNBOOKS["shard-scaling"].spec
    custom = ShardScalingRequest(requester="alice", shards=3, scheduler="sched-b", workers="w-b")
    steps = spec.steps_for(custom)
    rollout = [s for s in steps if s.startswith(("restart ", "wait for "))]
    assert rollout == ["restart sched-b", "wait for sched-b", "restart w-b", "wait for w-b"]
    assert not [s for s in steps if "astra-scheduler" in s or "astra-worker" in s]
    assert "restart astra-scheduler" in spec.steps_for()  # the defaults, for the generic list
    assert runbook_card(spec, None, custom).steps == steps  # what `runbooks` shows


@pytest.mark.usefixtures("astra_worker")
@pytest.mark.parametrize("name", sorted(RUNBOOKS))
async def test_a_dry_run_records_exactly_the_catalogue_steps_of_its_request(
    name: str, client: Client, task_queue: str, astra: RunningAstra
) -> None:
    scenario = DRY_RUNS.get(name)
    assert scenario is not None, f"give {name} a dry-run scenario in DRY_RUNS"
    runbook = RUNBOOKS[name]
    params = await scenario(astra)
    request = runbook.spec.request.model_validate({"requester": "alice", "dry_run": True, **params})
    handle = await start(client, runbook, request, task_queue)
    result = await handle.result()
    recorded = (await status(handle)).steps

    assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run:"), result
    assert [s.name for s in recorded] == runbook.spec.steps_for(request)
    assert all(s.state in (StepState.DONE, StepState.SKIPPED) for s in recorded), recorded
