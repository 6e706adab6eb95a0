"""The sandbox cluster: an in-memory object store with API-server semantics, and a controller.

The store keeps objects as the JSON the API server would return, so the HTTP front only routes
and serialises. Writes follow the apiserver's rules that runbooks depend on: a global
``resourceVersion`` bumped on every real change (a no-op write changes nothing, as in etcd),
``generation`` bumped only when a Deployment's ``spec`` changes, optimistic concurrency on
``resourceVersion``, and validation answered with ``Status`` errors.

The controller plays the Deployment/ReplicaSet controllers and the kubelet: it rolls pods one at a
time (max surge 1, max unavailable 0) over ``rollout_seconds``, replaces deleted pods, and reports
status the way ``kubectl rollout status`` reads it. ``stall()`` freezes a deployment's next
rollout so game days and tests can watch a progress deadline expire.

Rollout history is kept the way the real Deployment controller keeps it, so ``kubectl rollout
history`` and ``kubectl rollout undo`` have something true to read: every pod template gets a
ReplicaSet ``<deployment>-<pod-template-hash>`` owned by the Deployment and annotated with an
incrementing ``deployment.kubernetes.io/revision``; a template equal to an older ReplicaSet's
reuses that ReplicaSet under the next revision number (its old numbers go to
``deployment.kubernetes.io/revision-history``); the Deployment carries its current revision.

Every public method is thread-safe: the controller runs in the server's event loop thread while
tests inspect the store from theirs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import json
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandbox.kube.patch import PatchError, json_patch, merge_patch
from sandbox.kube.selectors import (
    SelectorError,
    label_selector_requirements,
    matches_fields,
    matches_labels,
    parse_field_selector,
    parse_label_selector,
)

Obj = dict[str, Any]

TEMPLATE_HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
# The Deployment controller's own annotations: never copied from a Deployment to its ReplicaSets.
CONTROLLER_ANNOTATIONS = frozenset(
    {
        REVISION,
        REVISION_HISTORY,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "kubectl.kubernetes.io/last-applied-configuration",
    }
)
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SUFFIX_ALPHABET = string.ascii_lowercase


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
        return self.plural in ("pods", "deployments", "replicasets")


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("Namespace", "namespaces", "v1", namespaced=False),
        Resource("ConfigMap", "configmaps", "v1"),
        Resource("Secret", "secrets", "v1"),
        Resource("Pod", "pods", "v1"),
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


def _not_found(resource: Resource, name: str) -> KubeError:
    return KubeError(404, "NotFound", f'{resource.plural} "{name}" not found')


def _invalid(resource: Resource, name: str, field: str, problem: str) -> KubeError:
    return KubeError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {field}: {problem}')


def _bad_request(message: str) -> KubeError:
    return KubeError(400, "BadRequest", message)


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_hash(template: Obj) -> str:
    """The ``pod-template-hash`` of a pod template: stable, short, lowercase hex."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _owner_deployment(pod: Obj) -> str | None:
    """The Deployment that owns a pod, read back from its ReplicaSet owner reference."""
    pod_hash = (pod["metadata"].get("labels") or {}).get(TEMPLATE_HASH_LABEL)
    for ref in pod["metadata"].get("ownerReferences") or []:
        name = ref.get("name", "")
        if ref.get("kind") == "ReplicaSet" and pod_hash and name.endswith(f"-{pod_hash}"):
            return str(name[: -len(pod_hash) - 1])
    return None


def _revision(obj: Obj) -> int:
    """The revision a ReplicaSet (or Deployment) is annotated with; 0 when it has none."""
    text = (obj["metadata"].get("annotations") or {}).get(REVISION, "")
    return int(text) if text.isdigit() else 0


def _controller_uid(obj: Obj) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class FakeCluster:
    """In-memory Kubernetes objects plus the controllers that make Deployments roll."""

    def __init__(self, rollout_seconds: float = 2.0, *, seed: int | None = None) -> None:
        self.rollout_seconds = rollout_seconds
        # One tick is a small slice of a rollout step, so status follows pods closely.
        self.tick_seconds = max(0.005, min(0.05, rollout_seconds / 20))
        self._lock = threading.RLock()
        self._random = random.Random(seed)
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._revision = 0
        self._ready_at: dict[tuple[str, str], float] = {}  # (namespace, pod) -> kubelet start
        self._last_progress: dict[tuple[str, str], float] = {}
        self._seen_generation: dict[tuple[str, str], int] = {}
        self._stalled: set[str] = set()
        for namespace in ("default", "kube-system"):
            self.create("namespaces", None, {"metadata": {"name": namespace}})

    # ----- reading --------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The store's current revision, as list responses report it."""
        with self._lock:
            return str(self._revision)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of one object, or None; for tests and seeders, no HTTP involved."""
        resource = resource_for(kind)
        with self._lock:
            obj = self._objects.get(self._key(resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list_objects(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        """Copies of matching objects, sorted by namespace and name like the API server."""
        resource = resource_for(kind)
        try:
            labels = parse_label_selector(label_selector)
            fields = parse_field_selector(field_selector)
        except SelectorError as err:
            raise _bad_request(str(err)) from err
        with self._lock:
            return [
                copy.deepcopy(obj)
                for obj in self._iter(resource, namespace)
                if matches_labels(labels, obj["metadata"].get("labels"))
                and matches_fields(fields, obj)
            ]

    def pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        """The pods in a namespace whose labels include every ``selector`` pair."""
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        return self.list_objects("pods", namespace, label_selector=text)

    def _iter(self, resource: Resource, namespace: str | None) -> Iterator[Obj]:
        for (plural, ns, _), obj in sorted(self._objects.items()):
            if plural == resource.plural and (namespace is None or ns == namespace):
                yield obj

    def _key(self, resource: Resource, namespace: str | None, name: str) -> tuple[str, str, str]:
        return (resource.plural, (namespace or "") if resource.namespaced else "", name)

    def _existing(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        obj = self._objects.get(self._key(resource, namespace, name))
        if obj is None:
            raise _not_found(resource, name)
        return obj

    # ----- writing --------------------------------------------------------------------------

    def create(self, kind: str, namespace: str | None, body: Any, *, dry_run: bool = False) -> Obj:
        """POST: store a new object; 409 if the name is taken, 422 if the body is invalid."""
        resource = resource_for(kind)
        if not isinstance(body, dict):
            raise _bad_request(f"the body of a {resource.kind} create must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_type(resource, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _invalid(resource, "", "metadata", "must be an object")
        with self._lock:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{self._suffix()}"
            name = meta.get("name") or ""
            if not name:
                raise _invalid(
                    resource,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
            if resource.namespaced:
                if meta.get("namespace") not in (None, namespace):
                    raise _bad_request(
                        "the namespace of the provided object does not match "
                        "the namespace sent on the request"
                    )
                if self._objects.get(("namespaces", "", namespace or "")) is None:
                    raise KubeError(404, "NotFound", f'namespaces "{namespace}" not found')
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            key = self._key(resource, namespace, name)
            if key in self._objects:
                raise KubeError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            meta["uid"] = self._uid()
            meta["creationTimestamp"] = _now_text()
            for server_owned in ("resourceVersion", "generation", "deletionTimestamp"):
                meta.pop(server_owned, None)
            if resource.plural == "deployments":
                meta["generation"] = 1
                obj["status"] = {}
            if resource.plural == "pods":
                obj["status"] = self._pod_status(ready=False)
            if resource.plural == "namespaces":
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            self._normalise(resource, obj)
            self._validate(resource, obj)
            if dry_run:
                return obj
            if resource.plural == "pods" and _owner_deployment(obj) is None:
                self._ready_at[(namespace or "", name)] = time.monotonic()
            return self._commit(resource, key, obj)

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
        resource = resource_for(kind)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _bad_request(f"the body of a {resource.kind} update must be a JSON object")
        self._check_type(resource, body)
        body_name = body.get("metadata", {}).get("name")
        if body_name != name:
            raise _bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        with self._lock:
            current = self._existing(resource, namespace, name)
            sent = body["metadata"].get("resourceVersion")
            if sent is not None and sent != current["metadata"]["resourceVersion"]:
                raise self._conflict(resource, name)
            return self._update(resource, current, copy.deepcopy(body), subresource, dry_run)

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
        resource = resource_for(kind)
        media_type = content_type.split(";")[0].strip().lower()
        with self._lock:
            current = self._existing(resource, namespace, name)
            try:
                if media_type == JSON_PATCH:
                    patched = json_patch(current, patch)
                elif media_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
                    if not isinstance(patch, dict):
                        raise PatchError("a merge patch must be a JSON object")
                    patched = merge_patch(current, patch, strategic=media_type != MERGE_PATCH)
                else:
                    raise KubeError(
                        415,
                        "UnsupportedMediaType",
                        f"the sandbox does not support patch type {media_type!r}; "
                        f"use {JSON_PATCH}, {MERGE_PATCH} or {STRATEGIC_MERGE_PATCH}",
                    )
            except PatchError as err:
                raise _invalid(resource, name, "patch", str(err)) from err
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise _invalid(resource, name, "metadata", "Required value")
            sent = patched["metadata"].get("resourceVersion")
            if sent is not None and sent != current["metadata"]["resourceVersion"]:
                # A patch that names a resourceVersion is a precondition, as on the real server.
                raise self._conflict(resource, name)
            return self._update(resource, current, patched, subresource, dry_run)

    def delete(self, kind: str, namespace: str | None, name: str, *, dry_run: bool = False) -> Obj:
        """DELETE: remove an object (immediately: the sandbox has no grace periods)."""
        resource = resource_for(kind)
        with self._lock:
            current = self._existing(resource, namespace, name)
            if dry_run:
                return copy.deepcopy(current)
            self._remove(resource, namespace, name)
            if resource.plural == "namespaces":
                for key in [k for k in self._objects if k[1] == name]:
                    del self._objects[key]
            return copy.deepcopy(current)

    def _update(
        self, resource: Resource, current: Obj, new: Obj, subresource: str | None, dry_run: bool
    ) -> Obj:
        if subresource not in (None, "status") or (subresource and not resource.has_status):
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        self._check_type(resource, new)
        if subresource == "status":
            # The status subresource writes status only; everything else is the stored object.
            updated = copy.deepcopy(current)
            updated["status"] = new.get("status") or {}
        else:
            updated = new
            if resource.has_status:
                updated["status"] = copy.deepcopy(current.get("status") or {})
        meta = updated["metadata"]
        for immutable in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if immutable in current["metadata"]:
                meta[immutable] = current["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        self._normalise(resource, updated)
        if updated == current:
            return copy.deepcopy(current)  # a no-op write is not a write: nothing changes
        self._validate(resource, updated)
        if resource.plural == "deployments" and updated.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if dry_run:
            return copy.deepcopy(updated)
        key = self._key(resource, meta.get("namespace"), meta["name"])
        return self._commit(resource, key, updated)

    def _commit(self, resource: Resource, key: tuple[str, str, str], obj: Obj) -> Obj:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        self._objects[key] = obj
        return copy.deepcopy(obj)

    def _remove(self, resource: Resource, namespace: str | None, name: str) -> None:
        self._objects.pop(self._key(resource, namespace, name), None)
        self._revision += 1
        if resource.plural == "pods":
            self._ready_at.pop((namespace or "", name), None)
        if resource.plural == "deployments":
            self._last_progress.pop((namespace or "", name), None)
            self._seen_generation.pop((namespace or "", name), None)

    def _conflict(self, resource: Resource, name: str) -> KubeError:
        return KubeError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource.plural} "{name}": the object '
            "has been modified; please apply your changes to the latest version "
            "and try again",
        )

    def _suffix(self) -> str:
        return "".join(self._random.choices(_SUFFIX_ALPHABET, k=5))

    def _uid(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    # ----- validation -----------------------------------------------------------------------

    @staticmethod
    def _check_type(resource: Resource, obj: Obj) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind not in (None, resource.kind) or api_version not in (None, resource.api_version):
            raise _bad_request(
                f"the API version in the data ({api_version}) and kind ({kind}) "
                f"do not match {resource.api_version} {resource.kind}"
            )

    def _normalise(self, resource: Resource, obj: Obj) -> None:
        """Fill the defaults the API server adds, so reads look like a real cluster's."""
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        if resource.plural == "secrets":
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict):
                data = obj.setdefault("data", {})
                for key, value in string_data.items():
                    if not isinstance(value, str):
                        raise _invalid(
                            resource,
                            obj["metadata"].get("name", ""),
                            f"stringData[{key}]",
                            "must be a string",
                        )
                    data[key] = base64.b64encode(value.encode()).decode()
            obj.setdefault("type", "Opaque")
        if resource.plural == "deployments":
            spec = obj.setdefault("spec", {})
            if isinstance(spec, dict):
                spec.setdefault("replicas", 1)
                spec.setdefault("progressDeadlineSeconds", 600)
                spec.setdefault("revisionHistoryLimit", 10)
                spec.setdefault(
                    "strategy",
                    {
                        "type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
                    },
                )

    def _validate(self, resource: Resource, obj: Obj) -> None:
        """The 422 checks that catch the mistakes runbooks could make."""
        meta = obj["metadata"]
        name = meta.get("name", "")

        def invalid(field: str, problem: str) -> KubeError:
            return _invalid(resource, name, field, problem)

        if not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
            raise invalid(
                "metadata.name",
                f"Invalid value: {name!r}: a lowercase RFC 1123 "
                "subdomain must consist of lower case alphanumeric characters, '-' "
                "or '.'",
            )
        for field in ("labels", "annotations"):
            values = meta.get(field)
            if values is not None and (
                not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values())
            ):
                raise invalid(f"metadata.{field}", "Invalid value: values must be strings")
        if resource.plural == "configmaps":
            for field in ("data", "binaryData"):
                data = obj.get(field)
                if data is None:
                    continue
                if not isinstance(data, dict):
                    raise invalid(field, "Invalid value: must be an object of strings")
                for key, value in data.items():
                    if not isinstance(value, str):
                        raise invalid(
                            f"{field}[{key}]", f"Invalid value: {value!r}: must be a string"
                        )
        if resource.plural == "secrets":
            data = obj.get("data") or {}
            if not isinstance(data, dict):
                raise invalid("data", "Invalid value: must be an object of base64 strings")
            for key, value in data.items():
                try:
                    base64.b64decode(value, validate=True)
                except (TypeError, binascii.Error) as err:
                    raise invalid(f"data[{key}]", "Invalid value: must be base64") from err
        if resource.plural == "pods":
            self._validate_pod_spec(obj.get("spec"), "spec", invalid)
        if resource.plural == "deployments":
            self._validate_deployment(obj, invalid)

    @staticmethod
    def _validate_pod_spec(spec: Any, path: str, invalid: Any) -> None:
        if not isinstance(spec, dict):
            raise invalid(path, "Required value")
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            raise invalid(f"{path}.containers", "Required value")
        for number, container in enumerate(containers):
            for field in ("name", "image"):
                if not isinstance(container, dict) or not isinstance(container.get(field), str):
                    raise invalid(f"{path}.containers[{number}].{field}", "Required value")

    def _validate_deployment(self, obj: Obj, invalid: Any) -> None:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise invalid("spec", "Required value")
        replicas = spec.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(
                "spec.replicas", f"Invalid value: {replicas!r}: must be greater than or equal to 0"
            )
        deadline = spec.get("progressDeadlineSeconds")
        if not isinstance(deadline, int) or deadline <= 0:
            raise invalid(
                "spec.progressDeadlineSeconds",
                f"Invalid value: {deadline!r}: must be greater than 0",
            )
        selector = spec.get("selector")
        if not isinstance(selector, dict) or not (
            selector.get("matchLabels") or selector.get("matchExpressions")
        ):
            raise invalid("spec.selector", "Required value")
        template = spec.get("template")
        if not isinstance(template, dict):
            raise invalid("spec.template", "Required value")
        labels = (template.get("metadata") or {}).get("labels") or {}
        try:
            requirements = label_selector_requirements(selector)
        except SelectorError as err:
            raise invalid("spec.selector", str(err)) from err
        if not matches_labels(requirements, labels):
            raise invalid(
                "spec.template.metadata.labels",
                f"Invalid value: {labels!r}: `selector` does not match template `labels`",
            )
        self._validate_pod_spec(template.get("spec"), "spec.template.spec", invalid)

    # ----- fault injection ------------------------------------------------------------------

    def stall(self, name: str) -> None:
        """Freeze the deployment's rollouts: new pods never become ready until ``unstall``."""
        with self._lock:
            self._stalled.add(name)

    def unstall(self, name: str) -> None:
        """Let a stalled deployment's pods start again."""
        with self._lock:
            self._stalled.discard(name)

    # ----- controller -----------------------------------------------------------------------

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

    def reconcile(self, now: float | None = None, *, instant: bool = False) -> bool:
        """One controller pass; returns whether anything changed. ``instant`` skips pod startup."""
        now = time.monotonic() if now is None else now
        with self._lock:
            changed = self._run_kubelet(now, instant)
            for pod in list(self._iter(RESOURCES["pods"], None)):
                owner = _owner_deployment(pod)
                ns = pod["metadata"]["namespace"]
                if owner and ("deployments", ns, owner) not in self._objects:
                    self._remove(RESOURCES["pods"], ns, pod["metadata"]["name"])  # garbage
                    changed = True
            live_uids = {d["metadata"]["uid"] for d in self._iter(RESOURCES["deployments"], None)}
            for replica_set in list(self._iter(RESOURCES["replicasets"], None)):
                owner_uid = _controller_uid(replica_set)
                if owner_uid is not None and owner_uid not in live_uids:
                    meta = replica_set["metadata"]
                    self._remove(RESOURCES["replicasets"], meta["namespace"], meta["name"])
                    changed = True
            for deployment in list(self._iter(RESOURCES["deployments"], None)):
                changed = self._reconcile_deployment(deployment, now, instant) or changed
            return changed

    def _run_kubelet(self, now: float, instant: bool) -> bool:
        changed = False
        for (ns, name), ready_at in list(self._ready_at.items()):
            pod = self._objects.get(("pods", ns, name))
            if pod is None:
                del self._ready_at[(ns, name)]
                continue
            owner = _owner_deployment(pod)
            if not instant and (now < ready_at or owner in self._stalled):
                continue
            del self._ready_at[(ns, name)]
            running = copy.deepcopy(pod)
            running["status"] = self._pod_status(ready=True, spec=pod.get("spec"))
            self._commit(RESOURCES["pods"], ("pods", ns, name), running)
            if owner:
                self._last_progress[(ns, owner)] = now
            changed = True
        return changed

    def _reconcile_deployment(self, deployment: Obj, now: float, instant: bool) -> bool:
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
            deployment, changed = self._sync_revision(deployment, pod_hash)
            meta = deployment["metadata"]
        owned = [p for p in self._iter(RESOURCES["pods"], ns) if _owner_deployment(p) == name]
        new = [p for p in owned if p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL) == pod_hash]
        old = [p for p in owned if p not in new]
        if not spec.get("paused"):
            # Scale down surplus new pods, unready (then newest) first.
            surplus = sorted(new, key=lambda p: (_pod_ready(p), p["metadata"]["name"]))
            for pod in surplus[: max(0, len(new) - desired)]:
                new.remove(pod)
                self._remove(RESOURCES["pods"], ns, pod["metadata"]["name"])
                changed = True
            # Max unavailable 0: retire an old pod only once a new one is ready to take over.
            keep_old = max(0, desired - sum(_pod_ready(p) for p in new))
            for pod in sorted(old, key=_pod_ready)[: max(0, len(old) - keep_old)]:
                old.remove(pod)
                self._remove(RESOURCES["pods"], ns, pod["metadata"]["name"])
                changed = True
            # Max surge 1: start the next new pod once the previous one is ready.
            while len(new) < desired and all(_pod_ready(p) for p in new):
                new.append(self._start_pod(deployment, pod_hash, now, instant))
                changed = True
                if not instant:
                    break
            if changed:
                self._last_progress[key] = now
        changed = self._write_replica_set_status(deployment, pod_hash) or changed
        changed = self._write_deployment_status(deployment, new, old, pod_hash, now) or changed
        return changed

    def _replica_sets_of(self, deployment: Obj) -> list[Obj]:
        meta = deployment["metadata"]
        return [
            rs
            for rs in self._iter(RESOURCES["replicasets"], meta["namespace"])
            if _controller_uid(rs) == meta["uid"]
        ]

    def _sync_revision(self, deployment: Obj, pod_hash: str) -> tuple[Obj, bool]:
        """Make sure the template has its ReplicaSet at the newest revision, and the Deployment
        says which revision it runs; returns the (possibly rewritten) Deployment."""
        meta = deployment["metadata"]
        ns, name = meta["namespace"], meta["name"]
        owned = self._replica_sets_of(deployment)
        newest = max((_revision(rs) for rs in owned), default=0)
        copied = {
            k: v
            for k, v in (meta.get("annotations") or {}).items()
            if k not in CONTROLLER_ANNOTATIONS
        }
        changed = False
        current = next((rs for rs in owned if rs["metadata"]["name"] == f"{name}-{pod_hash}"), None)
        if current is None:
            current = self._new_replica_set(deployment, pod_hash, newest + 1, copied)
            changed = True
        else:
            annotations = dict(current["metadata"].get("annotations") or {})
            wanted = {**annotations, **copied}
            revision = _revision(current)
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
                current = self._commit(
                    RESOURCES["replicasets"],
                    ("replicasets", ns, current["metadata"]["name"]),
                    updated,
                )
                changed = True
        revision_text = str(_revision(current))
        if (meta.get("annotations") or {}).get(REVISION) != revision_text:
            updated = copy.deepcopy(deployment)
            updated["metadata"].setdefault("annotations", {})[REVISION] = revision_text
            self._commit(RESOURCES["deployments"], ("deployments", ns, name), updated)
            changed = True
        return self._objects[("deployments", ns, name)], changed

    def _new_replica_set(
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
                "uid": str(uuid.uuid5(uuid.UUID(meta["uid"]), pod_hash)),
                "creationTimestamp": _now_text(),
                "generation": 1,
            },
            "spec": {"replicas": 0, "selector": selector, "template": template},
            "status": {"replicas": 0},
        }
        return self._commit(
            RESOURCES["replicasets"], ("replicasets", ns, f"{name}-{pod_hash}"), replica_set
        )

    def _write_replica_set_status(self, deployment: Obj, pod_hash: str) -> bool:
        """Scale and count each ReplicaSet as its pods stand; prune history past the limit."""
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        pods = [p for p in self._iter(RESOURCES["pods"], ns) if _owner_deployment(p) == name]
        changed = False
        retired: list[Obj] = []
        for replica_set in self._replica_sets_of(deployment):
            rs_hash = replica_set["metadata"]["name"][len(name) + 1 :]
            mine = [p for p in pods if p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL) == rs_hash]
            ready = sum(_pod_ready(p) for p in mine)
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
                key = ("replicasets", ns, replica_set["metadata"]["name"])
                self._commit(RESOURCES["replicasets"], key, updated)
                changed = True
        limit = int(spec.get("revisionHistoryLimit", 10))
        retired.sort(key=_revision)
        for replica_set in retired[: max(0, len(retired) - limit)]:
            self._remove(RESOURCES["replicasets"], ns, replica_set["metadata"]["name"])
            changed = True
        return changed

    def _start_pod(self, deployment: Obj, pod_hash: str, now: float, instant: bool) -> Obj:
        meta, template = deployment["metadata"], deployment["spec"]["template"]
        ns, name = meta["namespace"], meta["name"]
        template_meta = template.get("metadata") or {}
        pod_meta: Obj = {
            "name": f"{name}-{pod_hash}-{self._suffix()}",
            "namespace": ns,
            "labels": {**(template_meta.get("labels") or {}), TEMPLATE_HASH_LABEL: pod_hash},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{name}-{pod_hash}",
                    "uid": str(uuid.uuid5(uuid.UUID(meta["uid"]), pod_hash)),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "uid": self._uid(),
            "creationTimestamp": _now_text(),
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
            "status": self._pod_status(ready=instant, spec=pod_spec),
        }
        if not instant:
            # The kubelet part of reconcile() marks it ready one rollout step from now.
            self._ready_at[(ns, pod_meta["name"])] = now + self.rollout_seconds / max(
                1, int(deployment["spec"]["replicas"])
            )
        return self._commit(RESOURCES["pods"], ("pods", ns, pod_meta["name"]), pod)

    def _pod_status(self, *, ready: bool, spec: Obj | None = None) -> Obj:
        flag = "True" if ready else "False"
        now = _now_text()
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
        if ready:
            status["podIP"] = f"10.1.{self._random.randint(0, 255)}.{self._random.randint(1, 254)}"
        return status

    def _write_deployment_status(
        self, deployment: Obj, new: list[Obj], old: list[Obj], pod_hash: str, now: float
    ) -> bool:
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        desired = int(spec["replicas"])
        ready = sum(_pod_ready(p) for p in [*new, *old])
        updated = len(new)
        total = updated + len(old)
        complete = updated == desired and total == desired and all(_pod_ready(p) for p in new)
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
            stamp = _now_text()
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
        self._commit(RESOURCES["deployments"], ("deployments", ns, name), updated_deployment)
        return True
