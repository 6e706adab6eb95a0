"""LLM Cost Spike's every branch, with its metrics, Kubernetes and chat activities stubbed."""

from __future__ import annotations

import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.kube_models import ConfigValue
from activities.kubernetes import KubernetesActivities as K8s
from activities.metrics import MetricsActivities
from activities.mutation import MutationResult
from activities.notify import NotifyActivities
from activities.postgres import CostComparison, CostShare
from runtime.access import load_policy
from runtime.astra_config import BUDGET_GUARD_KEY, BudgetGuard
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.helpers import TEST_SIGNER, decide, start, status
from tests.stubs import POLICY, Stubs, name_of
from workflows.llm_cost_spike import LlmCostSpike, LlmCostSpikeRequest
from workflows.models import Outcome, StepState

GUARD = "approve the budget guard"
LIFT = "approve lifting the budget guard"
VERIFY = "verify cost falls under the threshold"
COST, READ, PATCH, TELL = (
    name_of(MetricsActivities.cost_comparison),
    name_of(K8s.read_config),
    name_of(K8s.patch_config),
    name_of(NotifyActivities.notify_rotation),
)
# coder-1 alone brings $100 back under 2 x $10: the guard covers it, and not coder-2.
CODER_1_GUARDED = BudgetGuard(agents=["coder-1"], route_to="gpt-4o-mini").value()


def cost(window_cost: float, *, baseline: bool = True) -> CostComparison:
    return CostComparison(
        window_seconds=300,
        baseline_seconds=86_400,
        window_cost=window_cost,
        daily_average_per_window=10 if baseline else 0,
        ratio=window_cost / 10 if baseline else None,
        top_tenants=[CostShare(key="acme", cost_usd=window_cost)],
        top_agents=[
            CostShare(key="coder-1", cost_usd=window_cost * 0.8),
            CostShare(key="coder-2", cost_usd=window_cost * 0.1),
        ],
        top_models=[CostShare(key="gpt-4o", cost_usd=window_cost)],
    )


def spending(stubs: Stubs, *, guard_before: str | None = None) -> None:
    """$100 in a window that costs $10 on average; $15 once the guard is on."""
    stubs.answer(MetricsActivities.cost_comparison, cost(100), cost(15))
    stubs.answer(
        K8s.read_config,
        ConfigValue(value=guard_before, resource_version="1", config_hash="h", key="guard"),
    )
    stubs.answer(K8s.patch_config, MutationResult(changed=True, detail="set"))
    stubs.answer(
        NotifyActivities.notify_rotation, MutationResult(changed=True, detail="told agent-platform")
    )


def request(**params: object) -> LlmCostSpikeRequest:
    return LlmCostSpikeRequest.model_validate(
        {"requester": "alice", "route_to": "gpt-4o-mini", "verify_timeout_seconds": 10, **params}
    )


def guard_writes(stubs: Stubs) -> list[tuple[str, str | None]]:
    return [(p.value, p.expected) for p in stubs.args(K8s.patch_config)]


async def test_the_top_spender_is_guarded_until_a_person_lifts_it(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    spending(stubs)
    handle = await start(client, LlmCostSpike, request(), task_queue)
    await decide(handle, GUARD, "carol")
    await decide(handle, LIFT, "erin")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert result.summary == (
        "$100.00 over 300s is 10.0x the daily average ($10.00); guarded coder-1 "
        "(route to gpt-4o-mini); cost back to 1.5x; guard lifted"
    )
    assert stubs.called() == [COST, READ, PATCH, TELL, COST, PATCH]
    assert guard_writes(stubs) == [(CODER_1_GUARDED, None), ("", CODER_1_GUARDED)]
    assert {p.key for p in stubs.args(K8s.patch_config)} == {BUDGET_GUARD_KEY}
    (told,) = stubs.args(NotifyActivities.notify_rotation)
    assert told.rotation == "agent-platform" and not told.dry_run
    assert "Budget guard on coder-1 (route to gpt-4o-mini)" in told.text
    steps = {s.name: s for s in result.steps}
    assert steps[GUARD].detail == "approved by carol" and steps[LIFT].detail == "approved by erin"


async def test_a_guard_already_on_is_extended_and_put_back_as_it_was(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    before = BudgetGuard(agents=["planner-9"]).value()
    spending(stubs, guard_before=before)
    handle = await start(client, LlmCostSpike, request(route_to=None), task_queue)
    await decide(handle, GUARD, "carol")
    await decide(handle, LIFT, "carol")
    result = await handle.result()

    extended = BudgetGuard(agents=["coder-1", "planner-9"]).value()
    assert result.outcome == Outcome.DONE and "(cap at normal spend)" in result.summary
    assert guard_writes(stubs) == [(extended, None), (before, extended)]


@pytest.mark.parametrize(
    ("comparison", "summary"),
    [
        (cost(15), "$15.00 over 300s is 1.5x the daily average ($10.00), within 2x; nothing to do"),
        (
            cost(100, baseline=False),
            "no LLM spend in the 86400s before the window to compare with (window: $100.00)",
        ),
    ],
    ids=["within the multiplier", "no baseline"],
)
async def test_no_spike_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs, comparison: CostComparison, summary: str
) -> None:
    stubs.answer(MetricsActivities.cost_comparison, comparison)
    result = await (await start(client, LlmCostSpike, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE and result.summary == summary
    assert stubs.called() == [COST]


async def test_a_rejected_guard_changes_nothing_and_tells_nobody(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    spending(stubs)
    handle = await start(client, LlmCostSpike, request(), task_queue)
    await decide(handle, GUARD, "carol", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert stubs.called() == [COST, READ]


@pytest.mark.parametrize("decided", ["reject", "nobody"])
async def test_a_lift_not_approved_keeps_the_guard(
    client: Client, task_queue: str, stubs: Stubs, decided: str
) -> None:
    spending(stubs)
    handle = await start(client, LlmCostSpike, request(approval_timeout_seconds=1.5), task_queue)
    await decide(handle, GUARD, "carol")
    if decided == "reject":
        await decide(handle, LIFT, "erin", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    kept = (
        f"step '{LIFT}' rejected by erin"
        if decided == "reject"
        else f"no decision on step '{LIFT}' within 0:00:01.500000; aborted safely"
    )
    assert result.summary.endswith(f"cost back to 1.5x; guard kept: {kept}")
    assert stubs.called() == [COST, READ, PATCH, TELL, COST]
    assert guard_writes(stubs) == [(CODER_1_GUARDED, None)]


async def test_cost_that_does_not_fall_fails_the_run_and_keeps_the_guard(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    spending(stubs)
    stubs.answer(MetricsActivities.cost_comparison, cost(100), cost(60))
    handle = await start(client, LlmCostSpike, request(verify_timeout_seconds=1), task_queue)
    await decide(handle, GUARD, "carol")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert f"failed at step '{VERIFY}'" in message
    assert "cost still 6.0x the daily average after 1s with the guard on" in message
    assert "the guard stays on: look for spenders it does not cover" in message
    assert guard_writes(stubs) == [(CODER_1_GUARDED, None)]
    lift = {s.name: s for s in (await status(handle)).steps}[LIFT]  # never asked: the guard stays
    assert lift.state == StepState.SKIPPED
    assert lift.detail == f"not reached: the run failed at '{VERIFY}'"


async def test_dry_run_only_reports(client: Client, task_queue: str, stubs: Stubs) -> None:
    spending(stubs)
    result = await (await start(client, LlmCostSpike, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary == (
        "dry-run: $100.00 over 300s is 10.0x the daily average ($10.00); would guard coder-1 "
        "(route to gpt-4o-mini)"
    )
    assert stubs.called() == [COST, READ, PATCH, TELL]
    assert stubs.args(K8s.patch_config)[0].dry_run
    assert stubs.args(NotifyActivities.notify_rotation)[0].dry_run
    steps = {s.name: s.state for s in result.steps}
    assert steps[VERIFY] == StepState.SKIPPED and steps[LIFT] == StepState.SKIPPED


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"multiplier": "1"}, "multiplier"),
        ({"window_seconds": "-300"}, "window_seconds"),
        ({"window_seconds": "600", "baseline_seconds": "300"}, "baseline_seconds"),
    ],
)
async def test_bad_thresholds_and_windows_are_refused_before_start(
    client: Client, task_queue: str, params: dict[str, str], problem: str
) -> None:
    runs = Runs(client, task_queue, load_policy(POLICY), TEST_SIGNER)
    with pytest.raises(InvalidInput, match=problem):
        await runs.start("llm-cost-spike", params, requester="alice")
