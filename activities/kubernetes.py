"""Kubernetes activities: read and change Astra's config and Deployments, idempotently.

The official ``kubernetes`` client is synchronous, so these are sync activities and the worker runs
them on a thread-pool executor. Each mutating activity reads the current state first, acts only if
it differs from the goal, and reports what it did (or in dry-run what it would do). Restarts are
stamped with the step's idempotency token in the pod template, so a retried restart recognises its
own earlier work instead of rolling the pods twice. Rollout history is read, and undone, the way
``kubectl rollout history`` and ``kubectl rollout undo`` do it: from the Deployment's ReplicaSets
and their revision annotations.

The client is imported where it is used, not when this module loads: the workflows import this
module for its models and activity names (and so does the CLI, through the catalogue), and the
``kubernetes`` package takes a second to import.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.mutation import Mutation, MutationResult

if TYPE_CHECKING:
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

RESTARTED_BY = "astra-ops/restarted-by"
CONFIG_HASH = "astra-ops/config-hash"
CONFIG_PATCHED_BY = "astra-ops/patched-by"
ROLLED_BACK_BY = "astra-ops/rolled-back-by"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
CHANGE_CAUSE = "kubernetes.io/change-cause"
TEMPLATE_HASH_LABEL = "pod-template-hash"
# The Deployment controller's bookkeeping: kubectl rollout undo keeps the Deployment's own values
# of these and takes every other annotation from the ReplicaSet it rolls back to.
CONTROLLER_ANNOTATIONS = frozenset(
    {
        REVISION,
        REVISION_HISTORY,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "kubectl.kubernetes.io/last-applied-configuration",
    }
)
DEFAULT_NAMESPACE = "astra"
DEFAULT_CONFIG_MAP = "astra-config"
_T = TypeVar("_T")


# ----- models ---------------------------------------------------------------------------------


class ConfigRef(BaseModel):
    """One key of a ConfigMap."""

    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_CONFIG_MAP
    key: str


class ConfigValue(BaseModel):
    """A ConfigMap key's value (None when the key is absent) and the version it was read at."""

    value: str | None
    resource_version: str
    config_hash: str
    key: str = ""

    def summary(self) -> str:
        """One line for the step's record."""
        name = self.key or "the key"
        return f"{name} is not set" if self.value is None else f"{name}={self.value}"


class ConfigPatch(Mutation):
    """Set one ConfigMap key to a value."""

    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_CONFIG_MAP
    key: str
    value: str
    expected: str | None = Field(
        default=None,
        description="only change a key that holds this value (what the run wrote, when putting "
        "an old value back); None changes whatever it holds",
    )


class DeploymentRef(BaseModel):
    """A Deployment."""

    namespace: str = DEFAULT_NAMESPACE
    name: str


class RolloutStatus(BaseModel):
    """Where a Deployment's rollout stands, as ``kubectl rollout status`` judges it."""

    name: str
    generation: int
    observed_generation: int
    replicas: int = Field(description="desired replicas (spec.replicas)")
    updated: int
    ready: int
    available: int
    complete: bool
    failed_reason: str | None = None
    failed_message: str | None = None
    restart_token: str | None = None
    config_hash: str | None = None

    def summary(self) -> str:
        """One line for heartbeats and error messages."""
        return (
            f"generation {self.observed_generation}/{self.generation}, updated "
            f"{self.updated}/{self.replicas}, ready {self.ready}, available {self.available}"
        )


class RolloutRestart(Mutation):
    """Restart a Deployment's pods once per token, optionally recording a ConfigMap's hash."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    config_map: str | None = None


class RolloutWait(BaseModel):
    """Wait for a Deployment's rollout to complete."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    timeout_seconds: float = 600
    poll_seconds: float = 1.0


class Revision(BaseModel):
    """One revision of a Deployment: the ReplicaSet that holds its pod template."""

    revision: int
    replica_set: str
    created: datetime | None = None
    template_hash: str
    change_cause: str | None = None
    images: list[str] = []


class RolloutHistory(BaseModel):
    """A Deployment's revisions, oldest first, as ``kubectl rollout history`` lists them."""

    name: str
    current_revision: int | None = None
    revisions: list[Revision]

    def summary(self) -> str:
        newest = self.newest
        if newest is None:
            return f"{self.name}: no rollout history"
        return (
            f"{self.name}: {len(self.revisions)} revisions, current {self.current_revision}, "
            f"newest {newest.revision}"
        )

    @property
    def newest(self) -> Revision | None:
        return self.revisions[-1] if self.revisions else None

    @property
    def previous(self) -> Revision | None:
        """The revision ``kubectl rollout undo`` would go back to."""
        return self.revisions[-2] if len(self.revisions) > 1 else None


class RolloutUndo(Mutation):
    """Put a Deployment back on an earlier revision's pod template (default: the previous)."""

    namespace: str = DEFAULT_NAMESPACE
    name: str
    to_revision: int | None = Field(default=None, gt=0)


class PodSelector(BaseModel):
    """Pods in a namespace carrying all of these labels."""

    namespace: str = DEFAULT_NAMESPACE
    labels: dict[str, str]


class PodInfo(BaseModel):
    """What a runbook needs to know about one pod."""

    name: str
    phase: str
    ready: bool
    annotations: dict[str, str] = Field(default_factory=dict)
    created: datetime | None = None


class PodList(BaseModel):
    """Pods, oldest first."""

    pods: list[PodInfo]

    def summary(self) -> str:
        return f"{len(self.pods)} pods: {', '.join(p.name for p in self.pods) or 'none'}"


class PodDelete(Mutation):
    """Delete one pod (its controller replaces it)."""

    namespace: str = DEFAULT_NAMESPACE
    name: str


class ConfigRollout(BaseModel):
    """Which Deployment should be running which ConfigMap."""

    namespace: str = DEFAULT_NAMESPACE
    deployment: str
    config_map: str = DEFAULT_CONFIG_MAP


class ConfigVerification(BaseModel):
    """Whether every pod of a Deployment runs the ConfigMap's current content."""

    ok: bool
    expected_hash: str
    pods_total: int
    pods_current: int
    stale: list[str]

    def summary(self) -> str:
        stale = f"; stale: {', '.join(self.stale)}" if self.stale else ""
        return (
            f"{self.pods_current} of {self.pods_total} pods run config {self.expected_hash}{stale}"
        )


# ----- helpers --------------------------------------------------------------------------------


def unauthenticated_client(url: str) -> ApiClient:
    """A client for an API server at ``url`` that takes no credentials (the sandbox's): plain
    HTTP, ignoring any proxy the environment sets for real clusters."""
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration(host=url)
    configuration.proxy = None
    return ApiClient(configuration)


def config_hash(data: dict[str, str] | None) -> str:
    """The fingerprint of a ConfigMap's data stamped on pod templates: sha256 of sorted JSON."""
    canonical = json.dumps(data or {}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _status_reason(err: ApiException) -> str:
    try:
        body = json.loads(err.body or "{}")
        return f"{body.get('reason', err.reason)}: {body.get('message', '')}".rstrip(": ")
    except (TypeError, ValueError):
        return str(err.reason)


@contextmanager
def _kube(action: str, target: str) -> Iterator[None]:
    """Turn API errors into ApplicationErrors that say what failed and what to do about it."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as err:
        why = _status_reason(err)
        if err.status == 404:
            raise ApplicationError(
                f"cannot {action} {target}: it does not exist ({why}); check the name and "
                "namespace in the runbook input",
                type="KubernetesNotFound",
                non_retryable=True,
            ) from None
        if err.status in (401, 403):
            raise ApplicationError(
                f"cannot {action} {target}: the API server refused our credentials ({why}); "
                "grant astra-ops' ServiceAccount this verb in its RBAC Role",
                type="KubernetesForbidden",
                non_retryable=True,
            ) from None
        if err.status in (400, 422):
            raise ApplicationError(
                f"cannot {action} {target}: the API server rejected the request ({why}); "
                "this is a bug in the runbook input or in astra-ops",
                type="KubernetesInvalid",
                non_retryable=True,
            ) from None
        # 409 (a concurrent write), 429 and 5xx: a retry reads fresh state and can succeed.
        raise ApplicationError(
            f"cannot {action} {target}: {err.status} {why}", type="KubernetesUnavailable"
        ) from None
    except HTTPError as err:
        raise ApplicationError(
            f"cannot {action} {target}: the Kubernetes API server is not reachable ({err}); is "
            "the cluster up (or `astra-ops dev`'s sandbox running)?",
            type="KubernetesUnavailable",
        ) from None


def _annotations_of_template(deployment: Any) -> dict[str, str]:
    meta = deployment.spec.template.metadata
    return dict((meta.annotations if meta is not None else None) or {})


def _selector_text(selector: Any) -> str:
    """A Deployment's structured selector as a ``labelSelector`` query string."""
    terms = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or []:
        values = ",".join(expr.values or [])
        terms.append(
            {
                "In": f"{expr.key} in ({values})",
                "NotIn": f"{expr.key} notin ({values})",
                "Exists": expr.key,
                "DoesNotExist": f"!{expr.key}",
            }[expr.operator]
        )
    return ",".join(terms)


@dataclass(frozen=True)
class _Recorded:
    """A revision with what undoing to it needs: its template and annotations, its old numbers."""

    revision: Revision
    template: dict[str, Any]
    annotations: dict[str, str]
    former: frozenset[int]


def _revision_number(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _pod_template(api: ApiClient, template: Any) -> dict[str, Any]:
    """A pod template as JSON, without the ``pod-template-hash`` label its ReplicaSet adds."""
    body: dict[str, Any] = api.sanitize_for_serialization(template)  # type: ignore[no-untyped-call]
    labels = (body.get("metadata") or {}).get("labels")
    if labels:
        labels.pop(TEMPLATE_HASH_LABEL, None)
    return body


def _pod_info(pod: Any) -> PodInfo:
    status = pod.status
    conditions = (status.conditions if status is not None else None) or []
    return PodInfo(
        name=pod.metadata.name,
        phase=(status.phase if status is not None else None) or "Unknown",
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        annotations=dict(pod.metadata.annotations or {}),
        created=pod.metadata.creation_timestamp,
    )


def _rollout_status(deployment: Any) -> RolloutStatus:
    status = deployment.status
    spec_replicas = deployment.spec.replicas if deployment.spec.replicas is not None else 1

    def count(field: str) -> int:
        return int(getattr(status, field, None) or 0) if status is not None else 0

    generation = int(deployment.metadata.generation or 0)
    observed = count("observed_generation")
    updated, ready, available = (
        count("updated_replicas"),
        count("ready_replicas"),
        count("available_replicas"),
    )
    failed_reason = failed_message = None
    for condition in (status.conditions if status is not None else None) or []:
        if condition.type == "Progressing" and condition.status == "False":
            failed_reason, failed_message = condition.reason, condition.message
    annotations = _annotations_of_template(deployment)
    return RolloutStatus(
        name=deployment.metadata.name,
        generation=generation,
        observed_generation=observed,
        replicas=spec_replicas,
        updated=updated,
        ready=ready,
        available=available,
        # Old pods still running (status.replicas > spec.replicas) mean the rollout is not over.
        complete=(
            observed >= generation
            and updated == spec_replicas
            and count("replicas") == spec_replicas
            and ready >= spec_replicas
            and available >= spec_replicas
        ),
        # A stale condition from an earlier generation says nothing about this rollout.
        failed_reason=failed_reason if observed >= generation else None,
        failed_message=failed_message if observed >= generation else None,
        restart_token=annotations.get(RESTARTED_BY),
        config_hash=annotations.get(CONFIG_HASH),
    )


# ----- activities -----------------------------------------------------------------------------


class KubernetesActivities:
    """Astra's Kubernetes side effects, on an injected client (tests pass the sandbox's)."""

    def __init__(self, api: ApiClient) -> None:
        from kubernetes.client import AppsV1Api, CoreV1Api

        self.core = CoreV1Api(api)
        self.apps = AppsV1Api(api)

    def _call(self, action: str, target: str, fn: Callable[[], _T]) -> _T:
        with _kube(action, target):
            return fn()

    def _config_map(self, namespace: str, name: str) -> Any:
        return self._call(
            "read ConfigMap",
            f"{namespace}/{name}",
            lambda: self.core.read_namespaced_config_map(name, namespace),
        )

    def _deployment(self, namespace: str, name: str) -> Any:
        return self._call(
            "read Deployment",
            f"{namespace}/{name}",
            lambda: self.apps.read_namespaced_deployment(name, namespace),
        )

    @activity.defn
    def read_config(self, req: ConfigRef) -> ConfigValue:
        """Read one ConfigMap key, with the fingerprint of the whole map."""
        config_map = self._config_map(req.namespace, req.name)
        data = dict(config_map.data or {})
        return ConfigValue(
            value=data.get(req.key),
            resource_version=config_map.metadata.resource_version,
            config_hash=config_hash(data),
            key=req.key,
        )

    @activity.defn
    def patch_config(self, req: ConfigPatch) -> MutationResult:
        """Set a ConfigMap key; setting the value it already has changes nothing.

        With ``expected``, a key someone else changed is left as they set it: the activity fails,
        non-retryably, saying what it found, because only a person can tell which value is right.
        """
        target = f"{req.namespace}/{req.name}"
        config_map = self._config_map(req.namespace, req.name)
        current = (config_map.data or {}).get(req.key)
        if current == req.value:
            return MutationResult(
                changed=False, detail=f"{req.key} is already {req.value} in {target}"
            )
        if req.dry_run:
            return MutationResult(
                changed=False,
                detail=f"would set {req.key}={req.value} (currently {current}) in {target}",
            )
        if req.expected is not None and current != req.expected:
            raise ApplicationError(
                f"{req.key} in {target} is {current!r}, not {req.expected!r} as this run set it: "
                f"someone else changed it since, so it was not put back to {req.value!r}. A "
                "person must decide which value is right and set it by hand",
                type="ConfigChangedByOthers",
                non_retryable=True,
            )
        # The version read above is a precondition: a write in between answers 409, and the
        # retry compares again on fresh state.
        metadata: dict[str, Any] = {"resourceVersion": config_map.metadata.resource_version}
        if req.token:
            metadata["annotations"] = {CONFIG_PATCHED_BY: req.token}
        patch: dict[str, Any] = {"data": {req.key: req.value}, "metadata": metadata}
        self._call(
            "patch ConfigMap",
            target,
            lambda: self.core.patch_namespaced_config_map(req.name, req.namespace, patch),
        )
        return MutationResult(
            changed=True, detail=f"set {req.key}={req.value} (was {current}) in {target}"
        )

    @activity.defn
    def rollout_health(self, req: DeploymentRef) -> RolloutStatus:
        """Where the Deployment's rollout stands, without waiting."""
        return _rollout_status(self._deployment(req.namespace, req.name))

    @activity.defn
    def rollout_restart(self, req: RolloutRestart) -> MutationResult:
        """Restart a Deployment once per token (and config hash), however often it is retried."""
        target = f"{req.namespace}/{req.name}"
        if not req.token:
            raise ApplicationError(
                f"rollout_restart of {target} was called without an idempotency token; the step "
                "runner must derive one from the workflow id and step",
                type="ProgrammingError",
                non_retryable=True,
            )
        stamp = {RESTARTED_BY: req.token}
        if req.config_map:
            stamp[CONFIG_HASH] = config_hash(self._config_map(req.namespace, req.config_map).data)
        deployment = self._deployment(req.namespace, req.name)
        annotations = _annotations_of_template(deployment)
        if all(annotations.get(k) == v for k, v in stamp.items()):
            return MutationResult(
                changed=False,
                detail=f"{target} was already restarted by {req.token}; not restarting again",
            )
        what = ", ".join(f"{k}={v}" for k, v in stamp.items())
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would restart {target} ({what})")
        patch = {"spec": {"template": {"metadata": {"annotations": stamp}}}}
        patched: Any = self._call(
            "restart Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(req.name, req.namespace, patch),
        )
        return MutationResult(
            changed=True,
            detail=f"restarted {target} ({what}); generation "
            f"{deployment.metadata.generation} -> {patched.metadata.generation}",
        )

    @activity.defn
    def wait_rollout(self, req: RolloutWait) -> RolloutStatus:
        """Poll until the rollout completes; fail clearly on a progress deadline or timeout."""
        target = f"{req.namespace}/{req.name}"
        deadline = time.monotonic() + req.timeout_seconds
        while True:
            status = _rollout_status(self._deployment(req.namespace, req.name))
            if status.complete:
                return status
            if status.failed_reason == "ProgressDeadlineExceeded":
                raise ApplicationError(
                    f"rollout of {target} exceeded its progress deadline: {status.failed_message}"
                    f" ({status.summary()}); check `kubectl -n {req.namespace} describe "
                    f"deployment {req.name}` and the new pods' events",
                    status.model_dump(),
                    type="RolloutDeadlineExceeded",
                    non_retryable=True,
                )
            if time.monotonic() >= deadline:
                raise ApplicationError(
                    f"rollout of {target} did not complete within {req.timeout_seconds:g}s "
                    f"({status.summary()}); check `kubectl -n {req.namespace} rollout status "
                    f"deployment {req.name}`",
                    status.model_dump(),
                    type="RolloutTimeout",
                    non_retryable=True,
                )
            activity.heartbeat(status.summary())
            # Sleeping on the cancellation event lets a cancelled runbook stop waiting at once.
            activity.wait_for_cancelled_sync(timeout=req.poll_seconds)
            if activity.is_cancelled():
                raise CancelledError(f"waiting for the rollout of {target} was cancelled")

    def _recorded(self, deployment: Any) -> list[_Recorded]:
        """The Deployment's revisions, oldest first: its ReplicaSets that carry a revision."""
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        selector = _selector_text(deployment.spec.selector)
        listed: Any = self._call(
            "list ReplicaSets",
            f"{namespace}/{name}",
            lambda: self.apps.list_namespaced_replica_set(namespace, label_selector=selector),
        )
        recorded = []
        for replica_set in listed.items:
            meta = replica_set.metadata
            owned = any(
                ref.controller and ref.uid == deployment.metadata.uid
                for ref in meta.owner_references or []
            )
            annotations = dict(meta.annotations or {})
            number = _revision_number(annotations.get(REVISION))
            if not owned or number is None:
                continue
            template = replica_set.spec.template
            containers = (template.spec.containers if template.spec is not None else None) or []
            recorded.append(
                _Recorded(
                    revision=Revision(
                        revision=number,
                        replica_set=meta.name,
                        created=meta.creation_timestamp,
                        template_hash=(meta.labels or {}).get(TEMPLATE_HASH_LABEL, ""),
                        change_cause=annotations.get(CHANGE_CAUSE),
                        images=[c.image for c in containers],
                    ),
                    template=_pod_template(self.apps.api_client, template),
                    annotations=annotations,
                    former=frozenset(
                        n
                        for n in map(
                            _revision_number, annotations.get(REVISION_HISTORY, "").split(",")
                        )
                        if n is not None
                    ),
                )
            )
        return sorted(recorded, key=lambda r: r.revision.revision)

    @activity.defn
    def rollout_history(self, req: DeploymentRef) -> RolloutHistory:
        """The Deployment's revisions, oldest first, like ``kubectl rollout history``."""
        deployment = self._deployment(req.namespace, req.name)
        return RolloutHistory(
            name=req.name,
            current_revision=_revision_number(
                (deployment.metadata.annotations or {}).get(REVISION)
            ),
            revisions=[r.revision for r in self._recorded(deployment)],
        )

    @activity.defn
    def rollout_undo(self, req: RolloutUndo) -> MutationResult:
        """Restore an earlier revision's pod template, like ``kubectl rollout undo``.

        Idempotent by construction: the step's token is stamped on the Deployment, so a retry
        after success recognises its own rollback instead of undoing it again, and a Deployment
        that already runs the target template is left alone.
        """
        target = f"{req.namespace}/{req.name}"
        if not req.token:
            raise ApplicationError(
                f"rollout_undo of {target} was called without an idempotency token; the step "
                "runner must derive one from the workflow id and step",
                type="ProgrammingError",
                non_retryable=True,
            )
        deployment = self._deployment(req.namespace, req.name)
        annotations = dict(deployment.metadata.annotations or {})
        if annotations.get(ROLLED_BACK_BY) == req.token:
            return MutationResult(
                changed=False,
                detail=f"{target} was already rolled back by {req.token}; not rolling back again",
            )
        current = _revision_number(annotations.get(REVISION))
        recorded = self._recorded(deployment)
        goal = self._undo_target(req, recorded, current)
        number = goal.revision.revision
        if _pod_template(self.apps.api_client, deployment.spec.template) == goal.template:
            return MutationResult(
                changed=False, detail=f"{target} already runs the template of revision {number}"
            )
        if req.dry_run:
            return MutationResult(
                changed=False,
                detail=f"would roll back {target} from revision {current} to {number}",
            )
        restored = {k: v for k, v in annotations.items() if k in CONTROLLER_ANNOTATIONS}
        restored |= {k: v for k, v in goal.annotations.items() if k not in CONTROLLER_ANNOTATIONS}
        restored[ROLLED_BACK_BY] = req.token
        patch = [
            # The version read above is a precondition: a concurrent change answers 409 and the
            # retry decides again on fresh state.
            {
                "op": "replace",
                "path": "/metadata/resourceVersion",
                "value": deployment.metadata.resource_version,
            },
            {"op": "replace", "path": "/spec/template", "value": goal.template},
            {"op": "add", "path": "/metadata/annotations", "value": restored},
        ]
        self._call(
            "roll back Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(req.name, req.namespace, patch),
        )
        images = ", ".join(goal.revision.images)
        return MutationResult(
            changed=True,
            detail=f"rolled back {target} from revision {current} to {number} ({images})",
        )

    @staticmethod
    def _undo_target(req: RolloutUndo, recorded: list[_Recorded], current: int | None) -> _Recorded:
        target, wanted = f"{req.namespace}/{req.name}", req.to_revision
        listed = ", ".join(str(r.revision.revision) for r in recorded) or "none"
        if wanted is None:
            older = [r for r in recorded if current is None or r.revision.revision < current]
            if not older:
                raise ApplicationError(
                    f"{target} has no revision before {current} to roll back to (revisions: "
                    f"{listed}); there is nothing to undo",
                    type="NoPreviousRevision",
                    non_retryable=True,
                )
            return older[-1]
        for entry in recorded:
            # A rolled-back-to ReplicaSet keeps its old numbers, so retrying an undo to revision
            # N still finds it after it became N's successor.
            if wanted == entry.revision.revision or wanted in entry.former:
                return entry
        raise ApplicationError(
            f"revision {wanted} is not in the rollout history of {target} (revisions: {listed}); "
            f"`kubectl -n {req.namespace} rollout history deployment {req.name}` lists them",
            type="RevisionNotFound",
            non_retryable=True,
        )

    @activity.defn
    def list_pods(self, req: PodSelector) -> PodList:
        """Pods carrying all the labels, oldest first."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(req.labels.items()))
        pods = self._call(
            "list pods",
            f"{req.namespace} ({selector})",
            lambda: self.core.list_namespaced_pod(req.namespace, label_selector=selector),
        )
        infos = [_pod_info(p) for p in pods.items]
        return PodList(pods=sorted(infos, key=lambda p: (p.created is None, p.created, p.name)))

    @activity.defn
    def delete_pod(self, req: PodDelete) -> MutationResult:
        """Delete a pod; a pod that is already gone is success with nothing changed."""
        from kubernetes.client.exceptions import ApiException

        target = f"{req.namespace}/{req.name}"
        gone = MutationResult(changed=False, detail=f"pod {target} is already gone")
        with _kube("delete pod", target):
            try:
                if req.dry_run:
                    self.core.read_namespaced_pod(req.name, req.namespace)
                    return MutationResult(changed=False, detail=f"would delete pod {target}")
                self.core.delete_namespaced_pod(req.name, req.namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                return gone
        return MutationResult(changed=True, detail=f"deleted pod {target}")

    @activity.defn
    def verify_config(self, req: ConfigRollout) -> ConfigVerification:
        """Whether every pod of the Deployment is ready and stamped with the current config hash.

        Does not raise when pods are stale: the workflow decides whether to wait, retry or fail.
        """
        expected = config_hash(self._config_map(req.namespace, req.config_map).data)
        deployment = self._deployment(req.namespace, req.deployment)
        selector = _selector_text(deployment.spec.selector)
        pods: Any = self._call(
            "list pods",
            f"{req.namespace}/{req.deployment}",
            lambda: self.core.list_namespaced_pod(req.namespace, label_selector=selector),
        )
        # Terminating pods are on their way out; they neither count nor block.
        live = [p for p in pods.items if p.metadata.deletion_timestamp is None]
        infos = [_pod_info(p) for p in live]
        stale = sorted(
            p.name
            for p in infos
            if not (p.phase == "Running" and p.ready and p.annotations.get(CONFIG_HASH) == expected)
        )
        current = len(infos) - len(stale)
        desired = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        return ConfigVerification(
            ok=not stale and current >= desired,
            expected_hash=expected,
            pods_total=len(infos),
            pods_current=current,
            stale=stale,
        )
