"""What an incident learns from the access policy and the runbook catalogue, and the one file it
writes: the postmortem draft.

Workflow code cannot read files, so these activities read the policy and return the answer into
history: an incident checks every action against what it was told, and a policy edit never
changes how an old history replays. A runbook's request is built here by the same function the
CLI and the API use (``starters.runbook_cards.runbook_request``): the policy's defaults under the
parameters, the model's validation and the policy's bounds over them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, JsonValue
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.access import Trust
from activities.postmortem import render
from runtime.access import AccessPolicy, AccessPolicyError, PolicyFile
from starters.run_views import RunError
from starters.runbook_cards import CALLER_FIELDS, runbook_request, runbook_spec
from workflows.incident_models import IncidentState


class IncidentAdmissionRequest(BaseModel):
    components: list[str] = []
    rotation_label: str | None = None
    """The ``rotation`` label of the alert that opened it, if any."""
    rotation: str | None = None
    """The rotation the incident already has (a continued run keeps it)."""


class EscalationLevel(BaseModel):
    target: str
    person: str


class RunbookChoice(BaseModel):
    on_alert: Literal["start", "propose"]
    starters: list[str]
    """Who may start it by hand."""


class IncidentAdmission(BaseModel):
    """The policy as it applies to one incident, and the keys that prove who acts."""

    trust: Trust
    rotation: str
    rotation_title: str
    escalation: list[EscalationLevel]
    ack_timeout_seconds: float
    responders: list[str]
    """Who may act on this incident."""
    openers: list[str]
    """Who may open an incident by hand."""
    alert_sender: str
    people: list[str]
    """Everyone the policy knows: who may own an action item."""
    commander_request_interval_seconds: float
    sustained_sev1_seconds: float
    product_owner: str | None
    security: list[str]
    item_reminder_seconds: float
    continue_as_new_after_events: int
    runbooks: dict[str, RunbookChoice]


class RunbookPlanRequest(BaseModel):
    incident_id: str
    """The run that asks: an incident, or the daily certificate scan (``workflows/tls_scan.py``)."""
    runbook: str
    requester: str
    reason: str = ""
    params: dict[str, str] = {}
    """A person's ``--param``s; or, for an alert, empty and ``labels`` given."""
    labels: dict[str, str] | None = None
    """The alert's labels: the runbook's required parameters are read from them."""


class RunbookPlan(BaseModel):
    """A start the incident may make, or why not."""

    runbook: str
    refused: str | None = None
    workflow_id: str = ""
    request: dict[str, JsonValue] = {}
    """The runbook's request, validated, as JSON (the child decodes it into its own model)."""
    title: str = ""
    severity: str = ""
    subject: str = ""
    on_alert: Literal["start", "propose"] = "propose"
    params: dict[str, str] = {}
    """What a person would pass as ``--param`` to start it."""
    choose: list[str] = []
    """Required parameters the alert does not give: only a person can start it, choosing them
    (``params`` holds ``<name>`` for each)."""


class PostmortemRequest(BaseModel):
    state: IncidentState
    resolution: int = 1
    """Which resolution of the incident this draft is for (a reopened one is resolved again)."""


class PostmortemWritten(BaseModel):
    path: str


class IncidentActivities:
    def __init__(self, policy_path: Path, trust: Trust, postmortem_dir: Path) -> None:
        self.policy_path = policy_path
        self.trust = trust
        self.postmortem_dir = postmortem_dir
        self._policy_file = PolicyFile(policy_path)

    def _policy(self) -> AccessPolicy:
        try:
            return self._policy_file.read()
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None

    @activity.defn
    async def admit_incident(self, req: IncidentAdmissionRequest) -> IncidentAdmission:
        """The incident's rotation, escalation, responders and timings, as the policy says now."""
        policy = self._policy()
        try:
            incidents = policy.incident_policy()
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        rotation = (
            req.rotation
            if req.rotation in incidents.rotations
            else incidents.rotation_for(req.components, req.rotation_label)
        )
        owner = incidents.rotations[rotation]
        return IncidentAdmission(
            trust=self.trust,
            rotation=rotation,
            rotation_title=policy.groups[rotation].title or rotation,
            escalation=[
                EscalationLevel(target=target, person=person)
                for target, person in owner.escalation.levels()
            ],
            ack_timeout_seconds=owner.ack_timeout_seconds,
            responders=policy.incident_responders(rotation),
            openers=policy.members(incidents.open),
            alert_sender=incidents.alert_sender,
            people=policy.everyone(),
            commander_request_interval_seconds=incidents.commander_request_interval_seconds,
            sustained_sev1_seconds=incidents.sustained_sev1_seconds,
            product_owner=incidents.product_owner,
            security=incidents.security,
            item_reminder_seconds=incidents.item_reminder_seconds,
            continue_as_new_after_events=incidents.continue_as_new_after_events,
            runbooks={
                name: RunbookChoice(on_alert=access.on_alert, starters=policy.members(access.start))
                for name, access in policy.runbooks.items()
            },
        )

    @activity.defn
    async def plan_runbook(self, req: RunbookPlanRequest) -> RunbookPlan:
        """The request a runbook started for the incident carries, or why it cannot start.

        From an alert, the runbook's required parameters (its subject) come from the alert's
        labels of the same names, and nothing else does: a scrape's ``namespace`` or ``job``
        label must not steer a runbook. Those the labels lack are left to a person.
        """
        try:
            spec = runbook_spec(req.runbook)
            access = self._policy().runbook(req.runbook)
        except (RunError, AccessPolicyError) as err:
            return RunbookPlan(runbook=req.runbook, refused=str(err))
        params = dict(req.params)
        if req.labels is not None:
            required = [
                name
                for name, field in spec.request.model_fields.items()
                if field.is_required() and name not in CALLER_FIELDS
            ]
            missing = [name for name in required if name not in req.labels]
            if missing:
                # A choice the alert cannot make (Shard Scaling's new count): a person makes it.
                return RunbookPlan(
                    runbook=req.runbook,
                    title=spec.title,
                    severity=spec.severity,
                    params={n: req.labels.get(n, f"<{n}>") for n in required},
                    choose=missing,
                )
            params = {name: req.labels[name] for name in required}
        try:
            request = runbook_request(
                spec, access, params, requester=req.requester, reason=req.reason
            )
        except RunError as err:
            return RunbookPlan(runbook=req.runbook, refused=err.message, params=params)
        return RunbookPlan(
            runbook=req.runbook,
            workflow_id=spec.workflow_id(request),
            request=request.model_dump(mode="json"),
            title=spec.title,
            severity=spec.severity,
            subject=spec.subject(request),
            on_alert=access.on_alert,
            params=params,
        )

    @activity.defn
    async def write_postmortem(self, req: PostmortemRequest) -> PostmortemWritten:
        """Write the draft where the settings say; the same incident and resolution always
        write the same file, so a retry replaces the draft with itself."""
        name = req.state.incident_id.replace("/", "-")
        if req.resolution > 1:
            name += f"-resolution-{req.resolution}"
        path = self.postmortem_dir / f"{name}.md"
        try:
            self.postmortem_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".md.partial")
            partial.write_text(render(req.state))
            os.replace(partial, path)
        except OSError as err:
            raise ApplicationError(
                f"cannot write the postmortem draft to {path}: {err.strerror}; set "
                "ASTRA_OPS_POSTMORTEM_DIR to a writable directory",
                type="PostmortemNotWritten",
            ) from None
        return PostmortemWritten(path=str(path))
