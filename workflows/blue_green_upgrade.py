"""Blue-Green Upgrade: bring the new image up beside the old, then switch the Service to it.

Operations wiki, upgrade plan: "Blue/green deployment where possible for zero-downtime schema
migrations". Blue is the Deployment the service's Service selects now, green the other of its
two (named like the service, and ``<service>-green``). The checks come first and change nothing:
blue is healthy, the release's new migrations keep the running binary working, and no SEV1/SEV2
is open on the service's rotation (the policy blocks, or asks).

Green comes up on the new image with as many replicas as blue, beside it and outside the
Service, so it takes no work yet; before promotion every green pod must be ready on the new
image. A person approves the switch, and unanswered the approval times out to an abort. The
Service's selector then moves to green's pods in one write: all of the work moves at once, and
nothing is rolled pod by pod. Blue is kept, at full size, for a window (a durable timer from
the switch), while green's pods are measured against the rest each interval: a failed
measurement, an abort, or `astra-ops blue-green switch-back` sends the work back to blue at
once. A promote ends the window early. Then blue is scaled down to no pods, and kept, to be the
green of the next release.

Rollback: the Service goes back to blue's pods (if it had moved, and while it selects green as
this run left it; a switch someone else made is left to them and the rollback says it is
incomplete), green is scaled down to no pods, and the service's rotation is told in the
incident channel. Blue was never changed, so switching back is instant.
"""

from __future__ import annotations

from pydantic import Field
from temporalio import workflow

from workflows.approval import RunbookStopped
from workflows.models import DAY, Outcome, RunbookResult, SteerAction, SteerRequest
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
    from activities.kube_models import (
        DeploymentScale,
        ImageCheck,
        ServicePoint,
        ServiceRef,
        SlotDeploy,
        Slots,
    )
    from activities.kubernetes import KubernetesActivities

SWITCH = "approve switching the traffic to green"
KEEP_BLUE = "keep blue for a switch back"


class BlueGreenUpgradeRequest(ReleaseRequest):
    keep_blue_seconds: float = Field(
        default=30 * 60,
        gt=0,
        le=DAY,
        description="how long blue is kept at full size after the switch, for an instant "
        "switch back",
    )


def steps(req: BlueGreenUpgradeRequest) -> list[str]:
    return [
        "find blue and green",
        *check_steps(req.service),
        "bring up green on the new image",
        "wait for green",
        "check every green pod runs the new image",
        SWITCH,
        "switch the Service to green",
        KEEP_BLUE,
        "scale blue down",
        "roll back: switch the Service back to blue",
        "roll back: scale green down",
        ROLLBACK_NOTICE,
    ]


SPEC = RunbookSpec(
    name="blue-green-upgrade",
    title="Blue-Green Upgrade",
    trigger="A new image of an Astra service to switch to at once (upgrade plan)",
    rotation="agent-platform",
    severity="SEV3",
    request=BlueGreenUpgradeRequest,
    subject=lambda req: f"{req.namespace}/{req.service}",
    steps=steps,
)


@workflow.defn(name=SPEC.name)
class BlueGreenUpgrade(Runbook):
    spec = SPEC
    steer_actions = frozenset({SteerAction.SWITCH_BACK, SteerAction.PROMOTE, SteerAction.ABORT})

    def __init__(self) -> None:
        super().__init__()
        self.steering = Steering(self.steps, self.steer_actions, SWITCH)
        self.switched = False

    @workflow.update
    def steer(self, req: SteerRequest) -> str:
        """Switch back, promote (end the window) or abort (`astra-ops blue-green ...`)."""
        return self.steering.apply(req)

    @steer.validator
    def _validate_steer(self, req: SteerRequest) -> None:
        why = self.steering.validate(req)
        if why is not None:
            raise ValueError(why)

    @workflow.run
    async def run(self, req: BlueGreenUpgradeRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._upgrade(req))

    async def _upgrade(self, req: BlueGreenUpgradeRequest) -> RunbookResult:
        slots = await self.steps.check(
            "find blue and green",
            KubernetesActivities.read_slots,
            ServiceRef(namespace=req.namespace, name=req.service),
        )
        blue, green = slots.live, slots.idle
        running = await check_release(self.steps, req, blue, SPEC.rotation)
        if running is None:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"{blue} already serves {req.image}; nothing to do"
            )
        analysis = Analysis(self.steps, req)

        async def roll_back() -> None:
            await self._roll_back(req, slots, running)

        async with self.steps.compensating(f"back to {blue}", roll_back):
            await self.steps.act(
                "bring up green on the new image",
                KubernetesActivities.deploy_slot,
                SlotDeploy(
                    namespace=req.namespace,
                    service=req.service,
                    name=green,
                    source=blue,
                    image=req.image,
                    replicas=running.replicas,
                ),
            )
            if req.dry_run:
                return self.steps.finish(
                    Outcome.DONE,
                    f"dry-run: would bring up {green} on {req.image} and switch {req.service} "
                    f"to it from {blue} ({running.image})",
                )
            await wait_for(
                self.steps, "wait for green", req.namespace, green, req.rollout_timeout_seconds
            )
            name = "check every green pod runs the new image"
            ready = await self.steps.check(
                name,
                KubernetesActivities.verify_image,
                ImageCheck(namespace=req.namespace, name=green, image=req.image),
            )
            if not ready.ok:
                raise self.steps.fail(name, ready.summary())
            await self.steps.approval(
                SWITCH,
                f"switch {req.service} from {blue} ({running.image}) to {green} ({req.image}): "
                f"{req.reason}",
            )
            self.switched = True
            await self.steps.act(
                "switch the Service to green",
                KubernetesActivities.point_service,
                ServicePoint(
                    namespace=req.namespace, service=req.service, deployment=green, expected=blue
                ),
            )
            ended = await self.steering.hold(
                KEEP_BLUE,
                workflow.now(),
                req.keep_blue_seconds,
                measure=analysis.measure(KEEP_BLUE, green),
                interval=req.analysis_interval_seconds,
            )
            if ended is not None and ended.action == SteerAction.SWITCH_BACK:
                raise RunbookStopped(
                    Outcome.ABORTED,
                    f"switched back by {ended.actor}: {ended.reason or 'no reason given'}",
                )
        await self.steps.act(
            "scale blue down",
            KubernetesActivities.scale_deployment,
            DeploymentScale(namespace=req.namespace, name=blue, replicas=0),
        )
        return self.steps.finish(
            Outcome.DONE,
            f"{req.service} serves {req.image} from {green} (was {running.image} on {blue}, "
            f"scaled down and kept); analysis: {analysis.counts()}",
        )

    async def _roll_back(
        self, req: BlueGreenUpgradeRequest, slots: Slots, running: Running
    ) -> None:
        if self.switched:
            await self.steps.act(
                "roll back: switch the Service back to blue",
                KubernetesActivities.point_service,
                ServicePoint(
                    namespace=req.namespace,
                    service=req.service,
                    deployment=slots.live,
                    expected=slots.idle,
                ),
            )
        await self.steps.act(
            "roll back: scale green down",
            KubernetesActivities.scale_deployment,
            DeploymentScale(namespace=req.namespace, name=slots.idle, replicas=0),
        )
        await tell_rotation(
            self.steps,
            running.rotation,
            f"{SPEC.name} run {workflow.info().workflow_id}: {req.service} is back on "
            f"{slots.live} ({running.image}) instead of {req.image} after "
            f"'{self.steps.failed_step or self.steps.current}'",
        )
