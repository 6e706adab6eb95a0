"""Opening and steering incidents: the one implementation behind the alert intake, the API and
the CLI (in dev mode), beside ``starters.runs`` whose identities, signatures and errors it shares.

One Alertmanager group is one incident. Its workflow id derives from the group key, and a
firing notification is a signal-with-start: while the incident is open (``USE_EXISTING``) a
repeat, a retry or a concurrent delivery only signals it; the first one also starts it, with the
notification in its input. So the workflow sees each notification as the ``alerts`` signal, the
first one included (handled before its run method starts), and takes a repeat as a repeat. A
group the intake delivered to moments ago gets a plain signal instead, the same signal at a
fraction of the cost in a storm, falling back to signal-with-start if its incident has closed.
Once the incident has closed, a group that fires again opens a new incident under the same id
(the latest run is the one shown); a ``resolved`` notification never opens one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from datetime import timedelta
from typing import Any, cast

from temporalio.client import (
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from runtime import search_attributes as sa
from runtime.identity import Act, digest, statement
from starters.incident_views import (
    AlertsDelivered,
    IncidentSummary,
    IncidentView,
    OpenedIncident,
    incident_id,
)
from starters.run_views import DecisionRefused, InvalidInput, UnknownRun
from starters.runs import (
    QUERY_TIMEOUT,
    STATES,
    TEMPORAL_ERRORS,
    Runs,
    call,
    listed,
    reason_of,
    send_update,
    temporal_error,
    visibility_literal,
)
from workflows.incident_models import (
    ALERTS_SIGNAL,
    INCIDENT_PREFIX,
    INCIDENT_WORKFLOW,
    STATE_QUERY,
    ActionKind,
    ActionRequest,
    AlertNotification,
    IncidentAction,
    IncidentOpen,
    IncidentRequest,
    IncidentState,
    Severity,
    incident_id_for_group,
)

START_TIMEOUT = timedelta(seconds=10)
"""An alert delivery Temporal cannot take in this time gets 503: Alertmanager retries it."""

SEVERITY_LABEL = "severity"
COMPONENT_LABEL = "component"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _clean(text: str, limit: int, *, one_line: bool = False) -> str:
    """Alert text as an incident may carry it: no control characters, bounded."""
    text = _CONTROL.sub(" ", text)
    if one_line:
        text = " ".join(text.split())
    return text[:limit].strip()


def _severity(value: str | None) -> Severity | None:
    try:
        return Severity((value or "").strip().upper())
    except ValueError:
        return None


def incident_from_alerts(notification: AlertNotification, sender: str) -> IncidentOpen:
    """The incident an alert group opens: titled by its summary (else its alert's name), as
    severe as its most severe alert (``severity`` label SEV1-3, else SEV3), on the components its
    alerts name (``component`` label). The rotation and the runbook are in the notification's
    labels, which the incident keeps."""
    labels = [alert.labels for alert in notification.alerts]
    named = (
        notification.common_annotations.get("summary")
        or notification.common_labels.get("alertname")
        or notification.group_labels.get("alertname")
        or next((lab["alertname"] for lab in labels if lab.get("alertname")), "")
    )
    title = _clean(named, 300, one_line=True) or "an alert group without a name"
    severities = [s for lab in labels if (s := _severity(lab.get(SEVERITY_LABEL)))]
    components = sorted({_clean(c, 100) for lab in labels if (c := lab.get(COMPONENT_LABEL))})
    return IncidentOpen(
        title=title,
        severity=min(severities, default=Severity.SEV3),  # SEV1 sorts first
        components=[c for c in components if c][:20],
        opened_by=sender,
        reason=_clean(notification.common_annotations.get("description", ""), 2_000),
        notification=notification,
    )


def act_of(kind: ActionKind) -> Act:
    """What a signature on an action of this kind says it is."""
    return cast(Act, f"incident.{kind.value}")


def _attributes(incident: str, opened: IncidentOpen) -> TypedSearchAttributes:
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(sa.INCIDENT_ID, incident),
        SearchAttributePair(sa.SEVERITY, opened.severity.value),
    ]
    return TypedSearchAttributes(pairs)


class Incidents:
    """Open and steer incidents as a caller the front end has identified (see ``Runs``)."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.client = runs.client

    async def open_from_alerts(
        self, notification: AlertNotification, sender: str, *, known_open: bool = False
    ) -> AlertsDelivered:
        """Hand an Alertmanager notification to its group's incident, opening it if needed.
        ``sender`` is who the intake authenticated (not a person of the access policy).

        ``known_open``: the intake delivered to this group's incident moments ago, so a firing
        notification goes as a plain signal (one signature, one payload), not a signal-with-start
        carrying the incident's whole opening; if the incident has closed since, it is opened as
        always."""
        incident = incident_id_for_group(notification.group_key)
        # The incident takes a notification only with the API's word that the authenticated
        # sender sent exactly it; a signal straight to Temporal proves nothing.
        said = statement("incident.alerts", sender, incident, notification.signed_payload())
        notification = notification.model_copy(update={"authorization": self.runs.vouch(said)})
        if (known_open or notification.status == "resolved") and await self._signal(
            incident, notification
        ):
            return AlertsDelivered(
                incident_id=incident,
                status=notification.status,
                delivered=True,
                message=f"{incident} has the notification",
            )
        if notification.status == "resolved":
            # A resolved group only reaches an open incident: it opens none.
            return AlertsDelivered(
                incident_id=incident,
                status="resolved",
                delivered=False,
                message=f"no open incident {incident} for this group; nothing to do",
            )
        opened = incident_from_alerts(notification, sender)
        await call(
            self.client.start_workflow(
                INCIDENT_WORKFLOW,
                self._signed(opened, incident),
                id=incident,
                task_queue=self.runs.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                start_signal=ALERTS_SIGNAL,
                start_signal_args=[notification],
                memo={"title": opened.title, "opened_by": sender},
                search_attributes=_attributes(incident, opened),
                static_summary=f"{opened.severity.value} {opened.title}",
                static_details=f"opened by {sender} for alert group {notification.group_key}",
                rpc_timeout=START_TIMEOUT,
            )
        )
        return AlertsDelivered(
            incident_id=incident,
            status=notification.status,
            delivered=True,
            message=f"{incident} has the notification",
        )

    async def _signal(self, incident: str, notification: AlertNotification) -> bool:
        """Signal the incident's open run; False if it has none (never opened, or closed)."""
        handle = self.client.get_workflow_handle(incident)
        try:
            await handle.signal(ALERTS_SIGNAL, notification, rpc_timeout=START_TIMEOUT)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise temporal_error(err) from None
            return False
        except TEMPORAL_ERRORS as err:
            raise temporal_error(err) from None
        return True

    def _signed(self, opened: IncidentOpen, incident: str) -> IncidentOpen:
        said = statement("incident.open", opened.opened_by, incident, opened.signed_payload())
        return opened.model_copy(update={"authorization": self.runs.vouch(said)})

    async def open(
        self, request: IncidentRequest, *, opened_by: str, idempotency_key: str | None = None
    ) -> OpenedIncident:
        """Open an incident by hand. With an Idempotency-Key the incident's id derives from it:
        a retried request finds the incident it opened, open or closed."""
        user = self.runs.identify(opened_by)
        opened = IncidentOpen(**dict(request), opened_by=user)
        body = digest(json.dumps(request.model_dump(mode="json"), sort_keys=True))
        if idempotency_key:
            key = hashlib.sha256(f"idempotency-key\n{idempotency_key}".encode()).hexdigest()
            incident = INCIDENT_PREFIX + key[:20]
        else:
            incident = INCIDENT_PREFIX + uuid.uuid4().hex[:20]
        request_id = str(uuid.uuid4())
        # A key whose incident has closed: the answer is still that incident.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await call(
                self.client.start_workflow(
                    INCIDENT_WORKFLOW,
                    self._signed(opened, incident),
                    id=incident,
                    task_queue=self.runs.task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    memo={
                        "title": opened.title,
                        "opened_by": user,
                        "request_id": request_id,
                        "body": body,
                    },
                    search_attributes=_attributes(incident, opened),
                    static_summary=f"{opened.severity.value} {opened.title}",
                    static_details=f"opened by {user}: {opened.reason or 'no reason given'}",
                    rpc_timeout=START_TIMEOUT,
                )
            )
        memo = await (await call(self.client.get_workflow_handle(incident).describe())).memo()
        if memo.get("request_id") == request_id:
            return OpenedIncident(incident_id=incident, existing=False)
        if memo.get("opened_by") != user or memo.get("body") != body:
            raise InvalidInput(
                "this Idempotency-Key was used for another request (another body or another "
                "user); use a new key for a new incident"
            )
        return OpenedIncident(incident_id=incident, existing=True)

    async def list_incidents(
        self, *, open_only: bool = False, severity: Severity | None = None, limit: int = 50
    ) -> list[IncidentSummary]:
        """Newest first; one line per incident (a group that fired again after its incident
        closed has one per time)."""
        query = f"WorkflowType = {visibility_literal(INCIDENT_WORKFLOW)}"
        if severity is not None:
            query += f" AND {sa.SEVERITY.name} = {visibility_literal(severity.value)}"
        if open_only:
            query += " AND ExecutionStatus = 'Running'"
        found = []
        async for execution in listed(self.client, query, limit):
            memo = await execution.memo()
            attrs = execution.typed_search_attributes
            found.append(
                IncidentSummary(
                    incident_id=execution.id,
                    title=str(memo.get("title") or ""),
                    severity=attrs.get(sa.SEVERITY),
                    stage=attrs.get(sa.STEP),
                    state=STATES.get(execution.status, "unknown") if execution.status else "?",
                    opened_by=str(memo.get("opened_by") or ""),
                    opened_at=execution.start_time,
                    closed_at=execution.close_time,
                )
            )
        return found

    async def show(self, given: str) -> IncidentView:
        """The incident as it says it is (its ``state`` query), with its timeline."""
        incident = incident_id(given)
        handle = self.client.get_workflow_handle(incident)
        desc = await self._describe(handle)
        memo = await desc.memo()
        attrs = desc.typed_search_attributes
        state: IncidentState | None = None
        unanswered = None
        try:
            state = await handle.query(
                STATE_QUERY, result_type=IncidentState, rpc_timeout=QUERY_TIMEOUT
            )
        except TEMPORAL_ERRORS as err:
            unanswered = f"{incident} does not answer ({reason_of(err)}); is a worker running?"
        return IncidentView(
            incident_id=incident,
            title=state.title if state else str(memo.get("title") or ""),
            severity=state.severity.value if state else attrs.get(sa.SEVERITY),
            stage=state.stage.value if state else attrs.get(sa.STEP),
            state=STATES.get(desc.status, "unknown") if desc.status else "unknown",
            opened_by=str(memo.get("opened_by") or ""),
            opened_at=desc.start_time,
            closed_at=desc.close_time,
            incident=state,
            unanswered=unanswered,
        )

    async def act(self, given: str, kind: ActionKind, request: ActionRequest, *, actor: str) -> str:
        """Send one action as the update of its kind, signed for this very incident; the
        incident's validator decides, and a refused action changes nothing."""
        incident = incident_id(given)
        action = IncidentAction(**dict(request), actor=self.runs.identify(actor))
        missing = action.missing(kind)
        if missing:
            raise InvalidInput("; ".join(f"{name}: required to {kind.value}" for name in missing))
        handle = self.client.get_workflow_handle(incident)
        desc = await self._describe(handle)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            state = STATES.get(desc.status, "closed") if desc.status else "closed"
            raise DecisionRefused(f"incident {incident} is {state}; nothing changed")
        said = statement(
            act_of(kind), action.actor, incident, action.signed_payload(), run_id=desc.run_id
        )
        signed = action.model_copy(update={"authorization": self.runs.vouch(said)})
        return await send_update(handle, kind.value, signed, f"incident {incident}")

    async def _describe(self, handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionDescription:
        try:
            return await call(handle.describe(), handle.id)
        except UnknownRun:
            raise UnknownRun(
                f"no incident {handle.id!r}; `astra-ops incident list` lists incidents"
            ) from None
