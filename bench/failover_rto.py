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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import psycopg
import redis.asyncio as aioredis
import yaml
from psycopg.conninfo import make_conninfo
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sandbox.servers import RedisServer, ServerError, scratch_dir
from sandbox.servers.binaries import postgres_bin_dir
from sandbox.servers.postgres import server_user
from sandbox.servers.process import alive, children, free_port, wait_until
from sandbox.servers.redis import SENTINEL_MASTER, start_redis

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


@dataclass(frozen=True)
class Target:
    """A leg's running servers, as the trial loop needs them."""

    writer: Writer
    kill_primary: Callable[[], Awaitable[float]]
    """SIGKILL the primary; returns the monotonic time the signal was sent."""


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
            return Outcome(load.recovered_at - fault, len(load.acked), lost)
        finally:
            await writer.close()


# PostgreSQL under Patroni ---------------------------------------------------------------------


class PostgresWriter:
    """Inserts one row per write over one autocommit connection, reconnected after a failure."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
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
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
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

            yield Target(writer=PostgresWriter(dsn), kill_primary=kill_leader)
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


LEGS: dict[str, Leg] = {
    "patroni-default": patroni_leg(PATRONI_DEFAULT),
    "patroni-tuned": patroni_leg(PATRONI_TUNED),
    "sentinel-default": sentinel_leg(30_000),
    "sentinel-tuned": sentinel_leg(5_000),
}


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def print_table(results: dict[str, list[Outcome]], replication: Replication, trials: int) -> None:
    print(
        f"\nRecovery time: SIGKILL of the primary -> first acknowledged write through the "
        f"platform's endpoint; a write every {INTERVAL * 1000:.0f} ms, {WRITE_TIMEOUT:g} s "
        f"timeout; {trials} trials; PostgreSQL replication {replication}"
    )
    head = f"{'leg':<18}{'recovered':>10}{'median s':>10}{'p95 s':>8}{'min-max s':>14}"
    print(head + f"{'acked':>8}{'lost':>6}  settings; endpoint")
    for name, outcomes in results.items():
        times = [o.recovery for o in outcomes if o.recovery is not None]
        lost = [o.lost for o in outcomes if o.lost is not None]
        figures = (
            f"{statistics.median(times):>10.2f}{p95(times):>8.2f}"
            f"{f'{min(times):.2f}-{max(times):.2f}':>14}"
            if times
            else f"{'-':>10}{'-':>8}{'-':>14}"
        )
        print(
            f"{name:<18}{f'{len(times)}/{len(outcomes)}':>10}{figures}"
            f"{sum(o.acked for o in outcomes):>8}{sum(lost) if lost else '-':>6}"
            f"  {LEGS[name].settings}; {LEGS[name].endpoint}"
        )
        for outcome in outcomes:
            if outcome.recovery is None:
                print(f"{'':<18}  a trial did not recover; last error: {outcome.note}")
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
        print(f"{'':<18}" + "".join(f"{name:>18}" for name in names))
        for row in names:
            print(f"{row:<18}" + "".join(f"{medians[row] / medians[c]:>18.2f}" for c in names))


async def main(
    names: list[str], trials: int, replication: Replication, warmup: float, deadline: float
) -> None:
    results: dict[str, list[Outcome]] = {}
    for name in names:
        leg = LEGS[name]
        results[name] = []
        for number in range(1, trials + 1):
            directory = scratch_dir(f"astra-rto-{name}-")
            try:
                outcome = await run_trial(leg, Trial(directory, replication), warmup, deadline)
            except BaseException:
                print(f"{name} trial {number} failed; its servers' logs: {directory}")
                raise
            shutil.rmtree(directory, ignore_errors=True)
            results[name].append(outcome)
            took = "-" if outcome.recovery is None else f"{outcome.recovery:.2f} s"
            lost = "-" if outcome.lost is None else outcome.lost
            print(
                f"{name} trial {number}/{trials}: recovered after {took}, "
                f"{outcome.acked} writes acked, {lost} lost",
                flush=True,
            )
    print_table(results, replication, trials)


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
        "--deadline", type=float, default=150,
        help="seconds after the fault before a trial counts as not recovered (default 150)",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if missing := missing_programs(args.legs):
        sys.exit("cannot run:\n  " + "\n  ".join(missing))
    asyncio.run(main(args.legs, args.trials, args.replication, args.warmup, args.deadline))
