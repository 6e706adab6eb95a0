"""What the benchmarks share: a dev server, a sandbox cluster and a scratch database of their
own, workers in processes of their own, a lean HTTP client, and reading a process's CPU time and
memory from Linux's /proc."""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo
from temporalio.testing import WorkflowEnvironment

from runtime import search_attributes as sa
from runtime.client import data_converter
from runtime.migrations import upgrade
from runtime.settings import REPO_ROOT, Settings
from sandbox.db import drop_database, migrate
from sandbox.kube.faults import ApiFault
from sandbox.servers import running_data_plane, scratch_dir
from sandbox.servers.process import free_port

SERVE_KUBE = """
import asyncio, json, sys
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from sandbox.kube.faults import ApiFault, ApiFaults
cluster = FakeCluster(rollout_seconds=float(sys.argv[2]))
faults = ApiFaults([ApiFault.model_validate(f) for f in json.loads(sys.argv[3])])
for namespace in sys.argv[4:]:
    seed_astra(cluster, namespace=namespace)
asyncio.run(FakeKubeServer(cluster, port=int(sys.argv[1]), faults=faults).serve_forever())
"""
PYCACHE = Path(tempfile.gettempdir()) / "astra-ops-bench-pycache"
PACKAGES = ("runtime", "workflows", "activities", "workers", "starters", "sandbox")
SERVE_BARE = """
import asyncio, signal, sys
sys.path.insert(0, sys.argv[1])
import bare_workflow
from temporalio.worker import Worker
from runtime.client import connect
from runtime.settings import Settings
from workers.worker import workflow_runner

async def main():
    settings = Settings()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client = await connect(settings)
    workflow = getattr(bare_workflow, sys.argv[2])
    async with Worker(client, task_queue=settings.task_queue, workflows=[workflow],
                      workflow_runner=workflow_runner()):
        await stop.wait()

asyncio.run(main())
"""
# The tests' servers (tests/conftest_data.py reads the same variables).
PG_ADMIN_DSN = os.environ.get(
    "ASTRA_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ASTRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def cache_bytecode() -> None:
    """Let the workflow sandbox load compiled modules, as a deployed worker does.

    The sandbox imports a runbook's modules afresh for every run (and every replay). Where
    bytecode is not written (PYTHONDONTWRITEBYTECODE, as on this machine) each run would compile
    them from source, a cost of the environment, not of the runner; the bytecode is cached
    outside the tree. Worker processes the benchmarks start inherit it (PYTHONPYCACHEPREFIX).
    """
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(PYCACHE)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    # Compiled before the first run, as an installed wheel is: otherwise the first runs of a
    # fresh machine each compile the modules they load (at once, when they start together).
    for package in PACKAGES:
        compileall.compile_dir(REPO_ROOT / package, quiet=1)


async def dev_server(keys: str) -> WorkflowEnvironment:
    """A Temporal dev server of the benchmark's own, in memory, its client using the codec."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=data_converter(Settings(codec_keys=keys)),
        search_attributes=sa.ALL,
        dev_server_log_level="error",
    )


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A new database migrated as the dev stack migrates it, dropped afterwards: on the tests'
    PostgreSQL where it answers, else on a server of the benchmark's own."""
    directory = scratch_dir("astra-bench-data-")
    try:
        async with running_data_plane(directory, PG_ADMIN_DSN, REDIS_URL) as plane:
            name = f"astra_bench_{uuid.uuid4().hex[:8]}"
            dsn = make_conninfo(plane.postgres_url, dbname=name)
            await migrate(dsn)
            try:
                await upgrade(dsn, dsn)
                yield dsn
            finally:
                await drop_database(plane.postgres_url, name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def wait_until_listening(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@asynccontextmanager
async def sandbox_cluster(
    *namespaces: str, rollout_seconds: float = 0.05, faults: Sequence[ApiFault] = ()
) -> AsyncIterator[tuple[str, int]]:
    """The sandbox cluster with Astra seeded in ``namespaces``: its URL and pid. Its API server
    answers requests with ``faults`` (each scoped to a namespace) as they match.

    It runs in its own process, as a real API server would: in the benchmark's process it would
    compete with the worker for the GIL and charge its own cost to the runs measured.
    """
    port = free_port()
    faults_json = json.dumps([f.model_dump(mode="json") for f in faults])
    kube = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE_KUBE, str(port), str(rollout_seconds), faults_json,
        *namespaces,
    )  # fmt: skip
    try:
        # Seeding a namespace takes up to a second or two on a loaded machine: a proof of 100
        # trials seeds over a hundred before it listens.
        await wait_until_listening(port, 30 + 2 * len(namespaces))
        yield f"http://127.0.0.1:{port}", kube.pid
    finally:
        kube.terminate()
        await kube.wait()


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """A process's resident memory now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"process {pid} reports no VmRSS")


def child_named(name: str) -> int:
    """The pid of this process's child ``name`` (the dev server, which the SDK starts)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while listed
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
        if comm == name and int(rest.split()[1]) == os.getpid():
            return int(stat.parent.name)
    raise LookupError(f"no child process named {name}")


async def until_idle(pid: int, below: float = 0.05, every: float = 1.0) -> None:
    """Return once the process used less than ``below`` of a core over ``every`` seconds."""
    while True:
        before = cpu_seconds(pid)
        await asyncio.sleep(every)
        if cpu_seconds(pid) - before < below * every:
            return


class WorkerProcess:
    """A worker in a process of its own, so that its CPU and memory are its own, the bench's
    client does not starve it, and it can restart."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.process: asyncio.subprocess.Process | None = None

    @classmethod
    def astra_ops(cls, env: dict[str, str], log: Path) -> WorkerProcess:
        """The production worker, `astra-ops worker`."""
        return cls([str(Path(sys.executable).parent / "astra-ops"), "worker"], env, log)

    @classmethod
    def bare(cls, workflow: str, env: dict[str, str], log: Path) -> WorkerProcess:
        """A worker of one of bare_workflow's baselines, with the same converter and sandbox."""
        argv = [sys.executable, "-c", SERVE_BARE, str(Path(__file__).parent), workflow]
        return cls(argv, env, log)

    @property
    def pid(self) -> int:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(
                f"the worker exited ({self.process.returncode}); its log: {self.log}\n"
                + "\n".join(self.log.read_text().splitlines()[-20:])
            )
        return self.process.pid

    async def start(self) -> None:
        with self.log.open("a") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=log, stderr=log
            )
        await until_idle(self.pid)  # imported, connected and polling

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


class HttpConnections:
    """Keep-alive HTTP/1.1 connections for posting JSON as fast as a server takes it.

    httpx's pool spends more CPU per request than the API under test does (its pool checks every
    connection on every request), so a storm sent with it measures the sender. This writes a
    request and reads the answer's status line, headers and ``Content-Length`` body, nothing more.
    """

    def __init__(self, port: int, headers: dict[str, str], connections: int) -> None:
        self.port, self.connections = port, connections
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def __aenter__(self) -> HttpConnections:
        for _ in range(self.connections):
            self.idle.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()

    async def post(self, path: str, body: Any) -> tuple[int, bytes]:
        """POST ``body`` as JSON: the status code and the body of the answer."""
        data = json.dumps(body).encode()
        reader, writer = await self.idle.get()
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.head}"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next(
                int(line.split(":", 1)[1])
                for line in head
                if line.lower().startswith("content-length:")
            )
            answer = await reader.readexactly(length)
        except BaseException:
            writer.close()
            self.idle.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
            raise
        self.idle.put_nowait((reader, writer))
        return int(head[0].split()[1]), answer
