"""Faults of the data plane's servers, produced for real on the servers of ours a dev stack or a
test runs: the process is killed, frozen, or its data flushed.

The primary is whichever server says it is now (``pg_is_in_recovery()``, ``ROLE``), not the one
that was started as primary: after a failover the promoted replica is the one to break.
"""

from __future__ import annotations

from typing import Literal

import psycopg
from pydantic import BaseModel
from redis.exceptions import RedisError

from sandbox.servers.plane import DataPlane
from sandbox.servers.postgres import PostgresServer
from sandbox.servers.process import ServerError
from sandbox.servers.redis import RedisServer

DataPlaneFaultName = Literal[
    "pg-primary-down", "pg-primary-blip", "redis-primary-down", "redis-data-loss"
]


class DataPlaneFault(BaseModel):
    fault: DataPlaneFaultName
    server: str
    """Which of our servers, by the name it was started with (``primary``, ``replica``)."""
    address: str
    pid: int
    seconds: float | None = None
    """How long a blip froze the server."""
    keys_lost: int | None = None
    """How many keys a flush removed, in all its databases."""


async def postgres_primary(plane: DataPlane) -> PostgresServer:
    """Our PostgreSQL server that runs and is not in recovery."""
    for server in plane.postgres:
        if not server.running():
            continue
        try:
            async with await psycopg.AsyncConnection.connect(server.dsn, connect_timeout=2) as conn:
                row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
        except psycopg.OperationalError:
            continue
        if row is not None and not row[0]:
            return server
    raise ServerError(
        "no PostgreSQL primary of ours answers "
        f"({', '.join(f'{s.name} :{s.port}' for s in plane.postgres) or 'none runs'}): it is "
        "down already; promote the replica or restart `astra-ops dev` first"
    )


async def redis_primary(plane: DataPlane) -> RedisServer:
    """Our Redis server (not Sentinel) that runs and says it is a master."""
    for server in plane.redis:
        if server.sentinel_of or not server.running():
            continue
        client = server.client()
        try:
            role = await client.role()
        except (RedisError, OSError):
            continue
        finally:
            await client.aclose()
        if role and role[0] == "master":
            return server
    raise ServerError(
        "no Redis primary of ours answers "
        f"({', '.join(f'{s.name} :{s.port}' for s in plane.redis) or 'none runs'}): it is down "
        "already; promote the replica or restart `astra-ops dev` first"
    )


def _done(
    fault: DataPlaneFaultName,
    server: PostgresServer | RedisServer,
    pid: int | None,
    *,
    seconds: float | None = None,
    keys_lost: int | None = None,
) -> DataPlaneFault:
    """What ``fault`` did to ``server``, whose pid it had (None: the server stopped first)."""
    if pid is None:
        raise ServerError(f"{server.name} on :{server.port} stopped before {fault} could break it")
    return DataPlaneFault(
        fault=fault,
        server=server.name,
        address=f"127.0.0.1:{server.port}",
        pid=pid,
        seconds=seconds,
        keys_lost=keys_lost,
    )


async def _killed(
    fault: DataPlaneFaultName, server: PostgresServer | RedisServer
) -> DataPlaneFault:
    return _done(fault, server, await server.kill())


async def pg_primary_down(plane: DataPlane) -> DataPlaneFault:
    """The PostgreSQL primary's processes are killed (SIGKILL): its clients lose their
    connections and new ones are refused, until someone fails over or restarts it."""
    return await _killed("pg-primary-down", await postgres_primary(plane))


async def pg_primary_blip(plane: DataPlane, seconds: float) -> DataPlaneFault:
    """The PostgreSQL primary is frozen for ``seconds`` (SIGSTOP, then SIGCONT): it hangs, then
    answers again with nothing lost; a failover in between would have been a mistake."""
    server = await postgres_primary(plane)
    return _done("pg-primary-blip", server, await server.blip(seconds), seconds=seconds)


async def redis_primary_down(plane: DataPlane) -> DataPlaneFault:
    """The Redis primary is killed (SIGKILL); its replica loses its link."""
    return await _killed("redis-primary-down", await redis_primary(plane))


async def redis_data_loss(plane: DataPlane) -> DataPlaneFault:
    """FLUSHALL on the Redis primary: it keeps answering, with every key gone (its replica
    follows): data loss without an outage."""
    server = await redis_primary(plane)
    pid = server.pid()
    client = server.client()
    try:
        keyspace = await client.info("keyspace")
        await client.flushall()
    finally:
        await client.aclose()
    keys_lost = sum(int(db["keys"]) for db in keyspace.values())
    return _done("redis-data-loss", server, pid, keys_lost=keys_lost)
