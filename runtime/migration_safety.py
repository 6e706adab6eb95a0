"""Does a release's SQL migration break the binary that is still running?

During a rolling or canary upgrade the old binary keeps serving against the new schema until its
last pod is gone, so a migration may only *expand* what the old binary relies on; the *contract*
half (dropping, renaming, tightening) waits for a later release, once nothing running needs the
old shape. This module reads the migrations with PostgreSQL's own parser (pglast), learns what the
running binary uses from its queries (also parsed, never pattern-matched), and reports each
statement that would break it, with the expand/contract way instead.

It is pure (SQL text in, a report out): the CLI's ``check-migrations`` and the canary's pre-check
are thin adapters over :func:`check_migrations`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import AlterTableType, ConstrType, ObjectType
from pglast.parser import ParseError
from pydantic import BaseModel

TABLE_KINDS = (
    ObjectType.OBJECT_TABLE,
    ObjectType.OBJECT_VIEW,
    ObjectType.OBJECT_MATVIEW,
    ObjectType.OBJECT_FOREIGN_TABLE,
)
FILLS_ITSELF = (ConstrType.CONSTR_DEFAULT, ConstrType.CONSTR_IDENTITY, ConstrType.CONSTR_GENERATED)
NOT_NULL = (ConstrType.CONSTR_NOTNULL, ConstrType.CONSTR_PRIMARY)


class SqlInputError(Exception):
    """A file could not be read or parsed; names the file and, for a parse error, the line."""

    def __init__(self, file: str, message: str, line: int | None = None) -> None:
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")


@dataclass(frozen=True)
class SqlFile:
    name: str
    """How messages name it: the path as given."""
    text: str

    @classmethod
    def read(cls, path: Path) -> SqlFile:
        try:
            return cls(str(path), path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise SqlInputError(str(path), f"cannot read it: {err}") from err


@dataclass(frozen=True)
class Statement:
    file: str
    line: int
    text: str
    node: ast.Node


def statements(sql: SqlFile, hint: str = "") -> list[Statement]:
    """The file's statements with the line each starts on (pglast's locations are characters)."""
    try:
        raws = parse_sql(sql.text)
    except ParseError as err:
        message, location = err.args[0], err.args[1]
        line = sql.text.count("\n", 0, location) + 1
        raise SqlInputError(sql.name, f"{message}{hint}", line) from err
    found = []
    for raw in raws:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql.text)
        line = sql.text.count("\n", 0, start) + 1
        assert raw.stmt is not None  # the parser makes no empty statements
        found.append(Statement(sql.name, line, sql.text[start:end].strip(), raw.stmt))
    return found


def name(value: str | None) -> str:
    """A name the grammar always gives here (pglast types every field as optional)."""
    assert value is not None
    return value


def relname(relation: ast.RangeVar | None) -> str:
    assert relation is not None
    return name(relation.relname)


def walk(node: Any) -> Iterator[ast.Node]:
    """Every node under ``node``, itself included."""
    if isinstance(node, ast.Node):
        yield node
        for slot in node.__slots__:  # type: ignore[attr-defined]  # pglast's generated nodes
            yield from walk(getattr(node, slot))
    elif isinstance(node, tuple | list):
        for item in node:
            yield from walk(item)


@dataclass
class Usage:
    """What the running binary's queries touch."""

    tables: set[str] = field(default_factory=set)
    columns: set[tuple[str, str]] = field(default_factory=set)
    every_column: set[str] = field(default_factory=set)
    """Tables used whole: ``SELECT *``, ``RETURNING *``, an INSERT or COPY without a column list."""
    star_reads: set[str] = field(default_factory=set)
    """Tables whose rows come back with ``*``: their result shape is their column list."""
    writes: set[str] = field(default_factory=set)
    """Tables the binary inserts into or updates (or COPYs into)."""

    def uses(self, table: str) -> bool:
        return table in self.tables

    def uses_column(self, table: str, column: str) -> bool:
        return (table, column) in self.columns or table in self.every_column

    def add(self, stmt: ast.Node) -> None:
        """Record one query's tables and columns. An unqualified column is counted against every
        table of its statement: without the schema its owner is unknown, and over-counting only
        makes the check stricter."""
        ctes = {n.ctename for n in walk(stmt) if isinstance(n, ast.CommonTableExpr)}
        names: dict[str, str] = {}
        for rv in (n for n in walk(stmt) if isinstance(n, ast.RangeVar)):
            table = relname(rv)
            if table in ctes:
                continue
            names[table] = table
            if rv.alias is not None:
                names[name(rv.alias.aliasname)] = table
        tables = set(names.values())
        self.tables |= tables
        for node in walk(stmt):
            if isinstance(node, ast.ColumnRef):
                self._column_ref(node, names, tables)
            elif isinstance(node, ast.InsertStmt):
                target = relname(node.relation)
                self.writes.add(target)
                if node.cols:
                    self.columns |= {(target, col.name) for col in node.cols}
                else:
                    self.every_column.add(target)
                conflict = [n for n in walk(node.onConflictClause) if isinstance(n, ast.IndexElem)]
                self.columns |= {(target, elem.name) for elem in conflict if elem.name}
            elif isinstance(node, ast.UpdateStmt):
                target = relname(node.relation)
                self.writes.add(target)
                self.columns |= {(target, col.name) for col in node.targetList or ()}
            elif isinstance(node, ast.CopyStmt) and node.relation is not None:
                target = relname(node.relation)
                if node.is_from:
                    self.writes.add(target)
                if node.attlist:
                    self.columns |= {(target, col.sval) for col in node.attlist}
                else:
                    self.every_column.add(target)
                    self.star_reads.add(target)

    def _column_ref(self, ref: ast.ColumnRef, names: dict[str, str], tables: set[str]) -> None:
        *qualifier, last = ref.fields or ()
        owner = names.get(qualifier[-1].sval) if qualifier else None
        owners = {owner} if owner else tables
        if isinstance(last, ast.A_Star):
            self.every_column |= owners
            self.star_reads |= owners
        else:
            self.columns |= {(table, last.sval) for table in owners}


USES_HINT = (
    " (a --uses file holds the binary's queries as plain SQL statements, separated by ';', "
    "with parameters written $1, $2 as PostgreSQL reads them)"
)


def usage_of(files: list[SqlFile]) -> Usage:
    usage = Usage()
    for sql in files:
        for stmt in statements(sql, USES_HINT):
            usage.add(stmt.node)
    return usage


class Finding(BaseModel):
    file: str
    line: int
    statement: str
    kind: str
    """drop-table, rename-table, drop-column, rename-column, change-column-type,
    add-not-null-column, set-not-null, add-column-under-select-star."""
    table: str
    column: str | None
    why: str
    """How it breaks the binary that is running."""
    instead: str
    """The expand/contract way to make the same change."""

    def subject(self) -> str:
        return f"{self.table}.{self.column}" if self.column else self.table


class MigrationReport(BaseModel):
    checked: list[str]
    """The migration files checked, in the order they apply."""
    applied: list[str]
    """Files already applied: they describe the running schema and are not checked."""
    uses: list[str] | None
    """The --uses files the running binary's usage came from; None: every existing table and
    column counts as in use."""
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def basis(self) -> str:
        if self.uses is None:
            return (
                "no --uses given: every table and column that exists before these migrations "
                "counts as in use by the running binary"
            )
        return f"in use: what the queries of {', '.join(self.uses)} reference"


WAIT = "and let every pod of the old binary go"


@dataclass
class _Release:
    """What the checked migrations create: nothing running can depend on it yet."""

    usage: Usage | None
    tables: set[str] = field(default_factory=set)
    columns: set[tuple[str, str]] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)

    def existing(self, table: str, column: str | None = None) -> bool:
        return table not in self.tables and (column is None or (table, column) not in self.columns)

    def in_use(self, table: str, column: str | None = None) -> bool:
        if not self.existing(table, column):
            return False
        if self.usage is None:
            return True
        if column is None:
            return self.usage.uses(table)
        return self.usage.uses_column(table, column)

    def written(self, table: str) -> bool:
        return self.existing(table) and (self.usage is None or table in self.usage.writes)

    def flag(
        self, stmt: Statement, kind: str, table: str, column: str | None, why: str, instead: str
    ) -> None:
        self.findings.append(
            Finding(
                file=stmt.file,
                line=stmt.line,
                statement=stmt.text,
                kind=kind,
                table=table,
                column=column,
                why=why,
                instead=instead,
            )
        )

    def check(self, stmt: Statement) -> None:
        node = stmt.node
        if isinstance(node, ast.CreateStmt):
            self.tables.add(relname(node.relation))
        elif isinstance(node, ast.ViewStmt):
            self.tables.add(relname(node.view))
        elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
            self.tables.add(relname(node.into.rel))
        elif isinstance(node, ast.DropStmt) and node.removeType in TABLE_KINDS:
            for qualified in node.objects or ():
                self._drop_table(stmt, name(qualified[-1].sval))
        elif isinstance(node, ast.RenameStmt):
            self._rename(stmt, node)
        elif isinstance(node, ast.AlterTableStmt) and node.objtype == ObjectType.OBJECT_TABLE:
            for cmd in node.cmds or ():
                self._alter(stmt, relname(node.relation), cmd)

    def _drop_table(self, stmt: Statement, table: str) -> None:
        if self.in_use(table):
            self.flag(
                stmt,
                "drop-table",
                table,
                None,
                f"the running binary's queries name {table}; they fail with 'relation does not "
                "exist' from the moment it is gone",
                f"contract in a later release: first ship a binary that no longer reads or writes "
                f"{table} {WAIT}, then drop it",
            )
        self.tables.discard(table)

    def _rename(self, stmt: Statement, node: ast.RenameStmt) -> None:
        if node.renameType in TABLE_KINDS:
            table, new = relname(node.relation), name(node.newname)
            if self.in_use(table):
                self.flag(
                    stmt,
                    "rename-table",
                    table,
                    None,
                    f"the running binary's queries name {table}, which stops existing under that "
                    "name: they fail with 'relation does not exist'",
                    f"expand/contract: create {new} (or a view of that name over {table}), ship "
                    f"a binary that uses {new} {WAIT}, then drop {table}",
                )
            self.tables.add(new)
        elif node.renameType == ObjectType.OBJECT_COLUMN:
            table, column, new = relname(node.relation), name(node.subname), name(node.newname)
            if self.in_use(table, column):
                self.flag(
                    stmt,
                    "rename-column",
                    table,
                    column,
                    f"the running binary's queries name {table}.{column}; they fail with "
                    "'column does not exist' once it is renamed",
                    f"expand/contract: add {new}, keep both written (a trigger, or a binary "
                    f"that writes both), backfill, ship a binary that reads {new} {WAIT}, then "
                    f"drop {column}",
                )
            self.columns.add((table, new))

    def _alter(self, stmt: Statement, table: str, cmd: ast.AlterTableCmd) -> None:
        kind = cmd.subtype
        if kind == AlterTableType.AT_AddColumn:
            assert isinstance(cmd.def_, ast.ColumnDef)
            self._add_column(stmt, table, cmd.def_)
            return
        column = name(cmd.name)
        if kind == AlterTableType.AT_DropColumn and self.in_use(table, column):
            self.flag(
                stmt,
                "drop-column",
                table,
                column,
                f"the running binary reads or writes {table}.{column} (by name or with *); "
                "its statements fail with 'column does not exist', and a prepared SELECT * with "
                "'cached plan must not change result type'",
                f"contract in a later release: first ship a binary that no longer reads or "
                f"writes {column} (nor selects * from {table}) {WAIT}, then drop the column",
            )
        elif kind == AlterTableType.AT_AlterColumnType and self.in_use(table, column):
            self.flag(
                stmt,
                "change-column-type",
                table,
                column,
                f"the running binary reads or writes {table}.{column} as its old type: "
                "its prepared statements fail with 'cached plan must not change result type', "
                "and values or expressions of the old type may no longer fit; the table is "
                "rewritten under an exclusive lock meanwhile",
                f"expand/contract: add a column of the new type, keep both written, backfill, "
                f"ship a binary that reads the new column {WAIT}, then drop {column}",
            )
        elif (
            kind == AlterTableType.AT_SetNotNull
            and self.existing(table, column)
            and self.written(table)
        ):
            self.flag(
                stmt,
                "set-not-null",
                table,
                column,
                f"the running binary writes rows of {table} that may leave {column} NULL "
                "(an INSERT that omits it, an UPDATE that clears it); those now fail with a "
                "not-null violation",
                f"first ship a binary that always writes {column} {WAIT}, backfill the NULLs, "
                f"then ADD CONSTRAINT ... CHECK ({column} IS NOT NULL) NOT VALID, VALIDATE it, "
                "and SET NOT NULL (PostgreSQL 12+ uses the valid check instead of a scan)",
            )

    def _add_column(self, stmt: Statement, table: str, definition: ast.ColumnDef) -> None:
        column = name(definition.colname)
        constraints = [c.contype for c in definition.constraints or ()]
        required = any(c in NOT_NULL for c in constraints) and not any(
            c in FILLS_ITSELF for c in constraints
        )
        if required and self.written(table):
            self.flag(
                stmt,
                "add-not-null-column",
                table,
                column,
                f"the running binary's INSERTs into {table} do not know {column}, so they fail "
                "with a not-null violation (on a table with rows the ALTER itself fails)",
                f"expand: add {column} nullable or NOT NULL with a DEFAULT; ship a binary that "
                f"writes it {WAIT}, backfill, then make it NOT NULL in a later release",
            )
        elif self.existing(table) and self.usage is not None and table in self.usage.star_reads:
            self.flag(
                stmt,
                "add-column-under-select-star",
                table,
                column,
                f"the running binary selects * from {table}, so a new column changes the shape "
                "of its rows: its prepared statements fail with 'cached plan must not change "
                "result type', and code that unpacks rows by position breaks",
                f"first ship a binary that names the columns it reads from {table} {WAIT}, "
                "then add the column",
            )
        self.columns.add((table, column))


def check_migrations(
    migrations: list[SqlFile], uses: list[SqlFile] | None = None, applied: str | None = None
) -> MigrationReport:
    """Check ``migrations`` (sorted by name, as they apply) against the running binary's usage.

    ``applied``: the name of the last migration the running schema already has; it and the files
    before it are parsed but not checked. ``uses``: the running binary's queries; without them
    every table and column that exists before the checked migrations counts as in use.
    """
    ordered = sorted(migrations, key=lambda f: Path(f.name).name)
    done = [f for f in ordered if applied is not None and Path(f.name).name <= applied]
    pending = [f for f in ordered if f not in done]
    parsed = [(f, statements(f)) for f in ordered]
    release = _Release(usage_of(uses) if uses is not None else None)
    for sql, stmts in parsed:
        if sql in pending:
            for stmt in stmts:
                release.check(stmt)
    return MigrationReport(
        checked=[f.name for f in pending],
        applied=[f.name for f in done],
        uses=[f.name for f in uses] if uses is not None else None,
        findings=release.findings,
    )


def read_migrations_dir(directory: Path) -> list[SqlFile]:
    """Every ``*.sql`` of ``directory``, sorted by name; refuses a directory without any."""
    if not directory.is_dir():
        raise SqlInputError(str(directory), "not a directory of SQL migration files")
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise SqlInputError(str(directory), "holds no *.sql migration files")
    return [SqlFile.read(path) for path in files]
