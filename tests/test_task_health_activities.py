"""The task-health runbooks' activities, run in Temporal's ActivityEnvironment on real services."""

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.metrics import MetricsActivities, PrometheusMetrics, SqlMetrics, metrics_source
from activities.postgres import (
    FailureBreakdownRequest,
    FailureRateRequest,
    LeasedTasksRequest,
    LlmCostRequest,
    PostgresActivities,
    RequeueDeadLetters,
    RequeueLostWorker,
    RequeueProgressRequest,
    TaskStatesRequest,
)
from activities.redis_store import (
    AckDeadLetters,
    HeartbeatAgeRequest,
    LiveWorkersRequest,
    ReadDeadLetters,
    RedisActivities,
)
from sandbox.faults import SandboxTarget, cost_spike, dead_letters, error_spike, worker_lost
from sandbox.loadgen import SandboxKeys


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


@pytest.fixture
def pg(pg_dsn: str) -> PostgresActivities:
    return PostgresActivities(pg_dsn)


@pytest.fixture
async def rd(data_plane: SandboxTarget) -> AsyncIterator[RedisActivities]:
    activities = RedisActivities(data_plane.redis_url, key_prefix=data_plane.key_prefix)
    yield activities
    await activities.aclose()


async def table(dsn: str) -> list[tuple[Any, ...]]:
    """The whole tasks table, for "the world is the same" comparisons."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await (
            await conn.execute("SELECT id, status, worker_id, retries FROM tasks ORDER BY id")
        ).fetchall()


async def test_heartbeat_age_of_a_lost_worker_and_of_one_never_seen(
    env: ActivityEnvironment, rd: RedisActivities, data_plane: SandboxTarget
) -> None:
    fault = await worker_lost(data_plane, heartbeat_age_seconds=45)
    lost = await env.run(rd.heartbeat_age, HeartbeatAgeRequest(worker_id=fault.worker_id))
    never = await env.run(rd.heartbeat_age, HeartbeatAgeRequest(worker_id="ghost"))
    assert lost.age_seconds is not None and 45 <= lost.age_seconds < 60
    assert never.age_seconds is None and never.last_seen_ms is None


async def test_live_workers_are_those_within_the_threshold(
    env: ActivityEnvironment,
    rd: RedisActivities,
    data_plane: SandboxTarget,
    redis_client: "aioredis.Redis",
) -> None:
    keys = SandboxKeys(data_plane.key_prefix)
    now_ms = int(time.time() * 1000)
    await redis_client.set(keys.heartbeat("fresh"), now_ms - 1_000)
    await redis_client.set(keys.heartbeat("stale"), now_ms - 31_000)
    live = await env.run(rd.live_workers, LiveWorkersRequest(threshold_seconds=30))
    assert live == ["fresh"]


async def test_unknown_worker_is_rejected_and_nothing_changes(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    await worker_lost(data_plane, worker_id=None)
    before = await table(data_plane.dsn)
    now = datetime.now(UTC)
    ghost = RequeueLostWorker(worker_id="astra-worker-9", leased_before=now, token="t")
    with pytest.raises(ApplicationError, match="unknown worker astra-worker-9") as err:
        await env.run(pg.requeue_lost_worker, ghost)
    assert err.value.non_retryable
    with pytest.raises(ApplicationError, match="no such row in workers"):
        await env.run(pg.lease_summary, LeasedTasksRequest(worker_id="astra-worker-9"))
    assert await table(data_plane.dsn) == before


async def test_requeue_twice_leaves_the_world_as_once_and_spares_finished_tasks(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    fault = await worker_lost(data_plane, tasks_if_none=4)
    finished, taken_over, *stranded = fault.leased_task_ids
    async with await psycopg.AsyncConnection.connect(data_plane.dsn) as conn:
        # While the runbook waits for approval, another worker finishes one task and re-leases
        # another: the requeue must leave both alone.
        await conn.execute("INSERT INTO workers (id) VALUES ('w-other')")
        await conn.execute(
            "UPDATE tasks SET status = 'succeeded', worker_id = 'w-other' WHERE id = %s",
            (finished,),
        )
        await conn.execute("UPDATE tasks SET worker_id = 'w-other' WHERE id = %s", (taken_over,))
    leases = await env.run(pg.lease_summary, LeasedTasksRequest(worker_id=fault.worker_id))
    assert (leases.count, leases.sample) == (2, sorted(stranded))
    request = RequeueLostWorker(
        worker_id=fault.worker_id, leased_before=leases.as_of, batch_size=1, token="t"
    )

    first = await env.run(pg.requeue_lost_worker, request)
    after_once = await table(data_plane.dsn)
    second = await env.run(pg.requeue_lost_worker, request)

    assert (first.changed, first.requeued, first.batches) == (True, 2, 2)
    assert (second.changed, second.requeued) == (False, 0)
    assert await table(data_plane.dsn) == after_once
    states = await env.run(pg.task_states, TaskStatesRequest(task_ids=fault.leased_task_ids))
    assert {i: (s.status, s.worker_id) for i, s in states.tasks.items()} == {
        finished: ("succeeded", "w-other"),
        taken_over: ("running", "w-other"),
        **{i: ("pending", None) for i in stranded},
    }
    progress = await env.run(pg.requeue_progress, RequeueProgressRequest(token="t"))
    assert (progress.requeued, progress.waiting) == (2, 2)


async def test_requeue_dry_run_counts_and_changes_nothing(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    fault = await worker_lost(data_plane, tasks_if_none=3)
    before = await table(data_plane.dsn)
    leases = await env.run(pg.lease_summary, LeasedTasksRequest(worker_id=fault.worker_id))
    result = await env.run(
        pg.requeue_lost_worker,
        RequeueLostWorker(worker_id=fault.worker_id, leased_before=leases.as_of, dry_run=True),
    )
    assert (result.changed, result.requeued) == (False, 3)
    assert await table(data_plane.dsn) == before


async def test_dead_letter_requeue_happens_once_per_repair_run(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    fault = await dead_letters(data_plane, count=3)
    request = RequeueDeadLetters(task_ids=fault.task_ids, token="dead-letter-repair/r1:requeue")

    first = await env.run(pg.requeue_dead_letters, request)
    after_once = await table(data_plane.dsn)
    second = await env.run(pg.requeue_dead_letters, request)
    assert await table(data_plane.dsn) == after_once
    # The task dead-letters again during the run: this run must still not requeue it twice.
    async with await psycopg.AsyncConnection.connect(data_plane.dsn) as conn:
        await conn.execute(
            "UPDATE tasks SET status = 'dead_letter' WHERE id = %s", (fault.task_ids[0],)
        )
    third = await env.run(pg.requeue_dead_letters, request)
    next_run = await env.run(
        pg.requeue_dead_letters,
        request.model_copy(update={"token": "dead-letter-repair/r2:requeue"}),
    )

    assert first.requeued == sorted(fault.task_ids)
    assert {(s, r) for _, s, _, r in after_once} == {("pending", 0)}
    assert (second.changed, second.requeued, third.requeued) == (False, [], [])
    assert next_run.requeued == [fault.task_ids[0]]


async def test_dead_letter_requeue_needs_a_token_and_dry_run_changes_nothing(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    fault = await dead_letters(data_plane, count=2)
    before = await table(data_plane.dsn)
    with pytest.raises(ApplicationError, match="needs a token") as err:
        await env.run(pg.requeue_dead_letters, RequeueDeadLetters(task_ids=fault.task_ids))
    assert err.value.non_retryable
    dry = await env.run(
        pg.requeue_dead_letters,
        RequeueDeadLetters(task_ids=[*fault.task_ids, "unknown"], token="r", dry_run=True),
    )
    assert (dry.changed, dry.requeued, dry.skipped) == (False, sorted(fault.task_ids), ["unknown"])
    assert await table(data_plane.dsn) == before


async def test_consumer_group_redelivers_what_was_not_acknowledged(
    env: ActivityEnvironment, rd: RedisActivities, data_plane: SandboxTarget
) -> None:
    fault = await dead_letters(data_plane, count=4)
    ids = [e.entry_id for e in fault.entries]
    read = ReadDeadLetters(group="repair", consumer="c1", count=2)

    first = await env.run(rd.read_dead_letters, read)
    # The repair "crashed" before acknowledging: the same entries come back first, then new ones.
    again = await env.run(rd.read_dead_letters, read.model_copy(update={"count": 4}))
    ack = AckDeadLetters(group="repair", entry_ids=ids[:3], token="t")
    acked = await env.run(rd.ack_dead_letters, ack)
    acked_again = await env.run(rd.ack_dead_letters, ack)
    left = await env.run(rd.read_dead_letters, read)

    assert [e.entry_id for e in first.entries] == ids[:2]
    assert not any(e.redelivered for e in first.entries)
    assert [(e.entry_id, e.redelivered) for e in again.entries] == [
        (ids[0], True),
        (ids[1], True),
        (ids[2], False),
        (ids[3], False),
    ]
    assert first.entries[0].error_class == "TimeoutError" and first.entries[0].retries == 3
    assert (acked.acknowledged, acked_again.acknowledged, acked_again.changed) == (3, 0, False)
    assert [(e.entry_id, e.redelivered) for e in left.entries] == [(ids[3], True)]


async def test_ack_dry_run_acknowledges_nothing(
    env: ActivityEnvironment, rd: RedisActivities, data_plane: SandboxTarget
) -> None:
    fault = await dead_letters(data_plane, count=2)
    read = ReadDeadLetters(group="repair", consumer="c1", count=10)
    await env.run(rd.read_dead_letters, read)
    ids = [e.entry_id for e in fault.entries]
    dry = await env.run(
        rd.ack_dead_letters, AckDeadLetters(group="repair", entry_ids=ids, dry_run=True)
    )
    redelivered = await env.run(rd.read_dead_letters, read)
    assert (dry.changed, dry.detail) == (False, "would acknowledge 2 of 2 dead letters")
    assert [e.entry_id for e in redelivered.entries] == ids


async def test_failure_rate_and_breakdown_point_at_the_failing_worker_and_shard(
    env: ActivityEnvironment, pg: PostgresActivities, data_plane: SandboxTarget
) -> None:
    await worker_lost(data_plane, worker_id=None)  # registers a worker
    await error_spike(
        data_plane,
        share=0.2,
        tasks=40,
        error="ToolError: sandbox crashed",
        worker_id="w-bad",
        shard=3,
    )
    rate = await env.run(
        MetricsActivities(SqlMetrics(data_plane.dsn)).failure_rate,
        FailureRateRequest(window_seconds=300),
    )
    breakdown = await env.run(pg.failure_breakdown, FailureBreakdownRequest(window_seconds=300))
    assert (rate.total, rate.failed, rate.rate) == (40, 8, 0.2)
    assert [(c.key, c.count) for c in breakdown.by_error_class] == [("ToolError", 8)]
    assert [(c.key, c.count) for c in breakdown.by_worker] == [("w-bad", 8)]
    assert [(c.key, c.count) for c in breakdown.by_shard] == [("3", 8)]


async def test_sql_metrics_source_measures_the_outcomes_and_spend_in_the_window(
    env: ActivityEnvironment, data_plane: SandboxTarget
) -> None:
    fault = await error_spike(data_plane, share=0.5, tasks=10)
    await cost_spike(data_plane, multiplier=3)
    source = metrics_source(data_plane.dsn, prometheus_url=None)
    assert isinstance(source, SqlMetrics)
    metrics = MetricsActivities(source)
    rate = await env.run(metrics.failure_rate, FailureRateRequest(window_seconds=300))
    assert (rate.total, rate.failed, rate.rate) == (10, len(fault.failed_task_ids), 0.5)
    measured = await env.run(metrics.cost_comparison, LlmCostRequest(window_seconds=300))
    assert measured.ratio == pytest.approx(3, rel=0.01)
    assert measured.top_models[0].key == "gpt-4o"


async def test_prometheus_source_sends_the_windowed_promql_and_reads_vectors(
    env: ActivityEnvironment,
) -> None:
    answers = {
        'sum(increase(astra_tasks_total{status=~"failed|dead_letter"}[300000ms]))': [
            {"metric": {}, "value": [0, "6"]}
        ],
        'sum(increase(astra_tasks_total{status=~"succeeded|failed|dead_letter"}[300000ms]))': [
            {"metric": {}, "value": [0, "100"]}
        ],
    }
    seen: list[str] = []

    def prometheus(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        seen.append(query)
        result = answers.get(query)
        if result is None:
            return httpx.Response(
                400, json={"status": "error", "errorType": "bad_data", "error": "?"}
            )
        data = {"resultType": "vector", "result": result}
        return httpx.Response(200, json={"status": "success", "data": data})

    client = httpx.AsyncClient(transport=httpx.MockTransport(prometheus))
    source = PrometheusMetrics("http://prometheus:9090/", client)
    rate = await env.run(MetricsActivities(source).failure_rate, FailureRateRequest())
    assert (rate.total, rate.failed, rate.rate) == (100, 6, 0.06)
    with pytest.raises(ApplicationError, match="Prometheus rejected") as err:
        await env.run(MetricsActivities(source).cost_comparison, LlmCostRequest())
    assert err.value.non_retryable
    await source.aclose()


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (FailureRateRequest, {"window_seconds": 0}),
        (FailureBreakdownRequest, {"window_seconds": -5}),
        (LiveWorkersRequest, {"threshold_seconds": -1}),
        (LlmCostRequest, {"window_seconds": 0}),
        (LlmCostRequest, {"window_seconds": 600, "baseline_seconds": 300}),
        (ReadDeadLetters, {"consumer": "c", "count": 0}),
        (RequeueLostWorker, {"worker_id": "", "leased_before": "2026-01-01T00:00:00Z"}),
    ],
)
def test_bad_input_is_rejected_before_anything_runs(
    model: type[Any], fields: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        model(**fields)
