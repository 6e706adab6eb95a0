"""Activities on Astra's Redis: worker heartbeats and the dead-letter stream.

Named ``redis_store`` rather than ``redis`` so that it never shadows the redis library. The
library is imported where it is used: the workflows import this module for its models (and so
does the CLI, through the catalogue).
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.mutation import Mutation, MutationResult

if TYPE_CHECKING:
    import redis.asyncio as aioredis


@dataclass(frozen=True)
class AstraKeys:
    """Where Astra keeps things in Redis; the prefix is configurable so tests can share a server."""

    prefix: str = "astra:"

    def heartbeat(self, worker_id: str) -> str:
        """The key holding a worker's last heartbeat, epoch milliseconds."""
        return f"{self.prefix}heartbeat:{worker_id}"

    @property
    def heartbeat_pattern(self) -> str:
        """A SCAN pattern matching every worker's heartbeat key."""
        return f"{self.prefix}heartbeat:*"

    def worker_of(self, heartbeat_key: str) -> str:
        """The worker id a heartbeat key belongs to."""
        return heartbeat_key.removeprefix(f"{self.prefix}heartbeat:")

    @property
    def dead_letter(self) -> str:
        """The stream Astra publishes a task to when it exhausts its retries."""
        return f"{self.prefix}dead_letter"

    def task_stream(self, shard: int) -> str:
        """The stream of a shard's pending tasks: one entry (``task_entry``) per task, added
        when the task becomes pending and deleted by the worker that takes it."""
        return f"{self.prefix}tasks:{shard}"

    @property
    def task_stream_pattern(self) -> str:
        """A SCAN pattern matching every shard's task stream."""
        return f"{self.prefix}tasks:*"

    def shard_of(self, task_stream: str) -> int | None:
        """The shard a task stream belongs to; None for a key that is not one."""
        shard = task_stream.removeprefix(f"{self.prefix}tasks:")
        return int(shard) if shard.isdigit() else None

    @property
    def data_marker(self) -> str:
        """A key written once when Astra's Redis is provisioned and never deleted by Astra.

        It replicates and persists like the streams do, so when Redis answers without it, Redis
        lost its data: a flush, a restart without persistence, or an empty node promoted.
        """
        return f"{self.prefix}data_marker"


def task_entry(task_id: str, goal_id: str) -> dict[str, str]:
    """A pending task's entry in its shard's stream, as Astra's scheduler publishes it."""
    return {"task_id": task_id, "goal_id": goal_id}


def error_class(message: str) -> str:
    """The class of an Astra error message: the text before its first ':' ("TimeoutError")."""
    return message.split(":", 1)[0].strip() or "unknown"


class HeartbeatAgeRequest(BaseModel):
    worker_id: str = Field(min_length=1)


class HeartbeatAge(BaseModel):
    worker_id: str
    age_seconds: float | None
    """None when the worker has no heartbeat key at all (never started, or expired)."""
    last_seen_ms: int | None

    def summary(self) -> str:
        if self.age_seconds is None:
            return f"no heartbeat from {self.worker_id} at all"
        return f"{self.worker_id} last heartbeat {self.age_seconds:.0f}s ago"


class LiveWorkersRequest(BaseModel):
    threshold_seconds: float = Field(default=30.0, gt=0)


class ReadDeadLetters(BaseModel):
    group: str = Field(default="astra-ops", min_length=1)
    consumer: str = Field(min_length=1)
    count: int = Field(default=100, gt=0, le=10_000)


class DeadLetter(BaseModel):
    entry_id: str
    task_id: str
    error: str
    error_class: str
    retries: int | None
    shard: int | None
    worker_id: str | None
    redelivered: bool
    """True when this consumer had read the entry before without acknowledging it."""


class DeadLetterBatch(BaseModel):
    entries: list[DeadLetter]

    def summary(self) -> str:
        tasks = len({e.task_id for e in self.entries if e.task_id})
        return f"{len(self.entries)} dead letters for {tasks} tasks"


class AckDeadLetters(Mutation):
    group: str = Field(default="astra-ops", min_length=1)
    entry_ids: list[str]


class AckResult(MutationResult):
    acknowledged: int


class RedisActivities:
    """Reads heartbeats and consumes the dead-letter stream of one Astra Redis."""

    def __init__(self, url: str, key_prefix: str = "astra:") -> None:
        import redis.asyncio as aioredis

        self.keys = AstraKeys(key_prefix)
        self._redis = aioredis.Redis.from_url(url, decode_responses=True)

    async def aclose(self) -> None:
        """Release the connection pool (the worker's composition root calls this on shutdown)."""
        await self._redis.aclose()

    @activity.defn
    async def heartbeat_age(self, req: HeartbeatAgeRequest) -> HeartbeatAge:
        """How long ago a worker last heartbeat; the worker-lost runbook's first check."""
        # decode_responses=True: Redis hands back str, whatever the client's union types say.
        raw = cast(str | None, await self._redis.get(self.keys.heartbeat(req.worker_id)))
        if raw is None:
            return HeartbeatAge(worker_id=req.worker_id, age_seconds=None, last_seen_ms=None)
        last_seen_ms = epoch_ms(self.keys.heartbeat(req.worker_id), raw)
        age = max(0.0, time.time() - last_seen_ms / 1000)
        return HeartbeatAge(worker_id=req.worker_id, age_seconds=age, last_seen_ms=last_seen_ms)

    @activity.defn
    async def live_workers(self, req: LiveWorkersRequest) -> list[str]:
        """Workers whose heartbeat is younger than the threshold, sorted: recovery's evidence."""
        return await live_workers(self._redis, self.keys, req.threshold_seconds)

    @activity.defn
    async def read_dead_letters(self, req: ReadDeadLetters) -> DeadLetterBatch:
        """Read dead letters for a consumer group, this consumer's unacknowledged entries first.

        An entry stays pending until ``ack_dead_letters`` acknowledges it, so a repair run that
        crashes mid-batch gets the same entries again instead of losing them.
        """
        from redis.exceptions import ResponseError

        stream = self.keys.dead_letter
        try:
            await self._redis.xgroup_create(stream, req.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        entries = await self._read(req, "0", req.count, redelivered=True)
        if len(entries) < req.count:
            entries += await self._read(req, ">", req.count - len(entries), redelivered=False)
        return DeadLetterBatch(entries=entries)

    @activity.defn
    async def ack_dead_letters(self, req: AckDeadLetters) -> AckResult:
        """Acknowledge handled dead letters; acknowledging one twice is a no-op, as XACK is."""
        pending = await self._pending_among(req.group, req.entry_ids)
        if req.dry_run:
            return AckResult(
                changed=False,
                detail=f"would acknowledge {len(pending)} of {len(req.entry_ids)} dead letters",
                acknowledged=0,
            )
        acked = (
            int(await self._redis.xack(self.keys.dead_letter, req.group, *pending))
            if pending
            else 0
        )
        return AckResult(
            changed=acked > 0,
            detail=f"acknowledged {acked} of {len(req.entry_ids)} dead letters ({req.group})",
            acknowledged=acked,
        )

    async def _read(
        self, req: ReadDeadLetters, start: str, count: int, *, redelivered: bool
    ) -> list[DeadLetter]:
        reply = await self._redis.xreadgroup(
            req.group, req.consumer, {self.keys.dead_letter: start}, count=count
        )
        # RESP2 answers [[stream, entries]], RESP3 {stream: entries}; entries are (id, fields).
        streams = cast(
            Iterable[tuple[str, list[tuple[str, dict[str, str] | None]]]],
            reply.items() if isinstance(reply, dict) else reply or [],
        )
        entries: list[DeadLetter] = []
        for _stream, messages in streams:
            for entry_id, fields in messages:
                # A pending entry deleted from the stream since comes back with no fields.
                if fields:
                    entries.append(self._dead_letter(entry_id, fields, redelivered))
        return entries

    async def _pending_among(self, group: str, entry_ids: list[str]) -> list[str]:
        """Those of ``entry_ids`` the group still holds as pending, i.e. not yet acknowledged."""
        from redis.exceptions import ResponseError

        if not entry_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.keys.dead_letter, group, min=entry_id, max=entry_id, count=1)
        try:
            results = await pipe.execute()
        except ResponseError as err:
            raise ApplicationError(
                f"cannot acknowledge dead letters: group {group!r} has no pending entries list on "
                f"{self.keys.dead_letter} ({err}); read with read_dead_letters first",
                non_retryable=True,
            ) from err
        return [entry_id for entry_id, hit in zip(entry_ids, results, strict=True) if hit]

    @staticmethod
    def _dead_letter(entry_id: str, fields: dict[str, str], redelivered: bool) -> DeadLetter:
        error = fields.get("error", "")
        return DeadLetter(
            entry_id=entry_id,
            task_id=fields.get("task_id", ""),
            error=error,
            error_class=error_class(error),
            retries=_int_or_none(fields.get("retries")),
            shard=_int_or_none(fields.get("shard")),
            worker_id=fields.get("worker_id") or None,
            redelivered=redelivered,
        )


def epoch_ms(key: str, raw: str) -> int:
    """A heartbeat's value, epoch milliseconds."""
    try:
        return int(float(raw))
    except ValueError:
        raise ApplicationError(
            f"heartbeat key {key} holds {raw!r}, not epoch milliseconds; "
            "is the worker writing the Astra heartbeat format?",
            non_retryable=True,
        ) from None


async def live_workers(
    client: "aioredis.Redis", keys: AstraKeys, threshold_seconds: float
) -> list[str]:
    """Workers whose heartbeat in ``client``'s Redis is younger than the threshold, sorted."""
    found: list[str] = [k async for k in client.scan_iter(match=keys.heartbeat_pattern)]
    if not found:
        return []
    now_ms = time.time() * 1000
    values = cast(list[str | None], await client.mget(found))
    live = [
        keys.worker_of(key)
        for key, raw in zip(found, values, strict=True)
        if raw is not None and now_ms - epoch_ms(key, raw) <= threshold_seconds * 1000
    ]
    return sorted(live)


def _int_or_none(raw: str | None) -> int | None:
    """Stream fields are strings written by Astra; a missing or odd one must not sink the batch."""
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
