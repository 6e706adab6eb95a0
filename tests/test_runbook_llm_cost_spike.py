"""LLM Cost Spike end to end: one agent's spend jumps; guard it, see cost fall, lift the guard."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from activities.metrics import SqlMetrics
from activities.postgres import LlmCostRequest
from runtime.access import load_policy
from runtime.astra_config import BUDGET_GUARD_KEY, BudgetGuard
from runtime.settings import Settings
from sandbox.faults import cost_spike
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import (
    TICK_SECONDS,
    RunningAstra,
    config_value,
    decide,
    start,
)
from tests.helpers import TEST_SIGNER
from workflows.llm_cost_spike import LlmCostSpike, LlmCostSpikeRequest
from workflows.models import Outcome

pytestmark = pytest.mark.usefixtures("astra_worker")

WINDOW, BASELINE = 3.0, 3600.0


async def spike(astra: RunningAstra) -> None:
    """An hour of normal spend at the test's tick rate, then coder-1 spends 10x."""
    async with astra.between_ticks():
        await astra.generator.seed_history(days=BASELINE / 86_400, step_interval=TICK_SECONDS)
        await cost_spike(
            astra.target, multiplier=10, window_seconds=WINDOW, baseline_seconds=BASELINE
        )


def request(**overrides: object) -> LlmCostSpikeRequest:
    return LlmCostSpikeRequest.model_validate(
        {
            "requester": "alice",
            "window_seconds": WINDOW,
            "baseline_seconds": BASELINE,
            "route_to": "gpt-4o-mini",
            "verify_timeout_seconds": 20,
            **overrides,
        }
    )


async def test_guard_applied_cost_falls_and_guard_lifted_when_approved(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, chat: ChatReceiver
) -> None:
    await spike(astra)
    handle = await start(client, LlmCostSpike, request(), task_queue)

    await decide(handle, "approve the budget guard", "carol")
    await decide(handle, "approve lifting the budget guard", "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert "guard lifted" in result.summary and config_value(kube, BUDGET_GUARD_KEY) == ""
    cost = await SqlMetrics(astra.target.dsn).llm_cost(
        LlmCostRequest(window_seconds=WINDOW, baseline_seconds=BASELINE)
    )
    assert cost.ratio is not None and cost.ratio <= 2
    told = [m["text"] for m in chat.messages if "Budget guard on coder-1" in m["text"]]
    assert len(told) == 1 and told[0].startswith("[agent-platform: carol, erin]")


async def test_rejected_lift_keeps_the_guard(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra
) -> None:
    await spike(astra)
    handle = await start(client, LlmCostSpike, request(), task_queue)

    await decide(handle, "approve the budget guard", "carol")
    await eventually(
        lambda: config_value(kube, BUDGET_GUARD_KEY) is not None,
        timeout=10,
        message="guard applied",
    )
    await decide(handle, "approve lifting the budget guard", "carol", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.DONE and "guard kept" in result.summary
    assert BudgetGuard.parse(config_value(kube, BUDGET_GUARD_KEY)) == BudgetGuard(
        agents=["coder-1"], route_to="gpt-4o-mini"
    )


async def test_dry_run_changes_nothing(
    client: Client, task_queue: str, kube: KubeSandbox, astra: RunningAstra, chat: ChatReceiver
) -> None:
    await spike(astra)
    result = await (await start(client, LlmCostSpike, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE and "would guard coder-1" in result.summary
    assert config_value(kube, BUDGET_GUARD_KEY) is None and chat.messages == []


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"multiplier": "1"}, "multiplier"),
        ({"window_seconds": "-300"}, "window_seconds"),
        ({"window_seconds": "600", "baseline_seconds": "300"}, "baseline_seconds"),
    ],
)
async def test_bad_thresholds_and_windows_are_refused(
    client: Client, astra_settings: Settings, params: dict[str, str], problem: str
) -> None:
    runs = Runs(
        client, astra_settings.task_queue, load_policy(astra_settings.access_policy), TEST_SIGNER
    )
    with pytest.raises(InvalidInput, match=problem):
        await runs.start("llm-cost-spike", params, requester="alice")
