"""Fixtures for tests against the sandbox's real PostgreSQL and Redis.

The servers are the configured ones (``ASTRA_TEST_PG_ADMIN_DSN``, ``ASTRA_TEST_REDIS_URL``) where
they answer, else servers of the session's own in a temporary directory
(``ASTRA_TEST_DATA_PLANE=auto``; ``own`` always starts them, ``external`` never does), so the
suite needs nothing but Python. Every test gets its own freshly migrated database and its own
Redis key prefix, so tests run side by side (and beside a running ``astra-ops dev``) without
seeing each other's data; nothing ever flushes the shared Redis.
"""

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast, get_args

import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from runtime.migrations import upgrade
from sandbox.db import create_database, drop_database, migrate
from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane, Mode, running_data_plane, scratch_dir

PG_ADMIN_DSN = os.environ.get(
    "ASTRA_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ASTRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODE_SETTING = "ASTRA_TEST_DATA_PLANE"


@asynccontextmanager
async def session_servers() -> AsyncIterator[DataPlane]:
    """The configured PostgreSQL and Redis, or the session's own where they do not answer."""
    mode = os.environ.get(MODE_SETTING, "auto")
    if mode not in get_args(Mode):
        raise ValueError(f"{MODE_SETTING}={mode!r}: expected one of {', '.join(get_args(Mode))}")
    directory = scratch_dir("astra-test-data-")
    try:
        async with running_data_plane(
            directory, PG_ADMIN_DSN, REDIS_URL, mode=cast(Mode, mode), setting=MODE_SETTING
        ) as plane:
            yield plane
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
async def data_servers() -> AsyncIterator[DataPlane]:
    """The session's PostgreSQL (``postgres_url`` is its admin DSN) and Redis."""
    async with session_servers() as plane:
        yield plane


NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def new_database(data_servers: DataPlane) -> AsyncIterator[NewDatabase]:
    """Makes empty databases (DSNs to them) on the test server; all are dropped after the test."""
    admin = data_servers.postgres_url
    names: list[str] = []

    async def make() -> str:
        names.append(f"astra_test_{uuid.uuid4().hex}")
        await create_database(admin, names[-1])
        return make_conninfo(admin, dbname=names[-1])

    try:
        yield make
    finally:
        for name in names:
            await drop_database(admin, name)


async def migrated(dsn: str) -> str:
    """The database as the dev stack prepares it: the sandbox's schema, then astra-ops's own
    tables beside it (what `astra-ops setup` does on a real database)."""
    await migrate(dsn)
    await upgrade(dsn, dsn)
    return dsn


@pytest.fixture
async def pg_dsn(new_database: NewDatabase) -> str:
    """A DSN to a new, migrated database."""
    return await migrated(await new_database())


@pytest.fixture(scope="session")
async def state_database(data_servers: DataPlane) -> AsyncIterator[str]:
    """astra-ops's own records (delivery ledger, unattended-action budgets) for workers whose
    test names no data plane: one migrated database for the session. Its rows are keyed by
    workflow ids, which no two tests share."""
    admin = data_servers.postgres_url
    name = f"astra_test_state_{uuid.uuid4().hex}"
    await create_database(admin, name)
    try:
        dsn = make_conninfo(admin, dbname=name)
        await upgrade(dsn, dsn)
        yield dsn
    finally:
        await drop_database(admin, name)


def new_prefix() -> str:
    return f"astra_test_{uuid.uuid4().hex}:"


async def delete_prefix(prefix: str, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(data_servers: DataPlane) -> AsyncIterator[str]:
    """A key prefix no other test uses, in place of ``astra:``; its keys are deleted afterwards."""
    prefix = new_prefix()
    yield prefix
    await delete_prefix(prefix, data_servers.redis_url)


@asynccontextmanager
async def own_data_plane() -> AsyncIterator[SandboxTarget]:
    """A data plane of its own outside a test (tests/histories/record.py): a new migrated
    database and a new Redis key prefix, both removed afterwards."""
    name, prefix = f"astra_test_{uuid.uuid4().hex}", new_prefix()
    async with session_servers() as servers:
        admin = servers.postgres_url
        await create_database(admin, name)
        try:
            dsn = await migrated(make_conninfo(admin, dbname=name))
            yield SandboxTarget(dsn=dsn, redis_url=servers.redis_url, key_prefix=prefix)
        finally:
            await delete_prefix(prefix, servers.redis_url)
            await drop_database(admin, name)


@pytest.fixture
async def redis_client(data_servers: DataPlane) -> AsyncIterator["aioredis.Redis"]:
    """A Redis client for a test's own assertions (strings in, strings out)."""
    client = aioredis.Redis.from_url(data_servers.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def data_plane(pg_dsn: str, redis_prefix: str, data_servers: DataPlane) -> SandboxTarget:
    """The sandbox's data plane for one test: its database, the Redis, its key prefix."""
    return SandboxTarget(dsn=pg_dsn, redis_url=data_servers.redis_url, key_prefix=redis_prefix)
