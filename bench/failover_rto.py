"""Recovery time after the loss of a primary: how long the platform cannot write, from the fault
(SIGKILL of the primary) to its first successful write through the endpoint it uses, under a
steady write load, for PostgreSQL failed over by Patroni and Redis failed over by Sentinel, each
with its default timers and tuned ones; the baselines the data-plane runbooks are measured
against (issue 10).

Every trial starts fresh servers under a scratch directory, runs a writer that writes one
numbered row (PostgreSQL) or stream entry (Redis, XADD) every 50 ms through the platform's
endpoint and records which writes were acknowledged, kills the primary, and waits (up to
``--deadline``) for the first write started after the fault to be acknowledged. It then reads
back through the same endpoint which acknowledged writes survived, and stops everything.

The platform's endpoints:

- Patroni: a libpq multi-host DSN over both nodes with ``target_session_attrs=read-write``, how
  Patroni's users connect without a proxy (HAProxy, vip-manager): the client finds whichever
  node is writable. The fault kills the leader's Patroni and its PostgreSQL together (the loss of
  the primary's machine): killing PostgreSQL alone would measure Patroni restarting it in place,
  not a failover. Patroni runs with a one-node etcd on loopback ports (Debian's ``patroni`` and
  ``etcd-server``), two nodes, replication asynchronous (Patroni's default) or synchronous
  (``synchronous_mode``) as ``--replication`` says.
- Sentinel: redis-py's Sentinel client, which asks Sentinel for the master on every new
  connection; one Sentinel (quorum 1) watching a primary and its replica.
- The runbooks (``runbook-*``): the sandbox's replicated data plane (PostgreSQL replicating
  synchronously, the only failover the policy lets go unattended), the sandbox cluster with
  Astra's pods played on it, and the production worker with the example policy, its unattended
  budgets widened to cover every trial. The fault starts ``postgres-outage`` (with its grace
  window at its default, or 5 s) or ``redis-failure`` ``--alert-delay`` seconds later, as
  an alert would: by default 0, so the alert pipeline's own latency (scrape and evaluation
  intervals, Alertmanager's group_wait) is not counted, where Patroni and Sentinel detect the
  loss themselves. The writer connects to what ``astra-config`` names, read again on every
  reconnect, as a pod the runbook restarts does; the run's own end (every service rolled, the
  failover verified, the old primary re-attached) is printed beside it.

Figures are printed, never asserted, and noisy on a shared machine: median and p95 of each
configuration, the ratios between configurations of the same store, and the acknowledged writes
that were missing afterwards.

    .venv/bin/python bench/failover_rto.py [--legs patroni-default,sentinel-tuned] [--trials 5]
        [--replication async|sync] [--deadline 150]

Adding a configuration is one function that starts its servers under the trial's directory and
yields a :class:`Target` (a writer through the platform's endpoint, and how to kill the primary),
registered in ``LEGS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import psycopg
import redis.asyncio as aioredis
import yaml
from harness import cache_bytecode, dev_server, sandbox_cluster, scratch_database
from kubernetes.client import ApiClient, CoreV1Api
from psycopg.conninfo import make_conninfo
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from activities.kubernetes import unauthenticated_client
from runtime.astra_config import DATABASE_URL_KEY, REDIS_URL_KEY, AstraEndpoints
from runtime.identity import Signer, load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import REPO_ROOT, Settings
from sandbox.db import create_database, migrate
from sandbox.kube.seed import ASTRA_NAMESPACE, CONFIG_MAP
from sandbox.loadgen import LoadConfig, LoadGenerator
from sandbox.platform import ClusterView
from sandbox.servers import DataPlane, RedisServer, ServerError, scratch_dir, start_data_plane
from sandbox.servers import faults as server_faults
from sandbox.servers.binaries import postgres_bin_dir
from sandbox.servers.postgres import server_user
from sandbox.servers.process import alive, children, free_port, wait_until
from sandbox.servers.redis import SENTINEL_MASTER, start_redis
from workers.worker import running_worker
from workflows.catalogue import RUNBOOKS
from workflows.models import RunbookRequest, RunbookResult
from workflows.postgres_outage import PROMOTE as PG_PROMOTE
from workflows.postgres_outage import PostgresOutageRequest
from workflows.redis_failure import FAIL_OVER as REDIS_FAIL_OVER
from workflows.redis_failure import RedisFailureRequest

INTERVAL = 0.05
"""Seconds between the starts of two writes of the load."""
WRITE_TIMEOUT = 1.0
"""Seconds a write (connecting included) may take before the writer gives up on it and tries
again: short, so that the writer notices a recovery soon after it happens."""
START_SECONDS = 120
"""How long servers may take to start and replicate (Patroni's default loop is 10 s)."""
STREAM = "rto:writes"
TABLE = "rto_writes"

Store = Literal["postgres", "redis"]
Replication = Literal["async", "sync"]


class Writer(Protocol):
    """Writes numbered records through the platform's endpoint, as the platform would."""

    async def prepare(self) -> None:
        """Before the load starts: the endpoint answers, and what the writes need (a table)
        exists."""

    async def write(self, seq: int) -> None:
        """Write record ``seq`` once; raise if it was not acknowledged. A failed write leaves
        the writer ready to reconnect on the next one."""

    async def present(self) -> set[int]:
        """The records the endpoint holds now."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Trial:
    """What a leg is given for one trial."""

    directory: Path
    """A fresh scratch directory for the trial's servers, removed after the trial (kept, for
    its logs, when the trial fails)."""
    replication: Replication
    """How PostgreSQL legs replicate (``--replication``)."""
    stage: RunbookStage | None = None
    """What the runbook legs share across trials (a Temporal server, astra-ops's database)."""


@dataclass(frozen=True)
class Target:
    """A leg's running servers, as the trial loop needs them."""

    writer: Writer
    kill_primary: Callable[[], Awaitable[float]]
    """SIGKILL the primary; returns the monotonic time the signal was sent."""
    settled: Callable[[], Awaitable[tuple[float, str]]] | None = None
    """For a runbook: wait for its run to end; the monotonic time it ended and its outcome."""


@dataclass(frozen=True)
class Leg:
    """One configuration to measure: how to start it for a trial."""

    store: Store
    start: Callable[[Trial], AbstractAsyncContextManager[Target]]
    settings: str
    """What is tuned, for the output."""
    endpoint: str
    """How the writer reaches the store, for the output."""
    requires: tuple[str, ...] = ()
    """Programs that must be on the PATH."""
    install: str = ""
    """How to get them."""
    runbook: bool = False
    """Runs an astra-ops runbook: needs the shared :class:`RunbookStage`."""


# The load -------------------------------------------------------------------------------------


@dataclass
class SteadyLoad:
    """Writes a record every ``INTERVAL`` until cancelled; remembers which were acknowledged
    and when, and, once told of a fault, when the first write started after it was."""

    writer: Writer
    acked: dict[int, tuple[float, float]] = field(default_factory=dict)
    """seq -> (started, acknowledged), monotonic"""
    last_error: str = ""
    fault: float | None = None
    recovered: asyncio.Event = field(default_factory=asyncio.Event)
    recovered_at: float | None = None

    async def run(self) -> None:
        seq = 0
        due = time.monotonic()
        while True:
            seq += 1
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.writer.write(seq), WRITE_TIMEOUT)
            except Exception as err:  # whatever the client raises, the write was not acked
                self.last_error = f"{type(err).__name__}: {err}".strip()
            else:
                self.acked[seq] = (started, time.monotonic())
                self._check_recovery()
            # Paced from the schedule, without a burst to catch up after a slow write.
            due = max(due + INTERVAL, time.monotonic())
            await asyncio.sleep(due - time.monotonic())

    def fault_at(self, fault: float) -> None:
        """The fault happened at ``fault``; writes started since may already have succeeded."""
        self.fault = fault
        self._check_recovery()

    def _check_recovery(self) -> None:
        if self.fault is None or self.recovered_at is not None:
            return
        after = [done for started, done in self.acked.values() if started >= self.fault]
        if after:
            self.recovered_at = min(after)
            self.recovered.set()


@dataclass(frozen=True)
class Outcome:
    """One trial's figures."""

    recovery: float | None
    """Seconds from the fault to the first acknowledged write started after it; None when none
    was within the deadline."""
    acked: int
    lost: int | None
    """Acknowledged writes (those before the fault, and the first after it) missing afterwards;
    None when the store did not recover."""
    note: str = ""
    run: float | None = None
    """For a runbook: seconds from the fault to the end of its run (every service rolled and
    the failover verified)."""


async def run_trial(leg: Leg, trial: Trial, warmup: float, deadline: float) -> Outcome:
    """Start the leg's servers, load them, kill the primary, wait for a write to succeed, and
    count the acknowledged writes that are missing."""
    async with leg.start(trial) as target:
        writer = target.writer
        try:
            await asyncio.wait_for(writer.prepare(), START_SECONDS)
            load = SteadyLoad(writer)
            task = asyncio.create_task(load.run())
            try:
                await asyncio.sleep(warmup)  # the steady load the fault interrupts
                if not load.acked:
                    raise ServerError(
                        f"no write succeeded in {warmup:g}s before the fault ({load.last_error}); "
                        "the leg's endpoint does not take writes"
                    )
                fault = await target.kill_primary()
                load.fault_at(fault)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(load.recovered.wait(), deadline)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if load.recovered_at is None:
                return Outcome(None, len(load.acked), None, note=load.last_error)
            present = await asyncio.wait_for(writer.present(), START_SECONDS)
            lost = len(load.acked.keys() - present)
            run, note = None, ""
            if target.settled is not None:
                ended, note = await asyncio.wait_for(target.settled(), deadline)
                run = ended - fault
            return Outcome(load.recovered_at - fault, len(load.acked), lost, note=note, run=run)
        finally:
            await writer.close()


# PostgreSQL under Patroni ---------------------------------------------------------------------


Endpoint = Callable[[], Awaitable[str]]
"""Where the platform's store is now: asked again on every (re)connect."""


def fixed(address: str) -> Endpoint:
    async def endpoint() -> str:
        return address

    return endpoint


class PostgresWriter:
    """Inserts one row per write over one autocommit connection, reconnected after a failure."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(
                await self.endpoint(), autocommit=True
            )
        return self.conn

    async def prepare(self) -> None:
        conn = await self._connection()
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (seq integer PRIMARY KEY)")

    async def write(self, seq: int) -> None:
        try:
            conn = await self._connection()
            await conn.execute(f"INSERT INTO {TABLE} (seq) VALUES (%s)", (seq,))
        except BaseException:
            await self.close()
            raise

    async def present(self) -> set[int]:
        async with await psycopg.AsyncConnection.connect(await self.endpoint()) as conn:
            rows = await (await conn.execute(f"SELECT seq FROM {TABLE}")).fetchall()
        return {seq for (seq,) in rows}

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


@dataclass(frozen=True)
class PatroniTimers:
    """Patroni's failure detection: the leader key's lifetime, the loop's period, and how long
    a DCS or PostgreSQL call is retried (Patroni requires loop_wait + 2 * retry_timeout <= ttl)."""

    ttl: int
    loop_wait: int
    retry_timeout: int


PATRONI_DEFAULT = PatroniTimers(ttl=30, loop_wait=10, retry_timeout=10)
PATRONI_TUNED = PatroniTimers(ttl=10, loop_wait=2, retry_timeout=4)


def descendants(pid: int) -> list[int]:
    """``pid``'s children, theirs, and so on."""
    found = children(pid)
    return [*found, *(grandchild for child in found for grandchild in descendants(child))]


async def kill_trees(roots: list[int], log: Path) -> float:
    """SIGKILL ``roots`` and every process under them at once; when the signals were sent."""
    tree = [*roots, *(pid for root in roots for pid in descendants(root))]
    sent = time.monotonic()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not any(alive(p) for p in tree), 10, f"{roots} to die", log)
    return sent


async def spawn(argv: list[str], log: Path, **kwargs: Any) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, **kwargs
        )


async def stop_process(process: asyncio.subprocess.Process, log: Path) -> None:
    """SIGTERM; past 30 s, SIGKILL to it and everything under it."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        await kill_trees([process.pid], log)
        await process.wait()


async def answers_http(url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        async with httpx.AsyncClient(timeout=1) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


@asynccontextmanager
async def running_etcd(directory: Path) -> AsyncIterator[int]:
    """A one-node etcd on loopback ports; its client port."""
    client, peer = free_port(), free_port()
    log = directory / "etcd.log"
    flags = {
        "name": "rto",
        "data-dir": directory / "etcd",
        "listen-client-urls": f"http://127.0.0.1:{client}",
        "advertise-client-urls": f"http://127.0.0.1:{client}",
        "listen-peer-urls": f"http://127.0.0.1:{peer}",
        "initial-advertise-peer-urls": f"http://127.0.0.1:{peer}",
        "initial-cluster": f"rto=http://127.0.0.1:{peer}",
    }
    process = await spawn(["etcd", *(f"--{key}={value}" for key, value in flags.items())], log)
    try:
        await wait_until(
            partial(answers_http, f"http://127.0.0.1:{client}/health"), 30, "etcd", log
        )
        yield client
    finally:
        await stop_process(process, log)


@dataclass
class PatroniNode:
    """One Patroni with its PostgreSQL, run as PostgreSQL's unprivileged user when we are root."""

    name: str
    dir: Path
    pg_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> Path:
        return self.dir / "patroni.log"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    def config(self, etcd_port: int, timers: PatroniTimers, synchronous: bool) -> dict[str, Any]:
        trust = "127.0.0.1/32 trust"
        return {
            "scope": "rto",
            "name": self.name,
            "restapi": {
                "listen": f"127.0.0.1:{self.api_port}",
                "connect_address": f"127.0.0.1:{self.api_port}",
            },
            "etcd3": {"host": f"127.0.0.1:{etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": timers.ttl,
                    "loop_wait": timers.loop_wait,
                    "retry_timeout": timers.retry_timeout,
                    "synchronous_mode": synchronous,
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.dir / "data"),
                "bin_dir": str(postgres_bin_dir()),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "replicator"},
                },
                "pg_hba": [f"host all all {trust}", f"host replication replicator {trust}"],
                "parameters": {"unix_socket_directories": str(self.dir)},
                "basebackup": [{"checkpoint": "fast"}],
            },
        }

    async def start(self, etcd_port: int, timers: PatroniTimers, synchronous: bool) -> None:
        self.dir.mkdir()
        (self.dir / "patroni.yml").write_text(
            yaml.safe_dump(self.config(etcd_port, timers, synchronous))
        )
        as_user: dict[str, Any] = {}
        if (user := server_user()) is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        self.process = await spawn(
            ["patroni", str(self.dir / "patroni.yml")], self.log, cwd=self.dir, env=env, **as_user
        )

    async def is_leader(self) -> bool:
        return await answers_http(f"{self.api}/primary")

    def postmaster(self) -> int | None:
        """PostgreSQL's pid while it runs. Patroni starts it detached (it outlives Patroni, as
        in production), so it is not among Patroni's descendants."""
        try:
            pid = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    async def kill(self) -> float:
        """The loss of this node's machine: Patroni and its PostgreSQL, SIGKILL at once."""
        assert self.process is not None
        postmaster = self.postmaster()
        roots = [self.process.pid] if postmaster is None else [self.process.pid, postmaster]
        sent = await kill_trees(roots, self.log)
        await self.process.wait()
        return sent

    async def stop(self) -> None:
        """Patroni stops its PostgreSQL; a PostgreSQL left by a killed Patroni is killed."""
        if self.process is not None:
            await stop_process(self.process, self.log)
        if (postmaster := self.postmaster()) is not None:
            await kill_trees([postmaster], self.log)


async def replicates(primary: PatroniNode, replica: PatroniNode, synchronous: bool) -> bool:
    """Whether ``replica`` streams from ``primary`` (as its synchronous standby, if asked)."""
    try:
        async with await psycopg.AsyncConnection.connect(primary.dsn, connect_timeout=2) as conn:
            row = await (
                await conn.execute(
                    "SELECT sync_state FROM pg_stat_replication"
                    " WHERE application_name = %s AND state = 'streaming'",
                    (replica.name,),
                )
            ).fetchone()
    except psycopg.OperationalError:
        return False
    return row is not None and (not synchronous or row[0] == "sync")


@asynccontextmanager
async def patroni(timers: PatroniTimers, trial: Trial) -> AsyncIterator[Target]:
    """Two Patroni nodes on a one-node etcd; the writer on the multi-host DSN."""
    synchronous = trial.replication == "sync"
    async with running_etcd(trial.directory) as etcd_port:
        leader, follower = (PatroniNode(name, trial.directory / name) for name in ("pg0", "pg1"))
        try:
            await leader.start(etcd_port, timers, synchronous)
            await wait_until(leader.is_leader, START_SECONDS, "Patroni to bootstrap", leader.log)
            await follower.start(etcd_port, timers, synchronous)
            await wait_until(
                partial(replicates, leader, follower, synchronous),
                START_SECONDS,
                f"{follower.name} to replicate{' synchronously' if synchronous else ''}",
                follower.log,
            )
            dsn = make_conninfo(
                "",
                host="127.0.0.1,127.0.0.1",
                port=f"{leader.pg_port},{follower.pg_port}",
                user="postgres",
                dbname="postgres",
                target_session_attrs="read-write",
                connect_timeout="2",
            )

            async def kill_leader() -> float:
                for node in (leader, follower):
                    if await node.is_leader():
                        return await node.kill()
                raise ServerError(f"no Patroni node says it leads; see {leader.log}")

            yield Target(writer=PostgresWriter(fixed(dsn)), kill_primary=kill_leader)
        finally:
            await asyncio.gather(follower.stop(), leader.stop())


# Redis under Sentinel -------------------------------------------------------------------------


class RedisWriter:
    """XADDs one entry per write through a client that finds the master by itself."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def prepare(self) -> None:
        await self.client.ping()

    async def write(self, seq: int) -> None:
        await self.client.xadd(STREAM, {"seq": seq})

    async def present(self) -> set[int]:
        entries = await self.client.xrange(STREAM)
        return {int(fields[b"seq"]) for _, fields in entries or [] if fields}

    async def close(self) -> None:
        await self.client.aclose()


async def sentinel_sees_replica(watcher: RedisServer) -> bool:
    """Whether Sentinel has found the replica it would promote (it learns of it from the
    primary's INFO, not at once)."""
    client = watcher.client()
    try:
        replicas = await client.sentinel_slaves(SENTINEL_MASTER)
    except RedisError:
        return False
    finally:
        await client.aclose()
    return any(
        r.get("master-link-status") == "ok" and not r.get("is_disconnected") for r in replicas
    )


@asynccontextmanager
async def sentinel(down_after_ms: int, trial: Trial) -> AsyncIterator[Target]:
    """A primary, its replica and one Sentinel; the writer asks Sentinel for the master."""
    servers = await start_redis(
        trial.directory, replica=True, sentinel=True, down_after_ms=down_after_ms
    )
    primary, _, watcher = servers
    try:
        await wait_until(
            partial(sentinel_sees_replica, watcher), START_SECONDS, "Sentinel", watcher.log
        )
        # No retries of its own: the load retries every INTERVAL, so a recovery is seen as soon
        # as a single write succeeds.
        timeouts = {"socket_timeout": WRITE_TIMEOUT, "socket_connect_timeout": WRITE_TIMEOUT}
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", watcher.port)], sentinel_kwargs=timeouts, **timeouts
        )
        client = sentinels.master_for(
            SENTINEL_MASTER,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=WRITE_TIMEOUT,
            socket_connect_timeout=WRITE_TIMEOUT,
        )

        async def kill_primary() -> float:
            sent = time.monotonic()
            await primary.kill()
            return sent

        yield Target(writer=RedisWriter(client), kill_primary=kill_primary)
    finally:
        await asyncio.gather(*(server.stop() for server in reversed(servers)))


# The runbooks ---------------------------------------------------------------------------------

PLATFORM_DATABASE = "astra_rto"
# The platform's addresses before our servers' ports replace theirs (start_data_plane, "own").
PLATFORM_PG = f"postgresql://postgres@127.0.0.1:5432/{PLATFORM_DATABASE}"
PLATFORM_REDIS = "redis://127.0.0.1:6379/0"
RUNBOOK_ROLLOUT_SECONDS = 2.0
"""How long the sandbox cluster takes to roll a Deployment (the dev stack's default)."""
TICK_SECONDS = 0.2
"""How often the sandbox's Astra (its pods, the load generator) acts."""
UNATTENDED = {"max": 10_000, "per_seconds": 3600}
DEFAULT_GRACE = PostgresOutageRequest.model_fields["grace_seconds"].default


@dataclass(frozen=True)
class RunbookStage:
    """What the runbook legs share across trials."""

    client: Client
    state_dsn: str
    """astra-ops's own database (its unattended budgets), on a server the trials do not kill."""
    policy: Path
    signer: Signer
    alert_delay: float
    """Seconds from the fault to the run's start: the alert pipeline's latency, which Patroni
    and Sentinel do not have (they detect on their own)."""


def bench_policy(directory: Path) -> Path:
    """The example access policy, with an unattended budget for each data-plane runbook's
    failover wide enough for every trial (the example allows one an hour for PostgreSQL, and
    none for Redis): each trial measures a failover the policy lets go without a person."""
    policy = yaml.safe_load((REPO_ROOT / "deploy" / "access-policy.yaml").read_text())
    runbooks = policy["runbooks"]
    runbooks["postgres-outage"].setdefault("automatic", {})[PG_PROMOTE] = UNATTENDED
    runbooks["redis-failure"].setdefault("automatic", {})[REDIS_FAIL_OVER] = UNATTENDED
    path = directory / "access-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@asynccontextmanager
async def runbook_stage(alert_delay: float) -> AsyncIterator[RunbookStage]:
    cache_bytecode()
    keys = new_key_line("bench")
    directory = scratch_dir("astra-rto-stage-")
    env = await dev_server(keys)
    try:
        async with scratch_database() as state_dsn:
            yield RunbookStage(
                client=env.client,
                state_dsn=state_dsn,
                policy=bench_policy(directory),
                signer=load_signer(new_signing_key_line("bench-api")),
                alert_delay=alert_delay,
            )
    finally:
        await env.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


def config_endpoint(api: ApiClient, key: str) -> Endpoint:
    """The address ``astra-config`` names now, read on every (re)connect: the platform's pods
    read it when they start, and the runbook restarts them after it repoints."""
    core = CoreV1Api(api)

    async def endpoint() -> str:
        config = await asyncio.to_thread(
            core.read_namespaced_config_map, CONFIG_MAP, ASTRA_NAMESPACE
        )
        return str((config.data or {})[key])

    return endpoint


class EndpointRedisWriter:
    """XADDs one entry per write to the Redis ``astra-config`` names, reconnecting (and asking
    again) after a failure."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client: aioredis.Redis | None = None

    async def _client(self) -> aioredis.Redis:
        if self.client is None:
            self.client = aioredis.Redis.from_url(
                await self.endpoint(),
                socket_timeout=WRITE_TIMEOUT,
                socket_connect_timeout=WRITE_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        return self.client

    async def prepare(self) -> None:
        await (await self._client()).ping()

    async def write(self, seq: int) -> None:
        try:
            await (await self._client()).xadd(STREAM, {"seq": seq})
        except BaseException:
            await self.close()
            raise

    async def present(self) -> set[int]:
        entries = await (await self._client()).xrange(STREAM)
        return {int(fields[b"seq"]) for _, fields in entries or [] if fields}

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


@asynccontextmanager
async def sandbox_astra(plane: DataPlane, api: ApiClient) -> AsyncIterator[None]:
    """Astra's pods, played by the sandbox's load generator on ``plane``: submitting, leasing
    and finishing tasks, heartbeating, each pod connected to what ``astra-config`` named when
    it started."""
    endpoints = AstraEndpoints(database_url=plane.postgres_url, redis_url=plane.redis_url)
    await asyncio.to_thread(
        CoreV1Api(api).patch_namespaced_config_map,
        CONFIG_MAP,
        ASTRA_NAMESPACE,
        {"data": endpoints.config_data()},
    )
    generator = LoadGenerator(
        plane.postgres_url,
        plane.redis_url,
        [],
        LoadConfig(seed=7, retry_delay_seconds=0.5),
        cluster=ClusterView(api),
    )
    stop = asyncio.Event()

    async def play() -> None:
        while not stop.is_set():
            await generator.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)

    task = asyncio.create_task(play())
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, START_SECONDS)
        await generator.aclose()


def runbook_request(store: Store, grace: float) -> RunbookRequest:
    """What the alert would start, as Kernel SRE's alice (the run proves who started it)."""
    if store == "postgres":
        return PostgresOutageRequest(
            requester="alice", reason="bench: primary killed", grace_seconds=grace
        )
    return RedisFailureRequest(requester="alice", reason="bench: primary killed")


@asynccontextmanager
async def runbook(store: Store, grace: float, trial: Trial) -> AsyncIterator[Target]:
    """A synchronously replicated data plane of our own, the sandbox cluster and Astra's pods
    on it, and the production worker; the fault starts the runbook at once (an alert's own
    latency, its scrape interval and ``for:``, is not counted), with the policy's unattended
    approval."""
    stage = trial.stage
    assert stage is not None, "main() prepares the stage for runbook legs"
    plane = await start_data_plane(
        trial.directory, PLATFORM_PG, PLATFORM_REDIS, mode="own", replication="sync"
    )
    try:
        await create_database(plane.postgres[0].dsn, PLATFORM_DATABASE)
        await migrate(plane.postgres_url)
        topology = trial.directory / "topology.json"
        plane.topology().write(topology)
        async with sandbox_cluster(ASTRA_NAMESPACE, rollout_seconds=RUNBOOK_ROLLOUT_SECONDS) as (
            kube_url,
            _,
        ):
            api = unauthenticated_client(kube_url)
            settings = Settings(
                kube_url=kube_url,
                database_url=plane.postgres_url,
                state_database_url=stage.state_dsn,
                redis_url=plane.redis_url,
                task_queue=f"rto-{uuid.uuid4().hex[:8]}",
                access_policy=stage.policy,
                trusted_keys=stage.signer.public_line(),
                data_plane_topology=topology,
            )
            key = DATABASE_URL_KEY if store == "postgres" else REDIS_URL_KEY
            endpoint = config_endpoint(api, key)
            writer: Writer = (
                PostgresWriter(endpoint) if store == "postgres" else EndpointRedisWriter(endpoint)
            )
            runs: list[asyncio.Task[WorkflowHandle[Any, RunbookResult]]] = []

            async def kill_primary() -> float:
                primary = await (
                    server_faults.postgres_primary(plane)
                    if store == "postgres"
                    else server_faults.redis_primary(plane)
                )
                sent = time.monotonic()
                await primary.kill()
                runs.append(asyncio.create_task(start_run()))
                return sent

            async def start_run() -> WorkflowHandle[Any, RunbookResult]:
                """The run an alert would start, ``--alert-delay`` after the fault."""
                await asyncio.sleep(stage.alert_delay)
                request = runbook_request(store, grace)
                workflow = RUNBOOKS[request_runbook(store)]
                workflow_id = f"{workflow.spec.workflow_id(request)}/{uuid.uuid4().hex[:8]}"
                return await stage.client.start_workflow(
                    workflow.spec.name,
                    request.signed_by(stage.signer, workflow_id),
                    id=workflow_id,
                    task_queue=settings.task_queue,
                    result_type=RunbookResult,
                )

            async def settled() -> tuple[float, str]:
                try:
                    result = await (await runs[0]).result()
                except WorkflowFailureError as err:
                    return time.monotonic(), f"run failed: {err.cause}"
                return time.monotonic(), f"{result.outcome.value}: {result.summary}"

            with ThreadPoolExecutor(max_workers=8) as executor:
                async with (
                    running_worker(stage.client, settings, executor),
                    sandbox_astra(plane, api),
                ):
                    yield Target(writer=writer, kill_primary=kill_primary, settled=settled)
            api.close()  # type: ignore[no-untyped-call]
    finally:
        await plane.stop()


def request_runbook(store: Store) -> str:
    return "postgres-outage" if store == "postgres" else "redis-failure"


# The legs and the table -----------------------------------------------------------------------

PATRONI_ENDPOINT = "libpq multi-host DSN, target_session_attrs=read-write"
SENTINEL_ENDPOINT = "redis-py Sentinel client (master_for)"


def patroni_leg(timers: PatroniTimers) -> Leg:
    return Leg(
        store="postgres",
        start=partial(patroni, timers),
        settings=(
            f"ttl {timers.ttl}, loop_wait {timers.loop_wait}, retry_timeout {timers.retry_timeout}"
        ),
        endpoint=PATRONI_ENDPOINT,
        requires=("patroni", "etcd"),
        install="run `apt-get install -y patroni etcd-server` as root",
    )


def sentinel_leg(down_after_ms: int) -> Leg:
    return Leg(
        store="redis",
        start=partial(sentinel, down_after_ms),
        settings=f"down-after-milliseconds {down_after_ms}",
        endpoint=SENTINEL_ENDPOINT,
    )


def runbook_leg(store: Store, grace: float = 0) -> Leg:
    return Leg(
        store=store,
        start=partial(runbook, store, grace),
        settings=(
            f"postgres-outage, grace {grace:g} s, sync replication"
            if store == "postgres"
            else "redis-failure"
        )
        + ", unattended within the policy's budget",
        endpoint=f"astra-config's {'DATABASE_URL' if store == 'postgres' else 'REDIS_URL'}, "
        "read on each reconnect",
        runbook=True,
    )


LEGS: dict[str, Leg] = {
    "patroni-default": patroni_leg(PATRONI_DEFAULT),
    "patroni-tuned": patroni_leg(PATRONI_TUNED),
    "runbook-pg-default": runbook_leg("postgres", grace=DEFAULT_GRACE),
    "runbook-pg-tuned": runbook_leg("postgres", grace=5),
    "sentinel-default": sentinel_leg(30_000),
    "sentinel-tuned": sentinel_leg(5_000),
    "runbook-redis": runbook_leg("redis"),
}


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def print_table(
    results: dict[str, list[Outcome]], replication: Replication, trials: int, alert_delay: float
) -> None:
    print(
        f"\nRecovery time: SIGKILL of the primary -> first acknowledged write through the "
        f"platform's endpoint; a write every {INTERVAL * 1000:.0f} ms, {WRITE_TIMEOUT:g} s "
        f"timeout; {trials} trials; Patroni's PostgreSQL replication {replication}; runbooks "
        f"started {alert_delay:g} s after the fault"
    )
    head = f"{'leg':<20}{'recovered':>10}{'median s':>10}{'p95 s':>8}{'min-max s':>14}"
    print(head + f"{'acked':>8}{'lost':>6}{'run s':>8}  settings; endpoint")
    for name, outcomes in results.items():
        times = [o.recovery for o in outcomes if o.recovery is not None]
        lost = [o.lost for o in outcomes if o.lost is not None]
        figures = (
            f"{statistics.median(times):>10.2f}{p95(times):>8.2f}"
            f"{f'{min(times):.2f}-{max(times):.2f}':>14}"
            if times
            else f"{'-':>10}{'-':>8}{'-':>14}"
        )
        runs = [o.run for o in outcomes if o.run is not None]
        print(
            f"{name:<20}{f'{len(times)}/{len(outcomes)}':>10}{figures}"
            f"{sum(o.acked for o in outcomes):>8}{sum(lost) if lost else '-':>6}"
            f"{f'{statistics.median(runs):.2f}' if runs else '-':>8}"
            f"  {LEGS[name].settings}; {LEGS[name].endpoint}"
        )
        for outcome in outcomes:
            if outcome.recovery is None:
                print(f"{'':<20}  a trial did not recover; last error: {outcome.note}")
    medians = {
        name: statistics.median(times)
        for name, outcomes in results.items()
        if (times := [o.recovery for o in outcomes if o.recovery is not None])
    }
    for store in ("postgres", "redis"):
        names = [name for name in medians if LEGS[name].store == store]
        if len(names) < 2:
            continue
        print(f"\nratios of median recovery times, {store} (row / column)")
        print(f"{'':<20}" + "".join(f"{name:>20}" for name in names))
        for row in names:
            print(f"{row:<20}" + "".join(f"{medians[row] / medians[c]:>20.2f}" for c in names))


async def main(
    names: list[str],
    trials: int,
    replication: Replication,
    warmup: float,
    deadline: float,
    alert_delay: float,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stage = (
            await stack.enter_async_context(runbook_stage(alert_delay))
            if any(LEGS[name].runbook for name in names)
            else None
        )
        await measure(names, trials, replication, warmup, deadline, stage)


async def measure(
    names: list[str],
    trials: int,
    replication: Replication,
    warmup: float,
    deadline: float,
    stage: RunbookStage | None,
) -> None:
    results: dict[str, list[Outcome]] = {}
    for name in names:
        leg = LEGS[name]
        results[name] = []
        for number in range(1, trials + 1):
            directory = scratch_dir(f"astra-rto-{name}-")
            try:
                trial = Trial(directory, replication, stage)
                outcome = await run_trial(leg, trial, warmup, deadline)
            except BaseException:
                print(f"{name} trial {number} failed; its servers' logs: {directory}")
                raise
            shutil.rmtree(directory, ignore_errors=True)
            results[name].append(outcome)
            took = "-" if outcome.recovery is None else f"{outcome.recovery:.2f} s"
            lost = "-" if outcome.lost is None else outcome.lost
            run = "" if outcome.run is None else f"; run ended after {outcome.run:.2f} s"
            said = f" ({outcome.note[:300]})" if outcome.run is not None else ""
            print(
                f"{name} trial {number}/{trials}: recovered after {took}, "
                f"{outcome.acked} writes acked, {lost} lost{run}{said}",
                flush=True,
            )
    print_table(results, replication, trials, stage.alert_delay if stage else 0)


def legs_argument(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in LEGS]:
        raise argparse.ArgumentTypeError(
            f"unknown leg {', '.join(unknown)}; the legs are {', '.join(LEGS)}"
        )
    return names


def missing_programs(names: list[str]) -> list[str]:
    """For each leg whose programs are not installed, what is missing and how to install it."""
    return [
        f"{name} needs {', '.join(p for p in LEGS[name].requires if shutil.which(p) is None)}: "
        f"{LEGS[name].install}"
        for name in names
        if any(shutil.which(p) is None for p in LEGS[name].requires)
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--legs", type=legs_argument, default=list(LEGS), help=f"of {','.join(LEGS)}"
    )
    parser.add_argument("--trials", type=int, default=5, help="trials per leg (default 5)")
    parser.add_argument(
        "--replication", choices=["async", "sync"], default="async",
        help="PostgreSQL legs' replication (default async, Patroni's default)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=float, default=3, help="seconds of load before the fault (default 3)"
    )
    parser.add_argument(
        "--alert-delay", type=float, default=0,
        help="seconds from the fault to the start of a runbook leg's run (default 0: the alert "
        "pipeline's latency is not counted)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline", type=float, default=150,
        help="seconds after the fault before a trial counts as not recovered (default 150)",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if missing := missing_programs(args.legs):
        sys.exit("cannot run:\n  " + "\n  ".join(missing))
    asyncio.run(
        main(args.legs, args.trials, args.replication, args.warmup, args.deadline, args.alert_delay)
    )
