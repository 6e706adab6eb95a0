"""What the incident workflow is opened with, what people and Alertmanager send it, and what it
shows: the contract between the workflow, the API, the CLI and the alert intake.

The seed's lifecycle is Detect -> Triage -> Contain -> Remediate -> Postmortem -> Remediation
Review; its severities are SEV1 "Platform down or data loss risk", SEV2 "Major degradation", SEV3
"Minor / isolated". New fields get defaults, so histories of incidents opened before a field
existed still decode.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from runtime.identity import Signed
from workflows.models import PersonName, StepStatus, Text

INCIDENT_WORKFLOW = "incident"
"""The workflow type; its id is ``incident/...``."""
ALERTS_SIGNAL = "alerts"
"""Later notifications of the group (more alerts, ``resolved``): an ``AlertNotification``."""
STATE_QUERY = "state"
"""The ``IncidentState``."""
INCIDENT_PREFIX = "incident/"
MAX_ALERTS = 200
"""Alerts kept per incident (the most recent); Alertmanager may send thousands for one group."""
MAX_LABELS = 64
Label = Annotated[str, Field(max_length=1_024)]


class Severity(StrEnum):
    SEV1 = "SEV1"
    SEV2 = "SEV2"
    SEV3 = "SEV3"

    @property
    def meaning(self) -> str:
        return SEVERITY_MEANING[self]


SEVERITY_MEANING = {
    Severity.SEV1: "Platform down or data loss risk",
    Severity.SEV2: "Major degradation",
    Severity.SEV3: "Minor / isolated",
}


class Stage(StrEnum):
    """The seed's order; an incident only moves forward, except ``reopen`` (back to triage)."""

    DETECT = "detect"
    TRIAGE = "triage"
    CONTAIN = "contain"
    REMEDIATE = "remediate"
    POSTMORTEM = "postmortem"
    REVIEW = "remediation_review"
    CLOSED = "closed"


def incident_id_for_group(group_key: str) -> str:
    """One Alertmanager group, one incident: the workflow id derives from the group key, so
    repeats, retries and concurrent deliveries of the group reach the same workflow."""
    return INCIDENT_PREFIX + hashlib.sha256(group_key.encode()).hexdigest()[:20]


class Alert(BaseModel):
    """One alert of an Alertmanager webhook notification (payload version 4)."""

    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    fingerprint: Annotated[str, Field(min_length=1, max_length=128)]
    labels: Annotated[dict[Label, Label], Field(max_length=MAX_LABELS)]
    annotations: Annotated[dict[Label, Label], Field(max_length=MAX_LABELS)] = {}
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    generator_url: Annotated[str, Field(max_length=2_048)] = Field(default="", alias="generatorURL")


class AlertNotification(BaseModel):
    """What Alertmanager POSTs to a webhook receiver (version 4), as the intake validated it."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    version: Literal["4"]
    group_key: Annotated[str, Field(min_length=1, max_length=4_096)] = Field(alias="groupKey")
    status: Literal["firing", "resolved"]
    receiver: Annotated[str, Field(max_length=256)] = ""
    group_labels: dict[Label, Label] = Field(default={}, alias="groupLabels")
    common_labels: dict[Label, Label] = Field(default={}, alias="commonLabels")
    common_annotations: dict[Label, Label] = Field(default={}, alias="commonAnnotations")
    external_url: Annotated[str, Field(max_length=2_048)] = Field(default="", alias="externalURL")
    truncated_alerts: int = Field(default=0, ge=0, alias="truncatedAlerts")
    alerts: Annotated[list[Alert], Field(min_length=1, max_length=1_000)]
    authorization: Signed | None = None
    """Outside dev mode, on the ``alerts`` signal: the API's signed statement that the alert
    sender (the policy's ``alert_sender``) sent exactly this (act ``incident.alerts``, this
    incident's workflow id, run id "", :func:`signed_payload`). An unsigned one is ignored."""

    def signed_payload(self) -> str:
        return signed_payload(self)


class IncidentRequest(BaseModel):
    """What a person says about an incident they open (the API's body, the CLI's options)."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[str, Field(min_length=1, max_length=300)]
    severity: Severity
    components: Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=20)] = []
    """Astra components (scheduler, workers, ...); the rotation follows from them (policy)."""
    tags: Annotated[list[Annotated[str, Field(max_length=50)]], Field(max_length=20)] = []
    """``auth`` and ``data-exposure`` bring in security (seed: stakeholders)."""
    user_visible: bool = False
    """Seed: the status page is updated only when the incident is user-visible."""
    reason: Text = ""


class IncidentOpen(IncidentRequest):
    """What an incident workflow starts with: from an alert group, or opened by a person."""

    opened_by: PersonName
    """A person, or ``alertmanager`` for an alert group."""
    notification: AlertNotification | None = None
    """The notification that opened it (alert groups only)."""
    authorization: Signed | None = None
    """Outside dev mode: the API's signed statement that ``opened_by`` opened exactly this
    (act ``incident.open``, this incident's workflow id, run id "", :func:`signed_payload`)."""
    carried: IncidentCarry | None = None
    """Set by the incident itself when it continues as new: everything it knew. Honoured only
    in a continued run (Temporal says which), so a start cannot smuggle state in."""

    def signed_payload(self) -> str:
        return signed_payload(self)


class ActionKind(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    COMMAND = "command"
    """Take the commander role, or nominate someone (``person``)."""
    SEVERITY = "severity"
    NOTE = "note"
    RUNBOOK = "runbook"
    CONTAIN = "contain"
    REMEDIATE = "remediate"
    RESOLVE = "resolve"
    REOPEN = "reopen"
    ADD_ITEM = "add_item"
    COMPLETE_ITEM = "complete_item"
    DROP_ITEM = "drop_item"


class ActionRequest(BaseModel):
    """What a person says with an action (the API's body, the CLI's arguments); who they are
    comes from their credentials."""

    model_config = ConfigDict(extra="forbid")

    text: Text = ""
    """The note, or why (a severity change, a drop, a reopen need one)."""
    person: PersonName | None = None
    """``command``: the nominee (default: the actor); ``add_item``: the owner."""
    severity: Severity | None = None
    runbook: Annotated[str, Field(max_length=100)] | None = None
    params: dict[
        Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=1_000)]
    ] = {}
    """``runbook``: its parameters, as `--param` gives them."""
    item: Annotated[str, Field(max_length=100)] | None = None
    """``complete_item`` / ``drop_item``: the item's id."""
    due: datetime | None = None
    """``add_item``: when it is due."""

    def missing(self, kind: ActionKind) -> list[str]:
        """The fields this kind of action needs and lacks: the front ends refuse such an action
        before it is signed or sent (naming the fields), the validators refuse it too."""
        return [name for name in NEEDS.get(kind, ()) if _blank(getattr(self, name))]


NEEDS: dict[ActionKind, tuple[str, ...]] = {
    ActionKind.SEVERITY: ("severity", "text"),
    ActionKind.NOTE: ("text",),
    ActionKind.RUNBOOK: ("runbook",),
    ActionKind.REOPEN: ("text",),
    ActionKind.ADD_ITEM: ("text", "person", "due"),
    ActionKind.COMPLETE_ITEM: ("item",),
    ActionKind.DROP_ITEM: ("item", "text"),
}
"""What each kind of action must say: a severity change, a reopen and a drop say why."""


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class IncidentAction(ActionRequest):
    """One thing a person does to an incident. Each kind is its own update (named as the kind)
    with a validator: a refused action changes nothing and leaves no trace in history."""

    actor: PersonName
    authorization: Signed | None = None
    """Outside dev mode: the API's signed statement (act ``incident.<kind>``, actor, this
    incident's workflow id and run id, :func:`signed_payload`)."""

    def signed_payload(self) -> str:
        return signed_payload(self)


def signed_payload(model: BaseModel) -> str:
    """A model as a signature covers it: every field but the signature itself (and the state an
    incident carries into its next run, which no person signs)."""
    return json.dumps(
        model.model_dump(mode="json", exclude={"authorization", "carried"}),
        sort_keys=True,
        separators=(",", ":"),
    )


class TimelineEntry(BaseModel):
    at: datetime
    kind: str
    """opened, alert, resolved_alert, stage, severity, commander, page, ack, message, note,
    runbook, runbook_outcome, item, reminder, delivery_failed, ..."""
    actor: str = ""
    text: str


class ActionItem(BaseModel):
    id: str
    text: str
    owner: str
    due: datetime
    state: Literal["open", "done", "dropped"] = "open"
    note: str = ""


class LinkedRun(BaseModel):
    runbook: str
    run_id: str
    started_by: str
    outcome: str | None = None
    """None while it runs; then the runbook's outcome."""
    summary: str = ""
    """The runbook's own summary of how it ended (or why it failed)."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: list[StepStatus] = []
    """Its steps as it finished them: approvals say who approved."""


class IncidentState(BaseModel):
    """What ``incident show``, the API and the UI's query show."""

    incident_id: str
    title: str
    severity: Severity
    stage: Stage
    components: list[str]
    rotation: str
    commander: str | None = None
    acknowledged_by: str | None = None
    opened_by: str
    opened_at: datetime
    user_visible: bool = False
    tags: list[str] = []
    alerts: list[Alert] = []
    firing: int = 0
    runs: list[LinkedRun] = []
    items: list[ActionItem] = []
    timeline: list[TimelineEntry] = []
    postmortem: str | None = None
    """Where the postmortem draft was written, once it was."""
    timeline_omitted: int = 0
    """Entries past MAX_TIMELINE, counted instead of kept."""
    resolved_at: datetime | None = None
    """When it was last resolved (the end of the impact window)."""
    refused_alerts: int = 0
    """``alerts`` signals ignored because nobody proved who sent them."""


MAX_TIMELINE = 5_000
"""Entries an incident keeps; alert repeats add none, so only a pathological one gets there."""


class PageRecord(BaseModel):
    """One level of the escalation, paged."""

    target: str
    """primary, secondary or manager."""
    person: str
    at: datetime
    closed: Literal["acknowledge", "resolve"] | None = None
    """The last event that closed the page at the pager."""


class Outgoing(BaseModel):
    """A message the incident decided to send and has not yet seen delivered; it is sent again
    after a restart or a continue-as-new, and the delivery ledger makes that safe."""

    channel: Literal["chat", "status page", "pager"]
    event_key: str
    what: str
    """How the timeline names it when it fails or arrives late."""
    body: dict[str, JsonValue]
    """The adapter's request (ChatMessage, StatusPageUpdate or PageEvent) as JSON."""


class IncidentCarry(BaseModel):
    """Everything an incident run knows that its state does not show: what continue-as-new
    carries into the next run. Deadlines are absolute, so timers resume where they were."""

    state: IncidentState
    events: int = 0
    """Message-worthy events so far: each message's event key is numbered from it, never from
    the clock."""
    pages: list[PageRecord] = []
    next_page_at: datetime | None = None
    commander_requests: int = 0
    next_commander_request_at: datetime | None = None
    sev1_since: datetime | None = None
    sev1_periods: int = 0
    product_owner_told: int = 0
    """The SEV1 period the product owner was last told about."""
    item_notices: list[str] = []
    """``<item>:reminder`` / ``<item>:overdue`` already sent."""
    considered: list[str] = []
    """Alert fingerprints whose runbook was started or proposed."""
    runbook_queue: list[Alert] = []
    """Alerts naming a runbook, not yet started or proposed."""
    outbox: list[Outgoing] = []
    runbook_starts: int = 0
    """Runbooks started for the incident (bounded)."""
    resolutions: int = 0
    """Times it was resolved (a reopened incident is resolved again, with a new draft)."""
    unconfigured: list[str] = []
    """Receivers found unconfigured (said once on the timeline, pages each time)."""
    run_ids: list[str] = []
    """The runs of this incident, latest last (bounded): an action signed for one that
    continued as new is delivered to the next, and still counts."""


IncidentOpen.model_rebuild()
