"""Worker Lost: a worker stopped heartbeating; give its tasks back and replace its pod.

Operations wiki: trigger "Heartbeat lost >30s". The tasks go back to pending before the pod is
deleted, so that live workers pick them up even if the replacement never comes. One lost worker
is routine and needs no approval; when more than ``stuck_pool_share`` of the pool is lost at once
the pool itself is stuck (SEV2), and replacing its pods waits for Agent Platform (who own the
workers).

Rollback: none. A requeue cannot be undone safely (live workers may have picked the tasks up),
and a deleted pod is replaced by its Deployment. A run stopped before the requeue changed
nothing; one that fails while verifying leaves the tasks pending for the live workers.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from temporalio import workflow

from workflows.models import DAY, KubernetesName, Outcome, RunbookResult
from workflows.runbook import Runbook, RunbookSpec
from workflows.task_health import PROBES, TaskHealthRequest, wait_until

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import PodDelete, PodSelector
    from activities.kubernetes import KubernetesActivities
    from activities.postgres import (
        LeasedTasksRequest,
        PostgresActivities,
        RequeueLostWorker,
        RequeueProgressRequest,
    )
    from activities.redis_store import HeartbeatAgeRequest, LiveWorkersRequest, RedisActivities


class WorkerLostRequest(TaskHealthRequest):
    worker_id: KubernetesName = Field(
        description="the lost worker (its pod name)", examples=["astra-worker-7"]
    )
    heartbeat_threshold_seconds: float = Field(
        default=30,
        gt=0,
        le=DAY,
        description="a heartbeat older than this means the worker is lost",
    )
    stuck_pool_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="more than this share of the pool lost at once is a stuck pool (SEV2), "
        "and replacing pods then needs approval",
    )
    requeue_batch_size: int = Field(default=5_000, gt=0, le=100_000)
    verify_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=DAY,
        description="how long a replacement's heartbeat and the pickup of the requeued tasks "
        f"may take before the run fails; each is measured {PROBES} times over this wait",
    )


SPEC = RunbookSpec(
    name="worker-lost",
    title="Worker Lost",
    trigger="Heartbeat lost >30s",
    rotation="agent-platform",
    severity="SEV3",
    request=WorkerLostRequest,
    subject=lambda req: req.worker_id,
    steps=lambda req: [
        "confirm the heartbeat is lost",
        "check the worker's pod",
        "check the rest of the pool",
        "count the worker's leased tasks",
        "approve replacing workers of a stuck pool",
        "approve deleting more pods than the automatic limit",
        "requeue the worker's tasks",
        "delete the worker's pod",
        "verify a replacement heartbeats",
        "verify the requeued tasks are picked up",
    ],
)


@workflow.defn(name=SPEC.name)
class WorkerLost(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: WorkerLostRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._recover(req))

    async def _recover(self, req: WorkerLostRequest) -> RunbookResult:
        worker, threshold = req.worker_id, req.heartbeat_threshold_seconds
        heartbeat = await self.steps.check(
            "confirm the heartbeat is lost",
            RedisActivities.heartbeat_age,
            HeartbeatAgeRequest(worker_id=worker),
        )
        if heartbeat.age_seconds is not None and heartbeat.age_seconds <= threshold:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"{worker} heartbeat {heartbeat.age_seconds:.0f}s ago (threshold {threshold:g}s); "
                "it is alive, nothing to do",
            )
        pods = await self.steps.check(
            "check the worker's pod",
            KubernetesActivities.list_pods,
            PodSelector(namespace=req.namespace, labels={"app": req.worker_pool}),
        )
        pool = [p.name for p in pods.pods]
        live = await self.steps.check(
            "check the rest of the pool",
            RedisActivities.live_workers,
            LiveWorkersRequest(threshold_seconds=threshold),
        )
        lost = [name for name in pool if name not in live]
        leases = await self.steps.check(
            "count the worker's leased tasks",
            PostgresActivities.lease_summary,
            LeasedTasksRequest(worker_id=worker),
        )

        pod_deleted = worker in pool
        stuck = bool(pool) and len(lost) / len(pool) > req.stuck_pool_share
        if stuck:
            await self.steps.approval(
                "approve replacing workers of a stuck pool",
                f"{len(lost)} of {len(pool)} {req.worker_pool} pods have no heartbeat for "
                f"{threshold:g}s ({', '.join(lost)}): a stuck pool (SEV2). Requeue the "
                f"{leases.count} tasks of {worker} and replace its pod? {req.reason}",
            )
        else:
            self.steps.skip(
                "approve replacing workers of a stuck pool",
                f"not needed: {len(lost)} of {len(pool)} {req.worker_pool} pods lost, not more "
                f"than {req.stuck_pool_share:.0%} of the pool",
            )
        if pod_deleted and not stuck:
            # Unattended deletions are budgeted per pool: a flapping pool must reach a person.
            claim = await self.steps.within_automatic_limit(
                "delete the worker's pod", f"{req.namespace}/{req.worker_pool}"
            )
            if claim is not None and not claim.allowed:
                await self.steps.approval(
                    "approve deleting more pods than the automatic limit",
                    f"{claim.detail}. Requeue the {leases.count} tasks of {worker} and delete "
                    f"its pod anyway? {req.reason}",
                )

        requeue = await self.steps.act(
            "requeue the worker's tasks",
            PostgresActivities.requeue_lost_worker,
            RequeueLostWorker(
                worker_id=worker, leased_before=leases.as_of, batch_size=req.requeue_batch_size
            ),
            start_to_close_timeout=timedelta(minutes=30),
        )
        if pod_deleted:
            await self.steps.act(
                "delete the worker's pod",
                KubernetesActivities.delete_pod,
                PodDelete(namespace=req.namespace, name=worker),
            )
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {requeue.detail}"
                + (f"; would delete pod {worker}" if pod_deleted else f"; {worker} has no pod"),
            )

        newcomers: list[str] = []
        if pod_deleted:
            replacement = await wait_until(
                lambda: self.steps.verify(
                    "verify a replacement heartbeats",
                    RedisActivities.live_workers,
                    LiveWorkersRequest(threshold_seconds=threshold),
                ),
                lambda now_live: any(w not in pool for w in now_live),
                within=req.verify_timeout_seconds,
            )
            newcomers = [w for w in replacement if w not in pool]
            if not newcomers:
                raise self.steps.fail(
                    "verify a replacement heartbeats",
                    f"no new {req.worker_pool} worker heartbeat within "
                    f"{req.verify_timeout_seconds:g}s of deleting {worker}; check the "
                    "Deployment's events and the new pod's logs",
                )
        progress = await wait_until(
            lambda: self.steps.verify(
                "verify the requeued tasks are picked up",
                PostgresActivities.requeue_progress,
                RequeueProgressRequest(token=requeue.token),
            ),
            lambda p: p.waiting == 0,
            within=req.verify_timeout_seconds,
        )
        if progress.waiting:
            raise self.steps.fail(
                "verify the requeued tasks are picked up",
                f"{progress.waiting} of {progress.requeued} requeued tasks still pending after "
                f"{req.verify_timeout_seconds:g}s; are the live workers leasing?",
            )
        return self.steps.finish(
            Outcome.DONE,
            f"{requeue.detail}; "
            + (
                f"pod {worker} replaced, {', '.join(newcomers)} heartbeating"
                if pod_deleted
                else f"{worker} had no pod left to replace"
            )
            + f"; all {progress.requeued} requeued tasks picked up",
        )
