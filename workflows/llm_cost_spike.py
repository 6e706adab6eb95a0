"""LLM Cost Spike: find who drives the spend, guard their budget, lift the guard when told.

Operations wiki: trigger "Cost >2x daily average". LLM routing belongs to Agent Platform, so
they approve the guard and hear about it. The guard is the smallest set of top-spending agents
whose spend, held to normal, brings the window back under the threshold: guarding everyone
would hide the cause.

Rollback: none, by design. Failing or being cancelled after the guard is set does not lift it,
because a guard is the safe state; it is lifted only when a person approves lifting it, and a
rejection of that keeps it.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator
from temporalio import workflow

from runtime.astra_config import BUDGET_GUARD_KEY, BudgetGuard
from workflows.approval import RunbookStopped
from workflows.models import DAY, Outcome, RunbookResult, matching
from workflows.runbook import Runbook, RunbookSpec
from workflows.task_health import Knob, TaskHealthRequest, wait_until
from workflows.timeouts import REMOTE_CALL_TIMEOUT

with workflow.unsafe.imports_passed_through():
    from activities.metrics import MetricsActivities
    from activities.notify import NotifyActivities, RotationNotice
    from activities.postgres import CostComparison, LlmCostRequest

ROTATION = "agent-platform"

ModelName = Annotated[
    str,
    Field(max_length=253),
    AfterValidator(
        matching(
            r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*",
            "an LLM model name (letters, digits and . _ : / @ + -), such as gpt-4o-mini",
        )
    ),
]


class LlmCostSpikeRequest(TaskHealthRequest):
    multiplier: float = Field(
        default=2.0,
        gt=1,
        le=1_000,
        description="window cost over this many daily-average windows alerts",
    )
    window_seconds: float = Field(
        default=300, gt=0, le=DAY, description="the window the cost is over"
    )
    baseline_seconds: float = Field(
        default=86_400, gt=0, le=30 * DAY, description="the trailing average"
    )
    route_to: ModelName | None = Field(
        default=None, description="route guarded agents to this cheaper model; unset caps them"
    )

    @model_validator(mode="after")
    def _baseline_spans_window(self) -> Self:
        # Refused at start: built later in the workflow, a bad LlmCostRequest fails a workflow
        # task over and over instead of the run.
        if self.baseline_seconds < self.window_seconds:
            raise ValueError(
                f"baseline_seconds ({self.baseline_seconds:g}) must be at least window_seconds "
                f"({self.window_seconds:g})"
            )
        return self


SPEC = RunbookSpec(
    name="llm-cost-spike",
    title="LLM Cost Spike",
    trigger="Cost >2x daily average",
    rotation=ROTATION,
    severity="SEV3",
    request=LlmCostSpikeRequest,
    subject=lambda req: req.namespace,
    steps=lambda req: [
        "compare cost with the daily average",
        "read the budget guard",
        "approve the budget guard",
        "apply the budget guard",
        "tell Agent Platform",
        "verify cost falls under the threshold",
        "approve lifting the budget guard",
        "lift the budget guard",
    ],
)


def offenders(cost: CostComparison, multiplier: float) -> list[str]:
    """The fewest top-spending agents whose spend, removed, brings the window under the line."""
    limit = multiplier * cost.daily_average_per_window
    chosen: list[str] = []
    remaining = cost.window_cost
    for agent in cost.top_agents:
        if remaining <= limit:
            break
        chosen.append(agent.key)
        remaining -= agent.cost_usd
    return chosen


def ranking(cost: CostComparison) -> str:
    return "; ".join(
        f"{what}: " + ", ".join(f"{s.key} ${s.cost_usd:.2f}" for s in shares[:3])
        for what, shares in (
            ("tenants", cost.top_tenants),
            ("agents", cost.top_agents),
            ("models", cost.top_models),
        )
    )


@workflow.defn(name=SPEC.name)
class LlmCostSpike(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: LlmCostSpikeRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._guard(req))

    async def _guard(self, req: LlmCostSpikeRequest) -> RunbookResult:
        request = LlmCostRequest(
            window_seconds=req.window_seconds, baseline_seconds=req.baseline_seconds
        )
        cost = await self.steps.check(
            "compare cost with the daily average",
            MetricsActivities.cost_comparison,
            request,
            start_to_close_timeout=REMOTE_CALL_TIMEOUT,
        )
        if cost.ratio is None:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"no LLM spend in the {req.baseline_seconds:g}s before the window to compare "
                f"with (window: ${cost.window_cost:.2f})",
            )
        spend = (
            f"${cost.window_cost:.2f} over {req.window_seconds:g}s is {cost.ratio:.1f}x the "
            f"daily average (${cost.daily_average_per_window:.2f})"
        )
        if cost.ratio <= req.multiplier:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"{spend}, within {req.multiplier:g}x; nothing to do"
            )
        agents = offenders(cost, req.multiplier)
        knob = Knob(self.steps, req, BUDGET_GUARD_KEY)
        before = await knob.read("read the budget guard")
        guard = BudgetGuard.parse(before).merged(agents, req.route_to)
        how = f"route to {req.route_to}" if req.route_to else "cap at normal spend"
        await self.steps.approval(
            "approve the budget guard",
            f"{spend} ({ranking(cost)}). Guard {', '.join(agents)} ({how})? {req.reason}",
        )
        await knob.set("apply the budget guard", guard.value())
        await self.steps.act(
            "tell Agent Platform",
            NotifyActivities.notify_rotation,
            RotationNotice(
                rotation=ROTATION,
                text=f"LLM cost spike in {req.namespace}: {spend}. Budget guard on "
                f"{', '.join(agents)} ({how}); top spenders: {ranking(cost)}",
            ),
            start_to_close_timeout=REMOTE_CALL_TIMEOUT,
        )
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE, f"dry-run: {spend}; would guard {', '.join(agents)} ({how})"
            )

        after = await wait_until(
            lambda: self.steps.verify(
                "verify cost falls under the threshold",
                MetricsActivities.cost_comparison,
                request,
                start_to_close_timeout=REMOTE_CALL_TIMEOUT,
            ),
            lambda c: c.ratio is not None and c.ratio <= req.multiplier,
            within=req.verify_timeout_seconds,
        )
        if after.ratio is None or after.ratio > req.multiplier:
            raise self.steps.fail(
                "verify cost falls under the threshold",
                f"cost still {after.ratio or 0:.1f}x the daily average after "
                f"{req.verify_timeout_seconds:g}s with the guard on ({ranking(after)}); the guard "
                "stays on: look for spenders it does not cover",
            )
        guarded = f"{spend}; guarded {', '.join(agents)} ({how}); cost back to {after.ratio:.1f}x"
        try:
            await self.steps.approval(
                "approve lifting the budget guard",
                f"{guarded}. Lift the guard when the agents are fixed.",
            )
        except RunbookStopped as kept:
            return self.steps.finish(Outcome.DONE, f"{guarded}; guard kept: {kept.summary}")
        await knob.set("lift the budget guard", before, expected=guard.value())
        return self.steps.finish(Outcome.DONE, f"{guarded}; guard lifted")
