"""The sandbox cluster: an object store with API-server semantics, and the controllers that make
its Deployments roll.

Each part is its own module: ``store`` (objects, resourceVersions, watches, with ``admission``'s
defaults and validation), ``kubelet`` (pods start), ``deployments`` (rollouts, status, garbage
collection) with ``replicasets`` (rollout history). ``server`` serves this over HTTP. Tests,
seeders and the dev stack use ``FakeCluster``, which puts them together.

Every public method is thread-safe: the controllers run in the server's event loop thread while
tests inspect the store from theirs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sandbox.kube.deployments import DeploymentController
from sandbox.kube.kubelet import Kubelet
from sandbox.kube.objects import Obj
from sandbox.kube.store import STRATEGIC_MERGE_PATCH, ObjectStore, Watcher


class FakeCluster:
    """In-memory Kubernetes objects plus the controllers that make Deployments roll.

    A rollout takes about ``rollout_seconds``: each new pod starts that long divided by the
    replicas after the previous one is ready.
    """

    def __init__(self, rollout_seconds: float = 2.0) -> None:
        self.rollout_seconds = rollout_seconds
        # One tick is a small slice of a rollout step, so status follows pods closely.
        self.tick_seconds = max(0.005, min(0.05, rollout_seconds / 20))
        self._store = ObjectStore()
        self._kubelet = Kubelet(self._store)
        self._deployments = DeploymentController(self._store, self._kubelet, rollout_seconds)
        for namespace in ("default", "kube-system"):
            self.create("namespaces", None, {"metadata": {"name": namespace}})

    # ----- the API: what the HTTP server serves, and tests and seeders call directly ----------

    @property
    def resource_version(self) -> str:
        """The store's current revision, as list responses report it."""
        return self._store.resource_version

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of one object, or None."""
        return self._store.get(kind, namespace, name)

    def list_objects(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        """Copies of matching objects, sorted by namespace and name like the API server."""
        return self._store.list_objects(kind, namespace, label_selector, field_selector)

    def pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        """The pods in a namespace whose labels include every ``selector`` pair."""
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        return self._store.list_objects("pods", namespace, label_selector=text)

    def create(self, kind: str, namespace: str | None, body: Any, *, dry_run: bool = False) -> Obj:
        """POST: store a new object; 409 if the name is taken, 422 if the body is invalid."""
        return self._store.create(kind, namespace, body, dry_run=dry_run)

    def replace(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """PUT: replace an object; 409 if ``metadata.resourceVersion`` is stale."""
        return self._store.replace(
            kind, namespace, name, body, subresource=subresource, dry_run=dry_run
        )

    def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = STRATEGIC_MERGE_PATCH,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """PATCH in any of the three JSON patch formats the client sends."""
        return self._store.patch(
            kind, namespace, name, patch, content_type, subresource=subresource, dry_run=dry_run
        )

    def delete(self, kind: str, namespace: str | None, name: str, *, dry_run: bool = False) -> Obj:
        """DELETE: remove an object (immediately: the sandbox has no grace periods)."""
        return self._store.delete(kind, namespace, name, dry_run=dry_run)

    def watch(self, watcher: Watcher) -> None:
        """Tell ``watcher`` of every change from now on (synchronously, under the store's lock):
        what plays the pods' own behaviour, such as ``TlsEndpoints``, follows the cluster so."""
        self._store.watch(watcher)

    # ----- fault injection ------------------------------------------------------------------

    def stall(self, name: str) -> None:
        """Freeze the deployment's rollouts: new pods never become ready until ``unstall``."""
        self._kubelet.stall(name)

    def unstall(self, name: str) -> None:
        """Let a stalled deployment's pods start again."""
        self._kubelet.unstall(name)

    # ----- controllers ----------------------------------------------------------------------

    async def run_controller(self) -> None:
        """Reconcile forever (until cancelled): the Deployment controller and the kubelet."""
        while True:
            self.reconcile()
            await asyncio.sleep(self.tick_seconds)

    def settle(self) -> None:
        """Complete every rollout now (no stalls honoured): seeded clusters start converged."""
        for _ in range(1000):
            if not self.reconcile(instant=True):
                return
        raise RuntimeError("the sandbox controller did not converge")

    def reconcile(self, *, instant: bool = False) -> bool:
        """One pass of every controller; returns whether anything changed. ``instant`` skips pod
        startup."""
        now = time.monotonic()
        with self._store.lock:
            started = self._kubelet.run(now, instant)
            self._deployments.progressed(started, now)
            changed = self._deployments.collect_garbage()
            changed = self._deployments.reconcile(now, instant) or changed
            return changed or bool(started)
