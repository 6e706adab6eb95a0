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
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient

from activities.certificates import CertificateAuthority
from activities.kubernetes import unauthenticated_client
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from sandbox.kube.seed import deployment_manifest
from sandbox.kube.server import RequestObserver
from sandbox.kube.tls import TlsEndpoints

TEST_ROLLOUT_SECONDS = 0.2


@cache
def sandbox_ca() -> CertificateAuthority:
    """The CA of every test's sandbox cluster (one per process: making one costs little, but its
    files are written once, for the workers' settings)."""
    return CertificateAuthority.create("astra test CA", datetime.now(UTC), timedelta(days=3650))


def write_ca(ca: CertificateAuthority, folder: Path) -> tuple[Path, Path]:
    """The CA's certificate and key as files, for ASTRA_OPS_TLS_CA_CERT_FILE/_KEY_FILE."""
    cert, key = folder / "ca.crt", folder / "ca.key"
    cert.write_text(ca.cert_pem)
    key.touch(mode=0o600)
    key.write_text(ca.key_pem)
    return cert, key


@dataclass
class KubeSandbox:
    """What a test needs to drive the sandbox: the store, the server, a real client, and the
    services' TLS endpoints."""

    cluster: FakeCluster
    server: FakeKubeServer
    api: ApiClient
    tls: TlsEndpoints

    @property
    def url(self) -> str:
        """The API server's base URL."""
        return self.server.url


@contextmanager
def kube_sandbox(observer: RequestObserver | None = None) -> Iterator[KubeSandbox]:
    """A running sandbox seeded with Astra's objects (certificates by ``sandbox_ca()``), its TLS
    services serving on loopback; rollouts take ~0.2 s. ``observer`` is told of each request
    before it is served."""
    cluster = FakeCluster(rollout_seconds=TEST_ROLLOUT_SECONDS)
    seed_astra(cluster, ca=sandbox_ca())
    server = FakeKubeServer(cluster, observer=observer)
    # Sync start/stop: usable from sync and async tests alike, whatever loop they run in.
    server.start_blocking()
    api = unauthenticated_client(server.url)
    try:
        with TlsEndpoints(cluster) as tls:
            yield KubeSandbox(cluster=cluster, server=server, api=api, tls=tls)
    finally:
        api.close()  # type: ignore[no-untyped-call]
        server.stop_blocking()


@pytest.fixture(scope="session")
def sandbox_ca_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_ca(sandbox_ca(), tmp_path_factory.mktemp("sandbox-ca"))


@pytest.fixture
def kube() -> Iterator[KubeSandbox]:
    with kube_sandbox() as sandbox:
        yield sandbox


def canary_manifest(
    image: str, replicas: int = 1, name: str = "astra-worker-canary", stable: str = "astra-worker"
) -> dict[str, Any]:
    """A canary Deployment beside ``stable``, running ``image``: its pods carry the stable
    ``app`` label plus ``track: canary``, so the stable Service (and the stable Deployment's
    selector) match them too, as in a real canary."""
    manifest = deployment_manifest(stable, replicas)
    labels = {"app": stable, "track": "canary"}
    manifest["metadata"] = {"name": name, "labels": labels}
    spec = manifest["spec"]
    spec["selector"] = {"matchLabels": labels}
    spec["template"]["metadata"]["labels"] = labels
    spec["template"]["spec"]["containers"][0]["image"] = image
    return manifest


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
