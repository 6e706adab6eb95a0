"""What an incident tells the channel, the status page and the pager, in their adapters' terms.

Each message becomes an ``Outgoing`` with an event key the incident numbered from its own
history, so a retry, a restart or a continue-as-new sends the same key and the delivery ledger
delivers it once.
"""

from __future__ import annotations

from typing import Literal

from temporalio import workflow

from workflows.incident_models import IncidentState, Outgoing, Severity, Stage

with workflow.unsafe.imports_passed_through():
    from activities.communication import (
        ChatMessage,
        ComponentStatus,
        IncidentStatus,
        PageEvent,
        StatusPageUpdate,
    )

PUBLIC_STATUS: dict[Stage, IncidentStatus] = {
    Stage.DETECT: "investigating",
    Stage.TRIAGE: "investigating",
    Stage.CONTAIN: "identified",
    Stage.REMEDIATE: "monitoring",
    Stage.POSTMORTEM: "resolved",
    Stage.REVIEW: "resolved",
    Stage.CLOSED: "resolved",
}
PUBLIC_BODY: dict[IncidentStatus, str] = {
    "investigating": "We are investigating this issue.",
    "identified": "The issue has been identified and a fix is being implemented.",
    "monitoring": "A fix has been implemented and we are monitoring the results.",
    "resolved": "This incident has been resolved.",
}
"""What the public reads at each status: people's notes and reasons are for the channel."""
COMPONENT_STATUS: dict[Severity, ComponentStatus] = {
    Severity.SEV1: "major_outage",
    Severity.SEV2: "partial_outage",
    Severity.SEV3: "degraded_performance",
}
IMPACT: dict[Severity, Literal["minor", "major", "critical"]] = {
    Severity.SEV1: "critical",
    Severity.SEV2: "major",
    Severity.SEV3: "minor",
}
PAGER_SEVERITY: dict[Severity, Literal["critical", "error", "warning"]] = {
    Severity.SEV1: "critical",
    Severity.SEV2: "error",
    Severity.SEV3: "warning",
}


def headline(state: IncidentState) -> str:
    return f"[{state.severity.value}] {state.title} ({state.incident_id})"


def chat(state: IncidentState, event_key: str, what: str, text: str) -> Outgoing:
    message = ChatMessage(
        incident_id=state.incident_id,
        event_key=event_key,
        text=f"{headline(state)}: {text}"[:4_000],
    )
    return Outgoing(
        channel="chat", event_key=event_key, what=what, body=message.model_dump(mode="json")
    )


def status_page(state: IncidentState, event_key: str, what: str, body: str = "") -> Outgoing:
    """The public view: the stage's status and its words (or ``body``), and each component's
    status by severity (operational once resolved)."""
    status = PUBLIC_STATUS[state.stage]
    body = body or PUBLIC_BODY[status]
    component: ComponentStatus = (
        "operational" if status == "resolved" else COMPONENT_STATUS[state.severity]
    )
    update = StatusPageUpdate(
        incident_id=state.incident_id,
        event_key=event_key,
        name=state.title[:255],
        status=status,
        body=body[:4_000],
        impact=IMPACT[state.severity],
        components={c: component for c in state.components},
    )
    return Outgoing(
        channel="status page",
        event_key=event_key,
        what=what,
        body=update.model_dump(mode="json"),
    )


def page(
    state: IncidentState,
    event_key: str,
    action: Literal["trigger", "acknowledge", "resolve"],
    target: str,
    person: str,
) -> Outgoing:
    """A page of one escalation level; its dedup key (incident and level) lets acknowledge
    and resolve reach the page its trigger opened."""
    event = PageEvent(
        incident_id=state.incident_id,
        event_key=event_key,
        action=action,
        rotation=state.rotation,
        target=target,
        summary=f"{headline(state)} — {person} ({target})"[:1_024],
        severity=PAGER_SEVERITY[state.severity],
        component=state.components[0] if state.components else None,
        custom_details={
            "incident": state.incident_id,
            "person": person,
            "stage": state.stage.value,
            "severity": state.severity.value,
        },
    )
    verb = {"trigger": "page to", "acknowledge": "acknowledgement of the page to"}.get(
        action, "resolution of the page to"
    )
    return Outgoing(
        channel="pager",
        event_key=event_key,
        what=f"the {verb} {person} ({target})",
        body=event.model_dump(mode="json"),
    )
