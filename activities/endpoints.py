"""Where Astra's services find their database and Redis, by server name: read and repoint.

The endpoints live in ``astra-config`` (``DATABASE_URL``, ``REDIS_URL``); the servers they may
name live in the data-plane topology (``runtime/data_plane.py``). A runbook says "point the
platform at the server named replica" and this module looks the address up, so no DSN (nor its
password) passes through a run's history, and no request can name a server the topology does
not list. Pods read the endpoints when they start: a repoint is followed by a rolling restart of
the services that hold connections (``PLATFORM_CLIENTS``), which the runbook does as its own
steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from temporalio import activity

from activities.kube_models import DEFAULT_CONFIG_MAP, DEFAULT_NAMESPACE, ConfigPatch, ConfigRef
from activities.kubernetes import KubernetesActivities
from activities.mutation import Mutation, MutationResult
from runtime.astra_config import DATABASE_URL_KEY, REDIS_URL_KEY
from runtime.data_plane import DataPlaneTopology, NodeName

Store = Literal["postgres", "redis"]
KEYS: dict[Store, str] = {"postgres": DATABASE_URL_KEY, "redis": REDIS_URL_KEY}
KINDS: dict[Store, str] = {"postgres": "PostgreSQL", "redis": "Redis"}

PLATFORM_CLIENTS = ("astra-scheduler", "astra-worker", "agent-service")
"""Astra's Deployments that hold database and Redis connections, in the order they are rolled
after a repoint: the scheduler first (it hands out work), then those that do it."""


class EndpointRef(BaseModel):
    namespace: str = DEFAULT_NAMESPACE
    config_map: str = DEFAULT_CONFIG_MAP
    store: Store


class Endpoint(BaseModel):
    """Which server of the topology the platform's endpoint names (None: none of them)."""

    store: Store
    node: str | None

    def summary(self) -> str:
        kind = KINDS[self.store]
        return (
            f"the platform uses {kind} {self.node}"
            if self.node
            else f"the platform's {KEYS[self.store]} names no {kind} server of the topology"
        )


class Repoint(Mutation):
    namespace: str = DEFAULT_NAMESPACE
    config_map: str = DEFAULT_CONFIG_MAP
    store: Store
    node: NodeName
    """The server the platform is to use, by its name in the topology."""


class EndpointActivities:
    """Reads the topology file on every call: an operator's correction to it applies to the
    next step, without restarting the worker."""

    def __init__(self, kubernetes: KubernetesActivities, topology: Path | None) -> None:
        self.kubernetes = kubernetes
        self.topology_file = topology

    def _address(self, store: Store, node: str) -> str:
        topology = DataPlaneTopology.load(self.topology_file)
        if store == "postgres":
            return topology.postgres_node(node).platform_dsn
        return topology.redis_node(node).platform_url

    def _named(self, store: Store, address: str | None) -> str | None:
        topology = DataPlaneTopology.load(self.topology_file)
        nodes = (
            [(n.name, n.platform_dsn) for n in topology.postgres]
            if store == "postgres"
            else [(n.name, n.platform_url) for n in topology.redis]
        )
        return next((name for name, url in nodes if url == address), None)

    @activity.defn
    def platform_endpoint(self, req: EndpointRef) -> Endpoint:
        value = self.kubernetes.read_config(
            ConfigRef(namespace=req.namespace, name=req.config_map, key=KEYS[req.store])
        ).value
        return Endpoint(store=req.store, node=self._named(req.store, value))

    @activity.defn
    def repoint_platform(self, req: Repoint) -> MutationResult:
        """Set the endpoint to the named server's platform address; already set, it changes
        nothing. The detail names servers, never addresses."""
        key, kind = KEYS[req.store], KINDS[req.store]
        target = self._address(req.store, req.node)
        ref = EndpointRef(namespace=req.namespace, config_map=req.config_map, store=req.store)
        before = self.platform_endpoint(ref).node
        if before == req.node:
            return MutationResult(changed=False, detail=f"{key} already names {kind} {req.node}")
        self.kubernetes.patch_config(
            ConfigPatch(
                namespace=req.namespace,
                name=req.config_map,
                key=key,
                value=target,
                dry_run=req.dry_run,
                token=req.token,
            )
        )
        verb = "would point" if req.dry_run else "pointed"
        return MutationResult(
            changed=not req.dry_run,
            detail=f"{verb} {key} at {kind} {req.node} (was "
            f"{before or 'a server outside the topology'}) in {req.namespace}/{req.config_map}; "
            "pods pick it up when restarted",
        )
