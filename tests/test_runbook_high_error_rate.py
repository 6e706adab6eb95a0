"""High Error Rate end to end: a bad rollout fails tasks; triage blames it on the real rollout
history and pod names, intake is contained, the rollout rolled back, and the rate recovers.
(Every branch, the stuck pool's restart included, is in tests/test_high_error_rate_branches.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import Client

from activities.metrics import SqlMetrics
from runtime.astra_config import INTAKE_PAUSED_KEY
from sandbox.faults import BadRolloutFault, bad_rollout
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import RunningAstra, config_value
from tests.helpers import decide, start
from workflows.high_error_rate import HighErrorRate, HighErrorRateRequest
from workflows.models import Outcome

pytestmark = pytest.mark.usefixtures("astra_worker")

WINDOW = 3.0


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
