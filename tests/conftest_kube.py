"""The ``kube`` fixture: a seeded sandbox cluster served over HTTP, one per test.

``tests/conftest.py`` imports ``kube`` from here. Each test gets a fresh cluster, so rollouts and
faults from one test never leak into the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from kubernetes.client import ApiClient

from activities.kubernetes import unauthenticated_client
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra

TEST_ROLLOUT_SECONDS = 0.2


@dataclass
class KubeSandbox:
    """What a test needs to drive the sandbox: the store, the server and a real client."""

    cluster: FakeCluster
    server: FakeKubeServer
    api: ApiClient

    @property
    def url(self) -> str:
        """The API server's base URL."""
        return self.server.url


@contextmanager
def kube_sandbox() -> Iterator[KubeSandbox]:
    """A running sandbox seeded with Astra's objects; rollouts take ~0.2 s."""
    cluster = FakeCluster(rollout_seconds=TEST_ROLLOUT_SECONDS)
    seed_astra(cluster)
    server = FakeKubeServer(cluster)
    # Sync start/stop: usable from sync and async tests alike, whatever loop they run in.
    server.start_blocking()
    api = unauthenticated_client(server.url)
    try:
        yield KubeSandbox(cluster=cluster, server=server, api=api)
    finally:
        api.close()  # type: ignore[no-untyped-call]
        server.stop_blocking()


@pytest.fixture
def kube() -> Iterator[KubeSandbox]:
    with kube_sandbox() as sandbox:
        yield sandbox


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for polling, not a cancellation scope
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll until ``predicate`` holds (tests never sleep a fixed time waiting for state)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s")
        await asyncio.sleep(interval)
