"""People steering a release while it runs: promote, abort, pause, resume, and switch back.

Argo Rollouts' ``promote``/``abort``/``pause``/``resume`` act on a Rollout object; here they act
on the run, through one ``steer`` update whose validator refuses what the access policy does not
allow, or what nobody proved, before it enters history. Each accepted action is kept in the run's
status, so the record says who promoted what, and when.

A release's timed window (a canary's pause, the time blue is kept after a blue/green switch) is
a durable timer counted from a fixed moment: it survives worker and server restarts and ends on
time. Pausing stops its clock; the analysis goes on, so a failing canary is still caught.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from temporalio import workflow

from workflows.approval import RunbookStopped, proven
from workflows.models import (
    MAX_COMMENT,
    MAX_NAME,
    CancelRequest,
    Outcome,
    SteerAction,
    SteerRecord,
    SteerRequest,
)
from workflows.steps import StepRunner

KEEP_RECORDS = 50
"""Accepted actions kept in the run's status; a run takes a handful."""


class Steering:
    """The actions a release run takes from people, and its timed windows."""

    def __init__(
        self, steps: StepRunner, actions: frozenset[SteerAction], promotion_step: str
    ) -> None:
        self.steps = steps
        self.actions = actions
        self.promotion_step = promotion_step
        """The approval step whose approvers may also promote (end a window early)."""
        self.window: str | None = None
        self.paused: SteerRecord | None = None
        self.paused_for = timedelta(0)
        self.promoted: SteerRecord | None = None
        self.aborted: SteerRecord | None = None
        self.switched_back: SteerRecord | None = None
        self._changed = False

    # -- the update ------------------------------------------------------------------------

    def validate(self, req: SteerRequest) -> str | None:
        """Why this action must be refused, or None."""
        runner = self.steps
        if runner.admission is None:
            return "the run is still starting; try again in a moment"
        if runner.outcome is not None or runner.cancel_request is not None:
            return "the run is already finishing"
        if req.action not in self.actions:
            return (
                f"a {runner.runbook} run takes {', '.join(sorted(self.actions))}, "
                f"not {req.action.value}"
            )
        if not req.actor or len(req.actor) > MAX_NAME or len(req.reason) > MAX_COMMENT:
            return f"an action needs an actor (<= {MAX_NAME} chars) and a reason <= {MAX_COMMENT}"
        if self.aborted is not None or self.switched_back is not None:
            return "the run is already rolling back"
        why = self._state_refusal(req.action)
        if why is not None:
            return why
        access = runner.admission.access
        if req.action == SteerAction.PROMOTE:
            promoters = runner._members(access.approval(runner.runbook, self.promotion_step).groups)
            if req.actor == runner.request.requester or req.actor not in promoters:
                return (
                    f"{req.actor} may not promote: those who approve '{self.promotion_step}' "
                    f"may ({', '.join(p for p in promoters if p != runner.request.requester)}), "
                    "other than the requester"
                )
        else:
            why = access.may_cancel(
                runner.runbook, req.actor, runner.request.requester, runner._members
            )
            if why is not None:
                return why.replace("cancel", f"{req.action.value}", 1)
        return proven(
            req.authorization,
            runner.gate.trust,
            act="steer",
            actor=req.actor,
            decision=req.action.value,
            payload=req.reason,
        )

    def _state_refusal(self, action: SteerAction) -> str | None:
        if action == SteerAction.ABORT:
            return None
        where = f"the run is at '{self.steps.current or 'its start'}'"
        if self.window is None:
            hint = (
                "use `astra-ops approve` for an approval step"
                if action == SteerAction.PROMOTE
                else "it holds a release window"
            )
            return f"nothing to {action.value}: {where}; {action.value} {hint}"
        if action == SteerAction.PAUSE and self.paused is not None:
            return f"already paused by {self.paused.actor}"
        if action == SteerAction.RESUME and self.paused is None:
            return "the window is not paused"
        return None

    def apply(self, req: SteerRequest) -> str:
        why = self.validate(req)
        if why is not None:
            self.steps.gate.refused_count += 1
            workflow.logger.warning("refused %s: %s", req.action.value, why)
            return why
        record = SteerRecord(
            at=workflow.now(), action=req.action, actor=req.actor, reason=req.reason[:MAX_COMMENT]
        )
        self.steps.steered.append(record)
        del self.steps.steered[:-KEEP_RECORDS]
        self._changed = True
        by = f"by {req.actor}" + (f": {req.reason}" if req.reason else "")
        match req.action:
            case SteerAction.ABORT if self.window is None:
                self.aborted = record
                return self.steps.stop(
                    CancelRequest(actor=req.actor, reason=f"aborted: {req.reason or 'no reason'}")
                )
            case SteerAction.ABORT:
                self.aborted = record
                said = f"aborted {by}; rolling back"
            case SteerAction.PROMOTE:
                self.promoted = record
                said = f"promoted {by}; '{self.window}' ends now"
            case SteerAction.PAUSE:
                self.paused = record
                said = f"'{self.window}' paused {by}; its analysis goes on"
            case SteerAction.RESUME:
                assert self.paused is not None
                self.paused_for += record.at - self.paused.at
                self.paused = None
                said = f"'{self.window}' resumed {by}"
            case SteerAction.SWITCH_BACK:
                self.switched_back = record
                said = f"switching back {by}"
        self.steps._show()
        return said

    # -- the window ------------------------------------------------------------------------

    async def hold(
        self,
        name: str,
        since: datetime,
        seconds: float,
        *,
        measure: Callable[[], Awaitable[str]] | None = None,
        interval: float = 60.0,
    ) -> SteerRecord | None:
        """Keep the window ``name`` open until ``seconds`` after ``since`` (plus time paused),
        running ``measure`` every ``interval``; what it says is shown on the step.

        Returns None when the time is up, or the promotion or switch back that ended it early;
        an abort raises :class:`RunbookStopped`, so the runbook's compensations roll back.
        """
        self.window, self.promoted, self.paused, self.paused_for = name, None, None, timedelta(0)
        length = timedelta(seconds=seconds)
        every = timedelta(seconds=interval)
        next_measure = workflow.now() + every if measure else None
        said = ""
        self.steps.window(name, self._progress(since, length, said))
        try:
            while True:
                if self.aborted is not None:
                    who = self.aborted
                    self.steps.fail(name, f"aborted by {who.actor}")
                    raise RunbookStopped(
                        Outcome.ABORTED,
                        f"aborted by {who.actor}: {who.reason or 'no reason given'}",
                    )
                ended = self.promoted or self.switched_back
                if ended is not None:
                    verb = "promoted" if ended.action == SteerAction.PROMOTE else "switched back"
                    self.steps.done(name, f"{verb} early by {ended.actor}; {said}".rstrip("; "))
                    return ended
                now = workflow.now()
                end = since + length + self._paused_total(now)
                if self.paused is None and now >= end:
                    self.steps.done(name, f"{seconds:g}s elapsed; {said}".rstrip("; "))
                    return None
                wakes = [t for t in (next_measure, None if self.paused else end) if t]
                timeout = max(min(wakes) - now, timedelta(milliseconds=1)) if wakes else None
                self._changed = False
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        lambda: self._changed, timeout=timeout, timeout_summary=name
                    )
                if next_measure is not None and measure and workflow.now() >= next_measure:
                    said = await measure()
                    next_measure = workflow.now() + every
                self.steps.note(name, self._progress(since, length, said))
        finally:
            self.window = None

    def _paused_total(self, now: datetime) -> timedelta:
        ongoing = now - self.paused.at if self.paused is not None else timedelta(0)
        return self.paused_for + ongoing

    def _progress(self, since: datetime, length: timedelta, said: str) -> str:
        now = workflow.now()
        end = since + length + self._paused_total(now)
        clock = (
            f"paused by {self.paused.actor} with {end - now} left"
            if self.paused
            else f"ends {end:%H:%M:%S}Z"
        )
        return f"from {since:%H:%M:%S}Z; {clock}" + (f"; {said}" if said else "")
