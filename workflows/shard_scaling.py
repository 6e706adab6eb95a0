"""Shard Scaling: change TASK_SHARD_COUNT, then restart the scheduler and the workers, in order.

Operations wiki: "Shard imbalance or scaling event — update TASK_SHARD_COUNT, restart scheduler +
workers". The scheduler restarts first so that no worker reads shards the scheduler does not yet
assign.

Rollback: nothing changes before the approval, so a rejection leaves everything as it was. A
failure or cancel after the ConfigMap changed puts the old count back and restarts the scheduler,
then the workers, in the same order, so the platform never runs with two shard counts for longer
than a rollout. If someone else changed the count after the run set it, their value stays, nothing
is restarted, and the run reports the rollback incomplete: a person decides which count is right.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from temporalio import workflow

from workflows.models import (
    DAY,
    KubernetesLabel,
    KubernetesName,
    Outcome,
    RunbookRequest,
    RunbookResult,
)
from workflows.runbook import Runbook, RunbookSpec

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import (
        ConfigPatch,
        ConfigRef,
        ConfigRollout,
        DeploymentRef,
        RolloutRestart,
        RolloutWait,
    )
    from activities.kubernetes import KubernetesActivities

SHARD_COUNT_KEY = "TASK_SHARD_COUNT"


class ShardScalingRequest(RunbookRequest):
    shards: int = Field(ge=1, le=4096, description="the target TASK_SHARD_COUNT", examples=[12])
    namespace: KubernetesLabel = "astra"
    config_map: KubernetesName = "astra-config"
    scheduler: KubernetesName = "astra-scheduler"
    workers: KubernetesName = "astra-worker"
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)


def steps(req: ShardScalingRequest) -> list[str]:
    """The scheduler's steps before the workers', as the run takes them."""
    deployments = (req.scheduler, req.workers)
    return [
        "read current shard count",
        *(f"check {d} health" for d in deployments),
        "approve scaling",
        f"set {SHARD_COUNT_KEY}",
        *(step for d in deployments for step in (f"restart {d}", f"wait for {d}")),
        *(f"verify {d} runs the new config" for d in deployments),
    ]


SPEC = RunbookSpec(
    name="shard-scaling",
    title="Shard Scaling",
    trigger="Shard imbalance or scaling event",
    rotation="kernel-sre",
    severity="SEV3",
    request=ShardScalingRequest,
    subject=lambda req: req.namespace,
    steps=steps,
)


@workflow.defn(name=SPEC.name)
class ShardScaling(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: ShardScalingRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._scale(req))

    async def _scale(self, req: ShardScalingRequest) -> RunbookResult:
        target = str(req.shards)
        current = await self.steps.check(
            "read current shard count",
            KubernetesActivities.read_config,
            ConfigRef(namespace=req.namespace, name=req.config_map, key=SHARD_COUNT_KEY),
        )
        before = current.value
        if before is None:
            raise self.steps.fail(
                "read current shard count",
                f"{req.namespace}/{req.config_map} has no {SHARD_COUNT_KEY}; "
                "set it by hand before scaling",
            )
        if before == target:
            return self.steps.finish(
                Outcome.NO_CHANGE, f"already at {target} shards; nothing to do"
            )
        for deployment in (req.scheduler, req.workers):
            name = f"check {deployment} health"
            health = await self.steps.check(
                name,
                KubernetesActivities.rollout_health,
                DeploymentRef(namespace=req.namespace, name=deployment),
            )
            if not health.complete:
                raise self.steps.fail(
                    name,
                    f"{deployment} is not healthy ({health.ready}/{health.replicas} ready"
                    f"{', ' + health.failed_reason if health.failed_reason else ''}); "
                    "scaling now would mix shard counts; fix the rollout first",
                )

        change = f"{SHARD_COUNT_KEY} {before} -> {target}"
        await self.steps.approval("approve scaling", f"{change}: {req.reason}")

        async def roll_back() -> None:
            await self._apply(req, before, "roll back: ", expected=target)

        async with self.steps.compensating("restore the old shard count", roll_back):
            await self._apply(req, target, "")
            if req.dry_run:
                return self.steps.finish(Outcome.DONE, f"dry-run: would change {change}")
            pods = 0
            for deployment in (req.scheduler, req.workers):
                name = f"verify {deployment} runs the new config"
                check = await self.steps.verify(
                    name,
                    KubernetesActivities.verify_config,
                    ConfigRollout(
                        namespace=req.namespace, deployment=deployment, config_map=req.config_map
                    ),
                )
                if not check.ok:
                    raise self.steps.fail(
                        name,
                        f"{len(check.stale)} of {check.pods_total} {deployment} pods run a stale "
                        f"config: {', '.join(check.stale)}",
                    )
                pods += check.pods_total
        return self.steps.finish(
            Outcome.DONE,
            f"{change}; {req.scheduler} then {req.workers} restarted, {pods} pods verified",
        )

    async def _apply(
        self, req: ShardScalingRequest, value: str, prefix: str, expected: str | None = None
    ) -> None:
        """Set the shard count, then restart the scheduler and the workers, each waited for.

        A roll back expects the count this run set: a count someone else set since is theirs to
        keep, and nothing is restarted for it.
        """
        await self.steps.act(
            f"{prefix}set {SHARD_COUNT_KEY}",
            KubernetesActivities.patch_config,
            ConfigPatch(
                namespace=req.namespace,
                name=req.config_map,
                key=SHARD_COUNT_KEY,
                value=value,
                expected=expected,
            ),
        )
        for deployment in (req.scheduler, req.workers):
            await self.steps.act(
                f"{prefix}restart {deployment}",
                KubernetesActivities.rollout_restart,
                RolloutRestart(namespace=req.namespace, name=deployment, config_map=req.config_map),
            )
            await self.steps.check(
                f"{prefix}wait for {deployment}",
                KubernetesActivities.wait_rollout,
                RolloutWait(
                    namespace=req.namespace,
                    name=deployment,
                    timeout_seconds=req.rollout_timeout_seconds,
                ),
                start_to_close_timeout=timedelta(seconds=req.rollout_timeout_seconds + 60),
            )
