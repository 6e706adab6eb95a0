"""Requeueing a lost worker's 100k leased tasks: the activity against one plain UPDATE.

The plain ``UPDATE ... WHERE worker_id = $1 AND status = 'running'`` is the physical limit: one
statement, no batches, no bookkeeping. The activity (``PostgresActivities.requeue_lost_worker``,
run in Temporal's ActivityEnvironment) adds what a runbook needs: bounded batches each committed
and heartbeated, the leased-before cutoff, and a row per task in ``astra_ops_requeues`` for the
verify step. Both run on the same freshly loaded table in a scratch database (dropped after);
peak memory is the Python heap during the call (tracemalloc).

    .venv/bin/python bench/requeue.py [--tasks 100000] [--batch-size 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import psycopg
from harness import scratch_database
from temporalio.testing import ActivityEnvironment

from activities.postgres import PostgresActivities, RequeueLostWorker

LOST = "astra-worker-lost"


async def load(dsn: str, tasks: int) -> None:
    """``tasks`` running tasks leased by the lost worker, beside as many finished ones."""
    rows = io.StringIO()
    for i in range(tasks):
        rows.write(f"lost-{i:07d}\tgoal-{i % 1000}\t{i % 8}\trunning\t{LOST}\n")
        rows.write(f"done-{i:07d}\tgoal-{i % 1000}\t{i % 8}\tsucceeded\tastra-worker-live\n")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("INSERT INTO workers (id) VALUES (%s)", (LOST,))
        async with (
            conn.cursor() as cur,
            cur.copy("COPY tasks (id, goal_id, shard, status, worker_id) FROM STDIN") as copy,
        ):
            await copy.write(rows.getvalue())


async def lease_back(dsn: str) -> None:
    """Put the tasks back in the lost worker's hands, and clean up, between measurements."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE tasks SET status = 'running', worker_id = %s, updated_at = now() - interval"
            " '1 minute' WHERE id LIKE 'lost-%%'",
            (LOST,),
        )
        await conn.execute("TRUNCATE astra_ops_requeues")
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE astra_ops_requeues")


async def measure(run: Callable[[], Awaitable[int]]) -> tuple[int, float, int]:
    """Rows changed, seconds, and peak Python heap bytes of one call."""
    tracemalloc.start()
    started = time.perf_counter()
    rows = await run()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return rows, elapsed, peak


async def main(tasks: int, batch_size: int, repeat: int) -> None:
    async with scratch_database() as dsn:
        await load(dsn, tasks)
        activities = PostgresActivities(dsn)
        env = ActivityEnvironment()

        async def activity() -> int:
            result = await env.run(
                activities.requeue_lost_worker,
                RequeueLostWorker(
                    worker_id=LOST,
                    leased_before=datetime.now(UTC),
                    batch_size=batch_size,
                    token=f"bench/{uuid.uuid4()}/requeue",
                ),
            )
            return result.requeued

        async def plain_update() -> int:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute(
                    "UPDATE tasks SET status = 'pending', worker_id = NULL, updated_at = now()"
                    " WHERE worker_id = %s AND status = 'running'",
                    (LOST,),
                )
                return cur.rowcount

        best: dict[str, tuple[int, float, int]] = {}
        for _ in range(repeat):
            for label, run in (("activity", activity), ("plain UPDATE", plain_update)):
                await lease_back(dsn)
                rows, seconds, peak = await measure(run)
                assert rows == tasks, f"{label} requeued {rows} of {tasks}"
                if label not in best or seconds < best[label][1]:
                    best[label] = (rows, seconds, peak)

    print(f"requeue of {tasks} leased tasks (batch {batch_size}; best of {repeat}):")
    for label, (rows, seconds, peak) in best.items():
        print(
            f"  {label:13} {rows / seconds:>10,.0f} rows/s  {seconds:7.3f} s"
            f"  peak heap {peak / 1024:8.1f} KiB"
        )
    ratio = best["activity"][1] / best["plain UPDATE"][1]
    print(f"  activity / plain UPDATE time ratio: {ratio:.2f}x (plain UPDATE is the limit)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.batch_size, args.repeat))
