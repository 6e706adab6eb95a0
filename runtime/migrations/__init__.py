"""astra-ops's own tables, made by numbered SQL migrations that `astra-ops setup` applies.

astra-ops writes two kinds of tables, each into the database a setting names:

- ``astra/``: tables beside Astra's own, in ``ASTRA_OPS_DATABASE_URL``, because an activity
  changes them in the same statement as Astra's ``tasks`` (the requeue records);
- ``state/``: astra-ops's own records, in ``ASTRA_OPS_STATE_DATABASE_URL`` (by default the same
  database).

Files are named ``NNNN_what.sql``; each one applied is recorded as ``<folder>/<name>`` in
``astra_ops_schema_migrations`` of the database it went into. A migration is never edited once
released: a change is a new file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

ASTRA = "astra"
STATE = "state"
VERSIONS_TABLE = "astra_ops_schema_migrations"
# Any constant works, as long as every astra-ops migrator takes the same one ("astra_op").
_LOCK = 0x61737472615F6F70


class MigrationError(Exception):
    """A database could not be brought up to date; nothing of the failed run was applied."""


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str


def read_migrations(folder: Traversable, prefix: str = "") -> list[Migration]:
    """Every ``NNNN_what.sql`` in ``folder``, in the order they apply."""
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [Migration(prefix + f.name.removesuffix(".sql"), f.read_text()) for f in files]


def migrations(kind: str) -> list[Migration]:
    """astra-ops's migrations of one kind (``ASTRA`` or ``STATE``), in the order they apply."""
    return read_migrations(resources.files(__package__) / kind, f"{kind}/")


def describe(dsn: str) -> str:
    """A database as people name it, without the credentials its DSN may carry."""
    parts = conninfo_to_dict(dsn)
    where = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}"
    return f"database {parts.get('dbname') or '(default)'} on {where}"


def reason(error: Exception) -> str:
    """The first line of a driver's error: the rest (hints, context) does not fit one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


async def apply(dsn: str, wanted: list[Migration], *, table: str, lock: int) -> list[str]:
    """Apply the migrations of ``wanted`` that ``table`` does not record yet; the versions applied.

    All in one transaction, so a failed migration leaves the database as it was. The advisory
    lock, taken first, makes two processes that apply at once (two setup Jobs, the dev stack and
    a test) apply each migration once, one after the other: the second finds it recorded.
    """
    versions = sql.Identifier(table)
    applied_now: list[str] = []
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(versions)
            )
            rows = await (
                await conn.execute(sql.SQL("SELECT version FROM {}").format(versions))
            ).fetchall()
            done = {row[0] for row in rows}
            for migration in wanted:
                if migration.version in done:
                    continue
                # Without parameters psycopg sends the file as one simple query, so a migration
                # may hold several statements.
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(versions),
                    (migration.version,),
                )
                applied_now.append(migration.version)
    except psycopg.Error as e:
        raise MigrationError(
            f"could not bring {describe(dsn)} up to date ({reason(e)}); no migration was applied. "
            "Check the database setting (ASTRA_OPS_DATABASE_URL, ASTRA_OPS_STATE_DATABASE_URL), "
            "that PostgreSQL is reachable and that its user may create tables, then run again"
        ) from e
    return applied_now


async def upgrade(database_url: str, state_database_url: str) -> list[str]:
    """Bring astra-ops's tables up to date in both databases (one, when both name the same);
    the versions applied now. Running it again changes nothing."""
    applied: list[str] = []
    for kind, dsn in ((ASTRA, database_url), (STATE, state_database_url)):
        applied += await apply(dsn, migrations(kind), table=VERSIONS_TABLE, lock=_LOCK)
    return applied
