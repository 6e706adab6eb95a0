"""The sandbox cluster's object store: what etcd and the API server's write path do.

Objects are kept as the JSON the API server returns. Writes follow the rules runbooks depend on:
a global ``resourceVersion`` bumped on every real change (a no-op write changes nothing, as in
etcd), ``generation`` bumped only when a Deployment's ``spec`` changes, optimistic concurrency on
``resourceVersion``, server-owned fields kept from the stored object, and the checks of
``admission`` answered with ``Status`` errors.

Controllers watch the store, as real ones watch the API server: every commit and removal is told
to the watchers, synchronously and under the store's lock.
"""

from __future__ import annotations

import copy
import random
import string
import threading
import uuid
from collections.abc import Callable
from typing import Any, Literal

from sandbox.kube.admission import assign, check_type, normalise, validate
from sandbox.kube.objects import (
    KubeError,
    Obj,
    Resource,
    bad_request,
    invalid,
    not_found,
    now_text,
    pod_status,
    resource_for,
)
from sandbox.kube.patch import PatchError, json_patch, merge_patch
from sandbox.kube.selectors import (
    SelectorError,
    matches_fields,
    matches_labels,
    parse_field_selector,
    parse_label_selector,
)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
_SUFFIX_ALPHABET = string.ascii_lowercase

Event = Literal["ADDED", "MODIFIED", "DELETED"]
Watcher = Callable[[Event, Resource, Obj], None]
"""Told of each change with the stored object itself: it must read it, never change it."""
_Key = tuple[str, str, str]  # (plural, namespace or "", name)


class ObjectStore:
    """Objects by resource, namespace and name; every public method is thread-safe."""

    def __init__(self) -> None:
        # Reentrant: controllers hold it across a whole pass and write through the store.
        self.lock = threading.RLock()
        self.random = random.Random()
        self._objects: dict[_Key, Obj] = {}
        self._revision = 0
        self._watchers: list[Watcher] = []

    def watch(self, watcher: Watcher) -> None:
        """Tell ``watcher`` of every change from now on."""
        with self.lock:
            self._watchers.append(watcher)

    # ----- reading --------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The store's current revision, as list responses report it."""
        with self.lock:
            return str(self._revision)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of one object, or None."""
        with self.lock:
            obj = self.stored(resource_for(kind), namespace, name)
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
            raise bad_request(str(err)) from err
        with self.lock:
            return [
                copy.deepcopy(obj)
                for obj in self.scan(resource, namespace)
                if matches_labels(labels, obj["metadata"].get("labels"))
                and matches_fields(fields, obj)
            ]

    def stored(self, resource: Resource, namespace: str | None, name: str) -> Obj | None:
        """The stored object itself, for a caller holding the lock; change it only by commit()."""
        return self._objects.get(_key(resource, namespace, name))

    def scan(self, resource: Resource, namespace: str | None) -> list[Obj]:
        """The stored objects themselves, sorted, for a caller holding the lock (as stored())."""
        return [
            obj
            for (plural, ns, _), obj in sorted(self._objects.items())
            if plural == resource.plural and (namespace is None or ns == namespace)
        ]

    def _existing(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        obj = self.stored(resource, namespace, name)
        if obj is None:
            raise not_found(resource, name)
        return obj

    # ----- writing --------------------------------------------------------------------------

    def create(self, kind: str, namespace: str | None, body: Any, *, dry_run: bool = False) -> Obj:
        """POST: store a new object; 409 if the name is taken, 422 if the body is invalid."""
        resource = resource_for(kind)
        if not isinstance(body, dict):
            raise bad_request(f"the body of a {resource.kind} create must be a JSON object")
        obj = copy.deepcopy(body)
        check_type(resource, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise invalid(resource, "", "metadata", "must be an object")
        with self.lock:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{self.suffix()}"
            name = meta.get("name") or ""
            if not name:
                raise invalid(
                    resource,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
            if resource.namespaced:
                if meta.get("namespace") not in (None, namespace):
                    raise bad_request(
                        "the namespace of the provided object does not match "
                        "the namespace sent on the request"
                    )
                if self._objects.get(("namespaces", "", namespace or "")) is None:
                    raise KubeError(404, "NotFound", f'namespaces "{namespace}" not found')
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if _key(resource, namespace, name) in self._objects:
                raise KubeError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            meta["uid"] = self.uid()
            meta["creationTimestamp"] = now_text()
            for server_owned in ("resourceVersion", "generation", "deletionTimestamp"):
                meta.pop(server_owned, None)
            if resource.plural == "deployments":
                meta["generation"] = 1
                obj["status"] = {}
            if resource.plural == "pods":
                obj["status"] = pod_status(ready=False)
            if resource.plural == "services":
                obj["status"] = {"loadBalancer": {}}
            if resource.plural == "namespaces":
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            assign(resource, obj, None, self.random)
            normalise(resource, obj)
            validate(resource, obj)
            if dry_run:
                return obj
            return self.commit(resource, obj)

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
            raise bad_request(f"the body of a {resource.kind} update must be a JSON object")
        check_type(resource, body)
        body_name = body.get("metadata", {}).get("name")
        if body_name != name:
            raise bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        with self.lock:
            current = self._existing(resource, namespace, name)
            sent = body["metadata"].get("resourceVersion")
            if sent is not None and sent != current["metadata"]["resourceVersion"]:
                raise _conflict(resource, name)
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
        with self.lock:
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
                raise invalid(resource, name, "patch", str(err)) from err
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise invalid(resource, name, "metadata", "Required value")
            sent = patched["metadata"].get("resourceVersion")
            if sent is not None and sent != current["metadata"]["resourceVersion"]:
                # A patch that names a resourceVersion is a precondition, as on the real server.
                raise _conflict(resource, name)
            return self._update(resource, current, patched, subresource, dry_run)

    def delete(self, kind: str, namespace: str | None, name: str, *, dry_run: bool = False) -> Obj:
        """DELETE: remove an object (immediately: the sandbox has no grace periods)."""
        resource = resource_for(kind)
        with self.lock:
            current = self._existing(resource, namespace, name)
            if dry_run:
                return copy.deepcopy(current)
            self.remove(resource, namespace, name)
            if resource.plural == "namespaces":
                for key in [k for k in self._objects if k[1] == name]:
                    self._drop(key)
            return copy.deepcopy(current)

    def _update(
        self, resource: Resource, current: Obj, new: Obj, subresource: str | None, dry_run: bool
    ) -> Obj:
        if subresource not in (None, "status") or (subresource and not resource.has_status):
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        check_type(resource, new)
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
        assign(resource, updated, current, self.random)
        normalise(resource, updated)
        if updated == current:
            return copy.deepcopy(current)  # a no-op write is not a write: nothing changes
        validate(resource, updated)
        if resource.plural == "deployments" and updated.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if dry_run:
            return copy.deepcopy(updated)
        return self.commit(resource, updated)

    # ----- for controllers, holding the lock ------------------------------------------------

    def commit(self, resource: Resource, obj: Obj) -> Obj:
        """Store ``obj`` (which the store now owns) at the next resourceVersion; returns a copy."""
        meta = obj["metadata"]
        key = _key(resource, meta.get("namespace"), meta["name"])
        event: Event = "MODIFIED" if key in self._objects else "ADDED"
        self._revision += 1
        meta["resourceVersion"] = str(self._revision)
        self._objects[key] = obj
        self._tell(event, key, obj)
        return copy.deepcopy(obj)

    def remove(self, resource: Resource, namespace: str | None, name: str) -> None:
        """Remove an object at the next resourceVersion (nothing if it is already gone)."""
        self._drop(_key(resource, namespace, name))
        self._revision += 1

    def _drop(self, key: _Key) -> None:
        obj = self._objects.pop(key, None)
        if obj is not None:
            self._tell("DELETED", key, obj)

    def _tell(self, event: Event, key: _Key, obj: Obj) -> None:
        resource = resource_for(key[0])
        for watcher in self._watchers:
            watcher(event, resource, obj)

    def suffix(self) -> str:
        """The random part of a generated name."""
        return "".join(self.random.choices(_SUFFIX_ALPHABET, k=5))

    def uid(self) -> str:
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))


def _key(resource: Resource, namespace: str | None, name: str) -> _Key:
    return (resource.plural, (namespace or "") if resource.namespaced else "", name)


def _conflict(resource: Resource, name: str) -> KubeError:
    return KubeError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.plural} "{name}": the object '
        "has been modified; please apply your changes to the latest version "
        "and try again",
    )
