"""Which activities need rights that only some workers are deployed with.

Everything that acts on Astra (its cluster, its database and Redis, their servers, its secrets in
Vault and its TLS keys) takes credentials, network reach and RBAC that the worker running every
workflow should not hold: a compromise of that worker must not hand over Astra. A run schedules
those activities on its own task queue plus :data:`PRIVILEGED_SUFFIX`, which only workers
deployed with the rights poll (``ASTRA_OPS_WORKER_KIND``, ``deploy/k8s/worker.yaml``); the
policy, notifications, incidents, metrics reads and release checks run on any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PRIVILEGED_SUFFIX = "-privileged"
PRIVILEGED = frozenset(
    {
        "KubernetesActivities",
        "EndpointActivities",
        "PostgresActivities",
        "RedisActivities",
        "PostgresNodeActivities",
        "RedisNodeActivities",
        "VaultActivities",
        "TlsActivities",
    }
)
"""The activity classes whose every activity is privileged, by name (workflow code refers to
activities as ``Class.method``, and needs no import of the class to route them)."""


def is_privileged(activity: Callable[..., Any]) -> bool:
    """Whether ``activity`` (``Class.method``, bound or not) needs a privileged worker."""
    return activity.__qualname__.split(".", 1)[0] in PRIVILEGED


def privileged_queue(task_queue: str) -> str:
    return task_queue + PRIVILEGED_SUFFIX
