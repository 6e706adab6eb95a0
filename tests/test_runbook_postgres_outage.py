"""Postgres Outage end to end, on a real PostgreSQL primary and streaming replica.

The primary is killed under a write load (a writer recording every commit the server
acknowledged), the runbook fails over, and the tests check what a DBA would: one server takes
writes, ``astra-config`` names it, the acknowledged commits are there, the old primary streams
from the new one. A replicated plane costs seconds to start, so the checks that need no failover
of their own (the blip, the dry-run, each action run twice) share one, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes.client import CoreV1Api
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import ActivityEnvironment

from activities.endpoints import PLATFORM_CLIENTS, EndpointActivities, Repoint
from activities.kubernetes import KubernetesActivities
from activities.postgres import AstraDatabase
from activities.postgres_nodes import (
    Fence,
    NodesRequest,
    PostgresNodeActivities,
    Promote,
    Reattach,
    lsn,
)
from runtime.astra_config import DATABASE_URL_KEY
from runtime.data_plane import DataPlaneTopology
from runtime.settings import Settings
from sandbox.servers import DataPlane, PostgresServer, Replication, running_data_plane, scratch_dir
from sandbox.servers import faults as server_faults
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox, eventually
from tests.helpers import decide, generation, start, status
from workers.worker import running_worker
from workflows.models import Outcome, RunbookResult
from workflows.postgres_outage import APPROVE, APPROVE_LOSS, PostgresOutage, PostgresOutageRequest

SECONDS = 60
CONFIGURED_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
CONFIGURED_REDIS = "redis://127.0.0.1:6379/0"
READ_ONLY_START = "database system is ready to accept read-only connections"
"""What a server's log says each time it starts as a replica."""


@contextlib.asynccontextmanager
async def replicated(replication: Replication) -> AsyncIterator[DataPlane]:
    directory = scratch_dir("astra-test-pg-outage-")
    try:
        async with running_data_plane(
            directory, CONFIGURED_PG, CONFIGURED_REDIS, replication=replication
        ) as plane:
            yield plane
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
async def shared_plane() -> AsyncIterator[DataPlane]:
    async with replicated("sync") as plane:
        yield plane


async def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


def database_url(kube: KubeSandbox, namespace: str) -> str:
    config = CoreV1Api(kube.api).read_namespaced_config_map("astra-config", namespace)
    return str((config.data or {})[DATABASE_URL_KEY])


@dataclass
class Writer:
    """Inserts numbered rows one commit at a time until the server stops answering; ``acked``
    maps each row whose commit the server acknowledged to the WAL position of its insert."""

    dsn: str
    acked: dict[int, int] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("CREATE TABLE IF NOT EXISTS acked (id int PRIMARY KEY)")
                while not self.stopped.is_set():
                    n = len(self.acked) + 1
                    cur = await conn.execute(
                        "INSERT INTO acked VALUES (%s) RETURNING pg_current_wal_insert_lsn()::text",
                        (n,),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    self.acked[n] = lsn(row[0]) or 0
        except psycopg.OperationalError:
            return  # the server is gone: what was acknowledged is recorded


@contextlib.asynccontextmanager
async def writing(dsn: str) -> AsyncIterator[Writer]:
    writer = Writer(dsn)
    task = asyncio.create_task(writer.run())
    await eventually(lambda: len(writer.acked) >= 50, timeout=SECONDS, message="50 commits")
    try:
        yield writer
    finally:
        writer.stopped.set()
        await asyncio.wait_for(task, SECONDS)


def platform_on(
    settings: Settings,
    pg_dsn: str,
    plane: DataPlane,
    directory: Path,
    kube: KubeSandbox,
    namespace: str,
) -> tuple[Settings, dict[str, str]]:
    """``namespace``'s platform pointed at ``plane``'s primary, and the worker's settings with
    ``plane``'s topology; the address the platform is given for each server, by name."""
    topology = plane.topology()
    path = directory / "topology.json"
    topology.write(path)
    primary = topology.postgres[0]
    CoreV1Api(kube.api).patch_namespaced_config_map(
        "astra-config", namespace, {"data": {DATABASE_URL_KEY: primary.platform_dsn}}
    )
    ours = settings.model_copy(update={"data_plane_topology": path, "database_url": pg_dsn})
    return ours, {node.name: node.platform_dsn for node in topology.postgres}


@contextlib.asynccontextmanager
async def serving(
    client: Client,
    settings: Settings,
    pg_dsn: str,
    plane: DataPlane,
    directory: Path,
    kube: KubeSandbox,
    namespace: str,
) -> AsyncIterator[dict[str, str]]:
    """The production worker on :func:`platform_on`'s settings; the platform's addresses."""
    ours, platform = platform_on(settings, pg_dsn, plane, directory, kube, namespace)
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, ours, executor):
            yield platform


def request(namespace: str, **params: object) -> PostgresOutageRequest:
    return PostgresOutageRequest.model_validate(
        {
            "requester": "alice",
            "namespace": namespace,
            "grace_seconds": 1,
            "check_timeout_seconds": 1,
            "rollout_timeout_seconds": SECONDS,
            "reattach_timeout_seconds": SECONDS,
            **params,
        }
    )


async def approve_until_done(handle: WorkflowHandle[Any, RunbookResult]) -> RunbookResult:
    """Approve each approval the run asks for (Kernel SRE's bob, then the manager frank as the
    second of two) until it ends."""
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        for pending in (await status(handle)).pending_approvals:
            approver = "frank" if "bob" in pending.approvers else "bob"
            await decide(handle, pending.step, approver)
        await asyncio.wait({result}, timeout=0.2)
    return result.result()


async def test_a_killed_synchronous_primary_fails_over_unattended_and_loses_nothing(
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    async with (
        replicated("sync") as plane,
        serving(client, settings, pg_dsn, plane, tmp_path, kube, namespace) as platform,
    ):
        async with writing(platform["primary"]) as writer:
            await server_faults.pg_primary_down(plane)
        handle = await start(client, PostgresOutage, request(namespace), task_queue)
        result = await handle.result()

        assert result.outcome == Outcome.DONE, result.summary
        assert "no acknowledged commit lost: replica is a synchronous standby" in result.summary
        steps = {s.name: s for s in result.steps}
        assert steps[APPROVE].detail.startswith("not needed: promote replica")  # unattended
        await assert_failed_over_to_the_replica(plane, platform, writer, kube, namespace)
        # astra-ops's own reads and repairs of Astra's database follow the failover, though its
        # setting still names the old primary; a DSN outside the topology is taken as it is.
        topology = tmp_path / "topology.json"
        assert await AstraDatabase(platform["primary"], topology).dsn() == platform["replica"]
        assert await AstraDatabase(pg_dsn, topology).dsn() == pg_dsn


async def assert_failed_over_to_the_replica(
    plane: DataPlane, platform: dict[str, str], writer: Writer, kube: KubeSandbox, namespace: str
) -> None:
    """What a DBA checks after a failover to the synchronous replica: the platform's endpoint
    names it, every commit the old primary acknowledged is on it, and it is the one primary:
    the old one came back once, as its replica, rewound and streaming."""
    old, new = plane.postgres
    assert database_url(kube, namespace) == platform["replica"]
    present = {r[0] for r in await query(platform["replica"], "SELECT id FROM acked")}
    assert set(writer.acked) <= present, "an acknowledged commit was lost"
    assert await query(new.dsn, "SELECT pg_is_in_recovery()") == [(False,)]
    assert await query(old.dsn, "SELECT pg_is_in_recovery()") == [(True,)]
    assert old.log.read_text().count(READ_ONLY_START) == 1, old.log
    await query(new.dsn, "INSERT INTO acked VALUES (-1)")

    async def streamed() -> bool:
        return await query(old.dsn, "SELECT id FROM acked WHERE id = -1") == [(-1,)]

    await eventually(streamed, timeout=SECONDS, message="the old primary follows the new")


@pytest.mark.slow
async def test_a_killed_asynchronous_primary_fails_over_with_two_approvers_losing_what_it_said(
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    async with (
        replicated("async") as plane,
        serving(client, settings, pg_dsn, plane, tmp_path, kube, namespace) as platform,
    ):
        old, new = plane.postgres
        async with writing(platform["primary"]) as writer:
            # The replica stalls; the primary goes on acknowledging commits only it has, more
            # of them than the sockets between the two can hold, then dies.
            new.freeze()
            try:
                twenty_megabytes = "SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g"
                await query(platform["primary"], f"CREATE TABLE bulk AS {twenty_megabytes}")
                since = len(writer.acked)
                await eventually(lambda: len(writer.acked) > since + 20, message="more commits")
                await server_faults.pg_primary_down(plane)
            finally:
                new.thaw()
        before = {d: generation(kube, namespace, d) for d in PLATFORM_CLIENTS}
        handle = await start(client, PostgresOutage, request(namespace), task_queue)
        result = await approve_until_done(handle)

        assert result.outcome == Outcome.DONE, result.summary
        assert database_url(kube, namespace) == platform["replica"]
        assert all(generation(kube, namespace, d) > g for d, g in before.items())
        estimate = re.search(r"at least (\d+) bytes of WAL lost past (\S+) ", result.summary)
        assert estimate is not None, result.summary
        loss, received = int(estimate[1]), lsn(estimate[2])
        assert received is not None
        present = {r[0] for r in await query(platform["replica"], "SELECT id FROM acked")}
        lost = set(writer.acked) - present
        assert lost, "the stalled replica lacked none of the acknowledged commits"
        assert all(writer.acked[n] <= received + loss for n in lost), "lost beyond the estimate"
        decisions = [(d.step, d.approver) for d in (await status(handle)).decisions if d.accepted]
        assert decisions == [(APPROVE, "bob"), (APPROVE_LOSS, "bob"), (APPROVE_LOSS, "frank")]
        assert await query(old.dsn, "SELECT pg_is_in_recovery()") == [(True,)]  # rewound


@pytest.mark.slow
async def test_a_primary_back_within_the_grace_window_is_a_blip(
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
    shared_plane: DataPlane,
) -> None:
    async with serving(
        client, settings, pg_dsn, shared_plane, tmp_path, kube, namespace
    ) as platform:
        primary = shared_plane.postgres[0]
        blip = asyncio.create_task(server_faults.pg_primary_blip(shared_plane, seconds=2))
        await eventually(lambda: primary_frozen(primary), timeout=SECONDS, message="frozen")
        handle = await start(
            client, PostgresOutage, request(namespace, grace_seconds=20), task_queue
        )
        await blip
        result = await handle.result()

        assert result.outcome == Outcome.NO_CHANGE, result.summary
        assert "a blip, no failover" in result.summary
        assert database_url(kube, namespace) == platform["primary"]
        assert await query(primary.dsn, "SELECT pg_is_in_recovery()") == [(False,)]


def primary_frozen(server: PostgresServer) -> bool:
    pid = server.pid()
    stat = Path(f"/proc/{pid}/stat").read_text() if pid else ""
    return stat.rpartition(")")[2].split()[:1] == ["T"]


async def test_a_dry_run_reports_the_failover_and_changes_nothing(
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
    shared_plane: DataPlane,
) -> None:
    async with serving(
        client, settings, pg_dsn, shared_plane, tmp_path, kube, namespace
    ) as platform:
        primary, replica = shared_plane.postgres
        before = {d: generation(kube, namespace, d) for d in PLATFORM_CLIENTS}
        await server_faults.pg_primary_down(shared_plane)
        try:
            result = await (
                await start(client, PostgresOutage, request(namespace, dry_run=True), task_queue)
            ).result()

            assert result.outcome == Outcome.DONE, result.summary
            for would in ("would promote replica", "would point DATABASE_URL", "would rewind"):
                assert would in result.summary
            assert await query(replica.dsn, "SELECT pg_is_in_recovery()") == [(True,)]
            assert database_url(kube, namespace) == platform["primary"]
            assert {d: generation(kube, namespace, d) for d in PLATFORM_CLIENTS} == before
            assert primary.pid() is None  # not restarted, not rewound
        finally:
            await primary.start()

        async def streaming() -> bool:
            rows = await query(primary.dsn, "SELECT state FROM pg_stat_replication")
            return rows == [("streaming",)]

        await eventually(streaming, timeout=SECONDS, message="the replica streams again")


async def test_the_checks_see_each_server_and_a_patroni_that_answers(
    tmp_path: Path, shared_plane: DataPlane, chat: ChatReceiver
) -> None:
    topology = shared_plane.topology()
    topology.patroni_url = chat.url  # any HTTP answer: something manages the servers there
    topology.write(tmp_path / "topology.json")
    checks = PostgresNodeActivities(tmp_path / "topology.json")
    report = await ActivityEnvironment().run(checks.postgres_nodes, NodesRequest())

    assert report.patroni is not None and report.patroni.startswith("HTTP 501 from http://")
    primary, replica = report.nodes
    assert (primary.in_recovery, primary.writable) == (False, True)
    assert (replica.in_recovery, replica.writable, replica.streaming) == (True, False, True)
    assert replica.synchronous and report.lag_bytes("replica") is not None


async def test_each_action_run_twice_leaves_the_servers_as_once(
    kube: KubeSandbox, namespace: str, tmp_path: Path, shared_plane: DataPlane
) -> None:
    path = tmp_path / "topology.json"
    shared_plane.topology().write(path)
    nodes = PostgresNodeActivities(path)
    endpoints = EndpointActivities(KubernetesActivities(kube.api), path)
    env = ActivityEnvironment()
    primary, replica = shared_plane.postgres

    async def twice(activity: Any, arg: Any) -> list[bool]:
        return [(await env.run(activity, arg)).changed for _ in range(2)]

    assert await twice(nodes.fence_postgres, Fence(node="primary", token="t")) == [True, False]
    assert primary.pid() is None
    assert await twice(nodes.promote_postgres, Promote(node="replica", token="t")) == [True, False]
    repoint = Repoint(namespace=namespace, store="postgres", node="replica", token="t")
    assert [
        (await asyncio.to_thread(endpoints.repoint_platform, repoint)).changed for _ in (1, 2)
    ] == [
        True,
        False,
    ]
    reattach = Reattach(node="primary", primary="replica", timeout_seconds=SECONDS, token="t")
    assert await twice(nodes.reattach_postgres, reattach) == [True, False]
    assert await query(primary.dsn, "SELECT pg_is_in_recovery()") == [(True,)]
    # Without control, the fence is SQL: the server refuses its clients' writes, then says so.
    unmanaged = DataPlaneTopology.load(path)
    unmanaged.postgres[1].control = None
    unmanaged.write(path)
    assert await twice(nodes.fence_postgres, Fence(node="replica", token="t")) == [True, False]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await query(replica.dsn, "CREATE TABLE refused (id int)")
    # Nor can it be rewound from here: a person is told how to rebuild it.
    told = await env.run(nodes.reattach_postgres, Reattach(node="replica", primary="primary"))
    assert not told.changed and "pg_basebackup" in told.rebuild
