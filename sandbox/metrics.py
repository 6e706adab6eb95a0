"""The sandbox's Prometheus exposition: the metrics Astra exports and the alert rules watch.

Rendered on each scrape from PostgreSQL and Redis, so the numbers are the sandbox's real state
(a lost worker's heartbeat really ages) and the SQL and Prometheus metric sources agree. Given the
pool Astra runs (its worker pods), a worker's heartbeat age is exported while its pod exists, as
Astra's is: a worker the worker-lost runbook replaced stops being reported, and its alert resolves.

A scrape while PostgreSQL or Redis is down still answers: it says which dependency is down
(``astra_dependency_up``), how often Astra's services failed to reach it
(``astra_connection_errors_total``, counted by the load generator) and exports what the other one
still tells. Heartbeat ages are left out while Redis is down rather than reported as never seen:
that would page worker-lost for every worker while the outage is the Redis alert's.
"""

import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import psycopg
import redis.asyncio as aioredis

from activities.redis_store import AstraKeys
from sandbox.loadgen import POSTGRES, REDIS, LoadGenerator, connect_database, connect_redis

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


@dataclass(frozen=True)
class _Database:
    workers: list[str]
    by_status: dict[str, int]
    backlog: list[tuple[int, int]]
    """(shard, tasks pending or running) for every shard up to the highest one used"""
    costs: list[tuple[str, str, str, Decimal]]


@dataclass(frozen=True)
class _Redis:
    last_seen: dict[str, float]
    marker_present: bool


async def _read_database(dsn: str) -> _Database | None:
    """What PostgreSQL says, or None when it does not answer."""
    try:
        async with await connect_database(dsn) as conn:
            workers = await (await conn.execute("SELECT id FROM workers")).fetchall()
            by_status = await (
                await conn.execute("SELECT status, count(*) FROM tasks GROUP BY status")
            ).fetchall()
            backlog = await (
                await conn.execute(
                    # Every shard up to the highest one used, so an idle shard reads 0 rather
                    # than vanishing (a hot shard beside idle ones is the imbalance to see).
                    "SELECT s, count(t.id) FROM generate_series(0, (SELECT max(shard) FROM tasks))"
                    " s LEFT JOIN tasks t ON t.shard = s AND t.status IN ('pending', 'running')"
                    " GROUP BY s ORDER BY s"
                )
            ).fetchall()
            costs = await (
                await conn.execute(
                    "SELECT tenant, agent_id, model, sum(cost_usd) FROM llm_usage"
                    " GROUP BY tenant, agent_id, model ORDER BY tenant, agent_id, model"
                )
            ).fetchall()
    except (psycopg.Error, OSError):
        return None
    return _Database(
        workers=[r[0] for r in workers],
        by_status={r[0]: int(r[1]) for r in by_status},
        backlog=[(int(r[0]), int(r[1])) for r in backlog],
        costs=[(r[0], r[1], r[2], r[3]) for r in costs],
    )


async def _read_redis(redis_url: str, keys: AstraKeys) -> _Redis | None:
    """What Redis says, or None when it does not answer."""
    client = connect_redis(redis_url)
    try:
        heartbeat_keys = [k async for k in client.scan_iter(match=keys.heartbeat_pattern)]
        values = cast(list[str | None], await client.mget(heartbeat_keys) if heartbeat_keys else [])
        marker_present = bool(await client.exists(keys.data_marker))
    except (aioredis.RedisError, OSError):
        return None
    finally:
        await client.aclose()
    last_seen = {
        keys.worker_of(k): float(v) for k, v in zip(heartbeat_keys, values, strict=True) if v
    }
    return _Redis(last_seen=last_seen, marker_present=marker_present)


async def render_metrics(
    dsn: str,
    redis_url: str,
    key_prefix: str = "astra:",
    pool: Collection[str] | None = None,
    connection_errors: Mapping[tuple[str, str], int] | None = None,
    certificates: Mapping[str, datetime] | None = None,
) -> str:
    """The exposition text of heartbeat age per worker (of ``pool`` only, when given), tasks by
    status, each shard's backlog, LLM cost, whether each dependency answers,
    ``connection_errors`` (the load generator's counts by service and dependency) and the time
    each TLS service's certificate has left (``certificates``: when each expires), as far as
    PostgreSQL and Redis answer."""
    keys = AstraKeys(key_prefix)
    database = await _read_database(dsn)
    redis = await _read_redis(redis_url, keys)
    lines = [
        "# HELP astra_dependency_up Whether the dependency answered this scrape (1) or not (0).",
        "# TYPE astra_dependency_up gauge",
        f"astra_dependency_up{_labels(dependency=POSTGRES)} {int(database is not None)}",
        f"astra_dependency_up{_labels(dependency=REDIS)} {int(redis is not None)}",
    ]
    lines += [
        "# HELP astra_connection_errors_total Attempts of Astra's pods to use a dependency"
        " that failed.",
        "# TYPE astra_connection_errors_total counter",
    ]
    lines += [
        f"astra_connection_errors_total{_labels(service=s, dependency=d)} {count}"
        for (s, d), count in sorted((connection_errors or {}).items())
    ]
    lines += [
        "# HELP astra_tls_certificate_expiry_seconds Seconds until the certificate in the"
        " service's TLS Secret expires (negative: expired).",
        "# TYPE astra_tls_certificate_expiry_seconds gauge",
    ]
    now = time.time()
    lines += [
        f"astra_tls_certificate_expiry_seconds{_labels(service=service)} "
        f"{_number(round(not_after.timestamp() - now))}"
        for service, not_after in sorted((certificates or {}).items())
    ]
    if redis is not None:
        lines += [
            "# HELP astra_redis_data_marker_present Whether Redis holds the data marker Astra"
            " wrote when it was provisioned (0: Redis answers but lost its data).",
            "# TYPE astra_redis_data_marker_present gauge",
            f"astra_redis_data_marker_present {int(redis.marker_present)}",
        ]
        lines += _heartbeats(database, redis, pool)
    if database is not None:
        lines += [
            "# HELP astra_tasks_total Tasks by current status.",
            "# TYPE astra_tasks_total gauge",
        ]
        lines += [
            f"astra_tasks_total{_labels(status=s)} {database.by_status.get(s, 0)}" for s in STATUSES
        ]
        lines += [
            "# HELP astra_shard_backlog Tasks waiting or running, by scheduler shard.",
            "# TYPE astra_shard_backlog gauge",
        ]
        lines += [f"astra_shard_backlog{_labels(shard=str(s))} {n}" for s, n in database.backlog]
        lines += [
            "# HELP astra_llm_cost_usd_total LLM spend in US dollars.",
            "# TYPE astra_llm_cost_usd_total counter",
        ]
        lines += [
            f"astra_llm_cost_usd_total{_labels(tenant=t, agent_id=a, model=m)} {_number(float(c))}"
            for t, a, m, c in database.costs
        ]
    return "\n".join(lines) + "\n"


def _heartbeats(
    database: _Database | None, redis: _Redis, pool: Collection[str] | None
) -> list[str]:
    """Heartbeat age per worker Redis or PostgreSQL knows (of ``pool`` only, when given)."""
    now_ms = time.time() * 1000
    lines = [
        "# HELP astra_worker_heartbeat_age_seconds Seconds since the worker's last heartbeat"
        " (+Inf: registered but never heartbeat, or its key is gone).",
        "# TYPE astra_worker_heartbeat_age_seconds gauge",
    ]
    known = set(database.workers if database else []) | set(redis.last_seen)
    for worker in sorted(known if pool is None else known & set(pool)):
        seen = redis.last_seen.get(worker)
        age = math.inf if seen is None else max(0.0, (now_ms - seen) / 1000)
        lines.append(
            f"astra_worker_heartbeat_age_seconds{_labels(worker_id=worker)} {_number(age)}"
        )
    return lines


class MetricsApp:
    """A minimal ASGI app serving ``render_metrics`` on GET (mount it at ``/metrics``)."""

    def __init__(self, dsn: str, redis_url: str, key_prefix: str = "astra:") -> None:
        self._dsn = dsn
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._platform: LoadGenerator | None = None

    @classmethod
    def of(cls, platform: LoadGenerator) -> "MetricsApp":
        """The /metrics of a running platform (the load generator): the workers whose pods run,
        its connection errors, read from the endpoints ``astra-config`` names now, as an exporter
        configured from the same ConfigMap would; and its TLS Secrets' certificates."""
        app = cls(
            platform.endpoints.database_url, platform.endpoints.redis_url, platform.keys.prefix
        )
        app._platform = platform
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await self._respond(send, 405, b"method not allowed\n", "text/plain")
            return
        platform = self._platform
        if platform is None:
            body = await render_metrics(self._dsn, self._redis_url, self._key_prefix)
        else:
            body = await render_metrics(
                platform.endpoints.database_url,
                platform.endpoints.redis_url,
                self._key_prefix,
                platform.workers,
                platform.connection_errors,
                await platform.cluster.certificate_expiry() if platform.cluster else None,
            )
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
