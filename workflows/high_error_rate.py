"""High Error Rate: contain a failing class of work, fix the cause, prove the rate stays down.

Operations wiki: trigger ">5% task failures over 5min" (SEV2, elevated task failures). Triage
reads which error class, workers and shards the failures come from. Containment pauses intake of
the failing class through ``astra-config`` (Kernel SRE own tasks); when the failures come from
the worker pool's current pods the pool is stuck, and restarting it waits for Agent Platform
(who own the workers). Intake resumes before the verify, because only a rate measured with
intake flowing shows that the cause is gone; if the rate does not stay under the threshold for
the settle window, intake is paused again and the run fails for a person to take over.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from temporalio import workflow

from runtime.astra_config import INTAKE_PAUSED_KEY, with_paused
from workflows.models import Outcome, RunbookResult
from workflows.runbook import Runbook, RunbookSpec
from workflows.task_health import (
    AGENT_PLATFORM,
    KERNEL_SRE,
    Knob,
    TaskHealthRequest,
    holds_for,
)

with workflow.unsafe.imports_passed_through():
    from activities.kubernetes import (
        KubernetesActivities,
        PodSelector,
        RolloutRestart,
        RolloutWait,
    )
    from activities.metrics import MetricsActivities
    from activities.postgres import (
        FailureBreakdown,
        FailureBreakdownRequest,
        FailureRateRequest,
        PostgresActivities,
    )


class HighErrorRateRequest(TaskHealthRequest):
    threshold: float = Field(default=0.05, gt=0, lt=1, description="failure share that alerts")
    window_seconds: float = Field(default=300, gt=0, description="the window the rate is over")
    settle_seconds: float = Field(
        default=300, gt=0, description="how long the rate must stay under the threshold"
    )
    stuck_pool_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="at least this share of the failures on the pool's current pods means "
        "the pool is stuck and a restart is the remedy",
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0)


SPEC = RunbookSpec(
    name="high-error-rate",
    title="High Error Rate",
    trigger=">5% task failures over 5min",
    rotation="kernel-sre",
    severity="SEV2",
    steps=(
        "measure the failure rate",
        "triage failures by class, worker and shard",
        "check the worker pool",
        "read paused intake",
        "approve pausing intake",
        "pause intake of the failing class",
        "approve restarting the stuck pool",
        "restart the stuck pool",
        "wait for the pool",
        "resume intake",
        "verify the rate stays under the threshold",
    ),
    request=HighErrorRateRequest,
    subject=lambda req: req.namespace,
)


def _triage_line(breakdown: FailureBreakdown) -> str:
    """What a person would read first: the top classes, workers and shards of the failures."""
    return "; ".join(
        f"{what}: " + ", ".join(f"{c.key} ({c.count})" for c in counts[:3])
        for what, counts in (
            ("classes", breakdown.by_error_class),
            ("workers", breakdown.by_worker),
            ("shards", breakdown.by_shard),
        )
    )


@workflow.defn(name="high-error-rate")
class HighErrorRate(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: HighErrorRateRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._contain_and_fix(req))

    async def _contain_and_fix(self, req: HighErrorRateRequest) -> RunbookResult:
        window = FailureRateRequest(window_seconds=req.window_seconds)
        rate = await self.steps.check(
            "measure the failure rate", MetricsActivities.failure_rate, window
        )
        over = f"{rate.rate:.1%} of {rate.total} tasks failed over {req.window_seconds:g}s"
        if rate.rate <= req.threshold:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"{over}, within the {req.threshold:.1%} threshold"
            )
        breakdown = await self.steps.check(
            "triage failures by class, worker and shard",
            PostgresActivities.failure_breakdown,
            FailureBreakdownRequest(window_seconds=req.window_seconds),
        )
        if not breakdown.by_error_class:
            raise self.steps.fail(
                "triage failures by class, worker and shard",
                f"{over}, but no failed task is in the window any more; measure again",
            )
        error_class = breakdown.by_error_class[0].key
        pods = await self.steps.check(
            "check the worker pool",
            KubernetesActivities.list_pods,
            PodSelector(namespace=req.namespace, labels={"app": req.worker_pool}),
        )
        pool = {p.name for p in pods.pods}
        on_pool = sum(c.count for c in breakdown.by_worker if c.key in pool)
        stuck_pool = on_pool >= req.stuck_pool_share * max(1, breakdown.failed)

        intake = Knob(self.steps, req, INTAKE_PAUSED_KEY)
        paused_before = await intake.read("read paused intake")
        await self.steps.approval(
            "approve pausing intake",
            KERNEL_SRE,
            f"{over} ({_triage_line(breakdown)}). Pause intake of {error_class}? {req.reason}",
        )

        async def resume_intake() -> None:
            await intake.set("resume intake", paused_before)

        async with self.steps.compensating("resume intake", resume_intake):
            await intake.set(
                "pause intake of the failing class", with_paused(paused_before, error_class)
            )
            if not stuck_pool:
                # No remedy this runbook knows: stay contained and hand over, rather than resume
                # intake into the same failures.
                return self.steps.finish(
                    Outcome.DONE,
                    f"{over}; intake of {error_class} paused. Only {on_pool} of "
                    f"{breakdown.failed} failures come from current {req.worker_pool} pods, so "
                    f"the cause is elsewhere ({_triage_line(breakdown)}): investigate, then "
                    f"remove {error_class} from {INTAKE_PAUSED_KEY} to resume",
                )
            await self.steps.approval(
                "approve restarting the stuck pool",
                AGENT_PLATFORM,
                f"{on_pool} of {breakdown.failed} failures ({error_class}) come from the current "
                f"{req.worker_pool} pods; restart the pool? {req.reason}",
            )
            await self.steps.act(
                "restart the stuck pool",
                KubernetesActivities.rollout_restart,
                RolloutRestart(namespace=req.namespace, name=req.worker_pool),
            )
            await self.steps.check(
                "wait for the pool",
                KubernetesActivities.wait_rollout,
                RolloutWait(
                    namespace=req.namespace,
                    name=req.worker_pool,
                    timeout_seconds=req.rollout_timeout_seconds,
                ),
                start_to_close_timeout=timedelta(seconds=req.rollout_timeout_seconds + 60),
                heartbeat_timeout=timedelta(seconds=30),
            )

        await resume_intake()
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {over}; would pause intake of {error_class}, restart "
                f"{req.worker_pool}, then resume intake",
            )
        held, last = await holds_for(
            lambda: self.steps.verify(
                "verify the rate stays under the threshold", MetricsActivities.failure_rate, window
            ),
            lambda r: bool(r.rate <= req.threshold),
            settle=req.settle_seconds,
            every=req.poll_seconds,
            within=req.verify_timeout_seconds,
        )
        if not held:
            await intake.set("pause intake again", with_paused(paused_before, error_class))
            raise self.steps.fail(
                "verify the rate stays under the threshold",
                f"after restarting {req.worker_pool} the failure rate did not stay under "
                f"{req.threshold:.1%} for {req.settle_seconds:g}s (last: "
                f"{last.rate:.1%} of {last.total}); intake of {error_class} is paused again",
            )
        return self.steps.finish(
            Outcome.DONE,
            f"{over} ({error_class} on {on_pool} of {breakdown.failed} failures from the pool); "
            f"paused intake, restarted {req.worker_pool}, resumed intake; the rate stayed at or "
            f"under {req.threshold:.1%} for {req.settle_seconds:g}s",
        )
