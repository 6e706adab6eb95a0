"""Blue-Green Upgrade end to end on the sandbox: green comes up beside blue taking no work, the
approved switch moves all of it to green at once, blue is kept for its window and then scaled
down (and is the green of the next release); a switch back during the window, by a person or by
a failing analysis, sends the work back to blue at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.client import Client

from sandbox.faults import bad_canary
from sandbox.kube.seed import RELEASE
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import RunningAstra
from tests.helpers import decide, start, wait_for_step
from workflows.blue_green_upgrade import (
    KEEP_BLUE,
    SWITCH,
    BlueGreenUpgrade,
    BlueGreenUpgradeRequest,
)
from workflows.models import Outcome, SteerAction, StepState

pytestmark = pytest.mark.usefixtures("astra_worker")

OLD = f"registry.sandbox.local/astra/astra-worker:{RELEASE}"
NEW = "registry.sandbox.local/astra/astra-worker:1.1.0"
BLUE, GREEN = "astra-worker", "astra-worker-green"


def request(keep_blue: float = 2, image: str = NEW, **overrides: Any) -> BlueGreenUpgradeRequest:
    return BlueGreenUpgradeRequest.model_validate(
        {
            "requester": "erin",
            "image": image,
            "keep_blue_seconds": keep_blue,
            "analysis_interval_seconds": 1,
            "min_samples": 3,
            "rollout_timeout_seconds": 30,
            **overrides,
        }
    )


def selector(kube: KubeSandbox) -> dict[str, str]:
    service = kube.cluster.get("services", "astra", BLUE)
    assert service is not None
    return dict(service["spec"]["selector"])


def images(kube: KubeSandbox, app: str) -> list[str]:
    return sorted(
        p["spec"]["containers"][0]["image"] for p in kube.cluster.pods("astra", {"app": app})
    )


def replicas(kube: KubeSandbox, name: str) -> int:
    deployment = kube.cluster.get("deployments", "astra", name)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


async def worked_on_since(astra: RunningAstra, app_pods: list[str], since: Any) -> int:
    rows = await astra.query(
        "SELECT count(*) FROM tasks WHERE worker_id = ANY(%s) AND updated_at > %s"
        " AND status = 'succeeded'",
        app_pods,
        since,
    )
    return int(rows[0][0])


async def test_the_switch_moves_the_work_to_green_and_the_next_release_back_to_blue(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    handle = await start(client, BlueGreenUpgrade, request(), task_queue)
    await wait_for_step(handle, SWITCH, StepState.AWAITING_APPROVAL)
    # Green is up on the new image and takes no work until the switch.
    assert images(kube, GREEN) == [NEW] * 3 and selector(kube) == {"app": BLUE}

    await decide(handle, SWITCH, "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert selector(kube) == {"app": GREEN}
    assert replicas(kube, BLUE) == 0 and images(kube, BLUE) == []
    kept = {s.name: s for s in result.steps}[KEEP_BLUE]
    assert kept.state == StepState.DONE and "passed" in kept.detail, kept.detail
    green_pods = [p["metadata"]["name"] for p in kube.cluster.pods("astra", {"app": GREEN})]
    assert await worked_on_since(astra, green_pods, kept.started_at) > 0

    # The next release brings blue back up on its image, and switches to it.
    again = await start(client, BlueGreenUpgrade, request(image=OLD), task_queue)
    await decide(again, SWITCH, "alice")
    result = await again.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert selector(kube) == {"app": BLUE}
    assert images(kube, BLUE) == [OLD] * 3 and replicas(kube, GREEN) == 0


async def test_a_switch_back_in_the_window_sends_the_work_back_to_blue(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, runs: Runs
) -> None:
    handle = await start(client, BlueGreenUpgrade, request(keep_blue=600), task_queue)
    await decide(handle, SWITCH, "carol")
    await wait_for_step(handle, KEEP_BLUE, StepState.RUNNING)
    assert selector(kube) == {"app": GREEN} and images(kube, BLUE) == [OLD] * 3

    said = await runs.steer(handle.id, "erin", SteerAction.SWITCH_BACK, "5xx on green")
    result = await handle.result()

    assert "switching back by erin" in said
    assert result.outcome == Outcome.ROLLED_BACK, result.summary
    assert "switched back by erin: 5xx on green" in result.summary
    assert selector(kube) == {"app": BLUE}
    assert replicas(kube, GREEN) == 0 and images(kube, BLUE) == [OLD] * 3


async def test_a_failing_green_is_switched_back_by_its_analysis(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    await bad_canary(astra.target, NEW, share=1.0)
    handle = await start(client, BlueGreenUpgrade, request(keep_blue=600), task_queue)
    await decide(handle, SWITCH, "carol")
    result = await asyncio.wait_for(handle.result(), timeout=60)

    assert result.outcome == Outcome.ROLLED_BACK, result.summary
    assert f"the analysis of {GREEN} failed" in result.summary
    assert selector(kube) == {"app": BLUE} and replicas(kube, GREEN) == 0
