"""The sandbox data plane on real PostgreSQL and Redis: schema, load generator, faults, metrics."""

import time
import uuid
from typing import Any, cast

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from activities.metrics import SqlMetrics
from activities.postgres import LlmCostRequest
from sandbox.db import drop_database, migrate, migrations, reset
from sandbox.faults import SandboxTarget, cost_spike, dead_letters, error_spike, worker_lost
from sandbox.loadgen import Knobs, LoadConfig, LoadGenerator, SandboxKeys, write_knobs
from sandbox.metrics import MetricsApp
from sandbox.servers import DataPlane


async def fetch(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await (await conn.execute(query, params)).fetchall()


async def published(client: "aioredis.Redis", stream: str) -> list[dict[str, str]]:
    """The fields of every entry on a stream, oldest first."""
    entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
    return [fields for _, fields in entries]


async def statuses(dsn: str, ids: list[str]) -> dict[str, str]:
    rows = await fetch(dsn, "SELECT id, status FROM tasks WHERE id = ANY(%s)", (ids,))
    return {str(r[0]): str(r[1]) for r in rows}


def generator(target: SandboxTarget, workers: list[str], **config: Any) -> LoadGenerator:
    return LoadGenerator(
        target.dsn,
        target.redis_url,
        workers,
        LoadConfig(seed=7, retry_delay_seconds=0, **config),
        key_prefix=target.key_prefix,
    )


async def test_migrate_creates_the_database_and_a_second_run_changes_nothing(
    data_servers: DataPlane,
) -> None:
    name = f"astra_test_{uuid.uuid4().hex}"
    dsn = make_conninfo(data_servers.postgres_url, dbname=name)
    try:
        first = await migrate(dsn)
        second = await migrate(dsn)
        recorded = await fetch(dsn, "SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await drop_database(data_servers.postgres_url, name)
    assert first == [migration.version for migration in migrations()]
    assert first == ["0001_astra_contract", "0002_astra_sandbox_marker"]
    assert second == []
    assert [r[0] for r in recorded] == first


async def test_task_status_outside_the_contract_is_rejected(pg_dsn: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="tasks_status_check"):
        await fetch(
            pg_dsn, "INSERT INTO tasks (id, goal_id, status) VALUES ('t', 'g', 'lost') RETURNING id"
        )


async def test_reset_empties_the_tables_and_only_its_own_keys(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    await dead_letters(data_plane, count=2)
    neighbour = f"astra_test_{uuid.uuid4().hex}:keep"
    await redis_client.set(neighbour, "1")
    try:
        await reset(data_plane.dsn, data_plane.redis_url, data_plane.key_prefix)
        assert await fetch(data_plane.dsn, "SELECT count(*) FROM tasks") == [(0,)]
        keys = SandboxKeys(data_plane.key_prefix)
        assert await redis_client.exists(keys.dead_letter) == 0
        assert await redis_client.get(neighbour) == "1"
        # An emptied sandbox is not one that lost its data: /metrics must not say it did.
        assert await redis_client.exists(keys.data_marker) == 1
    finally:
        await redis_client.delete(neighbour)


async def test_load_generator_leases_then_completes_tasks_and_heartbeats(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    gen = generator(data_plane, ["w-1", "w-2"], tasks_per_step=4, lease_per_worker=2)
    try:
        first = await gen.step()
        leased = first.leased["w-1"] + first.leased["w-2"]
        assert sorted(leased) == sorted(first.submitted)
        assert set((await statuses(data_plane.dsn, leased)).values()) == {"running"}

        second = await gen.step()
    finally:
        await gen.aclose()
    assert sorted(second.succeeded) == sorted(leased)
    assert set((await statuses(data_plane.dsn, leased)).values()) == {"succeeded"}
    keys = SandboxKeys(data_plane.key_prefix)
    beat = await redis_client.get(keys.heartbeat("w-1"))
    assert beat is not None and abs(time.time() * 1000 - int(beat)) < 5_000
    workers = await fetch(data_plane.dsn, "SELECT id FROM workers ORDER BY id")
    assert workers == [("w-1",), ("w-2",)]


async def test_load_generator_dead_letters_after_max_retries_and_publishes(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    gen = generator(data_plane, ["w-1"], tasks_per_step=0, lease_per_worker=1)
    keys = SandboxKeys(data_plane.key_prefix)
    await write_knobs(redis_client, keys, Knobs(failure_share=1.0, error="ToolError: boom"))
    await fetch(
        data_plane.dsn,
        "INSERT INTO tasks (id, goal_id, shard, max_retries)"
        " VALUES ('t-1', 'g', 2, 1) RETURNING id",
    )
    try:
        await gen.step()  # leased
        second = await gen.step()  # first failure, retried at once (no backoff here)
        third = await gen.step()  # retries == max_retries: final
    finally:
        await gen.aclose()
    assert second.failed == ["t-1"]
    assert third.dead_lettered == ["t-1"]
    rows = await fetch(data_plane.dsn, "SELECT status, retries, last_error FROM tasks")
    assert rows == [("dead_letter", 1, "ToolError: boom")]
    assert await published(redis_client, keys.dead_letter) == [
        {
            "task_id": "t-1",
            "error": "ToolError: boom",
            "retries": "1",
            "shard": "2",
            "worker_id": "w-1",
        }
    ]


async def test_worker_lost_fault_leaves_leased_tasks_and_a_stale_heartbeat(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    gen = generator(data_plane, ["w-1", "w-2"], tasks_per_step=4, lease_per_worker=2)
    try:
        await gen.step()
        fault = await worker_lost(data_plane, heartbeat_age_seconds=90)
        after = await gen.step()
    finally:
        await gen.aclose()
    assert fault.worker_id == "w-1" and len(fault.leased_task_ids) == 2
    assert fault.worker_id not in after.heartbeats
    assert set((await statuses(data_plane.dsn, fault.leased_task_ids)).values()) == {"running"}
    beat = await redis_client.get(SandboxKeys(data_plane.key_prefix).heartbeat(fault.worker_id))
    assert beat is not None and time.time() * 1000 - int(beat) >= 90_000


async def test_a_worker_lost_during_a_tick_gets_no_heartbeat_from_it(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    """The fault lands after the tick read the lost workers and before it heartbeats: the
    fault's aged heartbeat stays, or the runbook would find the worker alive."""
    gen = generator(data_plane, ["w-1", "w-2"], tasks_per_step=4, lease_per_worker=2)
    read_control = gen._control

    async def fault_mid_tick() -> tuple[Knobs, set[str]]:
        control = await read_control()
        await worker_lost(data_plane, worker_id="w-1", heartbeat_age_seconds=90)
        return control

    try:
        await gen.step()
        gen._control = fault_mid_tick  # type: ignore[method-assign]
        await gen.step()
    finally:
        await gen.aclose()
    keys = SandboxKeys(data_plane.key_prefix)
    lost, alive = await redis_client.mget([keys.heartbeat("w-1"), keys.heartbeat("w-2")])
    assert lost is not None and time.time() * 1000 - int(lost) >= 90_000
    assert alive is not None and time.time() * 1000 - int(alive) < 5_000


async def test_worker_lost_fault_works_on_an_empty_sandbox(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    fault = await worker_lost(data_plane, delete_heartbeat=True, tasks_if_none=3)
    assert fault.heartbeat_age_ms is None
    assert (
        sorted(fault.leased_task_ids) == fault.created_task_ids and len(fault.created_task_ids) == 3
    )
    keys = SandboxKeys(data_plane.key_prefix)
    assert await redis_client.exists(keys.heartbeat(fault.worker_id)) == 0
    assert await redis_client.sismember(keys.lost_workers, fault.worker_id)


async def test_error_spike_fault_raises_the_failure_rate(data_plane: SandboxTarget) -> None:
    fault = await error_spike(data_plane, share=0.3, tasks=50, error="ToolError: crashed")
    rate = await SqlMetrics(data_plane.dsn).failure_rate(window_seconds=300)
    assert (rate.total, rate.failed) == (50, len(fault.failed_task_ids)) == (50, 15)


async def test_cost_spike_fault_makes_the_window_cost_a_multiple_of_normal(
    data_plane: SandboxTarget,
) -> None:
    fault = await cost_spike(data_plane, multiplier=4, tenant="globex", agent_id="coder-1")
    cost = await SqlMetrics(data_plane.dsn).llm_cost(LlmCostRequest())
    assert fault.seeded_history_rows > 0
    assert cost.ratio == pytest.approx(4, rel=0.01)
    assert cost.top_tenants[0].key == "globex" and cost.top_agents[0].key == "coder-1"


async def test_dead_letters_fault_exhausts_retries_and_publishes_each_task(
    data_plane: SandboxTarget, redis_client: "aioredis.Redis"
) -> None:
    fault = await dead_letters(data_plane, count=4, retryable_share=0.5, max_retries=3)
    rows = await fetch(
        data_plane.dsn,
        "SELECT status, retries, max_retries FROM tasks WHERE id = ANY(%s)",
        (fault.task_ids,),
    )
    assert rows == [("dead_letter", 3, 3)] * 4
    entries = await published(redis_client, SandboxKeys(data_plane.key_prefix).dead_letter)
    assert [f["task_id"] for f in entries] == fault.task_ids
    assert [e.retryable for e in fault.entries] == [True, True, False, False]


async def test_metrics_endpoint_exports_heartbeats_task_outcomes_and_cost(
    data_plane: SandboxTarget,
) -> None:
    gen = generator(data_plane, ["w-1", "w-2"], tasks_per_step=2, lease_per_worker=1)
    try:
        await gen.step()
    finally:
        await gen.aclose()
    await worker_lost(data_plane, worker_id="w-2", delete_heartbeat=True)
    app = MetricsApp(data_plane.dsn, data_plane.redis_url, data_plane.key_prefix)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/metrics")
    lines = response.text.splitlines()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'astra_worker_heartbeat_age_seconds{worker_id="w-2"} +Inf' in lines
    assert any(
        line.startswith('astra_worker_heartbeat_age_seconds{worker_id="w-1"} ') for line in lines
    )
    assert 'astra_tasks_total{status="running"} 2' in lines
    assert any(line.startswith("astra_llm_cost_usd_total{tenant=") for line in lines)


async def test_metrics_export_each_shards_backlog_an_idle_shard_as_zero(
    data_plane: SandboxTarget,
) -> None:
    """The shard-imbalance rule compares the busiest shard with the mean: a shard with nothing
    waiting must read 0, not vanish from the mean."""
    async with await psycopg.AsyncConnection.connect(data_plane.dsn) as conn:
        for shard, status, count in [(0, "pending", 3), (0, "running", 1), (2, "pending", 1)]:
            for _ in range(count):
                await conn.execute(
                    "INSERT INTO tasks (id, goal_id, shard, status) VALUES (%s, %s, %s, %s)",
                    (str(uuid.uuid4()), str(uuid.uuid4()), shard, status),
                )
        await conn.execute(
            "INSERT INTO tasks (id, goal_id, shard, status) VALUES (%s, %s, 3, 'succeeded')",
            (str(uuid.uuid4()), str(uuid.uuid4())),
        )
    app = MetricsApp(data_plane.dsn, data_plane.redis_url, data_plane.key_prefix)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        lines = (await c.get("/metrics")).text.splitlines()
    assert [line for line in lines if line.startswith("astra_shard_backlog{")] == [
        'astra_shard_backlog{shard="0"} 4',
        'astra_shard_backlog{shard="1"} 0',
        'astra_shard_backlog{shard="2"} 1',
        'astra_shard_backlog{shard="3"} 0',
    ]
