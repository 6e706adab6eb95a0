"""What a run is told about who may do what: the access policy, trusted keys, the kill switch,
and how often it may act alone.

Workflow code cannot read files or ask Temporal, so these activities do it and return the answer
into history. A run then checks signatures and policy deterministically, and a key rotation or a
policy edit never changes how an old history replays.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.heartbeats import beat, heartbeating
from activities.notify import NotifyActivities
from activities.postgres import AstraDatabase
from runtime import search_attributes as sa
from runtime.access import (
    AccessPolicy,
    AccessPolicyError,
    ApprovalPolicy,
    PolicyFile,
    RunbookAccess,
)
from workflows.incident_models import INCIDENT_WORKFLOW, STATE_QUERY, IncidentState
from workflows.models import FreezeNotice

log = logging.getLogger(__name__)

KILL_SWITCH_ID = "kill-switch/astra-ops"


class Trust(BaseModel):
    """How a run tells a real person from a claimed name."""

    dev_mode: bool
    """Names are trusted as given (dev mode only)."""
    keys: dict[str, str] = {}
    """Key id -> base64 Ed25519 public key of the API's signing keys."""


class AdmissionRequest(BaseModel):
    runbook: str
    parent_workflow_id: str | None = None
    """The workflow that started this run as its child (Temporal's record), if any."""
    parent_run_id: str | None = None


class Admission(BaseModel):
    trust: Trust
    access: RunbookAccess
    members: dict[str, list[str]]
    """The people of every group the runbook's rules name (and ``anyone``)."""
    operators: list[str]
    freeze: FreezeNotice | None = None
    parent_type: str | None = None
    """The parent's workflow type as Temporal describes it: a run started by an incident
    trusts the incident's checks only if the parent really is one."""


class Operators(BaseModel):
    trust: Trust
    members: list[str]


class ApprovalRequest(BaseModel):
    run_id: str
    runbook: str
    step: str
    requester: str
    reason: str = ""
    escalate_to: str | None = None
    """Ask this group (an escalation) instead of the step's own approvers."""


class Approvers(BaseModel):
    policy: ApprovalPolicy
    groups: list[str]
    members: list[str]
    trust: Trust
    notified: bool
    detail: str = ""


class AutomaticAction(BaseModel):
    runbook: str
    step: str
    scope: str = Field(max_length=300)
    token: str
    """The step's idempotency token: a retried claim counts once."""
    limit: int
    per_seconds: float


class AutomaticClaim(BaseModel):
    allowed: bool
    used: int
    detail: str


class OpenIncidentsRequest(BaseModel):
    service: str
    """A Deployment; the access policy's rotations say which rotation owns it."""


class OpenIncident(BaseModel):
    incident_id: str
    severity: str
    title: str


class OpenIncidents(BaseModel):
    """The open SEV1/SEV2 incidents on the rotation that owns a service."""

    rotation: str
    incidents: list[OpenIncident]

    def summary(self) -> str:
        if not self.incidents:
            return f"no open SEV1/SEV2 incident on {self.rotation or 'any rotation'}"
        return f"open on {self.rotation}: " + ", ".join(
            f"{i.incident_id} ({i.severity}: {i.title})" for i in self.incidents
        )


class FreezeBroadcast(BaseModel):
    signal: str
    notice: FreezeNotice


class AccessActivities:
    def __init__(
        self,
        policy_path: Path,
        trust: Trust,
        client: Client,
        notify: NotifyActivities,
        state_dsn: str,
        topology: Path | None = None,
    ) -> None:
        self.policy_path = policy_path
        self.trust = trust
        self.client = client
        self.notify = notify
        # astra-ops's own tables; beside Astra's (the dev stack), they follow its failovers too.
        self.state = AstraDatabase(state_dsn, topology)
        self._policy_file = PolicyFile(policy_path)

    def _policy(self) -> AccessPolicy:
        try:
            return self._policy_file.read()
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None

    @activity.defn
    async def admit(self, req: AdmissionRequest) -> Admission:
        """The runbook's rules as the policy says now, the keys to check signatures, and whether
        the kill switch is on."""
        policy = self._policy()
        try:
            access = policy.runbook(req.runbook)
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        groups = sorted(access.groups())
        return Admission(
            trust=self.trust,
            access=access,
            members={g: policy.members([g]) for g in groups},
            operators=policy.operator_members(),
            freeze=await self.freeze_state(),
            parent_type=await self._workflow_type(req.parent_workflow_id, req.parent_run_id),
        )

    async def _workflow_type(self, workflow_id: str | None, run_id: str | None) -> str | None:
        if workflow_id is None:
            return None
        try:
            desc = await self.client.get_workflow_handle(workflow_id, run_id=run_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return desc.workflow_type

    @activity.defn
    async def operators(self) -> Operators:
        """Who may freeze and unfreeze, and the keys that prove it."""
        return Operators(trust=self.trust, members=self._policy().operator_members())

    @activity.defn
    async def freeze_state(self) -> FreezeNotice | None:
        """The kill switch's notice while it is on, else None."""
        handle = self.client.get_workflow_handle(KILL_SWITCH_ID)
        try:
            desc = await handle.describe()
            if desc.status != WorkflowExecutionStatus.RUNNING:
                return None
            notice: FreezeNotice | None = await handle.query(
                "state",
                result_type=FreezeNotice | None,  # type: ignore[arg-type]
            )
            return notice
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    @activity.defn
    async def request_approval(self, req: ApprovalRequest) -> Approvers:
        """Resolve the step's approvers from the policy now (it may have changed) and notify them.

        The rule, the members and the trusted keys are returned into history, so the gate checks
        decisions deterministically, and a key rotated during a long wait is picked up here.
        """
        policy = self._policy()
        try:
            rule = policy.runbook(req.runbook).approval(req.runbook, req.step)
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        groups = [req.escalate_to] if req.escalate_to else list(rule.groups)
        unknown = [g for g in groups if g not in policy.groups]
        if unknown:
            raise ApplicationError(
                f"groups {unknown} are not in the access policy {self.policy_path}",
                non_retryable=True,
            )
        members = [m for m in policy.members(groups) if m != req.requester]
        verb = "Escalated: approval" if req.escalate_to else "Approval"
        text = (
            f"{verb} needed for step '{req.step}' of {req.runbook} run {req.run_id}, "
            f"requested by {req.requester}: {req.reason or 'no reason given'}. "
            f"Eligible: {', '.join(members) or 'nobody'} ({', '.join(groups)}). "
            f"`astra-ops approve {req.run_id} --step '{req.step}'`"
        )
        # A chat outage must not block an approval: people still find the run through
        # `astra-ops ps --awaiting-approval`, so a failed notification is reported, not raised.
        async with heartbeating(f"asking {', '.join(groups)} for '{req.step}'"):
            notified, detail = await self.notify.tell(text)
        return Approvers(
            policy=rule,
            groups=groups,
            members=members,
            trust=self.trust,
            notified=notified,
            detail=detail,
        )

    @activity.defn
    async def claim_automatic_action(self, req: AutomaticAction) -> AutomaticClaim:
        """Count this action against the policy's budget for (runbook, step, scope); refuse past it.

        The claim is keyed by the step's token, so a retry finds its own earlier claim. An
        advisory lock per scope serialises concurrent runs, so two runs cannot both take the last
        slot.
        """
        since = datetime.now(UTC) - timedelta(seconds=req.per_seconds)
        scope = f"{req.runbook}/{req.step}/{req.scope}"
        # astra_ops_automatic_actions comes from astra-ops's migrations (`astra-ops setup`).
        async with await self.state.connect() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (scope,))
            mine = await (
                await conn.execute(
                    "SELECT 1 FROM astra_ops_automatic_actions WHERE token = %s", (req.token,)
                )
            ).fetchone()
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM astra_ops_automatic_actions WHERE scope = %s AND at > %s",
                    (scope, since),
                )
            ).fetchone()
            used = int(row[0]) if row else 0
            window = f"{req.limit} per {req.per_seconds:g}s for {req.scope}"
            if mine:
                return AutomaticClaim(allowed=True, used=used, detail=f"{used} of {window}")
            if used >= req.limit:
                return AutomaticClaim(
                    allowed=False,
                    used=used,
                    detail=f"'{req.step}' already ran {used} times without a person "
                    f"(limit {window})",
                )
            await conn.execute(
                "INSERT INTO astra_ops_automatic_actions (token, scope) VALUES (%s, %s)",
                (req.token, scope),
            )
            return AutomaticClaim(allowed=True, used=used + 1, detail=f"{used + 1} of {window}")

    @activity.defn
    async def open_incidents(self, req: OpenIncidentsRequest) -> OpenIncidents:
        """The SEV1/SEV2 incidents open on the rotation that owns ``req.service``: an upgrade
        does not add a change to a platform that is already failing its users."""
        incidents = self._policy().incidents
        if incidents is None:
            return OpenIncidents(rotation="", incidents=[])
        rotation = incidents.rotation_of_deployment(req.service)
        # The incidents of this deployment of astra-ops: on its task queue (another's, on the
        # same namespace, are another's to weigh).
        query = (
            f"WorkflowType = '{INCIDENT_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND {sa.SEVERITY.name} IN ('SEV1', 'SEV2') "
            f"AND TaskQueue = '{activity.info().task_queue}'"
        )
        found = []
        async for execution in self.client.list_workflows(query):
            severity = execution.typed_search_attributes.get(sa.SEVERITY) or "?"
            try:
                state = await self.client.get_workflow_handle(execution.id).query(
                    STATE_QUERY, result_type=IncidentState
                )
            except (RPCError, WorkflowQueryFailedError) as err:
                if isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND:
                    continue  # closed since the listing
                # Unanswered: it may be this rotation's, so it counts (the safe side).
                found.append(
                    OpenIncident(
                        incident_id=execution.id,
                        severity=severity,
                        title=f"(does not answer: {err.message})",
                    )
                )
                continue
            if state.rotation == rotation:
                found.append(
                    OpenIncident(
                        incident_id=execution.id, severity=state.severity.value, title=state.title
                    )
                )
        return OpenIncidents(rotation=rotation, incidents=found)

    @activity.defn
    async def broadcast_freeze(self, req: FreezeBroadcast) -> int:
        """Signal every open runbook run to hold (or resume) its mutating steps; how many."""
        query = f"{sa.RUNBOOK.name} IS NOT NULL AND ExecutionStatus = 'Running'"
        told = 0
        async with heartbeating(f"telling every open run to {req.signal}"):
            async for execution in self.client.list_workflows(query):
                try:
                    handle = self.client.get_workflow_handle(execution.id)
                    await handle.signal(req.signal, req.notice)
                    told += 1
                except RPCError as err:
                    if err.status != RPCStatusCode.NOT_FOUND:  # closed since the listing
                        raise
                beat(f"{told} runs told to {req.signal}")
        return told
