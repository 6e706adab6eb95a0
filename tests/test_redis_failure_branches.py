"""Redis Failure's branches, with its Redis, endpoint and Kubernetes activities stubbed.

The servers are ``primary`` (the one the platform's endpoint names) and ``replica``; a third,
``spare``, stands for a server someone else already made the primary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.access import AccessActivities, AutomaticClaim
from activities.endpoints import PLATFORM_CLIENTS, Endpoint, EndpointActivities
from activities.kube_models import RolloutStatus
from activities.kubernetes import KubernetesActivities as K8s
from activities.mutation import MutationResult
from activities.redis_nodes import (
    NodeState,
    Promotion,
    Rebuild,
    RedisNodeActivities,
    RedisSurvey,
    SentinelView,
    ShardStream,
    StreamReport,
)
from tests.conftest_kube import eventually
from tests.helpers import awaiting_approval, decide, start, status
from tests.stubs import POLICY, Stubs, name_of, stubbed_worker
from workflows.models import Outcome, StepState
from workflows.redis_failure import (
    APPROVE_FAILOVER,
    APPROVE_REBUILD,
    FAIL_OVER,
    VERIFY_PRIMARY,
    VERIFY_STREAMS,
    RedisFailure,
    RedisFailureRequest,
)

SURVEY, ENDPOINT, COMPARE, CLAIM = (
    name_of(RedisNodeActivities.survey),
    name_of(EndpointActivities.platform_endpoint),
    name_of(RedisNodeActivities.compare_streams),
    name_of(AccessActivities.claim_automatic_action),
)
PROMOTE, SENTINEL, REPOINT = (
    name_of(RedisNodeActivities.promote),
    name_of(RedisNodeActivities.sentinel_failover),
    name_of(EndpointActivities.repoint_platform),
)
REBUILT, MARKER, HEARTBEATS = (
    name_of(RedisNodeActivities.rebuild_streams),
    name_of(RedisNodeActivities.restore_marker),
    name_of(RedisNodeActivities.heartbeating_workers),
)
RESTART, WAIT = name_of(K8s.rollout_restart), name_of(K8s.wait_rollout)
SCHEDULER, *CONSUMERS = PLATFORM_CLIENTS
CHECKS = [SURVEY, ENDPOINT, COMPARE]
REPAIR = [RESTART, WAIT, REBUILT, MARKER, *[RESTART, WAIT] * len(CONSUMERS)]
VERIFY = [SURVEY, COMPARE, HEARTBEATS]
FAILOVER = [PROMOTE, REPOINT, *REPAIR, *VERIFY]


def up(name: str, role: str = "replica", offset: int = 1000) -> NodeState:
    return NodeState.model_validate(
        {
            "name": name,
            "reachable": True,
            "role": role,
            "follows": "primary" if role == "replica" else None,
            "link_up": role == "replica",
            "offset": offset,
            "persistence": "AOF on (last write ok)",
            "persistence_ok": True,
            "marker": True,
        }
    )


def down(name: str) -> NodeState:
    return NodeState(name=name, reachable=False, error="Connection refused")


def survey(*nodes: NodeState, sentinel: str | None = None) -> RedisSurvey:
    """The servers as a check finds them; with ``sentinel``, the server a Sentinel names."""
    named = SentinelView(asked=1, answered=1, primary=sentinel) if sentinel else None
    return RedisSurvey(nodes=list(nodes), sentinel=named)


HEALTHY = survey(up("primary", "primary"), up("replica"))
PRIMARY_DOWN = survey(down("primary"), up("replica"))
REPLICA_PRIMARY = survey(down("primary"), up("replica", "primary"))


def streams(node: str, *, missing: int = 0, marker: bool = True) -> StreamReport:
    """Ten pending tasks on one shard, ``missing`` of them not on its stream."""
    shard = ShardStream(
        shard=0, pending=10, entries=10 - missing, missing=missing, duplicated=0, stale=0
    )
    return StreamReport(
        node=node,
        shards=[shard],
        dead_letter_rows=2,
        dead_letters_missing=0,
        marker=marker,
        missing_sample=[f"task-{i}" for i in range(missing)],
    )


def works(stubs: Stubs, node: str) -> None:
    """Every repair on ``node`` succeeds, and a worker heartbeats into it."""
    stubs.answer(
        EndpointActivities.repoint_platform,
        MutationResult(changed=True, detail=f"pointed REDIS_URL at Redis {node}"),
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
        RedisNodeActivities.rebuild_streams,
        Rebuild(
            changed=True, detail="put back 4 pending tasks", requeued=4, stale=0, dead_letters=0,
            batches=1,
        ),
    )  # fmt: skip
    stubs.answer(
        RedisNodeActivities.restore_marker, MutationResult(changed=True, detail="marker written")
    )
    stubs.answer(RedisNodeActivities.heartbeating_workers, ["astra-worker-a"])


def primary_down(stubs: Stubs, before: RedisSurvey = PRIMARY_DOWN, target: str = "replica") -> None:
    """The platform's primary down; ``target`` lacks four tasks, is promoted, and afterwards is
    the one primary holding every task."""
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="redis", node="primary"))
    after = survey(
        *(up(target, "primary") if n.name == target else n for n in before.nodes),
        sentinel=target if before.sentinel else None,
    )
    stubs.answer(RedisNodeActivities.survey, before, after)
    stubs.answer(RedisNodeActivities.compare_streams, streams(target, missing=4), streams(target))
    stubs.answer(
        RedisNodeActivities.promote,
        Promotion(changed=True, detail=f"promoted {target} to primary", node=target),
    )
    works(stubs, target)


GRACE = 0.1
BUDGET = {FAIL_OVER: {"max": 1, "per_seconds": 3600}}
"""One Redis failover an hour without a person."""


def policy(tmp_path: Path, automatic: dict[str, dict[str, int]] | None = None) -> Path:
    """The example policy, letting a run wait a shorter publish grace (the stubs publish
    nothing, so waiting the example's two seconds would only slow the tests down), and with
    ``automatic`` budgets for the runbook's steps."""
    edited = yaml.safe_load(POLICY.read_text())
    runbook = edited["runbooks"]["redis-failure"]
    runbook["limits"]["publish_grace_seconds"] = {"default": GRACE, "max": 600}
    if automatic is not None:
        runbook["automatic"] = automatic
    path = tmp_path / "access-policy.yaml"
    path.write_text(yaml.safe_dump(edited))
    return path


@pytest.fixture
async def stubs(client: Client, task_queue: str, tmp_path: Path) -> AsyncIterator[Stubs]:
    """This test's stubs, serving its task queue under :func:`policy`."""
    answers = Stubs()
    async with stubbed_worker(client, task_queue, answers, policy(tmp_path)):
        yield answers


def request(**params: object) -> RedisFailureRequest:
    return RedisFailureRequest.model_validate(
        {"requester": "alice", "publish_grace_seconds": GRACE, **params}
    )


async def failed(client: Client, task_queue: str, req: RedisFailureRequest) -> str:
    """The run's failure, as the person who started it reads it."""
    with pytest.raises(WorkflowFailureError) as failure:
        await (await start(client, RedisFailure, req, task_queue)).result()
    return str(failure.value.cause)


async def test_a_primary_that_holds_everything_is_left_alone(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="redis", node="primary"))
    stubs.answer(RedisNodeActivities.survey, HEALTHY)
    stubs.answer(RedisNodeActivities.compare_streams, streams("primary"))
    result = await (await start(client, RedisFailure, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert "nothing to do" in result.summary
    assert stubs.called() == CHECKS


async def test_data_lost_without_an_outage_is_rebuilt_in_place_after_approval(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="redis", node="primary"))
    stubs.answer(RedisNodeActivities.survey, HEALTHY)
    stubs.answer(
        RedisNodeActivities.compare_streams,
        streams("primary", missing=10, marker=False),
        streams("primary"),
    )
    works(stubs, "primary")
    handle = await start(client, RedisFailure, request(), task_queue)
    await awaiting_approval(handle, APPROVE_REBUILD)
    (pending,) = (await status(handle)).pending_approvals
    assert pending.reason.startswith(
        "Redis primary answers but lost data (10 of 10 pending tasks and 0 of 2 dead letters "
        "missing, data marker missing): rebuild it from PostgreSQL"
    )
    assert stubs.called() == CHECKS  # nothing changes before the approval
    await decide(handle, APPROVE_REBUILD, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert stubs.called() == [*CHECKS, *REPAIR, *VERIFY]
    assert [r.node for r in stubs.args(RedisNodeActivities.rebuild_streams)] == ["primary"]
    steps = {s.name: s for s in result.steps}
    assert steps[FAIL_OVER].detail == "not needed: primary answers as the primary"
    assert steps[APPROVE_FAILOVER].detail == "not needed: the primary answers"


async def test_a_dead_primary_is_replaced_by_its_replica_with_approval(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    handle = await start(client, RedisFailure, request(), task_queue)
    await decide(handle, APPROVE_FAILOVER, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert result.summary.startswith("Redis replica is the one primary; put back 4 pending tasks")
    assert stubs.called() == [*CHECKS, *FAILOVER]
    assert [p.node for p in stubs.args(RedisNodeActivities.promote)] == ["replica"]
    (repoint,) = stubs.args(EndpointActivities.repoint_platform)
    assert (repoint.store, repoint.node) == ("redis", "replica")
    assert [r.name for r in stubs.args(K8s.rollout_restart)] == list(PLATFORM_CLIENTS)
    (compared, verified) = stubs.args(RedisNodeActivities.compare_streams)
    assert compared.node == verified.node == "replica"
    assert {s.name: s for s in result.steps}[APPROVE_REBUILD].detail.startswith("not needed")


async def test_where_sentinel_watches_it_is_asked_to_fail_over_instead_of_promoting(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    watched = survey(down("primary"), up("replica"), sentinel="primary")
    primary_down(stubs, watched)
    stubs.answer(
        RedisNodeActivities.sentinel_failover,
        Promotion(
            changed=True, detail="asked Sentinel; it made replica the primary", node="replica"
        ),
    )
    handle = await start(client, RedisFailure, request(failover_timeout_seconds=5), task_queue)
    await decide(handle, APPROVE_FAILOVER, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert stubs.called() == [*CHECKS, SENTINEL, *FAILOVER[1:]]
    (asked,) = stubs.args(RedisNodeActivities.sentinel_failover)
    assert (asked.away_from, asked.timeout_seconds) == ("primary", 5)
    assert stubs.args(EndpointActivities.repoint_platform)[0].node == "replica"


@pytest.mark.parametrize("sentinel", [None, "spare"])
async def test_a_server_already_made_primary_is_adopted_over_a_more_advanced_replica(
    client: Client, task_queue: str, stubs: Stubs, sentinel: str | None
) -> None:
    """Someone (Sentinel, a person) got there first: the platform follows them, rather than
    making a second primary of the replica holding more of the old one's writes."""
    before = survey(
        down("primary"), up("replica", offset=9000), up("spare", "primary", 500), sentinel=sentinel
    )
    primary_down(stubs, before, target="spare")
    spare_primary = Promotion(changed=False, detail="spare is already a primary", node="spare")
    stubs.answer(RedisNodeActivities.promote, spare_primary)
    stubs.answer(RedisNodeActivities.sentinel_failover, spare_primary)
    handle = await start(client, RedisFailure, request(), task_queue)
    await awaiting_approval(handle, APPROVE_FAILOVER)
    (pending,) = (await status(handle)).pending_approvals
    assert "fail over to spare, point the platform at it" in pending.reason
    await decide(handle, APPROVE_FAILOVER, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert stubs.args(RedisNodeActivities.compare_streams)[0].node == "spare"
    assert stubs.args(EndpointActivities.repoint_platform)[0].node == "spare"
    if sentinel is None:
        assert [p.node for p in stubs.args(RedisNodeActivities.promote)] == ["spare"]
    else:  # Sentinel already names spare: asking it again changes nothing
        assert PROMOTE not in stubs.called()
        assert stubs.args(RedisNodeActivities.sentinel_failover)[0].away_from == "primary"


async def test_two_primaries_stop_the_run_before_anything_changes(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(
        RedisNodeActivities.survey, survey(up("primary", "primary"), up("replica", "primary"))
    )
    message = await failed(client, task_queue, request())

    assert "failed at step 'check the Redis servers'" in message
    assert "primary and replica all take writes: make all but one a replica" in message
    assert stubs.called() == [SURVEY]


async def test_a_dead_primary_without_a_replica_that_answers_fails_with_what_to_do(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(RedisNodeActivities.survey, survey(down("primary"), down("replica")))
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="redis", node="primary"))
    message = await failed(client, task_queue, request())

    assert "failed at step 'check the Redis servers'" in message
    assert "Redis primary is down and no replica answers (primary: unreachable" in message
    assert "restart primary from its persistence, then run this again" in message
    assert stubs.called() == [SURVEY, ENDPOINT]


async def test_an_endpoint_outside_the_topology_fails_before_anything_changes(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(RedisNodeActivities.survey, HEALTHY)
    stubs.answer(EndpointActivities.platform_endpoint, Endpoint(store="redis", node=None))
    message = await failed(client, task_queue, request())

    assert "failed at step 'check the platform's Redis endpoint'" in message
    assert "list that server in the data-plane topology" in message
    assert stubs.called() == [SURVEY, ENDPOINT]


async def test_a_rejected_failover_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    handle = await start(client, RedisFailure, request(), task_queue)
    await decide(handle, APPROVE_FAILOVER, "bob", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert stubs.called() == CHECKS


async def test_dry_run_reports_every_action_and_verifies_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    primary_down(stubs)
    result = await (await start(client, RedisFailure, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary.startswith("dry-run: Redis primary is down (primary: unreachable")
    acts = [PROMOTE, REPOINT, RESTART, REBUILT, MARKER, *[RESTART] * len(CONSUMERS)]
    assert stubs.called() == [*CHECKS, *acts]
    assert all(call.arg.dry_run for call in stubs.calls if call.activity not in CHECKS)


async def test_within_the_automatic_budget_a_failover_runs_unattended(
    client: Client, task_queue: str, tmp_path: Path
) -> None:
    stubs = Stubs()
    primary_down(stubs)
    stubs.answer(
        AccessActivities.claim_automatic_action,
        AutomaticClaim(allowed=True, used=1, detail="1 of 1 per 3600s for astra/redis"),
    )
    async with stubbed_worker(client, task_queue, stubs, policy(tmp_path, BUDGET)):
        result = await (await start(client, RedisFailure, request(), task_queue)).result()

    assert result.outcome == Outcome.DONE, result.summary
    assert stubs.called() == [*CHECKS, CLAIM, *FAILOVER]
    (claim,) = stubs.args(AccessActivities.claim_automatic_action)
    assert (claim.step, claim.scope) == (FAIL_OVER, "astra/redis")
    approval = {s.name: s for s in result.steps}[APPROVE_FAILOVER]
    assert (
        approval.detail
        == "not needed: within the automatic limit (1 of 1 per 3600s for astra/redis)"
    )


async def test_past_the_automatic_budget_a_failover_asks_kernel_sre(
    client: Client, task_queue: str, tmp_path: Path
) -> None:
    stubs = Stubs()
    primary_down(stubs)
    spent = "'fail over to the replica' already ran 1 times without a person (limit 1 per 3600s)"
    stubs.answer(
        AccessActivities.claim_automatic_action, AutomaticClaim(allowed=False, used=1, detail=spent)
    )
    async with stubbed_worker(client, task_queue, stubs, policy(tmp_path, BUDGET)):
        handle = await start(client, RedisFailure, request(), task_queue)
        await awaiting_approval(handle, APPROVE_FAILOVER)
        (pending,) = (await status(handle)).pending_approvals
        assert pending.reason.startswith(f"{spent}. Redis primary is down")
        assert stubs.called() == [*CHECKS, CLAIM]
        await decide(handle, APPROVE_FAILOVER, "bob")
        result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert {s.name: s for s in result.steps}[APPROVE_FAILOVER].state == StepState.DONE
    assert stubs.called() == [*CHECKS, CLAIM, *FAILOVER]


@pytest.mark.parametrize(
    ("after", "verified", "step", "saying"),
    [
        (
            survey(up("primary", "primary"), up("replica", "primary")),
            streams("replica"),
            VERIFY_PRIMARY,
            "expected replica alone to take writes, found primary, replica",
        ),
        (
            REPLICA_PRIMARY,
            streams("replica", missing=1),
            VERIFY_STREAMS,
            "replica: 1 of 10 pending tasks missing from their streams, 0 queued twice; 0 of 2 "
            "dead letters missing; data marker present; missing: task-0, queued twice: none",
        ),
    ],
    ids=["two-primaries", "a-task-missing"],
)
async def test_a_failed_verification_fails_the_run_with_what_it_found(
    client: Client,
    task_queue: str,
    stubs: Stubs,
    after: RedisSurvey,
    verified: StreamReport,
    step: str,
    saying: str,
) -> None:
    primary_down(stubs)
    stubs.answer(RedisNodeActivities.survey, PRIMARY_DOWN, after)
    stubs.answer(RedisNodeActivities.compare_streams, streams("replica", missing=4), verified)
    handle = await start(client, RedisFailure, request(), task_queue)
    await decide(handle, APPROVE_FAILOVER, "bob")
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    message = str(failure.value.cause)
    assert f"failed at step '{step}'" in message
    assert saying in message
    assert HEARTBEATS not in stubs.called()


async def test_a_worker_lost_between_promote_and_repoint_resumes_to_a_correct_end(
    client: Client, task_queue: str, tmp_path: Path
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
    second.answer(RedisNodeActivities.survey, REPLICA_PRIMARY)
    second.answer(RedisNodeActivities.compare_streams, streams("replica"))
    async with stubbed_worker(client, task_queue, first, policy(tmp_path)):
        handle = await start(client, RedisFailure, request(), task_queue)
        await decide(handle, APPROVE_FAILOVER, "bob")
        await eventually(
            lambda: REPOINT in first.called(), timeout=20, interval=0.05, message="a repoint"
        )
    async with stubbed_worker(client, task_queue, second, policy(tmp_path)):
        result = await handle.result()

    assert result.outcome == Outcome.DONE, result.summary
    assert first.called()[: len(CHECKS) + 2] == [*CHECKS, PROMOTE, REPOINT]
    assert set(first.called()[len(CHECKS) + 2 :]) <= {REPOINT}  # A retried, if at all, no more
    assert second.called() == FAILOVER[1:]  # B promotes nothing and checks nothing again
    assert [r.node for r in second.args(EndpointActivities.repoint_platform)] == ["replica"]
