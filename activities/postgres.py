"""Activities on Astra's PostgreSQL: the tasks a worker holds, task outcomes, LLM cost, repairs.

Each call opens its own short connection: runbook activities are few and far between, and a
connection that outlives a failover would only point at the old primary.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, LiteralString, Self

from pydantic import BaseModel, Field, model_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.canary_analysis import CanaryMeasurement, CanaryMeasurementRequest, WorkerOutcomes
from activities.heartbeats import beat, heartbeating
from activities.mutation import Mutation, MutationResult
from runtime.data_plane import DataPlaneTopology

if TYPE_CHECKING:
    import psycopg

FAILED_STATUSES = ("failed", "dead_letter")
OUTCOME_STATUSES = ("succeeded", "failed", "dead_letter")


class LeasedTasksRequest(BaseModel):
    worker_id: str = Field(min_length=1)


class FailureRateRequest(BaseModel):
    window_seconds: float = Field(default=300.0, gt=0)


class FailureRate(BaseModel):
    window_seconds: float
    total: int
    """Tasks whose latest outcome (succeeded, failed, dead_letter) falls in the window."""
    failed: int
    """Of those, failed or dead-lettered."""
    rate: float
    """failed / total; 0.0 when nothing finished in the window."""

    def summary(self) -> str:
        over = f"over {self.window_seconds:g}s"
        return f"{self.failed} of {self.total} tasks failed {over} ({self.rate:.1%})"


class FailureBreakdownRequest(BaseModel):
    window_seconds: float = Field(default=300.0, gt=0)
    top: int = Field(default=10, gt=0, le=1000)


class Count(BaseModel):
    key: str
    count: int


class FailureBreakdown(BaseModel):
    window_seconds: float
    failed: int
    by_error_class: list[Count]
    by_worker: list[Count]
    by_shard: list[Count]

    def summary(self) -> str:
        top = ", ".join(f"{c.key} ({c.count})" for c in self.by_error_class[:3])
        return f"{self.failed} failures over {self.window_seconds:g}s; top classes: {top or 'none'}"


class LlmCostRequest(BaseModel):
    window_seconds: float = Field(default=300.0, gt=0)
    baseline_seconds: float = Field(default=86_400.0, gt=0)
    top: int = Field(default=5, gt=0, le=100)

    @model_validator(mode="after")
    def _baseline_spans_windows(self) -> Self:
        if self.baseline_seconds < self.window_seconds:
            raise ValueError(
                f"baseline_seconds ({self.baseline_seconds}) is shorter than window_seconds "
                f"({self.window_seconds}); an average over less than one window says nothing"
            )
        return self


class CostShare(BaseModel):
    key: str
    cost_usd: float


class CostComparison(BaseModel):
    window_seconds: float
    baseline_seconds: float
    window_cost: float
    daily_average_per_window: float
    """The baseline period's cost scaled to one window: what a normal window costs."""
    ratio: float | None
    """window_cost / daily_average_per_window; None when there is no baseline to compare with."""
    top_tenants: list[CostShare]
    top_agents: list[CostShare]
    top_models: list[CostShare]

    def summary(self) -> str:
        ratio = f"{self.ratio:.1f}x" if self.ratio is not None else "no baseline"
        return (
            f"${self.window_cost:.2f} over {self.window_seconds:g}s vs "
            f"${self.daily_average_per_window:.2f} daily average ({ratio})"
        )

    @classmethod
    def of(
        cls,
        req: LlmCostRequest,
        window_cost: float,
        baseline_cost: float,
        tops: tuple[list[CostShare], list[CostShare], list[CostShare]],
    ) -> Self:
        """The comparison every metrics source reports, from its two sums and its rankings."""
        average = baseline_cost * req.window_seconds / req.baseline_seconds
        return cls(
            window_seconds=req.window_seconds,
            baseline_seconds=req.baseline_seconds,
            window_cost=window_cost,
            daily_average_per_window=average,
            ratio=window_cost / average if average > 0 else None,
            top_tenants=tops[0],
            top_agents=tops[1],
            top_models=tops[2],
        )


class RequeueDeadLetters(Mutation):
    task_ids: list[str]


class DeadLetterRequeueResult(MutationResult):
    requeued: list[str]
    skipped: list[str]
    """Not dead-lettered (any more), unknown, or already requeued by this repair run."""


class TaskStatesRequest(BaseModel):
    task_ids: list[str]


class TaskState(BaseModel):
    id: str
    status: str
    worker_id: str | None
    retries: int
    max_retries: int
    last_error: str | None
    updated_at: datetime


class TaskStates(BaseModel):
    tasks: dict[str, TaskState]
    """Keyed by task id; ids with no row are absent."""

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for state in self.tasks.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no tasks"


class LeaseSummary(BaseModel):
    worker_id: str
    count: int
    """Tasks the worker holds (running, leased by it) as of ``as_of``."""
    sample: list[str]
    """A few of their ids, for the run's record; the full list can be far beyond a payload."""
    as_of: datetime
    """The database's clock at the count; a requeue takes back only tasks leased before it."""

    def summary(self) -> str:
        return f"{self.worker_id} holds {self.count} leased tasks"


class RequeueLostWorker(Mutation):
    """Take back every task a lost worker leased before ``leased_before``, in bounded batches."""

    worker_id: str = Field(min_length=1)
    leased_before: datetime
    batch_size: int = Field(default=5_000, gt=0, le=100_000)


class LostWorkerRequeue(MutationResult):
    requeued: int
    """Tasks put back to pending by this call (in dry-run: that would be)."""
    batches: int
    token: str
    """The requeue's token, under which each requeued task is recorded for the verify step."""


class RequeueProgressRequest(BaseModel):
    token: str = Field(min_length=1)


class RequeueProgress(BaseModel):
    requeued: int
    """Tasks recorded as requeued under the token."""
    waiting: int
    """Of those, still pending: not yet picked up by a live worker."""

    def summary(self) -> str:
        return f"{self.waiting} of {self.requeued} requeued tasks still waiting"


async def connect(
    dsn: str, *, autocommit: bool = False, seconds: float | None = None
) -> psycopg.AsyncConnection[Any]:
    """A new connection to ``dsn``, giving up after ``seconds`` when given (libpq counts whole
    seconds, at least one). psycopg is imported here, not with this module: the workflows
    import this module for its models (and so does the CLI, through the catalogue)."""
    import psycopg

    if seconds is None:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit)
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=autocommit, connect_timeout=max(1, round(seconds))
    )


class AstraDatabase:
    """Where Astra's database is now, for astra-ops's own reads and repairs of it.

    Configured as a DSN. When that DSN is one of the data-plane topology's servers (the dev
    stack's, or production's without a pooler in front), it follows whichever listed server is
    the primary now: after `postgres-outage` fails over, the runbooks that read or repair tasks
    must reach the new primary, not the old one, which is down or has become a read-only
    replica. A DSN outside the topology (a pooler, a service name) is used as it is. The
    topology is read, and the primary asked for, on every connection, as every activity here
    opens its own short one.
    """

    def __init__(self, dsn: str, topology: Path | None = None) -> None:
        self.configured = dsn
        self.topology = topology

    async def connect(self, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
        return await connect(await self.dsn(), autocommit=autocommit)

    async def dsn(self) -> str:
        import psycopg

        if self.topology is None:
            return self.configured
        servers = DataPlaneTopology.load(self.topology).postgres
        if self.configured not in {server.platform_dsn for server in servers}:
            return self.configured
        for server in servers:
            try:
                async with await connect(server.admin_dsn, autocommit=True, seconds=2) as conn:
                    row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
            except psycopg.OperationalError:
                continue
            if row is not None and not row[0]:
                return server.platform_dsn
        return self.configured


async def query_failure_rate(
    conn: psycopg.AsyncConnection[Any], window_seconds: float
) -> FailureRate:
    """The failure rate over a window, from the tasks table (what the SQL metrics source reads)."""
    row = await (
        await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = ANY(%s))"
            " FROM tasks WHERE updated_at > now() - make_interval(secs => %s)"
            " AND status = ANY(%s)",
            (list(FAILED_STATUSES), window_seconds, list(OUTCOME_STATUSES)),
        )
    ).fetchone()
    total, failed = (int(row[0]), int(row[1])) if row else (0, 0)
    return FailureRate(
        window_seconds=window_seconds,
        total=total,
        failed=failed,
        rate=failed / total if total else 0.0,
    )


async def query_llm_cost(conn: psycopg.AsyncConnection[Any], req: LlmCostRequest) -> CostComparison:
    """Last window's LLM cost against the baseline period before it, with the top spenders."""
    # The baseline ends where the window starts, so a spike does not inflate its own yardstick.
    row = await (
        await conn.execute(
            "SELECT"
            " coalesce(sum(cost_usd) FILTER (WHERE ts > now() - make_interval(secs => %(w)s)), 0),"
            " coalesce(sum(cost_usd) FILTER (WHERE ts <= now() - make_interval(secs => %(w)s)), 0)"
            " FROM llm_usage WHERE ts > now() - make_interval(secs => %(w)s + %(b)s)",
            {"w": req.window_seconds, "b": req.baseline_seconds},
        )
    ).fetchone()
    window_cost, baseline_cost = (float(row[0]), float(row[1])) if row else (0.0, 0.0)
    tops = [await _top_cost(conn, label, req) for label in ("tenant", "agent_id", "model")]
    return CostComparison.of(req, window_cost, baseline_cost, (tops[0], tops[1], tops[2]))


async def _top_cost(
    conn: psycopg.AsyncConnection[Any], column: LiteralString, req: LlmCostRequest
) -> list[CostShare]:
    rows = await (
        await conn.execute(
            f"SELECT {column}, sum(cost_usd) AS cost FROM llm_usage"
            " WHERE ts > now() - make_interval(secs => %s)"
            f" GROUP BY {column} ORDER BY cost DESC, {column} LIMIT %s",
            (req.window_seconds, req.top),
        )
    ).fetchall()
    return [CostShare(key=str(key), cost_usd=float(cost)) for key, cost in rows]


class PostgresActivities:
    """Reads and repairs Astra's task and usage tables in one PostgreSQL database."""

    def __init__(self, dsn: str, topology: Path | None = None) -> None:
        self._database = AstraDatabase(dsn, topology)

    @activity.defn
    async def measure_canary(self, req: CanaryMeasurementRequest) -> CanaryMeasurement:
        """The canary's pods against every other worker over the last window: failures, and
        the p95 time from submission to success (a canary analysis measurement)."""
        async with await self._database.connect() as conn:
            rows = await (
                await conn.execute(
                    "SELECT worker_id = ANY(%(canary)s), count(*),"
                    " count(*) FILTER (WHERE status = ANY(%(failed)s)),"
                    " percentile_cont(0.95) WITHIN GROUP"
                    "  (ORDER BY extract(epoch FROM updated_at - created_at))"
                    "  FILTER (WHERE status = 'succeeded')"
                    " FROM tasks WHERE updated_at > now() - make_interval(secs => %(window)s)"
                    " AND status = ANY(%(outcomes)s) AND worker_id IS NOT NULL GROUP BY 1",
                    {
                        "canary": req.canary_workers,
                        "failed": list(FAILED_STATUSES),
                        "window": req.window_seconds,
                        "outcomes": list(OUTCOME_STATUSES),
                    },
                )
            ).fetchall()
        groups = {
            bool(canary): WorkerOutcomes(
                tasks=int(tasks),
                failed=int(failed),
                p95_seconds=float(p95) if p95 is not None else None,
            )
            for canary, tasks, failed, p95 in rows
        }
        empty = WorkerOutcomes(tasks=0, failed=0)
        return CanaryMeasurement(
            window_seconds=req.window_seconds,
            canary=groups.get(True, empty),
            stable=groups.get(False, empty),
        )

    @activity.defn
    async def lease_summary(self, req: LeasedTasksRequest) -> LeaseSummary:
        """How many tasks a worker holds, and when that was counted: the worker-lost check.

        A count and a sample rather than every id, because a worker of a big pool can hold more
        ids than fit in a Temporal payload.
        """
        async with await self._database.connect() as conn:
            await self._require_worker(conn, req.worker_id)
            row = await (
                await conn.execute(
                    "SELECT count(*), (array_agg(id ORDER BY id))[1:5], clock_timestamp()"
                    " FROM tasks WHERE worker_id = %s AND status = 'running'",
                    (req.worker_id,),
                )
            ).fetchone()
        assert row is not None  # an aggregate always returns one row
        return LeaseSummary(
            worker_id=req.worker_id, count=int(row[0]), sample=list(row[1] or []), as_of=row[2]
        )

    @activity.defn
    async def requeue_lost_worker(self, req: RequeueLostWorker) -> LostWorkerRequeue:
        """Put a lost worker's tasks back to pending, batch by batch, each batch committed.

        Selected by worker id in the database, so no id list crosses Temporal; only rows still
        running *and* leased by that worker before the check change, so a task another worker
        finished or took over meanwhile is left alone and a second run finds nothing. Each
        requeued task is recorded under the step's token (for the verify step), and bounded
        batches keep locks and WAL per transaction small while the activity heartbeats.
        """
        where = (
            "FROM tasks WHERE worker_id = %(worker)s AND status = 'running'"
            " AND updated_at <= %(before)s"
        )
        params: dict[str, Any] = {
            "worker": req.worker_id,
            "before": req.leased_before,
            "token": req.token,
            "batch": req.batch_size,
        }
        async with await self._database.connect(autocommit=True) as conn:
            await self._require_worker(conn, req.worker_id)
            if req.dry_run:
                row = await (await conn.execute(f"SELECT count(*) {where}", params)).fetchone()
                would = int(row[0]) if row else 0
                return LostWorkerRequeue(
                    changed=False,
                    detail=f"would requeue {would} tasks of {req.worker_id}",
                    requeued=would,
                    batches=0,
                    token=req.token,
                )
            if not req.token:
                raise ApplicationError(
                    "requeue_lost_worker needs a token to record what it requeued; the step "
                    "runner fills it in from the workflow id",
                    non_retryable=True,
                )
            requeued = batches = 0
            while True:
                async with (
                    heartbeating(f"requeueing a batch of {req.worker_id}'s tasks"),
                    conn.transaction(),
                ):
                    cur = await conn.execute(
                        "WITH batch AS ("
                        f"  SELECT id {where} LIMIT %(batch)s FOR UPDATE SKIP LOCKED),"
                        " recorded AS ("
                        "  INSERT INTO astra_ops_requeues (token, task_id)"
                        "  SELECT %(token)s, id FROM batch ON CONFLICT DO NOTHING)"
                        " UPDATE tasks SET status = 'pending', worker_id = NULL, updated_at = now()"
                        " FROM batch WHERE tasks.id = batch.id",
                        params,
                    )
                if cur.rowcount == 0:
                    break
                requeued += cur.rowcount
                batches += 1
                beat(f"{requeued} tasks of {req.worker_id} requeued")
            # An earlier attempt cut off halfway (a lost connection, a dead worker) committed
            # its batches: the step's account counts them, as its verify step will.
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM astra_ops_requeues WHERE token = %s", (req.token,)
                )
            ).fetchone()
            earlier = (int(row[0]) if row else 0) - requeued
        detail = f"requeued {requeued} tasks of {req.worker_id} in {batches} batch(es)"
        if earlier > 0:
            detail += f", {earlier} more by an earlier attempt of this step"
        return LostWorkerRequeue(
            changed=requeued > 0,
            detail=detail,
            requeued=requeued,
            batches=batches,
            token=req.token,
        )

    @activity.defn
    async def requeue_progress(self, req: RequeueProgressRequest) -> RequeueProgress:
        """How many of the tasks requeued under a token live workers have picked up since."""
        async with await self._database.connect() as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE t.status = 'pending')"
                    " FROM astra_ops_requeues r JOIN tasks t ON t.id = r.task_id"
                    " WHERE r.token = %s",
                    (req.token,),
                )
            ).fetchone()
        requeued, waiting = (int(row[0]), int(row[1])) if row else (0, 0)
        return RequeueProgress(requeued=requeued, waiting=waiting)

    @activity.defn
    async def failure_breakdown(self, req: FailureBreakdownRequest) -> FailureBreakdown:
        """Failed tasks in the window by error class, worker and shard: where to look first."""
        where = (
            "FROM tasks WHERE updated_at > now() - make_interval(secs => %s) AND status = ANY(%s)"
        )
        params = (req.window_seconds, list(FAILED_STATUSES), req.top)
        async with await self._database.connect() as conn:

            async def counts(key: LiteralString) -> list[Count]:
                rows = await (
                    await conn.execute(
                        f"SELECT {key} AS k, count(*) AS n {where}"
                        " GROUP BY k ORDER BY n DESC, k LIMIT %s",
                        params,
                    )
                ).fetchall()
                return [Count(key=str(k), count=int(n)) for k, n in rows]

            by_class = await counts(
                "coalesce(nullif(trim(split_part(last_error, ':', 1)), ''), 'unknown')"
            )
            by_worker = await counts("coalesce(worker_id, 'unassigned')")
            by_shard = await counts("shard::text")
        return FailureBreakdown(
            window_seconds=req.window_seconds,
            failed=sum(c.count for c in by_worker),
            by_error_class=by_class,
            by_worker=by_worker,
            by_shard=by_shard,
        )

    @activity.defn
    async def requeue_dead_letters(self, req: RequeueDeadLetters) -> DeadLetterRequeueResult:
        """Give dead-lettered tasks a fresh set of retries, each at most once per repair run.

        The run's token and the task id go into ``astra_ops_requeues`` in the same statement that
        requeues the task, so a retried activity (or a task that dead-letters again during the
        run) is never requeued a second time by the same run.
        """
        async with await self._database.connect() as conn:
            if req.dry_run:
                rows = await (
                    await conn.execute(
                        "SELECT t.id FROM tasks t WHERE t.id = ANY(%s) AND t.status = 'dead_letter'"
                        " AND NOT EXISTS (SELECT 1 FROM astra_ops_requeues r"
                        "  WHERE r.token = %s AND r.task_id = t.id) ORDER BY t.id",
                        (req.task_ids, req.token),
                    )
                ).fetchall()
                would = [r[0] for r in rows]
                return DeadLetterRequeueResult(
                    changed=False,
                    detail=f"would requeue {len(would)} of {len(req.task_ids)} dead-lettered tasks",
                    requeued=would,
                    skipped=sorted(set(req.task_ids) - set(would)),
                )
            if not req.token:
                raise ApplicationError(
                    "requeue_dead_letters needs a token (the repair run id) to requeue each task "
                    "at most once per run; the step runner fills it in from the workflow id",
                    non_retryable=True,
                )
            rows = await (
                await conn.execute(
                    "WITH claimed AS ("
                    "  INSERT INTO astra_ops_requeues (token, task_id)"
                    "  SELECT %s, id FROM tasks WHERE id = ANY(%s) AND status = 'dead_letter'"
                    "  FOR UPDATE"
                    "  ON CONFLICT DO NOTHING RETURNING task_id)"
                    " UPDATE tasks SET status = 'pending', retries = 0, worker_id = NULL,"
                    "  updated_at = now()"
                    " FROM claimed WHERE tasks.id = claimed.task_id RETURNING tasks.id",
                    (req.token, req.task_ids),
                )
            ).fetchall()
        requeued = sorted(r[0] for r in rows)
        return DeadLetterRequeueResult(
            changed=bool(requeued),
            detail=f"requeued {len(requeued)} of {len(req.task_ids)} dead-lettered tasks",
            requeued=requeued,
            skipped=sorted(set(req.task_ids) - set(requeued)),
        )

    @activity.defn
    async def task_states(self, req: TaskStatesRequest) -> TaskStates:
        """The current state of given tasks, for a runbook's verify step."""
        async with await self._database.connect() as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, status, worker_id, retries, max_retries, last_error, updated_at"
                    " FROM tasks WHERE id = ANY(%s)",
                    (req.task_ids,),
                )
            ).fetchall()
        fields = ("id", "status", "worker_id", "retries", "max_retries", "last_error", "updated_at")
        states = [TaskState.model_validate(dict(zip(fields, row, strict=True))) for row in rows]
        return TaskStates(tasks={s.id: s for s in states})

    @staticmethod
    async def _require_worker(conn: psycopg.AsyncConnection[Any], worker_id: str) -> None:
        row = await (
            await conn.execute("SELECT 1 FROM workers WHERE id = %s", (worker_id,))
        ).fetchone()
        if row is None:
            raise ApplicationError(
                f"unknown worker {worker_id}: no such row in workers; check the id against "
                "`kubectl -n astra get pods` (pod name = worker id) or "
                "`SELECT id FROM workers ORDER BY started_at DESC`",
                non_retryable=True,
            )
