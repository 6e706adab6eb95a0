"""The sandbox's PostgreSQL schema: the simulated Astra's tables, as numbered .sql migrations.

Only Astra's own tables are here; the tables astra-ops writes beside them come from its own
migrations (``runtime.migrations``), applied by `astra-ops setup` on a real database and by the
dev stack and the tests here. The same runner applies both, recording these in
``schema_migrations``.
"""

from importlib import resources

import psycopg
import redis.asyncio as aioredis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from activities.redis_store import AstraKeys
from runtime.migrations import (
    Migration,
    MigrationError,
    apply,
    describe,
    read_migrations,
    reason,
)
from sandbox.loadgen import write_data_marker

# Any constant works; it only has to be the same for every migrator so that two processes that
# start at once (``astra-ops dev`` and a test, say) apply each migration once, one after the other.
_MIGRATION_LOCK = 0x61737472615F6462

# Tables holding sandbox state, in an order TRUNCATE accepts; ``schema_migrations`` is not state.
_STATE_TABLES = ("tasks", "workers", "llm_usage")
# Only the sandbox's migrations create it: what `reset` asks of a database before emptying it.
MARKER_TABLE = "astra_sandbox_marker"


class NotTheSandbox(ValueError):
    """A database that is not the sandbox's was about to be emptied; nothing was changed."""


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in the order they apply."""
    return read_migrations(resources.files(__package__))


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


async def migrate(
    dsn: str, *, create_missing: bool = True, only_sandbox: bool = False
) -> list[str]:
    """Bring the database ``dsn`` names up to the sandbox's schema; return the versions applied now.

    With ``create_missing`` the database is created first (through the server's ``postgres``
    database) when it does not exist, so a fresh machine needs no manual step. With
    ``only_sandbox`` a database that existed already must be the sandbox's (:func:`require_sandbox`)
    before anything is migrated into it.
    """
    created = False
    if create_missing:
        try:
            created = await create_database(
                make_conninfo(dsn, dbname="postgres"), database_name(dsn)
            )
        except psycopg.Error as e:
            raise MigrationError(
                f"could not create {describe(dsn)} ({reason(e)}); is PostgreSQL running, and may "
                "its user create databases? Or create it by hand"
            ) from e
    if only_sandbox and not created:
        await require_sandbox(dsn)
    return await apply(dsn, migrations(), table="schema_migrations", lock=_MIGRATION_LOCK)


async def require_sandbox(dsn: str) -> None:
    """Refuse, changing nothing, unless ``dsn`` names the sandbox's database."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute("SELECT to_regclass(%s)", (MARKER_TABLE,))).fetchone()
    if row is None or row[0] is None:
        raise NotTheSandbox(
            f"refusing to reset {describe(dsn)}: it is not the sandbox's (it has no {MARKER_TABLE} "
            "table, which only the sandbox's migrations create); nothing was changed. Point "
            "ASTRA_OPS_DATABASE_URL at the sandbox's database (by default astra_sandbox); a "
            "sandbox database made before the marker existed gets it from `astra-ops dev`"
        )


async def reset(dsn: str, redis_url: str, key_prefix: str = "astra:") -> None:
    """Return the sandbox to a clean state: empty the contract tables and delete its Redis keys
    (all but a fresh data marker).

    Refused, before anything changes, for a database that is not the sandbox's. Only keys under
    ``key_prefix`` go, never the whole Redis, which other users may share. astra-ops's own tables
    beside Astra's keep their rows: those are keyed by run, so none can match a later run.
    """
    await require_sandbox(dsn)
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
        # An empty sandbox, not one that lost its data: /metrics must not report a loss.
        await write_data_marker(client, AstraKeys(key_prefix))
    finally:
        await client.aclose()
