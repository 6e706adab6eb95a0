"""Redis Failure: Astra's Redis is down or lost its data; fail over if it must, then rebuild
from PostgreSQL what Redis lost, and restart the services that use it.

Operations wiki: trigger "Redis connection errors or data loss"; its SEV2 example is "Single
region Redis loss". Redis holds Astra's shard streams, dead-letter stream and heartbeats, and
PostgreSQL the truth they mirror (``tasks``), so a lost Redis is rebuilt from PostgreSQL.

What the checks decide. When the primary the platform uses answers and holds everything
PostgreSQL says it must (its data marker, each settled pending task on its stream, each dead
letter), there is nothing to do. When it answers but lost data (flushed, restarted without
persistence), it is rebuilt, with no failover. When it does not answer, or is no primary any
more, the run fails over to the reachable replica holding the most of its writes (``REPLICAOF
NO ONE``, or ``SENTINEL FAILOVER`` where Sentinels watch it), or adopts the server that already
is the primary (Sentinel or a person got there first), points the platform at it and rebuilds
what the replica had not received. Either change waits for Kernel SRE, unless the policy's
``automatic`` budget for the step allows one more unattended.

Why this order: the platform is pointed at a server only once it takes writes. The scheduler
(which publishes tasks) restarts first, and the rebuild waits until what its old pods committed
is older than the grace: everything they could not publish to the lost server is then the
rebuild's, and everything the new pods publish reaches the new one. The streams are rebuilt
before the consumers (workers, then agents) restart, so a restarted worker finds every pending
task; the data marker goes back after the rebuild, because it says "this Redis is whole".

Rollback: none, by design. A promoted replica cannot be made a replica again without losing the
writes it took since, and the old primary is down or behind it; a rebuild only adds entries
PostgreSQL says are missing. A run that fails stops where it is and says so; every step is
idempotent, so running the runbook again continues from the world as it finds it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import Field
from temporalio import workflow

from workflows.models import (
    DAY,
    HOUR,
    KubernetesLabel,
    KubernetesName,
    Outcome,
    RunbookRequest,
    RunbookResult,
)
from workflows.rollouts import roll, roll_steps
from workflows.runbook import Runbook, RunbookSpec
from workflows.task_health import PROBES, wait_until

with workflow.unsafe.imports_passed_through():
    from activities.endpoints import PLATFORM_CLIENTS, EndpointActivities, EndpointRef, Repoint
    from activities.redis_nodes import (
        NodeWorkers,
        Promote,
        Promotion,
        RebuildStreams,
        RedisNodeActivities,
        RedisSurvey,
        RestoreMarker,
        SentinelFailover,
        StreamCheck,
        StreamReport,
        SurveyRequest,
    )

SURVEY_TIMEOUT = timedelta(minutes=1)
"""A survey asks each server and Sentinel with a timeout of a few seconds each."""
STREAMS_TIMEOUT = timedelta(minutes=30)
"""Reading (or rebuilding) every stream against PostgreSQL's tasks: minutes on a large backlog."""
PROMOTE_TIMEOUT = timedelta(minutes=2)
"""``REPLICAOF NO ONE`` and ``CONFIG REWRITE``, each of which the server has 30 s to answer."""

CHECK_SERVERS = "check the Redis servers"
CHECK_ENDPOINT = "check the platform's Redis endpoint"
COMPARE = "compare Redis with PostgreSQL"
APPROVE_FAILOVER = "approve the Redis failover"
APPROVE_REBUILD = "approve the rebuild"
FAIL_OVER = "fail over to the replica"
REPOINT = "point the platform at the new primary"
REBUILD = "rebuild the streams from PostgreSQL"
MARKER = "restore the data marker"
VERIFY_PRIMARY = "verify one writable primary"
VERIFY_STREAMS = "verify each pending task is queued once"
VERIFY_HEARTBEATS = "verify the workers heartbeat"


PRODUCER, *CONSUMERS = PLATFORM_CLIENTS
"""The scheduler publishes tasks; the workers and agents consume them."""


class RedisFailureRequest(RunbookRequest):
    namespace: KubernetesLabel = "astra"
    config_map: KubernetesName = "astra-config"
    publish_grace_seconds: float = Field(
        default=2,
        gt=0,
        le=HOUR,
        description="a task pending for less than this may still be on its way to its stream "
        "(Astra commits, then publishes): the rebuild leaves it to Astra, and the checks do not "
        "count it missing",
    )
    rebuild_batch_size: int = Field(default=1_000, gt=0, le=100_000)
    heartbeat_threshold_seconds: float = Field(
        default=30, gt=0, le=DAY, description="a worker heartbeating within this is alive"
    )
    failover_timeout_seconds: float = Field(
        default=60, gt=0, le=HOUR, description="how long Sentinel may take to name a new primary"
    )
    rollout_timeout_seconds: float = Field(default=600, gt=0, le=DAY)
    verify_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=DAY,
        description=f"how long the workers may take to heartbeat into the primary after the "
        f"restart; it is measured {PROBES} times over this wait",
    )


def steps(req: RedisFailureRequest) -> list[str]:
    return [
        CHECK_SERVERS,
        CHECK_ENDPOINT,
        COMPARE,
        APPROVE_FAILOVER,
        APPROVE_REBUILD,
        FAIL_OVER,
        REPOINT,
        *roll_steps(PRODUCER),
        REBUILD,
        MARKER,
        *roll_steps(*CONSUMERS),
        VERIFY_PRIMARY,
        VERIFY_STREAMS,
        VERIFY_HEARTBEATS,
    ]


SPEC = RunbookSpec(
    name="redis-failure",
    title="Redis Failure",
    trigger="Redis connection errors or data loss",
    rotation="kernel-sre",
    severity="SEV2",
    request=RedisFailureRequest,
    subject=lambda req: req.namespace,
    steps=steps,
)


def lost(report: StreamReport) -> str:
    """What a comparison found missing, for a person to read."""
    return (
        f"{report.missing} of {report.pending} pending tasks and {report.dead_letters_missing} "
        f"of {report.dead_letter_rows} dead letters missing, data marker "
        f"{'present' if report.marker else 'missing'}"
    )


@workflow.defn(name=SPEC.name)
class RedisFailure(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: RedisFailureRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._recover(req))

    async def _recover(self, req: RedisFailureRequest) -> RunbookResult:
        survey = await self.steps.check(
            CHECK_SERVERS,
            RedisNodeActivities.survey,
            SurveyRequest(),
            start_to_close_timeout=SURVEY_TIMEOUT,
        )
        if len(survey.primaries()) > 1:
            raise self.steps.fail(
                CHECK_SERVERS,
                f"{' and '.join(survey.primaries())} all take writes: make all but one a "
                "replica (REPLICAOF) by hand, then run this again",
            )
        endpoint = await self.steps.check(
            CHECK_ENDPOINT,
            EndpointActivities.platform_endpoint,
            EndpointRef(namespace=req.namespace, config_map=req.config_map, store="redis"),
        )
        current = endpoint.node
        if current is None:
            raise self.steps.fail(
                CHECK_ENDPOINT,
                f"{endpoint.summary()}: list that server in the data-plane topology "
                "(ASTRA_OPS_DATA_PLANE_TOPOLOGY), or point REDIS_URL at one it lists",
            )
        state = survey.node(current)
        failover = state is None or not state.reachable or state.role != "primary"
        target = self._failover_target(survey, current) if failover else current
        if target is None:
            raise self.steps.fail(
                CHECK_SERVERS,
                f"Redis {current} is down and no replica answers ({survey.summary()}): restart "
                f"{current} from its persistence, then run this again to rebuild what it lost",
            )
        report = await self.steps.check(
            COMPARE,
            RedisNodeActivities.compare_streams,
            StreamCheck(node=target, publish_grace_seconds=req.publish_grace_seconds),
            start_to_close_timeout=STREAMS_TIMEOUT,
        )
        if not failover and not report.lost:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"Redis {current} answers as the primary and holds every pending task, dead "
                "letter and its data marker; nothing to do",
            )

        why = (
            f"Redis {current} is down ({state.summary() if state else 'unknown'}): fail over to "
            f"{target}, point the platform at it, then rebuild from PostgreSQL "
            f"({lost(report)} on {target})"
            if failover
            else f"Redis {current} answers but lost data ({lost(report)}): rebuild it from "
            "PostgreSQL"
        )
        ask = f"{why}, and restart {', '.join(PLATFORM_CLIENTS)}? {req.reason}".strip()
        if failover:
            self.steps.skip(APPROVE_REBUILD, "not needed: the failover's approval covers it")
            await self._approve(APPROVE_FAILOVER, FAIL_OVER, req, ask)
        else:
            self.steps.skip(APPROVE_FAILOVER, "not needed: the primary answers")
            await self._approve(APPROVE_REBUILD, REBUILD, req, ask)

        if failover:
            promoted = await self._fail_over(req, survey, current, target)
            target = promoted.node
            await self.steps.act(
                REPOINT,
                EndpointActivities.repoint_platform,
                Repoint(
                    namespace=req.namespace, config_map=req.config_map, store="redis", node=target
                ),
            )
        else:
            for step in (FAIL_OVER, REPOINT):
                self.steps.skip(step, f"not needed: {current} answers as the primary")
        await self._restart(req, PRODUCER)
        if not req.dry_run:
            # What the scheduler's old pods committed is pending for the grace before the
            # rebuild counts it; from then on, their publishes that never arrived are the
            # rebuild's to make.
            await workflow.sleep(timedelta(seconds=req.publish_grace_seconds))
        rebuild = await self.steps.act(
            REBUILD,
            RedisNodeActivities.rebuild_streams,
            RebuildStreams(
                node=target,
                publish_grace_seconds=req.publish_grace_seconds,
                batch_size=req.rebuild_batch_size,
            ),
            start_to_close_timeout=STREAMS_TIMEOUT,
        )
        await self.steps.act(
            MARKER,
            RedisNodeActivities.restore_marker,
            RestoreMarker(node=target, publish_grace_seconds=req.publish_grace_seconds),
            start_to_close_timeout=STREAMS_TIMEOUT,
        )
        restarted_at = workflow.now()
        for deployment in CONSUMERS:
            await self._restart(req, deployment)
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {why}; {rebuild.detail}; would restart {', '.join(PLATFORM_CLIENTS)}",
            )
        return await self._verify(req, target, restarted_at, rebuild.detail)

    async def _restart(self, req: RedisFailureRequest, deployment: str) -> None:
        """Roll a Deployment's pods, so they connect to the endpoints the config names now."""
        await roll(
            self.steps,
            req.namespace,
            deployment,
            req.rollout_timeout_seconds,
            config_map=req.config_map,
        )

    @staticmethod
    def _failover_target(survey: RedisSurvey, current: str) -> str | None:
        """The server to fail over to: the one that already is the primary (Sentinel's pick
        first), else the reachable replica holding the most of the old primary's writes; None
        when none answers."""
        named = survey.sentinel.primary if survey.sentinel else None
        for candidate in (named, *survey.primaries()):
            node = survey.node(candidate) if candidate else None
            if node is not None and node.reachable and node.role == "primary":
                return node.name
        best = survey.best_replica(current)
        return best.name if best else None

    async def _approve(
        self, step: str, unattended: str, req: RedisFailureRequest, reason: str
    ) -> None:
        """Ask for ``step``'s approval, unless the policy's budget of ``unattended`` allows one
        more without a person. Budgeted per platform: a Redis that keeps failing must reach one.
        """
        claim = await self.steps.within_automatic_limit(unattended, f"{req.namespace}/redis")
        if claim is not None and claim.allowed:
            self.steps.skip(step, f"not needed: within the automatic limit ({claim.detail})")
            return
        over = f"{claim.detail}. " if claim is not None else ""
        await self.steps.approval(step, over + reason)

    async def _fail_over(
        self, req: RedisFailureRequest, survey: RedisSurvey, current: str, target: str
    ) -> Promotion:
        if survey.sentinel is not None:
            return await self.steps.act(
                FAIL_OVER,
                RedisNodeActivities.sentinel_failover,
                SentinelFailover(away_from=current, timeout_seconds=req.failover_timeout_seconds),
                start_to_close_timeout=timedelta(seconds=req.failover_timeout_seconds + 60),
            )
        return await self.steps.act(
            FAIL_OVER,
            RedisNodeActivities.promote,
            Promote(node=target),
            start_to_close_timeout=PROMOTE_TIMEOUT,
        )

    async def _verify(
        self, req: RedisFailureRequest, target: str, restarted_at: datetime, rebuilt: str
    ) -> RunbookResult:
        survey = await self.steps.verify(
            VERIFY_PRIMARY,
            RedisNodeActivities.survey,
            SurveyRequest(),
            start_to_close_timeout=SURVEY_TIMEOUT,
        )
        if survey.primaries() != [target]:
            raise self.steps.fail(
                VERIFY_PRIMARY,
                f"expected {target} alone to take writes, found "
                f"{', '.join(survey.primaries()) or 'none'} ({survey.summary()}); make the "
                "others replicas (REPLICAOF) before the platform writes to two",
            )
        report = await self.steps.verify(
            VERIFY_STREAMS,
            RedisNodeActivities.compare_streams,
            StreamCheck(node=target, publish_grace_seconds=req.publish_grace_seconds),
            start_to_close_timeout=STREAMS_TIMEOUT,
        )
        if report.lost or report.duplicated:
            raise self.steps.fail(
                VERIFY_STREAMS,
                f"{report.summary()}; missing: {', '.join(report.missing_sample) or 'none'}, "
                f"queued twice: {', '.join(report.duplicated_sample) or 'none'}",
            )
        live = await wait_until(
            lambda: self.steps.verify(
                VERIFY_HEARTBEATS,
                RedisNodeActivities.heartbeating_workers,
                NodeWorkers(
                    node=target,
                    threshold_seconds=req.heartbeat_threshold_seconds,
                    since=restarted_at,
                ),
            ),
            bool,
            within=req.verify_timeout_seconds,
        )
        if not live:
            raise self.steps.fail(
                VERIFY_HEARTBEATS,
                f"no worker heartbeat on {target} within {req.verify_timeout_seconds:g}s of the "
                "restart; check the workers' logs for Redis errors",
            )
        return self.steps.finish(
            Outcome.DONE,
            f"Redis {target} is the one primary; {rebuilt}; every pending task is queued once "
            f"({report.pending}); {len(live)} workers heartbeat ({', '.join(live)})",
        )
