"""Kubernetes activities: read and change Astra's config and Deployments, idempotently.

The official ``kubernetes`` client is synchronous, so these are sync activities and the worker runs
them on a thread-pool executor. Each mutating activity reads the current state first, acts only if
it differs from the goal, and reports what it did (or in dry-run what it would do). Restarts are
stamped with the step's idempotency token in the pod template, so a retried restart recognises its
own earlier work instead of rolling the pods twice.

Every API call the activities make is in this module (``tests/test_deploy_manifests.py`` checks
the worker's RBAC Role against them). Their inputs and results are in ``kube_models``, the error
mapping in ``kube_errors``, and the ``kubectl rollout history``/``undo`` logic in
``rollout_history``.

The client is imported where it is used, not when this module loads: the workflows import this
module for its activity names (and so does the CLI, through the catalogue), and the
``kubernetes`` package takes a second to import.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.heartbeats import beat
from activities.kube_annotations import (
    CONFIG_HASH,
    CONFIG_PATCHED_BY,
    RESTARTED_BY,
    ROLLED_BACK_BY,
    config_hash,
)
from activities.kube_errors import kube_errors
from activities.kube_models import (
    ConfigPatch,
    ConfigRef,
    ConfigRollout,
    ConfigValue,
    ConfigVerification,
    DeploymentRef,
    PodDelete,
    PodInfo,
    PodList,
    PodSelector,
    RolloutHistory,
    RolloutRestart,
    RolloutStatus,
    RolloutUndo,
    RolloutWait,
    SecretReaders,
    SecretRef,
)
from activities.mutation import MutationResult
from activities.rollout_history import (
    RecordedRevision,
    current_revision,
    history_of,
    pod_template,
    recorded_revisions,
    undo_patch,
    undo_target,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_T = TypeVar("_T")


# ----- helpers --------------------------------------------------------------------------------


def unauthenticated_client(url: str) -> ApiClient:
    """A client for an API server at ``url`` that takes no credentials (the sandbox's): plain
    HTTP, ignoring any proxy the environment sets for real clusters."""
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration(host=url)
    configuration.proxy = None
    return ApiClient(configuration)


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


def _reads_secret(deployment: Any, secret: str) -> bool:
    """Whether the Deployment's pods read ``secret``: from ``envFrom``, an env var or a volume."""
    spec = deployment.spec.template.spec
    for container in [*(spec.containers or []), *(spec.init_containers or [])]:
        for source in container.env_from or []:
            if source.secret_ref is not None and source.secret_ref.name == secret:
                return True
        for env in container.env or []:
            ref = env.value_from.secret_key_ref if env.value_from is not None else None
            if ref is not None and ref.name == secret:
                return True
    return any(
        volume.secret is not None and volume.secret.secret_name == secret
        for volume in spec.volumes or []
    )


def _require_token(activity_name: str, target: str, token: str) -> None:
    if not token:
        raise ApplicationError(
            f"{activity_name} of {target} was called without an idempotency token; the step "
            "runner must derive one from the workflow id and step",
            type="ProgrammingError",
            non_retryable=True,
        )


# ----- activities -----------------------------------------------------------------------------


class KubernetesActivities:
    """Astra's Kubernetes side effects, on an injected client (tests pass the sandbox's)."""

    def __init__(self, api: ApiClient) -> None:
        from kubernetes.client import AppsV1Api, CoreV1Api

        self.core = CoreV1Api(api)
        self.apps = AppsV1Api(api)

    def _call(self, action: str, target: str, fn: Callable[[], _T]) -> _T:
        with kube_errors(action, target):
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

    def read_deployment(self, namespace: str, name: str) -> Any:
        """A Deployment as the client returns it (for the activities of other systems that find
        what a service uses through it: its TLS Secret, its endpoint)."""
        return self._deployment(namespace, name)

    def secret_object(
        self, namespace: str, name: str
    ) -> tuple[dict[str, str], str, dict[str, str]]:
        """A Secret's values, decoded, its resourceVersion and its annotations.

        Not an activity, nor ever returned by one: the activities of the systems a Secret
        configures (Vault, TLS) call it and keep the values out of every run's history.
        """
        secret: Any = self._call(
            "read Secret",
            f"{namespace}/{name}",
            lambda: self.core.read_namespaced_secret(name, namespace),
        )
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        annotations = dict(secret.metadata.annotations or {})
        return data, secret.metadata.resource_version, annotations

    def secret_data(self, namespace: str, name: str) -> tuple[dict[str, str], str]:
        """A Secret's values, decoded, and its resourceVersion (``secret_object``)."""
        data, resource_version, _ = self.secret_object(namespace, name)
        return data, resource_version

    def put_secret_data(
        self,
        namespace: str,
        name: str,
        values: dict[str, str],
        resource_version: str,
        annotations: dict[str, str] | None = None,
    ) -> None:
        """Set some keys (and annotations) of a Secret, if it is still at ``resource_version``
        (a write in between answers 409, and the caller's retry compares again on fresh state).
        Not an activity: its argument carries the values."""
        metadata: dict[str, Any] = {"resourceVersion": resource_version}
        if annotations:
            metadata["annotations"] = annotations
        patch = {
            "metadata": metadata,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        }
        self._call(
            "patch Secret",
            f"{namespace}/{name}",
            lambda: self.core.patch_namespaced_secret(name, namespace, patch),
        )

    @activity.defn
    def secret_readers(self, req: SecretRef) -> SecretReaders:
        """The Deployments of the namespace whose pods read the Secret."""
        listed: Any = self._call(
            "list Deployments",
            req.namespace,
            lambda: self.apps.list_namespaced_deployment(req.namespace),
        )
        return SecretReaders(
            secret=req.name,
            deployments=sorted(d.metadata.name for d in listed.items if _reads_secret(d, req.name)),
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
        _require_token("rollout_restart", target, req.token)
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
            beat(status.summary())
            # Sleeping on the cancellation event lets a cancelled runbook stop waiting at once.
            activity.wait_for_cancelled_sync(timeout=req.poll_seconds)
            if activity.is_cancelled():
                raise CancelledError(f"waiting for the rollout of {target} was cancelled")

    def _revisions(self, deployment: Any) -> list[RecordedRevision]:
        """The Deployment's revisions, oldest first, from the ReplicaSets its selector matches."""
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        selector = _selector_text(deployment.spec.selector)
        listed: Any = self._call(
            "list ReplicaSets",
            f"{namespace}/{name}",
            lambda: self.apps.list_namespaced_replica_set(namespace, label_selector=selector),
        )
        return recorded_revisions(self.apps.api_client, deployment, listed.items)

    @activity.defn
    def rollout_history(self, req: DeploymentRef) -> RolloutHistory:
        """The Deployment's revisions, oldest first, like ``kubectl rollout history``."""
        deployment = self._deployment(req.namespace, req.name)
        return history_of(req.name, deployment, self._revisions(deployment))

    @activity.defn
    def rollout_undo(self, req: RolloutUndo) -> MutationResult:
        """Restore an earlier revision's pod template, like ``kubectl rollout undo``.

        Idempotent by construction: the step's token is stamped on the Deployment, so a retry
        after success recognises its own rollback instead of undoing it again, and a Deployment
        that already runs the target template is left alone.
        """
        target = f"{req.namespace}/{req.name}"
        _require_token("rollout_undo", target, req.token)
        deployment = self._deployment(req.namespace, req.name)
        if (deployment.metadata.annotations or {}).get(ROLLED_BACK_BY) == req.token:
            return MutationResult(
                changed=False,
                detail=f"{target} was already rolled back by {req.token}; not rolling back again",
            )
        current = current_revision(deployment)
        goal = undo_target(req, self._revisions(deployment), current)
        number = goal.revision.revision
        template = pod_template(self.apps.api_client, deployment.spec.template)
        if template == goal.template:
            return MutationResult(
                changed=False, detail=f"{target} already runs the template of revision {number}"
            )
        if req.dry_run:
            return MutationResult(
                changed=False,
                detail=f"would roll back {target} from revision {current} to {number}",
            )
        patch = undo_patch(deployment, goal, req.token)
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
        with kube_errors("delete pod", target):
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
