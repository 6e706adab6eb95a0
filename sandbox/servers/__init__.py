"""Real PostgreSQL and Redis servers for the sandbox, on loopback ports under a folder of ours:
alone, or replicated (a streaming PostgreSQL replica, a Redis replica, Sentinel), for
`astra-ops dev`, the tests and the benchmarks where the machine has none, and for the data-plane
runbooks to fail over for real."""

from sandbox.servers.plane import (
    DataPlane,
    Mode,
    Replication,
    running_data_plane,
    scratch_dir,
    start_data_plane,
    with_port,
)
from sandbox.servers.postgres import PostgresServer
from sandbox.servers.process import ServerError
from sandbox.servers.redis import RedisServer

__all__ = [
    "DataPlane",
    "Mode",
    "PostgresServer",
    "RedisServer",
    "Replication",
    "ServerError",
    "running_data_plane",
    "scratch_dir",
    "start_data_plane",
    "with_port",
]
