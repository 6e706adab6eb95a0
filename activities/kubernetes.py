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
    BLUE_GREEN_OF,
    CANARY_OF,
    CHANGE_CAUSE,
    CONFIG_HASH,
    CONFIG_PATCHED_BY,
    IMAGE_SET_BY,
    RESTARTED_BY,
    ROLLED_BACK_BY,
    TEMPLATE_HASH_LABEL,
    TRACK_LABEL,
    config_hash,
)
from activities.kube_errors import kube_errors
from activities.kube_models import (
    CanaryRef,
    CanaryScale,
    ConfigPatch,
    ConfigRef,
    ConfigRollout,
    ConfigValue,
    ConfigVerification,
    DeploymentRef,
    DeploymentScale,
    ImageChange,
    ImageCheck,
    ImageVerification,
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
    ServicePoint,
    ServiceRef,
    SlotDeploy,
    Slots,
    canary_name,
    green_name,
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
    HTTP, ignoring any proxy the environment sets for real clusters; its requests time out
    (``kube_client``)."""
    from kubernetes.client import Configuration

    from activities.kube_client import BoundedApiClient

    configuration = Configuration(host=url)
    configuration.proxy = None
    return BoundedApiClient(configuration)


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
        image=_image(deployment),
    )


def _image(deployment: Any) -> str:
    """The image of the pod template's first container (the one a release changes)."""
    return str(deployment.spec.template.spec.containers[0].image)


def _image_template(deployment: Any, image: str) -> dict[str, Any]:
    """The pod template patch that puts the first container (the one :func:`_image` reads) on
    ``image``, matched by its name as a strategic merge needs."""
    container = deployment.spec.template.spec.containers[0].name
    return {"spec": {"containers": [{"name": container, "image": image}]}}


def _owned(pod: Any, deployment: str) -> bool:
    """Whether a pod belongs to ``deployment``'s own ReplicaSets (named ``<deployment>-<hash>``),
    not to another Deployment whose selector overlaps, as a canary's does the stable's."""
    pod_hash = (pod.metadata.labels or {}).get(TEMPLATE_HASH_LABEL)
    return bool(pod_hash) and any(
        ref.kind == "ReplicaSet" and ref.name == f"{deployment}-{pod_hash}"
        for ref in pod.metadata.owner_references or []
    )


def _slot_body(source: Any, req: SlotDeploy, api: Any) -> Any:
    """The other colour of ``source``: its pod template on the new image, labelled (and
    selected) ``app: <name>``, so the Service that selects ``source``'s pods does not select
    these until it is switched; marked as ours."""
    body: dict[str, Any] = api.sanitize_for_serialization(
        {"spec": {"template": source.spec.template}}
    )
    spec = body["spec"]
    spec["replicas"] = req.replicas
    spec["selector"] = {"matchLabels": {"app": req.name}}
    spec["template"].setdefault("metadata", {}).setdefault("labels", {})["app"] = req.name
    spec["template"]["spec"]["containers"][0]["image"] = req.image
    body["metadata"] = {
        "name": req.name,
        "namespace": req.namespace,
        "labels": dict(source.metadata.labels or {}),
        "annotations": {BLUE_GREEN_OF: req.service, CHANGE_CAUSE: f"green of {req.image}"},
    }
    return body


def _canary_body(stable: Any, name: str, image: str, replicas: int, api: Any) -> Any:
    """The canary of ``stable``: its pod template on ``image``, its labels plus ``track:
    canary`` (so the Service that selects the stable pods selects these too), marked as ours."""
    body: dict[str, Any] = api.sanitize_for_serialization(
        {"spec": {"selector": stable.spec.selector, "template": stable.spec.template}}
    )
    spec = body["spec"]
    spec["replicas"] = replicas
    spec["selector"].setdefault("matchLabels", {})[TRACK_LABEL] = "canary"
    template_meta = spec["template"].setdefault("metadata", {})
    template_meta.setdefault("labels", {})[TRACK_LABEL] = "canary"
    spec["template"]["spec"]["containers"][0]["image"] = image
    body["metadata"] = {
        "name": name,
        "namespace": stable.metadata.namespace,
        "labels": dict(stable.metadata.labels or {}),
        "annotations": {CANARY_OF: stable.metadata.name, CHANGE_CAUSE: f"canary of {image}"},
    }
    return body


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

    def _canary(self, namespace: str, stable: str, name: str) -> Any | None:
        """The canary Deployment if there is one; refuses one astra-ops did not make."""
        target = f"{namespace}/{name}"
        found = self._maybe_deployment(namespace, name)
        if found is None:
            return None
        if (found.metadata.annotations or {}).get(CANARY_OF) != stable:
            raise ApplicationError(
                f"{target} exists but is not a canary astra-ops made of {stable} (no "
                f"{CANARY_OF}={stable} annotation); astra-ops will not change it: rename or "
                "delete it, then start again",
                type="NotOurs",
                non_retryable=True,
            )
        return found

    @activity.defn
    def scale_canary(self, req: CanaryScale) -> MutationResult:
        """Run ``replicas`` pods of the new image beside the stable ones: create the canary
        Deployment from the stable one's template, or bring it to that image and count."""
        name = canary_name(req.stable)
        target = f"{req.namespace}/{name}"
        _require_token("scale_canary", target, req.token)
        stable = self._deployment(req.namespace, req.stable)
        canary = self._canary(req.namespace, req.stable, name)
        beside = int(stable.spec.replicas or 0)
        share = req.replicas / (req.replicas + beside) if req.replicas + beside else 0.0
        goal = (
            f"{req.replicas} pod(s) of {req.image} beside {beside} stable ({share:.0%} of the pods)"
        )
        if (
            canary is not None
            and _image(canary) == req.image
            and canary.spec.replicas == (req.replicas)
        ):
            return MutationResult(changed=False, detail=f"{target} already runs {goal}")
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would run {goal} as {target}")
        if canary is None:
            body = _canary_body(stable, name, req.image, req.replicas, self.apps.api_client)
            self._call(
                "create Deployment",
                target,
                lambda: self.apps.create_namespaced_deployment(req.namespace, body),
            )
            return MutationResult(changed=True, detail=f"created {target}: {goal}")
        patch = {"spec": {"replicas": req.replicas, "template": _image_template(canary, req.image)}}
        self._call(
            "scale Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(name, req.namespace, patch),
        )
        return MutationResult(
            changed=True,
            detail=f"{target}: {canary.spec.replicas} pod(s) of {_image(canary)} -> {goal}",
        )

    @activity.defn
    def remove_canary(self, req: CanaryRef) -> MutationResult:
        """Delete the canary Deployment (its pods go with it); none is success, unchanged."""
        from kubernetes.client.exceptions import ApiException

        name = canary_name(req.stable)
        target = f"{req.namespace}/{name}"
        if self._canary(req.namespace, req.stable, name) is None:
            return MutationResult(changed=False, detail=f"{target} is already gone")
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would delete {target}")
        with kube_errors("delete Deployment", target):
            try:
                self.apps.delete_namespaced_deployment(name, req.namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                return MutationResult(changed=False, detail=f"{target} is already gone")
        return MutationResult(changed=True, detail=f"deleted {target} and its pods")

    @activity.defn
    def set_image(self, req: ImageChange) -> MutationResult:
        """Roll the Deployment's first container onto ``image`` (a no-op when it runs it)."""
        target = f"{req.namespace}/{req.name}"
        _require_token("set_image", target, req.token)
        deployment = self._deployment(req.namespace, req.name)
        current = _image(deployment)
        if current == req.image:
            return MutationResult(changed=False, detail=f"{target} already runs {req.image}")
        if req.expected is not None and current != req.expected:
            raise ApplicationError(
                f"{target} runs {current}, not {req.expected} as this run left it: someone "
                f"changed it since; astra-ops leaves it to them. Check "
                f"`kubectl -n {req.namespace} rollout history deployment {req.name}`",
                type="ImageChangedMeanwhile",
                non_retryable=True,
            )
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would roll {target} onto {req.image}")
        patch = {
            "metadata": {
                "annotations": {
                    IMAGE_SET_BY: req.token,
                    CHANGE_CAUSE: f"astra-ops: {current} -> {req.image}",
                }
            },
            "spec": {"template": _image_template(deployment, req.image)},
        }
        self._call(
            "change image of Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(req.name, req.namespace, patch),
        )
        return MutationResult(changed=True, detail=f"{target}: {current} -> {req.image}")

    @activity.defn
    def verify_image(self, req: ImageCheck) -> ImageVerification:
        """Whether every pod the Deployment owns (not a canary's beside it) is ready on the
        image, and there are as many as it wants. Does not raise: the workflow decides."""
        deployment = self._deployment(req.namespace, req.name)
        selector = _selector_text(deployment.spec.selector)
        pods: Any = self._call(
            "list pods",
            f"{req.namespace}/{req.name}",
            lambda: self.core.list_namespaced_pod(req.namespace, label_selector=selector),
        )
        live = [
            p for p in pods.items if p.metadata.deletion_timestamp is None and _owned(p, req.name)
        ]
        stale = sorted(
            p.metadata.name
            for p in live
            if p.spec.containers[0].image != req.image or not _pod_info(p).ready
        )
        desired = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        current = len(live) - len(stale)
        return ImageVerification(
            ok=not stale and current >= desired,
            image=req.image,
            pods_total=len(live),
            pods_current=current,
            stale=stale,
        )

    @activity.defn
    def deployment_pods(self, req: DeploymentRef) -> PodList:
        """The pods a Deployment owns (not those of another whose selector overlaps), oldest
        first; none when it does not exist: whose work a release's analysis measures."""
        target = f"{req.namespace}/{req.name}"
        deployment = self._maybe_deployment(req.namespace, req.name)
        if deployment is None:
            return PodList(pods=[])
        selector = _selector_text(deployment.spec.selector)
        pods: Any = self._call(
            "list pods",
            target,
            lambda: self.core.list_namespaced_pod(req.namespace, label_selector=selector),
        )
        infos = [_pod_info(p) for p in pods.items if _owned(p, req.name)]
        return PodList(pods=sorted(infos, key=lambda p: (p.created is None, p.created, p.name)))

    def _service(self, namespace: str, name: str) -> Any:
        return self._call(
            "read Service",
            f"{namespace}/{name}",
            lambda: self.core.read_namespaced_service(name, namespace),
        )

    def _maybe_deployment(self, namespace: str, name: str) -> Any | None:
        from kubernetes.client.exceptions import ApiException

        with kube_errors("read Deployment", f"{namespace}/{name}"):
            try:
                return self.apps.read_namespaced_deployment(name, namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                return None

    @activity.defn
    def read_slots(self, req: ServiceRef) -> Slots:
        """Which of the service's Deployments (blue: named like it; green: ``-green``) its
        Service selects now, and the other."""
        target = f"{req.namespace}/{req.name}"
        selector = dict(self._service(req.namespace, req.name).spec.selector or {})
        found = {
            name: self._maybe_deployment(req.namespace, name)
            for name in (req.name, green_name(req.name))
        }
        selected = [
            name
            for name, deployment in found.items()
            if deployment is not None
            and selector
            and selector.items() <= (deployment.spec.template.metadata.labels or {}).items()
        ]
        if len(selected) != 1:
            which = " and ".join(selected) or f"neither {' nor '.join(found)}"
            raise ApplicationError(
                f"Service {target} (selector {selector}) selects the pods of {which}; a "
                "blue/green release needs it to select exactly one of them. Point it at the "
                "live one by hand, then start again",
                type="NoLiveSlot",
                non_retryable=True,
            )
        (live,) = selected
        (idle,) = [name for name in found if name != live]
        return Slots(service=req.name, live=live, idle=idle, idle_exists=found[idle] is not None)

    @activity.defn
    def deploy_slot(self, req: SlotDeploy) -> MutationResult:
        """Bring the idle colour up on the new image: create it from the live Deployment's
        template (labelled ``app: <its name>``, so the Service does not select it yet), or bring
        the one kept from the last release to the image and count."""
        target = f"{req.namespace}/{req.name}"
        _require_token("deploy_slot", target, req.token)
        existing = self._maybe_deployment(req.namespace, req.name)
        goal = f"{req.replicas} pod(s) of {req.image}"
        if existing is None and req.name != green_name(req.service):
            raise ApplicationError(
                f"{target} does not exist; only {green_name(req.service)} is created by astra-ops",
                type="NotOurs",
                non_retryable=True,
            )
        if (
            existing is not None
            and req.name == green_name(req.service)
            and (existing.metadata.annotations or {}).get(BLUE_GREEN_OF) != req.service
        ):
            raise ApplicationError(
                f"{target} exists but astra-ops did not make it (no {BLUE_GREEN_OF}="
                f"{req.service} annotation); rename or delete it, then start again",
                type="NotOurs",
                non_retryable=True,
            )
        if (
            existing is not None
            and _image(existing) == req.image
            and existing.spec.replicas == req.replicas
        ):
            return MutationResult(changed=False, detail=f"{target} already runs {goal}")
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would run {goal} as {target}")
        if existing is None:
            source = self._deployment(req.namespace, req.source)
            body = _slot_body(source, req, self.apps.api_client)
            self._call(
                "create Deployment",
                target,
                lambda: self.apps.create_namespaced_deployment(req.namespace, body),
            )
            return MutationResult(changed=True, detail=f"created {target}: {goal}")
        patch = {
            "metadata": {"annotations": {IMAGE_SET_BY: req.token}},
            "spec": {"replicas": req.replicas, "template": _image_template(existing, req.image)},
        }
        self._call(
            "change image of Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(req.name, req.namespace, patch),
        )
        return MutationResult(changed=True, detail=f"{target} -> {goal}")

    @activity.defn
    def point_service(self, req: ServicePoint) -> MutationResult:
        """Send the Service's work to ``req.deployment``'s pods: its selector becomes that
        Deployment's (replaced whole, on the version read, so a concurrent edit is retried)."""
        target = f"{req.namespace}/{req.service}"
        _require_token("point_service", target, req.token)
        service = self._service(req.namespace, req.service)
        selector = dict(service.spec.selector or {})
        goal = dict(self._deployment(req.namespace, req.deployment).spec.selector.match_labels)
        if selector == goal:
            return MutationResult(
                changed=False, detail=f"Service {target} already selects {req.deployment}"
            )
        if req.expected is not None:
            expected = self._deployment(req.namespace, req.expected).spec.selector.match_labels
            if selector != dict(expected):
                raise ApplicationError(
                    f"Service {target} selects {selector}, not {req.expected}'s pods as this "
                    "run left it: someone switched it since; astra-ops leaves it to them",
                    type="ServiceChangedMeanwhile",
                    non_retryable=True,
                )
        if req.dry_run:
            return MutationResult(
                changed=False, detail=f"would point Service {target} at {req.deployment}"
            )
        service.spec.selector = goal
        self._call(
            "switch Service",
            target,
            lambda: self.core.replace_namespaced_service(req.service, req.namespace, service),
        )
        return MutationResult(
            changed=True, detail=f"Service {target}: {selector} -> {goal} ({req.deployment})"
        )

    @activity.defn
    def scale_deployment(self, req: DeploymentScale) -> MutationResult:
        """Set a Deployment's replicas (the idle colour goes to 0 and is kept for next time);
        one that does not exist has no pods to scale."""
        target = f"{req.namespace}/{req.name}"
        deployment = self._maybe_deployment(req.namespace, req.name)
        if deployment is None:
            return MutationResult(changed=False, detail=f"{target} does not exist")
        if deployment.spec.replicas == req.replicas:
            return MutationResult(changed=False, detail=f"{target} already has {req.replicas}")
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would scale {target} to {req.replicas}")
        patch = {"spec": {"replicas": req.replicas}}
        self._call(
            "scale Deployment",
            target,
            lambda: self.apps.patch_namespaced_deployment(req.name, req.namespace, patch),
        )
        return MutationResult(
            changed=True,
            detail=f"scaled {target} from {deployment.spec.replicas} to {req.replicas}",
        )
