"""LLM Cost Spike end to end: one agent's spend jumps; guard it, see cost fall, lift the guard."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from activities.metrics import SqlMetrics
from activities.postgres import LlmCostRequest
from runtime.astra_config import BUDGET_GUARD_KEY
from sandbox.faults import cost_spike
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import TICK_SECONDS, RunningAstra, config_value
from tests.helpers import decide, start
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
