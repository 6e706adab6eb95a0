"""A stand-in for the incident workflow (registered as ``incident``) while the real one is built:
it keeps what the front doors send and refuses what the real one must refuse, so their error
paths are exercised.

It takes the contract of ``workflows/incident_models.py``: ``run(IncidentOpen)``, the ``alerts``
signal, the ``state`` query, and one update per ``ActionKind`` named as the kind (here one dynamic
handler) taking an ``IncidentAction`` and answering a line. Its validators refuse an action of no
known kind, by someone the access policy does not know or who is in no rotation (stage changes
and severity need one), without the API's signature for exactly this act, incident and run, or
lacking what its kind needs, and a second acknowledgement. It ends when resolved (the real one
goes on to the postmortem and the review).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RawValue

from activities.access import Trust
from runtime.access import load_policy
from runtime.identity import parse_trusted_keys
from runtime.settings import REPO_ROOT
from tests.helpers import TEST_SIGNER
from workflows.approval import proven
from workflows.incident_models import (
    ALERTS_SIGNAL,
    INCIDENT_WORKFLOW,
    STATE_QUERY,
    ActionKind,
    AlertNotification,
    IncidentAction,
    IncidentOpen,
    IncidentState,
    Stage,
    TimelineEntry,
)

POLICY = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml")
IN_A_ROTATION = (ActionKind.SEVERITY, ActionKind.CONTAIN, ActionKind.REMEDIATE, ActionKind.RESOLVE)
STAGES = {
    ActionKind.ACKNOWLEDGE: Stage.TRIAGE,
    ActionKind.CONTAIN: Stage.CONTAIN,
    ActionKind.REMEDIATE: Stage.REMEDIATE,
    ActionKind.RESOLVE: Stage.CLOSED,
}


class ReceivedAction(BaseModel):
    kind: ActionKind
    action: IncidentAction


class Received(BaseModel):
    """Everything the stub was sent and took."""

    opened: IncidentOpen
    open_refusal: str | None
    """Why the opening's signature does not prove it, or None."""
    notifications: list[AlertNotification]
    actions: list[ReceivedAction]


@workflow.defn(name=INCIDENT_WORKFLOW, sandboxed=False)
class IncidentStub:
    trust = Trust(dev_mode=False, keys=parse_trusted_keys(TEST_SIGNER.public_line()))
    """The test session's API key."""

    def __init__(self) -> None:
        self.opened: IncidentOpen | None = None
        self.open_refusal: str | None = None
        self.notifications: list[AlertNotification] = []
        self.actions: list[ReceivedAction] = []
        self.timeline: list[TimelineEntry] = []
        self.stage = Stage.DETECT
        self.acknowledged_by: str | None = None
        self.commander: str | None = None

    @workflow.run
    async def run(self, opened: IncidentOpen) -> None:
        self.opened = opened
        self.open_refusal = proven(
            opened.authorization,
            self.trust,
            act="incident.open",
            actor=opened.opened_by,
            payload=opened.signed_payload(),
            run_id="",  # a start's statement cannot name the run it starts
        )
        self._note("opened", opened.opened_by, opened.title)
        await workflow.wait_condition(lambda: self.stage == Stage.CLOSED)
        await workflow.wait_condition(workflow.all_handlers_finished)

    @workflow.signal(name=ALERTS_SIGNAL)
    def alerts(self, notification: AlertNotification) -> None:
        self.notifications.append(notification)
        kind = "alert" if notification.status == "firing" else "resolved_alert"
        self._note(kind, "", f"{notification.status}: {len(notification.alerts)} alert(s)")

    @workflow.update(dynamic=True)
    def act(self, name: str, args: Sequence[RawValue]) -> str:
        kind, action = ActionKind(name), self._action(args)
        self.actions.append(ReceivedAction(kind=kind, action=action))
        if kind == ActionKind.ACKNOWLEDGE:
            self.acknowledged_by = action.actor
        if kind == ActionKind.COMMAND:
            self.commander = action.person or action.actor
        self.stage = STAGES.get(kind, self.stage)
        self._note(kind.value, action.actor, action.text)
        return f"{kind.value} by {action.actor}"

    @act.validator
    def _validate(self, name: str, args: Sequence[RawValue]) -> None:
        try:
            kind = ActionKind(name)
        except ValueError:
            raise ValueError(f"an incident has no action {name!r}") from None
        action = self._action(args)
        if not POLICY.known(action.actor):
            raise PermissionError(f"{action.actor} is not in the access policy")
        if kind in IN_A_ROTATION and not POLICY.groups_of(action.actor):
            raise PermissionError(f"{action.actor} may not {kind.value}: in no rotation")
        why = proven(
            action.authorization,
            self.trust,
            act=f"incident.{kind.value}",
            actor=action.actor,
            payload=action.signed_payload(),
        )
        if why is not None:
            raise ValueError(why)
        missing = action.missing(kind)
        if missing:
            raise ValueError(f"{kind.value} needs {', '.join(missing)}")
        if kind == ActionKind.ACKNOWLEDGE and self.acknowledged_by:
            raise ValueError(f"already acknowledged by {self.acknowledged_by}")

    @workflow.query(name=STATE_QUERY)
    def state(self) -> IncidentState:
        assert self.opened is not None
        info = workflow.info()
        labels = self.opened.notification.common_labels if self.opened.notification else {}
        last = self.notifications[-1].alerts if self.notifications else []
        return IncidentState(
            incident_id=info.workflow_id,
            title=self.opened.title,
            severity=next(
                (a.action.severity for a in reversed(self.actions) if a.action.severity),
                self.opened.severity,
            ),
            stage=self.stage,
            components=self.opened.components,
            rotation=labels.get("rotation", ""),
            commander=self.commander,
            acknowledged_by=self.acknowledged_by,
            opened_by=self.opened.opened_by,
            opened_at=info.start_time,
            user_visible=self.opened.user_visible,
            tags=self.opened.tags,
            alerts=last,
            firing=sum(1 for a in last if a.status == "firing"),
            timeline=self.timeline,
        )

    @workflow.query
    def received(self) -> Received:
        assert self.opened is not None
        return Received(
            opened=self.opened,
            open_refusal=self.open_refusal,
            notifications=self.notifications,
            actions=self.actions,
        )

    def _action(self, args: Sequence[RawValue]) -> IncidentAction:
        action: IncidentAction = workflow.payload_converter().from_payload(
            args[0].payload, IncidentAction
        )
        return action

    def _note(self, kind: str, actor: str, text: str) -> None:
        self.timeline.append(TimelineEntry(at=workflow.now(), kind=kind, actor=actor, text=text))


@workflow.defn(name=INCIDENT_WORKFLOW, sandboxed=False)
class DevIncidentStub(IncidentStub):
    """The stub of a dev-mode worker: names are trusted as given."""

    trust = Trust(dev_mode=True)

    @workflow.run
    async def run(self, opened: IncidentOpen) -> None:
        await super().run(opened)
