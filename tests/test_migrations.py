"""astra-ops's own migrations on the real PostgreSQL: idempotent, safe to run at once, recorded."""

import asyncio
from typing import Any

import psycopg
import pytest

from runtime.migrations import (
    ASTRA,
    STATE,
    VERSIONS_TABLE,
    Migration,
    MigrationError,
    apply,
    migrations,
    upgrade,
)
from tests.conftest_data import NewDatabase

EVERY_VERSION = [m.version for m in migrations(ASTRA) + migrations(STATE)]


async def fetch(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await (await conn.execute(query, params)).fetchall()


async def tables(dsn: str) -> set[str]:
    rows = await fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


async def recorded(dsn: str) -> list[str]:
    return [r[0] for r in await fetch(dsn, f"SELECT version FROM {VERSIONS_TABLE} ORDER BY 1")]


async def test_upgrade_creates_the_tables_records_versions_and_a_second_run_changes_nothing(
    new_database: NewDatabase,
) -> None:
    dsn = await new_database()
    first = await upgrade(dsn, dsn)
    second = await upgrade(dsn, dsn)

    assert first == EVERY_VERSION
    assert {"astra/0001_astra_ops_requeues", "state/0001_astra_ops_automatic_actions"} <= set(first)
    assert second == []
    assert await recorded(dsn) == sorted(EVERY_VERSION)
    assert {"astra_ops_requeues", "astra_ops_automatic_actions"} <= await tables(dsn)


async def test_each_kind_goes_to_the_database_its_setting_names(
    new_database: NewDatabase,
) -> None:
    astra, state = await new_database(), await new_database()
    await upgrade(astra, state)

    assert await recorded(astra) == [m.version for m in migrations(ASTRA)]
    assert await recorded(state) == [m.version for m in migrations(STATE)]
    assert "astra_ops_automatic_actions" not in await tables(astra)
    assert "astra_ops_requeues" not in await tables(state)


async def test_processes_applying_at_once_apply_each_migration_once(
    new_database: NewDatabase,
) -> None:
    dsn = await new_database()
    runs = await asyncio.gather(*(upgrade(dsn, dsn) for _ in range(6)))

    assert sorted(v for applied in runs for v in applied) == sorted(EVERY_VERSION)
    assert await recorded(dsn) == sorted(EVERY_VERSION)


async def test_tables_made_before_the_migrations_keep_their_rows(
    new_database: NewDatabase,
) -> None:
    # What older code left: the sandbox created the requeue table, and workers created the
    # automatic-action table on first use.
    dsn = await new_database()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            "CREATE TABLE astra_ops_requeues (token text NOT NULL, task_id text NOT NULL,"
            " requeued_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (token, task_id))"
        )
        await conn.execute("INSERT INTO astra_ops_requeues (token, task_id) VALUES ('r', 't')")
        await conn.execute(
            "CREATE TABLE astra_ops_automatic_actions (token text PRIMARY KEY,"
            " scope text NOT NULL, at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            "INSERT INTO astra_ops_automatic_actions (token, scope) VALUES ('a', 's')"
        )

    assert await upgrade(dsn, dsn) == EVERY_VERSION
    assert await fetch(dsn, "SELECT token, task_id FROM astra_ops_requeues") == [("r", "t")]
    assert await fetch(dsn, "SELECT token, scope FROM astra_ops_automatic_actions") == [("a", "s")]


async def test_a_failing_migration_applies_nothing_and_says_which_database(
    new_database: NewDatabase,
) -> None:
    dsn = await new_database()
    broken = [
        Migration("0001_fine", "CREATE TABLE fine (id int)"),
        Migration("0002_broken", "CREATE TABLE broken (id no_such_type)"),
    ]
    with pytest.raises(MigrationError, match=r"could not bring database astra_test_\w+ on "):
        await apply(dsn, broken, table=VERSIONS_TABLE, lock=1)

    assert await tables(dsn) == set()
