"""Activities on the PostgreSQL servers themselves, for `postgres-outage`: check, fence, promote,
re-attach, verify.

Servers are named, never addressed: each call reads the data-plane topology
(``runtime/data_plane.py``) and looks the name up, so no DSN enters a run's history and an
operator's correction to the file applies to the next step. Every check is made from the
worker's point of view with a short connect timeout: a server the worker cannot reach within it
counts as down, which is what a failover decision needs to know quickly.

Each mutating activity reads the server's state first and acts only if it differs from the goal,
so a retry (or a second run after a crash) finds its own earlier work done and changes nothing.
Where the topology gives a server's ``control`` (the worker runs on its machine), fencing stops it
and re-attaching rewinds it with ``pg_rewind``, as the DBA on that machine would; without it,
fencing is done over SQL and re-attaching is left to a person, with the commands.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.mutation import Mutation, MutationResult
from activities.postgres import connect
from runtime.data_plane import DataPlaneTopology, NodeName, PostgresControl, PostgresNode
from runtime.errors import ConfigError
from runtime.redact import redact

if TYPE_CHECKING:
    import psycopg

STOP_SECONDS = 60
"""How long fencing waits for the old primary to stop (``pg_ctl stop -t``)."""
PROMOTE_SECONDS = 60
"""How long a promotion may take to finish (``pg_promote``'s wait)."""
PROBE_TABLE = "astra_ops_write_probe"
"""One row per server in the database a DSN names, rewritten by each write probe: the smallest
real write (a row, WAL, a commit) that a read-only or recovering server refuses. astra-ops creates
it on first use."""
AWAITING_REPLAY = "in archive recovery"
"""The cluster state (``pg_controldata``) pg_rewind leaves a server in as its last step, and a
replica has when it crashed: started as a replica, it replays from there."""
CONFIG_SUFFIX = ".conf"
"""The configuration files in a data directory (postgresql.conf, postgresql.auto.conf,
pg_hba.conf, and any file they include from there), which ``pg_rewind`` would overwrite with the
new primary's copies: the old server keeps its own port and settings, as a DBA keeps them by hand
around a rewind (a copy on disk, so a worker that dies mid-rewind loses none: ``_own_config``)."""


def lsn(text: str | None) -> int | None:
    """A ``pg_lsn`` ("16/B374D848") as a byte position, for arithmetic on positions."""
    if text is None:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def lsn_text(position: int | None) -> str:
    return "-" if position is None else f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def failure(err: BaseException) -> str:
    """One line on why a server did not answer, without the credentials its DSN may carry."""
    text = str(err).strip().splitlines()
    return redact(text[0] if text else type(err).__name__)


class NodesRequest(BaseModel):
    timeout_seconds: float = Field(default=3, gt=0, le=60)
    """How long each server has to answer each probe before it counts as down."""


class NodeState(BaseModel):
    """One PostgreSQL server as the worker sees it now."""

    name: str
    reachable: bool
    error: str = ""
    in_recovery: bool | None = None
    writable: bool = False
    """Took a real write (a row, committed) in the default transaction mode its clients get."""
    write_error: str = ""
    received: int | None = None
    """A replica's WAL received and flushed; a primary's own current position."""
    replayed: int | None = None
    primary_position: int | None = None
    """The primary's WAL position as this server knows it: a primary's own; a streaming
    replica's ``latest_end_lsn`` (what the primary last said it had; forgotten once the stream
    breaks); a dead server's on the worker's machine, the end of the WAL on its disk."""
    streaming: bool = False
    """A replica whose WAL receiver is streaming now."""
    synchronous: bool = False
    """Declared in the topology as a synchronous standby: every commit the primary acknowledged
    is on it."""

    def line(self) -> str:
        if not self.reachable:
            return f"{self.name}: unreachable ({self.error})"
        role = "replica" if self.in_recovery else "primary"
        writes = "takes writes" if self.writable else "refuses writes"
        return (
            f"{self.name}: {role}, {writes}, received {lsn_text(self.received)}, replayed "
            f"{lsn_text(self.replayed)}" + (", streaming" if self.streaming else "")
        )


class NodesReport(BaseModel):
    nodes: list[NodeState]
    patroni: str | None = None
    """What the topology's Patroni endpoint answered: Patroni manages these servers."""

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LookupError(f"no PostgreSQL server named {name!r} in the report")

    @property
    def writable(self) -> list[str]:
        return [n.name for n in self.nodes if n.writable]

    @property
    def primary_position(self) -> int | None:
        """The furthest primary position any server knows of: what a failover is measured
        against."""
        known = [n.primary_position for n in self.nodes if n.primary_position is not None]
        return max(known, default=None)

    def lag_bytes(self, name: str) -> int | None:
        """How far ``name`` is behind the last known primary position (None: not known)."""
        node, position = self.node(name), self.primary_position
        if node.received is None or position is None:
            return None
        return max(0, position - node.received)

    def summary(self) -> str:
        lines = [
            n.line() + (f", {lag} bytes behind" if n.in_recovery and lag is not None else "")
            for n in self.nodes
            for lag in [self.lag_bytes(n.name)]
        ]
        if self.patroni is not None:
            lines.append(f"Patroni answers: {self.patroni}")
        return "; ".join(lines)


class WritableServers(BaseModel):
    names: list[str]
    """The servers that took a probe write."""

    def summary(self) -> str:
        return f"taking writes: {', '.join(self.names) or 'none'}"


class Fence(Mutation):
    node: NodeName


class Promote(Mutation):
    node: NodeName


class Reattach(Mutation):
    node: NodeName
    """The old primary, to become a replica."""
    primary: NodeName
    """The new primary it is to stream from."""
    timeout_seconds: float = Field(default=120, gt=0, le=3600)
    """How long it may take to start streaming once rewound."""


class Reattached(MutationResult):
    rebuild: str = ""
    """When it could not be re-attached here: what a person must run to rebuild it."""


class PlatformWrite(BaseModel):
    node: NodeName
    """The server the platform's endpoint names now."""
    at_least: int | None = None
    """The WAL position the server had received when it was chosen: every commit up to it must
    be in its history now."""
    timeout_seconds: float = Field(default=5, gt=0, le=60)


class PlatformWriteResult(BaseModel):
    node: str
    position: int

    def summary(self) -> str:
        return (
            f"a write committed through the platform's endpoint on {self.node} (WAL "
            f"{lsn_text(self.position)})"
        )


class PostgresNodeActivities:
    """Reads the topology file on every call, as EndpointActivities does."""

    def __init__(self, topology: Path | None) -> None:
        self.topology_file = topology

    def _topology(self) -> DataPlaneTopology:
        try:
            return DataPlaneTopology.load(self.topology_file)
        except ConfigError as e:
            raise ApplicationError(str(e), type="TopologyError", non_retryable=True) from None

    def _node(self, name: str) -> PostgresNode:
        try:
            return self._topology().postgres_node(name)
        except ConfigError as e:
            raise ApplicationError(str(e), type="TopologyError", non_retryable=True) from None

    # -- checks ----------------------------------------------------------------------------

    @activity.defn
    async def postgres_nodes(self, req: NodesRequest) -> NodesReport:
        """Every server at once, each probed within the timeout; and whether Patroni answers."""
        async with heartbeating("probing the database servers"):
            return await self._survey(req)

    async def _survey(self, req: NodesRequest) -> NodesReport:
        topology = self._topology()
        states = await asyncio.gather(
            *(self._state(node, req.timeout_seconds) for node in topology.postgres)
        )
        received = [s.received for s in states if s.in_recovery and s.received is not None]
        for node, state in zip(topology.postgres, states, strict=True):
            # A replica forgets the primary's position when its stream breaks; a dead server
            # on the worker's machine still has its WAL on disk, and its end is that position.
            control = node.control
            if not state.reachable and control is not None and received and not _running(control):
                state.primary_position = await _wal_end(control, after=min(received))
        patroni = (
            await asyncio.to_thread(_patroni, topology.patroni_url, req.timeout_seconds)
            if topology.patroni_url
            else None
        )
        return NodesReport(nodes=list(states), patroni=patroni)

    @activity.defn
    async def writable_postgres(self, req: NodesRequest) -> WritableServers:
        """Which servers take a write now: the "never two primaries" check, before a promotion
        and after it."""
        report = await self.postgres_nodes(req)
        return WritableServers(names=report.writable)

    async def _state(self, node: PostgresNode, seconds: float) -> NodeState:
        state = NodeState(name=node.name, reachable=False, synchronous=node.synchronous)
        try:
            async with asyncio.timeout(seconds * 2):
                await self._read_state(node, state, seconds)
        except (OSError, TimeoutError, _psycopg_error()) as e:
            state.error = state.error or failure(e) or "no answer"
        return state

    async def _read_state(self, node: PostgresNode, state: NodeState, seconds: float) -> None:
        async with await connect(node.admin_dsn, autocommit=True, seconds=seconds) as conn:
            state.reachable = True
            row = await (
                await conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text,"
                    " pg_last_wal_replay_lsn()::text,"
                    " CASE WHEN pg_is_in_recovery() THEN NULL"
                    " ELSE pg_current_wal_lsn()::text END,"
                    " (SELECT latest_end_lsn::text FROM pg_stat_wal_receiver),"
                    " coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)"
                )
            ).fetchone()
            assert row is not None
            state.in_recovery = bool(row[0])
            current = lsn(row[3])
            state.received = lsn(row[1]) if state.in_recovery else current
            state.replayed = lsn(row[2]) if state.in_recovery else current
            state.primary_position = current if current is not None else lsn(row[4])
            state.streaming = bool(row[5])
        try:
            state.writable = await _probe_write(node.admin_dsn, node.name, seconds) is not None
        except (OSError, TimeoutError, _psycopg_error()) as e:
            state.write_error = failure(e)

    # -- actions ---------------------------------------------------------------------------

    @activity.defn
    async def fence_postgres(self, req: Fence) -> MutationResult:
        """Make sure the old primary takes no more writes, however it comes back.

        With ``control``: stop it (``pg_ctl stop -m fast``), the strongest fence; a killed one
        is down already, and one running as a replica takes no writes. Without: make it refuse
        writes over SQL (``default_transaction_read_only`` by ALTER SYSTEM, which survives a
        restart, then reload, and end its client sessions so none keeps a writable
        transaction); a session that asks for ``READ WRITE`` explicitly could still write,
        which is why the run then checks that no second server takes writes. An unreachable
        server without control cannot be fenced from here: the detail says so, and whoever
        brings it back must bring it back as a replica.
        """
        node = self._node(req.node)
        if node.control is not None:
            if not _running(node.control):
                return MutationResult(changed=False, detail=f"{node.name} is stopped already")
            if await _in_recovery(node):
                return MutationResult(
                    changed=False, detail=f"{node.name} runs as a replica; it takes no writes"
                )
            if req.dry_run:
                return MutationResult(changed=False, detail=f"would stop {node.name} (pg_ctl)")
            async with heartbeating(f"stopping {node.name}"):
                await _pg_ctl(node.control, "stop", "-m", "fast", "-w", "-t", str(STOP_SECONDS))
            return MutationResult(changed=True, detail=f"stopped {node.name} (pg_ctl stop -m fast)")
        try:
            async with await connect(node.admin_dsn, autocommit=True, seconds=5) as conn:
                mode = await (await conn.execute("SHOW default_transaction_read_only")).fetchone()
                sessions = await _client_sessions(conn)
                if mode is not None and mode[0] == "on" and not sessions:
                    return MutationResult(
                        changed=False, detail=f"{node.name} refuses writes already"
                    )
                if req.dry_run:
                    return MutationResult(
                        changed=False,
                        detail=f"would set {node.name} read-only and end its {len(sessions)} "
                        "client sessions",
                    )
                await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                await conn.execute("SELECT pg_reload_conf()")
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                    (sessions,),
                )
        except (OSError, _psycopg_error()) as e:
            return MutationResult(
                changed=False,
                detail=f"{node.name} is unreachable ({failure(e)}) and not under the worker's "
                "control, so it cannot be fenced from here: if it comes back it must come back "
                "as a replica (or stay stopped)",
            )
        return MutationResult(
            changed=True,
            detail=f"set {node.name} read-only (default_transaction_read_only) and ended "
            f"{len(sessions)} client sessions",
        )

    @activity.defn
    async def promote_postgres(self, req: Promote) -> MutationResult:
        """Promote the replica, only if it is still in recovery: a retry, or a second run, finds
        it promoted and does nothing (promoting twice would fork a second timeline)."""
        node = self._node(req.node)
        async with await connect(node.admin_dsn, autocommit=True, seconds=5) as conn:
            row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
            if row is None or not row[0]:
                return MutationResult(
                    changed=False, detail=f"{node.name} is a primary already; not promoting again"
                )
            if req.dry_run:
                return MutationResult(changed=False, detail=f"would promote {node.name}")
            async with heartbeating(f"promoting {node.name}"):
                done = await (
                    await conn.execute(
                        "SELECT pg_promote(wait => true, wait_seconds => %s)", (PROMOTE_SECONDS,)
                    )
                ).fetchone()
        if done is None or not done[0]:
            raise ApplicationError(
                f"{node.name} did not finish promotion within {PROMOTE_SECONDS}s; see its log, "
                "then run the step again (it promotes only a server still in recovery)"
            )
        return MutationResult(changed=True, detail=f"promoted {node.name}")

    @activity.defn
    async def reattach_postgres(self, req: Reattach) -> Reattached:
        """Make the old primary a replica of the new one, with ``pg_rewind`` where the worker runs
        on its machine; else say how to rebuild it.

        Rewinding: stop it if it runs, keep its configuration files aside (``pg_rewind`` copies
        the source's), rewind from the new primary (a server that crashed is first recovered by
        ``pg_rewind`` itself), put them back, add ``standby.signal``, ``primary_conninfo`` and a
        replication slot on the new primary named after it, start it, and wait until the new
        primary sees it stream. Already streaming from the new primary: nothing to do.
        """
        node, primary = self._node(req.node), self._node(req.primary)
        if await _streams_from(primary, node.name):
            return Reattached(
                changed=False, detail=f"{node.name} streams from {primary.name} already"
            )
        if node.control is None:
            return Reattached(
                changed=False,
                detail=f"{node.name} is not under the worker's control: rebuild it as a replica "
                f"of {primary.name} by hand",
                rebuild=_rebuild_commands(node.name, primary.name),
            )
        if req.dry_run:
            return Reattached(
                changed=False,
                detail=f"would rewind {node.name} from {primary.name} (pg_rewind) and start it "
                "as its replica",
            )
        async with heartbeating(f"re-attaching {node.name} to {primary.name}"):
            return await _rewind(node, node.control, primary, req.timeout_seconds)

    # -- verification ----------------------------------------------------------------------

    @activity.defn
    async def verify_platform_write(self, req: PlatformWrite) -> PlatformWriteResult:
        """A real write through the address the platform is given for ``node`` (its
        ``platform_dsn``, as the pods connect), and every commit the server had received when it
        was chosen in its history: its position now is at or past that point."""
        node = self._node(req.node)
        try:
            async with heartbeating(f"writing through the platform's endpoint on {node.name}"):
                position = await _probe_write(node.platform_dsn, node.name, req.timeout_seconds)
        except (OSError, TimeoutError, _psycopg_error()) as e:
            raise ApplicationError(
                f"a write through the platform's endpoint on {node.name} failed: {failure(e)}; "
                "check that it was promoted and that its clients may write"
            ) from None
        assert position is not None
        if req.at_least is not None and position < req.at_least:
            raise ApplicationError(
                f"{node.name} is at WAL {lsn_text(position)}, before the "
                f"{lsn_text(req.at_least)} it had received when chosen: commits are missing; "
                "stop writes and compare it with the old primary's data",
                non_retryable=True,
            )
        return PlatformWriteResult(node=node.name, position=position)


async def _rewind(
    node: PostgresNode, control: PostgresControl, primary: PostgresNode, timeout_seconds: float
) -> Reattached:
    """``reattach_postgres``'s work on the old primary's machine (its docstring says what)."""
    slot = _slot(node.name)
    if _running(control):
        await _pg_ctl(control, "stop", "-m", "fast", "-w", "-t", "60")
    # Not running: a lock file left by a killed server would stop pg_rewind's recovery run.
    (control.data_dir / "postmaster.pid").unlink(missing_ok=True)
    kept = _own_config(control)
    try:
        rewound = await _rewound(control, primary)
    except ApplicationError as e:
        # The failover is done; the old primary is what failed, and a rebuild replaces it.
        return Reattached(
            changed=False,
            detail=f"{node.name} could not be rewound, and stays stopped: {e.message}",
            rebuild=_rebuild_commands(node.name, primary.name),
        )
    finally:
        for name, content in kept.items():
            _write_owned(control, control.data_dir / name, content)
        shutil.rmtree(_kept_config(control))
    async with await connect(primary.admin_dsn, autocommit=True, seconds=5) as conn:
        await conn.execute(
            "SELECT pg_create_physical_replication_slot(%(slot)s) WHERE NOT EXISTS "
            "(SELECT FROM pg_replication_slots WHERE slot_name = %(slot)s)",
            {"slot": slot},
        )
    conninfo = _replication_conninfo(primary.admin_dsn, node.name)
    settings = f"\nprimary_conninfo = '{conninfo}'\nprimary_slot_name = '{slot}'\n"
    auto = control.data_dir / "postgresql.auto.conf"
    if settings.encode() not in auto.read_bytes():
        _write_owned(control, auto, auto.read_bytes() + settings.encode())
    _write_owned(control, control.data_dir / "standby.signal", b"")
    await _pg_ctl(control, "start", "-w", "-t", "60", "-l", str(_log(control)))
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not await _streams_from(primary, node.name):
        if asyncio.get_running_loop().time() > deadline:
            raise ApplicationError(
                f"{node.name} was rewound and started but does not stream from "
                f"{primary.name} after {timeout_seconds:g}s; see {_log(control)}",
                non_retryable=True,
            )
        await asyncio.sleep(0.5)
    return Reattached(
        changed=True,
        detail=f"rewound {node.name} from {primary.name}"
        + (" (it had not diverged)" if "no rewind required" in rewound else "")
        + "; it streams from it as a replica",
    )


async def _rewound(control: PostgresControl, primary: PostgresNode) -> str:
    """Rewind the stopped server from ``primary``: pg_rewind's output.

    A server pg_rewind left waiting to replay (an attempt whose worker died before starting it,
    or a replica that crashed) is not rewound again: pg_rewind would first run its recovery to
    the end, as a primary's, and write WAL the new primary never had, which its stream could
    then never follow. Started as a replica, it replays from where pg_rewind left it.
    """
    state = await _run(control, "pg_controldata", str(control.data_dir), check=False)
    if re.search(rf"^Database cluster state:\s+{AWAITING_REPLAY}$", state, re.M):
        return "pg_rewind had rewound it already"
    # A retry after a rewind rewinds again: single-user recovery refuses a standby.signal.
    (control.data_dir / "standby.signal").unlink(missing_ok=True)
    async with await connect(primary.admin_dsn, autocommit=True, seconds=5) as conn:
        # A promoted server's control file names its new timeline only after a checkpoint;
        # before one, pg_rewind sees one timeline and says "no rewind required".
        await conn.execute("CHECKPOINT")
    return await _run(
        control,
        "pg_rewind",
        f"--target-pgdata={control.data_dir}",
        f"--source-server={primary.admin_dsn}",
    )


def _own_config(control: PostgresControl) -> dict[str, bytes]:
    """The server's own configuration files, by name, as they were before its first rewind.

    ``pg_rewind`` overwrites them with the new primary's, and the rewind puts them back after
    it: a worker that died in between would leave the new primary's (its port, its name) for
    the next attempt to take for the server's own. So they are copied beside the data directory
    first (whole, or not at all), every attempt puts that copy back, and it goes once it is.
    """
    kept = _kept_config(control)
    if not kept.is_dir():
        partial = kept.with_name(kept.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o700)
        for path in control.data_dir.iterdir():
            if path.suffix == CONFIG_SUFFIX and path.is_file():
                (partial / path.name).write_bytes(path.read_bytes())
        partial.rename(kept)
    return {path.name: path.read_bytes() for path in kept.iterdir()}


def _kept_config(control: PostgresControl) -> Path:
    return control.data_dir.with_name(control.data_dir.name + ".own-config")


def _psycopg_error() -> type[Exception]:
    import psycopg

    return psycopg.Error


async def _probe_write(dsn: str, name: str, seconds: float) -> int | None:
    """Rewrite this server's probe row in the database ``dsn`` names, in its clients' default
    transaction mode (so a read-only fence refuses it); the WAL position after the commit."""
    import psycopg

    async with (
        asyncio.timeout(seconds * 2),
        await connect(dsn, autocommit=True, seconds=seconds) as conn,
    ):
        await conn.execute(f"SET statement_timeout = {round(seconds * 1000)}")
        upsert = (
            f"INSERT INTO {PROBE_TABLE} (node, at) VALUES (%s, now()) "
            "ON CONFLICT (node) DO UPDATE SET at = excluded.at"
        )
        try:
            await conn.execute(upsert, (name,))
        except psycopg.errors.UndefinedTable:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {PROBE_TABLE} "
                "(node text PRIMARY KEY, at timestamptz NOT NULL)"
            )
            await conn.execute(upsert, (name,))
        row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
    return lsn(row[0]) if row else None


async def _client_sessions(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Client sessions other than ours (no replication senders, no background workers)."""
    rows = await (
        await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
        )
    ).fetchall()
    return [int(r[0]) for r in rows]


async def _in_recovery(node: PostgresNode) -> bool:
    """Whether the server says it is a replica (unreachable: not known to be one)."""
    try:
        async with await connect(node.admin_dsn, autocommit=True, seconds=3) as conn:
            row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
    except (OSError, _psycopg_error()):
        return False
    return bool(row and row[0])


async def _streams_from(primary: PostgresNode, name: str) -> bool:
    try:
        async with await connect(primary.admin_dsn, autocommit=True, seconds=3) as conn:
            row = await (
                await conn.execute(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = %s"
                    " AND state = 'streaming' AND NOT pg_is_in_recovery()",
                    (name,),
                )
            ).fetchone()
    except (OSError, _psycopg_error()):
        return False
    return row is not None


def _patroni(url: str, timeout: float) -> str | None:
    """Patroni's answer at ``url`` (any HTTP status: it runs), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return f"HTTP {response.status} from {redact(url)}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} from {redact(url)}"
    except (urllib.error.URLError, OSError):
        return None


def _slot(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name.lower())


def _replication_conninfo(admin_dsn: str, application_name: str) -> str:
    """The new primary's address for a replica's WAL receiver, named so the primary lists it
    under this server's name. (A dedicated replication role belongs here in a hardened setup;
    the topology's admin DSN is what astra-ops has.)"""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(admin_dsn)
    params.pop("dbname", None)
    return make_conninfo("", **params, application_name=application_name).replace("'", "''")


def _rebuild_commands(name: str, primary: str) -> str:
    return (
        f"on {name}'s machine, as the server's user: pg_ctl stop -D $PGDATA -m fast; "
        f"pg_rewind --target-pgdata=$PGDATA --source-server='<{primary}'s admin DSN>' "
        "--write-recovery-conf (or, if it refuses: move $PGDATA aside and "
        f"pg_basebackup -h <{primary}> -D $PGDATA -R -X stream -S {_slot(name)} -C); "
        "pg_ctl start -D $PGDATA"
    )


def _log(control: PostgresControl) -> Path:
    """Where a server the worker starts writes its log: beside its data directory (inside it,
    a base backup would copy the log)."""
    return control.data_dir.with_name(control.data_dir.name + ".log")


def _as_user(control: PostgresControl) -> dict[str, Any]:
    if control.os_user is None:
        return {}
    entry = pwd.getpwnam(control.os_user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _write_owned(control: PostgresControl, path: Path, content: bytes) -> None:
    """Write a file in the data directory, owned by the server's user, readable by it only."""
    path.write_bytes(content)
    path.chmod(0o600)
    if control.os_user is not None:
        entry = pwd.getpwnam(control.os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


async def _run(control: PostgresControl, program: str, *args: str, check: bool = True) -> str:
    """One of PostgreSQL's programs, as the server's user; its output, or (``check``) a failure
    naming it."""
    proc = await asyncio.create_subprocess_exec(
        str(control.bin_dir / program),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=control.data_dir.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"},
        **_as_user(control),
    )
    out, _ = await proc.communicate()
    text = redact(out.decode(errors="replace").strip())
    if check and proc.returncode != 0:
        raise ApplicationError(
            f"{program} on {control.data_dir} failed (exit {proc.returncode}): {text}; fix what "
            "it says, then run the step again",
            non_retryable=True,
        )
    return text


async def _pg_ctl(control: PostgresControl, action: str, *args: str) -> str:
    return await _run(control, "pg_ctl", action, "-D", str(control.data_dir), *args)


WAL_SEGMENT = re.compile(r"[0-9A-F]{24}")
WAL_END = re.compile(
    r"error in WAL record at ([0-9A-F]+/[0-9A-F]+): [^\n]*? at ([0-9A-F]+/[0-9A-F]+)"
)
LAST_RECORD = re.compile(r"error in WAL record at ([0-9A-F]+/[0-9A-F]+)")


async def _wal_end(control: PostgresControl, after: int) -> int | None:
    """Where the WAL on a stopped server's disk ends, read from ``after`` on with ``pg_waldump``
    (None: not known). Read past the end, pg_waldump fails naming the position where the next
    record would start; when it only names the last record it read, that record's start is the
    estimate, a few bytes short."""
    wal = control.data_dir / "pg_wal"
    try:
        segments = [p.name for p in wal.iterdir() if WAL_SEGMENT.fullmatch(p.name)]
    except OSError:
        return None
    if not segments or not (control.bin_dir / "pg_waldump").is_file():
        return None
    timeline = max(int(name[:8], 16) for name in segments)
    output = await _run(
        control, "pg_waldump", "--quiet", f"--path={wal}", f"--timeline={timeline}",
        f"--start={lsn_text(after)}", check=False,
    )  # fmt: skip
    if "could not find a valid record after" in output:
        return after  # nothing written past it
    end = WAL_END.search(output) or LAST_RECORD.search(output)
    return lsn(end.groups()[-1]) if end else None


def _running(control: PostgresControl) -> bool:
    """Whether the server of this data directory runs: the pid its lock file names is alive.

    Read here rather than by ``pg_ctl status``, which counts a killed server's unreaped zombie
    as running (no init reaps it in a container) and would have the fence wait on a corpse.
    """
    try:
        pid = int((control.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: the signal's answer is all there is
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
