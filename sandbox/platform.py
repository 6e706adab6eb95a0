"""What the simulated Astra reads from its cluster: which worker pods run, and its config knobs.

Real Astra workers are pods and obey ``astra-config``; the load generator plays them, so it asks
the sandbox cluster the same two questions through the real Kubernetes API each tick. That is
what gives a runbook's containment (an intake pause, a budget guard) and its remediation (a
deleted, restarted or rolled-back pod) a real effect on the sandbox's data.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from runtime.astra_config import (
    BUDGET_GUARD_KEY,
    INTAKE_PAUSED_KEY,
    BudgetGuard,
    paused_classes,
)


class PlatformConfig(BaseModel):
    """The containment knobs of ``astra-config`` as Astra applies them."""

    paused_error_classes: list[str] = []
    budget_guard: BudgetGuard = BudgetGuard()


class PlatformView(BaseModel):
    workers: list[str]
    """Ready, non-terminating pods of the worker Deployment: the workers that run."""
    images: dict[str, str] = {}
    """The image each of those workers runs (its pod's first container): a bad build is a
    property of the pods that run it, so a rollback cures it."""
    config: PlatformConfig


class ClusterView:
    """Reads the worker pool and the config of one Astra namespace in the sandbox cluster."""

    def __init__(
        self,
        api: ApiClient,
        namespace: str = "astra",
        pool: str = "astra-worker",
        config_map: str = "astra-config",
    ) -> None:
        self._core = CoreV1Api(api)
        self.namespace = namespace
        self.pool = pool
        self.config_map = config_map

    async def observe(self) -> PlatformView:
        # The kubernetes client is synchronous; keep it off the load generator's event loop.
        return await asyncio.to_thread(self._observe)

    def _observe(self) -> PlatformView:
        selector = f"app={self.pool}"
        pods: Any = self._core.list_namespaced_pod(self.namespace, label_selector=selector)
        running = [
            pod
            for pod in pods.items
            if pod.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        ]
        workers = sorted(pod.metadata.name for pod in running)
        images = {pod.metadata.name: pod.spec.containers[0].image for pod in running}
        try:
            data = self._core.read_namespaced_config_map(self.config_map, self.namespace).data
        except ApiException as err:
            if err.status != 404:
                raise
            data = None
        data = data or {}
        return PlatformView(
            workers=workers,
            images=images,
            config=PlatformConfig(
                paused_error_classes=paused_classes(data.get(INTAKE_PAUSED_KEY)),
                budget_guard=BudgetGuard.parse(data.get(BUDGET_GUARD_KEY)),
            ),
        )
