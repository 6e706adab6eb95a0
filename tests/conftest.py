"""Shared fixtures: one Temporal dev server per session; a fresh task queue, namespace of the
sandbox cluster and workflow id per test."""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from runtime import search_attributes as sa
from runtime.access import load_policy
from runtime.client import data_converter
from runtime.identity import Signer
from runtime.keys import new_key_line
from runtime.settings import REPO_ROOT, Settings
from sandbox.kube import seed_astra
from sandbox.servers.process import free_port
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox, eventually, kube, sandbox_ca, sandbox_ca_files
from tests.helpers import TEST_SIGNER, TEST_SIGNING_KEY
from workers.worker import running_worker

pytest_plugins = [
    "tests.conftest_data",
    "tests.conftest_sandbox",
    "tests.conftest_vault",
    "tests.receivers",
    "tests.conftest_incident",
    "tests.stubs",
]
__all__ = ["eventually", "kube", "sandbox_ca_files"]

TEMPORAL = Path(sys.executable).parent / "temporal"
# The dev server fires a timer up to a second late by default (it shifts timers into batches).
# Tests wait on short durable timers (approval deadlines, recovery probes, activity retries), so
# they are fired when due.
DEV_SERVER_ARGS = ["--dynamic-config-value", 'history.timerProcessorMaxTimeShift="10ms"']


@pytest.fixture(scope="session")
def codec_keys() -> str:
    """A random key per session: tests prove the codec round-trips, not a fixed ciphertext."""
    return new_key_line("test1")


@pytest.fixture(scope="session")
def signing_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API's signing key for this session (the public half is what workers trust)."""
    path = tmp_path_factory.mktemp("identity") / "signing.key"
    path.write_text(TEST_SIGNING_KEY + "\n")
    return path


@pytest.fixture(scope="session")
def signer() -> Signer:
    return TEST_SIGNER


@pytest.fixture(scope="session")
async def temporal(codec_keys: str) -> AsyncIterator[WorkflowEnvironment]:
    converter = data_converter(Settings(codec_keys=codec_keys))
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        data_converter=converter,
        search_attributes=sa.ALL,
        dev_server_log_level="error",
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def _dev_server_on(files: Path, port: int, codec_keys: str) -> WorkflowEnvironment:
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        dev_server_database_filename=str(files / "history.db"),
        port=port,
        data_converter=data_converter(Settings(codec_keys=codec_keys)),
        search_attributes=sa.ALL,
        dev_server_log_level="error",
        dev_server_extra_args=DEV_SERVER_ARGS,
    )


@dataclass
class OwnTemporal:
    """A dev server of one test's own, on a SQLite file in ``files``, at a port it keeps."""

    env: WorkflowEnvironment
    files: Path
    port: int
    codec_keys: str
    running: bool = True

    @property
    def address(self) -> str:
        return self.env.client.service_client.config.target_host

    async def stop(self) -> None:
        self.running = False
        await self.env.shutdown()

    async def start_again(self) -> Client:
        """The server started again on its file and port, as after a crash or an upgrade: what
        it stored (runs, timers, signals taken) must all be there."""
        self.env = await _dev_server_on(self.files, self.port, self.codec_keys)
        self.running = True
        return self.env.client


@pytest.fixture
async def own_temporal(tmp_path: Path, codec_keys: str) -> AsyncIterator[OwnTemporal]:
    """For a test that reads what the server stored, restarts it, or leaves runs open that no
    worker will finish: the session's server stays as the other tests expect it."""
    files = tmp_path / "temporal"
    files.mkdir()
    port = free_port()
    own = OwnTemporal(await _dev_server_on(files, port, codec_keys), files, port, codec_keys)
    try:
        yield own
    finally:
        if own.running:
            await own.env.shutdown()


@pytest.fixture
def client(temporal: WorkflowEnvironment) -> Client:
    return temporal.client


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def namespace(kube: KubeSandbox) -> str:
    """A fresh Kubernetes namespace seeded with Astra, so the run's workflow id is unique."""
    name = f"astra-{uuid.uuid4().hex[:8]}"
    seed_astra(kube.cluster, namespace=name, ca=sandbox_ca())
    return name


@dataclass
class ChatReceiver:
    """A Slack-compatible incoming webhook that records what was posted."""

    url: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def chat() -> Iterator[ChatReceiver]:
    receiver = ChatReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            receiver.messages.append(json.loads(body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings(
    codec_keys: str,
    temporal: WorkflowEnvironment,
    kube: KubeSandbox,
    chat: ChatReceiver,
    task_queue: str,
    signing_key_file: Path,
    signer: Signer,
    sandbox_ca_files: tuple[Path, Path],
    state_database: str,
) -> Settings:
    """Production settings (not dev mode): identities are proven by the API's signature."""
    return Settings(
        state_database_url=state_database,
        temporal_address=temporal.client.service_client.config.target_host,
        codec_keys=codec_keys,
        kube_url=kube.url,
        task_queue=task_queue,
        chat_webhook_url=chat.url,
        access_policy=REPO_ROOT / "deploy" / "access-policy.yaml",
        signing_key_file=signing_key_file,
        trusted_keys=signer.public_line(),
        tls_ca_cert_file=sandbox_ca_files[0],
        tls_ca_key_file=sandbox_ca_files[1],
    )


@pytest.fixture
def runs(client: Client, settings: Settings, signer: Signer) -> Runs:
    """Starting and steering runs as the API does: as a known person, signed."""
    return Runs(client, settings.task_queue, load_policy(settings.access_policy), signer)


@pytest.fixture
async def worker(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    """The production worker composition, on this test's task queue."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, settings, executor) as built:
            yield built
