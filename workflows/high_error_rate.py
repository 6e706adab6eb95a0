"""High Error Rate: contain a failing class of work, fix the cause, prove the rate stays down.

Operations wiki: trigger ">5% task failures over 5min" (SEV2, elevated task failures). Triage
reads which error class, workers and shards the failures come from, and the worker pool's rollout
history. Containment pauses intake of the failing class through ``astra-config`` (Kernel SRE own
tasks). The remedy follows the cause, and waits for Agent Platform (who own the workers): when
the pool was rolled out recently and the failures come from the new revision's pods, the rollout
is rolled back; when they come from the pool's current pods without a recent rollout, the pool is
stuck and is restarted; otherwise intake stays paused and the run says where to look. Intake
resumes before the verify, because only a rate measured with intake flowing shows that the cause
is gone.

Rollback: a failure, rejection or cancel after intake was paused resumes intake (puts back the
paused list as it was before the run; if someone else changed the list since, their list stays
and the run reports the rollback incomplete). A rollback or restart of the pool is not undone.
If the rate does not stay under the threshold for the settle window after the remedy, intake is
paused again and the run fails for a person to take over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Self

from pydantic import Field, model_validator
from temporalio import workflow

from runtime.astra_config import INTAKE_PAUSED_KEY, with_paused
from workflows.models import DAY, WEEK, Outcome, RunbookResult
from workflows.runbook import Runbook, RunbookSpec
from workflows.task_health import (
    Knob,
    TaskHealthRequest,
    holds_for,
)
from workflows.timeouts import REMOTE_CALL_TIMEOUT

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import (
        DeploymentRef,
        PodSelector,
        RolloutHistory,
        RolloutRestart,
        RolloutUndo,
        RolloutWait,
    )
    from activities.kubernetes import KubernetesActivities
    from activities.metrics import MetricsActivities
    from activities.mutation import MutationResult
    from activities.postgres import (
        FailureBreakdown,
        FailureBreakdownRequest,
        FailureRateRequest,
        PostgresActivities,
    )


class HighErrorRateRequest(TaskHealthRequest):
    threshold: float = Field(default=0.05, gt=0, lt=1, description="failure share that alerts")
    window_seconds: float = Field(
        default=300, gt=0, le=DAY, description="the window the rate is over"
    )
    settle_seconds: float = Field(
        default=300, gt=0, le=DAY, description="how long the rate must stay under the threshold"
    )
    stuck_pool_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="at least this share of the failures on the pool's current pods means "
        "the pool is stuck and a restart is the remedy",
    )
    rollout_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="at least this share of the failures on pods of a recent revision means "
        "the rollout is the cause and rolling it back is the remedy",
    )
    recent_rollout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=WEEK,
        description="a revision rolled out less than this long ago is a suspect "
        "(default: the measurement window)",
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)

    @model_validator(mode="after")
    def _settles_within_the_wait(self) -> Self:
        # A settle window longer than the wait can never hold: the run would pause intake
        # again and fail however well the remedy worked.
        if self.settle_seconds > self.verify_timeout_seconds:
            raise ValueError(
                f"settle_seconds ({self.settle_seconds:g}) must not exceed "
                f"verify_timeout_seconds ({self.verify_timeout_seconds:g})"
            )
        return self


SPEC = RunbookSpec(
    name="high-error-rate",
    title="High Error Rate",
    trigger=">5% task failures over 5min",
    rotation="kernel-sre",
    severity="SEV2",
    request=HighErrorRateRequest,
    subject=lambda req: req.namespace,
    steps=lambda req: [
        "measure the failure rate",
        "triage failures by class, worker and shard",
        "check the worker pool",
        "read the pool's rollout history",
        "read paused intake",
        "approve pausing intake",
        "pause intake of the failing class",
        "approve rolling back the last rollout",
        "roll back the last rollout",
        "approve restarting the stuck pool",
        "restart the stuck pool",
        "wait for the pool",
        "resume intake",
        "verify the rate stays under the threshold",
        "pause intake again",
    ],
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


class Cause(StrEnum):
    ROLLOUT = "the last rollout"
    STUCK_POOL = "a stuck pool"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Diagnosis:
    """What triage concluded, and the evidence a person reads in the approval and the summary."""

    cause: Cause
    evidence: str
    back_to: int | None = None
    """For a rollout: the revision to roll back to."""


def diagnose(
    req: HighErrorRateRequest,
    breakdown: FailureBreakdown,
    pool: set[str],
    history: RolloutHistory,
    now: datetime,
) -> Diagnosis:
    """Name the cause the failures point at, the most specific first: a recent rollout whose
    pods fail, then a pool whose current pods fail. Pods of a ReplicaSet are named after it."""
    failed = max(1, breakdown.failed)
    newest, previous = history.newest, history.previous
    recent = timedelta(seconds=req.recent_rollout_seconds or req.window_seconds)
    if newest and previous and newest.created and now - newest.created <= recent:
        on_newest = sum(
            c.count for c in breakdown.by_worker if c.key.startswith(f"{newest.replica_set}-")
        )
        if on_newest >= req.rollout_share * failed:
            age = (now - newest.created).total_seconds()
            what = newest.change_cause or ", ".join(newest.images)
            return Diagnosis(
                Cause.ROLLOUT,
                f"{on_newest} of {breakdown.failed} failures come from pods of {req.worker_pool} "
                f"revision {newest.revision} ({what}), rolled out {age:.0f}s ago",
                back_to=previous.revision,
            )
    on_pool = sum(c.count for c in breakdown.by_worker if c.key in pool)
    if on_pool >= req.stuck_pool_share * failed:
        return Diagnosis(
            Cause.STUCK_POOL,
            f"{on_pool} of {breakdown.failed} failures come from the current {req.worker_pool} "
            "pods, with no recent rollout to blame",
        )
    return Diagnosis(
        Cause.UNKNOWN,
        f"only {on_pool} of {breakdown.failed} failures come from current {req.worker_pool} "
        f"pods and no recent rollout explains them ({_triage_line(breakdown)})",
    )


@workflow.defn(name=SPEC.name)
class HighErrorRate(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: HighErrorRateRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._contain_and_fix(req))

    async def _contain_and_fix(self, req: HighErrorRateRequest) -> RunbookResult:
        window = FailureRateRequest(window_seconds=req.window_seconds)
        rate = await self.steps.check(
            "measure the failure rate",
            MetricsActivities.failure_rate,
            window,
            start_to_close_timeout=REMOTE_CALL_TIMEOUT,
        )
        over = f"{rate.rate:.1%} of {rate.total} tasks failed over {req.window_seconds:g}s"
        if rate.rate <= req.threshold:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"{over}, within the {req.threshold:.1%} threshold"
            )
        diagnosis, error_class = await self._triage(req, over)

        intake = Knob(self.steps, req, INTAKE_PAUSED_KEY)
        paused_before = await intake.read("read paused intake")
        await self.steps.approval(
            "approve pausing intake",
            f"{over}; {diagnosis.evidence}. Pause intake of {error_class}? {req.reason}",
        )

        paused = with_paused(paused_before, error_class)

        async def resume_intake() -> None:
            await intake.set("resume intake", paused_before, expected=paused)

        async with self.steps.compensating("resume intake", resume_intake):
            await intake.set("pause intake of the failing class", paused)
            if diagnosis.cause is Cause.UNKNOWN:
                # No remedy this runbook knows: stay contained and hand over, rather than resume
                # intake into the same failures.
                return self.steps.finish(
                    Outcome.DONE,
                    f"{over}; intake of {error_class} paused. The cause is elsewhere: "
                    f"{diagnosis.evidence}. Investigate, then remove {error_class} from "
                    f"{INTAKE_PAUSED_KEY} to resume",
                )
            remedy = await self._remediate(req, diagnosis)
            await self.steps.check(
                "wait for the pool",
                KubernetesActivities.wait_rollout,
                RolloutWait(
                    namespace=req.namespace,
                    name=req.worker_pool,
                    timeout_seconds=req.rollout_timeout_seconds,
                ),
                start_to_close_timeout=timedelta(seconds=req.rollout_timeout_seconds + 60),
            )

        await resume_intake()
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {over}; {diagnosis.evidence}. Would pause intake of {error_class}, "
                f"{remedy.detail}, then resume intake",
            )
        held, last = await holds_for(
            lambda: self.steps.verify(
                "verify the rate stays under the threshold",
                MetricsActivities.failure_rate,
                window,
                start_to_close_timeout=REMOTE_CALL_TIMEOUT,
            ),
            lambda r: bool(r.rate <= req.threshold),
            settle=req.settle_seconds,
            within=req.verify_timeout_seconds,
        )
        if not held:
            await intake.set("pause intake again", paused)
            raise self.steps.fail(
                "verify the rate stays under the threshold",
                f"after the remedy ({remedy.detail}) the failure rate did not stay under "
                f"{req.threshold:.1%} for {req.settle_seconds:g}s (last: "
                f"{last.rate:.1%} of {last.total}); intake of {error_class} is paused again",
            )
        return self.steps.finish(
            Outcome.DONE,
            f"{over}; {diagnosis.evidence}. Paused intake of {error_class}, {remedy.detail}, "
            f"resumed intake; the rate stayed at or under {req.threshold:.1%} for "
            f"{req.settle_seconds:g}s",
        )

    async def _triage(self, req: HighErrorRateRequest, over: str) -> tuple[Diagnosis, str]:
        """Where the failures come from, and which cause that points at; the top error class."""
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
        pods = await self.steps.check(
            "check the worker pool",
            KubernetesActivities.list_pods,
            PodSelector(namespace=req.namespace, labels={"app": req.worker_pool}),
        )
        history = await self.steps.check(
            "read the pool's rollout history",
            KubernetesActivities.rollout_history,
            DeploymentRef(namespace=req.namespace, name=req.worker_pool),
        )
        pool = {p.name for p in pods.pods}
        diagnosis = diagnose(req, breakdown, pool, history, workflow.now())
        return diagnosis, breakdown.by_error_class[0].key

    async def _remediate(self, req: HighErrorRateRequest, diagnosis: Diagnosis) -> MutationResult:
        """Roll back the rollout the failures came with, or restart the stuck pool."""
        if diagnosis.cause is Cause.ROLLOUT:
            await self.steps.approval(
                "approve rolling back the last rollout",
                f"{diagnosis.evidence}; roll {req.worker_pool} back to revision "
                f"{diagnosis.back_to}? {req.reason}",
            )
            return await self.steps.act(
                "roll back the last rollout",
                KubernetesActivities.rollout_undo,
                RolloutUndo(
                    namespace=req.namespace, name=req.worker_pool, to_revision=diagnosis.back_to
                ),
            )
        await self.steps.approval(
            "approve restarting the stuck pool",
            f"{diagnosis.evidence}; restart the pool? {req.reason}",
        )
        return await self.steps.act(
            "restart the stuck pool",
            KubernetesActivities.rollout_restart,
            RolloutRestart(namespace=req.namespace, name=req.worker_pool),
        )
