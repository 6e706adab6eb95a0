"""A load generator that plays Astra against real PostgreSQL and Redis.

The scheduler submits tasks and publishes each to its shard's stream in Redis; workers heartbeat
into Redis and lease, run, fail, retry and dead-letter tasks in PostgreSQL, deleting what they
lease from the streams; agents record LLM usage. Fault injection (``sandbox.faults``)
steers it through knobs kept in Redis rather than in this object, because the CLI that injects a
fault runs in another process than the loop that ``astra-ops dev`` keeps running. Given a
``ClusterView`` it also plays the cluster's side of Astra: the pods that run are the scheduler,
workers and agents that work, each connected to the endpoints ``astra-config`` named when it
started, and the containment knobs (intake pause, budget guard) hold back what they name.
"""

import asyncio
import contextlib
import io
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import redis.asyncio as aioredis
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, Field
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from urllib3.exceptions import HTTPError

from activities.redis_store import AstraKeys, error_class, task_entry
from runtime.astra_config import AstraEndpoints
from runtime.redact import redact
from sandbox.platform import AGENTS, SCHEDULER, WORKERS, ClusterView, PlatformConfig, PlatformView

log = logging.getLogger(__name__)

POSTGRES = "postgres"
REDIS = "redis"
CONNECT_TIMEOUT_SECONDS = 2
# The tick reads the lost workers when it starts and heartbeats when it ends; a worker lost in
# between (a fault) must not get one more heartbeat over the fault's aged one, so the check is
# made again, atomically with the write. KEYS: the lost set, then each heartbeat key; ARGV: the
# time, then each worker id.
HEARTBEAT_UNLESS_LOST = """
for i = 2, #KEYS do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    redis.call('SET', KEYS[i], ARGV[1])
  end
end
"""
"""How long a pod waits for its database or Redis in one tick: an endpoint that does not answer
costs the tick's work, never stalls the platform (libpq's shortest connect timeout is 2 s)."""


async def connect_database(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection as Astra's pods (and the sandbox's /metrics) open one: failing fast."""
    return await psycopg.AsyncConnection.connect(dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS)


def connect_redis(url: str) -> "aioredis.Redis":
    """A Redis client that fails fast: the next tick is the retry, so the client makes none."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=CONNECT_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


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
    """An image that is a bad build: the tasks run by pods that run it fail."""

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
    bad_builds: list[BadBuild] = []
    """Workers whose pods run one of these images fail its share of their tasks: a bad rollout,
    which a rollback (pods of the previous image) cures, or a canary of a bad image, which only
    its canary pods fail and an abort cures. One entry per image."""


async def read_knobs(client: "aioredis.Redis", keys: SandboxKeys) -> Knobs:
    raw = await client.get(keys.knobs)
    return Knobs.model_validate_json(raw) if raw else Knobs()


async def write_knobs(client: "aioredis.Redis", keys: SandboxKeys, knobs: Knobs) -> None:
    await client.set(keys.knobs, knobs.model_dump_json())


async def write_data_marker(client: "aioredis.Redis", keys: AstraKeys) -> None:
    """Provision Redis as Astra's: its data marker, unless it is there (see ``data_marker``)."""
    await client.set(keys.data_marker, int(time.time() * 1000), nx=True)


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

    submitted: list[str] = []
    succeeded: list[str] = []
    failed: list[str] = []
    dead_lettered: list[str] = []
    leased: dict[str, list[str]] = {}
    heartbeats: list[str] = []
    """The workers whose heartbeat reached Redis."""
    llm_calls: int = 0


def _failure(
    draw: float, worker: str, image: str | None, knobs: Knobs, platform: PlatformConfig
) -> str | None:
    """The error a task run by ``worker`` fails with, given one uniform ``draw``; None if it
    succeeds. A paused error class is work Astra holds back rather than runs, so it stops failing.
    """
    causes: list[tuple[float, str]] = []
    if not knobs.stuck_workers or worker in knobs.stuck_workers:
        causes.append((knobs.failure_share, knobs.error))
    causes += [(b.share, b.error) for b in knobs.bad_builds if b.image == image]
    for share, error in causes:
        if draw < share and error_class(error) not in platform.paused_error_classes:
            return error
    return None


@dataclass(frozen=True)
class _Services:
    """The Deployments the generator plays, as connection errors are labelled."""

    scheduler: str
    workers: str
    agents: str

    def dependencies(self) -> list[tuple[str, str]]:
        """Which service reaches which dependency: the series ``connection_errors`` counts."""
        return [
            (self.scheduler, POSTGRES),
            (self.scheduler, REDIS),
            (self.workers, POSTGRES),
            (self.workers, REDIS),
            (self.agents, POSTGRES),
        ]


@dataclass
class _Published:
    """What a database's share of a tick hands to Redis once it has committed."""

    dead_letters: list[dict[str, str]] = field(default_factory=list)
    queued: list[tuple[str, str, int]] = field(default_factory=list)
    """Tasks submitted, (id, goal id, shard): each goes to its shard's stream."""
    taken: dict[int, list[str]] = field(default_factory=dict)
    """Pending tasks leased, by shard: their stream entries are deleted."""
    taken_by: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    """A database's share: the pending tasks each worker leased, by shard (each worker deletes
    them from its own Redis, which ``taken`` of that Redis collects)."""


def _drop_taken_at_once(to: Mapping[str, _Published]) -> None:
    """A task submitted and leased in the same tick never reaches a stream: its entry would be
    added after the worker looked for it to delete."""
    queued = {task for p in to.values() for task, _, _ in p.queued}
    both = {t for p in to.values() for ids in p.taken.values() for t in ids} & queued
    for published in to.values():
        published.queued = [q for q in published.queued if q[0] not in both]
        published.taken = {
            shard: [t for t in ids if t not in both] for shard, ids in published.taken.items()
        }


@dataclass
class _DatabaseShare:
    """The part of a tick that goes to one database: the work of the pods connected to it."""

    submit: bool = False
    workers: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    llm_calls: int = 0
    spike: bool = False
    """Whether the cost spike (if a fault asks for one) is recorded here: by the first agent."""
    pods: Counter[str] = field(default_factory=Counter)
    """Pods per service connected here: the attempts that fail when it does not answer."""


@dataclass(frozen=True)
class _Plan:
    """Where this tick's work goes: the endpoints each running pod connected to."""

    services: _Services
    scheduler: AstraEndpoints | None
    """The lead scheduler's; None when no scheduler runs, and nothing is submitted."""
    workers: Mapping[str, AstraEndpoints]
    agents: list[AstraEndpoints]

    def databases(self, live: list[str], llm_calls: int) -> dict[str, _DatabaseShare]:
        """Each database's share of the tick, the scheduler's database first; LLM calls are
        spread over the agents in turn."""
        shares: dict[str, _DatabaseShare] = {}

        def at(endpoints: AstraEndpoints) -> _DatabaseShare:
            return shares.setdefault(endpoints.database_url, _DatabaseShare())

        if self.scheduler is not None:
            at(self.scheduler).submit = True
            at(self.scheduler).pods[self.services.scheduler] += 1
        for worker, endpoints in sorted(self.workers.items()):
            share = at(endpoints)
            share.workers.append(worker)
            share.pods[self.services.workers] += 1
            if worker in live:
                share.live.append(worker)
        for agent in self.agents:
            at(agent).pods[self.services.agents] += 1
        for call in range(llm_calls if self.agents else 0):
            at(self.agents[call % len(self.agents)]).llm_calls += 1
        if self.agents:
            at(self.agents[0]).spike = True
        return shares

    def redis(self, live: list[str]) -> dict[str, list[str]]:
        """The live workers that heartbeat into each Redis."""
        beating: dict[str, list[str]] = {}
        for worker in live:
            if worker in self.workers:
                beating.setdefault(self.workers[worker].redis_url, []).append(worker)
        return beating


class LoadGenerator:
    """Plays Astra's scheduler, workers and agents, one deterministic tick at a time.

    Given a ``ClusterView``, each running pod of those services connects to the endpoints
    ``astra-config`` named when the generator first saw the pod run, and keeps them for its
    life, as a pod keeps the environment it started with. So changing the config moves no
    traffic; a rolling restart then moves it pod by pod, as the new pods replace the old. A
    generator that starts finds every pod starting with it. Without a cluster, every service uses
    the endpoints the generator was given.

    A database or Redis that does not answer costs the pods using it their work for the tick,
    counted in ``connection_errors``; the next tick tries again, so the platform recovers by
    itself when the endpoint answers again.
    """

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
        self._given = AstraEndpoints(database_url=dsn, redis_url=redis_url)
        self.endpoints = self._given
        """What a pod starting now connects to: ``astra-config``'s endpoints as last read."""
        scheduler, pool, agents = cluster.services if cluster else (SCHEDULER, WORKERS, AGENTS)
        self._services = _Services(scheduler=scheduler, workers=pool, agents=agents)
        self.connection_errors: dict[tuple[str, str], int] = dict.fromkeys(
            self._services.dependencies(), 0
        )
        """Failed attempts to reach a dependency by (service, dependency), one per pod and tick."""
        # Fault injection's knobs live in the Redis the generator was given (the sandbox's own
        # state, not Astra's traffic), so the last ones read stay in force while it is down.
        self._redis = connect_redis(redis_url)
        self._clients: dict[str, aioredis.Redis] = {redis_url: self._redis}
        self._knobs = Knobs()
        self._lost: set[str] = set()
        self._marked = False
        self._started_with: dict[str, AstraEndpoints] = {}  # pod uid -> what it connected to
        self._unreachable: set[str] = set()
        self._rng = random.Random(self.config.seed)
        self._ticks = 0

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def set_workers(self, workers: list[str]) -> None:
        """Follow the sandbox cluster: a replacement pod's worker id is registered next tick."""
        self.workers = sorted(workers)

    async def step(self) -> StepReport:
        """One tick: submit work, let every live worker finish and lease tasks, record LLM calls.

        Database changes commit before anything is published to Redis, so a dead letter on the
        stream always refers to a task that is dead-lettered in PostgreSQL, and a task in a shard
        stream to one that was pending. Work goes to each pod's own endpoints, one transaction per
        database, so pods that a rolling restart has not reached yet keep writing where they did.
        A Redis that does not answer loses what was to be published there: a submitted task
        stays pending in PostgreSQL without its stream entry, as in Astra, until someone
        rebuilds the streams (the redis-failure runbook).
        """
        self._ticks += 1
        knobs, lost = await self._control()
        platform = PlatformConfig()
        images: dict[str, str] = {}
        plan = self._plan(None)
        if self.cluster is not None:
            view = await self.cluster.observe()
            self.set_workers(view.workers)
            platform, images = view.config, view.images
            plan = self._plan(view)
        live = [w for w in self.workers if w not in lost]
        report = StepReport()
        to: dict[str, _Published] = {}
        # A worker takes its tasks from its Redis: while that does not answer, it works on none
        # (it still tries to heartbeat, which is how it finds Redis back).
        working = [w for w in live if plan.workers[w].redis_url not in self._unreachable]
        for dsn, share in plan.databases(working, self.config.llm_calls_per_step).items():
            try:
                async with await connect_database(dsn) as conn, conn.transaction():
                    done, published = await self._database_tick(
                        conn, share, knobs, platform, images
                    )
            except (psycopg.Error, OSError) as err:
                # Refused, cut mid-transaction, or read-only once fenced: the pods' work is lost.
                self._failed(dsn, share.pods, POSTGRES, err)
                continue
            self._answered(dsn)
            report.submitted += done.submitted
            report.succeeded += done.succeeded
            report.failed += done.failed
            report.dead_lettered += done.dead_lettered
            report.leased |= done.leased
            report.llm_calls += done.llm_calls
            for fields in published.dead_letters:
                url = plan.workers[fields["worker_id"]].redis_url
                to.setdefault(url, _Published()).dead_letters.append(fields)
            if published.queued and plan.scheduler is not None:
                to.setdefault(plan.scheduler.redis_url, _Published()).queued += published.queued
            for worker, tasks in published.taken_by.items():
                taken = to.setdefault(plan.workers[worker].redis_url, _Published()).taken
                for shard, ids in tasks.items():
                    taken.setdefault(shard, []).extend(ids)
        _drop_taken_at_once(to)
        beats = plan.redis(live)
        for url in sorted(beats.keys() | to.keys()):
            beating = beats.get(url, [])
            try:
                await self._publish(self._client(url), beating, to.get(url, _Published()))
            except (aioredis.RedisError, OSError) as err:
                pods = {self._services.workers: len(beating)}
                if url in to and to[url].queued:
                    pods[self._services.scheduler] = 1
                self._failed(url, pods, REDIS, err)
                continue
            self._answered(url)
            report.heartbeats += beating
        report.heartbeats.sort()
        return report

    async def _publish(
        self, client: "aioredis.Redis", beating: list[str], published: _Published
    ) -> None:
        """One Redis's share of the tick: heartbeats, dead letters, new tasks on their shard
        streams, and the entries of leased tasks deleted (found by task id: a worker knows the
        task it took, and a stream of pending tasks stays short)."""
        entries: dict[int, list[str]] = {}
        if published.taken:
            async with client.pipeline(transaction=False) as pipe:
                for shard in published.taken:
                    pipe.xrange(self.keys.task_stream(shard))
                streams = await pipe.execute()
            for (shard, ids), stream in zip(published.taken.items(), streams, strict=True):
                wanted = set(ids)
                entries[shard] = [entry for entry, f in stream if f.get("task_id") in wanted]
        now_ms = int(time.time() * 1000)
        async with client.pipeline(transaction=False) as pipe:
            if beating:
                heartbeats = [self.keys.heartbeat(worker) for worker in beating]
                pipe.eval(
                    HEARTBEAT_UNLESS_LOST,
                    1 + len(beating),
                    self.keys.lost_workers,
                    *heartbeats,
                    str(now_ms),
                    *beating,
                )
            for fields in published.dead_letters:
                pipe.xadd(self.keys.dead_letter, fields)  # type: ignore[arg-type]
            for task_id, goal_id, shard in published.queued:
                pipe.xadd(self.keys.task_stream(shard), task_entry(task_id, goal_id))  # type: ignore[arg-type]
            for shard, found in entries.items():
                if found:
                    pipe.xdel(self.keys.task_stream(shard), *found)
            await pipe.execute()

    async def _control(self) -> tuple[Knobs, set[str]]:
        """Fault injection's knobs and lost workers; the data marker once Redis first answers.

        The generator provisions the Redis it was given when it first reaches it, as Astra does
        when it is deployed: a loss before it starts goes unseen, every loss after is reported.
        """
        try:
            if not self._marked:
                await write_data_marker(self._redis, self.keys)
                self._marked = True
            self._knobs = await read_knobs(self._redis, self.keys)
            self._lost = cast(set[str], await self._redis.smembers(self.keys.lost_workers))
        except (aioredis.RedisError, OSError):
            pass  # the workers' heartbeats count the outage; the last knobs stay in force
        return self._knobs, self._lost

    def _plan(self, view: PlatformView | None) -> _Plan:
        """Bind each pod seen for the first time to the endpoints the config names now."""
        services = self._services
        if view is None:
            given = self._given
            return _Plan(services, given, dict.fromkeys(self.workers, given), [given])
        self.endpoints = AstraEndpoints(
            database_url=view.database_url or self._given.database_url,
            redis_url=view.redis_url or self._given.redis_url,
        )
        running = {pod.uid for pod in view.running}
        for gone in self._started_with.keys() - running:
            del self._started_with[gone]
        for started in running - self._started_with.keys():
            self._started_with[started] = self.endpoints
        schedulers = view.pods.get(services.scheduler, [])
        return _Plan(
            services,
            self._started_with[schedulers[0].uid] if schedulers else None,
            {pod.name: self._started_with[pod.uid] for pod in view.pods.get(services.workers, [])},
            [self._started_with[pod.uid] for pod in view.pods.get(services.agents, [])],
        )

    def _client(self, url: str) -> "aioredis.Redis":
        if url not in self._clients:
            self._clients[url] = connect_redis(url)
        return self._clients[url]

    def _failed(
        self, endpoint: str, pods: Mapping[str, int], dependency: str, err: Exception
    ) -> None:
        for service, count in pods.items():
            key = (service, dependency)
            self.connection_errors[key] = self.connection_errors.get(key, 0) + count
        if endpoint not in self._unreachable:
            self._unreachable.add(endpoint)
            log.warning(
                "%s at %s does not answer (%s); the pods connected to it try again every tick",
                dependency,
                redact(endpoint),
                redact(str(err).strip()),
            )

    def _answered(self, endpoint: str) -> None:
        if endpoint in self._unreachable:
            self._unreachable.discard(endpoint)
            log.warning("%s answers again; the pods connected to it work again", redact(endpoint))

    async def _database_tick(
        self,
        conn: psycopg.AsyncConnection[Any],
        share: _DatabaseShare,
        knobs: Knobs,
        platform: PlatformConfig,
        images: dict[str, str],
    ) -> tuple[StepReport, _Published]:
        """One database's share of the tick, in one transaction; what it did and what to
        publish to Redis once it has committed."""
        done = StepReport()
        published = _Published()
        if share.workers:
            await conn.execute(
                "INSERT INTO workers (id, pool) SELECT unnest(%s::text[]), %s"
                " ON CONFLICT (id) DO NOTHING",
                (share.workers, self.config.pool),
            )
        if share.submit:
            published.queued = await self._submit(conn)
            done.submitted = [task_id for task_id, _, _ in published.queued]
        # Who leases first takes turns, tick by tick: while there are fewer tasks than the
        # workers could take, each still gets its share (a canary pod its replicas' share),
        # whatever its name sorts as.
        turn = self._ticks % len(share.live) if share.live else 0
        for worker in share.live[turn:] + share.live[:turn]:
            published.dead_letters += await self._finish(
                conn, worker, images.get(worker), knobs, platform, done
            )
            leased = await self._lease(conn, worker)
            done.leased[worker] = sorted(task_id for task_id, _, _ in leased)
            for task_id, shard, was_pending in leased:
                if was_pending:
                    published.taken_by.setdefault(worker, {}).setdefault(shard, []).append(task_id)
        if share.llm_calls or share.spike:
            done.llm_calls = await self._record_llm_calls(
                conn, knobs, platform, share.llm_calls, share.spike
            )
        return done, published

    async def run(self, interval: float = 1.0, stop: asyncio.Event | None = None) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set.

        A tick survives PostgreSQL or Redis going away (``step`` counts it); one that cannot read
        the sandbox cluster is logged and the loop goes on, as Astra keeps running when its
        control plane does not answer.
        """
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.step()
            except (ApiException, HTTPError, OSError) as err:
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
            await psycopg.AsyncConnection.connect(self._given.database_url) as conn,
            conn.cursor() as cur,
            cur.copy(
                "COPY llm_usage (ts, agent_id, tenant, model, tokens, cost_usd) FROM STDIN"
            ) as copy,
        ):
            await copy.write(buffer.getvalue())
        return rows

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    async def _submit(self, conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str, int]]:
        """New pending tasks of one goal: (id, goal id, shard) of each."""
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
        return [(task_id, goal, shard) for task_id, goal, shard, _ in rows]

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

    async def _lease(
        self, conn: psycopg.AsyncConnection[Any], worker: str
    ) -> list[tuple[str, int, bool]]:
        """Lease tasks for ``worker``: (id, shard, whether it was pending) of each. A failed task
        waiting for its retry is leased from PostgreSQL alone: only pending tasks are queued."""
        rows = await (
            await conn.execute(
                "WITH taken AS (SELECT id, status = 'pending' AS was_pending FROM tasks"
                "   WHERE status = 'pending'"
                "   OR (status = 'failed' AND updated_at <= now() - make_interval(secs => %s))"
                "   ORDER BY updated_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE tasks SET status = 'running', worker_id = %s, updated_at = now()"
                " FROM taken WHERE tasks.id = taken.id"
                " RETURNING tasks.id, tasks.shard, taken.was_pending",
                (self.config.retry_delay_seconds, self.config.lease_per_worker, worker),
            )
        ).fetchall()
        return [(str(task_id), int(shard), bool(pending)) for task_id, shard, pending in rows]

    async def _record_llm_calls(
        self,
        conn: psycopg.AsyncConnection[Any],
        knobs: Knobs,
        platform: PlatformConfig,
        calls: int,
        spike: bool,
    ) -> int:
        cfg = self.config
        rows: list[tuple[str, str, str, int, float]] = []
        for _ in range(calls):
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
        if (
            spike
            and spiking
            and knobs.cost_multiplier > 1
            and not platform.budget_guard.covers(spiking)
        ):
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
