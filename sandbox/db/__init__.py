"""The sandbox's PostgreSQL schema: numbered .sql migrations and the migrator that applies them.

Migrations are plain SQL files named ``NNNN_what.sql`` shipped inside this package; the migrator
applies the ones not yet recorded in ``schema_migrations``, in order, in one transaction, so a
failed migration leaves the database as it was and running the migrator twice changes nothing.
"""

from importlib import resources

import psycopg
import redis.asyncio as aioredis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Any constant works; it only has to be the same for every migrator so that two processes that
# start at once (``astra-ops dev`` and a test, say) apply each migration once, one after the other.
_MIGRATION_LOCK = 0x61737472615F6462

# Tables holding sandbox state, in an order TRUNCATE accepts; ``schema_migrations`` is not state.
_STATE_TABLES = ("tasks", "workers", "llm_usage", "astra_ops_requeues")


def migrations() -> list[tuple[str, str]]:
    """Every migration shipped with the package as (version, SQL), in the order they apply."""
    files = [f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")]
    return [
        (f.name.removesuffix(".sql"), f.read_text()) for f in sorted(files, key=lambda f: f.name)
    ]


def database_name(dsn: str) -> str:
    """The database a DSN names; it must name one, since the migrator never guesses a target."""
    name = conninfo_to_dict(dsn).get("dbname")
    if not name:
        raise ValueError(f"the DSN {dsn!r} names no database; add dbname=... (e.g. astra_sandbox)")
    return str(name)


async def create_database(admin_dsn: str, name: str) -> bool:
    """Create database ``name`` through ``admin_dsn`` unless it exists; True if it was created."""
    # CREATE DATABASE cannot run inside a transaction block, hence autocommit.
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        exists = await (
            await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        ).fetchone()
        if exists:
            return False
        try:
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False  # another migrator won the race; the database is there, which is the goal
        return True


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions (tests, game-day cleanup)."""
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


async def migrate(dsn: str, *, create_missing: bool = True) -> list[str]:
    """Bring the database ``dsn`` names up to the latest schema; return the versions applied now.

    With ``create_missing`` the database is created first (through the server's ``postgres``
    database) when it does not exist, so a fresh machine needs no manual step.
    """
    if create_missing:
        await create_database(make_conninfo(dsn, dbname="postgres"), database_name(dsn))
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
        done = {row[0] for row in rows}
        for version, text in migrations():
            if version in done:
                continue
            # Without parameters psycopg sends the file as one simple query, so a migration may
            # hold several statements.
            await conn.execute(text.encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
    return applied_now


async def reset(dsn: str, redis_url: str, key_prefix: str = "astra:") -> None:
    """Return the sandbox to a clean state: empty the contract tables and delete its Redis keys.

    Only keys under ``key_prefix`` go, never the whole Redis, which other users may share.
    """
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in _STATE_TABLES)
            )
        )
    client = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()
