"""Postgres Outage: the platform's PostgreSQL primary is down; fail over to its best replica.

Operations wiki: trigger "DB connection errors platform-wide" (SEV1). The checks come first and
change nothing: which server the platform uses, and each server's state from the worker's point
of view. A primary that answers again, and takes a write, within the grace window was a blip:
nothing changes. Otherwise the most advanced healthy replica is proposed, with the data a
failover to it would lose: no acknowledged commit when it is a synchronous standby; else the
bytes of WAL it lacks behind the furthest primary position any server knows of. A replica
forgets the primary's position when its stream breaks, but a dead primary on the worker's
machine still has its WAL on disk, and its end is read there: the estimate is then exact. Where
nothing knows it, the loss is "unknown", and treated as not zero. Kernel SRE approves the
failover; a loss that is not zero needs a second step that two distinct people approve. Only a
failover proven to lose nothing (to a synchronous standby) may go without a person, within the
policy's ``automatic`` budget, as Patroni would; a flapping primary soon exhausts it.

The order is what keeps the data: fence the old primary (stopped, or refusing writes) before
promoting, and check that no server but the chosen one takes writes, before and after; promote
only a server still in recovery; then point ``DATABASE_URL`` at it and roll the services holding
connections (scheduler first); then re-attach the old primary as a replica with ``pg_rewind``
where the worker runs on its machine, or report how to rebuild it; then verify a write through
the platform's endpoint and that what the new primary had received when chosen is in its history.

Rollback: none, by design. A promotion cannot be undone (the new timeline has taken writes the
old primary never saw), so a run that fails after it must be finished forwards, and it is safe
to: every action is idempotent, and a new run finds the promoted server writable and the old one
fenced, proposes the same server, and carries on from where the last one stopped (repoint, roll,
re-attach). A run stopped before the fence changed nothing; one stopped after the fence leaves the
old primary fenced, which is what a person would want while they look.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from temporalio import workflow
from temporalio.exceptions import ActivityError

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
from workflows.steps import failure_message
from workflows.task_health import PROBES

with workflow.unsafe.imports_passed_through():
    from activities.endpoints import PLATFORM_CLIENTS, EndpointActivities, EndpointRef, Repoint
    from activities.postgres_nodes import (
        PROMOTE_SECONDS,
        STOP_SECONDS,
        Fence,
        NodesReport,
        NodesRequest,
        NodeState,
        PlatformWrite,
        PostgresNodeActivities,
        Promote,
        Reattach,
        lsn_text,
    )


class PostgresOutageRequest(RunbookRequest):
    namespace: KubernetesLabel = "astra"
    config_map: KubernetesName = Field(
        default="astra-config", description="holds DATABASE_URL, the platform's endpoint"
    )
    grace_seconds: float = Field(
        default=15,
        gt=0,
        le=HOUR,
        description="a primary that answers and takes a write within this long was a blip: no "
        "failover",
    )
    check_timeout_seconds: float = Field(
        default=3, gt=0, le=60, description="how long each server has to answer each check"
    )
    rollout_timeout_seconds: float = Field(
        default=600, gt=0, le=DAY, description="how long each service's rolling restart may take"
    )
    reattach_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=HOUR,
        description="how long the rewound old primary may take to stream from the new one",
    )


ACTION_MARGIN = timedelta(seconds=30)
"""Beyond the bound an action on a server sets itself: connecting, and the checks around it."""


def survey_timeout(req: PostgresOutageRequest) -> timedelta:
    """How long asking every server may take: each answers within twice the check timeout (a
    connection, then a write), all at once; then Patroni within one."""
    return timedelta(seconds=3 * req.check_timeout_seconds) + ACTION_MARGIN


CHECK = "check the database servers"
GRACE = "wait out the grace window"
APPROVE = "approve the failover"
APPROVE_LOSS = "approve losing data"
FENCE = "fence the old primary"
NO_SECOND_PRIMARY = "check no other server takes writes"
PROMOTE = "promote the replica"
ONE_PRIMARY = "verify one primary takes writes"
REPOINT = "point the platform at the new primary"
REATTACH = "re-attach the old primary"
VERIFY_ENDPOINT = "verify the platform's endpoint"
VERIFY_WRITE = "verify a write through the platform"

SPEC = RunbookSpec(
    name="postgres-outage",
    title="Postgres Outage",
    trigger="DB connection errors platform-wide",
    rotation="kernel-sre",
    severity="SEV1",
    request=PostgresOutageRequest,
    subject=lambda req: req.namespace,
    steps=lambda req: [
        "find the platform's database",
        CHECK,
        GRACE,
        APPROVE,
        APPROVE_LOSS,
        FENCE,
        NO_SECOND_PRIMARY,
        PROMOTE,
        ONE_PRIMARY,
        REPOINT,
        *roll_steps(*PLATFORM_CLIENTS),
        REATTACH,
        VERIFY_ENDPOINT,
        VERIFY_WRITE,
    ],
)


def best_replica(report: NodesReport, old: str) -> NodeState | None:
    """A server already promoted (a run that stopped after promoting), else the reachable
    replica that received the most WAL; a synchronous standby wins a tie."""
    others = [n for n in report.nodes if n.name != old and n.reachable]
    promoted = [n for n in others if n.in_recovery is False and n.writable]
    if promoted:
        return promoted[0]
    replicas = [n for n in others if n.in_recovery and n.received is not None]
    return max(replicas, key=lambda n: (n.received or 0, n.synchronous), default=None)


@workflow.defn(name=SPEC.name)
class PostgresOutage(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: PostgresOutageRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._fail_over(req))

    async def _servers(self, step: str, req: PostgresOutageRequest) -> NodesReport:
        return await self.steps.check(
            step,
            PostgresNodeActivities.postgres_nodes,
            NodesRequest(timeout_seconds=req.check_timeout_seconds),
            start_to_close_timeout=survey_timeout(req),
        )

    async def _fail_over(self, req: PostgresOutageRequest) -> RunbookResult:
        endpoint = await self.steps.check(
            "find the platform's database",
            EndpointActivities.platform_endpoint,
            EndpointRef(namespace=req.namespace, config_map=req.config_map, store="postgres"),
        )
        old = endpoint.node
        if old is None:
            raise self.steps.fail(
                "find the platform's database",
                f"{req.namespace}/{req.config_map} DATABASE_URL names no server of the "
                "data-plane topology; add the server to the topology, or fix DATABASE_URL",
            )
        report = await self._servers(CHECK, req)
        if report.patroni is not None:
            return self.steps.finish(
                Outcome.ABORTED,
                f"Patroni manages these servers ({report.patroni}): it fails over on its own, "
                "and a second failover manager would race it; follow Patroni (`patronictl "
                "list`) instead",
            )

        # A primary that answers and takes a write within the grace window was a blip.
        deadline = workflow.now() + timedelta(seconds=req.grace_seconds)
        while not report.node(old).writable and workflow.now() < deadline:
            await workflow.sleep(timedelta(seconds=req.grace_seconds / PROBES))
            report = await self._servers(GRACE, req)
        if report.node(old).writable:
            return self.steps.finish(
                Outcome.NO_CHANGE,
                f"{old} answers and takes writes within the {req.grace_seconds:g}s grace "
                "window: a blip, no failover",
            )
        self.steps.skip(GRACE, f"{old} did not take a write for {req.grace_seconds:g}s")

        chosen = best_replica(report, old)
        if chosen is None:
            raise self.steps.fail(
                GRACE,
                f"{old} is down and no replica is reachable and in recovery "
                f"({report.summary()}); bring one back, or the old primary",
            )
        loss = 0 if chosen.synchronous else report.lag_bytes(chosen.name)
        if chosen.synchronous:
            estimate = f"no acknowledged commit lost: {chosen.name} is a synchronous standby"
        elif loss is None:
            estimate = (
                f"data loss unknown: {chosen.name} is asynchronous and no server knows where "
                f"the WAL of {old} ends"
            )
        else:
            estimate = (
                f"at least {loss} bytes of WAL lost past {lsn_text(chosen.received)} "
                f"({chosen.name} is an asynchronous replica)"
                if loss
                else f"no WAL known lost ({chosen.name} had received all the WAL of {old} any "
                "server knows of; it is asynchronous)"
            )
        proposal = (
            f"promote {chosen.name} (received WAL up to {lsn_text(chosen.received)}) in place "
            f"of {old}, which took no write for {req.grace_seconds:g}s; {estimate}"
        )

        automatic, unattended = None, ""
        if chosen.synchronous:
            # Only a synchronous standby proves that nothing acknowledged is lost, so only a
            # failover to one may go unattended, within the policy's budget.
            try:
                automatic = await self.steps.within_automatic_limit(
                    PROMOTE, f"{req.namespace}/{old}"
                )
            except ActivityError as err:
                # The budget is counted in astra-ops's state database; on the server that
                # failed it cannot be, and a person decides.
                unattended = f" (the automatic budget could not be counted: {failure_message(err)})"
        if automatic is not None and automatic.allowed:
            self.steps.skip(APPROVE, f"not needed: {proposal}; unattended {automatic.detail}")
        else:
            if automatic is not None:
                unattended = f" ({automatic.detail})"
            await self.steps.approval(APPROVE, f"{proposal}{unattended}. {req.reason}".strip())
        if loss != 0:
            await self.steps.approval(
                APPROVE_LOSS,
                f"{estimate}: commits the old primary {old} acknowledged to clients may be "
                f"gone once {chosen.name} is promoted. {req.reason}".strip(),
            )
        else:
            self.steps.skip(APPROVE_LOSS, "not needed: no acknowledged commit is lost")

        fence = await self.steps.act(
            FENCE,
            PostgresNodeActivities.fence_postgres,
            Fence(node=old),
            start_to_close_timeout=timedelta(seconds=STOP_SECONDS) + ACTION_MARGIN,
        )
        before = await self.steps.check(
            NO_SECOND_PRIMARY,
            PostgresNodeActivities.writable_postgres,
            NodesRequest(timeout_seconds=req.check_timeout_seconds),
            start_to_close_timeout=survey_timeout(req),
        )
        others = [n for n in before.names if n != chosen.name]
        if others and not req.dry_run:
            raise self.steps.fail(
                NO_SECOND_PRIMARY,
                f"{', '.join(others)} still takes writes after the fence: promoting "
                f"{chosen.name} now would make two primaries; stop {old} by hand, then run "
                "postgres-outage again",
            )
        promote = await self.steps.act(
            PROMOTE,
            PostgresNodeActivities.promote_postgres,
            Promote(node=chosen.name),
            start_to_close_timeout=timedelta(seconds=PROMOTE_SECONDS) + ACTION_MARGIN,
        )
        if not req.dry_run:
            after = await self.steps.verify(
                ONE_PRIMARY,
                PostgresNodeActivities.writable_postgres,
                NodesRequest(timeout_seconds=req.check_timeout_seconds),
                start_to_close_timeout=survey_timeout(req),
            )
            if after.names != [chosen.name]:
                raise self.steps.fail(
                    ONE_PRIMARY,
                    f"after promoting {chosen.name}, the servers taking writes are "
                    f"{', '.join(after.names) or 'none'}; stop every one but {chosen.name} "
                    "before the platform is repointed",
                )

        repoint = await self.steps.act(
            REPOINT,
            EndpointActivities.repoint_platform,
            Repoint(
                namespace=req.namespace,
                config_map=req.config_map,
                store="postgres",
                node=chosen.name,
            ),
        )
        actions = [fence.detail, promote.detail, repoint.detail]
        for service in PLATFORM_CLIENTS:
            restart = await roll(
                self.steps,
                req.namespace,
                service,
                req.rollout_timeout_seconds,
                config_map=req.config_map,
            )
            actions.append(restart.detail)
        reattach = await self.steps.act(
            REATTACH,
            PostgresNodeActivities.reattach_postgres,
            Reattach(node=old, primary=chosen.name, timeout_seconds=req.reattach_timeout_seconds),
            start_to_close_timeout=timedelta(seconds=req.reattach_timeout_seconds + 180),
        )
        if req.dry_run:
            return self.steps.finish(
                Outcome.DONE,
                f"dry-run: {proposal}; " + "; ".join([*actions, reattach.detail]),
            )

        now = await self.steps.verify(
            VERIFY_ENDPOINT,
            EndpointActivities.platform_endpoint,
            EndpointRef(namespace=req.namespace, config_map=req.config_map, store="postgres"),
        )
        if now.node != chosen.name:
            raise self.steps.fail(
                VERIFY_ENDPOINT,
                f"DATABASE_URL names {now.node or 'no server of the topology'}, not "
                f"{chosen.name}: someone changed it during the run; check astra-config",
            )
        write = PlatformWrite(node=chosen.name, at_least=chosen.received)
        written = await self.steps.verify(
            VERIFY_WRITE,
            PostgresNodeActivities.verify_platform_write,
            write,
            # The probe gives up after twice its timeout.
            start_to_close_timeout=timedelta(seconds=2 * write.timeout_seconds) + ACTION_MARGIN,
        )
        rebuild = f"; REBUILD NEEDED: {reattach.rebuild}" if reattach.rebuild else ""
        return self.steps.finish(
            Outcome.DONE,
            f"failed over from {old} to {chosen.name} ({estimate}); {written.summary()}; "
            f"{reattach.detail}{rebuild}",
        )
