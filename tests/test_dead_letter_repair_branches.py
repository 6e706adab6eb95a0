"""Dead-letter Repair's every branch, with its Redis and PostgreSQL activities stubbed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temporalio.client import Client

from activities.postgres import (
    DeadLetterRequeueResult,
    PostgresActivities,
    TaskState,
    TaskStates,
)
from activities.redis_store import AckResult, DeadLetter, DeadLetterBatch, RedisActivities
from runtime.access import load_policy
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.helpers import TEST_SIGNER, decide, start
from tests.stubs import POLICY, Stubs, name_of
from workflows.dead_letter_repair import DeadLetterRepair, DeadLetterRepairRequest
from workflows.models import Outcome, StepState

APPROVAL = "approve handling the dead letters"
READ, REQUEUE, ACK, STATES = (
    name_of(RedisActivities.read_dead_letters),
    name_of(PostgresActivities.requeue_dead_letters),
    name_of(RedisActivities.ack_dead_letters),
    name_of(PostgresActivities.task_states),
)


def letter(entry: str, task: str, error_class: str) -> DeadLetter:
    return DeadLetter(
        entry_id=entry, task_id=task, error=f"{error_class}: boom", error_class=error_class,
        retries=3, shard=1, worker_id="astra-worker-a", redelivered=False,
    )  # fmt: skip


# t1 was published twice; t4 died of a bug; one entry names no task at all.
LETTERS = [
    letter("1-0", "t1", "TimeoutError"),
    letter("2-0", "t2", "RateLimitError"),
    letter("3-0", "t1", "TimeoutError"),
    letter("4-0", "t3", "ConnectionError"),
    letter("5-0", "t4", "KeyError"),
    letter("6-0", "", "TimeoutError"),
]


def requeued(*tasks: str, of: int) -> DeadLetterRequeueResult:
    return DeadLetterRequeueResult(
        changed=bool(tasks), detail=f"requeued {len(tasks)} of {of}", requeued=list(tasks),
        skipped=[],
    )  # fmt: skip


def state(task: str, status: str) -> TaskState:
    return TaskState(
        id=task, status=status, worker_id=None, retries=0, max_retries=3, last_error=None,
        updated_at=datetime.now(UTC),
    )  # fmt: skip


def published(stubs: Stubs) -> None:
    stubs.answer(RedisActivities.read_dead_letters, DeadLetterBatch(entries=LETTERS))
    stubs.answer(
        PostgresActivities.requeue_dead_letters, requeued("t1", "t2", of=2), requeued("t3", of=1)
    )
    stubs.answer(
        RedisActivities.ack_dead_letters, AckResult(changed=True, detail="ok", acknowledged=1)
    )
    stubs.answer(
        PostgresActivities.task_states,
        TaskStates(tasks={t: state(t, "pending") for t in ("t1", "t2", "t3")}),
    )


def request(**params: object) -> DeadLetterRepairRequest:
    return DeadLetterRepairRequest.model_validate(
        {"requester": "alice", "group": "repair", "batch_size": 2, **params}
    )


def acknowledged(stubs: Stubs) -> list[list[str]]:
    return [a.entry_ids for a in stubs.args(RedisActivities.ack_dead_letters)]


async def test_retryable_tasks_are_requeued_in_batches_each_acknowledged_after_its_requeue(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    published(stubs)
    handle = await start(client, DeadLetterRepair, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert result.summary == (
        "6 dead letters: 5 retryable (TimeoutError (3), RateLimitError (1), ConnectionError (1)), "
        "1 not (KeyError (1)); requeued 3 of 3 retryable tasks (the rest had left dead_letter "
        "already); not retryable, for a person: t4"
    )
    assert stubs.called() == [READ, REQUEUE, ACK, REQUEUE, ACK, ACK, STATES]
    assert [r.task_ids for r in stubs.args(PostgresActivities.requeue_dead_letters)] == [
        ["t1", "t2"],
        ["t3"],
    ]
    # Both entries of t1 with its batch; the bug and the entry without a task once reported.
    assert acknowledged(stubs) == [["1-0", "2-0", "3-0"], ["4-0"], ["5-0", "6-0"]]
    (read,) = stubs.args(RedisActivities.read_dead_letters)
    assert (read.group, read.consumer, read.count) == ("repair", "dead-letter-repair", 1000)
    assert stubs.args(PostgresActivities.task_states)[0].task_ids == ["t1", "t2", "t3"]


async def test_tasks_that_died_again_are_named(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    published(stubs)
    stubs.answer(
        PostgresActivities.task_states,
        TaskStates(tasks={"t1": state("t1", "dead_letter"), "t2": state("t2", "running")}),
    )
    handle = await start(client, DeadLetterRepair, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert result.summary.endswith("; 1 died again since: t1")


async def test_tasks_that_left_dead_letter_already_need_no_verify(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    published(stubs)
    stubs.answer(PostgresActivities.requeue_dead_letters, requeued(of=2), requeued(of=1))
    handle = await start(client, DeadLetterRepair, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert "requeued 0 of 3 retryable tasks" in result.summary
    assert STATES not in stubs.called()
    steps = {s.name: s.state for s in result.steps}
    assert steps["verify requeued tasks left dead_letter"] == StepState.SKIPPED


async def test_an_empty_stream_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(RedisActivities.read_dead_letters, DeadLetterBatch(entries=[]))
    result = await (await start(client, DeadLetterRepair, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert result.summary == "no dead letters for group repair"
    assert stubs.called() == [READ]


@pytest.mark.parametrize("retryable", [None, ["RateLimitError"]], ids=["default", "narrow"])
async def test_a_rejection_leaves_every_entry_for_the_next_run(
    client: Client, task_queue: str, stubs: Stubs, retryable: list[str] | None
) -> None:
    """However narrow the retryable list (the issue's attack: nothing retryable skipped the
    approval and acknowledged everything), a person decides before anything leaves the stream."""
    published(stubs)
    params = {"retryable_errors": retryable} if retryable else {}
    handle = await start(client, DeadLetterRepair, request(**params), task_queue)
    await decide(handle, APPROVAL, "bob", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert stubs.called() == [READ]


async def test_an_approval_nobody_gives_aborts_with_nothing_acknowledged(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    published(stubs)
    handle = await start(
        client, DeadLetterRepair, request(approval_timeout_seconds=0.5), task_queue
    )
    result = await handle.result()

    assert result.outcome == Outcome.ABORTED
    assert stubs.called() == [READ]


async def test_dry_run_only_reports(client: Client, task_queue: str, stubs: Stubs) -> None:
    published(stubs)
    result = await (
        await start(client, DeadLetterRepair, request(dry_run=True), task_queue)
    ).result()

    assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run: 6 dead letters")
    assert stubs.called() == [READ, REQUEUE, ACK, REQUEUE, ACK, ACK]
    mutations = [
        *stubs.args(PostgresActivities.requeue_dead_letters),
        *stubs.args(RedisActivities.ack_dead_letters),
    ]
    assert all(m.dry_run for m in mutations)


async def test_a_bad_batch_size_is_refused_before_start(client: Client, task_queue: str) -> None:
    runs = Runs(client, task_queue, load_policy(POLICY), TEST_SIGNER)
    with pytest.raises(InvalidInput, match="batch_size"):
        await runs.start("dead-letter-repair", {"batch_size": "-1"}, requester="alice")
