"""PostgreSQL servers of our own: a primary, and a streaming replica made with pg_basebackup.

They listen on 127.0.0.1 only, with trust authentication for the user ``postgres``, so a DSN
written for the machine's server works with only its host and port changed. ``wal_log_hints`` is
on, and recent WAL kept, so an old primary can later be re-attached to a promoted replica with
``pg_rewind``.

PostgreSQL refuses to run as root; run as root, the servers and their tools run as the
``postgres`` user where it exists, else ``nobody``, owning the data directories.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import psycopg

from sandbox.servers.binaries import postgres_bin_dir
from sandbox.servers.process import Daemon, ServerError, free_port, wait_until

SERVER_USERS = ("postgres", "nobody")
SETTINGS_FILE = "astra.conf"
"""Our settings, included by postgresql.conf; written by us on every start (the port, the node's
name, replication), while ALTER SYSTEM's postgresql.auto.conf stays the server's to change."""
_PORT = re.compile(r"^port\s*=\s*(\d+)", re.M)
STREAM_SECONDS = 60


def server_user() -> str | None:
    """Whom the server runs as: None (ourselves) unless we are root, whom initdb refuses."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ServerError(
        "running as root, and PostgreSQL refuses root: it needs an unprivileged user to run as, "
        f"but none of {', '.join(SERVER_USERS)} exists; create one (`useradd postgres`)"
    )


def _reachable(path: Path, user: str) -> Path | None:
    """The first folder above ``path`` that ``user`` may not enter, or None."""
    entry = pwd.getpwnam(user)
    for folder in reversed(path.parents):
        mode = folder.stat()
        if mode.st_uid == entry.pw_uid:
            allowed = mode.st_mode & 0o100
        elif mode.st_gid == entry.pw_gid:
            allowed = mode.st_mode & 0o010
        else:
            allowed = mode.st_mode & 0o001
        if not allowed:
            return folder
    return None


class PostgresServer(Daemon):
    """One PostgreSQL server: its data directory (``dir``), port, binaries and role."""

    bin_dir: Path
    user: str | None = None
    synchronous_standby: str | None = None
    """The replica whose confirmation every commit waits for (synchronous replication)."""

    @property
    def log(self) -> Path:
        # Beside the data directory, not in it: pg_basebackup copies everything in it.
        return self.dir.with_name(self.dir.name + ".log")

    @property
    def pid_file(self) -> Path:
        return self.dir / "postmaster.pid"

    @property
    def stop_signal(self) -> signal.Signals:
        return signal.SIGINT  # "fast" shutdown: sessions are ended, nothing is lost

    @property
    def dsn(self) -> str:
        """The ``postgres`` database as its superuser."""
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def initialized(self) -> bool:
        return (self.dir / "PG_VERSION").is_file()

    async def start(self, within: float = 60) -> None:
        """Start the server unless it runs, and wait until it takes connections."""
        if not self.running():
            self.pid_file.unlink(missing_ok=True)  # a killed server's lock names a dead pid
            self._write_settings(self.dir)
            self._own(self.log, touch=True)
            output = await self.tool(
                "pg_ctl", "start", "-D", str(self.dir), "-l", str(self.log), "-w", "-s",
                "-t", str(round(within)), check=False,
            )  # fmt: skip
            if not self.running():
                raise self.did_not_start("PostgreSQL", output.strip() or "pg_ctl said nothing")
        await wait_until(self.answers, within, f"PostgreSQL {self.name} to answer", self.log)

    async def answers(self) -> bool:
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=2)
        except psycopg.OperationalError:
            return False
        await conn.close()
        return True

    async def reload(self) -> None:
        """Write our settings again and have the running server read them."""
        self._write_settings(self.dir)
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_reload_conf()")

    async def tool(self, name: str, *args: str, check: bool = True) -> str:
        """Run one of PostgreSQL's programs as the server's user; its output."""
        proc = await asyncio.create_subprocess_exec(
            str(self.bin_dir / name),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.dir.parent,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"},
            **self._as_user(),
        )
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise ServerError(f"{name} for PostgreSQL {self.name} failed: {text.strip()}")
        return text

    async def init(self) -> None:
        """initdb, unless the data directory holds a cluster already (a dev restart keeps it)."""
        if self.initialized():
            return
        fresh = self._fresh_dir()
        await self.tool(
            "initdb", "-D", str(fresh), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        with (fresh / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude_if_exists = '{SETTINGS_FILE}'\n")
        fresh.rename(self.dir)

    async def clone(self, primary: PostgresServer) -> None:
        """pg_basebackup of ``primary`` with a replication slot named after this server, and
        the standby settings (-R), unless the data directory holds a cluster already."""
        if self.initialized():
            return
        async with await psycopg.AsyncConnection.connect(primary.dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_create_physical_replication_slot(%(slot)s) WHERE NOT EXISTS "
                "(SELECT FROM pg_replication_slots WHERE slot_name = %(slot)s)",
                {"slot": self.slot},
            )
        fresh = self._fresh_dir()
        await self.tool(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(fresh), "-R", "-X", "stream", "-S", self.slot, "-c", "fast", "--no-sync",
        )  # fmt: skip
        fresh.rename(self.dir)

    @property
    def slot(self) -> str:
        """This server's replication slot on its primary (slot names allow [a-z0-9_] only)."""
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())

    def _write_settings(self, data_dir: Path) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "cluster_name": f"'{self.name}'",  # a standby's application_name on its primary
            "wal_level": "replica",
            "wal_log_hints": "on",
            # pg_rewind reads the old primary's WAL back to the last checkpoint before the fork,
            # and its crash-recovery run would otherwise recycle it first.
            "wal_keep_size": "'128MB'",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "synchronous_standby_names": f"'{self.synchronous_standby or ''}'",
        }
        path = data_dir / SETTINGS_FILE
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._own(path)

    def _fresh_dir(self) -> Path:
        """An empty folder owned by the server's user, renamed to the data directory once
        complete, so a failed initdb or base backup never leaves a half cluster to reuse."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        if self.user is not None and (blocked := _reachable(self.dir, self.user)):
            raise ServerError(
                f"PostgreSQL runs as {self.user} (it refuses root), who cannot enter {blocked}; "
                f"allow it (`chmod o+x {blocked}`) or put the servers elsewhere"
            )
        fresh = self.dir.with_name(self.dir.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(mode=0o700)
        self._own(fresh)
        return fresh

    def _own(self, path: Path, *, touch: bool = False) -> None:
        if touch:
            path.touch()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _port_of(data_dir: Path) -> int | None:
    try:
        found = _PORT.search((data_dir / SETTINGS_FILE).read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def postgres_server(directory: Path, name: str) -> PostgresServer:
    """The server ``name`` under ``directory``: the port its data directory was set up with, or
    a free one for a new server."""
    data_dir = directory.absolute() / f"postgres-{name}"
    return PostgresServer(
        name=name,
        dir=data_dir,
        port=_port_of(data_dir) or free_port(),
        bin_dir=postgres_bin_dir(),
        user=server_user(),
    )


async def start_primary(directory: Path, within: float = 60) -> PostgresServer:
    """A primary alone, initialized on first use."""
    server = postgres_server(directory, "primary")
    await server.init()
    await server.start(within)
    return server


async def start_replica(
    primary: PostgresServer, directory: Path, *, synchronous: bool, within: float = 60
) -> tuple[PostgresServer, PostgresServer]:
    """A streaming replica of ``primary``, cloned on first use; with ``synchronous``, the primary
    then waits for it on every commit. Returns the primary (its settings now naming the replica,
    or not) and the replica, once it streams."""
    replica = postgres_server(directory, "replica")
    await replica.clone(primary)
    await replica.start(within)

    async def streaming() -> bool:
        async with await psycopg.AsyncConnection.connect(primary.dsn) as conn:
            row = await (
                await conn.execute(
                    "SELECT pid FROM pg_stat_replication WHERE application_name = %s"
                    " AND state = 'streaming'",
                    (replica.name,),
                )
            ).fetchone()
        return row is not None

    await wait_until(streaming, within, f"replica {replica.name} to stream", replica.log)
    # Only now: a primary that waited for a replica not yet there would block every commit.
    primary = primary.model_copy(
        update={"synchronous_standby": replica.name if synchronous else None}
    )
    await primary.reload()
    return primary, replica
