"""The sandbox cluster's kubelet: it starts pods, turning Pending pods Running and ready.

A pod a Deployment's controller creates starts one rollout step later; a pod created on its own
starts at the kubelet's next pass. ``stall`` holds a Deployment's pods in Pending, so game days
and tests can watch its rollout hit the progress deadline.
"""

from __future__ import annotations

import copy
import time

from sandbox.kube.objects import RESOURCES, Obj, Resource, owner_deployment, pod_status
from sandbox.kube.store import Event, ObjectStore


class Kubelet:
    """Starts pods when they are due, unless their Deployment is stalled."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._due: dict[tuple[str, str], float] = {}  # (namespace, pod) -> when it starts
        self._stalled: set[str] = set()
        store.watch(self._on_change)

    def _on_change(self, event: Event, resource: Resource, obj: Obj) -> None:
        if resource.plural != "pods":
            return
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if event == "ADDED" and owner_deployment(obj) is None:
            self._due[key] = time.monotonic()
        elif event == "DELETED":
            self._due.pop(key, None)

    def start_at(self, pod: Obj, when: float) -> None:
        """Start ``pod`` (which is Pending) at monotonic time ``when``."""
        with self._store.lock:
            self._due[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = when

    def stall(self, deployment: str) -> None:
        """Hold the Deployment's pending pods until ``unstall``."""
        with self._store.lock:
            self._stalled.add(deployment)

    def unstall(self, deployment: str) -> None:
        with self._store.lock:
            self._stalled.discard(deployment)

    def running_status(self, spec: Obj | None) -> Obj:
        """The status of a pod that has just started: Running, ready, with an IP."""
        rng = self._store.random
        ip = f"10.1.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        return pod_status(ready=True, spec=spec, pod_ip=ip)

    def run(self, now: float, instant: bool) -> list[Obj]:
        """Start every pod that is due (``instant``: every pending one, stalled or not);
        returns the pods started."""
        started = []
        with self._store.lock:
            for (ns, name), due in list(self._due.items()):
                pod = self._store.stored(RESOURCES["pods"], ns, name)
                assert pod is not None, "a deleted pod stays due"  # the watch forgets them
                if not instant and (now < due or owner_deployment(pod) in self._stalled):
                    continue
                del self._due[(ns, name)]
                running = copy.deepcopy(pod)
                running["status"] = self.running_status(pod.get("spec"))
                started.append(self._store.commit(RESOURCES["pods"], running))
        return started
