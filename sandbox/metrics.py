"""The sandbox's Prometheus exposition: the metrics Astra exports and the alert rules watch.

Rendered on each scrape from PostgreSQL and Redis, so the numbers are the sandbox's real state
(a lost worker's heartbeat really ages) and the SQL and Prometheus metric sources agree. Given the
pool Astra runs (its worker pods), a worker's heartbeat age is exported while its pod exists, as
Astra's is: a worker the worker-lost runbook replaced stops being reported, and its alert resolves.
"""

import math
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

import psycopg
import redis.asyncio as aioredis

from activities.redis_store import AstraKeys

STATUSES = ("pending", "running", "succeeded", "failed", "dead_letter")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(float(value))


async def render_metrics(
    dsn: str, redis_url: str, key_prefix: str = "astra:", pool: Collection[str] | None = None
) -> str:
    """The exposition text of heartbeat age per worker (of ``pool`` only, when given), tasks by
    status, the backlog of each shard and LLM cost."""
    keys = AstraKeys(key_prefix)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        workers = [r[0] for r in await (await conn.execute("SELECT id FROM workers")).fetchall()]
        by_status: dict[str, int] = dict(
            await (
                await conn.execute("SELECT status, count(*) FROM tasks GROUP BY status")
            ).fetchall()
        )
        backlog = await (
            await conn.execute(
                # Every shard up to the highest one used, so an idle shard reads 0 rather
                # than vanishing (a hot shard beside idle ones is the imbalance to see).
                "SELECT s, count(t.id) FROM generate_series(0, (SELECT max(shard) FROM tasks)) s"
                " LEFT JOIN tasks t ON t.shard = s AND t.status IN ('pending', 'running')"
                " GROUP BY s ORDER BY s"
            )
        ).fetchall()
        costs = await (
            await conn.execute(
                "SELECT tenant, agent_id, model, sum(cost_usd) FROM llm_usage"
                " GROUP BY tenant, agent_id, model ORDER BY tenant, agent_id, model"
            )
        ).fetchall()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        heartbeat_keys = [k async for k in client.scan_iter(match=keys.heartbeat_pattern)]
        values = await client.mget(heartbeat_keys) if heartbeat_keys else []
    finally:
        await client.aclose()
    now_ms = time.time() * 1000
    last_seen = {
        keys.worker_of(k): float(v) for k, v in zip(heartbeat_keys, values, strict=True) if v
    }
    lines = [
        "# HELP astra_worker_heartbeat_age_seconds Seconds since the worker's last heartbeat"
        " (+Inf: registered but never heartbeat, or its key is gone).",
        "# TYPE astra_worker_heartbeat_age_seconds gauge",
    ]
    known = set(workers) | set(last_seen)
    for worker in sorted(known if pool is None else known & set(pool)):
        age = max(0.0, (now_ms - last_seen[worker]) / 1000) if worker in last_seen else math.inf
        lines.append(
            f"astra_worker_heartbeat_age_seconds{_labels(worker_id=worker)} {_number(age)}"
        )
    lines += [
        "# HELP astra_tasks_total Tasks by current status.",
        "# TYPE astra_tasks_total gauge",
    ]
    lines += [f"astra_tasks_total{_labels(status=s)} {int(by_status.get(s, 0))}" for s in STATUSES]
    lines += [
        "# HELP astra_shard_backlog Tasks waiting or running, by scheduler shard.",
        "# TYPE astra_shard_backlog gauge",
    ]
    lines += [f"astra_shard_backlog{_labels(shard=str(s))} {int(n)}" for s, n in backlog]
    lines += [
        "# HELP astra_llm_cost_usd_total LLM spend in US dollars.",
        "# TYPE astra_llm_cost_usd_total counter",
    ]
    lines += [
        f"astra_llm_cost_usd_total{_labels(tenant=t, agent_id=a, model=m)} {_number(float(c))}"
        for t, a, m, c in costs
    ]
    return "\n".join(lines) + "\n"


class MetricsApp:
    """A minimal ASGI app serving ``render_metrics`` on GET (mount it at ``/metrics``); ``pool``
    says which workers run now (the load generator's view of the cluster)."""

    def __init__(
        self,
        dsn: str,
        redis_url: str,
        key_prefix: str = "astra:",
        pool: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await self._respond(send, 405, b"method not allowed\n", "text/plain")
            return
        pool = self._pool() if self._pool is not None else None
        body = await render_metrics(self._dsn, self._redis_url, self._key_prefix, pool)
        payload = b"" if scope["method"] == "HEAD" else body.encode()
        await self._respond(send, 200, payload, CONTENT_TYPE)

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
