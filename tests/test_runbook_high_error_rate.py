"""High Error Rate end to end: a stuck worker pool or a bad rollout fails tasks; contain, remedy
the cause triage found (restart, or roll back), recover."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import Client

from activities.metrics import SqlMetrics
from runtime.astra_config import INTAKE_PAUSED_KEY
from sandbox.faults import BadRolloutFault, bad_rollout, error_spike
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import RunningAstra, config_value, worker_pods
from tests.helpers import decide, start
from workflows.high_error_rate import HighErrorRate, HighErrorRateRequest
from workflows.models import Outcome

pytestmark = pytest.mark.usefixtures("astra_worker")

WINDOW = 3.0


async def stick_the_pool(astra: RunningAstra) -> None:
    async with astra.between_ticks():
        await error_spike(astra.target, share=0.5, window_seconds=WINDOW, tasks=40, stuck_pool=True)


async def roll_out_a_bad_build(kube: KubeSandbox, astra: RunningAstra) -> BadRolloutFault:
    """Roll the workers to a bad build, and wait until its pods are failing tasks."""
    fault = await bad_rollout(astra.target, kube.api)

    async def failing() -> bool:
        rate = await SqlMetrics(astra.target.dsn).failure_rate(WINDOW)
        return rate.rate > 0.2 and worker_images(kube) == {fault.image}

    await eventually(failing, timeout=15, interval=0.1, message="the bad build failing tasks")
    return fault


def worker_images(kube: KubeSandbox) -> set[str]:
    return {
        p["spec"]["containers"][0]["image"]
        for p in kube.cluster.pods("astra", {"app": "astra-worker"})
    }


def worker_deployment(kube: KubeSandbox) -> dict[str, Any]:
    deployment = kube.cluster.get("deployments", "astra", "astra-worker")
    assert deployment is not None
    return deployment


def request(**overrides: object) -> HighErrorRateRequest:
    return HighErrorRateRequest.model_validate(
        {
            "requester": "erin",
            "window_seconds": WINDOW,
            "settle_seconds": 1,
            "verify_timeout_seconds": 20,
            **overrides,
        }
    )


async def test_contained_pool_restarted_and_rate_recovers(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    await stick_the_pool(astra)
    stuck = worker_pods(kube)
    handle = await start(client, HighErrorRate, request(), task_queue)

    await decide(handle, "approve pausing intake", "alice")
    await decide(handle, "approve restarting the stuck pool", "carol")
    # Intake of the failing class stays paused until the pool is restarted.
    assert config_value(kube, INTAKE_PAUSED_KEY) == "TimeoutError"
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert not worker_pods(kube) & stuck and len(worker_pods(kube)) == 3
    assert config_value(kube, INTAKE_PAUSED_KEY) == ""
    rate = await SqlMetrics(astra.target.dsn).failure_rate(WINDOW)
    assert rate.total > 0 and rate.rate <= 0.05


async def test_bad_rollout_is_rolled_back_and_rate_recovers(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    fault = await roll_out_a_bad_build(kube, astra)
    handle = await start(client, HighErrorRate, request(recent_rollout_seconds=120), task_queue)

    await decide(handle, "approve pausing intake", "alice")
    await decide(handle, "approve rolling back the last rollout", "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert "from revision 2 to 1" in result.summary
    assert worker_images(kube) == {fault.previous_image}
    annotations = worker_deployment(kube)["metadata"]["annotations"]
    assert annotations["deployment.kubernetes.io/revision"] == "3"  # revision 1, reused
    assert annotations["kubernetes.io/change-cause"] == "release 1.0.0"
    assert config_value(kube, INTAKE_PAUSED_KEY) == ""
    rate = await SqlMetrics(astra.target.dsn).failure_rate(WINDOW)
    assert rate.total > 0 and rate.rate <= 0.05
