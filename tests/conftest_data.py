"""Fixtures for tests against the sandbox's real PostgreSQL and Redis.

Every test gets its own freshly migrated database and its own Redis key prefix, so tests run
side by side (and beside a running ``astra-ops dev``) without seeing each other's data; nothing
ever flushes the shared Redis.
"""

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from runtime.migrations import upgrade
from sandbox.db import create_database, drop_database, migrate
from sandbox.faults import SandboxTarget

PG_ADMIN_DSN = os.environ.get(
    "ASTRA_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ASTRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def new_database() -> AsyncIterator[NewDatabase]:
    """Makes empty databases (DSNs to them) on the test server; all are dropped after the test."""
    names: list[str] = []

    async def make() -> str:
        names.append(f"astra_test_{uuid.uuid4().hex}")
        await create_database(PG_ADMIN_DSN, names[-1])
        return make_conninfo(PG_ADMIN_DSN, dbname=names[-1])

    try:
        yield make
    finally:
        for name in names:
            await drop_database(PG_ADMIN_DSN, name)


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


def new_prefix() -> str:
    return f"astra_test_{uuid.uuid4().hex}:"


async def delete_prefix(prefix: str, redis_url: str = REDIS_URL) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix no other test uses, in place of ``astra:``; its keys are deleted afterwards."""
    prefix = new_prefix()
    yield prefix
    await delete_prefix(prefix)


@asynccontextmanager
async def own_data_plane() -> AsyncIterator[SandboxTarget]:
    """A data plane of its own outside a test (tests/histories/record.py): a new migrated
    database and a new Redis key prefix, both removed afterwards."""
    name, prefix = f"astra_test_{uuid.uuid4().hex}", new_prefix()
    await create_database(PG_ADMIN_DSN, name)
    try:
        dsn = await migrated(make_conninfo(PG_ADMIN_DSN, dbname=name))
        yield SandboxTarget(dsn=dsn, redis_url=REDIS_URL, key_prefix=prefix)
    finally:
        await delete_prefix(prefix)
        await drop_database(PG_ADMIN_DSN, name)


@pytest.fixture
async def redis_client() -> AsyncIterator["aioredis.Redis"]:
    """A Redis client for a test's own assertions (strings in, strings out)."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def data_plane(pg_dsn: str, redis_prefix: str) -> SandboxTarget:
    """The sandbox's data plane for one test: its database, the Redis, its key prefix."""
    return SandboxTarget(dsn=pg_dsn, redis_url=REDIS_URL, key_prefix=redis_prefix)
