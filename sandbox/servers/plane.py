"""The sandbox's data plane: the PostgreSQL and Redis that `astra-ops dev`, the test suite and
the benchmarks talk to, either the configured ones or servers of our own.

``auto`` uses each configured server that answers and starts our own in its place otherwise, so
a machine with only Python runs the whole stack; ``own`` always starts ours, ``external`` never
does. A replicated data plane (a PostgreSQL primary with a streaming replica, a Redis primary
with a replica, Sentinel where asked) is always ours: faults kill and freeze its processes.

What runs is recorded as JSON (``data-plane.json`` in the dev stack's state directory), so the
CLI's faults find the servers the dev stack started.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, TypedDict, Unpack
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from runtime.data_plane import DataPlaneTopology, PostgresControl, PostgresNode, RedisNode
from runtime.redact import redact
from sandbox.servers.postgres import PostgresServer, start_primary, start_replica
from sandbox.servers.process import ServerError
from sandbox.servers.redis import SENTINEL_MASTER, RedisServer, start_redis

Mode = Literal["auto", "own", "external"]
Replication = Literal["none", "sync", "async"]
ANSWER_SECONDS = 3


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory for servers: one PostgreSQL's unprivileged user may enter (run
    as root, the servers run as ``postgres`` or ``nobody``), unlike a private temporary one."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def data_plane_record(state_dir: Path) -> Path:
    """Where a dev stack records the servers of its own while it runs, for the CLI's faults."""
    return state_dir / "data-plane.json"


CONFIGURED = "configured"
"""The topology's name for a configured server, not one of ours."""


def topology_file(state_dir: Path) -> Path:
    """Where a dev stack writes its servers' topology for its worker's data-plane runbooks."""
    return state_dir / "data-plane-topology.json"


class DataPlane(BaseModel):
    """Where the data plane is, and which of its servers are ours (none when the configured
    ones answered). The URLs are the configured ones, with our servers' address where ours run."""

    postgres_url: str
    redis_url: str
    postgres: list[PostgresServer] = []
    """Ours, the primary first, then its replica."""
    redis: list[RedisServer] = []
    """Ours, the primary first, then its replica, then Sentinel."""
    replication: Replication = "none"

    @property
    def servers(self) -> list[PostgresServer | RedisServer]:
        return [*self.postgres, *self.redis]

    def describe(self) -> str:
        """One line per server of ours, for a banner."""
        lines = []
        for pg in self.postgres:
            role = "primary" if pg is self.postgres[0] else f"{self.replication} replica"
            lines.append(f"PostgreSQL {role:<13} 127.0.0.1:{pg.port}  {pg.dir}")
        for node in self.redis:
            role = "sentinel" if node.sentinel_of else ("replica" if node.replica_of else "primary")
            lines.append(f"Redis {role:<18} 127.0.0.1:{node.port}  {node.dir}")
        return "\n".join(lines)

    def topology(self) -> DataPlaneTopology:
        """The servers as the data-plane runbooks see them: each PostgreSQL server of ours with
        its data directory (the worker runs beside it), the platform's URLs with each one's
        port; a configured server stands alone, under the name ``configured``, with no control
        over it (the runbooks check it and report, and have no replica to fail over to)."""
        postgres = [
            PostgresNode(
                name=pg.name,
                admin_dsn=pg.dsn,
                platform_dsn=with_port(self.postgres_url, pg.port),
                control=PostgresControl(data_dir=pg.dir, bin_dir=pg.bin_dir, os_user=pg.user),
                synchronous=pg is not self.postgres[0] and self.replication == "sync",
            )
            for pg in self.postgres
        ] or [
            PostgresNode(
                name=CONFIGURED,
                admin_dsn=make_conninfo(self.postgres_url, dbname="postgres"),
                platform_dsn=self.postgres_url,
            )
        ]
        redis = [
            RedisNode(
                name=node.name, url=node.url, platform_url=with_port(self.redis_url, node.port)
            )
            for node in self.redis
            if not node.sentinel_of
        ] or [RedisNode(name=CONFIGURED, url=self.redis_url, platform_url=self.redis_url)]
        return DataPlaneTopology(
            postgres=postgres,
            redis=redis,
            sentinels=[node.url for node in self.redis if node.sentinel_of],
            sentinel_master=SENTINEL_MASTER,
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> DataPlane:
        return cls.model_validate_json(path.read_text())

    async def stop(self) -> None:
        """Stop our servers (Sentinel first, replicas before primaries); their data stays."""
        await asyncio.gather(*(s.stop() for s in reversed(self.redis)))
        for server in reversed(self.postgres):
            await server.stop()


async def postgres_answers(url: str) -> bool:
    """Whether a PostgreSQL server answers at ``url``'s address. A refusal from the server
    itself (no such database yet, a wrong password) is an answer: the configured server runs,
    and what it refuses is for the migrations to report, not a reason to start another."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=ANSWER_SECONDS)
    except psycopg.OperationalError as e:
        return "FATAL" in str(e)  # libpq's prefix of an error the server sent
    await conn.close()
    return True


async def redis_answers(url: str) -> bool:
    """Whether a Redis server answers at ``url``'s address (a refusal of our credentials is an
    answer too)."""
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=ANSWER_SECONDS, socket_timeout=ANSWER_SECONDS
    )
    try:
        return bool(await client.ping())
    except (AuthenticationError, ResponseError):
        return True
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


def with_port(url: str, port: int) -> str:
    """``url`` with the address 127.0.0.1:``port`` and everything else kept (user, database)."""
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return make_conninfo(url, host="127.0.0.1", port=str(port))


def same_server(a: str, b: str) -> bool:
    """Whether two PostgreSQL DSNs name one server (host and port)."""
    one, two = conninfo_to_dict(a), conninfo_to_dict(b)
    return (one.get("host"), one.get("port")) == (two.get("host"), two.get("port"))


def _ours(name: str, url: str, mode: Mode, answers: bool, setting: str) -> bool:
    if mode == "own":
        return True
    if answers:
        return False
    if mode == "external":
        raise ServerError(
            f"{name} does not answer at {redact(url)}, and {setting}=external forbids starting "
            f"our own: start it, point the settings at one that runs, or set {setting}=auto"
        )
    return True


class PlaneOptions(TypedDict, total=False):
    mode: Mode
    """auto (default): ours where the configured server does not answer; own; external"""
    replication: Replication
    """none (default), sync or async: a replica of each, always ours"""
    sentinel: bool
    """a Redis Sentinel beside ours (default: none)"""
    sentinel_down_after_ms: int
    """how long Sentinel waits before it declares the primary down (default: 30 s, its own)"""
    setting: str
    """the knob error messages name (default ASTRA_OPS_DATA_PLANE)"""


async def start_data_plane(
    directory: Path, postgres_url: str, redis_url: str, **options: Unpack[PlaneOptions]
) -> DataPlane:
    """The data plane under ``directory``: the configured servers or ours, as ``mode`` says (a
    replicated one, or a Redis with Sentinel, is always ours)."""
    mode = options.get("mode", "auto")
    replication = options.get("replication", "none")
    sentinel = options.get("sentinel", False)
    setting = options.get("setting", "ASTRA_OPS_DATA_PLANE")
    replicated = replication != "none"
    if (replicated or sentinel) and mode == "external":
        raise ServerError(
            f"a replicated data plane runs servers of our own, which {setting}=external forbids; "
            f"set {setting}=auto, or do not ask for replication"
        )
    own_postgres = replicated or _ours(
        "PostgreSQL", postgres_url, mode, await postgres_answers(postgres_url), setting
    )
    own_redis = (
        replicated
        or sentinel
        or _ours("Redis", redis_url, mode, await redis_answers(redis_url), setting)
    )
    plane = DataPlane(postgres_url=postgres_url, redis_url=redis_url, replication=replication)
    try:
        if own_postgres:
            primary = await start_primary(directory)
            plane.postgres = [primary]
            if replication != "none":
                plane.postgres = list(
                    await start_replica(primary, directory, synchronous=replication == "sync")
                )
            plane.postgres_url = with_port(postgres_url, primary.port)
        if own_redis:
            plane.redis = await start_redis(
                directory,
                replica=replication != "none",
                sentinel=sentinel,
                down_after_ms=options.get("sentinel_down_after_ms", 30_000),
            )
            plane.redis_url = with_port(redis_url, plane.redis[0].port)
    except BaseException:
        await plane.stop()
        raise
    return plane


@asynccontextmanager
async def running_data_plane(
    directory: Path, postgres_url: str, redis_url: str, **options: Unpack[PlaneOptions]
) -> AsyncIterator[DataPlane]:
    """:func:`start_data_plane`, and our servers stopped afterwards."""
    plane = await start_data_plane(directory, postgres_url, redis_url, **options)
    try:
        yield plane
    finally:
        await plane.stop()
