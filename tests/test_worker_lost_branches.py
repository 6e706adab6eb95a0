"""Worker Lost's every branch, with its Redis, PostgreSQL and Kubernetes activities stubbed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.access import AccessActivities, AutomaticClaim
from activities.kube_models import PodInfo, PodList
from activities.kubernetes import KubernetesActivities as K8s
from activities.mutation import MutationResult
from activities.postgres import (
    LeaseSummary,
    LostWorkerRequeue,
    PostgresActivities,
    RequeueProgress,
)
from activities.redis_store import HeartbeatAge, RedisActivities
from runtime.access import load_policy
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.helpers import TEST_SIGNER, decide, start, status
from tests.stubs import POLICY, Stubs, name_of
from workflows.models import Outcome, StepState
from workflows.worker_lost import WorkerLost, WorkerLostRequest

LOST = "astra-worker-a"
POOL = [LOST, "astra-worker-b", "astra-worker-c"]
NEWCOMER = "astra-worker-d"
STUCK = "approve replacing workers of a stuck pool"
OVER_LIMIT = "approve deleting more pods than the automatic limit"
REPLACEMENT = "verify a replacement heartbeats"
PICKUP = "verify the requeued tasks are picked up"

HEARTBEAT, PODS, LIVE = (
    name_of(RedisActivities.heartbeat_age),
    name_of(K8s.list_pods),
    name_of(RedisActivities.live_workers),
)
LEASES, CLAIM = (
    name_of(PostgresActivities.lease_summary),
    name_of(AccessActivities.claim_automatic_action),
)
REQUEUE, DELETE, PROGRESS = (
    name_of(PostgresActivities.requeue_lost_worker),
    name_of(K8s.delete_pod),
    name_of(PostgresActivities.requeue_progress),
)
CHECKS = [HEARTBEAT, PODS, LIVE, LEASES]


def pods(*names: str) -> PodList:
    return PodList(pods=[PodInfo(name=n, phase="Running", ready=True) for n in names])


def progress(waiting: int) -> RequeueProgress:
    return RequeueProgress(requeued=3, waiting=waiting)


def lost_with_three_tasks(stubs: Stubs, *, live: list[str] | None = None) -> None:
    """``LOST`` silent for two minutes holding three tasks while the rest of the pool heartbeats;
    once it is replaced, a newcomer heartbeats and the tasks are picked up."""
    still = live if live is not None else POOL[1:]
    stubs.answer(
        RedisActivities.heartbeat_age,
        HeartbeatAge(worker_id=LOST, age_seconds=120, last_seen_ms=1),
    )
    stubs.answer(K8s.list_pods, pods(*POOL))
    stubs.answer(RedisActivities.live_workers, still, [*still, NEWCOMER])
    stubs.answer(
        PostgresActivities.lease_summary,
        LeaseSummary(worker_id=LOST, count=3, sample=["t1", "t2", "t3"], as_of=datetime.now(UTC)),
    )
    stubs.answer(
        AccessActivities.claim_automatic_action,
        AutomaticClaim(allowed=True, used=1, detail="1 of 3 per 3600s"),
    )
    stubs.answer(
        PostgresActivities.requeue_lost_worker,
        LostWorkerRequeue(
            changed=True, detail=f"requeued 3 tasks of {LOST}", requeued=3, batches=1, token="t"
        ),
    )
    stubs.answer(K8s.delete_pod, MutationResult(changed=True, detail=f"deleted pod {LOST}"))
    stubs.answer(PostgresActivities.requeue_progress, progress(0))


def request(**params: object) -> WorkerLostRequest:
    return WorkerLostRequest.model_validate(
        {"requester": "alice", "worker_id": LOST, "verify_timeout_seconds": 10, **params}
    )


async def test_one_lost_worker_is_replaced_without_asking_within_the_automatic_limit(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    result = await (await start(client, WorkerLost, request(), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary == (
        f"requeued 3 tasks of {LOST}; pod {LOST} replaced, {NEWCOMER} heartbeating; "
        "all 3 requeued tasks picked up"
    )
    assert stubs.called() == [*CHECKS, CLAIM, REQUEUE, DELETE, LIVE, PROGRESS]
    (requeue,) = stubs.args(PostgresActivities.requeue_lost_worker)
    assert (requeue.worker_id, requeue.batch_size, requeue.dry_run) == (LOST, 5000, False)
    (claim,) = stubs.args(AccessActivities.claim_automatic_action)
    assert (claim.scope, claim.limit, claim.per_seconds) == ("astra/astra-worker", 3, 3600)
    assert [d.name for d in stubs.args(K8s.delete_pod)] == [LOST]
    assert [r.token for r in stubs.args(PostgresActivities.requeue_progress)] == ["t"]
    steps = {s.name: s for s in result.steps}
    assert steps[STUCK].state == StepState.SKIPPED
    assert steps[STUCK].detail == (
        "not needed: 1 of 3 astra-worker pods lost, not more than 50% of the pool"
    )
    assert steps[OVER_LIMIT].state == StepState.SKIPPED
    assert steps[REPLACEMENT].detail == f"3 found: {', '.join([*POOL[1:], NEWCOMER])}"


async def test_the_summary_counts_the_tasks_an_attempt_cut_off_earlier_requeued(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    # The requeue's first attempt lost its connection after two of the three tasks; the retry
    # requeued the third (tests/test_target_faults.py cuts a real one).
    lost_with_three_tasks(stubs)
    detail = f"requeued 1 tasks of {LOST} in 1 batch(es), 2 more by an earlier attempt of this step"
    stubs.answer(
        PostgresActivities.requeue_lost_worker,
        LostWorkerRequeue(changed=True, detail=detail, requeued=1, batches=1, token="t"),
    )
    result = await (await start(client, WorkerLost, request(), task_queue)).result()

    assert result.summary.startswith(detail)
    assert result.summary.endswith("; all 3 requeued tasks picked up")


async def test_a_live_heartbeat_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(
        RedisActivities.heartbeat_age, HeartbeatAge(worker_id=LOST, age_seconds=4, last_seen_ms=1)
    )
    result = await (await start(client, WorkerLost, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert result.summary == f"{LOST} heartbeat 4s ago (threshold 30s); it is alive, nothing to do"
    assert stubs.called() == [HEARTBEAT]


@pytest.mark.parametrize("verdict", ["approve", "reject"])
async def test_past_the_automatic_limit_a_person_decides(
    client: Client, task_queue: str, stubs: Stubs, verdict: str
) -> None:
    lost_with_three_tasks(stubs)
    spent = "'delete the worker's pod' already ran 3 times without a person (limit 3 per 3600s)"
    stubs.answer(
        AccessActivities.claim_automatic_action, AutomaticClaim(allowed=False, used=3, detail=spent)
    )
    handle = await start(client, WorkerLost, request(), task_queue)
    await decide(handle, OVER_LIMIT, "carol", verdict)
    result = await handle.result()

    steps = {s.name: s for s in result.steps}
    if verdict == "approve":
        assert result.outcome == Outcome.DONE
        assert steps[OVER_LIMIT].detail == "approved by carol"
        assert stubs.called()[5:7] == [REQUEUE, DELETE]
    else:
        assert result.outcome == Outcome.REJECTED
        assert stubs.called() == [*CHECKS, CLAIM]  # nothing requeued, no pod deleted
    decisions = (await status(handle)).decisions
    assert [d.step for d in decisions if d.accepted] == [OVER_LIMIT]


@pytest.mark.parametrize("verdict", ["approve", "reject"])
async def test_a_stuck_pool_waits_for_agent_platform(
    client: Client, task_queue: str, stubs: Stubs, verdict: str
) -> None:
    lost_with_three_tasks(stubs, live=["astra-worker-c"])  # two of three lost: more than half
    handle = await start(client, WorkerLost, request(), task_queue)
    await decide(handle, STUCK, "erin", verdict)
    result = await handle.result()

    if verdict == "approve":
        assert result.outcome == Outcome.DONE
        # A person approved it: the unattended budget is neither consulted nor spent.
        assert stubs.called()[:7] == [*CHECKS, REQUEUE, DELETE, LIVE]
    else:
        assert result.outcome == Outcome.REJECTED
        assert stubs.called() == CHECKS
    (approval,) = [p for p in (await status(handle)).decisions if p.accepted]
    assert approval.step == STUCK and approval.approver == "erin"


async def test_a_stuck_pool_nobody_answers_for_aborts_before_any_change(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs, live=[])
    handle = await start(client, WorkerLost, request(approval_timeout_seconds=0.5), task_queue)
    result = await handle.result()

    assert result.outcome == Outcome.ABORTED
    assert f"no decision on step '{STUCK}'" in result.summary
    assert stubs.called() == CHECKS


async def test_a_worker_without_a_pod_has_its_tasks_requeued_and_nothing_deleted(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    stubs.answer(K8s.list_pods, pods(*POOL[1:]))
    result = await (await start(client, WorkerLost, request(), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert f"{LOST} had no pod left to replace" in result.summary
    assert stubs.called() == [*CHECKS, REQUEUE, PROGRESS]
    steps = {s.name: s.state for s in result.steps}
    assert steps["delete the worker's pod"] == StepState.SKIPPED
    assert steps[REPLACEMENT] == StepState.SKIPPED


async def test_dry_run_only_reports_and_claims_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    stubs.answer(
        PostgresActivities.requeue_lost_worker,
        LostWorkerRequeue(
            changed=False, detail=f"would requeue 3 tasks of {LOST}", requeued=3, batches=0,
            token="t",
        ),
    )  # fmt: skip
    result = await (await start(client, WorkerLost, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary == f"dry-run: would requeue 3 tasks of {LOST}; would delete pod {LOST}"
    assert stubs.called() == [*CHECKS, REQUEUE, DELETE]
    assert stubs.args(PostgresActivities.requeue_lost_worker)[0].dry_run
    assert stubs.args(K8s.delete_pod)[0].dry_run


async def test_no_replacement_within_the_wait_fails_the_run(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    stubs.answer(RedisActivities.live_workers, POOL[1:])  # nobody new, ever
    handle = await start(client, WorkerLost, request(verify_timeout_seconds=1), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert f"failed at step '{REPLACEMENT}'" in message
    assert f"no new astra-worker worker heartbeat within 1s of deleting {LOST}" in message
    probes = stubs.called().count(LIVE) - 1
    assert 2 <= probes <= 62  # measured over the wait, at most about 60 times
    assert PROGRESS not in stubs.called()


async def test_tasks_nobody_picks_up_fail_the_run(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    stubs.answer(PostgresActivities.requeue_progress, progress(2))
    handle = await start(client, WorkerLost, request(verify_timeout_seconds=1), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert f"failed at step '{PICKUP}'" in message
    assert "2 of 3 requeued tasks still pending after 1s; are the live workers leasing?" in message
    steps = {s.name: s.state for s in (await status(handle)).steps}
    assert steps[REPLACEMENT] == StepState.DONE and steps[PICKUP] == StepState.FAILED


async def test_a_failing_check_fails_the_run_with_its_reason_and_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    lost_with_three_tasks(stubs)
    unknown = ApplicationError(f"unknown worker {LOST}: no such row", non_retryable=True)
    stubs.answer(PostgresActivities.lease_summary, unknown)
    handle = await start(client, WorkerLost, request(), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert f"failed at step 'count the worker's leased tasks': unknown worker {LOST}" in str(
        failed.value.cause
    )
    assert stubs.called() == CHECKS


async def test_a_bad_heartbeat_threshold_is_refused_before_start(
    client: Client, task_queue: str
) -> None:
    runs = Runs(client, task_queue, load_policy(POLICY), TEST_SIGNER)
    with pytest.raises(InvalidInput, match="heartbeat_threshold_seconds"):
        await runs.start(
            "worker-lost", {"worker_id": LOST, "heartbeat_threshold_seconds": "-30"},
            requester="alice",
        )  # fmt: skip
