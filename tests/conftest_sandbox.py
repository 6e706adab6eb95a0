"""Fixtures for end-to-end runbook tests: a running simulated Astra and a worker that acts on it.

``astra`` plays Astra on the test's own database, Redis prefix and sandbox cluster: the cluster's
ready ``astra-worker`` pods heartbeat and work, and the ``astra-config`` knobs are obeyed, so a
runbook's actions have the effects they would have on the real platform.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes.client import CoreV1Api
from temporalio.client import Client
from temporalio.worker import Worker

from activities.kubernetes import unauthenticated_client
from runtime.astra_config import AstraEndpoints
from runtime.data_plane import DataPlaneTopology, RedisNode
from runtime.settings import Settings
from sandbox.faults import SandboxTarget
from sandbox.kube.seed import ASTRA_NAMESPACE, CONFIG_MAP
from sandbox.loadgen import LoadConfig, LoadGenerator
from sandbox.platform import ClusterView
from sandbox.servers.openbao import OpenBaoServer
from tests.conftest_kube import KubeSandbox, eventually
from workers.worker import running_worker

TICK_SECONDS = 0.1


@dataclass
class RunningAstra:
    """The simulated platform of one test, and how to wait for it to move."""

    target: SandboxTarget
    generator: LoadGenerator
    tick_lock: asyncio.Lock
    ticks: int = 0

    async def advance(self, ticks: int = 1) -> None:
        """Wait until the load generator has run ``ticks`` more ticks."""
        goal = self.ticks + ticks
        await eventually(lambda: self.ticks >= goal, timeout=10, message=f"{ticks} ticks")

    @contextlib.asynccontextmanager
    async def between_ticks(self) -> AsyncIterator[None]:
        """Hold the platform still, so a fault lands between ticks rather than inside one."""
        async with self.tick_lock:
            yield

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.target.dsn) as conn:
            return await (await conn.execute(sql.encode(), params or None)).fetchall()


@contextlib.asynccontextmanager
async def running_astra(target: SandboxTarget, kube_url: str) -> AsyncIterator[RunningAstra]:
    """Astra played on ``target`` and the sandbox cluster at ``kube_url``, ticking until the
    block ends."""
    api = unauthenticated_client(kube_url)
    # Astra is deployed on the test's data plane: its pods connect to what ``astra-config``
    # names, as the dev stack's seed names the dev data plane.
    endpoints = AstraEndpoints(database_url=target.dsn, redis_url=target.redis_url)
    CoreV1Api(api).patch_namespaced_config_map(
        CONFIG_MAP, ASTRA_NAMESPACE, {"data": endpoints.config_data()}
    )
    generator = LoadGenerator(
        target.dsn,
        target.redis_url,
        [],
        LoadConfig(seed=7, retry_delay_seconds=0.5),
        key_prefix=target.key_prefix,
        cluster=ClusterView(api),
    )
    running = RunningAstra(target=target, generator=generator, tick_lock=asyncio.Lock())

    stop = asyncio.Event()

    async def play() -> None:
        while not stop.is_set():
            async with running.tick_lock:
                await generator.step()
            running.ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)

    # Stopped by an event, not by cancelling it mid-tick: a cancellation landing inside the
    # database or Redis client can be swallowed there and leave the loop running forever.
    task = asyncio.create_task(play())
    try:
        await running.advance(2)
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await generator.aclose()
        api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
async def astra(data_plane: SandboxTarget, kube: KubeSandbox) -> AsyncIterator[RunningAstra]:
    async with running_astra(data_plane, kube.url) as running:
        yield running


@pytest.fixture
def astra_settings(
    settings: Settings,
    data_plane: SandboxTarget,
    openbao: OpenBaoServer,
    vault_sources: Path,
    tmp_path: Path,
) -> Settings:
    """The test's settings, pointed at its own database (astra-ops's records in it too, as when
    the two share one) and Redis key prefix, at a data-plane
    topology naming its Redis (a test may rewrite it: the activities read it per call), and at
    the session's OpenBao with its source root."""
    topology = tmp_path / "data-plane-topology.json"
    url = data_plane.redis_url
    DataPlaneTopology(redis=[RedisNode(name="redis", url=url, platform_url=url)]).write(topology)
    return settings.model_copy(
        update={
            "database_url": data_plane.dsn,
            "state_database_url": data_plane.dsn,
            "redis_url": data_plane.redis_url,
            "redis_key_prefix": data_plane.key_prefix,
            "data_plane_topology": topology,
            "vault_addr": openbao.address,
            "vault_token_file": openbao.token_file,
            "vault_source_root": vault_sources,
        }
    )


@pytest.fixture
async def astra_worker(client: Client, astra_settings: Settings) -> AsyncIterator[Worker]:
    """The production worker composition, acting on this test's data plane."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, astra_settings, executor) as worker:
            yield worker


def worker_pods(kube: KubeSandbox) -> set[str]:
    """The names (worker ids) of the ``astra-worker`` pods in the sandbox's ``astra`` namespace."""
    return {p["metadata"]["name"] for p in kube.cluster.pods("astra", {"app": "astra-worker"})}


def config_value(kube: KubeSandbox, key: str) -> str | None:
    """One key of the sandbox's ``astra-config``; None when the key is absent."""
    config = kube.cluster.get("configmaps", "astra", "astra-config")
    assert config is not None
    value: str | None = config["data"].get(key)
    return value
