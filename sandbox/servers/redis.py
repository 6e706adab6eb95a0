"""Redis servers of our own: a primary, a replica following it, and Sentinel where asked.

Each server's folder holds its config, written once when the server is first made: what a
runbook changes later (``REPLICAOF NO ONE`` then ``CONFIG REWRITE``; Sentinel rewrites its own
file after a failover) survives a restart. Data is kept in an append-only file, so a restart of
the dev stack keeps its keys, as a production Redis with persistence would.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sandbox.servers.binaries import redis_server
from sandbox.servers.process import Daemon, free_port, wait_until

SENTINEL_MASTER = "astra"
"""The name Sentinel knows the primary by (``SENTINEL get-master-addr-by-name astra``)."""
_PORT = re.compile(r"^port\s+(\d+)", re.M)


class RedisServer(Daemon):
    """One redis-server (or Sentinel, with ``sentinel_of``) in its own folder (``dir``)."""

    binary: Path
    replica_of: int | None = None
    """The port of the primary this server followed when it was made."""
    sentinel_of: int | None = None
    """For a Sentinel: the port of the primary it was told to monitor."""
    down_after_ms: int = 30_000
    """For a Sentinel: how long a primary must not answer before it is considered down."""

    @property
    def config(self) -> Path:
        return self.dir / ("sentinel.conf" if self.sentinel_of else "redis.conf")

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, patience: float = 2) -> aioredis.Redis:
        """A client that gives up after ``patience`` seconds, strings in and out."""
        return aioredis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=patience,
            socket_timeout=patience,
            decode_responses=True,
        )

    async def start(self, within: float = 30) -> None:
        """Start the server unless it runs (its config made on first use), and wait for PING."""
        if not self.running():
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.config.exists():
                self.config.write_text(self._config_text())
            argv = [str(self.binary), str(self.config)]
            if self.sentinel_of:
                argv.append("--sentinel")
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.dir,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()  # daemonized: returns once the server forked
            if proc.returncode != 0:
                raise self.did_not_start("Redis", out.decode(errors="replace").strip())
        await wait_until(self.up, within, f"Redis {self.name} to answer", self.log)

    async def up(self) -> bool:
        """Running, and answering: our process, not another server on its port."""
        return self.running() and await self.answers()

    async def answers(self) -> bool:
        client = self.client()
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    def _config_text(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize yes",
            f'pidfile "{self.pid_file}"',
            f'logfile "{self.log}"',
            f'dir "{self.dir}"',
        ]
        if self.sentinel_of:
            lines += [
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.sentinel_of} 1",
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} {self.down_after_ms}",
            ]
        else:
            lines += ["appendonly yes", 'save ""']
            if self.replica_of:
                lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        return "\n".join(lines) + "\n"


def redis_node(
    directory: Path,
    name: str,
    *,
    replica_of: int | None = None,
    sentinel_of: int | None = None,
    down_after_ms: int = 30_000,
) -> RedisServer:
    """The server ``name`` under ``directory``: the port its config was made with, or a free one
    for a new server."""
    folder = directory.absolute() / f"redis-{name}"  # the config needs absolute paths
    try:
        found = _PORT.search(
            (folder / ("sentinel.conf" if sentinel_of else "redis.conf")).read_text()
        )
    except OSError:
        found = None
    return RedisServer(
        name=name,
        dir=folder,
        port=int(found.group(1)) if found else free_port(),
        binary=redis_server(),
        replica_of=replica_of,
        sentinel_of=sentinel_of,
        down_after_ms=down_after_ms,
    )


async def start_redis(
    directory: Path,
    *,
    replica: bool = False,
    sentinel: bool = False,
    down_after_ms: int = 30_000,
    within: float = 30,
) -> list[RedisServer]:
    """A primary, then (``replica``) a replica once it is in sync with it, then (``sentinel``)
    a Sentinel monitoring the primary, which it deems down after ``down_after_ms`` without an
    answer (Sentinel's default, 30 s, unless told): the servers in that order."""
    primary = redis_node(directory, "primary")
    await primary.start(within)
    servers = [primary]
    if replica:
        follower = redis_node(directory, "replica", replica_of=primary.port)
        await follower.start(within)

        async def in_sync() -> bool:
            client = follower.client()
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            return info.get("master_link_status") == "up"

        await wait_until(in_sync, within, f"Redis {follower.name} to sync", follower.log)
        servers.append(follower)
    if sentinel:
        watcher = redis_node(
            directory, "sentinel", sentinel_of=primary.port, down_after_ms=down_after_ms
        )
        await watcher.start(within)
        servers.append(watcher)
    return servers
