"""Redis Failure end to end, on real Redis servers: a primary with a replica (and Sentinel), the
simulated Astra writing through them under load, PostgreSQL as the truth the rebuild reads.

Each test starts its own Redis servers (they are killed or flushed); PostgreSQL is the session's.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.redis_nodes import (
    Promote,
    RebuildStreams,
    RedisNodeActivities,
    RestoreMarker,
)
from activities.redis_store import AstraKeys
from runtime.astra_config import REDIS_URL_KEY
from runtime.settings import Settings
from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane, RedisServer, scratch_dir
from sandbox.servers import faults as server_faults
from sandbox.servers.redis import start_redis
from tests.conftest_data import new_prefix
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import RunningAstra, config_value, running_astra
from tests.helpers import decide, start
from workers.worker import running_worker
from workflows.models import Outcome
from workflows.redis_failure import (
    APPROVE_FAILOVER,
    APPROVE_REBUILD,
    RedisFailure,
    RedisFailureRequest,
)


async def entries(client: aioredis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """A whole stream (the tests' are short); the client decodes responses to str."""
    return cast(list[tuple[str, dict[str, str]]], await client.xrange(key))


@dataclass
class Stage:
    plane: DataPlane
    astra: RunningAstra
    nodes: RedisNodeActivities
    settings: Settings
    """The worker's: the test's, with the stage's database, Redis and topology."""

    @property
    def keys(self) -> AstraKeys:
        return self.nodes.keys

    def server(self, name: str) -> RedisServer:
        return next(s for s in self.plane.redis if s.name == name)

    async def queued(self, name: str) -> Counter[str]:
        """Every task id on every shard stream of one server, with its number of entries."""
        client = self.server(name).client()
        try:
            counts: Counter[str] = Counter()
            async for key in client.scan_iter(match=self.keys.task_stream_pattern):
                for _, fields in await entries(client, key):
                    counts[fields["task_id"]] += 1
            return counts
        finally:
            await client.aclose()

    async def dead_letters(self, name: str) -> Counter[str]:
        client = self.server(name).client()
        try:
            return Counter(f["task_id"] for _, f in await entries(client, self.keys.dead_letter))
        finally:
            await client.aclose()

    async def role(self, name: str) -> str:
        client = self.server(name).client()
        try:
            return str((await client.role())[0])
        finally:
            await client.aclose()

    async def pending(self) -> set[str]:
        return {
            r[0] for r in await self.astra.query("SELECT id FROM tasks WHERE status = 'pending'")
        }


@asynccontextmanager
async def staged(
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
    *,
    sentinel: bool = False,
) -> AsyncIterator[Stage]:
    """The :func:`stage_of`, and the production worker with its topology."""
    async with stage_of(settings, kube, pg_dsn, tmp_path, sentinel=sentinel) as stage:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with running_worker(client, stage.settings, executor):
                yield stage


@asynccontextmanager
async def stage_of(
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
    *,
    sentinel: bool = False,
) -> AsyncIterator[Stage]:
    """Redis servers of the test's own, the simulated Astra on them and the session's database,
    and the settings of a worker with their topology."""
    directory = scratch_dir("astra-test-redis-failure-")
    try:
        servers = await start_redis(directory, replica=True, sentinel=sentinel, down_after_ms=2_000)
        plane = DataPlane(postgres_url=pg_dsn, redis_url=servers[0].url, redis=servers)
        topology = tmp_path / "data-plane-topology.json"
        plane.topology().write(topology)
        target = SandboxTarget(dsn=pg_dsn, redis_url=plane.redis_url, key_prefix=new_prefix())
        worker_settings = settings.model_copy(
            update={
                "database_url": pg_dsn,
                "redis_url": plane.redis_url,
                "redis_key_prefix": target.key_prefix,
                "data_plane_topology": topology,
            }
        )
        nodes = RedisNodeActivities(topology, pg_dsn, target.key_prefix)
        try:
            async with running_astra(target, kube.url) as astra:
                yield Stage(plane=plane, astra=astra, nodes=nodes, settings=worker_settings)
        finally:
            await plane.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def request(**params: object) -> RedisFailureRequest:
    return RedisFailureRequest.model_validate(
        {
            "requester": "alice",
            "verify_timeout_seconds": 20,
            **params,
        }
    )


async def assert_queued_exactly_once(stage: Stage, node: str) -> None:
    """Held between ticks: each pending task on its stream once, nothing else on the streams."""
    async with stage.astra.between_ticks():
        queued, pending = await stage.queued(node), await stage.pending()
    assert set(queued) == pending
    assert not [t for t, n in queued.items() if n > 1]


async def lose_the_primary(stage: Stage) -> None:
    """The primary killed between two of Astra's ticks, then tasks pile up in PostgreSQL that
    never reach a stream."""
    await stage.astra.advance(5)
    async with stage.astra.between_ticks():
        fault = await server_faults.redis_primary_down(stage.plane)
    assert fault.server == "primary"
    await stage.astra.advance(40)


async def assert_failed_over_to_the_replica(stage: Stage, kube: KubeSandbox) -> None:
    """The replica is the primary, the platform's endpoint names it, and it holds each pending
    task once."""
    assert await stage.role("replica") == "master"
    assert config_value(kube, REDIS_URL_KEY) == stage.server("replica").url
    await assert_queued_exactly_once(stage, "replica")


async def test_a_killed_primary_fails_over_with_approval_and_every_pending_task_is_queued_once(
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with staged(client, settings, kube, pg_dsn, tmp_path) as stage:
        await lose_the_primary(stage)

        handle = await start(client, RedisFailure, request(), task_queue)
        await decide(handle, APPROVE_FAILOVER, "bob")
        result = await handle.result()

        assert result.outcome == Outcome.DONE, result.summary
        await assert_failed_over_to_the_replica(stage, kube)
        assert "workers heartbeat" in result.summary
        assert "put back 0 pending tasks" not in result.summary  # what piled up in the outage

        again = await (await start(client, RedisFailure, request(), task_queue)).result()
        assert again.outcome == Outcome.NO_CHANGE, again.summary


@pytest.mark.slow
async def test_a_flushed_redis_is_rebuilt_without_a_failover(
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with staged(client, settings, kube, pg_dsn, tmp_path) as stage:
        await stage.astra.advance(20)  # some tasks exhaust their retries: dead letters
        async with stage.astra.between_ticks():
            await server_faults.redis_data_loss(stage.plane)
        dead = {
            r[0]
            for r in await stage.astra.query("SELECT id FROM tasks WHERE status = 'dead_letter'")
        }

        handle = await start(client, RedisFailure, request(), task_queue)
        await decide(handle, APPROVE_REBUILD, "bob")
        result = await handle.result()

        assert result.outcome == Outcome.DONE, result.summary
        assert await stage.role("primary") == "master"
        assert config_value(kube, REDIS_URL_KEY) == stage.server("primary").url
        await assert_queued_exactly_once(stage, "primary")
        letters = await stage.dead_letters("primary")
        assert dead <= set(letters) and max(letters.values(), default=1) == 1
        client_ = stage.server("primary").client()
        try:
            assert await client_.exists(stage.keys.data_marker)
        finally:
            await client_.aclose()


async def test_a_dry_run_reports_and_changes_nothing(
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with staged(client, settings, kube, pg_dsn, tmp_path) as stage:
        await stage.astra.advance(3)
        async with stage.astra.between_ticks():
            await server_faults.redis_primary_down(stage.plane)
        await stage.astra.advance(3)
        before = await stage.queued("replica")

        result = await (
            await start(client, RedisFailure, request(dry_run=True), task_queue)
        ).result()

        assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run:"), result
        assert "would promote replica" in " ".join(s.detail for s in result.steps)
        assert await stage.role("replica") == "slave"
        assert config_value(kube, REDIS_URL_KEY) == stage.server("primary").url
        assert await stage.queued("replica") == before


@pytest.mark.slow
async def test_sentinel_fails_over_and_the_runbook_follows_it(
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with staged(client, settings, kube, pg_dsn, tmp_path, sentinel=True) as stage:
        await stage.astra.advance(3)
        async with stage.astra.between_ticks():
            await server_faults.redis_primary_down(stage.plane)

        handle = await start(client, RedisFailure, request(failover_timeout_seconds=30), task_queue)
        await decide(handle, APPROVE_FAILOVER, "bob")
        result = await handle.result()

        assert result.outcome == Outcome.DONE, result.summary
        await assert_failed_over_to_the_replica(stage, kube)


async def test_each_repair_run_twice_changes_the_world_once(
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with staged(client, settings, kube, pg_dsn, tmp_path) as stage:
        await stage.astra.advance(3)
        async with stage.astra.between_ticks():
            await server_faults.redis_primary_down(stage.plane)
        await stage.astra.advance(20)  # tasks pile up in PostgreSQL, never reach a stream
        async with stage.astra.between_ticks():
            nodes = stage.nodes
            promote = Promote(node="replica", token="t")
            first, second = await nodes.promote(promote), await nodes.promote(promote)
            assert (first.changed, second.changed) == (True, False)

            rebuild = RebuildStreams(node="replica", publish_grace_seconds=0, token="t")
            first_rebuild = await ActivityEnvironment().run(nodes.rebuild_streams, rebuild)
            queued = await stage.queued("replica")
            second_rebuild = await ActivityEnvironment().run(nodes.rebuild_streams, rebuild)
            assert first_rebuild.requeued + first_rebuild.dead_letters > 0, first_rebuild.detail
            assert (second_rebuild.changed, second_rebuild.requeued) == (False, 0)
            assert (
                await stage.queued("replica")
                == queued
                == Counter(dict.fromkeys(await stage.pending(), 1))
            )

            marker = RestoreMarker(node="replica", publish_grace_seconds=0, token="t")
            client_ = stage.server("replica").client()
            try:
                await client_.delete(stage.keys.data_marker)
                assert (await nodes.restore_marker(marker)).changed
                assert not (await nodes.restore_marker(marker)).changed
                assert await client_.exists(stage.keys.data_marker) == 1
            finally:
                await client_.aclose()
