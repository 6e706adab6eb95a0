"""Canary Upgrade: move a service onto a new image through a canary, watched and approved.

Operations wiki, upgrade plan: "Rolling upgrades with canary: 5% traffic for 30 minutes, then
full rollout", and migrations "must be backward-compatible with the current running binary". The
checks come first and change nothing: the stable rollout is healthy, the release's new
migrations keep the running binary working, and no SEV1/SEV2 incident is open on the rotation
that owns the service (the access policy blocks, or asks).

Then the plan, steps as data like Argo Rollouts' ``setWeight``/``pause``/analysis: by default 5%
with a 30-minute window and analysis, an approval, then 100%. A weight runs that share of the
service's replicas (rounded up, at least one pod) as a canary Deployment beside the stable one,
whose pods the Service selects too, so they take that share of the work; the stable Deployment
keeps every replica, so capacity never drops. A window is a durable timer counted from when the
canary's pods were ready. During it the canary's pods are measured against every other worker
each interval (failure rate and p95 latency, from Astra's tasks): a failed measurement aborts
at once; a window in which no measurement passed asks a person. People can promote (end the
window), pause and resume its clock, or abort. The approval before 100% is the person's
decision; unanswered, it times out to an abort. 100% rolls the stable Deployment onto the new
image, waits for every replica, removes the canary and verifies every pod runs the new image.

Rollback: a failed analysis, an abort, a rejection, an approval timing out or a failed step
removes the canary; if the stable Deployment had moved, its previous image comes back and is
waited for; the service's rotation is told in the incident channel. An image someone else set
meanwhile is left to them, and the rollback says it is incomplete.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from temporalio import workflow

from workflows.models import (
    DAY,
    Outcome,
    RunbookResult,
    SteerAction,
    SteerRequest,
)
from workflows.releases import (
    ROLLBACK_NOTICE,
    Analysis,
    ReleaseRequest,
    Running,
    check_release,
    check_steps,
    tell_rotation,
)
from workflows.rollouts import wait_for
from workflows.runbook import Runbook, RunbookSpec
from workflows.steering import Steering

with workflow.unsafe.imports_passed_through():
    from activities.canary_analysis import (
        Verdict,
    )
    from activities.kube_models import (
        CanaryRef,
        CanaryScale,
        ImageChange,
        ImageCheck,
        canary_name,
    )
    from activities.kubernetes import KubernetesActivities

PROMOTION = "approve promoting the canary"
INCONCLUSIVE = "approve going on after an inconclusive analysis"


class CanaryStep(BaseModel):
    """One step of the plan: set a weight, hold a window (with analysis), or ask for approval."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    weight: int | None = Field(default=None, ge=1, le=100)
    """Percent of the service's replicas that run the new image; 100 is the full rollout."""
    pause_seconds: float | None = Field(default=None, gt=0, le=DAY)
    """Hold the canary this long, counted from when its pods were ready."""
    analysis: bool = False
    """Measure the canary against the stable pods during the pause."""
    approval: bool = False
    """Wait for a person before the next step."""

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if self.approval and (self.weight or self.pause_seconds or self.analysis):
            raise ValueError("an approval is a step of its own (no weight, pause or analysis)")
        if not self.approval and self.weight is None and self.pause_seconds is None:
            raise ValueError("a step sets a weight, pauses, or asks for approval")
        if self.analysis and self.pause_seconds is None:
            raise ValueError("analysis runs during a pause: give pause_seconds")
        if self.weight == 100 and self.pause_seconds is not None:
            raise ValueError("the full rollout (weight 100) ends the canary: it has no pause")
        return self


def seed_plan() -> list[CanaryStep]:
    """The wiki's plan: 5% for 30 minutes with analysis, a person's approval, then 100%."""
    return [
        CanaryStep(weight=5, pause_seconds=30 * 60, analysis=True),
        CanaryStep(approval=True),
        CanaryStep(weight=100),
    ]


def _json_text(value: object) -> object:
    """``--param steps=[...]`` arrives as text: JSON, as the CLI's help says."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as err:
            raise ValueError(f"steps must be a JSON list of steps: {err}") from None
    return value


class CanaryUpgradeRequest(ReleaseRequest):
    steps: Annotated[list[CanaryStep], BeforeValidator(_json_text)] = Field(
        default_factory=seed_plan,
        min_length=1,
        max_length=20,
        description="the plan, as Argo Rollouts' steps: each sets a `weight` (percent of the "
        "replicas on the new image), holds a `pause_seconds` window (with `analysis`), or is an "
        "`approval`; it ends at weight 100, after one approval (`--param` takes JSON)",
    )

    @model_validator(mode="after")
    def _a_plan_a_person_approves(self) -> Self:
        weights = [s.weight for s in self.steps if s.weight is not None]
        if weights != sorted(set(weights)):
            raise ValueError("the weights must rise, each step above the last")
        if self.steps[-1].weight != 100:
            raise ValueError("the plan must end with the full rollout (weight 100)")
        approvals = [i for i, s in enumerate(self.steps) if s.approval]
        if len(approvals) != 1:
            raise ValueError("the plan must have exactly one approval, before weight 100")
        weight = 0
        held: set[int] = set()
        for step in self.steps:
            weight = step.weight or weight
            if step.pause_seconds is not None:
                if weight == 0:
                    raise ValueError("a pause holds a canary: set a weight before it")
                if weight in held:
                    raise ValueError(f"two pauses at {weight}%: make them one")
                held.add(weight)
        return self


def canary_replicas(weight: int, replicas: int) -> int:
    """The canary's pods for a weight: its share of the stable replicas, rounded up, at least
    one (a canary of no pods measures nothing)."""
    return max(1, math.ceil(replicas * weight / 100))


def steps(req: CanaryUpgradeRequest) -> list[str]:
    """The plan's steps, after the checks; a run skips those it does not need."""
    service = req.service
    names = check_steps(service)
    weight = 0
    for step in req.steps:
        if step.approval:
            names.append(PROMOTION)
        if step.weight is not None and step.weight < 100:
            weight = step.weight
            names += [f"set the canary to {weight}%", f"wait for the canary at {weight}%"]
        if step.weight == 100:
            names += [
                f"roll {service} onto the new image",
                f"wait for {service}",
                "remove the canary",
                f"verify every {service} pod runs the new image",
            ]
        if step.pause_seconds is not None:
            names.append(f"hold the canary at {weight}%")
            if step.analysis and INCONCLUSIVE not in names:
                names.append(INCONCLUSIVE)
    return [
        *names,
        "roll back: remove the canary",
        f"roll back: put {service} back on its previous image",
        f"roll back: wait for {service}",
        ROLLBACK_NOTICE,
    ]


SPEC = RunbookSpec(
    name="canary-upgrade",
    title="Canary Upgrade",
    trigger="A new image of an Astra service to roll out (upgrade plan)",
    rotation="agent-platform",
    severity="SEV3",
    request=CanaryUpgradeRequest,
    subject=lambda req: f"{req.namespace}/{req.service}",
    steps=steps,
)


@workflow.defn(name=SPEC.name)
class CanaryUpgrade(Runbook):
    spec = SPEC
    steer_actions = frozenset(
        {SteerAction.PROMOTE, SteerAction.ABORT, SteerAction.PAUSE, SteerAction.RESUME}
    )

    def __init__(self) -> None:
        super().__init__()
        self.steering = Steering(self.steps, self.steer_actions, PROMOTION)
        self.analysis: Analysis | None = None
        self.stable_moved = False

    @workflow.update
    def steer(self, req: SteerRequest) -> str:
        """Promote, abort, pause or resume the run (`astra-ops canary ...`)."""
        return self.steering.apply(req)

    @steer.validator
    def _validate_steer(self, req: SteerRequest) -> None:
        why = self.steering.validate(req)
        if why is not None:
            raise ValueError(why)

    @workflow.run
    async def run(self, req: CanaryUpgradeRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._upgrade(req))

    async def _upgrade(self, req: CanaryUpgradeRequest) -> RunbookResult:
        running = await check_release(self.steps, req, req.service, SPEC.rotation)
        if running is None:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"{req.service} already runs {req.image}; nothing to do"
            )
        analysis = self.analysis = Analysis(self.steps, req)

        async def roll_back() -> None:
            await self._roll_back(req, running)

        async with self.steps.compensating(f"back to {running.image}", roll_back):
            weight = 0
            ready_at = workflow.now()
            for step in req.steps:
                if step.approval:
                    await self.steps.approval(
                        PROMOTION,
                        f"{req.service}: canary of {req.image} at {weight}% "
                        f"({analysis.counts()}); approve the full rollout: {req.reason}",
                    )
                if step.weight is not None and step.weight < 100:
                    weight = step.weight
                    await self._set_weight(req, weight, running.replicas)
                    ready_at = workflow.now()
                if step.weight == 100:
                    await self._full_rollout(req)
                if step.pause_seconds is not None:
                    await self._hold(req, step, weight, ready_at, analysis)
            if req.dry_run:
                return self.steps.finish(
                    Outcome.DONE,
                    f"dry-run: would move {req.service} from {running.image} to {req.image}",
                )
            name = f"verify every {req.service} pod runs the new image"
            check = await self.steps.verify(
                name,
                KubernetesActivities.verify_image,
                ImageCheck(namespace=req.namespace, name=req.service, image=req.image),
            )
            if not check.ok:
                raise self.steps.fail(name, check.summary())
        return self.steps.finish(
            Outcome.DONE,
            f"{req.service} runs {req.image} on all {check.pods_total} pods (was "
            f"{running.image}); canary analysis: {analysis.counts()}",
        )

    async def _set_weight(self, req: CanaryUpgradeRequest, weight: int, replicas: int) -> None:
        pods = canary_replicas(weight, replicas)
        await self.steps.act(
            f"set the canary to {weight}%",
            KubernetesActivities.scale_canary,
            CanaryScale(
                namespace=req.namespace, stable=req.service, image=req.image, replicas=pods
            ),
        )
        name = f"wait for the canary at {weight}%"
        if req.dry_run:
            self.steps.skip(name, "dry-run: no canary started")
            return
        await wait_for(
            self.steps, name, req.namespace, canary_name(req.service), req.rollout_timeout_seconds
        )

    async def _full_rollout(self, req: CanaryUpgradeRequest) -> None:
        self.stable_moved = not req.dry_run
        await self.steps.act(
            f"roll {req.service} onto the new image",
            KubernetesActivities.set_image,
            ImageChange(namespace=req.namespace, name=req.service, image=req.image),
        )
        if req.dry_run:
            self.steps.skip(f"wait for {req.service}", "dry-run: nothing rolled")
        else:
            await wait_for(
                self.steps,
                f"wait for {req.service}",
                req.namespace,
                req.service,
                req.rollout_timeout_seconds,
            )
        await self.steps.act(
            "remove the canary",
            KubernetesActivities.remove_canary,
            CanaryRef(namespace=req.namespace, stable=req.service),
        )

    async def _hold(
        self,
        req: CanaryUpgradeRequest,
        step: CanaryStep,
        weight: int,
        since: datetime,
        analysis: Analysis,
    ) -> None:
        name = f"hold the canary at {weight}%"
        if req.dry_run:
            self.steps.skip(name, "dry-run: no canary to hold")
            return
        assert step.pause_seconds is not None
        passed = analysis.verdicts[Verdict.PASSED]
        ended = await self.steering.hold(
            f"hold the canary at {weight}%",
            since,
            step.pause_seconds,
            measure=analysis.measure(name, canary_name(req.service)) if step.analysis else None,
            interval=req.analysis_interval_seconds,
        )
        if step.analysis and ended is None and analysis.verdicts[Verdict.PASSED] == passed:
            await self.steps.approval(
                INCONCLUSIVE,
                f"no measurement of the canary at {weight}% passed in {step.pause_seconds:g}s "
                f"({analysis.counts()}); approve to go on, reject to roll back",
            )
        elif step.analysis:
            self.steps.skip(
                INCONCLUSIVE,
                f"promoted early by {ended.actor}" if ended is not None else "the analysis passed",
            )

    async def _roll_back(self, req: CanaryUpgradeRequest, running: Running) -> None:
        await self.steps.act(
            "roll back: remove the canary",
            KubernetesActivities.remove_canary,
            CanaryRef(namespace=req.namespace, stable=req.service),
        )
        if self.stable_moved:
            await self.steps.act(
                f"roll back: put {req.service} back on its previous image",
                KubernetesActivities.set_image,
                ImageChange(
                    namespace=req.namespace,
                    name=req.service,
                    image=running.image,
                    expected=req.image,
                ),
            )
        await wait_for(
            self.steps,
            f"roll back: wait for {req.service}",
            req.namespace,
            req.service,
            req.rollout_timeout_seconds,
        )
        await tell_rotation(
            self.steps,
            running.rotation,
            f"{SPEC.name} run {workflow.info().workflow_id}: {req.service} rolled back to "
            f"{running.image} from {req.image} after "
            f"'{self.steps.failed_step or self.steps.current}'",
        )
