"""Canary Upgrade end to end on the sandbox, with windows of seconds: a healthy canary is
promoted after its window and approval; a bad one is caught by the analysis and rolled back long
before its window ends; people abort, pause, resume and promote through the API's path (signed);
an unanswered approval aborts; the worker restarted mid-window does not move the window's end.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from activities.kube_models import canary_name
from runtime.settings import Settings
from sandbox.faults import bad_canary
from sandbox.kube.seed import RELEASE
from starters.run_views import DecisionRefused
from starters.runs import Runs
from tests.conftest import ChatReceiver, OwnTemporal
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import RunningAstra
from tests.helpers import decide, handle_of, start, status, wait_for_step
from workers.worker import running_worker
from workflows.canary_upgrade import PROMOTION, CanaryUpgrade, CanaryUpgradeRequest
from workflows.models import Outcome, RunbookResult, SteerAction, StepState, StepStatus

OLD = f"registry.sandbox.local/astra/astra-worker:{RELEASE}"
NEW = "registry.sandbox.local/astra/astra-worker:1.1.0"
WINDOW = "hold the canary at 25%"


def request(pause: float = 3, analysis: bool = True, **overrides: Any) -> CanaryUpgradeRequest:
    """The seed's plan at a quarter of the workers (one pod of three, rounded up), measured
    every second, with a window of ``pause`` seconds."""
    return CanaryUpgradeRequest.model_validate(
        {
            "requester": "erin",
            "image": NEW,
            "steps": [
                {"weight": 25, "pause_seconds": pause, "analysis": analysis},
                {"approval": True},
                {"weight": 100},
            ],
            "analysis_interval_seconds": 1,
            "min_samples": 3,
            "rollout_timeout_seconds": 30,
            **overrides,
        }
    )


def worker_images(kube: KubeSandbox) -> dict[str, str]:
    return {
        p["metadata"]["name"]: p["spec"]["containers"][0]["image"]
        for p in kube.cluster.pods("astra", {"app": "astra-worker"})
    }


def canary(kube: KubeSandbox) -> dict[str, Any] | None:
    return kube.cluster.get("deployments", "astra", canary_name("astra-worker"))


@pytest.mark.usefixtures("astra_worker")
async def test_a_healthy_canary_is_promoted_after_its_window_and_approval(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    handle = await start(client, CanaryUpgrade, request(pause=3), task_queue)
    await wait_for_step(handle, WINDOW, StepState.RUNNING)
    assert canary(kube) is not None
    assert sorted(worker_images(kube).values()) == [OLD, OLD, OLD, NEW]  # stable keeps its 3

    await decide(handle, PROMOTION, "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert set(worker_images(kube).values()) == {NEW} and len(worker_images(kube)) == 3
    assert canary(kube) is None
    steps = {s.name: s for s in result.steps}
    window = steps[WINDOW]
    assert window.state == StepState.DONE and "passed" in window.detail, window.detail
    assert window.started_at and window.finished_at
    assert window.finished_at - window.started_at >= timedelta(seconds=3)
    # The person decided after the window, not during it.
    promoted = steps[PROMOTION]
    assert promoted.started_at and promoted.started_at >= window.finished_at
    assert steps["roll back: remove the canary"].state == StepState.SKIPPED


@pytest.mark.usefixtures("astra_worker")
async def test_a_bad_canary_is_rolled_back_before_its_window_ends(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, chat: ChatReceiver
) -> None:
    await bad_canary(astra.target, NEW, share=1.0)
    handle = await start(client, CanaryUpgrade, request(pause=600), task_queue)

    result = await asyncio.wait_for(handle.result(), timeout=60)

    assert result.outcome == Outcome.ROLLED_BACK, result.summary
    assert "the analysis of astra-worker-canary failed: canary failure rate" in result.summary
    assert canary(kube) is None
    assert set(worker_images(kube).values()) == {OLD}
    steps = {s.name: s for s in result.steps}
    assert steps[WINDOW].state == StepState.FAILED
    assert steps[PROMOTION].state == StepState.SKIPPED
    assert any("rolled back to" in m["text"] and NEW in m["text"] for m in chat.messages)


@pytest.mark.usefixtures("astra_worker")
async def test_abort_mid_window_rolls_back_and_says_who(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, runs: Runs
) -> None:
    handle = await start(client, CanaryUpgrade, request(pause=600), task_queue)
    await wait_for_step(handle, WINDOW, StepState.RUNNING)

    said = await runs.steer(handle.id, "erin", SteerAction.ABORT, "wrong image")
    result = await handle.result()

    assert "aborted by erin" in said
    assert result.outcome == Outcome.ROLLED_BACK, result.summary
    assert "aborted by erin: wrong image" in result.summary
    assert canary(kube) is None and set(worker_images(kube).values()) == {OLD}


@pytest.mark.usefixtures("astra_worker")
async def test_pause_stops_the_clock_and_promote_ends_the_window(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, runs: Runs
) -> None:
    handle = await start(client, CanaryUpgrade, request(pause=600), task_queue)
    await wait_for_step(handle, WINDOW, StepState.RUNNING)

    with pytest.raises(DecisionRefused, match="the window is not paused"):
        await runs.steer(handle.id, "erin", SteerAction.RESUME)
    await runs.steer(handle.id, "erin", SteerAction.PAUSE, "looking at a dip")

    async def paused() -> bool:
        window = {s.name: s for s in (await status(handle)).steps}[WINDOW]
        return "paused by erin" in window.detail

    await eventually(paused, timeout=10, message="the window shows its pause")
    await runs.steer(handle.id, "erin", SteerAction.RESUME)
    # The requester cannot wave their own canary through; an approver can.
    with pytest.raises(DecisionRefused, match="erin may not promote"):
        await runs.steer(handle.id, "erin", SteerAction.PROMOTE)
    with pytest.raises(DecisionRefused, match="dave may not promote"):
        await runs.steer(handle.id, "dave", SteerAction.PROMOTE)
    await runs.steer(handle.id, "carol", SteerAction.PROMOTE, "dashboards clean")
    await decide(handle, PROMOTION, "alice")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    window = {s.name: s for s in result.steps}[WINDOW]
    assert "promoted early by carol" in window.detail
    assert set(worker_images(kube).values()) == {NEW}
    # Who did what stays with the run: the status lists each accepted action.
    assert [(r.action, r.actor) for r in (await status(handle)).steered] == [
        (SteerAction.PAUSE, "erin"),
        (SteerAction.RESUME, "erin"),
        (SteerAction.PROMOTE, "carol"),
    ]


@pytest.mark.usefixtures("astra_worker")
async def test_an_unanswered_approval_aborts_and_rolls_back(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    handle = await start(
        client,
        CanaryUpgrade,
        request(pause=0.5, approval_timeout_seconds=1, min_samples=1_000),
        task_queue,
    )
    result = await asyncio.wait_for(handle.result(), timeout=60)

    assert result.outcome == Outcome.ROLLED_BACK, result.summary
    assert "no decision" in result.summary
    assert canary(kube) is None and set(worker_images(kube).values()) == {OLD}


@pytest.mark.slow
async def test_the_window_ends_on_time_across_a_worker_restart(
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
) -> None:
    pause = 4.0
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, astra_settings, executor):
            # No analysis: the window is what is tested, and measurements due while no worker
            # runs are missed, which would rightly make it inconclusive.
            plain = request(pause=pause, analysis=False)
            handle = await start(client, CanaryUpgrade, plain, task_queue)
            await wait_for_step(handle, WINDOW, StepState.RUNNING)
            window = {s.name: s for s in (await status(handle)).steps}[WINDOW]
            fired = await timers_fired(handle)
        # No worker polls now; the window's timers are the server's, and fire regardless.
        await eventually(
            lambda: more_timers_fired(handle, fired), timeout=10, message="a timer firing"
        )
        async with running_worker(client, astra_settings, executor):
            await decide(handle, PROMOTION, "carol")
            result = await handle.result()

    # The new worker replayed the run and kept its window: counted from the canary being ready,
    # not from the restart (a generous margin for a loaded machine).
    assert_window_kept(result, window, pause, slack=5)


def assert_window_kept(
    result: RunbookResult, window: StepStatus, pause: float, slack: float
) -> None:
    """The run was promoted, and its window lasted ``pause`` seconds from its start as the run
    saw it before the restart: never less, and not more than ``slack`` seconds over."""
    assert result.outcome == Outcome.DONE, result.summary
    ended = {s.name: s for s in result.steps}[WINDOW]
    assert window.started_at is not None and ended.finished_at is not None
    assert timedelta(seconds=pause) <= ended.finished_at - window.started_at
    assert ended.finished_at - window.started_at < timedelta(seconds=pause + slack)


async def timers_fired(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_TIMER_FIRED for e in history.events)


async def more_timers_fired(handle: WorkflowHandle[Any, Any], before: int) -> bool:
    return await timers_fired(handle) > before


async def test_the_window_ends_on_time_across_a_dev_server_restart(
    own_temporal: OwnTemporal,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
) -> None:
    """The dev server stopped mid-window and started again on its file: the run, its window's
    timers and the approval still to come are all still there."""
    pause = 4.0
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(own_temporal.env.client, astra_settings, executor):
            plain = request(pause=pause, analysis=False)
            handle = await start(own_temporal.env.client, CanaryUpgrade, plain, task_queue)
            await wait_for_step(handle, WINDOW, StepState.RUNNING)
            window = {s.name: s for s in (await status(handle)).steps}[WINDOW]
        await own_temporal.stop()
        client = await own_temporal.start_again()
        async with running_worker(client, astra_settings, executor):
            handle = handle_of(client, handle.id)
            await decide(handle, PROMOTION, "carol")
            result = await handle.result()

    assert_window_kept(result, window, pause, slack=10)
