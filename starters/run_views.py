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
