"""The sandbox cluster's Deployment controller and garbage collector.

It rolls pods one at a time (max surge 1, max unavailable 0) over ``rollout_seconds``, replaces
deleted pods, keeps each Deployment's ReplicaSets and revisions (``replicasets``), and reports
status the way ``kubectl rollout status`` reads it, including ``ProgressDeadlineExceeded`` when no
pod has become ready for ``progressDeadlineSeconds``.
"""

from __future__ import annotations

import copy

from activities.kube_annotations import TEMPLATE_HASH_LABEL
from sandbox.kube.kubelet import Kubelet
from sandbox.kube.objects import (
    RESOURCES,
    Obj,
    Resource,
    controller_uid,
    now_text,
    owner_deployment,
    pod_ready,
    pod_status,
)
from sandbox.kube.replicasets import ReplicaSets, replica_set_uid, template_hash
from sandbox.kube.store import Event, ObjectStore


class DeploymentController:
    """Reconciles every Deployment's pods, ReplicaSets and status; the caller holds the lock."""

    def __init__(self, store: ObjectStore, kubelet: Kubelet, rollout_seconds: float) -> None:
        self._store = store
        self._kubelet = kubelet
        self._replica_sets = ReplicaSets(store)
        self.rollout_seconds = rollout_seconds
        # (namespace, deployment) -> when a pod last became ready or the spec last changed, and
        # the generation that was: what the progress deadline is measured from.
        self._last_progress: dict[tuple[str, str], float] = {}
        self._seen_generation: dict[tuple[str, str], int] = {}
        store.watch(self._on_change)

    def _on_change(self, event: Event, resource: Resource, obj: Obj) -> None:
        if resource.plural == "deployments" and event == "DELETED":
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            self._last_progress.pop(key, None)
            self._seen_generation.pop(key, None)

    def progressed(self, started: list[Obj], now: float) -> None:
        """Note that these pods became ready: their Deployments made progress."""
        for pod in started:
            owner = owner_deployment(pod)
            if owner:
                self._last_progress[(pod["metadata"]["namespace"], owner)] = now

    def collect_garbage(self) -> bool:
        """Remove the pods and ReplicaSets whose Deployment is gone."""
        changed = False
        for pod in self._store.scan(RESOURCES["pods"], None):
            owner = owner_deployment(pod)
            ns = pod["metadata"]["namespace"]
            if owner and self._store.stored(RESOURCES["deployments"], ns, owner) is None:
                self._store.remove(RESOURCES["pods"], ns, pod["metadata"]["name"])
                changed = True
        live = {d["metadata"]["uid"] for d in self._store.scan(RESOURCES["deployments"], None)}
        for replica_set in self._store.scan(RESOURCES["replicasets"], None):
            owner_uid = controller_uid(replica_set)
            if owner_uid is not None and owner_uid not in live:
                meta = replica_set["metadata"]
                self._store.remove(RESOURCES["replicasets"], meta["namespace"], meta["name"])
                changed = True
        return changed

    def reconcile(self, now: float, instant: bool) -> bool:
        """One pass over every Deployment; returns whether anything changed. ``instant`` starts
        new pods Running at once."""
        changed = False
        for deployment in self._store.scan(RESOURCES["deployments"], None):
            changed = self._reconcile(deployment, now, instant) or changed
        return changed

    def _reconcile(self, deployment: Obj, now: float, instant: bool) -> bool:
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        generation = int(meta.get("generation", 1))
        if self._seen_generation.get(key) != generation:
            self._seen_generation[key] = generation
            self._last_progress[key] = now
        desired = int(spec["replicas"])
        pod_hash = template_hash(spec["template"])
        changed = False
        if not spec.get("paused"):
            deployment, changed = self._replica_sets.sync_revision(deployment, pod_hash)
        owned = [p for p in self._store.scan(RESOURCES["pods"], ns) if owner_deployment(p) == name]
        new = [p for p in owned if p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL) == pod_hash]
        old = [p for p in owned if p not in new]
        if not spec.get("paused"):
            # Scale down surplus new pods, unready (then newest) first.
            surplus = sorted(new, key=lambda p: (pod_ready(p), p["metadata"]["name"]))
            for pod in surplus[: max(0, len(new) - desired)]:
                new.remove(pod)
                self._store.remove(RESOURCES["pods"], ns, pod["metadata"]["name"])
                changed = True
            # Max unavailable 0: retire an old pod only once a new one is ready to take over.
            keep_old = max(0, desired - sum(pod_ready(p) for p in new))
            for pod in sorted(old, key=pod_ready)[: max(0, len(old) - keep_old)]:
                old.remove(pod)
                self._store.remove(RESOURCES["pods"], ns, pod["metadata"]["name"])
                changed = True
            # Max surge 1: start the next new pod once the previous one is ready.
            while len(new) < desired and all(pod_ready(p) for p in new):
                new.append(self._create_pod(deployment, pod_hash, now, instant))
                changed = True
                if not instant:
                    break
            if changed:
                self._last_progress[key] = now
        changed = self._replica_sets.write_status(deployment, pod_hash) or changed
        changed = self._write_status(deployment, new, old, pod_hash, now) or changed
        return changed

    def _create_pod(self, deployment: Obj, pod_hash: str, now: float, instant: bool) -> Obj:
        """A pod of the template's ReplicaSet: Running at once if ``instant``, else Pending until
        the kubelet starts it one rollout step from now."""
        meta, template = deployment["metadata"], deployment["spec"]["template"]
        ns, name = meta["namespace"], meta["name"]
        template_meta = template.get("metadata") or {}
        pod_meta: Obj = {
            "name": f"{name}-{pod_hash}-{self._store.suffix()}",
            "namespace": ns,
            "labels": {**(template_meta.get("labels") or {}), TEMPLATE_HASH_LABEL: pod_hash},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{name}-{pod_hash}",
                    "uid": replica_set_uid(deployment, pod_hash),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "uid": self._store.uid(),
            "creationTimestamp": now_text(),
        }
        if template_meta.get("annotations"):
            pod_meta["annotations"] = copy.deepcopy(template_meta["annotations"])
        pod_spec = copy.deepcopy(template["spec"])
        pod_spec.setdefault("nodeName", "sandbox-node")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": pod_meta,
            "spec": pod_spec,
            "status": (
                self._kubelet.running_status(pod_spec)
                if instant
                else pod_status(ready=False, spec=pod_spec)
            ),
        }
        created = self._store.commit(RESOURCES["pods"], pod)
        if not instant:
            step = self.rollout_seconds / max(1, int(deployment["spec"]["replicas"]))
            self._kubelet.start_at(created, now + step)
        return created

    def _write_status(
        self, deployment: Obj, new: list[Obj], old: list[Obj], pod_hash: str, now: float
    ) -> bool:
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        desired = int(spec["replicas"])
        ready = sum(pod_ready(p) for p in [*new, *old])
        updated = len(new)
        total = updated + len(old)
        complete = updated == desired and total == desired and all(pod_ready(p) for p in new)
        replica_set = f'ReplicaSet "{name}-{pod_hash}"'
        since_progress = now - self._last_progress.get((ns, name), now)
        if complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f"{replica_set} has successfully progressed.",
            )
        elif since_progress > float(spec["progressDeadlineSeconds"]):
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f"{replica_set} has timed out progressing.",
            )
        else:
            progressing = ("True", "ReplicaSetUpdated", f"{replica_set} is progressing.")
        available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        if ready < desired:
            available = (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        previous = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions", [])}
        conditions = []
        for kind, (flag, reason, message) in (
            ("Available", available),
            ("Progressing", progressing),
        ):
            before = previous.get(kind, {})
            stamp = now_text()
            conditions.append(
                {
                    "type": kind,
                    "status": flag,
                    "reason": reason,
                    "message": message,
                    "lastUpdateTime": before.get("lastUpdateTime", stamp)
                    if (before.get("reason"), before.get("message")) == (reason, message)
                    else stamp,
                    "lastTransitionTime": before.get("lastTransitionTime", stamp)
                    if before.get("status") == flag
                    else stamp,
                }
            )
        counters = {
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, desired - ready),
        }
        status: Obj = {
            "observedGeneration": int(meta.get("generation", 1)),
            # Zero counters are omitted, as the API server's omitempty does.
            **{k: v for k, v in counters.items() if v},
            "conditions": conditions,
        }
        if status == deployment.get("status"):
            return False
        updated_deployment = copy.deepcopy(deployment)
        updated_deployment["status"] = status
        self._store.commit(RESOURCES["deployments"], updated_deployment)
        return True
