"""Which activities need rights that only some workers are deployed with.

Acting on the data plane's servers (fencing, promoting and re-attaching PostgreSQL, failing
Redis over, rebuilding its streams) and on the platform's secrets (Vault, TLS private keys) takes
credentials, network reach and RBAC on Secrets that most workers should not hold. A run schedules
those activities on its own task queue plus :data:`PRIVILEGED_SUFFIX`, which only workers deployed
with the rights poll (``ASTRA_OPS_WORKER_KIND``); everything else runs on any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PRIVILEGED_SUFFIX = "-privileged"
PRIVILEGED = frozenset(
    {"PostgresNodeActivities", "RedisNodeActivities", "VaultActivities", "TlsActivities"}
)
"""The activity classes whose every activity is privileged, by name (workflow code refers to
activities as ``Class.method``, and needs no import of the class to route them)."""


def is_privileged(activity: Callable[..., Any]) -> bool:
    """Whether ``activity`` (``Class.method``, bound or not) needs a privileged worker."""
    return activity.__qualname__.split(".", 1)[0] in PRIVILEGED


def privileged_queue(task_queue: str) -> str:
    return task_queue + PRIVILEGED_SUFFIX
