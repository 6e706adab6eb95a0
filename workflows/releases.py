"""What the two ways of releasing a new image (``canary-upgrade``, ``blue-green-upgrade``) share:
their parameters, the checks before any pod moves, the analysis of the new pods against the
others, and telling the rotation when a release is rolled back. Kept once, so both check the
same things and judge a new image by the same rules.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import Field
from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.approval import RunbookStopped
from workflows.models import (
    DAY,
    HOUR,
    ImageReference,
    KubernetesLabel,
    KubernetesName,
    Outcome,
    RunbookRequest,
)
from workflows.steps import StepRunner, failure_message
from workflows.timeouts import REMOTE_CALL_TIMEOUT

with workflow.unsafe.imports_passed_through():
    from activities.access import AccessActivities, OpenIncidentsRequest
    from activities.canary_analysis import (
        AnalysisCriteria,
        CanaryMeasurementRequest,
        Verdict,
        judge,
    )
    from activities.kube_models import DeploymentRef
    from activities.kubernetes import KubernetesActivities
    from activities.notify import NotifyActivities, RotationNotice
    from activities.postgres import PostgresActivities
    from activities.releases import ReleaseActivities, ReleaseMigrationsRequest

MIGRATIONS = "check the release's migrations"
INCIDENTS = "check open incidents on its rotation"
DURING_INCIDENT = "approve upgrading during an open incident"
ROLLBACK_NOTICE = "tell the service's rotation about the rollback"


class ReleaseRequest(RunbookRequest):
    """A new image for one of Astra's services, and how its new pods are judged."""

    service: KubernetesName = Field(
        default="astra-worker", description="the service (its Deployment and Service) to upgrade"
    )
    image: ImageReference = Field(
        description="the new image of its first container",
        examples=["registry.sandbox.local/astra/astra-worker:1.5.0"],
    )
    namespace: KubernetesLabel = "astra"
    analysis_interval_seconds: float = Field(
        default=60, gt=0, le=HOUR, description="how often the new pods are measured"
    )
    max_error_rate_increase: float = Field(
        default=0.05, ge=0, le=1, description="new pods failing this much more than the rest fail"
    )
    max_latency_ratio: float = Field(
        default=2.0, ge=1, le=100, description="a p95 this many times the rest's fails"
    )
    min_samples: int = Field(
        default=20, ge=1, le=1_000_000, description="fewer tasks of the new pods: inconclusive"
    )
    failure_limit: int = Field(
        default=0, ge=0, le=100, description="failed measurements tolerated before the abort"
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)

    def criteria(self) -> AnalysisCriteria:
        return AnalysisCriteria(
            max_error_rate_increase=self.max_error_rate_increase,
            max_latency_ratio=self.max_latency_ratio,
            min_samples=self.min_samples,
        )


def check_steps(service: str) -> list[str]:
    """The checks :func:`check_release` takes, in order."""
    return [f"check {service} health", MIGRATIONS, INCIDENTS, DURING_INCIDENT]


@dataclass(frozen=True)
class Running:
    """What runs now, which the release replaces."""

    image: str
    replicas: int
    rotation: str
    """The rotation that owns the service: told if the release is rolled back."""


async def check_release(
    steps: StepRunner, req: ReleaseRequest, deployment: str, rotation: str
) -> Running | None:
    """The checks that change nothing, before any pod moves: ``deployment`` (what serves
    ``req.service`` now) is healthy; the release's new migrations keep the running binary
    working; no SEV1/SEV2 is open on the service's rotation (the policy blocks, or asks). None
    when it already runs the image: nothing to do."""
    service = req.service
    health = await steps.check(
        f"check {service} health",
        KubernetesActivities.rollout_health,
        DeploymentRef(namespace=req.namespace, name=deployment),
    )
    if not health.complete:
        raise steps.fail(
            f"check {service} health",
            f"{deployment} is not healthy ({health.summary()}"
            f"{', ' + health.failed_reason if health.failed_reason else ''}); a release now "
            "could not tell the new image's faults from the old; fix the rollout first",
        )
    if health.image == req.image:
        return None
    previous = health.image or ""
    migrations = await steps.check(
        MIGRATIONS,
        ReleaseActivities.check_release_migrations,
        ReleaseMigrationsRequest(running_image=previous, new_image=req.image),
    )
    if not migrations.ok:
        raise steps.fail(
            MIGRATIONS,
            "the release's migrations would break the running binary: "
            f"{'; '.join(migrations.findings)}; ship them the expand/contract way "
            "(docs/upgrades.md) before this image",
        )
    incidents = await steps.check(
        INCIDENTS, AccessActivities.open_incidents, OpenIncidentsRequest(service=service)
    )
    running = Running(previous, health.replicas, incidents.rotation or rotation)
    if not incidents.incidents:
        steps.skip(DURING_INCIDENT, "no open SEV1/SEV2 incident on its rotation")
        return running
    assert steps.admission is not None
    if steps.admission.access.open_incidents == "block":
        raise steps.fail(
            INCIDENTS,
            f"{incidents.summary()}; release once they are resolved (the access policy blocks "
            f"releases during them: runbooks.{steps.runbook}.open_incidents)",
        )
    await steps.approval(DURING_INCIDENT, f"{incidents.summary()}: {req.reason}")
    return running


class Analysis:
    """The new pods measured against every other worker, every interval, and each measurement
    judged by the request's criteria: past the failure limit, the run aborts and rolls back."""

    def __init__(self, steps: StepRunner, req: ReleaseRequest) -> None:
        self.steps = steps
        self.req = req
        self.criteria = req.criteria()
        self.verdicts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)
        self.pods: set[str] = set()
        """Every pod of the new image seen so far: a replaced pod's tasks still count."""

    def counts(self) -> str:
        return ", ".join(f"{n} {v.value}" for v, n in self.verdicts.items())

    def measure(self, window: str, deployment: str) -> Callable[[], Awaitable[str]]:
        """One measurement of ``deployment``'s pods, for the window ``window``."""
        req = self.req

        async def measure() -> str:
            pods = await self.steps.call(
                KubernetesActivities.deployment_pods,
                DeploymentRef(namespace=req.namespace, name=deployment),
                summary=f"{window}: list {deployment}'s pods",
            )
            self.pods |= {pod.name for pod in pods.pods}
            measurement = await self.steps.call(
                PostgresActivities.measure_canary,
                CanaryMeasurementRequest(
                    canary_workers=sorted(self.pods), window_seconds=req.analysis_interval_seconds
                ),
                summary=f"{window}: measure {deployment}",
            )
            verdict, why = judge(measurement, self.criteria)
            self.verdicts[verdict] += 1
            if verdict == Verdict.FAILED and self.verdicts[Verdict.FAILED] > req.failure_limit:
                self.steps.fail(window, f"analysis {why}")
                raise RunbookStopped(Outcome.ABORTED, f"the analysis of {deployment} {why}")
            return f"{self.counts()}; last {why}"

        return measure


async def tell_rotation(steps: StepRunner, rotation: str, text: str) -> None:
    """Say in the incident channel that a release was rolled back; a chat that fails is noted on
    the run, and does not make the rollback incomplete."""
    try:
        await steps.act(
            ROLLBACK_NOTICE,
            NotifyActivities.notify_rotation,
            RotationNotice(rotation=rotation, text=text),
            start_to_close_timeout=REMOTE_CALL_TIMEOUT,
        )
    except ActivityError as err:
        steps.rollback_note += f"; telling {rotation} failed: {failure_message(err)}"
