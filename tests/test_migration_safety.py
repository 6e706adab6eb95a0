"""The migration check's verdict is what happens on a real PostgreSQL.

Each case is a release migration over the Astra contract (sandbox/db). While it applies, a
running binary keeps running its queries on the previous schema, each a prepared statement as
drivers prepare their hot queries (psycopg after five runs). The check, given those same queries
as ``--uses``, must flag exactly the cases where the binary's queries then fail, or where the
migration cannot apply under its traffic at all (a NOT NULL column or constraint on a table the
binary keeps filling is refused by PostgreSQL itself).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runtime.migration_safety import SqlFile, check_migrations, read_migrations_dir, statements
from runtime.settings import REPO_ROOT
from sandbox.db import migrate
from tests.conftest_data import NewDatabase
from tests.conftest_kube import eventually

CONTRACT = REPO_ROOT / "sandbox" / "db"
RUNNING_BINARY = """
-- The running binary's queries, modelled on the sandbox's workers (sandbox/loadgen.py).
INSERT INTO tasks (id, goal_id, shard) VALUES (gen_random_uuid()::text, 'goal-1', 1);
UPDATE tasks SET status = 'running', worker_id = 'astra-worker-1', updated_at = now()
 WHERE id IN (SELECT id FROM tasks WHERE status = 'pending' ORDER BY updated_at LIMIT 5
              FOR UPDATE SKIP LOCKED);
SELECT id, retries, max_retries, shard FROM tasks
 WHERE worker_id = 'astra-worker-1' AND status = 'running';
UPDATE tasks SET status = 'pending', worker_id = NULL WHERE status = 'running';
INSERT INTO workers (id) VALUES ('astra-worker-1') ON CONFLICT (id) DO NOTHING;
SELECT * FROM workers;
INSERT INTO llm_usage (agent_id, tenant, model, tokens, cost_usd)
 VALUES ('planner', 'acme', 'gpt-4o', 10, 0.01);
SELECT tenant, sum(cost_usd) FROM llm_usage GROUP BY tenant;
"""

BREAKING = {
    "drop a column in use": "ALTER TABLE tasks DROP COLUMN shard;",
    "rename a column in use": "ALTER TABLE llm_usage RENAME COLUMN tenant TO tenant_id;",
    "drop a table in use": "DROP TABLE llm_usage;",
    "rename a table in use": "ALTER TABLE workers RENAME TO astra_workers;",
    "add NOT NULL without a default": "ALTER TABLE llm_usage ADD COLUMN region text NOT NULL;",
    "SET NOT NULL": "ALTER TABLE tasks ALTER COLUMN worker_id SET NOT NULL;",
    "change a column's type": "ALTER TABLE tasks ALTER COLUMN retries TYPE bigint;",
    "add a column under SELECT *": "ALTER TABLE workers ADD COLUMN zone text;",
}
SAFE = {
    "add a nullable column": "ALTER TABLE tasks ADD COLUMN tenant text;",
    "add NOT NULL with a default": (
        "ALTER TABLE llm_usage ADD COLUMN region text NOT NULL DEFAULT 'eu';"
    ),
    "create an index concurrently": "CREATE INDEX CONCURRENTLY tasks_by_goal ON tasks (goal_id);",
    "create a table": "CREATE TABLE goals (id text PRIMARY KEY, title text NOT NULL);",
    "drop a column nobody uses": "ALTER TABLE tasks DROP COLUMN last_error;",
    "drop a table nobody uses": "DROP TABLE astra_sandbox_marker;",
    "drop NOT NULL": "ALTER TABLE llm_usage ALTER COLUMN model DROP NOT NULL;",
    "expand then fill a new table": (
        "CREATE TABLE goals (id text PRIMARY KEY);\n"
        "ALTER TABLE goals ADD COLUMN title text NOT NULL;"
    ),
}


@dataclass
class RunningBinary:
    """Runs its queries round after round on one connection until one fails."""

    dsn: str
    queries: list[str]
    rounds: int = 0
    error: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                for query in self.queries:
                    try:
                        await conn.execute(query.encode(), prepare=True)
                    except psycopg.Error as err:
                        self.error = f"{query.split()[0]}: {str(err).splitlines()[0]}"
                        return
                self.rounds += 1
                await asyncio.sleep(0)

    async def rounds_pass(self, count: int) -> None:
        target = self.rounds + count
        await eventually(
            lambda: self.rounds >= target or self.error is not None,
            timeout=15,
            message=f"{count} rounds of the running binary",
        )


async def what_happens(dsn: str, migration: str, queries: list[str]) -> str:
    """Apply ``migration`` under the running binary: 'fine', or what broke."""
    binary = RunningBinary(dsn, queries)
    task = asyncio.create_task(binary.run())
    try:
        await binary.rounds_pass(2)  # every query prepared
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            # One statement at a time, as a migrator does: CREATE INDEX CONCURRENTLY must run
            # outside a transaction.
            for stmt in statements(SqlFile("release.sql", migration)):
                try:
                    await conn.execute(stmt.text.encode())
                except psycopg.Error as err:
                    return f"the migration is refused: {str(err).splitlines()[0]}"
        await binary.rounds_pass(3)
        return f"the running binary breaks: {binary.error}" if binary.error else "fine"
    finally:
        binary.stop.set()
        await task


def release_dir(tmp_path: Path, migration: str) -> Path:
    """The contract's migrations (already applied) and the release's on top."""
    directory = tmp_path / "migrations"
    shutil.copytree(CONTRACT, directory, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (directory / "0100_release.sql").write_text(migration)
    return directory


@pytest.mark.parametrize(
    ("migration", "flagged"),
    [pytest.param(sql, True, id=name) for name, sql in BREAKING.items()]
    + [pytest.param(sql, False, id=name) for name, sql in SAFE.items()],
)
async def test_the_verdict_is_what_happens_to_the_running_binary(
    new_database: NewDatabase, tmp_path: Path, migration: str, flagged: bool
) -> None:
    uses = SqlFile("running.sql", RUNNING_BINARY)
    report = check_migrations(
        read_migrations_dir(release_dir(tmp_path, migration)),
        [uses],
        applied=max(p.name for p in CONTRACT.glob("*.sql")),
    )
    assert report.checked == [str(tmp_path / "migrations" / "0100_release.sql")]
    dsn = await new_database()
    await migrate(dsn)
    happened = await what_happens(dsn, migration, [s.text for s in statements(uses)])

    assert (happened != "fine") == flagged, (happened, report.findings)
    assert bool(report.findings) == flagged
    for finding in report.findings:
        assert finding.line == 1 and finding.statement in migration and finding.instead


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )


def test_cli_exit_codes_text_and_json(tmp_path: Path) -> None:
    directory = release_dir(tmp_path, "-- clean\nALTER TABLE tasks ADD COLUMN tenant text;\n")
    clean = cli("check-migrations", directory, "--applied", "0002_astra_sandbox_marker.sql")
    assert clean.returncode == 0, clean.stderr
    assert "no findings in 1 migration file(s); no --uses given" in clean.stdout

    (directory / "0101_contract.sql").write_text(
        "-- too early\n\nALTER TABLE tasks\n  DROP COLUMN last_error;\n"
    )
    found = cli("check-migrations", directory, "--applied", "0002_astra_sandbox_marker.sql")
    assert found.returncode == 1
    assert f"{directory / '0101_contract.sql'}:3: drop-column tasks.last_error" in found.stdout
    assert "ALTER TABLE tasks DROP COLUMN last_error" in found.stdout
    assert "instead: contract in a later release" in found.stdout

    as_json = cli("check-migrations", directory, "--applied", "0100_release.sql", "--json")
    report: dict[str, Any] = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    assert [(f["kind"], f["table"], f["column"], f["line"]) for f in report["findings"]] == [
        ("drop-column", "tasks", "last_error", 3)
    ]
    assert report["uses"] is None and "every table and column" in report["basis"]

    # Unused by these queries: the same drop passes.
    queries = tmp_path / "queries.sql"
    queries.write_text("SELECT id, status FROM tasks WHERE worker_id = $1;\n")
    with_uses = cli(
        "check-migrations", directory, "--applied", "0100_release.sql", "--uses", queries
    )
    assert with_uses.returncode == 0, with_uses.stdout


def test_cli_names_the_file_and_line_it_cannot_parse(tmp_path: Path) -> None:
    directory = release_dir(
        tmp_path, "ALTER TABLE tasks ADD COLUMN tenant text;\n\nALTER TABL x;\n"
    )
    broken = cli("check-migrations", directory)
    assert broken.returncode == 2
    assert f"{directory / '0100_release.sql'}:3: syntax error" in broken.stderr

    (directory / "0100_release.sql").write_text("ALTER TABLE tasks ADD COLUMN tenant text;\n")
    queries = tmp_path / "queries.sql"
    queries.write_text("SELECT id FROM tasks\n WHERE worker_id = %s")
    psycopg_style = cli("check-migrations", directory, "--uses", queries)
    assert psycopg_style.returncode == 2
    assert f"{queries}:2: syntax error" in psycopg_style.stderr
    assert "$1, $2" in psycopg_style.stderr
    assert cli("check-migrations", tmp_path / "nowhere").returncode == 2


def test_astra_ops_own_migrations_are_safe_for_the_release_running() -> None:
    """Each of astra-ops's own migrations keeps the release before it running."""
    for kind in ("astra", "state"):
        files = read_migrations_dir(REPO_ROOT / "runtime" / "migrations" / kind)
        for applied in [None, *(Path(f.name).name for f in files[:-1])]:
            assert check_migrations(files, applied=applied).findings == []
