"""A worker that dies (SIGKILL) or is stopped (SIGTERM) in the middle of a Shard Scaling step, as
a real `astra-ops worker` process: the next worker finishes the run, and each Deployment is
restarted exactly once, counted on the sandbox cluster (its ReplicaSet revisions).

The sandbox cluster holds one request of the run (the test's ``trap``) until the test has killed
or stopped the worker, so the fault lands inside the step the test names, before or after its
effect reached the cluster. bench/recovery.py measures how soon such runs resume; nothing here
asserts a time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from activities.heartbeats import HANDED_BACK
from activities.kube_annotations import REVISION
from runtime.settings import ENV_PREFIX, Settings
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox, eventually, kube_sandbox
from tests.helpers import (
    awaiting_approval,
    handle_of,
    settings_env,
    shard_count,
    status,
    wait_for_step,
)
from workflows.models import Decision, Outcome, RunbookResult, StepState

ASTRA_OPS = Path(sys.executable).parent / "astra-ops"
DEPLOYMENTS = ("astra-scheduler", "astra-worker")
RESTART = "restart astra-scheduler"
RUN_SECONDS = 120
"""A deadline for a run to end once a worker runs it again, far above what it takes."""


class Trap:
    """Holds the n-th request of one kind, once, until the test releases it: while the worker
    waits on the cluster, the test kills or stops it."""

    def __init__(self) -> None:
        self.method, self.path, self.nth, self.seen = "", "", 0, 0
        self.reached = threading.Event()
        self.released = threading.Event()

    def arm(self, method: str, path: str, nth: int = 1) -> None:
        self.method, self.path, self.nth = method, path, nth

    def __call__(self, method: str, path: str, query: Mapping[str, str]) -> None:
        if (method, path) != (self.method, self.path):
            return
        self.seen += 1
        if self.seen == self.nth:
            self.reached.set()
            self.released.wait(timeout=RUN_SECONDS)


@pytest.fixture
def trap() -> Trap:
    return Trap()


@pytest.fixture
def kube(trap: Trap) -> Iterator[KubeSandbox]:
    """The sandbox cluster, holding the request the test's trap names."""
    with kube_sandbox(observer=trap) as sandbox:
        try:
            yield sandbox
        finally:
            trap.released.set()  # the server stops only once its loop is free


def environment(settings: Settings) -> dict[str, str]:
    """The test's settings as a worker process reads them: ``ASTRA_OPS_*`` variables."""
    return {**os.environ, **settings_env(settings)}


WORKER = (str(ASTRA_OPS), "worker")
"""The production worker, as deployed."""


@asynccontextmanager
async def worker_process(
    settings: Settings,
    log: Path,
    command: Sequence[str] = WORKER,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker (``command``) in a process of its own, its output in ``log``, with the test's
    settings and ``env`` besides; killed if the test left it running."""
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=environment(settings) | dict(env or {}), stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def approved_run(runs: Runs, client: Client, namespace: str) -> WorkflowHandle[Any, Any]:
    """A Shard Scaling run of ``namespace`` to 12 shards, approved as soon as it asks."""
    started = await runs.start(
        "shard-scaling",
        {"shards": 12, "namespace": namespace},
        requester="alice",
        reason="worker recovery test",
    )
    handle = handle_of(client, started.run_id)
    await awaiting_approval(handle, "approve scaling")
    await runs.decide(started.run_id, Decision(approver="bob"))
    return handle


def restarts(
    kube: KubeSandbox, namespace: str, deployments: Sequence[str] = DEPLOYMENTS
) -> dict[str, int]:
    """How often each Deployment was restarted: its ReplicaSet revisions past the seeded one."""
    counts = {}
    for name in deployments:
        deployment = kube.cluster.get("deployments", namespace, name)
        assert deployment is not None
        counts[name] = int(deployment["metadata"]["annotations"][REVISION]) - 1
    return counts


async def attempts(client: Client, handle: WorkflowHandle[Any, Any], step: str) -> tuple[int, str]:
    """The attempt that completed ``step``'s activity, and the worker that ran it."""
    summaries: dict[int, str] = {}
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            [summary] = await client.data_converter.decode([event.user_metadata.summary])
            summaries[event.event_id] = summary
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            if summaries.get(started.scheduled_event_id) == step:
                return started.attempt, started.identity
    raise AssertionError(f"no activity of step '{step}' started in {handle.id}")


async def finished(handle: WorkflowHandle[Any, RunbookResult]) -> RunbookResult:
    return await asyncio.wait_for(handle.result(), RUN_SECONDS)


@pytest.mark.parametrize(
    ("method", "nth", "said"),
    [
        # The restart reads the Deployment (the health check read it first), then patches it.
        ("GET", 2, "restarted {target} ("),
        # The second kill runs in `make proof` (tests marked slow), the first in `make test`.
        pytest.param("PATCH", 1, "{target} was already restarted by", marks=pytest.mark.slow),
    ],
    ids=["before-its-patch", "after-its-patch-reached-the-cluster"],
)
async def test_a_worker_killed_in_a_restart_step_leaves_each_deployment_restarted_once(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    trap: Trap,
    tmp_path: Path,
    method: str,
    nth: int,
    said: str,
) -> None:
    trap.arm(method, f"/apis/apps/v1/namespaces/{namespace}/deployments/astra-scheduler", nth)
    async with worker_process(settings, tmp_path / "killed.log") as first:
        handle = await approved_run(runs, client, namespace)
        await eventually(trap.reached.is_set, timeout=60, message="the restart reaches the cluster")
        assert (await status(handle)).current_step == RESTART
        first.kill()
        await first.wait()
    trap.released.set()

    async with worker_process(settings, tmp_path / "next.log"):
        result = await finished(handle)

    assert result.outcome == Outcome.DONE
    assert shard_count(kube, namespace) == "12"
    assert restarts(kube, namespace) == {"astra-scheduler": 1, "astra-worker": 1}
    step = {s.name: s for s in result.steps}[RESTART]
    assert step.detail.startswith(said.format(target=f"{namespace}/astra-scheduler")), step.detail
    assert (await attempts(client, handle, RESTART))[
        0
    ] == 2  # the killed attempt, then the next worker's


@pytest.mark.slow
async def test_a_stopped_worker_finishes_the_step_it_is_in_and_the_next_worker_goes_on(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    trap: Trap,
    tmp_path: Path,
) -> None:
    trap.arm("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/astra-scheduler")
    async with worker_process(settings, tmp_path / "stopped.log") as first:
        handle = await approved_run(runs, client, namespace)
        await eventually(trap.reached.is_set, timeout=60, message="the restart reaches the cluster")
        first.terminate()
        trap.released.set()
        assert await asyncio.wait_for(first.wait(), RUN_SECONDS) == 0
    # The restart in flight finished on the stopping worker, its result reported: not retried.
    assert await attempts(client, handle, RESTART) == (1, f"{first.pid}@{socket.gethostname()}")

    async with worker_process(settings, tmp_path / "next.log"):
        result = await finished(handle)
    assert result.outcome == Outcome.DONE
    assert restarts(kube, namespace) == {"astra-scheduler": 1, "astra-worker": 1}


@pytest.mark.slow
async def test_a_stopped_worker_hands_a_rollout_wait_back_without_waiting_out_its_grace(
    runs: Runs,
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    kube.cluster.stall("astra-worker")
    # A grace far beyond the test's deadline: only a wait handed back lets the worker exit.
    grace = {f"{ENV_PREFIX}WORKER_GRACEFUL_SHUTDOWN_SECONDS": "3600"}
    async with worker_process(settings, tmp_path / "stopped.log", env=grace) as first:
        handle = await approved_run(runs, client, namespace)
        await wait_for_step(handle, "wait for astra-worker", StepState.RUNNING, within=60)
        first.terminate()
        assert await asyncio.wait_for(first.wait(), RUN_SECONDS) == 0
    [waiting] = (await handle.describe()).raw_description.pending_activities
    assert waiting.last_failure.application_failure_info.type == HANDED_BACK

    kube.cluster.unstall("astra-worker")
    async with worker_process(settings, tmp_path / "next.log"):
        result = await finished(handle)
    assert result.outcome == Outcome.DONE
    assert restarts(kube, namespace) == {"astra-scheduler": 1, "astra-worker": 1}
