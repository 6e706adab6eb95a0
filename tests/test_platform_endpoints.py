"""The simulated Astra reaches PostgreSQL and Redis through the endpoints in ``astra-config``.

As pods do: a config change alone moves no traffic; a rolling restart of the services that hold
connections moves it. An endpoint that stops answering costs counted connection errors, never
the platform, which recovers by itself when it answers again; /metrics keeps answering.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import psycopg
import redis.asyncio as aioredis
from kubernetes.client import AppsV1Api, CoreV1Api
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from activities.redis_store import AstraKeys
from runtime.astra_config import AstraEndpoints
from sandbox.faults import SandboxTarget
from sandbox.loadgen import LoadGenerator
from sandbox.metrics import MetricsApp
from tests.conftest_data import NewDatabase, delete_prefix, migrated
from tests.conftest_kube import KubeSandbox, eventually
from tests.conftest_sandbox import running_astra
from tests.tcp_proxy import proxy_to

NS = "astra"
HOLDING_CONNECTIONS = ("astra-scheduler", "astra-worker", "agent-service")


async def footprint(dsn: str) -> tuple[Any, ...]:
    """What Astra has written to a database: changes to any of its tables change this."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM tasks), (SELECT max(updated_at) FROM tasks),"
                " (SELECT count(*) FROM llm_usage), (SELECT count(*) FROM workers)"
            )
        ).fetchone()
    assert row is not None
    return tuple(row)


async def heartbeats(redis_url: str, prefix: str) -> dict[str, str]:
    """Every worker's heartbeat in one Redis, by worker id."""
    keys = AstraKeys(prefix)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        found = [k async for k in client.scan_iter(match=keys.heartbeat_pattern)]
        values = cast(list[str], await client.mget(found) if found else [])
    finally:
        await client.aclose()
    return {keys.worker_of(k): v for k, v in zip(found, values, strict=True)}


def another_redis_database(url: str) -> str:
    """The same Redis server, another of its numbered databases: a second endpoint."""
    parts = urlsplit(url)
    current = int(parts.path.strip("/") or 0)
    return parts._replace(path=f"/{(current + 1) % 16}").geturl()


def pod_uids(kube: KubeSandbox) -> set[str]:
    return {
        pod["metadata"]["uid"]
        for service in HOLDING_CONNECTIONS
        for pod in kube.cluster.pods(NS, {"app": service})
    }


def worker_pods(kube: KubeSandbox) -> set[str]:
    return {p["metadata"]["name"] for p in kube.cluster.pods(NS, {"app": "astra-worker"})}


def rolling_restart(kube: KubeSandbox, deployment: str) -> None:
    """What `kubectl rollout restart` does: a new pod template, so every pod is replaced."""
    stamp = dt.datetime.now(dt.UTC).isoformat()
    AppsV1Api(kube.api).patch_namespaced_deployment(
        deployment,
        NS,
        {
            "spec": {
                "template": {
                    "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}
                }
            }
        },
    )


async def scrape(app: MetricsApp) -> tuple[int, list[str]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/metrics")
    return response.status_code, response.text.splitlines()


def value(lines: list[str], series: str) -> float | None:
    """The sample of one series in an exposition, None when it is not exported."""
    for line in lines:
        name, _, sample = line.rpartition(" ")
        if name == series:
            return float(sample)
    return None


def errors(generator: LoadGenerator, dependency: str) -> dict[str, int]:
    return {
        service: count
        for (service, dep), count in generator.connection_errors.items()
        if dep == dependency
    }


async def test_repointing_moves_the_traffic_only_when_the_services_are_rolled(
    data_plane: SandboxTarget, new_database: NewDatabase, kube: KubeSandbox
) -> None:
    new = AstraEndpoints(
        database_url=await migrated(await new_database()),
        redis_url=another_redis_database(data_plane.redis_url),
    )
    prefix = data_plane.key_prefix
    try:
        async with running_astra(data_plane, kube.url) as astra:
            CoreV1Api(kube.api).patch_namespaced_config_map(
                "astra-config", NS, {"data": new.config_data()}
            )
            old_writes = await footprint(data_plane.dsn)
            await astra.advance(3)
            # The pods keep the endpoints they started with: nothing moved.
            assert await footprint(new.database_url) == (0, None, 0, 0)
            assert await heartbeats(new.redis_url, prefix) == {}
            assert await footprint(data_plane.dsn) != old_writes

            before = pod_uids(kube)
            for deployment in HOLDING_CONNECTIONS:
                rolling_restart(kube, deployment)
            await eventually(
                lambda: not pod_uids(kube) & before and len(pod_uids(kube)) == 6,
                message="every pod of the scheduler, the workers and the agents replaced",
            )
            await astra.advance(2)
            old_writes = await footprint(data_plane.dsn)
            old_beats = await heartbeats(data_plane.redis_url, prefix)
            await astra.advance(3)
            assert await footprint(data_plane.dsn) == old_writes
            assert await heartbeats(data_plane.redis_url, prefix) == old_beats
            tasks, _, llm_calls, workers = await footprint(new.database_url)
            assert tasks > 0 and llm_calls > 0 and workers == 3
            assert set(await heartbeats(new.redis_url, prefix)) == worker_pods(kube)
    finally:
        await delete_prefix(prefix, new.redis_url)


async def test_a_database_that_stops_answering_costs_counted_errors_until_it_answers_again(
    data_plane: SandboxTarget, kube: KubeSandbox
) -> None:
    server = conninfo_to_dict(data_plane.dsn)
    async with proxy_to(str(server["host"]), int(server["port"] or 5432)) as proxy:
        proxied = make_conninfo(data_plane.dsn, port=str(proxy.port))
        target = data_plane.model_copy(update={"dsn": proxied})
        async with running_astra(target, kube.url) as astra:
            metrics = MetricsApp.of(astra.generator)
            status, lines = await scrape(metrics)
            assert value(lines, 'astra_dependency_up{dependency="postgres"}') == 1

            await proxy.stop()
            before = errors(astra.generator, "postgres")
            await astra.advance(3)
            during = errors(astra.generator, "postgres")
            assert all(during[s] > before[s] for s in HOLDING_CONNECTIONS), during
            status, lines = await scrape(metrics)
            assert status == 200
            assert value(lines, 'astra_dependency_up{dependency="postgres"}') == 0
            assert value(lines, 'astra_dependency_up{dependency="redis"}') == 1
            worker_errors = value(
                lines, 'astra_connection_errors_total{service="astra-worker",dependency="postgres"}'
            )
            assert (worker_errors or 0) >= during["astra-worker"]
            assert value(lines, 'astra_tasks_total{status="pending"}') is None
            assert any(line.startswith("astra_worker_heartbeat_age_seconds{") for line in lines)

            written = await footprint(data_plane.dsn)
            await proxy.start()

            async def writing_again() -> bool:
                return await footprint(data_plane.dsn) != written

            await eventually(writing_again, timeout=10, message="the platform writes again")
            recovered = errors(astra.generator, "postgres")
            await astra.advance(2)
            assert errors(astra.generator, "postgres") == recovered
            status, lines = await scrape(metrics)
            assert value(lines, 'astra_dependency_up{dependency="postgres"}') == 1


async def test_a_redis_that_stops_answering_costs_counted_errors_until_it_answers_again(
    data_plane: SandboxTarget, kube: KubeSandbox
) -> None:
    server = urlsplit(data_plane.redis_url)
    async with proxy_to(server.hostname or "127.0.0.1", server.port or 6379) as proxy:
        proxied = server._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        target = data_plane.model_copy(update={"redis_url": proxied})
        async with running_astra(target, kube.url) as astra:
            metrics = MetricsApp.of(astra.generator)
            await proxy.stop()
            before = errors(astra.generator, "redis")["astra-worker"]
            await astra.advance(3)
            assert errors(astra.generator, "redis")["astra-worker"] > before
            status, lines = await scrape(metrics)
            assert status == 200
            assert value(lines, 'astra_dependency_up{dependency="redis"}') == 0
            assert value(lines, 'astra_dependency_up{dependency="postgres"}') == 1
            # Unknown is not "never heartbeat": no worker is reported lost for Redis's outage.
            assert not any(line.startswith("astra_worker_heartbeat_age_seconds{") for line in lines)
            assert value(lines, 'astra_tasks_total{status="pending"}') is not None

            stale = await heartbeats(data_plane.redis_url, data_plane.key_prefix)
            await proxy.start()

            async def beating_again() -> bool:
                now = await heartbeats(data_plane.redis_url, data_plane.key_prefix)
                return bool(now) and all(now[w] != stale.get(w) for w in now)

            await eventually(beating_again, timeout=10, message="the workers heartbeat again")
            status, lines = await scrape(metrics)
            assert value(lines, 'astra_dependency_up{dependency="redis"}') == 1
            assert value(lines, "astra_redis_data_marker_present") == 1


async def test_metrics_report_lost_redis_data_when_the_marker_is_gone(
    data_plane: SandboxTarget,
) -> None:
    generator = LoadGenerator(
        data_plane.dsn, data_plane.redis_url, ["w-1"], key_prefix=data_plane.key_prefix
    )
    try:
        await generator.step()
    finally:
        await generator.aclose()
    metrics = MetricsApp(data_plane.dsn, data_plane.redis_url, data_plane.key_prefix)
    _, lines = await scrape(metrics)
    assert value(lines, "astra_redis_data_marker_present") == 1
    await delete_prefix(
        data_plane.key_prefix, data_plane.redis_url
    )  # everything this sandbox kept in Redis: a flush
    _, lines = await scrape(metrics)
    assert value(lines, 'astra_dependency_up{dependency="redis"}') == 1
    assert value(lines, "astra_redis_data_marker_present") == 0
