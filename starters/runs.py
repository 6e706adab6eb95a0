"""Starting and steering runs: the one implementation behind the CLI and the HTTP API.

Errors are typed so each front end can say them its own way (an exit code and one line, or an
HTTP status and a JSON body) while meaning the same thing.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from runtime import search_attributes as sa
from runtime.access import AccessPolicy
from runtime.client import TemporalUnavailable
from runtime.redact import redact
from workflows.catalogue import RUNBOOKS
from workflows.models import Decision, PendingApproval, RunbookResult, RunStatus, StepStatus
from workflows.runbook import RunbookSpec


class RunError(Exception):
    """A request that cannot be done; ``kind`` says why in a way front ends can map."""

    kind = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownRunbook(RunError):
    kind = "not_found"


class UnknownRun(RunError):
    kind = "not_found"


class InvalidInput(RunError):
    kind = "invalid"


class NotAllowed(RunError):
    kind = "forbidden"


class DecisionRefused(RunError):
    kind = "conflict"


class StartedRun(BaseModel):
    run_id: str
    runbook: str
    existing: bool


class RunView(BaseModel):
    run_id: str
    runbook: str
    state: str
    started_at: datetime | None
    closed_at: datetime | None
    status: RunStatus | None
    result: RunbookResult | None = None
    failure: str | None = None

    @property
    def steps(self) -> list[StepStatus]:
        """The live steps while a worker answers, else those the finished run returned."""
        if self.status is not None:
            return self.status.steps
        return self.result.steps if self.result is not None else []


class RunSummary(BaseModel):
    run_id: str
    runbook: str
    state: str
    step: str | None
    awaiting_approval: bool
    started_at: datetime | None


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


def runbook_spec(name: str) -> RunbookSpec:
    try:
        return RUNBOOKS[name].spec
    except KeyError:
        raise UnknownRunbook(
            f"no runbook named {name!r}; known: {', '.join(sorted(RUNBOOKS))}"
        ) from None


def _input_error(name: str, err: ValidationError) -> InvalidInput:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()
    )
    return InvalidInput(f"bad parameters for {name}: {problems}")


class Runs:
    def __init__(self, client: Client, task_queue: str, policy: AccessPolicy) -> None:
        self.client = client
        self.task_queue = task_queue
        self.policy = policy

    def identify(self, user: str | None) -> str:
        """The caller, who must be a person the access policy knows: no anonymous actions."""
        if not user:
            raise NotAllowed("who are you? pass --as NAME or set ASTRA_OPS_USER")
        if not self.policy.known(user):
            raise NotAllowed(f"{user} is not in the access policy; ask an admin to add them")
        return user

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
        reserved = {"requester", "dry_run", "reason"} & params.keys()
        if reserved:
            raise InvalidInput(f"{', '.join(sorted(reserved))} cannot be passed as parameters")
        try:
            request = spec.request.model_validate(
                {**params, "requester": requester, "reason": reason, "dry_run": dry_run}
            )
        except ValidationError as err:
            raise _input_error(runbook, err) from None
        workflow_id = spec.workflow_id(request)
        if idempotency_key:
            earlier = await self._run_with_key(workflow_id, idempotency_key)
            if earlier:
                return StartedRun(run_id=workflow_id, runbook=runbook, existing=True)
        request_id = idempotency_key or str(uuid.uuid4())
        handle = await self._call(
            self.client.start_workflow(
                runbook,
                request,
                id=workflow_id,
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={"request_id": request_id, "requester": requester},
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(sa.RUNBOOK, runbook),
                        SearchAttributePair(sa.SEVERITY, spec.severity),
                        SearchAttributePair(sa.SERVICE, spec.subject(request)),
                        SearchAttributePair(sa.AWAITING_APPROVAL, False),
                    ]
                ),
                static_summary=f"{spec.title} of {spec.subject(request)}"
                + (" (dry-run)" if dry_run else ""),
                static_details=f"started by {requester}: {reason or 'no reason given'}",
            )
        )
        memo = await (await self._call(handle.describe())).memo()
        return StartedRun(
            run_id=workflow_id, runbook=runbook, existing=memo.get("request_id") != request_id
        )

    async def _run_with_key(self, workflow_id: str, key: str) -> bool:
        async for execution in self._call_iter(
            f"WorkflowId = {visibility_literal(workflow_id)}", limit=100
        ):
            if (await execution.memo()).get("request_id") == key:
                return True
        return False

    async def view(self, run_id: str) -> RunView:
        handle = self._handle(run_id)
        desc = await self._call(handle.describe(), run_id)
        state = STATES.get(desc.status, "unknown") if desc.status else "unknown"
        status: RunStatus | None = None
        result: RunbookResult | None = None
        failure: str | None = None
        try:
            status = await handle.query("status", result_type=RunStatus)
        except (WorkflowQueryFailedError, RPCError):
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
        async for execution in self._call_iter(query, limit):
            attrs = execution.typed_search_attributes
            runs.append(
                RunSummary(
                    run_id=execution.id,
                    runbook=attrs.get(sa.RUNBOOK) or execution.workflow_type,
                    state=STATES.get(execution.status, "unknown") if execution.status else "?",
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
                status = await self._handle(run.run_id).query("status", result_type=RunStatus)
            except (WorkflowQueryFailedError, RPCError):
                continue  # closed between the listing and the query
            pending += [(run.run_id, p) for p in status.pending_approvals]
        return pending

    async def decide(self, run_id: str, decision: Decision) -> str:
        decision = decision.model_copy(update={"approver": self.identify(decision.approver)})
        handle = self._handle(run_id)
        desc = await self._call(handle.describe(), run_id)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise DecisionRefused(f"run {run_id} is {STATES.get(desc.status, 'closed')}")
        status = await handle.query("status", result_type=RunStatus)
        self._authorize(status, decision)
        try:
            said: str = await handle.execute_update("decide", decision, result_type=str)
            return said
        except WorkflowUpdateFailedError as err:
            raise DecisionRefused(str(err.cause.message if err.cause else err)) from None  # type: ignore[attr-defined]

    @staticmethod
    def _authorize(status: RunStatus, decision: Decision) -> None:
        """Refuse people who may never decide this step as forbidden, before asking the run.

        The run's own validator is still the authority; this only tells "not allowed" (403)
        apart from "not now" (409) for the front ends.
        """
        pending = [p for p in status.pending_approvals if decision.step in (None, p.step)]
        if len(pending) != 1:
            return
        if decision.decision == "approve" and decision.approver == status.requester:
            raise NotAllowed(
                f"{decision.approver} started this run; the requester cannot approve it"
            )
        if decision.approver not in pending[0].members and decision.approver != status.requester:
            raise NotAllowed(
                f"{decision.approver} is not in the group(s) allowed to decide step "
                f"'{pending[0].step}' ({', '.join(pending[0].groups)})"
            )

    async def cancel(self, run_id: str, user: str) -> None:
        self.identify(user)
        handle = self._handle(run_id)
        desc = await self._call(handle.describe(), run_id)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise DecisionRefused(f"run {run_id} is already {STATES.get(desc.status, 'closed')}")
        await self._call(handle.cancel(), run_id)

    def _handle(self, run_id: str) -> WorkflowHandle[Any, RunbookResult]:
        return self.client.get_workflow_handle(run_id, result_type=RunbookResult)

    async def _call(self, awaitable: Any, run_id: str | None = None) -> Any:
        try:
            return await awaitable
        except TEMPORAL_ERRORS as err:
            raise temporal_error(err, run_id) from None

    async def _call_iter(self, query: str, limit: int) -> Any:
        try:
            async for execution in self.client.list_workflows(query, limit=limit):
                yield execution
        except TEMPORAL_ERRORS as err:
            raise temporal_error(err) from None
