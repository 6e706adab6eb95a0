"""What the sandbox cluster's objects are: the resources it serves, the errors it answers with, and
the object fields its store and controllers both read or write.

Objects are plain JSON (``Obj``), exactly as the API server returns them, so the HTTP layer only
routes and serialises.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from activities.kube_annotations import REVISION, TEMPLATE_HASH_LABEL

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """A REST resource the fake serves: where it lives and what its objects are called."""

    kind: str
    plural: str
    api_version: str
    namespaced: bool = True

    @property
    def has_status(self) -> bool:
        """Resources whose ``status`` is a subresource, ignored by writes to the main resource."""
        return self.plural in ("pods", "services", "deployments", "replicasets")


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("Namespace", "namespaces", "v1", namespaced=False),
        Resource("ConfigMap", "configmaps", "v1"),
        Resource("Secret", "secrets", "v1"),
        Resource("Pod", "pods", "v1"),
        Resource("Service", "services", "v1"),
        Resource("Deployment", "deployments", "apps/v1"),
        Resource("ReplicaSet", "replicasets", "apps/v1"),
    )
}


def resource_for(kind: str) -> Resource:
    """Look a resource up by kind (``Deployment``), plural (``deployments``) or singular."""
    wanted = kind.lower()
    for resource in RESOURCES.values():
        if wanted in (resource.plural, resource.kind.lower()):
            return resource
    raise KeyError(f"the sandbox does not serve {kind!r}; it serves {', '.join(RESOURCES)}")


class KubeError(Exception):
    """An API error, answered by the server as a ``Status`` object with this code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        """The ``Status`` body the real API server returns for this error."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def not_found(resource: Resource, name: str) -> KubeError:
    return KubeError(404, "NotFound", f'{resource.plural} "{name}" not found')


def invalid(resource: Resource, name: str, field: str, problem: str) -> KubeError:
    return KubeError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {field}: {problem}')


def bad_request(message: str) -> KubeError:
    return KubeError(400, "BadRequest", message)


def now_text() -> str:
    """A timestamp as the API server writes them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_deployment(pod: Obj) -> str | None:
    """The Deployment that owns a pod, read back from its ReplicaSet owner reference."""
    pod_hash = (pod["metadata"].get("labels") or {}).get(TEMPLATE_HASH_LABEL)
    for ref in pod["metadata"].get("ownerReferences") or []:
        name = ref.get("name", "")
        if ref.get("kind") == "ReplicaSet" and pod_hash and name.endswith(f"-{pod_hash}"):
            return str(name[: -len(pod_hash) - 1])
    return None


def controller_uid(obj: Obj) -> str | None:
    """The uid of the object's controlling owner."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def revision_of(obj: Obj) -> int:
    """The revision a ReplicaSet (or Deployment) is annotated with; 0 when it has none."""
    text = (obj["metadata"].get("annotations") or {}).get(REVISION, "")
    return int(text) if text.isdigit() else 0


def pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_status(*, ready: bool, spec: Obj | None = None, pod_ip: str | None = None) -> Obj:
    """A pod's status: Pending with its containers being created, or Running and ready."""
    flag = "True" if ready else "False"
    now = now_text()
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
        {"type": "Ready", "status": flag, "lastTransitionTime": now},
    ]
    containers = []
    for container in (spec or {}).get("containers") or []:
        state: Obj = (
            {"running": {"startedAt": now}}
            if ready
            else {"waiting": {"reason": "ContainerCreating"}}
        )
        containers.append(
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": f"sandbox://{container['image']}",
                "ready": ready,
                "started": ready,
                "restartCount": 0,
                "state": state,
            }
        )
    status: Obj = {
        "phase": "Running" if ready else "Pending",
        "conditions": conditions,
        "hostIP": "10.0.0.1",
        "startTime": now,
    }
    if containers:
        status["containerStatuses"] = containers
    if pod_ip is not None:
        status["podIP"] = pod_ip
    return status
