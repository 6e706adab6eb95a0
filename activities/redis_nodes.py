"""Activities on the data plane's Redis servers, named as the topology names them: what each
server is, what Sentinel says, what Redis lost against PostgreSQL, and the repairs.

Astra's Redis holds no truth of its own: the shard streams and the dead-letter stream are views
of PostgreSQL's ``tasks``, and heartbeats are rewritten every few seconds. So a lost Redis is
rebuilt from PostgreSQL, never restored from another Redis. The topology file is read on every
call (``runtime/data_plane.py``), so workflows name servers and never hold an address.

Two rules make the rebuild and the checks safe beside a platform that keeps running:

- A task is expected on its stream only once it has been pending for ``publish_grace_seconds``:
  Astra commits a task, then publishes it, and a rebuild that also published it in between
  would queue it twice. Astra publishes a task when it becomes pending, never later, so a task
  older than the grace and missing from its stream was lost and is Astra's to get back from us.
- A rebuild holds a share lock on each batch of pending rows while it publishes them: a worker
  leasing one of them (``FOR UPDATE SKIP LOCKED``) skips it until the batch is on the stream,
  so the worker's delete of its entry never runs before the entry exists.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, LiteralString, cast
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import beat, heartbeating
from activities.mutation import Mutation, MutationResult
from activities.postgres import AstraDatabase
from activities.redis_store import AstraKeys, live_workers, task_entry
from runtime.data_plane import DataPlaneTopology, NodeName, RedisNode
from runtime.redact import redact

if TYPE_CHECKING:
    import psycopg
    import redis.asyncio as aioredis

CHECK_TIMEOUT_SECONDS = 2.0
"""How long a check waits for one server: a server that takes longer is down for a runbook."""
ACTION_TIMEOUT_SECONDS = 30.0
"""How long one command of a repair may take (a batch of XADDs, a long XRANGE)."""
STREAM_PAGE = 1_000
"""Entries read per XRANGE call when reading a whole stream."""
SAMPLE = 5

Role = Literal["primary", "replica"]


class SurveyRequest(BaseModel):
    timeout_seconds: float = Field(default=CHECK_TIMEOUT_SECONDS, gt=0, le=30)


class NodeState(BaseModel):
    """One Redis server as a check found it."""

    name: str
    reachable: bool
    error: str = ""
    role: Role | None = None
    follows: str | None = None
    """For a replica: the server it replicates from, by topology name (else its address)."""
    link_up: bool | None = None
    """For a replica: whether its link to that server is up."""
    offset: int | None = None
    """The replication offset: how much of the primary's stream of writes it holds."""
    persistence: str = ""
    persistence_ok: bool | None = None
    """Whether its last AOF write and its last RDB save succeeded."""
    marker: bool | None = None
    """Whether it holds Astra's data marker (``AstraKeys.data_marker``)."""

    def summary(self) -> str:
        if not self.reachable:
            return f"{self.name}: unreachable ({self.error})"
        role = f"replica of {self.follows} (link {'up' if self.link_up else 'down'})"
        return (
            f"{self.name}: {role if self.role == 'replica' else 'primary'}, offset {self.offset}, "
            f"{self.persistence}, marker {'present' if self.marker else 'MISSING'}"
        )


class SentinelView(BaseModel):
    asked: int
    answered: int
    primary: str | None
    """The server most answering Sentinels name as primary (topology name, else address)."""


class RedisSurvey(BaseModel):
    nodes: list[NodeState]
    sentinel: SentinelView | None = None
    """None when the topology lists no Sentinels."""

    def node(self, name: str) -> NodeState | None:
        return next((n for n in self.nodes if n.name == name), None)

    def primaries(self) -> list[str]:
        """The servers that answer and accept writes."""
        return [n.name for n in self.nodes if n.reachable and n.role == "primary"]

    def best_replica(self, besides: str | None) -> NodeState | None:
        """The reachable replica holding the most of the primary's writes (highest offset)."""
        replicas = [
            n for n in self.nodes if n.reachable and n.role == "replica" and n.name != besides
        ]
        return max(replicas, key=lambda n: (n.offset or 0, n.name), default=None)

    def summary(self) -> str:
        lines = [n.summary() for n in self.nodes]
        if self.sentinel is not None:
            lines.append(
                f"Sentinel ({self.sentinel.answered}/{self.sentinel.asked} answered): primary "
                f"{self.sentinel.primary or 'unknown'}"
            )
        return "; ".join(lines)


class StreamCheck(BaseModel):
    node: NodeName
    publish_grace_seconds: float = Field(default=2, ge=0, le=3_600)


class ShardStream(BaseModel):
    shard: int
    pending: int
    """Tasks pending in PostgreSQL for longer than the grace: each must be on the stream."""
    entries: int
    missing: int
    duplicated: int
    """Tasks with more than one entry on the stream."""
    stale: int
    """Entries of tasks no longer pending (a worker took them; Astra skips such entries)."""


class StreamReport(BaseModel):
    node: str
    shards: list[ShardStream]
    dead_letter_rows: int
    dead_letters_missing: int
    marker: bool
    missing_sample: list[str] = []
    duplicated_sample: list[str] = []

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.shards)

    @property
    def duplicated(self) -> int:
        return sum(s.duplicated for s in self.shards)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.shards)

    @property
    def lost(self) -> bool:
        """Whether Redis lost anything PostgreSQL can give back."""
        return not self.marker or self.missing > 0 or self.dead_letters_missing > 0

    def summary(self) -> str:
        return (
            f"{self.node}: {self.missing} of {self.pending} pending tasks missing from their "
            f"streams, {self.duplicated} queued twice; {self.dead_letters_missing} of "
            f"{self.dead_letter_rows} dead letters missing; data marker "
            f"{'present' if self.marker else 'MISSING'}"
        )


class Promote(Mutation):
    node: NodeName


class SentinelFailover(Mutation):
    away_from: NodeName
    """The primary being replaced: the failover is done once Sentinel names another."""
    timeout_seconds: float = Field(default=60, gt=0, le=3_600)


class Promotion(MutationResult):
    node: str
    """The server that is (in dry-run: would likely be) the primary."""


class RebuildStreams(Mutation):
    node: NodeName
    publish_grace_seconds: float = Field(default=2, ge=0, le=3_600)
    batch_size: int = Field(default=1_000, gt=0, le=100_000)


class Rebuild(MutationResult):
    requeued: int
    """Pending tasks put back on their streams (in dry-run: that would be)."""
    stale: int
    """Entries deleted because their task is no longer pending: a worker took it while its
    delete could not reach this server (the old primary was down)."""
    dead_letters: int
    """Dead letters put back on the dead-letter stream."""
    batches: int


class RestoreMarker(Mutation):
    node: NodeName
    publish_grace_seconds: float = Field(default=2, ge=0, le=3_600)


class NodeWorkers(BaseModel):
    node: NodeName
    threshold_seconds: float = Field(default=30, gt=0)
    since: datetime | None = None
    """Count only heartbeats at or after this (a restart): one written before a failover, and
    replicated, says nothing of the workers now."""


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def _client(url: str, timeout: float) -> aioredis.Redis:
    """A client that gives up after ``timeout`` and makes no retries of its own: the activity's
    retry policy is the retry, and a check must not hang on a dead server."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _persistence(info: dict[str, Any]) -> tuple[str, bool]:
    aof = int(info.get("aof_enabled", 0)) == 1
    aof_ok = info.get("aof_last_write_status", "ok") == "ok"
    rdb_ok = info.get("rdb_last_bgsave_status", "ok") == "ok"
    text = (
        f"AOF on (last write {'ok' if aof_ok else 'FAILED'})"
        if aof
        else "AOF off: a restart keeps only the last RDB save"
    )
    if not rdb_ok:
        text += ", last RDB save FAILED"
    return text, aof_ok and rdb_ok


async def _stream_tasks(client: aioredis.Redis, key: str) -> Counter[str]:
    """How many entries each task has on a stream."""
    return Counter({task: len(ids) for task, ids in (await _stream_entries(client, key)).items()})


async def _stream_entries(client: aioredis.Redis, key: str) -> dict[str, list[str]]:
    """The entry ids of each task on a stream, read a page at a time."""
    entries: dict[str, list[str]] = {}
    start = "-"
    while True:
        # decode_responses=True: ids and fields are str, whatever the client's union types say.
        page = cast(
            list[tuple[str, dict[str, str]]],
            await client.xrange(key, min=start, max="+", count=STREAM_PAGE),
        )
        for entry_id, fields in page:
            entries.setdefault(fields.get("task_id", ""), []).append(entry_id)
        if len(page) < STREAM_PAGE:
            return entries
        start = f"({page[-1][0]}"


async def _batches(
    conn: psycopg.AsyncConnection[Any],
    status: str,
    columns: LiteralString,
    where: LiteralString,
    params: tuple[Any, ...],
    size: int,
    *,
    lock: bool,
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Rows of ``tasks`` in ``status`` in id order, ``size`` at a time, each batch in its own
    transaction (share-locked while the caller handles it, with ``lock``)."""
    last = ""
    while True:
        async with conn.transaction():
            rows = await (
                await conn.execute(
                    f"SELECT id, {columns} FROM tasks WHERE status = %s AND id > %s {where}"
                    f" ORDER BY id LIMIT %s{' FOR SHARE' if lock else ''}",
                    (status, last, *params, size),
                )
            ).fetchall()
            if not rows:
                return
            yield rows
        last = rows[-1][0]


class RedisNodeActivities:
    """Checks and repairs of the topology's Redis servers, with PostgreSQL (Astra's database, as
    ``PostgresActivities`` reads it) as the source of truth."""

    def __init__(
        self, topology: Path | None, database_url: str, key_prefix: str = "astra:"
    ) -> None:
        self.topology_file = topology
        self.database = AstraDatabase(database_url, topology)
        self.keys = AstraKeys(key_prefix)

    def _topology(self) -> DataPlaneTopology:
        return DataPlaneTopology.load(self.topology_file)

    def _named(self, topology: DataPlaneTopology, host: str, port: int) -> str:
        for node in topology.redis:
            if _address(node.url) == (host, port):
                return node.name
        return f"{host}:{port}"

    # -- checks --------------------------------------------------------------------------------

    @activity.defn
    async def survey(self, req: SurveyRequest) -> RedisSurvey:
        """Every server's reachability, role, replication offset, persistence and data marker,
        and Sentinel's view where Sentinels are configured; each with a short timeout."""
        topology = self._topology()
        async with heartbeating("asking the Redis servers and Sentinels"):
            nodes = await asyncio.gather(
                *(self._state(topology, node, req.timeout_seconds) for node in topology.redis)
            )
            sentinel = (
                await self._sentinel_view(topology, req.timeout_seconds)
                if topology.sentinels
                else None
            )
        return RedisSurvey(nodes=list(nodes), sentinel=sentinel)

    async def _state(
        self, topology: DataPlaneTopology, node: RedisNode, patience: float
    ) -> NodeState:
        from redis.exceptions import RedisError

        client = _client(node.url, patience)
        try:
            info = await client.info()
            marker = bool(await client.exists(self.keys.data_marker))
        except (RedisError, OSError) as err:
            return NodeState(name=node.name, reachable=False, error=redact(str(err)) or "no answer")
        finally:
            await client.aclose()
        persistence, persistence_ok = _persistence(info)
        state = NodeState(
            name=node.name,
            reachable=True,
            persistence=persistence,
            persistence_ok=persistence_ok,
            marker=marker,
        )
        if info.get("role") == "slave":
            state.role = "replica"
            state.follows = self._named(
                topology, str(info["master_host"]), int(info["master_port"])
            )
            state.link_up = info.get("master_link_status") == "up"
            state.offset = int(info.get("slave_repl_offset", 0))
        else:
            state.role = "primary"
            state.offset = int(info.get("master_repl_offset", 0))
        return state

    async def _sentinel_view(self, topology: DataPlaneTopology, patience: float) -> SentinelView:
        from redis.exceptions import RedisError

        named: Counter[str] = Counter()
        for url in topology.sentinels:
            client = _client(url, patience)
            try:
                address = cast(
                    tuple[str, int] | None,
                    await client.sentinel_get_master_addr_by_name(topology.sentinel_master),
                )
            except (RedisError, OSError):
                continue
            finally:
                await client.aclose()
            if address:
                named[self._named(topology, str(address[0]), int(address[1]))] += 1
        primary = named.most_common(1)[0][0] if named else None
        return SentinelView(
            asked=len(topology.sentinels), answered=sum(named.values()), primary=primary
        )

    @activity.defn
    async def compare_streams(self, req: StreamCheck) -> StreamReport:
        """What the server holds against PostgreSQL's pending tasks and dead letters: each task
        pending for longer than the grace must be on its shard's stream exactly once, and each
        dead-lettered task on the dead-letter stream. Works on a replica too (it only reads)."""
        node = self._topology().redis_node(req.node)
        client = _client(node.url, ACTION_TIMEOUT_SECONDS)
        try:
            async with (
                heartbeating(f"comparing {req.node}'s streams with PostgreSQL"),
                await self.database.connect(autocommit=True) as conn,
            ):
                return await self._compare(conn, client, req)
        finally:
            await client.aclose()

    async def _compare(
        self, conn: psycopg.AsyncConnection[Any], client: aioredis.Redis, req: StreamCheck
    ) -> StreamReport:
        # The clock is read before the streams: a task pending since before it, minus the grace,
        # was published before the streams were read.
        cutoff = await self._cutoff(conn, req.publish_grace_seconds)
        shards = await self._shards(conn, client)
        report = StreamReport(
            node=req.node,
            shards=[],
            dead_letter_rows=0,
            dead_letters_missing=0,
            marker=bool(await client.exists(self.keys.data_marker)),
        )
        queued = {
            shard: await _stream_tasks(client, self.keys.task_stream(shard)) for shard in shards
        }
        dead = await _stream_tasks(client, self.keys.dead_letter)
        for shard in shards:
            counts = queued[shard]
            pending: set[str] = set()
            settled = missing = 0
            async for rows in _batches(
                conn, "pending", "updated_at", "AND shard = %s", (shard,), 10_000, lock=False
            ):
                for task_id, updated_at in rows:
                    pending.add(task_id)
                    if updated_at < cutoff:
                        settled += 1
                        if not counts[task_id]:
                            missing += 1
                            if len(report.missing_sample) < SAMPLE:
                                report.missing_sample.append(task_id)
            twice = [t for t, n in counts.items() if n > 1]
            report.duplicated_sample += twice[: SAMPLE - len(report.duplicated_sample)]
            report.shards.append(
                ShardStream(
                    shard=shard,
                    pending=settled,
                    entries=sum(counts.values()),
                    missing=missing,
                    duplicated=len(twice),
                    stale=sum(n for t, n in counts.items() if t not in pending),
                )
            )
        async for rows in _batches(conn, "dead_letter", "1", "", (), 10_000, lock=False):
            report.dead_letter_rows += len(rows)
            report.dead_letters_missing += sum(1 for task_id, _ in rows if not dead[task_id])
        return report

    async def _cutoff(self, conn: psycopg.AsyncConnection[Any], grace: float) -> datetime:
        row = await (await conn.execute("SELECT clock_timestamp()")).fetchone()
        assert row is not None
        now: datetime = row[0]
        return now - timedelta(seconds=grace)

    async def _shards(
        self, conn: psycopg.AsyncConnection[Any], client: aioredis.Redis
    ) -> list[int]:
        """The shards with pending tasks in PostgreSQL or a stream in Redis."""
        rows = await (
            await conn.execute("SELECT DISTINCT shard FROM tasks WHERE status = 'pending'")
        ).fetchall()
        shards = {int(r[0]) for r in rows}
        async for key in client.scan_iter(match=self.keys.task_stream_pattern):
            shard = self.keys.shard_of(key)
            if shard is not None:
                shards.add(shard)
        return sorted(shards)

    @activity.defn
    async def heartbeating_workers(self, req: NodeWorkers) -> list[str]:
        """The workers heartbeating into one server: whether the platform uses it again."""
        threshold = req.threshold_seconds
        if req.since is not None:
            threshold = min(threshold, max(0.0, time.time() - req.since.timestamp()))
        client = _client(self._topology().redis_node(req.node).url, CHECK_TIMEOUT_SECONDS)
        try:
            return await live_workers(client, self.keys, threshold)
        finally:
            await client.aclose()

    # -- repairs -------------------------------------------------------------------------------

    async def _role(self, client: aioredis.Redis) -> str:
        role = await client.role()
        return str(role[0])

    @activity.defn
    async def promote(self, req: Promote) -> Promotion:
        """Make a replica the primary: ``REPLICAOF NO ONE`` only if it still is a replica (a
        retry never promotes twice), then ``CONFIG REWRITE`` so a restart keeps it primary."""
        from redis.exceptions import ResponseError

        client = _client(self._topology().redis_node(req.node).url, ACTION_TIMEOUT_SECONDS)
        try:
            async with heartbeating(f"promoting {req.node}"):
                if await self._role(client) == "master":
                    return Promotion(
                        changed=False, detail=f"{req.node} is already a primary", node=req.node
                    )
                if req.dry_run:
                    return Promotion(
                        changed=False, detail=f"would promote {req.node}", node=req.node
                    )
                await client.replicaof("NO", "ONE")
                try:
                    await client.config_rewrite()
                    kept = "its config rewritten"
                except ResponseError as err:
                    kept = f"NOT written to its config ({err}): set `replicaof` off there by hand"
                if await self._role(client) != "master":
                    raise ApplicationError(
                        f"{req.node} still reports a replica's role after REPLICAOF NO ONE"
                    )
        finally:
            await client.aclose()
        return Promotion(
            changed=True, detail=f"promoted {req.node} to primary, {kept}", node=req.node
        )

    @activity.defn
    async def sentinel_failover(self, req: SentinelFailover) -> Promotion:
        """Ask Sentinel to fail over from ``away_from`` and wait until it names another primary
        that says it is one. Done already (Sentinel acted on its own) is no change."""
        from redis.exceptions import RedisError, ResponseError

        topology = self._topology()
        if not topology.sentinels:
            raise ApplicationError(
                "the data-plane topology lists no Sentinels: promote a replica instead",
                non_retryable=True,
            )
        survey = await self.survey(SurveyRequest())
        moved = self._failed_over(survey, req.away_from)
        if moved is not None:
            return Promotion(
                changed=False, detail=f"Sentinel already made {moved} the primary", node=moved
            )
        if req.dry_run:
            likely = survey.best_replica(req.away_from)
            return Promotion(
                changed=False,
                detail=f"would ask Sentinel to fail over {topology.sentinel_master} away from "
                f"{req.away_from} (likely to "
                f"{likely.name if likely else 'no replica: none answers'})",
                node=likely.name if likely else req.away_from,
            )
        asked = ""
        for url in topology.sentinels:
            client = _client(url, CHECK_TIMEOUT_SECONDS)
            try:
                await client.sentinel_failover(topology.sentinel_master)
                asked = "asked Sentinel to fail over"
            except ResponseError as err:
                if "INPROG" not in str(err):
                    raise ApplicationError(
                        f"Sentinel refused to fail over {topology.sentinel_master}: {err}; is a "
                        "replica in sync with it? (SENTINEL replicas "
                        f"{topology.sentinel_master})",
                        non_retryable=True,
                    ) from err
                asked = "Sentinel was failing over already"
            except (RedisError, OSError):
                continue
            finally:
                await client.aclose()
            break
        if not asked:
            raise ApplicationError(f"no Sentinel answers ({len(topology.sentinels)} listed)")
        deadline = time.monotonic() + req.timeout_seconds
        while time.monotonic() < deadline:
            survey = await self.survey(SurveyRequest())
            moved = self._failed_over(survey, req.away_from)
            if moved is not None:
                return Promotion(
                    changed=True, detail=f"{asked}; it made {moved} the primary", node=moved
                )
            beat(survey.summary())
            await asyncio.sleep(0.5)
        raise ApplicationError(
            f"{asked}, but after {req.timeout_seconds:g}s it names no new primary "
            f"({survey.summary()}); read the Sentinel log, or promote a replica by hand",
            non_retryable=True,
        )

    @staticmethod
    def _failed_over(survey: RedisSurvey, away_from: str) -> str | None:
        """The server Sentinel names as primary instead of ``away_from``, once it says so itself."""
        named = survey.sentinel.primary if survey.sentinel else None
        node = survey.node(named) if named else None
        if named != away_from and node is not None and node.reachable and node.role == "primary":
            return named
        return None

    @activity.defn
    async def rebuild_streams(self, req: RebuildStreams) -> Rebuild:
        """Give Redis back what PostgreSQL says it must hold, in batches, heartbeating.

        Each pending task older than the grace goes back on its shard's stream unless an entry
        for it is there; an entry whose task is not pending any more is deleted (its worker's
        delete was lost with the old primary); each dead-lettered task goes back on the
        dead-letter stream unless one is there.
        What is on a stream is read before the first batch and grown with each one, so a retry
        of this activity adds only what the first attempt did not.
        """
        node = self._topology().redis_node(req.node)
        client = _client(node.url, ACTION_TIMEOUT_SECONDS)
        requeued = dead_letters = batches = stale = 0
        try:
            async with heartbeating(f"rebuilding the streams on {req.node}"):
                if not req.dry_run and await self._role(client) != "master":
                    raise ApplicationError(
                        f"{req.node} is a replica and cannot take writes: rebuild on the primary",
                        non_retryable=True,
                    )
                async with await self.database.connect(autocommit=True) as conn:
                    cutoff = await self._cutoff(conn, req.publish_grace_seconds)
                    for shard in await self._shards(conn, client):
                        stream = self.keys.task_stream(shard)
                        entries = await _stream_entries(client, stream)
                        stale += await self._trim(conn, client, stream, entries, req.dry_run)
                        present = set(entries)
                        async for rows in _batches(
                            conn,
                            "pending",
                            "goal_id",
                            "AND shard = %s AND updated_at < %s",
                            (shard, cutoff),
                            req.batch_size,
                            lock=True,
                        ):
                            missing = [(str(t), str(g)) for t, g in rows if t not in present]
                            if missing and not req.dry_run:
                                async with client.pipeline(transaction=False) as pipe:
                                    for task_id, goal_id in missing:
                                        pipe.xadd(stream, task_entry(task_id, goal_id))  # type: ignore[arg-type]
                                    await pipe.execute()
                            present.update(t for t, _ in missing)
                            requeued += len(missing)
                            batches += 1
                            beat(f"shard {shard}: {requeued} tasks requeued")
                    present = set(await _stream_tasks(client, self.keys.dead_letter))
                    async for rows in _batches(
                        conn,
                        "dead_letter",
                        "coalesce(last_error, ''), retries, shard, coalesce(worker_id, '')",
                        "",
                        (),
                        req.batch_size,
                        lock=True,
                    ):
                        missing_letters = [r for r in rows if r[0] not in present]
                        if missing_letters and not req.dry_run:
                            async with client.pipeline(transaction=False) as pipe:
                                for task_id, error, retries, shard, worker in missing_letters:
                                    fields = {
                                        "task_id": task_id,
                                        "error": error,
                                        "retries": str(retries),
                                        "shard": str(shard),
                                        "worker_id": worker,
                                    }
                                    pipe.xadd(self.keys.dead_letter, fields)  # type: ignore[arg-type]
                                await pipe.execute()
                        present.update(r[0] for r in missing_letters)
                        dead_letters += len(missing_letters)
                        batches += 1
                        beat(f"{dead_letters} dead letters restored")
        finally:
            await client.aclose()
        verb = "would put back" if req.dry_run else "put back"
        return Rebuild(
            changed=not req.dry_run and requeued + dead_letters + stale > 0,
            detail=f"{verb} {requeued} pending tasks on their streams and {dead_letters} dead "
            f"letters on {req.node}, from PostgreSQL in {batches} batch(es); "
            f"{'would delete' if req.dry_run else 'deleted'} {stale} entries of tasks no "
            "longer pending",
            requeued=requeued,
            stale=stale,
            dead_letters=dead_letters,
            batches=batches,
        )

    async def _trim(
        self,
        conn: psycopg.AsyncConnection[Any],
        client: aioredis.Redis,
        stream: str,
        entries: dict[str, list[str]],
        dry_run: bool,
    ) -> int:
        """Delete the entries of tasks that are not pending (whatever their age): Astra would
        skip them, and a stream of pending tasks is what the verify step counts."""
        rows = await (
            await conn.execute(
                "SELECT id FROM tasks WHERE status = 'pending' AND id = ANY(%s)", (list(entries),)
            )
        ).fetchall()
        pending = {r[0] for r in rows}
        stale = [e for task, ids in entries.items() if task not in pending for e in ids]
        if stale and not dry_run:
            await client.xdel(stream, *stale)
        for task in [t for t in entries if t not in pending]:
            del entries[task]
        return len(stale)

    @activity.defn
    async def restore_marker(self, req: RestoreMarker) -> MutationResult:
        """Write the data marker back, only once the streams hold everything PostgreSQL says
        they must: the marker is what tells the next check that this Redis is whole."""
        node = self._topology().redis_node(req.node)
        client = _client(node.url, ACTION_TIMEOUT_SECONDS)
        try:
            if await client.exists(self.keys.data_marker):
                return MutationResult(changed=False, detail=f"{req.node} holds the data marker")
            if req.dry_run:
                return MutationResult(
                    changed=False,
                    detail=f"would restore the data marker on {req.node} once rebuilt",
                )
            async with (
                heartbeating(f"checking {req.node}'s streams before restoring its marker"),
                await self.database.connect(autocommit=True) as conn,
            ):
                report = await self._compare(
                    conn,
                    client,
                    StreamCheck(node=req.node, publish_grace_seconds=req.publish_grace_seconds),
                )
            if report.missing or report.dead_letters_missing:
                raise ApplicationError(
                    f"not restoring the data marker: {report.summary()}; rebuild the streams first",
                    non_retryable=True,
                )
            await client.set(self.keys.data_marker, int(time.time() * 1000), nx=True)
        finally:
            await client.aclose()
        return MutationResult(changed=True, detail=f"restored the data marker on {req.node}")
