"""The catalogue shows the steps a run really takes.

Every runbook runs in dry-run on the simulated Astra, with the fault it exists for, and records
exactly the steps its catalogue entry lists for that request, in that order: a step the code
runs that the entry omits shows up, and so does one the entry lists but no run can reach under
that name.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CoreV1Api
from temporalio.client import Client

from runtime.astra_config import DATABASE_URL_KEY
from runtime.settings import Settings
from sandbox.faults import cost_spike, dead_letters, error_spike, worker_lost
from sandbox.kube.seed import ASTRA_NAMESPACE, CONFIG_MAP
from sandbox.servers import faults as server_faults
from sandbox.servers import running_data_plane, scratch_dir
from starters.runbook_cards import runbook_card
from tests.conftest_data import delete_prefix
from tests.conftest_kube import KubeSandbox
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


async def primary_down(astra: RunningAstra) -> dict[str, Any]:
    # The fault (a replicated PostgreSQL whose primary is killed) is `astra_settings`' below:
    # the worker's topology must list the servers before it starts.
    return {"grace_seconds": 1, "check_timeout_seconds": 1}


async def flushed_redis(astra: RunningAstra) -> dict[str, Any]:
    # The test's Redis is shared: its own keys go, as a FLUSHALL would take them.
    async with astra.between_ticks():
        await delete_prefix(astra.target.key_prefix, astra.target.redis_url)
    return {}


async def certificates_in_window(astra: RunningAstra) -> dict[str, Any]:
    # The sandbox's certificates are a third into their life: a wider window makes all three due.
    return {"renewal_window_share": 0.9}


async def new_worker_image(astra: RunningAstra) -> dict[str, Any]:
    return {"image": "registry.sandbox.local/astra/astra-worker:1.1.0"}


DRY_RUNS: dict[str, Scenario] = {
    "shard-scaling": scaling,
    "worker-lost": lost_worker,
    "high-error-rate": stuck_pool,
    "llm-cost-spike": spend_spike,
    "dead-letter-repair": published_dead_letters,
    "postgres-outage": primary_down,
    "redis-failure": flushed_redis,
    "vault-setup": first_vault_setup,
    "tls-rotation": certificates_in_window,
    "canary-upgrade": new_worker_image,
    "blue-green-upgrade": new_worker_image,
}
"""What each runbook's dry-run needs, so that it takes its whole path: the fault it is for."""


@pytest.fixture
async def astra_settings(
    astra_settings: Settings, astra: RunningAstra, kube: KubeSandbox, tmp_path: Path, name: str
) -> AsyncIterator[Settings]:
    """conftest_sandbox's; for postgres-outage also a synchronous PostgreSQL primary and
    replica of the test's own with the primary killed, named by ``astra-config`` and listed in
    the worker's data-plane topology."""
    if name != "postgres-outage":
        yield astra_settings
        return
    directory = scratch_dir("astra-test-catalogue-")
    try:
        async with running_data_plane(
            directory, astra.target.dsn, astra.target.redis_url, replication="sync"
        ) as plane:
            topology = plane.topology()
            topology.write(tmp_path / "topology.json")
            CoreV1Api(kube.api).patch_namespaced_config_map(
                CONFIG_MAP,
                ASTRA_NAMESPACE,
                {"data": {DATABASE_URL_KEY: topology.postgres[0].platform_dsn}},
            )
            await server_faults.pg_primary_down(plane)
            yield astra_settings.model_copy(
                update={"data_plane_topology": tmp_path / "topology.json"}
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


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
