"""The one step runner: named steps, their state, timeouts, retries, summaries and dry-run.

A runbook says *what* it does (check, approval, act, verify); how a step is recorded, shown in
the UI and made safe to retry lives here once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

from runtime import search_attributes as sa
from runtime.redact import redact
from workflows.approval import ApprovalGate, RunbookStopped
from workflows.models import (
    ApprovalPolicy,
    Outcome,
    RunbookRequest,
    RunbookResult,
    RunStatus,
    StepState,
    StepStatus,
)

with workflow.unsafe.imports_passed_through():
    from activities.mutation import Mutation

T = TypeVar("T")

DEFAULT_TIMEOUT = timedelta(minutes=2)
DEFAULT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


class StepFailed(Exception):
    """A step found the world not as it must be; the runbook unwinds its compensations."""


def failure_message(err: BaseException) -> str:
    """The innermost message of an activity failure: what a person needs, not the wrapping,
    and none of the credentials it may quote (it becomes the step's detail, the run's current
    details and its failure, which everyone who can see the run reads)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return redact(str(err)) or type(err).__name__


def _describe(result: Any) -> str:
    """What a step's record says of its result: a mutation's ``detail``, a reading's
    ``summary()``, or nothing."""
    detail = getattr(result, "detail", None)
    if isinstance(detail, str):
        return detail
    summary = getattr(result, "summary", None)
    return str(summary()) if callable(summary) else ""


class StepRunner:
    def __init__(self, runbook: str, steps: list[str]) -> None:
        self.runbook = runbook
        self.steps = {name: StepStatus(name=name) for name in steps}
        self.current: str | None = None
        self.request = RunbookRequest(requester="unknown")
        self.outcome: Outcome | None = None
        self.summary = ""
        self.rollback_note = ""
        self.failed_step: str | None = None
        self.gate = ApprovalGate(runbook, on_change=self._show)

    # -- running a runbook -------------------------------------------------------------------

    async def run(
        self, request: RunbookRequest, body: Callable[[], Awaitable[RunbookResult]]
    ) -> RunbookResult:
        """Run the runbook's body; a person stopping it is an outcome, not a failure."""
        self.request = request
        self.gate.requester = request.requester
        try:
            return await body()
        except RunbookStopped as stop:
            return self.finish(stop.outcome, stop.summary)
        except (ActivityError, StepFailed) as err:
            if is_cancelled_exception(err):
                raise  # the SDK records the run as cancelled, after the compensations ran
            raise ApplicationError(
                f"{self.runbook} failed at step '{self.failed_step}': {failure_message(err)}"
                + self.rollback_note,
                type="RunbookFailed",
                non_retryable=True,
            ) from err

    def finish(self, outcome: Outcome, summary: str) -> RunbookResult:
        for step in self.steps.values():
            if step.state == StepState.PENDING:
                step.state = StepState.SKIPPED
        self.outcome, self.summary, self.current = outcome, summary, None
        self._show()
        return RunbookResult(
            runbook=self.runbook,
            outcome=outcome,
            summary=summary,
            dry_run=self.request.dry_run,
            steps=list(self.steps.values()),
        )

    # -- the kinds of step -------------------------------------------------------------------

    async def check(self, name: str, activity: Callable[..., Any], arg: Any, **opts: Any) -> Any:
        """A read-only step: runs in dry-run too, because its answer drives what comes next."""
        return await self._step(name, activity, arg, **opts)

    async def act(self, name: str, activity: Callable[..., Any], arg: Mutation, **opts: Any) -> Any:
        """A mutating step, told to only report in dry-run, with a token that makes retries safe."""
        info = workflow.info()
        arg = arg.model_copy(
            update={
                "dry_run": self.request.dry_run,
                "token": f"{info.workflow_id}/{info.run_id}/{name}",
            }
        )
        return await self._step(name, activity, arg, **opts)

    async def verify(self, name: str, activity: Callable[..., Any], arg: Any, **opts: Any) -> Any:
        """Confirm the world reached the goal; in dry-run nothing changed, so there is nothing to
        confirm and the step is skipped (returns None)."""
        if self.request.dry_run:
            self._mark(name, StepState.SKIPPED, "dry-run: nothing changed to verify")
            return None
        return await self._step(name, activity, arg, **opts)

    async def approval(self, name: str, policy: ApprovalPolicy, reason: str = "") -> None:
        if self.request.dry_run:
            self._mark(name, StepState.SKIPPED, "dry-run: approval not needed")
            return

        def opened() -> None:
            self.steps[name].state = StepState.AWAITING_APPROVAL
            workflow.upsert_search_attributes([sa.AWAITING_APPROVAL.value_set(True)])
            self._show()

        self._start(name, StepState.RUNNING)
        try:
            approvers = await self.gate.wait(
                name,
                policy,
                reason or self.request.reason,
                timedelta(seconds=self.request.approval_timeout_seconds),
                on_open=opened,
            )
        except RunbookStopped as stop:
            self._mark(name, StepState.FAILED, stop.summary)
            raise
        finally:
            workflow.upsert_search_attributes([sa.AWAITING_APPROVAL.value_set(False)])
        self._mark(name, StepState.DONE, f"approved by {', '.join(approvers)}")

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
        except BaseException as err:
            failed_step = self.failed_step
            try:
                await undo()
                self.rollback_note = f"; rolled back ({name}) after '{failed_step}'"
            except ActivityError as undo_err:
                self.rollback_note = (
                    f"; ROLLBACK INCOMPLETE ({name}) at '{self.current}': "
                    f"{failure_message(undo_err)}. Manual action needed"
                )
            if isinstance(err, RunbookStopped):
                err.outcome = Outcome.ROLLED_BACK
                err.summary += self.rollback_note
            raise

    # -- bookkeeping ---------------------------------------------------------------------

    async def _step(self, name: str, activity: Callable[..., Any], arg: Any, **opts: Any) -> Any:
        opts.setdefault("start_to_close_timeout", DEFAULT_TIMEOUT)
        opts.setdefault("retry_policy", DEFAULT_RETRY)
        summary = f"{name} (dry-run)" if self.request.dry_run else name
        self._start(name, StepState.RUNNING)
        try:
            result = await workflow.execute_activity(activity, arg, summary=summary, **opts)
        except ActivityError as err:
            self._mark(name, StepState.FAILED, failure_message(err))
            raise
        self._mark(name, StepState.DONE, _describe(result))
        return result

    def _start(self, name: str, state: StepState) -> None:
        step = self.steps.setdefault(name, StepStatus(name=name))
        step.state, step.started_at, step.finished_at = state, workflow.now(), None
        self.current = name
        workflow.upsert_search_attributes([sa.STEP.value_set(name)])
        self._show()

    def _mark(self, name: str, state: StepState, detail: str) -> None:
        step = self.steps.setdefault(name, StepStatus(name=name))
        if state == StepState.FAILED and self.failed_step is None:
            self.failed_step = name
        step.state, step.detail = state, detail
        step.started_at = step.started_at or workflow.now()
        step.finished_at = workflow.now()
        self._show()

    def _show(self) -> None:
        """Keep the UI's "current details" in step with the run."""
        lines = [f"**{self.runbook}**" + (" (dry-run)" if self.request.dry_run else "")]
        if self.outcome is not None:
            lines.append(f"Outcome: {self.outcome.value} — {self.summary}")
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
        )
