"""What the front ends show of runs, and the refusals they map to exit codes and HTTP statuses.

Apart from ``starters.runs`` (which talks to Temporal), so the CLI can show the API's answers
without loading the Temporal client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from workflows.models import RunbookResult, RunStatus, StepStatus


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


class OpenRunConflict(RunError):
    """A run of the same runbook and subject is open with other parameters or requester."""

    kind = "conflict"

    def __init__(self, message: str, *, run_id: str, requester: str, params: Any) -> None:
        super().__init__(message)
        self.details = {"run_id": run_id, "requester": requester, "params": params}


class Parameter(BaseModel):
    """One parameter a start may set with ``--param``, as people read it."""

    name: str
    type: str
    required: bool
    default: Any = None
    bounds: list[str]
    """The model's own bounds, e.g. ``["> 0", "<= 1"]``."""
    policy: str | None = None
    """What the access policy allows, e.g. ``default 0.5, allowed [0.05, 0.5]``."""
    description: str = ""

    def line(self) -> str:
        """``name: type, default or required, bounds; policy: what it allows``."""
        text = f"{self.name}: {self.type}"
        text += ", required" if self.required else f", default {self.default}"
        if self.bounds:
            text += f", {' and '.join(self.bounds)}"
        if self.policy is not None:
            text += f"; policy: {self.policy}"
        return text


class RunbookCard(BaseModel):
    """A runbook as the catalogue and the access policy describe it: what `astra-ops runbooks`
    prints and `GET /v1/runbooks` returns, built in one place so both say the same."""

    name: str
    title: str
    trigger: str
    rotation: str
    severity: str
    steps: list[str]
    started_by: list[str]
    dry_runs_by: list[str]
    cancelled_by: list[str]
    """Besides the requester, who may always cancel their own run."""
    approvals: list[str]
    """One line per approval step: how many of which groups, and what silence does."""
    parameters: list[Parameter]


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
    outcome: str | None = None
    """How it ended (done, no_change, rejected, aborted, rolled_back, cancelled, failed)."""
    dry_run: bool = False
    step: str | None
    awaiting_approval: bool
    started_at: datetime | None
