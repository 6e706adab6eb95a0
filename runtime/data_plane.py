"""The data plane's servers as astra-ops knows them, for `postgres-outage` and `redis-failure`.

For each PostgreSQL and Redis server: the address astra-ops's checks and actions use, and the
address Astra's services are given when that server leads. A worker reads it from the JSON file
``ASTRA_OPS_DATA_PLANE_TOPOLOGY`` names (the dev stack writes one for its own servers).

Workflows never see it: they name servers, and activities look them up. So a DSN's password
never enters a run's history, and no request can point a failover at a server the operators did
not list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, Field, ValidationError, model_validator

from runtime.errors import ConfigError

NodeName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][\w.-]*$")]


class TopologyError(ConfigError):
    """The topology file is missing, unreadable, or does not describe a usable data plane."""


class PostgresControl(BaseModel):
    """A server whose machine the worker runs on: then the worker can stop it (the strongest
    fence) and re-attach it with ``pg_rewind``, as its DBA would on that host. Without it, a
    fence makes the server refuse writes over SQL, and a re-attach is reported for a person."""

    data_dir: Path
    bin_dir: Path
    """Where PostgreSQL's programs are (pg_ctl, pg_rewind), the server's own version."""
    os_user: str | None = None
    """Whom the programs run as (PostgreSQL refuses root); None: the worker's own user."""


class PostgresNode(BaseModel):
    name: NodeName
    admin_dsn: str = Field(min_length=1)
    """A superuser's DSN (database ``postgres``): checks, promotion, fencing, replication."""
    platform_dsn: str = Field(min_length=1)
    """The ``DATABASE_URL`` Astra's services get while this server is the primary."""
    control: PostgresControl | None = None
    synchronous: bool = False
    """A synchronous standby (named in the primary's ``synchronous_standby_names``): every commit
    the primary acknowledged is on it. Declared here, because once the primary is down nothing
    else can say so, and it decides whether a failover to this server can lose data."""


class RedisNode(BaseModel):
    name: NodeName
    url: str = Field(min_length=1)
    """For astra-ops's checks and actions."""
    platform_url: str = Field(min_length=1)
    """The ``REDIS_URL`` Astra's services get while this server is the primary."""


class DataPlaneTopology(BaseModel):
    postgres: list[PostgresNode] = []
    redis: list[RedisNode] = []
    sentinels: list[str] = []
    """Redis Sentinel URLs watching ``sentinel_master``; with them, a failover is Sentinel's."""
    sentinel_master: str = "astra"
    patroni_url: str | None = None
    """A Patroni REST endpoint managing these PostgreSQL servers: it fails over on its own, so
    `postgres-outage` asks it and stands back rather than race it."""

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        for kind, nodes in (("postgres", self.postgres), ("redis", self.redis)):
            names = [n.name for n in nodes]
            if len(names) != len(set(names)):
                raise ValueError(f"{kind}: server names must be unique, got {names}")
        return self

    def postgres_node(self, name: str) -> PostgresNode:
        for node in self.postgres:
            if node.name == name:
                return node
        raise TopologyError(
            f"no PostgreSQL server named {name!r} in the data-plane topology (it has "
            f"{', '.join(n.name for n in self.postgres) or 'none'})"
        )

    def redis_node(self, name: str) -> RedisNode:
        for node in self.redis:
            if node.name == name:
                return node
        raise TopologyError(
            f"no Redis server named {name!r} in the data-plane topology (it has "
            f"{', '.join(n.name for n in self.redis) or 'none'})"
        )

    def write(self, path: Path) -> None:
        """Written whole, then renamed over the old one: a reader never sees half a file. Only
        its owner may read it (its DSNs may carry passwords)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_name(path.name + ".new")
        fresh.touch(mode=0o600)
        fresh.write_text(self.model_dump_json(indent=2) + "\n")
        fresh.replace(path)

    @classmethod
    def load(cls, path: Path | None) -> DataPlaneTopology:
        setting = "ASTRA_OPS_DATA_PLANE_TOPOLOGY"
        if path is None:
            raise TopologyError(
                f"{setting} is not set: the data-plane runbooks need a file naming the "
                "PostgreSQL and Redis servers (docs/data-plane.md; `astra-ops dev` writes one)"
            )
        try:
            return cls.model_validate_json(path.read_text())
        except OSError as e:
            raise TopologyError(f"{setting}: cannot read {path}: {e.strerror}") from None
        except ValidationError as e:
            lines = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors()
            )
            raise TopologyError(
                f"{setting}: {path} is not a data-plane topology: {lines}"
            ) from None
