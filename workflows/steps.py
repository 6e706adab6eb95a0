"""The one step runner: named steps, their state, timeouts, retries, summaries and dry-run.

A runbook says *what* it does (check, approval, act, verify); how a step is recorded, shown in
the UI and made safe to retry lives here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar, overload

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.types import MethodAsyncSingleParam, MethodSyncSingleParam

from runtime import search_attributes as sa
from runtime.metrics import FAILED, RunMetrics
from runtime.redact import redact
from workflows.approval import ApprovalGate, RunbookStopped, on_exit, operator_refusal, proven
from workflows.errors import CODE_ERRORS
from workflows.incident_models import INCIDENT_WORKFLOW
from workflows.models import (
    MAX_COMMENT,
    MAX_NAME,
    TLS_SCAN_WORKFLOW,
    CancelRequest,
    FreezeNotice,
    Outcome,
    RunbookRequest,
    RunbookResult,
    RunStatus,
    SteerRecord,
    StepState,
    StepStatus,
)
from workflows.timeouts import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    REMOTE_CALL_TIMEOUT,
    heartbeat_timeout,
)

with workflow.unsafe.imports_passed_through():
    from activities.access import (
        AccessActivities,
        Admission,
        AdmissionRequest,
        AutomaticAction,
        AutomaticClaim,
    )
    from activities.mutation import Mutation
    from activities.notify import NotifyActivities, RotationNotice
    from activities.privilege import is_privileged, privileged_queue

A = TypeVar("A")
"""An activity's argument."""
M = TypeVar("M", bound=Mutation)
"""A mutating activity's argument."""
R = TypeVar("R")
"""An activity's result."""

LEANER_RUNNER = "leaner-step-runner"
"""One patch for what the runner stopped doing per run in November 2026: admission as a local
activity, and ``AstraStep`` set only by steps that change something or wait for people. Runs
begun before it replay the old way."""

# A frozen run re-reads the kill switch this often, in case it missed the unfreeze broadcast.
FREEZE_RECHECK = timedelta(seconds=30)
ADMIT_TIMEOUT = timedelta(seconds=30)
"""Admission runs as a local activity: a worker that dies inside it fails the workflow task, which
times out on its own (10 s); this only bounds a slow policy read or Temporal lookup."""
# An undo that fails, or hits a bug, leaves the rollback incomplete: said so, never hidden.
UNDO_ERRORS: tuple[type[Exception], ...] = (ActivityError, *CODE_ERRORS)


def task_queue_for(activity: Callable[..., Any]) -> str | None:
    """The task queue ``activity`` runs on: the run's own (None), or for a privileged one
    (``activities.privilege``) the queue only workers deployed with its rights poll."""
    if is_privileged(activity):
        return privileged_queue(workflow.info().task_queue)
    return None


class StepFailed(Exception):
    """A step found the world not as it must be; the runbook unwinds its compensations."""


def failure_message(err: BaseException) -> str:
    """The innermost message of an activity failure: what a person needs, not the wrapping,
    and none of the credentials it may quote (it becomes the step's detail, the run's current
    details and its failure, which everyone who can see the run reads)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    if isinstance(err, ValidationError):  # its own text spans many lines
        return redact(
            f"{err.title}: "
            + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in err.errors()
            )
        )
    return redact(str(err)) or type(err).__name__


def _describe(result: Any) -> str:
    """What a step's record says of its result: a mutation's ``detail``, a reading's
    ``summary()``, or the items a list holds."""
    detail = getattr(result, "detail", None)
    if isinstance(detail, str):
        return detail
    if isinstance(result, list):
        return f"{len(result)} found: {', '.join(map(str, result[:10]))}" + (
            ", ..." if len(result) > 10 else ""
        )
    summary = getattr(result, "summary", None)
    return str(summary()) if callable(summary) else ""


class StepRunner:
    def __init__(
        self,
        runbook: str,
        plan: Callable[[RunbookRequest], list[str]],
        rotation: str | None = None,
    ) -> None:
        self.runbook = runbook
        self.plan = plan
        """The steps a request's run may take (its catalogue entry's), declared when it starts."""
        self.rotation = rotation
        self.steps: dict[str, StepStatus] = {}
        self.current: str | None = None
        self.request = RunbookRequest(requester="unknown")
        self.outcome: Outcome | None = None
        self.summary = ""
        self.rollback_note = ""
        self.failed_step: str | None = None
        self.gate = ApprovalGate(runbook, on_change=self._show)
        self.admission: Admission | None = None
        self.cancel_request: CancelRequest | None = None
        self.frozen: FreezeNotice | None = None
        self.steered: list[SteerRecord] = []
        """What people steered a release run with (``workflows.steering``), for its status."""
        self._early: list[tuple[str, FreezeNotice]] = []
        self._body: asyncio.Task[RunbookResult] | None = None

    @cached_property
    def metrics(self) -> RunMetrics:
        """The run's counters and step durations: replay-safe, so each is recorded once."""
        return RunMetrics(workflow.metric_meter())

    # -- running a runbook -------------------------------------------------------------------

    async def run(
        self, request: RunbookRequest, body: Callable[[], Awaitable[RunbookResult]]
    ) -> RunbookResult:
        """Admit the request, then run the runbook's body; a person stopping it is an outcome,
        not a failure."""
        self.request = request
        self.metrics.started(self.runbook)
        # Declared before the first await, so the first status query already shows them all.
        self.steps = {name: StepStatus(name=name) for name in self.plan(request)}
        self.gate.requester = request.requester
        await self._admit(request)
        self._body = asyncio.create_task(self._unwound(body))
        try:
            return await self._body
        except (asyncio.CancelledError, ActivityError) as err:
            if not is_cancelled_exception(err):
                raise
            self._stop_at_current(self._cancelled_note())
            who = self.cancel_request
            if who is None:
                # Temporal's own cancel (the stock `temporal workflow cancel`): nobody proved who.
                self.finish(
                    Outcome.CANCELLED,
                    "cancelled by an unknown identity (a Temporal cancel request)"
                    + self.rollback_note,
                )
                raise
            return self.finish(
                Outcome.CANCELLED,
                f"cancelled by {who.actor}: {who.reason or 'no reason given'}" + self.rollback_note,
            )

    async def _unwound(self, body: Callable[[], Awaitable[RunbookResult]]) -> RunbookResult:
        try:
            return await body()
        except RunbookStopped as stop:
            return self.finish(stop.outcome, stop.summary)
        except (ActivityError, StepFailed) as err:
            if is_cancelled_exception(err):
                raise  # the run is being cancelled; the compensations have run
            self._close_pending(f"not reached: the run failed at '{self.failed_step}'")
            self.metrics.finished(self.runbook, FAILED)
            raise ApplicationError(
                f"{self.runbook} failed at step '{self.failed_step}': {failure_message(err)}"
                + self.rollback_note,
                type="RunbookFailed",
                non_retryable=True,
            ) from err
        except CODE_ERRORS as err:
            self._close_pending("not reached: the run stopped on a bug in astra-ops")
            self.metrics.finished(self.runbook, FAILED)
            raise ApplicationError(
                f"{self.runbook} failed at step '{self.failed_step or self.current}': unexpected "
                f"{type(err).__name__} in the runbook's code: {failure_message(err)}"
                f"{self.rollback_note}. This is a bug in astra-ops: report it with the run's id",
                type="RunbookBug",
                non_retryable=True,
            ) from err

    async def _admit(self, request: RunbookRequest) -> None:
        """Learn the policy and the trusted keys, then refuse a start nobody proved or allowed.

        The API refuses these before starting anything; this is the check a start that bypassed
        the API (straight to Temporal) cannot skip.
        """
        parent = workflow.info().parent
        admit = AdmissionRequest(
            runbook=self.runbook,
            parent_workflow_id=parent.workflow_id if parent else None,
            parent_run_id=parent.run_id if parent else None,
        )
        # A local activity: it reads a file and asks Temporal one question, and is every run's
        # first step, so it costs no activity task round trip. Runs begun as an activity replay so.
        if workflow.patched(LEANER_RUNNER):
            admission = await workflow.execute_local_activity_method(
                AccessActivities.admit,
                admit,
                start_to_close_timeout=ADMIT_TIMEOUT,
                retry_policy=DEFAULT_RETRY,
                summary="check the access policy",
            )
        else:
            admission = await workflow.execute_activity_method(
                AccessActivities.admit,
                admit,
                start_to_close_timeout=DEFAULT_TIMEOUT,
                retry_policy=DEFAULT_RETRY,
                summary="check the access policy",
            )
        self.admission = admission
        self.gate.trust = admission.trust
        self.frozen = admission.freeze
        for signal, notice in self._early:
            self.on_freeze_signal(signal, notice)
        self._early.clear()
        if parent is not None and admission.parent_type == INCIDENT_WORKFLOW:
            why = self._incident_start_refusal(request, admission, parent.workflow_id)
        elif parent is not None and admission.parent_type == TLS_SCAN_WORKFLOW:
            why = self._scan_start_refusal(request, admission, parent.workflow_id)
        else:
            why = proven(
                request.authorization,
                admission.trust,
                act="start",
                actor=request.requester,
                payload=request.signed_payload(),
                run_id="",
                at=workflow.info().workflow_start_time,
            ) or admission.access.may_start(
                self.runbook, request.requester, request.dry_run, self._members
            )
        violations = admission.access.violations(request.model_dump())
        if why is None and violations:
            why = "; ".join(violations)
        if why is not None:
            self.finish(Outcome.ABORTED, f"refused: {why}")
            raise ApplicationError(
                f"{self.runbook} refused: {why}", type="RunRefused", non_retryable=True
            )
        self._show()

    def _incident_start_refusal(
        self, request: RunbookRequest, admission: Admission, incident: str
    ) -> str | None:
        """A start by an incident: Temporal records the parent (a client cannot forge it), the
        admission checked that the parent is an incident, and the incident checked who asked.
        The incident itself as requester (an alert's runbook) needs the policy's ``on_alert:
        start``; a person who asked through the incident needs the right to start it."""
        if request.requester != incident:
            return admission.access.may_start(
                self.runbook, request.requester, request.dry_run, self._members
            )
        if admission.access.on_alert != "start":
            return (
                f"the access policy does not let an incident start {self.runbook} on its own "
                f"(runbooks.{self.runbook}.on_alert: {admission.access.on_alert}); a person "
                "may start it from the incident"
            )
        return None

    def _scan_start_refusal(
        self, request: RunbookRequest, admission: Admission, scan: str
    ) -> str | None:
        """A start by the scheduled scan: Temporal records the parent and the admission checked
        its type, so the scan is proven as the requester; it needs the policy's ``on_schedule:
        start``. The scan names no person, so any other requester is a claim nobody proved."""
        if request.requester != scan:
            return (
                f"a {TLS_SCAN_WORKFLOW} run starts runbooks only as itself ({scan}), not as "
                f"{request.requester}; a person starts {self.runbook} through the API"
            )
        if admission.access.on_schedule != "start":
            return (
                f"the access policy does not let the scheduled scan start {self.runbook} on its "
                f"own (runbooks.{self.runbook}.on_schedule: {admission.access.on_schedule}); "
                "set it to start, or start it by hand when the scan reports a renewal due"
            )
        return None

    def _members(self, groups: list[str]) -> list[str]:
        assert self.admission is not None
        return sorted({m for g in groups for m in self.admission.members.get(g, [])})

    def _cancelled_note(self) -> str:
        if self.cancel_request is not None:
            return f"cancelled by {self.cancel_request.actor}"
        return "cancelled by an unknown identity"

    def _stop_at_current(self, why: str) -> None:
        if self.current is not None and self.steps[self.current].state not in (
            StepState.DONE,
            StepState.SKIPPED,
            StepState.FAILED,
        ):
            self._mark(self.current, StepState.FAILED, why)

    # -- cancel and freeze, as people ask for them ---------------------------------------------

    def validate_cancel(self, req: CancelRequest) -> str | None:
        """Why this cancel must be refused (before it enters history), or None."""
        if self.admission is None or self._body is None:
            return "the run is still starting; try again in a moment"
        if self.outcome is not None or self.cancel_request is not None or self._body.done():
            return "the run is already finishing"
        if not req.actor or len(req.actor) > MAX_NAME or len(req.reason) > MAX_COMMENT:
            return f"a cancel needs an actor (<= {MAX_NAME} chars) and a reason <= {MAX_COMMENT}"
        return self.admission.access.may_cancel(
            self.runbook, req.actor, self.request.requester, self._members
        ) or proven(
            req.authorization, self.gate.trust, act="cancel", actor=req.actor, payload=req.reason
        )

    def cancel(self, req: CancelRequest) -> str:
        why = self.validate_cancel(req)
        if why is not None:
            self.gate.refused_count += 1
            return why
        return self.stop(req)

    def stop(self, req: CancelRequest) -> str:
        """Cancel the run's body for a request already validated (a cancel, or an abort outside
        a window): the compensations undo what it changed."""
        assert self._body is not None
        self.cancel_request = req
        self._body.cancel()
        self._show()
        return f"cancelled by {req.actor}; undoing what the run changed"

    def on_freeze_signal(self, signal: str, notice: FreezeNotice) -> None:
        """Hold (``freeze``) or resume (``unfreeze``) mutating steps, if an operator proved it."""
        if self.admission is None:
            self._early.append((signal, notice))
            return
        if signal == "unfreeze" and self.frozen and notice.switch_run != self.frozen.switch_run:
            why: str | None = "the unfreeze is for another freeze"
        else:
            run_id = notice.switch_run if signal == "unfreeze" else ""
            why = operator_refusal(
                notice, self.admission.operators, self.gate.trust, signal, run_id
            )
        if why is not None:
            self.gate.refused_count += 1
            workflow.logger.warning("refused %s: %s", signal, why)
            return
        self.frozen = notice if signal == "freeze" else None
        self._show()

    async def _hold_while_frozen(self, name: str) -> None:
        """No mutating step starts while the kill switch is on; the run waits, visibly."""
        while self.frozen is not None:
            frozen = self.frozen
            self._start(name, StepState.FROZEN, sa_step=f"frozen before: {name}")
            self.steps[name].detail = f"frozen by {frozen.actor}: {frozen.reason}"
            self._show()
            try:
                await workflow.wait_condition(lambda: self.frozen is None, timeout=FREEZE_RECHECK)
            except TimeoutError:
                self.frozen = await workflow.execute_activity_method(
                    AccessActivities.freeze_state,
                    start_to_close_timeout=DEFAULT_TIMEOUT,
                    retry_policy=DEFAULT_RETRY,
                    summary="is the kill switch still on?",
                )

    async def within_automatic_limit(self, step: str, scope: str) -> AutomaticClaim | None:
        """Count ``step`` against the policy's budget of unattended actions on ``scope``.

        None when the policy sets no budget for the step or nothing would change (dry-run);
        otherwise whether the budget allows one more without a person.
        """
        assert self.admission is not None
        budget = self.admission.access.automatic.get(step)
        if budget is None or self.request.dry_run:
            return None
        info = workflow.info()
        return await workflow.execute_activity_method(
            AccessActivities.claim_automatic_action,
            AutomaticAction(
                runbook=self.runbook,
                step=step,
                scope=scope,
                token=f"{info.workflow_id}/{info.run_id}/{step}",
                limit=budget.max,
                per_seconds=budget.per_seconds,
            ),
            start_to_close_timeout=DEFAULT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary=f"count unattended '{step}' on {scope}",
        )

    def _close_pending(self, why: str) -> None:
        """Steps the run will never take say so, rather than stay ``pending``."""
        for step in self.steps.values():
            if step.state == StepState.PENDING:
                step.state = StepState.SKIPPED
                step.detail = step.detail or why
        self._show()

    def finish(self, outcome: Outcome, summary: str) -> RunbookResult:
        done = outcome in (Outcome.DONE, Outcome.NO_CHANGE)
        if self.outcome is None:
            self.metrics.finished(self.runbook, outcome.value)
        self._close_pending("not needed" if done else "not reached")
        self.outcome, self.summary, self.current = outcome, summary, None
        workflow.upsert_search_attributes([sa.OUTCOME.value_set(outcome.value)])
        self._show()
        return RunbookResult(
            runbook=self.runbook,
            outcome=outcome,
            summary=summary,
            dry_run=self.request.dry_run,
            steps=list(self.steps.values()),
        )

    # -- the kinds of step -------------------------------------------------------------------

    # Each kind is typed as ``workflow.execute_activity_method`` is: an activity method (async
    # or not) of one argument, the argument it takes, and what it returns; so mypy checks what
    # a runbook passes to a step and how it uses the answer.
    #
    # ``start_to_close_timeout`` is how long the step's activity may take. Past DEFAULT_TIMEOUT
    # the step is a long one: its activity must heartbeat, and the runner gives it the heartbeat
    # timeout that tells a dead worker within seconds (workflows/timeouts.py).

    @overload
    async def check(
        self,
        name: str,
        activity: MethodAsyncSingleParam[Any, A, R],
        arg: A,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    @overload
    async def check(
        self,
        name: str,
        activity: MethodSyncSingleParam[Any, A, R],
        arg: A,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    async def check(
        self,
        name: str,
        activity: Callable[..., Any],
        arg: Any,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> Any:
        """A read-only step: runs in dry-run too, because its answer drives what comes next."""
        return await self._step(name, activity, arg, start_to_close_timeout)

    @overload
    async def act(
        self,
        name: str,
        activity: MethodAsyncSingleParam[Any, M, R],
        arg: M,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    @overload
    async def act(
        self,
        name: str,
        activity: MethodSyncSingleParam[Any, M, R],
        arg: M,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    async def act(
        self,
        name: str,
        activity: Callable[..., Any],
        arg: Mutation,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> Any:
        """A mutating step, told to only report in dry-run, with a token that makes retries safe.

        While the kill switch is on it waits before it starts (a dry-run changes nothing, so it
        does not wait).
        """
        if not self.request.dry_run:
            await self._hold_while_frozen(name)
        info = workflow.info()
        arg = arg.model_copy(
            update={
                "dry_run": self.request.dry_run,
                "token": f"{info.workflow_id}/{info.run_id}/{name}",
            }
        )
        return await self._step(name, activity, arg, start_to_close_timeout, changes=True)

    @overload
    async def verify(
        self,
        name: str,
        activity: MethodAsyncSingleParam[Any, A, R],
        arg: A,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    @overload
    async def verify(
        self,
        name: str,
        activity: MethodSyncSingleParam[Any, A, R],
        arg: A,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> R: ...

    async def verify(
        self,
        name: str,
        activity: Callable[..., Any],
        arg: Any,
        *,
        start_to_close_timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> Any:
        """Confirm the world reached the goal.

        A dry-run changed nothing, so it has nothing to confirm: a runbook finishes before its
        verify steps (they show as skipped), and one that verifies in a dry-run has a bug.
        """
        if self.request.dry_run:
            raise AssertionError(
                f"step '{name}' verifies in a dry-run, which changed nothing to verify; the "
                "runbook must finish before its verify steps when request.dry_run is set"
            )
        return await self._step(name, activity, arg, start_to_close_timeout)

    @overload
    async def call(
        self, activity: MethodAsyncSingleParam[Any, A, R], arg: A, *, summary: str
    ) -> R: ...

    @overload
    async def call(
        self, activity: MethodSyncSingleParam[Any, A, R], arg: A, *, summary: str
    ) -> R: ...

    async def call(self, activity: Callable[..., Any], arg: Any, *, summary: str) -> Any:
        """A read that is part of the current step rather than a step of its own (a window's
        measurements): the runner's timeout and retries, no record in the step list."""
        return await workflow.execute_activity(
            activity,
            arg,
            task_queue=task_queue_for(activity),
            start_to_close_timeout=DEFAULT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary=summary,
        )

    async def approval(self, name: str, reason: str = "") -> None:
        """Wait for the people the access policy names for this step (dry-run: skipped)."""
        if self.request.dry_run:
            self._mark(name, StepState.SKIPPED, "dry-run: approval not needed")
            return

        def opened() -> None:
            self.steps[name].state = StepState.AWAITING_APPROVAL
            workflow.upsert_search_attributes([sa.AWAITING_APPROVAL.value_set(True)])
            self._show()

        def closed() -> None:
            workflow.upsert_search_attributes([sa.AWAITING_APPROVAL.value_set(False)])

        self._start(name, StepState.RUNNING)
        try:
            with on_exit(closed):
                approvers = await self.gate.wait(
                    name,
                    reason or self.request.reason,
                    timedelta(seconds=self.request.approval_timeout_seconds),
                    on_open=opened,
                )
        except RunbookStopped as stop:
            self._mark(name, StepState.FAILED, stop.summary)
            raise
        self._mark(name, StepState.DONE, f"approved by {', '.join(approvers)}")

    def window(self, name: str, detail: str = "") -> None:
        """A timed window the runbook holds itself (a canary's pause): running until
        :meth:`note` changes what it shows and :meth:`done` (or :meth:`fail`) ends it."""
        self._start(name, StepState.RUNNING)
        self.note(name, detail)

    def note(self, name: str, detail: str) -> None:
        self.steps[name].detail = detail
        self._show()

    def done(self, name: str, detail: str) -> None:
        self._mark(name, StepState.DONE, detail)

    def skip(self, name: str, why: str) -> None:
        """Record that this run does not need a step, and why (shown in status and the UI)."""
        self.steps.setdefault(name, StepStatus(name=name)).detail = why

    def fail(self, name: str, detail: str) -> StepFailed:
        """Mark a step failed and return the error for the runbook to raise, so that the
        compensations around it run."""
        self._mark(name, StepState.FAILED, detail)
        return StepFailed(detail)

    @asynccontextmanager
    async def compensating(
        self, name: str, undo: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Run ``undo`` if anything inside fails, is rejected or is cancelled, then re-raise.

        Compensation runs even after cancellation: the SDK lets a cancelled workflow schedule
        new activities once it has caught the CancelledError.
        """
        try:
            yield
        except GeneratorExit:
            # The worker evicted the run from its cache (a restart, a full cache): nothing broke,
            # the run goes on from its history elsewhere, and there is no event loop to undo in.
            raise
        except BaseException as err:
            # Where the run broke, before the undo's own steps move ``current`` on.
            self.failed_step = failed_step = self.failed_step or self.current
            try:
                await undo()
                self.rollback_note = f"; rolled back ({name}) after '{failed_step}'"
                self.metrics.rolled_back(self.runbook, complete=True)
            except UNDO_ERRORS as undo_err:
                self.metrics.rolled_back(self.runbook, complete=False)
                incomplete = (
                    f"ROLLBACK INCOMPLETE ({name}) at '{self.current}': "
                    f"{failure_message(undo_err)}. Manual action needed"
                )
                self.rollback_note = f"; {incomplete}"
                await self._tell_rotation(incomplete)
            if isinstance(err, RunbookStopped):
                err.outcome = Outcome.ROLLED_BACK
                err.summary += self.rollback_note
            raise

    async def _tell_rotation(self, incomplete: str) -> None:
        """A rollback that stopped halfway needs a person now, whoever watches the run.

        Patched in: a history that ended with an incomplete rollback before this step existed
        must replay without it.
        """
        if self.rotation is None or not workflow.patched("tell-rotation-rollback-incomplete"):
            return
        step = f"tell {self.rotation} the rollback is incomplete"
        notice = RotationNotice(
            rotation=self.rotation,
            text=f"{self.runbook} run {workflow.info().workflow_id}: {incomplete}",
        )
        try:
            await self.act(
                step,
                NotifyActivities.notify_rotation,
                notice,
                start_to_close_timeout=REMOTE_CALL_TIMEOUT,
            )
        except ActivityError as err:
            self.rollback_note += f"; telling {self.rotation} failed too: {failure_message(err)}"

    # -- bookkeeping ---------------------------------------------------------------------

    async def _step(
        self,
        name: str,
        activity: Callable[..., Any],
        arg: Any,
        start_to_close_timeout: timedelta,
        *,
        changes: bool = False,
    ) -> Any:
        summary = f"{name} (dry-run)" if self.request.dry_run else name
        self._start(name, StepState.RUNNING, listed=changes)
        try:
            result = await workflow.execute_activity(
                activity,
                arg,
                task_queue=task_queue_for(activity),
                start_to_close_timeout=start_to_close_timeout,
                heartbeat_timeout=heartbeat_timeout(start_to_close_timeout),
                retry_policy=DEFAULT_RETRY,
                summary=summary,
            )
        except ActivityError as err:
            why = self._cancelled_note() if is_cancelled_exception(err) else failure_message(err)
            self._mark(name, StepState.FAILED, why)
            raise
        self._mark(name, StepState.DONE, _describe(result))
        return result

    def _start(
        self, name: str, state: StepState, sa_step: str | None = None, *, listed: bool = True
    ) -> None:
        """``listed``: the step shows in ``AstraStep``, which lists filter on: a step that changes
        something or waits for people. A reading shows in the status and the current details
        only; each upsert is an event and a visibility write, and readings are most steps."""
        step = self.steps.setdefault(name, StepStatus(name=name))
        step.state, step.started_at, step.finished_at = state, workflow.now(), None
        step.detail = ""
        self.current = name
        if listed or not workflow.patched(LEANER_RUNNER):
            workflow.upsert_search_attributes([sa.STEP.value_set(sa_step or name)])
        self._show()

    def _mark(self, name: str, state: StepState, detail: str) -> None:
        step = self.steps.setdefault(name, StepStatus(name=name))
        if state == StepState.FAILED and self.failed_step is None:
            self.failed_step = name
        began = step.started_at if step.finished_at is None else None
        if began is not None and state in (StepState.DONE, StepState.FAILED):
            self.metrics.step(self.runbook, name, state.value, workflow.now() - began)
        step.state, step.detail = state, detail
        step.started_at = step.started_at or workflow.now()
        step.finished_at = workflow.now()
        self._show()

    def _show(self) -> None:
        """Keep the UI's "current details" in step with the run."""
        lines = [f"**{self.runbook}**" + (" (dry-run)" if self.request.dry_run else "")]
        if self.outcome is not None:
            lines.append(f"Outcome: {self.outcome.value} — {self.summary}")
        elif self.cancel_request is not None:
            lines.append(f"Cancelling (by {self.cancel_request.actor}): undoing what it changed")
        if self.frozen is not None and self.outcome is None:
            lines.append(
                f"FROZEN by {self.frozen.actor}: {self.frozen.reason} — no mutating step starts "
                "until `astra-ops unfreeze`"
            )
        for step in self.steps.values():
            mark = "→ " if step.name == self.current else ""
            lines.append(f"- {mark}{step.name}: {step.state.value} {step.detail}".rstrip())
        for pending in self.gate.pending.values():
            lines.append(
                f"Awaiting approval of '{pending.step}' from {', '.join(pending.groups)} "
                f"({len(pending.approvers)}/{pending.required}) until {pending.deadline:%H:%M:%S}Z"
            )
        workflow.set_current_details("\n".join(lines))

    def status(self) -> RunStatus:
        return RunStatus(
            runbook=self.runbook,
            requester=self.request.requester,
            reason=self.request.reason,
            dry_run=self.request.dry_run,
            current_step=self.current,
            steps=list(self.steps.values()),
            pending_approvals=list(self.gate.pending.values()),
            decisions=list(self.gate.decisions),
            outcome=self.outcome,
            summary=self.summary,
            refused_decisions=self.gate.refused_count,
            cancelled_by=self.cancel_request.actor if self.cancel_request else None,
            frozen_by=self.frozen.actor if self.frozen else None,
            frozen_reason=self.frozen.reason if self.frozen else "",
            steered=list(self.steered),
        )
