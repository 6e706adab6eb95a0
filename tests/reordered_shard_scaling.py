"""Shard Scaling with one step moved, to prove replay catches a reorder (tests/test_replay.py).

The deployments restart (and are waited for) before the new count is set: the same steps with
the same arguments as the released runbook, in another order. A run in flight would then see a
restart where its history has the ConfigMap patch, which is exactly what replaying its stored
history must refuse.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from workflows.models import RunbookResult
from workflows.shard_scaling import SHARD_COUNT_KEY, SPEC, ShardScaling, ShardScalingRequest

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import ConfigPatch, RolloutRestart, RolloutWait
    from activities.kubernetes import KubernetesActivities


@workflow.defn(name=SPEC.name)
class RestartBeforeSet(ShardScaling):
    @workflow.run
    async def run(self, req: ShardScalingRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._scale(req))

    async def _apply(
        self, req: ShardScalingRequest, value: str, prefix: str, expected: str | None = None
    ) -> None:
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
