"""The runs tests/histories stores: for every runbook, each branch that changes what it commands.

A branch is a different sequence of commands (activities, timers, signals, updates, how the run
ends): approved, rejected, dry-run and no change for every runbook; rolled back, cancelled,
timed out, escalated and frozen where the step runner or the approval gate takes them; and the
runbook's own turns (which remedy, which approval, a pod already gone). The incident's are its
lifecycle, its escalation, a runbook it starts for an alert, and its continuing as new. Each
scenario plays one against the real worker and the sandbox (``record.py`` sets the stage), with
short waits and timeouts as inputs (for incidents, as policy timings) so the stored histories stay
small, and checks the run ended the way the branch says: a run that went elsewhere is not recorded
under the branch's name.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import hvac
import psycopg
import redis.asyncio as aioredis
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from activities.access import KILL_SWITCH_ID
from activities.certificates import describe, read_pem
from activities.metrics import SqlMetrics
from runtime import search_attributes as sa
from runtime.settings import Settings
from sandbox.faults import (
    bad_canary,
    bad_rollout,
    cert_expiring,
    cost_spike,
    dead_letters,
    error_spike,
    worker_lost,
)
from sandbox.loadgen import Knobs, SandboxKeys, write_knobs
from sandbox.servers import DataPlane, Replication
from sandbox.servers import faults as server_faults
from sandbox.servers.openbao import OpenBaoServer
from starters.runs import Runs
from tests.conftest_incident import Desk, kinds, notification, settled
from tests.conftest_kube import KubeSandbox, eventually, sandbox_ca
from tests.conftest_sandbox import TICK_SECONDS, RunningAstra, worker_pods
from tests.helpers import handle_of, status, wait_for_step
from workflows.incident_models import ActionKind, IncidentState, Severity
from workflows.incident_models import Stage as Phase
from workflows.kill_switch import KillSwitch
from workflows.models import (
    TLS_SCAN_WORKFLOW,
    ApprovalSignal,
    Decision,
    FreezeNotice,
    Outcome,
    RunbookResult,
    SteerAction,
    StepState,
)
from workflows.tls_scan import TlsScanRequest, TlsScanResult

Handle = WorkflowHandle[Any, Any]
RedisPlane = Literal["replica", "sentinel"]
"""A Redis primary with a replica; with ``sentinel``, a Sentinel watching them too."""


class WrongBranch(Exception):
    """The run did not take the branch its scenario is named for; nothing is stored."""


@dataclass
class Stage:
    """One scenario's world: its own sandbox cluster, data plane and worker task queue."""

    client: Client
    runs: Runs
    kube: KubeSandbox
    astra: RunningAstra
    settings: Settings
    desk: Desk
    """Opens incidents and acts on them as the API does; its receivers record what they took."""
    openbao: OpenBaoServer
    """The stage's OpenBao dev server, the worker's Vault."""
    plane: DataPlane | None = None
    """The replicated PostgreSQL or Redis of a data-plane runbook's scenario, which
    ``astra-config`` names and the worker's topology lists."""

    def servers(self) -> DataPlane:
        assert self.plane is not None, "the scenario asks for no replicated plane"
        return self.plane

    async def start(
        self, runbook: str, params: dict[str, Any], *, requester: str, dry_run: bool = False
    ) -> Handle:
        """Start as the API does: validated against the policy, signed."""
        started = await self.runs.start(
            runbook, params, requester=requester, reason="recorded", dry_run=dry_run
        )
        return handle_of(self.client, started.run_id)

    async def pending(self, handle: Handle, step: str) -> None:
        async def waiting() -> bool:
            return any(p.step == step for p in (await status(handle)).pending_approvals)

        await eventually(waiting, timeout=30, interval=0.05, message=f"approval of '{step}'")

    async def decide(
        self, handle: Handle, step: str, approver: str, verdict: str = "approve"
    ) -> None:
        await self.pending(handle, step)
        decision = Decision(approver=approver, step=step, decision=verdict)
        await self.runs.decide(handle.id, decision)

    async def ends(self, handle: Handle, outcome: Outcome, *, saying: str = "") -> Handle:
        result: RunbookResult = await handle.result()
        if result.outcome != outcome or saying not in result.summary:
            raise WrongBranch(
                f"{handle.id} ended {result.outcome}: {result.summary}; the scenario expects "
                f"{outcome}" + (f" saying '{saying}'" if saying else "")
            )
        return handle

    async def fails(self, handle: Handle, step: str) -> Handle:
        try:
            result = await handle.result()
        except WorkflowFailureError as failure:
            if f"failed at step '{step}'" in str(failure.cause):
                return handle
            raise WrongBranch(f"{handle.id} failed otherwise: {failure.cause}") from failure
        raise WrongBranch(f"{handle.id} ended {result.outcome}; expected to fail at '{step}'")


Play = Callable[[Stage], Awaitable[list[Handle]]]
"""Plays a scenario; the runs whose histories are stored (each under its workflow type)."""
PolicyEdit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Scenario:
    workflow: str
    branch: str
    play: Play
    policy: PolicyEdit | None = None
    """A change to the example access policy this scenario's worker and front end read."""
    also: tuple[str, ...] = ()
    """Other workflows whose runs the scenario stores, after its own, in the order played."""
    replication: Replication | None = None
    """A PostgreSQL primary and replica of its own (for postgres-outage), replicated so."""
    redis: RedisPlane | None = None
    """A Redis primary and replica of its own (for redis-failure), Astra's Redis from the start."""

    @property
    def name(self) -> str:
        return f"{self.workflow}-{self.branch}"

    @property
    def stored(self) -> list[str]:
        """The names of the histories it stores."""
        return [f"{workflow}-{self.branch}" for workflow in (self.workflow, *self.also)]


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    workflow: str,
    branch: str,
    policy: PolicyEdit | None = None,
    also: tuple[str, ...] = (),
    replication: Replication | None = None,
    redis: RedisPlane | None = None,
) -> Callable[[Play], Play]:
    def register(play: Play) -> Play:
        recorded = Scenario(workflow, branch, play, policy, also, replication, redis)
        SCENARIOS[recorded.name] = recorded
        return play

    return register


# -- Shard Scaling: the step runner's and the gate's own branches are recorded here -----------

SCALE = {"shards": 12}  # the sandbox's astra-config has 8
APPROVE_SCALING = "approve scaling"


@scenario("shard-scaling", "approved")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("shard-scaling", SCALE, requester="alice")
    await stage.pending(handle, APPROVE_SCALING)
    await handle.signal("approve", ApprovalSignal(approver="carol"))  # refused: not kernel-sre
    await stage.decide(handle, APPROVE_SCALING, "bob")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("shard-scaling", "rejected")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("shard-scaling", SCALE, requester="alice")
    await stage.pending(handle, APPROVE_SCALING)
    # Through the signal the stock `temporal workflow signal` sends, signed as the CLI prints it.
    no = Decision(approver="bob", step=APPROVE_SCALING, decision="reject")
    said = await stage.runs.signed_signal(handle.id, no)
    await handle.signal("reject", ApprovalSignal.model_validate(said["input"]))
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("shard-scaling", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("shard-scaling", SCALE, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("shard-scaling", "no-change")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("shard-scaling", {"shards": 8}, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("shard-scaling", "rolled-back")
async def _(stage: Stage) -> list[Handle]:
    cluster = stage.kube.cluster
    cluster.patch("deployments", "astra", "astra-worker", {"spec": {"progressDeadlineSeconds": 1}})
    cluster.stall("astra-worker")
    handle = await stage.start("shard-scaling", SCALE, requester="alice")
    await stage.decide(handle, APPROVE_SCALING, "bob")
    await wait_for_step(handle, "wait for astra-worker", StepState.FAILED, within=30)
    cluster.unstall("astra-worker")  # the fault clears; the rollback's restart can finish
    return [await stage.fails(handle, "wait for astra-worker")]


@scenario("shard-scaling", "cancelled")
async def _(stage: Stage) -> list[Handle]:
    stage.kube.cluster.stall("astra-worker")
    handle = await stage.start("shard-scaling", SCALE, requester="alice")
    await stage.decide(handle, APPROVE_SCALING, "bob")
    await wait_for_step(handle, "wait for astra-worker", StepState.RUNNING, within=30)
    await stage.runs.cancel(handle.id, "bob", "recorded")
    await wait_for_step(handle, "roll back: set TASK_SHARD_COUNT", StepState.DONE, within=30)
    stage.kube.cluster.unstall("astra-worker")
    return [await stage.ends(handle, Outcome.CANCELLED, saying="rolled back")]


@scenario("shard-scaling", "timed-out")
async def _(stage: Stage) -> list[Handle]:
    params = {**SCALE, "approval_timeout_seconds": 1}
    handle = await stage.start("shard-scaling", params, requester="alice")
    return [await stage.ends(handle, Outcome.ABORTED, saying="no decision")]


def escalate_scaling(policy: dict[str, Any]) -> None:
    """No example rule escalates; a deployment's policy may, and runs in flight then wait on it."""
    policy["runbooks"]["shard-scaling"]["approvals"][APPROVE_SCALING] = {
        "groups": ["kernel-sre"],
        "on_timeout": "escalate",
        "escalate_to": ["agent-platform"],
    }


@scenario("shard-scaling", "escalated", policy=escalate_scaling)
async def _(stage: Stage) -> list[Handle]:
    params = {**SCALE, "approval_timeout_seconds": 1}
    handle = await stage.start("shard-scaling", params, requester="alice")

    async def escalated() -> bool:
        pending = (await status(handle)).pending_approvals
        return bool(pending) and "carol" in pending[0].members

    await eventually(escalated, timeout=30, interval=0.05, message="escalation")
    await stage.decide(handle, APPROVE_SCALING, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("shard-scaling", "frozen", also=("kill-switch",))
async def _(stage: Stage) -> list[Handle]:
    """A run held by the kill switch before its first change, and the switch: both stored."""
    handle = await stage.start("shard-scaling", SCALE, requester="alice")
    await stage.pending(handle, APPROVE_SCALING)
    await stage.runs.freeze("alice", "recorded")
    switch = stage.client.get_workflow_handle(KILL_SWITCH_ID)

    async def both_rounds_out() -> bool:
        # The freeze's second round goes out before the unfreeze: the switch's usual history.
        history = await switch.fetch_history()
        return (
            sum(e.HasField("activity_task_completed_event_attributes") for e in history.events) >= 3
        )

    await eventually(both_rounds_out, timeout=30, interval=0.1, message="both freeze rounds")
    await stage.decide(handle, APPROVE_SCALING, "bob")
    await wait_for_step(handle, "set TASK_SHARD_COUNT", StepState.FROZEN, within=30)
    await stage.runs.unfreeze("bob", "recorded")
    await switch.result()
    return [await stage.ends(handle, Outcome.DONE), switch]


@scenario("kill-switch", "refused")
async def _(stage: Stage) -> list[Handle]:
    """A freeze straight to Temporal by someone who is not an operator, unsigned."""
    switch = await stage.client.start_workflow(
        KillSwitch.run,
        FreezeNotice(actor="carol", reason="recorded"),
        id=KILL_SWITCH_ID,
        task_queue=stage.settings.task_queue,
    )
    said = await switch.result()
    if not said.startswith("freeze refused"):
        raise WrongBranch(f"the kill switch said: {said}")
    return [switch]


# -- Worker Lost ----------------------------------------------------------------------------

WORKER_LOST = {"verify_timeout_seconds": 20}
STUCK_POOL = "approve replacing workers of a stuck pool"


async def lose_a_worker(stage: Stage, **params: Any) -> dict[str, Any]:
    async with stage.astra.between_ticks():
        fault = await worker_lost(stage.astra.target)
    return {**WORKER_LOST, "worker_id": fault.worker_id, **params}


@scenario("worker-lost", "approved")
async def _(stage: Stage) -> list[Handle]:
    # One of three lost is more than a 20 % share: a stuck pool, so Agent Platform decides.
    params = await lose_a_worker(stage, stuck_pool_share=0.2)
    handle = await stage.start("worker-lost", params, requester="alice")
    await stage.decide(handle, STUCK_POOL, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("worker-lost", "rejected")
async def _(stage: Stage) -> list[Handle]:
    params = await lose_a_worker(stage, stuck_pool_share=0.2)
    handle = await stage.start("worker-lost", params, requester="alice")
    await stage.decide(handle, STUCK_POOL, "carol", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("worker-lost", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    params = await lose_a_worker(stage)
    handle = await stage.start("worker-lost", params, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("worker-lost", "no-change")
async def _(stage: Stage) -> list[Handle]:
    alive = sorted(worker_pods(stage.kube))[0]
    handle = await stage.start(
        "worker-lost", {**WORKER_LOST, "worker_id": alive}, requester="alice"
    )
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("worker-lost", "unattended")
async def _(stage: Stage) -> list[Handle]:
    """One lost worker of a healthy pool: within the budget of deletions without a person."""
    handle = await stage.start("worker-lost", await lose_a_worker(stage), requester="alice")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("worker-lost", "over-budget")
async def _(stage: Stage) -> list[Handle]:
    """Three pods of this pool were deleted without a person within the hour: the fourth asks."""
    params = await lose_a_worker(stage)
    scope = "worker-lost/delete the worker's pod/astra/astra-worker"
    async with await psycopg.AsyncConnection.connect(stage.settings.state_dsn) as conn:
        for _ in range(3):
            await conn.execute(
                "INSERT INTO astra_ops_automatic_actions (token, scope) VALUES (%s, %s)",
                (uuid.uuid4().hex, scope),
            )
        await conn.commit()
    handle = await stage.start("worker-lost", params, requester="alice")
    await stage.decide(handle, "approve deleting more pods than the automatic limit", "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("worker-lost", "pod-gone")
async def _(stage: Stage) -> list[Handle]:
    """The lost worker's pod is already gone: requeue only, nothing to delete or replace."""
    params = await lose_a_worker(stage)
    stage.kube.cluster.delete("pods", "astra", params["worker_id"])
    await eventually(
        lambda: params["worker_id"] not in worker_pods(stage.kube), message="the pod gone"
    )
    handle = await stage.start("worker-lost", params, requester="alice")
    return [await stage.ends(handle, Outcome.DONE, saying="had no pod left")]


# -- High Error Rate -------------------------------------------------------------------------

WINDOW = 3.0
HIGH_ERROR_RATE = {
    "window_seconds": WINDOW,
    "settle_seconds": 1,
    "verify_timeout_seconds": 20,
}
PAUSE = "approve pausing intake"
RESTART = "approve restarting the stuck pool"


async def stick_the_pool(stage: Stage) -> None:
    async with stage.astra.between_ticks():
        await error_spike(
            stage.astra.target, share=0.5, window_seconds=WINDOW, tasks=40, stuck_pool=True
        )


@scenario("high-error-rate", "approved")
async def _(stage: Stage) -> list[Handle]:
    """A stuck pool: intake paused, the pool restarted, the rate recovers."""
    await stick_the_pool(stage)
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin")
    await stage.decide(handle, PAUSE, "alice")
    await stage.decide(handle, RESTART, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("high-error-rate", "rejected")
async def _(stage: Stage) -> list[Handle]:
    await stick_the_pool(stage)
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin")
    await stage.decide(handle, PAUSE, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("high-error-rate", "rolled-back")
async def _(stage: Stage) -> list[Handle]:
    """The remedy is rejected after intake was paused: intake resumes."""
    await stick_the_pool(stage)
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin")
    await stage.decide(handle, PAUSE, "bob")
    await stage.decide(handle, RESTART, "carol", "reject")
    return [await stage.ends(handle, Outcome.ROLLED_BACK)]


@scenario("high-error-rate", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    await stick_the_pool(stage)
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("high-error-rate", "no-change")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("high-error-rate", "bad-rollout")
async def _(stage: Stage) -> list[Handle]:
    """The failures come from a recent rollout's pods: it is rolled back."""
    fault = await bad_rollout(stage.astra.target, stage.kube.api)

    async def failing() -> bool:
        rate = await SqlMetrics(stage.astra.target.dsn).failure_rate(WINDOW)
        pods = stage.kube.cluster.pods("astra", {"app": "astra-worker"})
        return rate.rate > 0.2 and {p["spec"]["containers"][0]["image"] for p in pods} == {
            fault.image
        }

    await eventually(failing, timeout=30, interval=0.1, message="the bad build failing tasks")
    params = {**HIGH_ERROR_RATE, "recent_rollout_seconds": 120}
    handle = await stage.start("high-error-rate", params, requester="erin")
    await stage.decide(handle, PAUSE, "alice")
    await stage.decide(handle, "approve rolling back the last rollout", "carol")
    return [await stage.ends(handle, Outcome.DONE, saying="from revision 2 to 1")]


@scenario("high-error-rate", "cause-unknown")
async def _(stage: Stage) -> list[Handle]:
    """The failures came from a worker no longer in the pool and no rollout explains them:
    intake stays paused for a person."""
    async with stage.astra.between_ticks():
        await error_spike(
            stage.astra.target, window_seconds=WINDOW, tasks=40, worker_id="astra-worker-gone"
        )
        # Then they stop: what triage finds is only the failures of the gone worker.
        target = stage.astra.target
        redis = aioredis.Redis.from_url(target.redis_url)
        try:
            await write_knobs(redis, SandboxKeys(target.key_prefix), Knobs())
        finally:
            await redis.aclose()
    handle = await stage.start("high-error-rate", HIGH_ERROR_RATE, requester="erin")
    await stage.decide(handle, PAUSE, "alice")
    return [await stage.ends(handle, Outcome.DONE, saying="The cause is elsewhere")]


@scenario("high-error-rate", "not-recovered")
async def _(stage: Stage) -> list[Handle]:
    """Every worker keeps failing, new pods too: after the restart the rate does not settle,
    and intake is paused again."""
    async with stage.astra.between_ticks():
        await error_spike(stage.astra.target, share=0.5, window_seconds=WINDOW, tasks=40)
    # A wait is probed 60 times whatever its length: a short one keeps the failed wait's probes few.
    params = {**HIGH_ERROR_RATE, "settle_seconds": 0.1, "verify_timeout_seconds": 0.2}
    handle = await stage.start("high-error-rate", params, requester="erin")
    await stage.decide(handle, PAUSE, "alice")
    await stage.decide(handle, RESTART, "carol")
    return [await stage.fails(handle, "verify the rate stays under the threshold")]


# -- LLM Cost Spike --------------------------------------------------------------------------

BASELINE = 3600.0
LLM_COST_SPIKE = {
    "window_seconds": WINDOW,
    "baseline_seconds": BASELINE,
    "route_to": "gpt-4o-mini",
    "verify_timeout_seconds": 20,
}
GUARD = "approve the budget guard"
LIFT = "approve lifting the budget guard"


async def spike(stage: Stage) -> None:
    """An hour of normal spend at the load generator's tick rate, then coder-1 spends 10x."""
    astra = stage.astra
    async with astra.between_ticks():
        await astra.generator.seed_history(days=BASELINE / 86_400, step_interval=TICK_SECONDS)
        await cost_spike(
            astra.target, multiplier=10, window_seconds=WINDOW, baseline_seconds=BASELINE
        )


@scenario("llm-cost-spike", "approved")
async def _(stage: Stage) -> list[Handle]:
    """The guard is approved, the cost falls, lifting it is approved."""
    await spike(stage)
    handle = await stage.start("llm-cost-spike", LLM_COST_SPIKE, requester="alice")
    await stage.decide(handle, GUARD, "carol")
    await stage.decide(handle, LIFT, "carol")
    return [await stage.ends(handle, Outcome.DONE, saying="guard lifted")]


@scenario("llm-cost-spike", "rejected")
async def _(stage: Stage) -> list[Handle]:
    await spike(stage)
    handle = await stage.start("llm-cost-spike", LLM_COST_SPIKE, requester="alice")
    await stage.decide(handle, GUARD, "carol", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("llm-cost-spike", "guard-kept")
async def _(stage: Stage) -> list[Handle]:
    """Lifting the guard is rejected: the run ends done, the guard stays on."""
    await spike(stage)
    handle = await stage.start("llm-cost-spike", LLM_COST_SPIKE, requester="alice")
    await stage.decide(handle, GUARD, "carol")
    await stage.decide(handle, LIFT, "carol", "reject")
    return [await stage.ends(handle, Outcome.DONE, saying="guard kept")]


@scenario("llm-cost-spike", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    await spike(stage)
    handle = await stage.start("llm-cost-spike", LLM_COST_SPIKE, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("llm-cost-spike", "no-change")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("llm-cost-spike", LLM_COST_SPIKE, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("llm-cost-spike", "still-high")
async def _(stage: Stage) -> list[Handle]:
    """The spike's spend is still in the window when the short wait ends: the run fails with the
    guard on."""
    await spike(stage)
    # A wait is probed 60 times whatever its length: a short one keeps the failed wait's probes few.
    params = {**LLM_COST_SPIKE, "verify_timeout_seconds": 0.1}
    handle = await stage.start("llm-cost-spike", params, requester="alice")
    await stage.decide(handle, GUARD, "carol")
    return [await stage.fails(handle, "verify cost falls under the threshold")]


# -- Dead-letter Repair ----------------------------------------------------------------------

HANDLE = "approve handling the dead letters"


async def publish(stage: Stage, retryable_share: float = 0.5) -> None:
    """Six dead letters; by default three retryable (requeued in batches of two) and three not."""
    async with stage.astra.between_ticks():
        await dead_letters(stage.astra.target, count=6, retryable_share=retryable_share)


def repair(branch: str, **params: Any) -> dict[str, Any]:
    return {"group": f"recorded-{branch}", "batch_size": 2, **params}


@scenario("dead-letter-repair", "approved")
async def _(stage: Stage) -> list[Handle]:
    await publish(stage)
    handle = await stage.start("dead-letter-repair", repair("approved"), requester="alice")
    await stage.decide(handle, HANDLE, "bob")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("dead-letter-repair", "rejected")
async def _(stage: Stage) -> list[Handle]:
    await publish(stage)
    handle = await stage.start("dead-letter-repair", repair("rejected"), requester="alice")
    await stage.decide(handle, HANDLE, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("dead-letter-repair", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    await publish(stage)
    params = repair("dry-run")
    handle = await stage.start("dead-letter-repair", params, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("dead-letter-repair", "no-change")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("dead-letter-repair", repair("no-change"), requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("dead-letter-repair", "nothing-retryable")
async def _(stage: Stage) -> list[Handle]:
    """No entry is of a retryable class: acknowledged and reported, nothing requeued."""
    await publish(stage, retryable_share=0)
    handle = await stage.start("dead-letter-repair", repair("nothing-retryable"), requester="alice")
    await stage.decide(handle, HANDLE, "bob")
    return [await stage.ends(handle, Outcome.DONE, saying="requeued 0 of 0")]


# -- Incident --------------------------------------------------------------------------------

HIGH_ERROR_RATE_GROUP = '{}:{alertname="AstraHighErrorRate"}'


def error_rate_alert(status: str = "firing") -> dict[str, Any]:
    return {
        "fingerprint": "fp-shard-1",
        "status": status,
        "labels": {"alertname": "AstraHighErrorRate", "severity": "SEV2", "shard": "1"},
        "annotations": {"summary": "7% of task outcomes failed on shard 1"},
    }


@scenario("incident", "closed")
async def _(stage: Stage) -> list[Handle]:
    """Opened by Alertmanager, acknowledged, commanded, contained when its alert group resolves,
    remediated, resolved (the postmortem drafted), reviewed with one item done: closed."""
    desk = stage.desk
    desk.policy()
    handle = await desk.open(
        "High error rate",
        Severity.SEV2,
        opened_by="alertmanager",
        notification=notification(HIGH_ERROR_RATE_GROUP, error_rate_alert()),
    )
    await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
    await desk.act(handle, ActionKind.COMMAND, "bob")
    resolved = notification(HIGH_ERROR_RATE_GROUP, error_rate_alert("resolved"), status="resolved")
    await desk.alert(handle, resolved)
    await desk.until(handle, lambda s: s.stage == Phase.CONTAIN, "contained")
    await desk.act(handle, ActionKind.REMEDIATE, "bob", text="bad build rolled back")
    await desk.act(handle, ActionKind.RESOLVE, "bob", text="healthy for 30 min")
    await desk.until(handle, lambda s: s.stage == Phase.REVIEW, "the postmortem drafted")
    due = datetime.now(UTC) + timedelta(days=3)
    await desk.act(
        handle, ActionKind.ADD_ITEM, "bob", text="alert on the build", person="carol", due=due
    )
    await desk.act(handle, ActionKind.COMPLETE_ITEM, "carol", item="item-1")
    closed: IncidentState = await handle.result()
    if closed.stage != Phase.CLOSED or closed.postmortem is None:
        raise WrongBranch(f"{handle.id} ended in stage {closed.stage}")
    return [handle]


@scenario("incident", "escalated")
async def _(stage: Stage) -> list[Handle]:
    """Opened by a person; nobody acknowledges, so the secondary and the manager are paged, and
    the manager acknowledges."""
    desk = stage.desk
    desk.policy(ack_timeout_seconds=1)
    handle = await desk.open("Scheduler lost its leader", components=["scheduler"])
    await desk.until(handle, lambda s: kinds(s).count("page") == 3, "every level paged")
    await desk.act(handle, ActionKind.ACKNOWLEDGE, "frank", text="on it")
    return [await settled(handle)]


@scenario("incident", "alert-runbook", also=("worker-lost",))
async def _(stage: Stage) -> list[Handle]:
    """An alert names worker-lost, which the policy lets an incident start on its own: the run
    is the incident's child, and its outcome comes back to the timeline. Both are stored."""
    stage.desk.policy()
    handle, done, _ = await stage.desk.runbook_from_alert(stage.astra)
    [run] = done.runs
    if run.outcome != Outcome.DONE.value:
        raise WrongBranch(f"{run.run_id} ended {run.outcome}")
    return [await settled(handle), stage.client.get_workflow_handle(run.run_id)]


@scenario("incident", "continued")
async def _(stage: Stage) -> list[Handle]:
    """Notes grow the history past the policy's limit: the run continues as new. The first run,
    ending in the continue-as-new, is stored."""
    desk = stage.desk
    desk.policy(continue_as_new_after_events=50)
    handle = await desk.open("Actors restart in a loop", components=["actors"])
    first = (await handle.describe()).run_id
    await desk.act(handle, ActionKind.ACKNOWLEDGE, "alice")
    await desk.continue_with_notes(handle, "alice", first)
    return [stage.client.get_workflow_handle(handle.id, run_id=first)]


# -- Postgres Outage: on a replicated PostgreSQL of the scenario's own -------------------------

POSTGRES_OUTAGE = {
    "grace_seconds": 1,
    "check_timeout_seconds": 1,
    "rollout_timeout_seconds": 60,
    "reattach_timeout_seconds": 60,
}
FAILOVER = "approve the failover"
LOSS = "approve losing data"


async def primary_killed(stage: Stage) -> None:
    await server_faults.pg_primary_down(stage.servers())


@scenario("postgres-outage", "approved", replication="async")
async def _(stage: Stage) -> list[Handle]:
    """An asynchronous replica that had everything: one approval, no loss."""
    await primary_killed(stage)
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice")
    await stage.decide(handle, FAILOVER, "bob")
    return [await stage.ends(handle, Outcome.DONE, saying="no WAL known lost")]


@scenario("postgres-outage", "unattended", replication="sync")
async def _(stage: Stage) -> list[Handle]:
    """A synchronous standby loses nothing: within the automatic budget, nobody is asked."""
    await primary_killed(stage)
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice")
    return [await stage.ends(handle, Outcome.DONE, saying="no acknowledged commit lost")]


@scenario("postgres-outage", "data-loss", replication="async")
async def _(stage: Stage) -> list[Handle]:
    """The replica stalled while the primary wrote more than the sockets between them hold:
    the loss is counted, and two people approve it."""
    primary, replica = stage.servers().postgres
    replica.freeze()
    try:
        async with await psycopg.AsyncConnection.connect(primary.dsn, autocommit=True) as conn:
            await conn.execute(
                "CREATE TABLE bulk AS SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g"
            )
        await primary_killed(stage)
    finally:
        replica.thaw()
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice")
    await stage.decide(handle, FAILOVER, "bob")
    await stage.decide(handle, LOSS, "bob")
    await stage.decide(handle, LOSS, "frank")
    return [await stage.ends(handle, Outcome.DONE, saying="bytes of WAL lost past")]


@scenario("postgres-outage", "rejected", replication="async")
async def _(stage: Stage) -> list[Handle]:
    await primary_killed(stage)
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice")
    await stage.decide(handle, FAILOVER, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("postgres-outage", "dry-run", replication="sync")
async def _(stage: Stage) -> list[Handle]:
    await primary_killed(stage)
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("postgres-outage", "no-change", replication="sync")
async def _(stage: Stage) -> list[Handle]:
    """The alert fired, but the primary takes writes: nothing to fail over."""
    handle = await stage.start("postgres-outage", POSTGRES_OUTAGE, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE, saying="a blip")]


# -- Redis Failure: on a Redis primary and replica of the scenario's own ----------------------

REDIS_FAILURE = {"rollout_timeout_seconds": 60, "verify_timeout_seconds": 20}
REDIS_FAILOVER = "approve the Redis failover"
REBUILD = "approve the rebuild"
FAIL_OVER = "fail over to the replica"


async def redis_primary_killed(stage: Stage) -> None:
    """Astra's Redis primary killed between ticks; the ticks after it commit tasks in
    PostgreSQL that never reach a stream, for the rebuild to put back."""
    async with stage.astra.between_ticks():
        await server_faults.redis_primary_down(stage.servers())
    await stage.astra.advance(5)


def unattended_redis_failover(policy: dict[str, Any]) -> None:
    """The example allows no Redis failover without a person; a deployment's policy may."""
    policy["runbooks"]["redis-failure"]["automatic"] = {FAIL_OVER: {"max": 1, "per_seconds": 3600}}


@scenario("redis-failure", "approved", redis="replica")
async def _(stage: Stage) -> list[Handle]:
    """The primary is killed: the replica is promoted with Kernel SRE's approval, and what it
    never received is rebuilt from PostgreSQL."""
    await redis_primary_killed(stage)
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice")
    await stage.decide(handle, REDIS_FAILOVER, "bob")
    return [await stage.ends(handle, Outcome.DONE, saying="workers heartbeat")]


@scenario("redis-failure", "rejected", redis="replica")
async def _(stage: Stage) -> list[Handle]:
    await redis_primary_killed(stage)
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice")
    await stage.decide(handle, REDIS_FAILOVER, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("redis-failure", "dry-run", redis="replica")
async def _(stage: Stage) -> list[Handle]:
    await redis_primary_killed(stage)
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("redis-failure", "no-change", redis="replica")
async def _(stage: Stage) -> list[Handle]:
    """The alert fired, but the primary answers and holds everything PostgreSQL says it must."""
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE, saying="nothing to do")]


@scenario("redis-failure", "data-loss", redis="replica")
async def _(stage: Stage) -> list[Handle]:
    """The primary is flushed and keeps answering: no failover, a rebuild Kernel SRE approves."""
    async with stage.astra.between_ticks():
        await server_faults.redis_data_loss(stage.servers())
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice")
    await stage.decide(handle, REBUILD, "bob")
    return [await stage.ends(handle, Outcome.DONE, saying="workers heartbeat")]


@scenario("redis-failure", "unattended", policy=unattended_redis_failover, redis="replica")
async def _(stage: Stage) -> list[Handle]:
    """Within the policy's budget of unattended failovers, nobody is asked."""
    await redis_primary_killed(stage)
    handle = await stage.start("redis-failure", REDIS_FAILURE, requester="alice")
    return [await stage.ends(handle, Outcome.DONE, saying="workers heartbeat")]


@scenario("redis-failure", "sentinel", redis="sentinel")
async def _(stage: Stage) -> list[Handle]:
    """Sentinel watches the servers: the runbook asks it to fail over instead of promoting."""
    await redis_primary_killed(stage)
    params = {**REDIS_FAILURE, "failover_timeout_seconds": 30}
    handle = await stage.start("redis-failure", params, requester="alice")
    await stage.decide(handle, REDIS_FAILOVER, "bob")
    await stage.ends(handle, Outcome.DONE, saying="workers heartbeat")
    result: RunbookResult = await handle.result()
    failover = {step.name: step.detail for step in result.steps}[FAIL_OVER]
    if "asked Sentinel" not in failover:
        raise WrongBranch(f"{handle.id} failed over otherwise: {failover}")
    return [handle]


# -- Vault Setup ------------------------------------------------------------------------------

VAULT = {"source": "directory:astra"}
APPROVE_VAULT = "approve the Vault setup"


@scenario("vault-setup", "approved")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("vault-setup", VAULT, requester="alice")
    await stage.decide(handle, APPROVE_VAULT, "bob")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("vault-setup", "rejected")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("vault-setup", VAULT, requester="alice")
    await stage.decide(handle, APPROVE_VAULT, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("vault-setup", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("vault-setup", VAULT, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run:")]


@scenario("vault-setup", "no-change")
async def _(stage: Stage) -> list[Handle]:
    first = await stage.start("vault-setup", VAULT, requester="alice")
    await stage.decide(first, APPROVE_VAULT, "bob")
    await stage.ends(first, Outcome.DONE)
    handle = await stage.start("vault-setup", VAULT, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("vault-setup", "new-vault")
async def _(stage: Stage) -> list[Handle]:
    """A Vault as a new one is after a restart: sealed, and with no KV mount."""
    vault = hvac.Client(url=stage.openbao.address, token=stage.openbao.root_token())
    vault.sys.disable_secrets_engine("secret")
    vault.sys.seal()
    handle = await stage.start("vault-setup", VAULT, requester="alice")
    await stage.decide(handle, "approve unsealing Vault", "bob")
    await stage.decide(handle, APPROVE_VAULT, "bob")
    return [await stage.ends(handle, Outcome.DONE)]


# -- TLS Rotation: the sandbox's services serve TLS; the faults make their certificates due ----

RENEW_CERTS = "approve renewing certificates"


async def certificates_expiring(stage: Stage) -> None:
    """Every TLS service's certificate five days from expiry, and served (its pods restarted)."""
    fault = await cert_expiring(stage.kube.api, sandbox_ca(), days_left=5)
    for service, fingerprint in fault.fingerprints.items():

        def serving(service: str = service, fingerprint: str = fingerprint) -> bool:
            pair = stage.kube.tls.served(service)
            return pair is not None and describe(read_pem(pair.cert_pem)).fingerprint == fingerprint

        await eventually(serving, timeout=30, message=f"{service} serving the expiring one")


async def renewed(stage: Stage) -> Handle:
    handle = await stage.start("tls-rotation", {}, requester="alice")
    await stage.decide(handle, RENEW_CERTS, "bob")
    return await stage.ends(handle, Outcome.DONE)


@scenario("tls-rotation", "approved")
async def _(stage: Stage) -> list[Handle]:
    await certificates_expiring(stage)
    return [await renewed(stage)]


@scenario("tls-rotation", "rejected")
async def _(stage: Stage) -> list[Handle]:
    await certificates_expiring(stage)
    handle = await stage.start("tls-rotation", {}, requester="alice")
    await stage.decide(handle, RENEW_CERTS, "bob", "reject")
    return [await stage.ends(handle, Outcome.REJECTED)]


@scenario("tls-rotation", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    await certificates_expiring(stage)
    handle = await stage.start("tls-rotation", {}, requester="alice", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("tls-rotation", "no-change")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("tls-rotation", {}, requester="alice")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("tls-rotation", "rolled-back")
async def _(stage: Stage) -> list[Handle]:
    """A renewal, then the run that puts every previous certificate back: the one stored."""
    await certificates_expiring(stage)
    await renewed(stage)
    handle = await stage.start("tls-rotation", {"rollback": True}, requester="alice")
    await stage.decide(handle, "approve rolling back certificates", "bob")
    return [await stage.ends(handle, Outcome.DONE, saying="rolled back")]


@scenario("tls-rotation", "not-served")
async def _(stage: Stage) -> list[Handle]:
    """The gateway never reloads its certificate: the run fails at its verify step."""
    await certificates_expiring(stage)
    stage.kube.tls.pin("gateway")
    handle = await stage.start("tls-rotation", {"verify_timeout_seconds": 1}, requester="alice")
    await stage.decide(handle, RENEW_CERTS, "bob")
    return [await stage.fails(handle, "verify gateway serves the certificate in its Secret")]


# -- the daily certificate scan: what it finds decides whether it starts TLS Rotation ----------


async def scanned(stage: Stage) -> tuple[Handle, TlsScanResult]:
    """One scan, as the schedule starts it (``tls-scan/<namespace>`` and a time)."""
    handle = await stage.client.start_workflow(
        TLS_SCAN_WORKFLOW,
        TlsScanRequest(),
        id="tls-scan/astra-2026-11-28T06:00:00Z",
        task_queue=stage.settings.task_queue,
        result_type=TlsScanResult,
    )
    return handle, await handle.result()


@scenario("tls-scan", "renewal-due", also=("tls-rotation",))
async def _(stage: Stage) -> list[Handle]:
    """Certificates inside their window: the scan starts the rotation as its child, which a
    person approves. Both are stored: the rotation's admission of its scan parent replays too."""
    await certificates_expiring(stage)
    handle, result = await scanned(stage)
    if result.started is None:
        raise WrongBranch(f"the scan started no rotation: {result.summary}")
    rotation = handle_of(stage.client, result.started)
    await stage.decide(rotation, RENEW_CERTS, "bob")
    return [handle, await stage.ends(rotation, Outcome.DONE)]


@scenario("tls-scan", "nothing-due")
async def _(stage: Stage) -> list[Handle]:
    handle, result = await scanned(stage)
    if result.due:
        raise WrongBranch(f"the scan found {result.due} due: {result.summary}")
    return [handle]


@scenario("tls-scan", "already-open")
async def _(stage: Stage) -> list[Handle]:
    """A person's rotation still waits for approval: the scan leaves it to finish."""
    await certificates_expiring(stage)
    rotation = await stage.start("tls-rotation", {}, requester="alice")
    await stage.pending(rotation, RENEW_CERTS)
    handle, result = await scanned(stage)
    if "already open" not in result.summary:
        raise WrongBranch(f"the scan did not find the open rotation: {result.summary}")
    await rotation.terminate("recorded")
    return [handle]


# -- Releases: a canary, and blue/green ---------------------------------------------------------

NEW_IMAGE = "registry.sandbox.local/astra/astra-worker:1.1.0"
RUNNING_IMAGE = "registry.sandbox.local/astra/astra-worker:1.0.0"
JUDGED = {"analysis_interval_seconds": 1, "min_samples": 3}


def canary_plan(pause: float) -> dict[str, Any]:
    """The seed's plan (5%: one pod of the three), with a window of ``pause`` seconds."""
    return {
        "image": NEW_IMAGE,
        "steps": [
            {"weight": 5, "pause_seconds": pause, "analysis": True},
            {"approval": True},
            {"weight": 100},
        ],
        **JUDGED,
    }


CANARY = canary_plan(2)
LONG_CANARY = canary_plan(600)
"""A window nobody waits out: the analysis, or a person, ends it."""
PROMOTE_CANARY = "approve promoting the canary"
SWITCH_TO_GREEN = "approve switching the traffic to green"


async def open_sev1_on_workers(stage: Stage, runbook: str) -> None:
    """A SEV1 open on Agent Platform (the rotation that owns astra-worker), as visibility sees
    it, and the policy asking (not blocking) ``runbook`` during one."""
    stage.desk.policy(runbooks={runbook: {"open_incidents": "ask"}})
    handle = await stage.desk.open(
        "Workers failing", Severity.SEV1, opened_by="carol", components=["workers"]
    )
    query = f"WorkflowId = '{handle.id}' AND {sa.SEVERITY.name} = 'SEV1'"

    async def listed() -> bool:
        return [e async for e in stage.client.list_workflows(query)] != []

    await eventually(listed, timeout=30, interval=0.1, message="the incident in visibility")


@scenario("canary-upgrade", "approved")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("canary-upgrade", CANARY, requester="erin")
    await stage.decide(handle, PROMOTE_CANARY, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("canary-upgrade", "rejected")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("canary-upgrade", CANARY, requester="erin")
    await stage.decide(handle, PROMOTE_CANARY, "carol", "reject")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="rejected")]


@scenario("canary-upgrade", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("canary-upgrade", CANARY, requester="erin", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("canary-upgrade", "no-change")
async def _(stage: Stage) -> list[Handle]:
    params = {**CANARY, "image": RUNNING_IMAGE}
    handle = await stage.start("canary-upgrade", params, requester="erin")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("canary-upgrade", "analysis-failed")
async def _(stage: Stage) -> list[Handle]:
    await bad_canary(stage.astra.target, NEW_IMAGE, share=1.0)
    handle = await stage.start("canary-upgrade", LONG_CANARY, requester="erin")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="analysis")]


@scenario("canary-upgrade", "inconclusive")
async def _(stage: Stage) -> list[Handle]:
    """Too few canary tasks in any interval: a person decides, then the promotion."""
    params = {**CANARY, "min_samples": 1_000_000}
    handle = await stage.start("canary-upgrade", params, requester="erin")
    await stage.decide(handle, "approve going on after an inconclusive analysis", "carol")
    await stage.decide(handle, PROMOTE_CANARY, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("canary-upgrade", "steered")
async def _(stage: Stage) -> list[Handle]:
    """Paused, resumed and promoted early by people, through the signed update."""
    handle = await stage.start("canary-upgrade", LONG_CANARY, requester="erin")
    await wait_for_step(handle, "hold the canary at 5%", StepState.RUNNING, within=30)
    await stage.runs.steer(handle.id, "erin", SteerAction.PAUSE, "recorded")
    await stage.runs.steer(handle.id, "erin", SteerAction.RESUME, "recorded")
    await stage.runs.steer(handle.id, "carol", SteerAction.PROMOTE, "recorded")
    await stage.decide(handle, PROMOTE_CANARY, "alice")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("canary-upgrade", "aborted")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("canary-upgrade", LONG_CANARY, requester="erin")
    await wait_for_step(handle, "hold the canary at 5%", StepState.RUNNING, within=30)
    await stage.runs.steer(handle.id, "erin", SteerAction.ABORT, "recorded")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="aborted by erin")]


@scenario("canary-upgrade", "rollout-failed")
async def _(stage: Stage) -> list[Handle]:
    """The full rollout's new pods never start: the stable Deployment goes back to its image."""
    cluster = stage.kube.cluster
    cluster.patch("deployments", "astra", "astra-worker", {"spec": {"progressDeadlineSeconds": 1}})
    cluster.stall("astra-worker")
    handle = await stage.start("canary-upgrade", CANARY, requester="erin")
    await stage.decide(handle, PROMOTE_CANARY, "carol")
    await wait_for_step(handle, "wait for astra-worker", StepState.FAILED, within=30)
    cluster.unstall("astra-worker")
    return [await stage.fails(handle, "wait for astra-worker")]


@scenario("canary-upgrade", "during-incident")
async def _(stage: Stage) -> list[Handle]:
    await open_sev1_on_workers(stage, "canary-upgrade")
    handle = await stage.start("canary-upgrade", CANARY, requester="erin")
    await stage.decide(handle, "approve upgrading during an open incident", "frank")
    await stage.decide(handle, PROMOTE_CANARY, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


BLUE_GREEN = {"image": NEW_IMAGE, "keep_blue_seconds": 2, **JUDGED}


@scenario("blue-green-upgrade", "approved")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("blue-green-upgrade", BLUE_GREEN, requester="erin")
    await stage.decide(handle, SWITCH_TO_GREEN, "carol")
    return [await stage.ends(handle, Outcome.DONE)]


@scenario("blue-green-upgrade", "rejected")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("blue-green-upgrade", BLUE_GREEN, requester="erin")
    await stage.decide(handle, SWITCH_TO_GREEN, "carol", "reject")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="rejected")]


@scenario("blue-green-upgrade", "dry-run")
async def _(stage: Stage) -> list[Handle]:
    handle = await stage.start("blue-green-upgrade", BLUE_GREEN, requester="erin", dry_run=True)
    return [await stage.ends(handle, Outcome.DONE, saying="dry-run")]


@scenario("blue-green-upgrade", "no-change")
async def _(stage: Stage) -> list[Handle]:
    params = {**BLUE_GREEN, "image": RUNNING_IMAGE}
    handle = await stage.start("blue-green-upgrade", params, requester="erin")
    return [await stage.ends(handle, Outcome.NO_CHANGE)]


@scenario("blue-green-upgrade", "switched-back")
async def _(stage: Stage) -> list[Handle]:
    params = {**BLUE_GREEN, "keep_blue_seconds": 600}
    handle = await stage.start("blue-green-upgrade", params, requester="erin")
    await stage.decide(handle, SWITCH_TO_GREEN, "carol")
    await wait_for_step(handle, "keep blue for a switch back", StepState.RUNNING, within=30)
    await stage.runs.steer(handle.id, "erin", SteerAction.SWITCH_BACK, "recorded")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="switched back by erin")]


@scenario("blue-green-upgrade", "analysis-failed")
async def _(stage: Stage) -> list[Handle]:
    await bad_canary(stage.astra.target, NEW_IMAGE, share=1.0)
    params = {**BLUE_GREEN, "keep_blue_seconds": 600}
    handle = await stage.start("blue-green-upgrade", params, requester="erin")
    await stage.decide(handle, SWITCH_TO_GREEN, "carol")
    return [await stage.ends(handle, Outcome.ROLLED_BACK, saying="analysis")]


@scenario("blue-green-upgrade", "during-incident")
async def _(stage: Stage) -> list[Handle]:
    await open_sev1_on_workers(stage, "blue-green-upgrade")
    handle = await stage.start("blue-green-upgrade", BLUE_GREEN, requester="erin")
    await stage.decide(handle, "approve upgrading during an open incident", "frank")
    await stage.decide(handle, SWITCH_TO_GREEN, "carol")
    return [await stage.ends(handle, Outcome.DONE)]
