"""Starting and steering runs: the one implementation behind the CLI and the HTTP API.

Errors are typed so each front end can say them its own way (an exit code and one line, or an
HTTP status and a JSON body) while meaning the same thing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.access import KILL_SWITCH_ID
from runtime import search_attributes as sa
from runtime.access import AccessPolicy, AccessPolicyError, RunbookAccess
from runtime.client import TemporalUnavailable
from runtime.identity import Signed, Signer, Statement, digest, statement
from runtime.redact import redact
from starters.run_views import (
    DecisionRefused,
    InvalidInput,
    NotAllowed,
    OpenRunConflict,
    RunError,
    RunSummary,
    RunView,
    StartedRun,
    UnknownRun,
)
from starters.runbook_cards import runbook_request, runbook_spec
from workflows.approval import refusal, step_of
from workflows.catalogue import RUNBOOKS, steer_actions
from workflows.kill_switch import KillSwitch
from workflows.models import (
    ApprovalSignal,
    CancelRequest,
    Decision,
    FreezeNotice,
    PendingApproval,
    RunbookRequest,
    RunbookResult,
    RunStatus,
    SteerAction,
    SteerRequest,
)

# A run whose worker is gone does not answer queries; say so instead of hanging the caller.
QUERY_TIMEOUT = timedelta(seconds=5)
UPDATE_TIMEOUT = timedelta(seconds=15)
T = TypeVar("T")


STATES = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "timed_out",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "continued_as_new",
}


TEMPORAL_ERRORS = (
    RPCError,
    RPCTimeoutOrCancelledError,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
"""What the Temporal client raises for a request it could not do; :func:`temporal_error` says
what each means for the person who asked."""


def temporal_error(err: Exception, run_id: str | None = None) -> Exception:
    """The error a front end can say for a Temporal error: a RunError, TemporalUnavailable, or
    (for a status nobody expects) ``err`` itself."""
    run = f"run {run_id}" if run_id else "the run"
    if isinstance(err, WorkflowUpdateFailedError):
        cause = err.cause
        return DecisionRefused(str(getattr(cause, "message", None) or cause or err))
    if isinstance(err, WorkflowQueryFailedError | WorkflowQueryRejectedError):
        return DecisionRefused(f"{run} could not answer: {err}")
    if isinstance(err, RPCTimeoutOrCancelledError):
        return TemporalUnavailable(f"{run} did not answer in time; try again")
    if not isinstance(err, RPCError):
        return err
    if err.status == RPCStatusCode.NOT_FOUND:
        return UnknownRun(f"no run {run_id!r}; `astra-ops ps` lists runs" if run_id else str(err))
    if err.status in (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.OUT_OF_RANGE):
        return InvalidInput(f"Temporal refused the request: {err.message}")
    if err.status in (
        RPCStatusCode.ALREADY_EXISTS,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.ABORTED,
    ):
        return DecisionRefused(f"{run} cannot do that now: {err.message}")
    if err.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.PERMISSION_DENIED,
        RPCStatusCode.UNAUTHENTICATED,
    ):
        return TemporalUnavailable(f"Temporal did not answer: {err.message}")
    return err


def visibility_literal(value: str) -> str:
    """``value`` as a quoted string in a visibility list filter: a quote or backslash in a
    subject must not end the literal (or change the query). The dev server's SQLite visibility
    matches no id that holds a backslash, escaped or not; such a lookup finds nothing."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _outcome(state: str, recorded: str | None) -> str | None:
    """A run that failed or was stopped by Temporal ended that way, whatever it recorded."""
    if state in ("failed", "terminated", "timed_out"):
        return state
    return recorded or (None if state == "running" else state)


def _params(request: RunbookRequest) -> dict[str, Any]:
    return request.model_dump(
        mode="json", exclude={"requester", "reason", "dry_run", "authorization"}
    )


def _body_hash(runbook: str, request: RunbookRequest) -> str:
    """What makes two starts the same request: runbook, parameters, requester and dry-run."""
    body = {"runbook": runbook, "params": _params(request), "dry_run": request.dry_run}
    return digest(json.dumps(body, sort_keys=True, separators=(",", ":")))


def _describe_params(params: Any) -> str:
    if not isinstance(params, dict):
        return "unknown parameters"
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def reason_of(err: BaseException) -> str:
    """The message a person needs from a query or update failure, not the SDK's wrapping."""
    cause = err.__cause__ or getattr(err, "cause", None)
    message = getattr(cause, "message", None) or getattr(err, "message", None)
    return str(message or cause or err)


async def call(awaitable: Awaitable[T], run_id: str | None = None) -> T:
    """Await a Temporal request, saying its failure as the front ends say it."""
    try:
        return await awaitable
    except TEMPORAL_ERRORS as err:
        raise temporal_error(err, run_id) from None


async def listed(client: Client, query: str, limit: int) -> AsyncIterator[WorkflowExecution]:
    """The executions a visibility query finds, newest first."""
    try:
        async for execution in client.list_workflows(query, limit=limit):
            yield execution
    except TEMPORAL_ERRORS as err:
        raise temporal_error(err) from None


def refused(err: WorkflowUpdateFailedError) -> RunError:
    """A validator's refusal: "you may not" when it raised ``PermissionError`` (the person may
    never do this), else "not now"."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type == "PermissionError":
        return NotAllowed(reason_of(err))
    return DecisionRefused(reason_of(err))


async def send_update(
    handle: WorkflowHandle[Any, Any], name: str, arg: BaseModel, what: str
) -> str:
    """Run an update on ``what`` (``run x``, ``incident y``) and return what it says.

    The server turns an update away with FAILED_PRECONDITION when the run's workflow task is
    not in a state to take it: the run is starting, its worker just went, or the task that
    carried the update failed because an event arrived meanwhile (a signal racing a run's last
    task: "unexpected workflow task failure"). The update was not applied, so it is sent again
    under the same update id (the server applies an id once) until ``UPDATE_TIMEOUT``; only then
    is the person told to try again.
    """
    update_id = str(uuid.uuid4())
    deadline = time.monotonic() + UPDATE_TIMEOUT.total_seconds()
    pause = 0.05
    while True:
        left = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
        try:
            said: str = await handle.execute_update(
                name, arg, id=update_id, result_type=str, rpc_timeout=left
            )
        except WorkflowUpdateFailedError as err:
            raise refused(err) from None
        except RPCError as err:
            if err.status == RPCStatusCode.FAILED_PRECONDITION and time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            raise _update_error(err, what) from None
        return said


def _update_error(err: RPCError, what: str) -> Exception:
    """What to tell a person whose update the server did not take."""
    if err.status == RPCStatusCode.NOT_FOUND:
        return DecisionRefused(f"{what} closed before the request reached it")
    if err.status == RPCStatusCode.DEADLINE_EXCEEDED:
        return DecisionRefused(
            f"{what} did not take the request within "
            f"{UPDATE_TIMEOUT.total_seconds():g}s; is a worker running? Nothing changed"
        )
    if err.status == RPCStatusCode.FAILED_PRECONDITION:
        return DecisionRefused(
            f"{what} is not ready to take requests yet ({err.message}); try again in a "
            "moment. Nothing changed"
        )
    return err


class Runs:
    """Start and steer runs as a caller the front end has identified.

    With a ``signer`` (the API, outside dev mode) every start, decision, cancel and freeze is
    signed for the run to verify; without one (dev mode) names are trusted, as dev mode says.
    """

    def __init__(
        self,
        client: Client,
        task_queue: str,
        policy: AccessPolicy,
        signer: Signer | None = None,
    ) -> None:
        self.client = client
        self.task_queue = task_queue
        self.policy = policy
        self.signer = signer

    def identify(self, user: str | None) -> str:
        """The caller, who must be a person the access policy knows: no anonymous actions."""
        if not user:
            raise NotAllowed("who are you? pass --as NAME or set ASTRA_OPS_USER")
        if not self.policy.known(user):
            raise NotAllowed(f"{user} is not in the access policy; ask an admin to add them")
        return user

    def vouch(self, said: Statement) -> Signed | None:
        """The API's signature over what the caller did; None in dev mode, where names count."""
        return self.signer.sign(said) if self.signer is not None else None

    def _access(self, runbook: str) -> RunbookAccess:
        try:
            return self.policy.runbook(runbook)
        except AccessPolicyError as err:
            raise NotAllowed(str(err)) from None

    async def start(
        self,
        runbook: str,
        params: dict[str, Any],
        *,
        requester: str,
        reason: str = "",
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> StartedRun:
        spec = runbook_spec(runbook)
        requester = self.identify(requester)
        access = self._access(runbook)
        why = access.may_start(runbook, requester, dry_run, self.policy.members)
        if why is not None:
            raise NotAllowed(why)
        request = runbook_request(
            spec, access, params, requester=requester, reason=reason, dry_run=dry_run
        )
        if not dry_run:
            frozen = await self.frozen()
            if frozen is not None:
                raise DecisionRefused(
                    f"astra-ops is frozen by {frozen.actor} ({frozen.reason}): only dry runs "
                    "start until an operator runs `astra-ops unfreeze`"
                )
        workflow_id = spec.workflow_id(request)
        body = _body_hash(runbook, request)
        key = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        if key is not None:
            earlier = await self._run_with_key(key)
            if earlier is not None:
                earlier_id, memo = earlier
                if memo.get("requester") != requester or memo.get("body") != body:
                    raise InvalidInput(
                        "this Idempotency-Key was used for another request (another body or "
                        "another user); use a new key for a new request"
                    )
                return StartedRun(run_id=earlier_id, runbook=runbook, existing=True)
        request_id = str(uuid.uuid4())
        signed = request.signed_by(self.signer, workflow_id) if self.signer else request
        attributes: list[SearchAttributePair[Any]] = [
            SearchAttributePair(sa.RUNBOOK, runbook),
            SearchAttributePair(sa.SEVERITY, spec.severity),
            SearchAttributePair(sa.SERVICE, spec.subject(request)),
            SearchAttributePair(sa.AWAITING_APPROVAL, False),
            SearchAttributePair(sa.DRY_RUN, dry_run),
        ]
        if key is not None:
            attributes.append(SearchAttributePair(sa.IDEMPOTENCY_KEY, key))
        handle = await call(
            self.client.start_workflow(
                runbook,
                signed,
                id=workflow_id,
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={
                    "request_id": request_id,
                    "requester": requester,
                    "body": body,
                    "params": _params(request),
                },
                search_attributes=TypedSearchAttributes(attributes),
                static_summary=f"{spec.title} of {spec.subject(request)}"
                + (" (dry-run)" if dry_run else ""),
                static_details=f"started by {requester}: {reason or 'no reason given'}",
            )
        )
        memo = await (await call(handle.describe())).memo()
        if memo.get("request_id") == request_id:
            return StartedRun(run_id=workflow_id, runbook=runbook, existing=False)
        if memo.get("requester") != requester or memo.get("body") != body:
            raise OpenRunConflict(
                f"{workflow_id} is already open, started by {memo.get('requester')} with "
                f"{_describe_params(memo.get('params'))}; decide or cancel that run first",
                run_id=workflow_id,
                requester=str(memo.get("requester")),
                params=memo.get("params") or {},
            )
        return StartedRun(run_id=workflow_id, runbook=runbook, existing=True)

    async def _run_with_key(self, key: str) -> tuple[str, Mapping[str, Any]] | None:
        query = f"{sa.IDEMPOTENCY_KEY.name} = {visibility_literal(key)}"
        async for execution in listed(self.client, query, limit=1):
            return execution.id, await execution.memo()
        return None

    async def view(self, run_id: str) -> RunView:
        handle = self._handle(run_id)
        desc = await call(handle.describe(), run_id)
        state = STATES.get(desc.status, "unknown") if desc.status else "unknown"
        status: RunStatus | None = None
        result: RunbookResult | None = None
        failure: str | None = None
        try:
            status = await self._status(handle)
        except DecisionRefused:
            status = None  # no worker to answer; closed runs still have their result below
        if state == "completed":
            result = await handle.result()
        elif state == "failed":
            try:
                await handle.result()
            except Exception as err:  # the failure is the answer here
                failure = redact(str(err.__cause__ or err))
        return RunView(
            run_id=run_id,
            runbook=desc.workflow_type,
            state=state,
            started_at=desc.start_time,
            closed_at=desc.close_time,
            status=status,
            result=result,
            failure=failure,
        )

    async def list_runs(
        self, *, awaiting_approval: bool = False, limit: int = 50
    ) -> list[RunSummary]:
        query = f"{sa.RUNBOOK.name} IS NOT NULL"
        if awaiting_approval:
            query += f" AND {sa.AWAITING_APPROVAL.name} = true AND ExecutionStatus = 'Running'"
        runs = []
        async for execution in listed(self.client, query, limit):
            attrs = execution.typed_search_attributes
            state = STATES.get(execution.status, "unknown") if execution.status else "?"
            runs.append(
                RunSummary(
                    run_id=execution.id,
                    runbook=attrs.get(sa.RUNBOOK) or execution.workflow_type,
                    state=state,
                    outcome=_outcome(state, attrs.get(sa.OUTCOME)),
                    dry_run=bool(attrs.get(sa.DRY_RUN)),
                    step=attrs.get(sa.STEP),
                    awaiting_approval=bool(attrs.get(sa.AWAITING_APPROVAL)),
                    started_at=execution.start_time,
                )
            )
        return runs

    async def approvals(self) -> list[tuple[str, PendingApproval]]:
        pending = []
        for run in await self.list_runs(awaiting_approval=True):
            try:
                status = await self._status(self._handle(run.run_id))
            except DecisionRefused:
                continue  # closed between the listing and the query
            pending += [(run.run_id, p) for p in status.pending_approvals]
        return pending

    async def _running(self, run_id: str) -> tuple[WorkflowHandle[Any, RunbookResult], str]:
        """The open run's handle and Temporal run id; refuse a closed run."""
        handle = self._handle(run_id)
        desc = await call(handle.describe(), run_id)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            state = STATES.get(desc.status, "closed") if desc.status else "closed"
            raise DecisionRefused(f"run {run_id} is already {state}")
        return handle, desc.run_id

    async def _status(self, handle: WorkflowHandle[Any, RunbookResult]) -> RunStatus:
        try:
            status: RunStatus = await handle.query(
                "status", result_type=RunStatus, rpc_timeout=QUERY_TIMEOUT
            )
        except (WorkflowQueryFailedError, RPCError) as err:
            raise DecisionRefused(
                f"run {handle.id} does not answer ({reason_of(err)}); is a worker running?"
            ) from None
        return status

    async def signed_decision(self, run_id: str, decision: Decision) -> Decision:
        """The decision as the run will accept it: checked against the gate's rules, its step
        made explicit, and (outside dev mode) signed. Also what `--print-signal` prints."""
        approver = self.identify(decision.approver)
        handle, temporal_run = await self._running(run_id)
        status = await self._status(handle)
        pending = {p.step: p for p in status.pending_approvals}
        refused = refusal(decision, pending, status.requester)
        if refused is not None:
            raise (NotAllowed if refused.forbidden else DecisionRefused)(refused.why)
        step = step_of(decision, pending)
        return decision.model_copy(
            update={
                "step": step,
                "authorization": self.vouch(
                    statement(
                        "decision",
                        approver,
                        run_id,
                        decision.comment,
                        run_id=temporal_run,
                        step=step,
                        decision=decision.decision,
                    )
                ),
            }
        )

    async def signed_signal(self, run_id: str, decision: Decision) -> dict[str, Any]:
        """What the stock `temporal workflow signal` must send for this decision to count."""
        signed = await self.signed_decision(run_id, decision)
        payload = ApprovalSignal(
            approver=signed.approver,
            step=signed.step,
            comment=signed.comment,
            authorization=signed.authorization,
        )
        return {
            "workflow_id": run_id,
            "signal": decision.decision,
            "input": payload.model_dump(mode="json"),
        }

    async def decide(self, run_id: str, decision: Decision) -> str:
        signed = await self.signed_decision(run_id, decision)
        return await self._update(run_id, "decide", signed)

    async def cancel(self, run_id: str, user: str, reason: str = "") -> str:
        """Ask the run to stop; it records who and why, undoes its changes, then ends."""
        actor = self.identify(user)
        handle, temporal_run = await self._running(run_id)
        status = await self._status(handle)
        why = self._access(status.runbook).may_cancel(
            status.runbook, actor, status.requester, self.policy.members
        )
        if why is not None:
            raise NotAllowed(why)
        request = CancelRequest(
            actor=actor,
            reason=reason,
            authorization=self.vouch(
                statement("cancel", actor, run_id, reason, run_id=temporal_run)
            ),
        )
        return await self._update(run_id, "cancel", request)

    async def steer(self, run_id: str, user: str, action: SteerAction, reason: str = "") -> str:
        """Promote, abort, pause or resume a release run, or switch a blue/green one back; the
        run checks who may (the access policy) before it takes it."""
        actor = self.identify(user)
        handle, temporal_run = await self._running(run_id)
        status = await self._status(handle)
        takes = steer_actions(status.runbook)
        if action not in takes:
            which = sorted(name for name in RUNBOOKS if action in steer_actions(name))
            raise DecisionRefused(
                f"run {run_id} is a {status.runbook} run, which takes no {action.value}; "
                f"{action.value} steers {' and '.join(which)} runs"
            )
        request = SteerRequest(
            action=action,
            actor=actor,
            reason=reason,
            authorization=self.vouch(
                statement(
                    "steer", actor, run_id, reason, run_id=temporal_run, decision=action.value
                )
            ),
        )
        return await self._update(run_id, "steer", request)

    async def _update(self, run_id: str, name: str, arg: BaseModel) -> str:
        return await send_update(self._handle(run_id), name, arg, f"run {run_id}")

    # -- the kill switch -------------------------------------------------------------------

    async def frozen(self) -> FreezeNotice | None:
        handle = self.client.get_workflow_handle(KILL_SWITCH_ID)
        try:
            desc = await call(handle.describe(), KILL_SWITCH_ID)
        except UnknownRun:
            return None
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return None
        try:
            notice: FreezeNotice | None = await handle.query(
                "state",
                rpc_timeout=QUERY_TIMEOUT,
                result_type=FreezeNotice | None,  # type: ignore[arg-type]
            )
        except (WorkflowQueryFailedError, RPCError):
            # Running but not answering (no worker yet): treat it as frozen, the safe side.
            return FreezeNotice(actor="(unknown)", reason="the kill switch is turning on")
        return notice

    def _operator(self, user: str) -> str:
        actor = self.identify(user)
        if not self.policy.is_operator(actor):
            raise NotAllowed(
                f"{actor} is not an operator; the access policy lets "
                f"{', '.join(self.policy.operators) or 'nobody'} freeze and unfreeze"
            )
        return actor

    async def freeze(self, user: str, reason: str) -> str:
        actor = self._operator(user)
        if not reason.strip():
            raise InvalidInput("say why you freeze: --reason")
        notice = FreezeNotice(
            actor=actor,
            reason=reason,
            authorization=self.vouch(statement("freeze", actor, KILL_SWITCH_ID, reason)),
        )
        handle = await call(
            self.client.start_workflow(
                KillSwitch.run,
                notice,
                id=KILL_SWITCH_ID,
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={"actor": actor, "reason": reason},
                static_summary=f"astra-ops frozen by {actor}",
                static_details=reason,
            )
        )
        memo = await (await call(handle.describe())).memo()
        if memo.get("actor") != actor or memo.get("reason") != reason:
            raise DecisionRefused(f"already frozen by {memo.get('actor')}: {memo.get('reason')}")
        return f"frozen by {actor}: no mutating step starts in any run until `astra-ops unfreeze`"

    async def unfreeze(self, user: str, reason: str = "") -> str:
        actor = self._operator(user)
        handle = self.client.get_workflow_handle(KILL_SWITCH_ID)
        try:
            desc = await call(handle.describe(), KILL_SWITCH_ID)
        except UnknownRun:
            desc = None
        if desc is None or desc.status != WorkflowExecutionStatus.RUNNING:
            raise DecisionRefused("astra-ops is not frozen")
        notice = FreezeNotice(
            actor=actor,
            reason=reason,
            authorization=self.vouch(
                statement("unfreeze", actor, KILL_SWITCH_ID, reason, run_id=desc.run_id)
            ),
        )
        return await self._update(KILL_SWITCH_ID, "unfreeze", notice)

    def _handle(self, run_id: str) -> WorkflowHandle[Any, RunbookResult]:
        return self.client.get_workflow_handle(run_id, result_type=RunbookResult)
