"""A Deployment's ReplicaSets and its rollout history, kept the way the real Deployment
controller keeps them, so ``kubectl rollout history`` and ``kubectl rollout undo`` (and
``activities/rollout_history.py``) have something true to read.

Every pod template gets a ReplicaSet ``<deployment>-<pod-template-hash>`` owned by the
Deployment and annotated with an incrementing ``deployment.kubernetes.io/revision``; a template
equal to an older ReplicaSet's reuses that ReplicaSet under the next revision number (its old
numbers go to ``deployment.kubernetes.io/revision-history``); the Deployment carries its current
revision. ReplicaSets whose pods are gone are pruned past ``revisionHistoryLimit``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid

from activities.kube_annotations import (
    CONTROLLER_ANNOTATIONS,
    REVISION,
    REVISION_HISTORY,
    TEMPLATE_HASH_LABEL,
)
from sandbox.kube.objects import (
    RESOURCES,
    Obj,
    controller_uid,
    now_text,
    owner_deployment,
    pod_ready,
    revision_of,
)
from sandbox.kube.store import ObjectStore


def template_hash(template: Obj) -> str:
    """The ``pod-template-hash`` of a pod template: stable, short, lowercase hex."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def replica_set_uid(deployment: Obj, pod_hash: str) -> str:
    """The uid of the Deployment's ReplicaSet for a template: known before the ReplicaSet is."""
    return str(uuid.uuid5(uuid.UUID(deployment["metadata"]["uid"]), pod_hash))


class ReplicaSets:
    """The ReplicaSets of Deployments in a store; the caller holds the store's lock."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def of(self, deployment: Obj) -> list[Obj]:
        """The ReplicaSets the Deployment controls."""
        meta = deployment["metadata"]
        return [
            rs
            for rs in self._store.scan(RESOURCES["replicasets"], meta["namespace"])
            if controller_uid(rs) == meta["uid"]
        ]

    def sync_revision(self, deployment: Obj, pod_hash: str) -> tuple[Obj, bool]:
        """Make sure the template has its ReplicaSet at the newest revision, and the Deployment
        says which revision it runs; returns the (possibly rewritten) Deployment and whether
        anything changed."""
        meta = deployment["metadata"]
        ns, name = meta["namespace"], meta["name"]
        owned = self.of(deployment)
        newest = max((revision_of(rs) for rs in owned), default=0)
        copied = {
            k: v
            for k, v in (meta.get("annotations") or {}).items()
            if k not in CONTROLLER_ANNOTATIONS
        }
        changed = False
        current = next((rs for rs in owned if rs["metadata"]["name"] == f"{name}-{pod_hash}"), None)
        if current is None:
            current = self._create(deployment, pod_hash, newest + 1, copied)
            changed = True
        else:
            annotations = dict(current["metadata"].get("annotations") or {})
            wanted = {**annotations, **copied}
            revision = revision_of(current)
            if revision < newest:
                # An older template is back (kubectl rollout undo): the same ReplicaSet serves
                # it under the next revision number, and remembers the numbers it had.
                former = [n for n in annotations.get(REVISION_HISTORY, "").split(",") if n]
                if revision:
                    former.append(str(revision))
                wanted[REVISION] = str(newest + 1)
                if former:
                    wanted[REVISION_HISTORY] = ",".join(former)
            if wanted != annotations:
                updated = copy.deepcopy(current)
                updated["metadata"]["annotations"] = wanted
                current = self._store.commit(RESOURCES["replicasets"], updated)
                changed = True
        revision_text = str(revision_of(current))
        if (meta.get("annotations") or {}).get(REVISION) != revision_text:
            updated = copy.deepcopy(deployment)
            updated["metadata"].setdefault("annotations", {})[REVISION] = revision_text
            self._store.commit(RESOURCES["deployments"], updated)
            changed = True
        stored = self._store.stored(RESOURCES["deployments"], ns, name)
        assert stored is not None  # the caller holds the lock: nothing deleted it meanwhile
        return stored, changed

    def _create(
        self, deployment: Obj, pod_hash: str, revision: int, annotations: dict[str, str]
    ) -> Obj:
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        template = copy.deepcopy(spec["template"])
        template_meta = template.setdefault("metadata", {})
        template_meta["labels"] = {
            **(template_meta.get("labels") or {}),
            TEMPLATE_HASH_LABEL: pod_hash,
        }
        selector = copy.deepcopy(spec["selector"])
        selector["matchLabels"] = {
            **(selector.get("matchLabels") or {}),
            TEMPLATE_HASH_LABEL: pod_hash,
        }
        replica_set: Obj = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{name}-{pod_hash}",
                "namespace": ns,
                "labels": dict(template_meta["labels"]),
                "annotations": {**annotations, REVISION: str(revision)},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": name,
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                # The uid its pods' owner references already name.
                "uid": replica_set_uid(deployment, pod_hash),
                "creationTimestamp": now_text(),
                "generation": 1,
            },
            "spec": {"replicas": 0, "selector": selector, "template": template},
            "status": {"replicas": 0},
        }
        return self._store.commit(RESOURCES["replicasets"], replica_set)

    def write_status(self, deployment: Obj, pod_hash: str) -> bool:
        """Scale and count each ReplicaSet as its pods stand; prune history past the limit."""
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        pods = [p for p in self._store.scan(RESOURCES["pods"], ns) if owner_deployment(p) == name]
        changed = False
        retired: list[Obj] = []
        for replica_set in self.of(deployment):
            rs_hash = replica_set["metadata"]["name"][len(name) + 1 :]
            mine = [p for p in pods if p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL) == rs_hash]
            ready = sum(pod_ready(p) for p in mine)
            replicas = int(spec["replicas"]) if rs_hash == pod_hash else len(mine)
            if rs_hash != pod_hash and not mine:
                retired.append(replica_set)
            updated = copy.deepcopy(replica_set)
            if updated["spec"].get("replicas") != replicas:
                updated["spec"]["replicas"] = replicas
                updated["metadata"]["generation"] = int(updated["metadata"]["generation"]) + 1
            counters = {
                "fullyLabeledReplicas": len(mine),
                "readyReplicas": ready,
                "availableReplicas": ready,
            }
            updated["status"] = {
                # replicas is always reported; the other counters are omitted at zero.
                "replicas": len(mine),
                **{k: v for k, v in counters.items() if v},
                "observedGeneration": updated["metadata"]["generation"],
            }
            if updated != replica_set:
                self._store.commit(RESOURCES["replicasets"], updated)
                changed = True
        limit = int(spec.get("revisionHistoryLimit", 10))
        retired.sort(key=revision_of)
        for replica_set in retired[: max(0, len(retired) - limit)]:
            self._store.remove(RESOURCES["replicasets"], ns, replica_set["metadata"]["name"])
            changed = True
        return changed
