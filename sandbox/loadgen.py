"""A load generator that plays Astra against real PostgreSQL and Redis.

Workers heartbeat into Redis and lease, run, fail, retry and dead-letter tasks in PostgreSQL;
agents record LLM usage. Fault injection (``sandbox.faults``) steers it through knobs kept in
Redis rather than in this object, because the CLI that injects a fault runs in another process
than the loop that ``astra-ops dev`` keeps running. Given a ``ClusterView`` it also plays the
cluster's side of Astra: the worker pods that run are the workers that heartbeat, and the
containment knobs of ``astra-config`` (intake pause, budget guard) hold back what they name.
"""

import asyncio
import contextlib
import io
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from activities.redis_store import AstraKeys, error_class
from sandbox.platform import ClusterView, PlatformConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxKeys(AstraKeys):
    """Astra's keys plus the sandbox's own knobs, under the same prefix so ``reset`` clears both."""

    @property
    def knobs(self) -> str:
        """JSON of ``Knobs``: what fault injection currently asks of the load generator."""
        return f"{self.prefix}sandbox:knobs"

    @property
    def lost_workers(self) -> str:
        """A set of worker ids that stopped heartbeating and keep their leased tasks."""
        return f"{self.prefix}sandbox:lost_workers"


class BadBuild(BaseModel):
    """A bad image rolled out to the worker pool: the tasks its pods run fail."""

    image: str
    share: float = Field(gt=0, le=1)
    error: str


class Knobs(BaseModel):
    """The behaviour faults change while the load generator runs."""

    failure_share: float = Field(default=0.0, ge=0, le=1)
    error: str = "TimeoutError: upstream timed out"
    cost_multiplier: float = Field(default=1.0, gt=0)
    spike_tenant: str | None = None
    spike_agent_id: str | None = None
    spike_model: str | None = None
    stuck_workers: list[str] = []
    """When set, only these workers fail tasks: a stuck pool that a restart (new pods) cures."""
    bad_build: BadBuild | None = None
    """Workers whose pods run this image fail a share of their tasks: a bad rollout, which a
    rollback (pods of the previous image) cures."""


async def read_knobs(client: "aioredis.Redis", keys: SandboxKeys) -> Knobs:
    raw = await client.get(keys.knobs)
    return Knobs.model_validate_json(raw) if raw else Knobs()


async def write_knobs(client: "aioredis.Redis", keys: SandboxKeys, knobs: Knobs) -> None:
    await client.set(keys.knobs, knobs.model_dump_json())


class Agent(BaseModel):
    agent_id: str
    tenant: str
    model: str


class LoadConfig(BaseModel):
    """The steady state the load generator plays; faults perturb it through ``Knobs``."""

    pool: str = "astra-worker"
    shards: int = Field(default=4, gt=0)
    tasks_per_step: int = Field(default=4, ge=0)
    lease_per_worker: int = Field(default=2, ge=0)
    max_retries: int = Field(default=3, ge=0)
    retry_delay_seconds: float = Field(default=10.0, ge=0)
    """Backoff before a failed task is leased again; keeps failures visible to a windowed rate."""
    llm_calls_per_step: int = Field(default=3, ge=0)
    cost_per_call_usd: float = Field(default=0.002, ge=0)
    tokens_per_call: int = Field(default=800, ge=0)
    agents: list[Agent] = Field(
        default_factory=lambda: [
            Agent(agent_id="planner-1", tenant="acme", model="gpt-4o-mini"),
            Agent(agent_id="researcher-1", tenant="acme", model="gpt-4o-mini"),
            Agent(agent_id="coder-1", tenant="globex", model="claude-3-haiku"),
            Agent(agent_id="support-1", tenant="initech", model="gpt-4o-mini"),
        ],
        min_length=1,
    )
    seed: int | None = None
    """Seed for task ids and failure draws; set it for reproducible runs (tests, game days)."""


class StepReport(BaseModel):
    """What one tick did, so tests and the CLI can follow tasks through their states."""

    submitted: list[str]
    succeeded: list[str]
    failed: list[str]
    dead_lettered: list[str]
    leased: dict[str, list[str]]
    heartbeats: list[str]
    llm_calls: int


def _failure(
    draw: float, worker: str, image: str | None, knobs: Knobs, platform: PlatformConfig
) -> str | None:
    """The error a task run by ``worker`` fails with, given one uniform ``draw``; None if it
    succeeds. A paused error class is work Astra holds back rather than runs, so it stops failing.
    """
    causes: list[tuple[float, str]] = []
    if not knobs.stuck_workers or worker in knobs.stuck_workers:
        causes.append((knobs.failure_share, knobs.error))
    if knobs.bad_build is not None and image == knobs.bad_build.image:
        causes.append((knobs.bad_build.share, knobs.bad_build.error))
    for share, error in causes:
        if draw < share and error_class(error) not in platform.paused_error_classes:
            return error
    return None


class LoadGenerator:
    """Plays Astra's workers and agents, one deterministic tick at a time."""

    def __init__(
        self,
        dsn: str,
        redis_url: str,
        workers: list[str],
        config: LoadConfig | None = None,
        key_prefix: str = "astra:",
        cluster: ClusterView | None = None,
    ) -> None:
        self.config = config or LoadConfig()
        self.cluster = cluster
        self.keys = SandboxKeys(key_prefix)
        self.workers = sorted(workers)
        self._dsn = dsn
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._rng = random.Random(self.config.seed)

    async def aclose(self) -> None:
        await self._redis.aclose()

    def set_workers(self, workers: list[str]) -> None:
        """Follow the sandbox cluster: a replacement pod's worker id is registered next tick."""
        self.workers = sorted(workers)

    async def step(self) -> StepReport:
        """One tick: submit work, let every live worker finish and lease tasks, record LLM calls.

        Database changes commit before anything is published to Redis, so a dead letter on the
        stream always refers to a task that is dead-lettered in PostgreSQL.
        """
        knobs = await read_knobs(self._redis, self.keys)
        platform = PlatformConfig()
        images: dict[str, str] = {}
        if self.cluster is not None:
            view = await self.cluster.observe()
            self.set_workers(view.workers)
            platform, images = view.config, view.images
        lost = await self._redis.smembers(self.keys.lost_workers)
        live = [w for w in self.workers if w not in lost]
        report = StepReport(
            submitted=[],
            succeeded=[],
            failed=[],
            dead_lettered=[],
            leased={},
            heartbeats=live,
            llm_calls=0,
        )
        dead_letters: list[dict[str, str]] = []
        async with await psycopg.AsyncConnection.connect(self._dsn) as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO workers (id, pool) SELECT unnest(%s::text[]), %s"
                " ON CONFLICT (id) DO NOTHING",
                (self.workers, self.config.pool),
            )
            report.submitted = await self._submit(conn)
            for worker in live:
                dead_letters += await self._finish(
                    conn, worker, images.get(worker), knobs, platform, report
                )
                report.leased[worker] = await self._lease(conn, worker)
            report.llm_calls = await self._record_llm_calls(conn, knobs, platform)
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker in live:
                pipe.set(self.keys.heartbeat(worker), now_ms)
            for fields in dead_letters:
                pipe.xadd(self.keys.dead_letter, fields)  # type: ignore[arg-type]
            await pipe.execute()
        return report

    async def run(self, interval: float = 1.0, stop: asyncio.Event | None = None) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set.

        A failing tick is logged and the loop goes on: game days take PostgreSQL or Redis away on
        purpose, and Astra keeps trying too.
        """
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.step()
            except (psycopg.Error, aioredis.RedisError, OSError) as err:
                log.warning("load generator tick failed, trying again next tick: %s", err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    async def seed_history(
        self, days: float = 1.0, step_interval: float = 1.0, bucket_seconds: float = 60.0
    ) -> int:
        """Write a trailing history of LLM usage at the steady rate of ``run(step_interval)``.

        Gives the cost-spike runbook a daily average to compare with; one row per agent call
        slot per bucket keeps a day to a few thousand rows. Returns the rows written.
        """
        cfg = self.config
        steps_per_bucket = bucket_seconds / step_interval
        cost = cfg.cost_per_call_usd * steps_per_bucket
        tokens = round(cfg.tokens_per_call * steps_per_bucket)
        now = datetime.now(UTC)
        buckets = int(days * 86_400 / bucket_seconds)
        rows = 0
        buffer = io.StringIO()
        for b in range(1, buckets + 1):
            ts = now - timedelta(seconds=b * bucket_seconds)
            for c in range(cfg.llm_calls_per_step):
                agent = cfg.agents[(b * cfg.llm_calls_per_step + c) % len(cfg.agents)]
                buffer.write(
                    f"{ts.isoformat()}\t{agent.agent_id}\t{agent.tenant}\t{agent.model}"
                    f"\t{tokens}\t{cost:.6f}\n"
                )
                rows += 1
        async with (
            await psycopg.AsyncConnection.connect(self._dsn) as conn,
            conn.cursor() as cur,
            cur.copy(
                "COPY llm_usage (ts, agent_id, tenant, model, tokens, cost_usd) FROM STDIN"
            ) as copy,
        ):
            await copy.write(buffer.getvalue())
        return rows

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    async def _submit(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        goal_id = self._new_id()
        rows = [
            (
                self._new_id(),
                goal_id,
                self._rng.randrange(self.config.shards),
                self.config.max_retries,
            )
            for _ in range(self.config.tasks_per_step)
        ]
        if rows:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO tasks (id, goal_id, shard, max_retries) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    rows,
                )
        return [r[0] for r in rows]

    async def _finish(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker: str,
        image: str | None,
        knobs: Knobs,
        platform: PlatformConfig,
        report: StepReport,
    ) -> list[dict[str, str]]:
        """Complete or fail what ``worker`` (running ``image``) leased last tick; return the dead
        letters to publish.
        """
        rows = await (
            await conn.execute(
                "SELECT id, retries, max_retries, shard FROM tasks"
                " WHERE worker_id = %s AND status = 'running' ORDER BY id",
                (worker,),
            )
        ).fetchall()
        dead_letters: list[dict[str, str]] = []
        for task_id, retries, max_retries, shard in rows:
            error = _failure(self._rng.random(), worker, image, knobs, platform)
            if error is None:
                await conn.execute(
                    "UPDATE tasks SET status = 'succeeded', updated_at = now() WHERE id = %s",
                    (task_id,),
                )
                report.succeeded.append(str(task_id))
            elif retries >= max_retries:
                # Astra's FailTask: retries >= max_retries is final.
                await conn.execute(
                    "UPDATE tasks SET status = 'dead_letter', last_error = %s, updated_at = now()"
                    " WHERE id = %s",
                    (error, task_id),
                )
                report.dead_lettered.append(str(task_id))
                dead_letters.append(
                    {
                        "task_id": str(task_id),
                        "error": error,
                        "retries": str(retries),
                        "shard": str(shard),
                        "worker_id": worker,
                    }
                )
            else:
                # The worker id stays on a failed task so triage can see who failed it.
                await conn.execute(
                    "UPDATE tasks SET status = 'failed', retries = retries + 1, last_error = %s,"
                    " updated_at = now() WHERE id = %s",
                    (error, task_id),
                )
                report.failed.append(str(task_id))
        return dead_letters

    async def _lease(self, conn: psycopg.AsyncConnection[Any], worker: str) -> list[str]:
        rows = await (
            await conn.execute(
                "UPDATE tasks SET status = 'running', worker_id = %s, updated_at = now()"
                " WHERE id IN (SELECT id FROM tasks WHERE status = 'pending'"
                "   OR (status = 'failed' AND updated_at <= now() - make_interval(secs => %s))"
                "   ORDER BY updated_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING id",
                (worker, self.config.retry_delay_seconds, self.config.lease_per_worker),
            )
        ).fetchall()
        return sorted(str(r[0]) for r in rows)

    async def _record_llm_calls(
        self, conn: psycopg.AsyncConnection[Any], knobs: Knobs, platform: PlatformConfig
    ) -> int:
        cfg = self.config
        rows: list[tuple[str, str, str, int, float]] = []
        for _ in range(cfg.llm_calls_per_step):
            agent = self._rng.choice(cfg.agents)
            rows.append(
                (
                    agent.agent_id,
                    agent.tenant,
                    agent.model,
                    cfg.tokens_per_call,
                    cfg.cost_per_call_usd,
                )
            )
        spiking = knobs.spike_agent_id
        if spiking and knobs.cost_multiplier > 1 and not platform.budget_guard.covers(spiking):
            # One extra call carries the spike, so the window costs ``cost_multiplier`` x normal
            # and the offending tenant, agent and model top the ranking; a budget guard on the
            # agent (a cap, or a route to a cheaper model) takes it back to its normal spend.
            extra = cfg.cost_per_call_usd * cfg.llm_calls_per_step * (knobs.cost_multiplier - 1)
            rows.append(
                (
                    spiking,
                    knobs.spike_tenant or "unknown",
                    knobs.spike_model or "unknown",
                    cfg.tokens_per_call,
                    extra,
                )
            )
        if rows:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO llm_usage (agent_id, tenant, model, tokens, cost_usd)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    rows,
                )
        return len(rows)
