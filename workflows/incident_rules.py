"""Who may do what to an incident, and when: the one validator behind every action's update.

A refused action changes nothing and never enters history (an update validator refuses it
before). The order of the checks matters: the proof of identity comes first, so a caller who
proves nothing learns nothing about the incident's state; then the policy; then the stage.

Stages follow the seed's order, each action moving the incident one milestone on: acknowledged
(``triage``), contained, remediated, resolved (``postmortem``, then ``remediation_review``), and
only ``reopen`` goes back (to triage).
"""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow

from runtime.identity import Signed
from workflows.approval import proven
from workflows.incident_models import (
    ActionKind,
    IncidentAction,
    IncidentCarry,
    IncidentState,
    Severity,
    Stage,
)

with workflow.unsafe.imports_passed_through():
    from activities.incident import IncidentAdmission

MAX_ITEMS = 100
MAX_RUNBOOKS = 20
"""Runbooks one incident starts, by alert or by hand; a storm of alerts must not start hundreds."""
SECURITY_TAGS = frozenset({"auth", "data-exposure"})

RESOLVED = frozenset({Stage.POSTMORTEM, Stage.REVIEW, Stage.CLOSED})
MOVES: dict[ActionKind, tuple[frozenset[Stage], Stage]] = {
    ActionKind.CONTAIN: (frozenset({Stage.DETECT, Stage.TRIAGE}), Stage.CONTAIN),
    ActionKind.REMEDIATE: (frozenset({Stage.CONTAIN}), Stage.REMEDIATE),
    ActionKind.RESOLVE: (frozenset({Stage.REMEDIATE}), Stage.POSTMORTEM),
    ActionKind.REOPEN: (
        frozenset({Stage.CONTAIN, Stage.REMEDIATE, Stage.POSTMORTEM, Stage.REVIEW}),
        Stage.TRIAGE,
    ),
}
"""The stages an action may be taken in, and the stage it moves the incident to."""
_BEFORE = {
    Stage.CONTAIN: "acknowledged or contained",
    Stage.REMEDIATE: "contained (`astra-ops incident contain`)",
    Stage.POSTMORTEM: "remediated (`astra-ops incident remediate`)",
    Stage.TRIAGE: "contained, remediated or resolved",
}
BEFORE_RESOLVED = frozenset(
    {ActionKind.ACKNOWLEDGE, ActionKind.COMMAND, ActionKind.SEVERITY, ActionKind.RUNBOOK}
)
NEEDS_TEXT = {
    ActionKind.SEVERITY: "a severity change needs a reason",
    ActionKind.REOPEN: "a reopen needs a reason",
    ActionKind.DROP_ITEM: "dropping an action item needs a reason",
    ActionKind.NOTE: "a note needs text",
    ActionKind.ADD_ITEM: "an action item needs text saying what to do",
}


def act_name(kind: ActionKind) -> str:
    """The act an action's signed statement names."""
    return f"incident.{kind.value}"


MAX_RUN_IDS = 20


def run_signed_for(signed: Signed | None, carry: IncidentCarry) -> str | None:
    """The run a statement names when it is one of this incident's runs (Temporal hands an
    action sent to a run that continued as new to the next one); else None, the current run,
    which another incident's statement then fails to match."""
    if signed is not None and signed.statement.run_id in carry.run_ids:
        return signed.statement.run_id
    return None


def needs_commander(state: IncidentState) -> bool:
    """Seed: nominate an incident commander for SEV1/2."""
    return (
        state.severity in (Severity.SEV1, Severity.SEV2)
        and state.commander is None
        and state.stage not in RESOLVED
    )


def refusal(
    kind: ActionKind,
    action: IncidentAction,
    carry: IncidentCarry,
    admission: IncidentAdmission,
    now: datetime,
) -> str | None:
    """Why this action must be refused, or None if it may be applied."""
    state = carry.state
    if state.stage == Stage.CLOSED:
        return "the incident is closed"
    why = proven(
        action.authorization,
        admission.trust,
        act=act_name(kind),
        actor=action.actor,
        payload=action.signed_payload(),
        run_id=run_signed_for(action.authorization, carry),
    )
    if why is not None:
        return why
    if action.actor not in admission.responders:
        return (
            f"{action.actor} may not act on this incident: the access policy lets "
            f"{admission.rotation}, its escalation and the operators act "
            "(incidents.respond adds groups)"
        )
    if kind in NEEDS_TEXT and not action.text.strip():
        return NEEDS_TEXT[kind]
    if kind in MOVES:
        allowed, to = MOVES[kind]
        if state.stage not in allowed:
            return (
                f"cannot {kind.value} an incident in stage {state.stage.value}: it must be "
                f"{_BEFORE[to]} first"
            )
        return None
    if kind in BEFORE_RESOLVED and state.stage in RESOLVED:
        return f"the incident is resolved; `reopen` it before you {kind.value}"
    return _specific(kind, action, carry, admission, now)


def _specific(
    kind: ActionKind,
    action: IncidentAction,
    carry: IncidentCarry,
    admission: IncidentAdmission,
    now: datetime,
) -> str | None:
    state = carry.state
    match kind:
        case ActionKind.ACKNOWLEDGE:
            if state.acknowledged_by is not None:
                return f"already acknowledged by {state.acknowledged_by}"
        case ActionKind.COMMAND:
            nominee = action.person or action.actor
            if nominee == state.commander:
                return f"{nominee} is already the incident commander"
            if nominee not in admission.responders:
                return f"{nominee} may not command this incident: not a responder in the policy"
        case ActionKind.SEVERITY:
            if action.severity is None:
                return "a severity change needs the new severity (SEV1, SEV2 or SEV3)"
            if action.severity == state.severity:
                return f"the incident is already {state.severity.value}"
        case ActionKind.RUNBOOK:
            return _runbook_refusal(action, carry, admission)
        case ActionKind.ADD_ITEM:
            if len(state.items) >= MAX_ITEMS:
                return f"the incident already has {MAX_ITEMS} action items"
            if action.person is None:
                return "an action item needs an owner (person)"
            if action.person not in admission.people:
                return f"{action.person} is not in the access policy and cannot own an item"
            if action.due is None:
                return "an action item needs a due date"
            if action.due.tzinfo is None:
                return "the due date needs a time zone (for example 2026-12-01T12:00:00Z)"
            if action.due <= now:
                return f"the due date {action.due:%Y-%m-%d %H:%M}Z is in the past"
        case ActionKind.COMPLETE_ITEM | ActionKind.DROP_ITEM:
            items = {item.id: item for item in state.items}
            if action.item is None or action.item not in items:
                known = ", ".join(items) or "none"
                return f"no action item {action.item!r} (items: {known})"
            if items[action.item].state != "open":
                return f"action item {action.item} is already {items[action.item].state}"
    return None


def _runbook_refusal(
    action: IncidentAction, carry: IncidentCarry, admission: IncidentAdmission
) -> str | None:
    if not action.runbook:
        return "name the runbook to start"
    choice = admission.runbooks.get(action.runbook)
    if choice is None:
        return (
            f"no runbook {action.runbook!r} in the access policy; known: "
            f"{', '.join(sorted(admission.runbooks))}"
        )
    if action.actor not in choice.starters:
        return f"{action.actor} may not start {action.runbook} (the access policy's start groups)"
    if carry.runbook_starts >= MAX_RUNBOOKS:
        return f"the incident already started {MAX_RUNBOOKS} runbooks; start more outside it"
    return None
