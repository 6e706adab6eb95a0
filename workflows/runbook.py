"""What every runbook workflow has in common: its catalogue entry and its message handlers.

The handlers live here once, so ``approve`` / ``reject`` / ``decide`` / ``status`` mean the same
thing on every runbook and nobody writes the approval protocol twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from temporalio import workflow

from workflows.models import (
    ApprovalSignal,
    CancelRequest,
    Decision,
    FreezeNotice,
    RunbookRequest,
    RunStatus,
)
from workflows.steps import StepRunner


@dataclass(frozen=True)
class RunbookSpec:
    """A runbook's catalogue entry: what starts it, who owns it, what it will do."""

    name: str
    title: str
    trigger: str
    rotation: str
    severity: str
    steps: tuple[str, ...]
    request: type[RunbookRequest]
    subject: Callable[[Any], str]

    def workflow_id(self, request: RunbookRequest) -> str:
        return f"{self.name}/{self.subject(request)}"


class Runbook:
    """Base of every runbook workflow class; subclasses set ``spec`` and write ``run``."""

    spec: RunbookSpec

    def __init__(self) -> None:
        self.steps = StepRunner(self.spec.name, list(self.spec.steps), self.spec.rotation)

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
