"""What every runbook workflow has in common: its catalogue entry and its message handlers.

The handlers live here once, so ``approve`` / ``reject`` / ``decide`` / ``status`` mean the same
thing on every runbook and nobody writes the approval protocol twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from temporalio import workflow

from workflows.models import (
    ApprovalSignal,
    CancelRequest,
    Decision,
    FreezeNotice,
    RunbookRequest,
    RunStatus,
    SteerAction,
)
from workflows.steps import StepRunner

R = TypeVar("R", bound=RunbookRequest)


@dataclass(frozen=True)
class RunbookSpec(Generic[R]):
    """A runbook's catalogue entry: what starts it, who owns it, what it will do."""

    name: str
    """The name people type, and the workflow type (``@workflow.defn(name=SPEC.name)``)."""
    title: str
    trigger: str
    rotation: str
    severity: str
    request: type[R]
    subject: Callable[[R], str]
    steps: Callable[[R], list[str]]
    """The steps a run of the request may take, in order; names built from the request here
    once, so a run's status and the catalogue show the same steps."""

    def workflow_id(self, request: R) -> str:
        return f"{self.name}/{self.subject(request)}"

    def steps_for(self, request: R | None = None) -> list[str]:
        """The steps a run of ``request`` may take, in order (a run skips those it does not
        need); without a request, those of one with every parameter at its default."""
        if request is None:
            # Unvalidated: a parameter without a default stays unset, so the generic list can
            # name steps only after parameters that have one.
            request = cast(R, self.request.model_construct(requester=""))
        return self.steps(request)


class Runbook:
    """Base of every runbook workflow class; subclasses set ``spec`` and write ``run``."""

    spec: RunbookSpec[Any]
    steer_actions: frozenset[SteerAction] = frozenset()
    """What its ``steer`` update takes (a release's promote, abort, ...): none for most."""

    def __init__(self) -> None:
        self.steps = StepRunner(self.spec.name, self.spec.steps_for, self.spec.rotation)

    @workflow.signal
    def approve(self, signal: ApprovalSignal) -> None:
        self.steps.gate.decide(Decision(**signal.model_dump(), decision="approve"))

    @workflow.signal
    def reject(self, signal: ApprovalSignal) -> None:
        self.steps.gate.decide(Decision(**signal.model_dump(), decision="reject"))

    @workflow.update
    def decide(self, decision: Decision) -> str:
        return self.steps.gate.decide(decision)

    @decide.validator
    def _validate_decision(self, decision: Decision) -> None:
        why = self.steps.gate.validate(decision)
        if why is not None:
            raise ValueError(why)

    @workflow.update
    def cancel(self, req: CancelRequest) -> str:
        """Stop the run on a proven person's request: it undoes what it changed, then ends
        ``cancelled`` with who and why. (Temporal's own cancel still works, unattributed.)"""
        return self.steps.cancel(req)

    @cancel.validator
    def _validate_cancel(self, req: CancelRequest) -> None:
        why = self.steps.validate_cancel(req)
        if why is not None:
            raise ValueError(why)

    @workflow.signal
    def freeze(self, notice: FreezeNotice) -> None:
        self.steps.on_freeze_signal("freeze", notice)

    @workflow.signal
    def unfreeze(self, notice: FreezeNotice) -> None:
        self.steps.on_freeze_signal("unfreeze", notice)

    @workflow.query
    def status(self) -> RunStatus:
        return self.steps.status()
