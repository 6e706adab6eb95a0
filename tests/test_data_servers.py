"""The data plane's own servers, for real: a PostgreSQL primary with a synchronous streaming
replica, a Redis primary with a replica and Sentinel, and the faults that break them.

One replicated set serves the whole module (starting it is most of the cost); a test that breaks
a server brings it back before the next one runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runtime.settings import REPO_ROOT
from sandbox.servers import DataPlane, PostgresServer, ServerError, scratch_dir, start_data_plane
from sandbox.servers import faults as server_faults
from sandbox.servers.plane import data_plane_record, running_data_plane
from sandbox.servers.process import alive
from sandbox.servers.redis import SENTINEL_MASTER
from tests.conftest_kube import eventually

SECONDS = 30
# Replicated servers are always ours; the configured addresses only give the URLs their shape.
CONFIGURED_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
CONFIGURED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
async def plane() -> AsyncIterator[DataPlane]:
    directory = scratch_dir("astra-test-replicated-")
    try:
        async with running_data_plane(
            directory, CONFIGURED_PG, CONFIGURED_REDIS, replication="sync", sentinel=True
        ) as started:
            yield started
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def query(server: PostgresServer, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(server.dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def new_table(primary: PostgresServer) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    await query(primary, f"CREATE TABLE {name} (id int PRIMARY KEY)")
    return name


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


async def test_a_row_written_on_the_primary_is_read_on_the_replica(plane: DataPlane) -> None:
    primary, replica = plane.postgres
    assert plane.postgres_url == primary.dsn  # the configured URL, moved to our primary
    table = await new_table(primary)
    await query(primary, f"INSERT INTO {table} VALUES (1)")

    async def replicated() -> bool:
        return await query(replica, f"SELECT id FROM {table}") == [(1,)]

    await eventually(replicated, timeout=SECONDS, message="the row on the replica")
    assert await query(replica, "SELECT pg_is_in_recovery()") == [(True,)]
    assert await query(primary, "SELECT slot_name, active FROM pg_replication_slots") == [
        ("replica", True)
    ]


async def test_a_synchronous_commit_waits_for_the_replica(plane: DataPlane) -> None:
    primary, replica = plane.postgres
    table = await new_table(primary)
    replica.freeze()
    try:
        commit = asyncio.create_task(query(primary, f"INSERT INTO {table} VALUES (1)"))

        async def waiting_for_replica() -> bool:
            rows = await query(
                primary,
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE %s",
                (f"INSERT INTO {table}%",),
            )
            return bool(rows)

        await eventually(waiting_for_replica, timeout=SECONDS, message="the commit waits")
        assert not commit.done()
    finally:
        replica.thaw()
    await asyncio.wait_for(commit, SECONDS)
    assert await query(replica, f"SELECT id FROM {table}") == [(1,)]


async def test_the_redis_replica_follows_and_sentinel_watches_the_primary(
    plane: DataPlane,
) -> None:
    primary, replica, sentinel = plane.redis
    assert plane.redis_url == primary.url
    key = f"test:{uuid.uuid4().hex}"
    writer, reader, watcher = primary.client(), replica.client(), sentinel.client()
    try:
        await writer.set(key, "written on the primary")

        async def followed() -> bool:
            return await reader.get(key) == "written on the primary"

        await eventually(followed, timeout=SECONDS, message="the key on the replica")
        assert (await reader.role())[0] == "slave"
        master = await watcher.sentinel_get_master_addr_by_name(
            SENTINEL_MASTER, return_responses=True
        )
        assert master == ("127.0.0.1", primary.port)
    finally:
        for client in (writer, reader, watcher):
            await client.aclose()


async def test_a_second_start_keeps_the_running_servers(plane: DataPlane) -> None:
    directory = plane.postgres[0].dir.parent
    again = await start_data_plane(
        directory, CONFIGURED_PG, CONFIGURED_REDIS, replication="sync", sentinel=True
    )
    assert [(s.port, s.pid()) for s in again.servers] == [(s.port, s.pid()) for s in plane.servers]


async def test_external_mode_refuses_to_start_servers(tmp_path: Path) -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/astra_sandbox"
    with pytest.raises(ServerError, match=r"does not answer at .*ASTRA_OPS_DATA_PLANE=auto"):
        await start_data_plane(tmp_path, nowhere, "redis://127.0.0.1:1/0", mode="external")
    assert list(tmp_path.iterdir()) == []


async def test_pg_primary_blip_freezes_the_primary_then_it_answers_again(
    plane: DataPlane,
) -> None:
    primary = plane.postgres[0]
    table = await new_table(primary)
    pid = primary.pid()
    assert pid is not None
    blip = asyncio.create_task(server_faults.pg_primary_blip(plane, seconds=2))
    await eventually(lambda: state(pid) == "T", timeout=SECONDS, message="the primary frozen")
    fault = await blip
    assert (fault.fault, fault.server, fault.pid) == ("pg-primary-blip", "primary", pid)
    await query(primary, f"INSERT INTO {table} VALUES (1)")  # the same server, writable
    assert primary.pid() == pid


async def test_pg_primary_down_kills_the_primary_and_leaves_the_replica(plane: DataPlane) -> None:
    primary, replica = plane.postgres
    table = await new_table(primary)
    await query(primary, f"INSERT INTO {table} VALUES (1)")  # acknowledged: on the replica too
    fault = await server_faults.pg_primary_down(plane)
    try:
        assert (fault.fault, fault.server) == ("pg-primary-down", "primary")
        assert not alive(fault.pid)
        assert not await primary.answers()
        assert await query(replica, "SELECT pg_is_in_recovery()") == [(True,)]
        assert await query(replica, f"SELECT id FROM {table}") == [(1,)]
        with pytest.raises(ServerError, match="no PostgreSQL primary of ours answers"):
            await server_faults.pg_primary_down(plane)
    finally:
        await primary.start()
    assert await query(primary, f"SELECT id FROM {table}") == [(1,)]


async def test_redis_primary_down_kills_the_primary(plane: DataPlane) -> None:
    primary, replica, _ = plane.redis
    fault = await server_faults.redis_primary_down(plane)
    reader = replica.client()
    try:
        assert (fault.fault, fault.server) == ("redis-primary-down", "primary")
        assert not alive(fault.pid)
        assert not await primary.answers()

        async def link_down() -> bool:
            info = await reader.info("replication")
            return bool(info["master_link_status"] == "down")

        await eventually(link_down, timeout=SECONDS, message="the replica's link down")
    finally:
        await reader.aclose()
        await primary.start()


async def test_redis_data_loss_flushes_the_primary_without_an_outage(
    plane: DataPlane, tmp_path: Path
) -> None:
    primary, replica, _ = plane.redis
    writer, reader = primary.client(), replica.client()
    try:
        await writer.mset({f"test:{uuid.uuid4().hex}": "1" for _ in range(5)})
        pid = primary.pid()
        # Through the CLI, as a person beside `astra-ops dev --replicated` breaks it.
        plane.write(data_plane_record(tmp_path))
        output = await cli(tmp_path, "sandbox", "fault", "redis-data-loss", "--json")
        fault = json.loads(output)
        assert (fault["fault"], fault["server"], fault["pid"]) == (
            "redis-data-loss",
            "primary",
            pid,
        )
        assert fault["keys_lost"] >= 5
        assert await writer.dbsize() == 0
        assert primary.pid() == pid  # no outage: the same process answers

        async def replica_empty() -> bool:
            return await reader.dbsize() == 0

        await eventually(replica_empty, timeout=SECONDS, message="the replica flushed too")
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_server_fault_without_servers_of_our_own_says_how_to_get_them(
    tmp_path: Path,
) -> None:
    with pytest.raises(AssertionError, match="astra-ops dev --replicated"):
        await cli(tmp_path, "sandbox", "fault", "pg-primary-down")


async def cli(state_dir: Path, *args: str) -> str:
    """`astra-ops` in dev mode with ``state_dir`` as its state directory; its output, or an
    AssertionError with it when the command fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "starters.cli", *args,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "ASTRA_OPS_DEV_MODE": "true",
             "ASTRA_OPS_STATE_DIR": str(state_dir), "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), SECONDS)
    if proc.returncode != 0:
        raise AssertionError(out.decode())
    return out.decode()
