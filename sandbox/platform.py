"""What the simulated Astra reads from its cluster: which of its pods run, and its config.

Real Astra services are pods and obey ``astra-config``; the load generator plays them, so it asks
the sandbox cluster the same questions through the real Kubernetes API each tick. That is what
gives a runbook's containment (an intake pause, a budget guard), its remediation (a deleted,
restarted or rolled-back pod) and its repoint (new endpoints, then a rolling restart) a real
effect on the sandbox's data.

A service's pods are the ones its Kubernetes Service selects, as traffic reaches the pods behind
a Service: switching the Service's selector to a green Deployment's pods moves all the work to
them (a blue/green switch), and a canary Deployment's pods that match the selector take their
share of it. A service without a Service of its name is its pods labelled ``app: <name>``.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from activities.certificates import describe, read_pem
from runtime.astra_config import (
    BUDGET_GUARD_KEY,
    DATABASE_URL_KEY,
    INTAKE_PAUSED_KEY,
    REDIS_URL_KEY,
    BudgetGuard,
    paused_classes,
)
from sandbox.kube.seed import TLS_SERVICES, tls_secret

SCHEDULER = "astra-scheduler"
WORKERS = "astra-worker"
AGENTS = "agent-service"


class PlatformConfig(BaseModel):
    """The containment knobs of ``astra-config`` as Astra applies them."""

    paused_error_classes: list[str] = []
    budget_guard: BudgetGuard = BudgetGuard()


class RunningPod(BaseModel):
    """A ready, non-terminating pod of one of Astra's services."""

    name: str
    uid: str
    """A restarted pod is a new pod, with a new uid, that reads its config anew."""


class PlatformView(BaseModel):
    workers: list[str]
    """Ready, non-terminating pods of the worker service (stable and canary alike): the workers
    that run."""
    images: dict[str, str] = {}
    """The image each of those workers runs (its pod's first container): a bad build is a
    property of the pods that run it, so a rollback cures it, and a canary of it fails only on
    the canary's pods."""
    config: PlatformConfig
    pods: dict[str, list[RunningPod]] = {}
    """The running pods of each service that holds connections (scheduler, workers, agents),
    oldest first: the oldest scheduler pod holds the lead until it goes."""
    running: list[RunningPod] = []
    """Every running pod of the namespace, whether a Service sends it work or not: a pod keeps
    the endpoints it started with for its life, also while it waits out of service (green pods
    before a switch, blue ones after)."""
    database_url: str | None = None
    """``astra-config``'s DATABASE_URL now: what a pod that starts now connects to."""
    redis_url: str | None = None
    """``astra-config``'s REDIS_URL now."""


class ClusterView:
    """Reads the running pods and the config of one Astra namespace in the sandbox cluster."""

    def __init__(
        self,
        api: ApiClient,
        namespace: str = "astra",
        pool: str = WORKERS,
        config_map: str = "astra-config",
        scheduler: str = SCHEDULER,
        agents: str = AGENTS,
    ) -> None:
        self._core = CoreV1Api(api)
        self.namespace = namespace
        self.pool = pool
        self.config_map = config_map
        self.services = (scheduler, pool, agents)

    async def certificate_expiry(self) -> dict[str, datetime]:
        """When the certificate in each TLS service's Secret expires (a Secret that is missing or
        holds no readable certificate is left out): what a cert-manager style exporter reads."""
        return await asyncio.to_thread(self._certificate_expiry)

    def _certificate_expiry(self) -> dict[str, datetime]:
        expiry = {}
        for service in TLS_SERVICES:
            try:
                secret: Any = self._core.read_namespaced_secret(tls_secret(service), self.namespace)
                pem = base64.b64decode((secret.data or {}).get("tls.crt", "")).decode()
                expiry[service] = describe(read_pem(pem)).not_after
            except ApiException as err:
                if err.status != 404:
                    raise
            except ValueError:
                continue
        return expiry

    async def observe(self) -> PlatformView:
        # The kubernetes client is synchronous; keep it off the load generator's event loop.
        return await asyncio.to_thread(self._observe)

    def _observe(self) -> PlatformView:
        # One list of the namespace's pods and one of its Services per tick, matched here.
        pods: Any = self._core.list_namespaced_pod(self.namespace)
        services: Any = self._core.list_namespaced_service(self.namespace)
        selectors = {s.metadata.name: dict(s.spec.selector or {}) for s in services.items}
        running = sorted(
            (
                pod
                for pod in pods.items
                if pod.metadata.deletion_timestamp is None
                and any(
                    c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
                )
            ),
            key=lambda pod: (pod.metadata.creation_timestamp, pod.metadata.name),
        )
        by_service: dict[str, list[RunningPod]] = {}
        for service in self.services:
            selector = selectors.get(service, {"app": service})
            by_service[service] = [
                RunningPod(name=pod.metadata.name, uid=pod.metadata.uid)
                for pod in running
                if _selects(selector, pod.metadata.labels or {})
            ]
        workers = {pod.name for pod in by_service[self.pool]}
        images = {
            pod.metadata.name: pod.spec.containers[0].image
            for pod in running
            if pod.metadata.name in workers
        }
        try:
            data = self._core.read_namespaced_config_map(self.config_map, self.namespace).data
        except ApiException as err:
            if err.status != 404:
                raise
            data = None
        data = data or {}
        return PlatformView(
            workers=sorted(workers),
            images=images,
            config=PlatformConfig(
                paused_error_classes=paused_classes(data.get(INTAKE_PAUSED_KEY)),
                budget_guard=BudgetGuard.parse(data.get(BUDGET_GUARD_KEY)),
            ),
            pods=by_service,
            running=[RunningPod(name=pod.metadata.name, uid=pod.metadata.uid) for pod in running],
            database_url=data.get(DATABASE_URL_KEY),
            redis_url=data.get(REDIS_URL_KEY),
        )


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a Service's selector picks a pod: every pair matches. An empty selector picks
    none, as a Service without one gets no endpoints from Kubernetes."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())
