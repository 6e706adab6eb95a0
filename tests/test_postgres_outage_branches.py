"""Postgres Outage's branches, with its PostgreSQL, endpoint and Kubernetes activities stubbed."""

from __future__ import annotations

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.access import AccessActivities, AutomaticClaim
from activities.endpoints import PLATFORM_CLIENTS, Endpoint, EndpointActivities
from activities.kube_models import RolloutStatus
from activities.kubernetes import KubernetesActivities as K8s
from activities.mutation import MutationResult
from activities.postgres_nodes import (
    NodesReport,
    NodeState,
    PlatformWriteResult,
    PostgresNodeActivities,
    Reattached,
    WritableServers,
)
from tests.conftest_kube import eventually
from tests.helpers import awaiting_approval, decide, start, status
from tests.stubs import Stubs, name_of, stubbed_worker
from workflows.models import Outcome, StepState
from workflows.postgres_outage import (
    APPROVE,
    APPROVE_LOSS,
    PostgresOutage,
    PostgresOutageRequest,
)

NODES, WRITABLE, ENDPOINT, CLAIM = (
    name_of(PostgresNodeActivities.postgres_nodes),
    name_of(PostgresNodeActivities.writable_postgres),
    name_of(EndpointActivities.platform_endpoint),
    name_of(AccessActivities.claim_automatic_action),
)
FENCE, PROMOTE, REPOINT, REATTACH, VERIFY = (
    name_of(PostgresNodeActivities.fence_postgres),
    name_of(PostgresNodeActivities.promote_postgres),
    name_of(EndpointActivities.repoint_platform),
    name_of(PostgresNodeActivities.reattach_postgres),
    name_of(PostgresNodeActivities.verify_platform_write),
)
ROLL = [name_of(K8s.rollout_restart), name_of(K8s.wait_rollout)] * len(PLATFORM_CLIENTS)
ACTS = [FENCE, WRITABLE, PROMOTE, WRITABLE, REPOINT, *ROLL, REATTACH, ENDPOINT, VERIFY]


def report(*, synchronous: bool, received: int = 1000, primary_at: int = 1000) -> NodesReport:
    """The primary down; the replica in recovery, having received ``received`` of the
    ``primary_at`` bytes of WAL the primary last said it had."""
    return NodesReport(
        nodes=[
            NodeState(name="primary", reachable=False, error="connection refused"),
            NodeState(
                name="replica",
                reachable=True,
                in_recovery=True,
                received=received,
                replayed=received,
                primary_position=primary_at,
                synchronous=synchronous,
            ),
        ]
    )


def primary_down(stubs: Stubs, *, synchronous: bool = True, received: int = 1000) -> None:
    """The platform's primary down for good; the replica promotable; every action works."""
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="postgres", node="primary"))
    stubs.answer(
        PostgresNodeActivities.postgres_nodes, report(synchronous=synchronous, received=received)
    )
    stubs.answer(
        AccessActivities.claim_automatic_action,
        AutomaticClaim(allowed=True, used=1, detail="1 of 1 per 3600s for astra/primary"),
    )
    stubs.answer(
        PostgresNodeActivities.writable_postgres,
        WritableServers(names=[]),
        WritableServers(names=["replica"]),
    )
    stubs.answer(
        PostgresNodeActivities.fence_postgres,
        MutationResult(changed=False, detail="primary is stopped already"),
    )
    stubs.answer(
        PostgresNodeActivities.promote_postgres,
        MutationResult(changed=True, detail="promoted replica"),
    )
    stubs.answer(
        EndpointActivities.repoint_platform,
        MutationResult(changed=True, detail="pointed DATABASE_URL at PostgreSQL replica"),
    )
    stubs.answer(K8s.rollout_restart, MutationResult(changed=True, detail="restarted"))
    stubs.answer(
        K8s.wait_rollout,
        RolloutStatus(
            name="x", generation=2, observed_generation=2, replicas=1, updated=1, ready=1,
            available=1, complete=True,
        ),
    )  # fmt: skip
    stubs.answer(
        PostgresNodeActivities.reattach_postgres,
        Reattached(changed=True, detail="rewound primary from replica; it streams from it"),
    )
    stubs.answer(
        PostgresNodeActivities.verify_platform_write,
        PlatformWriteResult(node="replica", position=2000),
    )


def after_endpoint(stubs: Stubs) -> None:
    """Once repointed, the platform's endpoint names the replica."""
    stubs.answer(
        EndpointActivities.platform_endpoint,
        Endpoint(store="postgres", node="primary"),
        Endpoint(store="postgres", node="replica"),
    )


def request(**params: object) -> PostgresOutageRequest:
    return PostgresOutageRequest.model_validate(
        {"requester": "alice", "grace_seconds": 1, **params}
    )


def past_grace(called: list[str]) -> list[str]:
    """The calls after the checks and the grace window's probes."""
    last_probe = max(i for i, name in enumerate(called) if name == NODES)
    return called[last_probe + 1 :]


async def test_a_zero_loss_failover_runs_unattended_within_the_automatic_budget(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    after_endpoint(stubs)
    result = await (await start(client, PostgresOutage, request(), task_queue)).result()

    assert result.outcome == Outcome.DONE, result.summary
    assert result.summary.startswith(
        "failed over from primary to replica (no acknowledged commit lost: replica is a "
        "synchronous standby)"
    )
    called = stubs.called()
    assert called[:2] == [ENDPOINT, NODES]
    assert past_grace(called) == [CLAIM, *ACTS]
    (claim,) = stubs.args(AccessActivities.claim_automatic_action)
    assert (claim.step, claim.scope) == ("promote the replica", "astra/primary")
    assert [r.name for r in stubs.args(K8s.rollout_restart)] == list(PLATFORM_CLIENTS)
    assert stubs.args(PostgresNodeActivities.verify_platform_write)[0].at_least == 1000
    steps = {s.name: s for s in result.steps}
    assert steps[APPROVE].state == StepState.SKIPPED
    assert "unattended 1 of 1 per 3600s" in steps[APPROVE].detail


async def test_a_primary_that_takes_a_write_within_the_grace_window_is_a_blip(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    back = report(synchronous=True)
    back.nodes[0] = NodeState(name="primary", reachable=True, in_recovery=False, writable=True)
    stubs.answer(PostgresNodeActivities.postgres_nodes, report(synchronous=True), back)
    result = await (
        await start(client, PostgresOutage, request(grace_seconds=5), task_queue)
    ).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert "a blip, no failover" in result.summary
    assert stubs.called() == [ENDPOINT, NODES, NODES]


async def test_patroni_managing_the_servers_stops_the_run_before_any_change(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    managed = report(synchronous=True)
    managed.patroni = "HTTP 200 from http://127.0.0.1:8008/"
    stubs.answer(PostgresNodeActivities.postgres_nodes, managed)
    result = await (await start(client, PostgresOutage, request(), task_queue)).result()

    assert result.outcome == Outcome.ABORTED
    assert "Patroni manages these servers" in result.summary
    assert stubs.called() == [ENDPOINT, NODES]


async def test_a_failover_that_loses_data_needs_two_distinct_approvers(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs, synchronous=False, received=900)
    after_endpoint(stubs)
    handle = await start(client, PostgresOutage, request(), task_queue)
    await decide(handle, APPROVE, "bob")
    await decide(handle, APPROVE_LOSS, "bob")
    pending = (await status(handle)).pending_approvals
    assert [(p.step, p.approvers, p.required) for p in pending] == [(APPROVE_LOSS, ["bob"], 2)]
    assert "at least 100 bytes of WAL lost" in pending[0].reason
    assert FENCE not in stubs.called()  # nothing changes on one approval
    await decide(handle, APPROVE_LOSS, "frank")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert (
        "at least 100 bytes of WAL lost past 0/384 (replica is an asynchronous replica)"
        in result.summary
    )
    assert CLAIM not in stubs.called()  # a lossy failover is never unattended
    steps = {s.name: s for s in result.steps}
    assert steps[APPROVE_LOSS].detail == "approved by bob, frank"


async def test_a_rejected_failover_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs, synchronous=False, received=1000)  # caught up, but asynchronous
    handle = await start(client, PostgresOutage, request(), task_queue)
    await decide(handle, APPROVE, "bob", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert not {FENCE, PROMOTE, REPOINT} & set(stubs.called())


async def test_a_worker_lost_between_promote_and_repoint_resumes_to_a_correct_end(
    client: Client, task_queue: str
) -> None:
    """Worker A promotes, its repoint fails retryably, and A stops; worker B, with nothing of
    A's cache, picks the run up from its history: it repoints and finishes, and never promotes
    again."""
    first, second = Stubs(), Stubs()
    primary_down(first)
    first.answer(
        EndpointActivities.repoint_platform,
        ApplicationError("the API server closed the connection", type="ApiError"),
    )
    primary_down(second)
    # B asks where the platform points only once, after its repoint.
    second.answer(EndpointActivities.platform_endpoint, Endpoint(store="postgres", node="replica"))
    async with stubbed_worker(client, task_queue, first):
        handle = await start(client, PostgresOutage, request(), task_queue)
        await eventually(
            lambda: REPOINT in first.called(), timeout=20, interval=0.05, message="a repoint"
        )
    async with stubbed_worker(client, task_queue, second):
        result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert PROMOTE in first.called() and set(first.called()[first.called().index(REPOINT) :]) <= {
        REPOINT
    }  # A stopped at the repoint, retried it at most
    assert PROMOTE not in second.called() and NODES not in second.called()
    assert second.called()[:1] == [REPOINT]  # B went on from where A stopped
    assert second.called()[-3:] == [REATTACH, ENDPOINT, VERIFY]


async def test_dry_run_reports_every_action_and_verifies_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    result = await (await start(client, PostgresOutage, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary.startswith(
        "dry-run: promote replica (received WAL up to 0/3E8) in place of primary"
    )
    acts = {FENCE, PROMOTE, REPOINT, REATTACH, *ROLL[::2]}
    assert all(call.arg.dry_run for call in stubs.calls if call.activity in acts)
    assert past_grace(stubs.called()) == [FENCE, WRITABLE, PROMOTE, REPOINT, *ROLL[::2], REATTACH]


@pytest.mark.parametrize("writable", [["primary", "replica"], []])
async def test_anything_but_one_primary_after_the_promotion_stops_before_the_repoint(
    client: Client, task_queue: str, stubs: Stubs, writable: list[str]
) -> None:
    primary_down(stubs)
    stubs.answer(
        PostgresNodeActivities.writable_postgres,
        WritableServers(names=[]),
        WritableServers(names=writable),
    )
    handle = await start(client, PostgresOutage, request(), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert "failed at step 'verify one primary takes writes'" in str(failed.value.cause)
    assert REPOINT not in stubs.called()


async def test_past_the_automatic_budget_a_zero_loss_failover_asks_kernel_sre(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    after_endpoint(stubs)
    spent = "'promote the replica' already ran 1 times without a person (limit 1 per 3600s)"
    stubs.answer(
        AccessActivities.claim_automatic_action, AutomaticClaim(allowed=False, used=1, detail=spent)
    )
    handle = await start(client, PostgresOutage, request(), task_queue)
    await awaiting_approval(handle, APPROVE)
    (pending,) = (await status(handle)).pending_approvals
    assert spent in pending.reason
    await decide(handle, APPROVE, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    (approval,) = [d for d in (await status(handle)).decisions if d.accepted]
    assert (approval.step, approval.approver) == (APPROVE, "bob")
    assert past_grace(stubs.called()) == [CLAIM, *ACTS]


async def test_a_budget_that_cannot_be_counted_asks_kernel_sre_instead_of_failing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    after_endpoint(stubs)
    stubs.answer(
        AccessActivities.claim_automatic_action,
        ApplicationError("state database refused the connection", non_retryable=True),
    )
    handle = await start(client, PostgresOutage, request(), task_queue)
    await awaiting_approval(handle, APPROVE)
    (pending,) = (await status(handle)).pending_approvals
    assert "the automatic budget could not be counted: state database refused" in pending.reason
    await decide(handle, APPROVE, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert past_grace(stubs.called()) == [CLAIM, *ACTS]
