"""A Deployment's rollout history, read and undone the way ``kubectl rollout history`` and
``kubectl rollout undo`` do it.

There is no API for either: kubectl reads the Deployment's ReplicaSets, whose
``deployment.kubernetes.io/revision`` annotations number the pod templates the Deployment has
run, and undoes a rollout by writing an older ReplicaSet's template back into the Deployment. This
module is that logic, on objects the activities have already read (``activities/kubernetes.py``
makes every API call), so it can be read without the client's plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from temporalio.exceptions import ApplicationError

from activities.kube_annotations import (
    CHANGE_CAUSE,
    CONTROLLER_ANNOTATIONS,
    REVISION,
    REVISION_HISTORY,
    ROLLED_BACK_BY,
    TEMPLATE_HASH_LABEL,
)
from activities.kube_models import Revision, RolloutHistory, RolloutUndo

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


@dataclass(frozen=True)
class RecordedRevision:
    """A revision with what undoing to it needs: its template and annotations, its old numbers."""

    revision: Revision
    template: dict[str, Any]
    annotations: dict[str, str]
    former: frozenset[int]


def revision_number(text: str | None) -> int | None:
    """A revision annotation's number; None when the annotation is absent or not a number."""
    return int(text) if text and text.isdigit() else None


def current_revision(deployment: Any) -> int | None:
    """The revision the Deployment says it runs."""
    return revision_number((deployment.metadata.annotations or {}).get(REVISION))


def pod_template(api: ApiClient, template: Any) -> dict[str, Any]:
    """A pod template as JSON, without the ``pod-template-hash`` label its ReplicaSet adds."""
    body: dict[str, Any] = api.sanitize_for_serialization(template)  # type: ignore[no-untyped-call]
    labels = (body.get("metadata") or {}).get("labels")
    if labels:
        labels.pop(TEMPLATE_HASH_LABEL, None)
    return body


def recorded_revisions(
    api: ApiClient, deployment: Any, replica_sets: list[Any]
) -> list[RecordedRevision]:
    """The Deployment's revisions, oldest first: those of its ReplicaSets that carry a revision.

    ``replica_sets`` are the ones its selector matches; only those it controls count.
    """
    recorded = []
    for replica_set in replica_sets:
        meta = replica_set.metadata
        owned = any(
            ref.controller and ref.uid == deployment.metadata.uid
            for ref in meta.owner_references or []
        )
        annotations = dict(meta.annotations or {})
        number = revision_number(annotations.get(REVISION))
        if not owned or number is None:
            continue
        template = replica_set.spec.template
        containers = (template.spec.containers if template.spec is not None else None) or []
        recorded.append(
            RecordedRevision(
                revision=Revision(
                    revision=number,
                    replica_set=meta.name,
                    created=meta.creation_timestamp,
                    template_hash=(meta.labels or {}).get(TEMPLATE_HASH_LABEL, ""),
                    change_cause=annotations.get(CHANGE_CAUSE),
                    images=[c.image for c in containers],
                ),
                template=pod_template(api, template),
                annotations=annotations,
                former=frozenset(
                    n
                    for n in map(revision_number, annotations.get(REVISION_HISTORY, "").split(","))
                    if n is not None
                ),
            )
        )
    return sorted(recorded, key=lambda r: r.revision.revision)


def history_of(name: str, deployment: Any, recorded: list[RecordedRevision]) -> RolloutHistory:
    """What ``kubectl rollout history`` lists."""
    return RolloutHistory(
        name=name,
        current_revision=current_revision(deployment),
        revisions=[r.revision for r in recorded],
    )


def undo_target(
    req: RolloutUndo, recorded: list[RecordedRevision], current: int | None
) -> RecordedRevision:
    """The revision ``kubectl rollout undo`` goes back to: ``to_revision``, or the one before
    ``current``; fails, non-retryably, when there is none."""
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


def undo_patch(deployment: Any, goal: RecordedRevision, token: str) -> list[dict[str, Any]]:
    """The JSON patch that puts ``goal``'s template back, stamped with the step's ``token``.

    Like kubectl, it keeps the Deployment's own controller annotations and takes every other
    annotation from the ReplicaSet rolled back to.
    """
    annotations = dict(deployment.metadata.annotations or {})
    restored = {k: v for k, v in annotations.items() if k in CONTROLLER_ANNOTATIONS}
    restored |= {k: v for k, v in goal.annotations.items() if k not in CONTROLLER_ANNOTATIONS}
    restored[ROLLED_BACK_BY] = token
    return [
        # The version read is a precondition: a concurrent change answers 409 and the retry
        # decides again on fresh state.
        {
            "op": "replace",
            "path": "/metadata/resourceVersion",
            "value": deployment.metadata.resource_version,
        },
        {"op": "replace", "path": "/spec/template", "value": goal.template},
        {"op": "add", "path": "/metadata/annotations", "value": restored},
    ]
