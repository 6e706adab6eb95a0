"""Inputs, results and the status every runbook shares; one pydantic model per purpose.

New fields get defaults, so histories of runs started before a field existed still decode.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RunbookRequest(BaseModel):
    """What every runbook run is started with; each runbook adds its own parameters.

    Unknown parameters are refused: a typo (``shard=12``) must not start a run with a default.
    """

    model_config = ConfigDict(extra="forbid")

    requester: str = Field(min_length=1)
    reason: str = ""
    dry_run: bool = False
    approval_timeout_seconds: float = Field(default=1800, gt=0)


class StepState(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class StepStatus(BaseModel):
    name: str
    state: StepState = StepState.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str = ""


class ApprovalPolicy(BaseModel):
    """Who may approve a step, how many distinct people must, and what happens on silence."""

    groups: list[str] = Field(min_length=1)
    required: int = Field(default=1, ge=1)
    on_timeout: Literal["abort", "escalate"] = "abort"
    escalate_to: list[str] = []


class PendingApproval(BaseModel):
    step: str
    groups: list[str]
    required: int
    approvers: list[str] = []
    members: list[str] = []
    requested_at: datetime
    deadline: datetime
    reason: str = ""


class Decision(BaseModel):
    """A person's decision on a pending step, as the `decide` update carries it.

    Every field has a default so that a malformed signal still decodes and can be recorded as
    rejected instead of being dropped unseen.
    """

    approver: str = ""
    step: str | None = None
    comment: str = ""
    decision: Literal["approve", "reject"] = "approve"


class ApprovalSignal(BaseModel):
    """The `approve` / `reject` signal payload; the signal's name is the decision."""

    approver: str = ""
    step: str | None = None
    comment: str = ""


class DecisionRecord(BaseModel):
    at: datetime
    approver: str
    step: str | None
    decision: str
    comment: str = ""
    accepted: bool
    why: str = ""


class Outcome(StrEnum):
    DONE = "done"
    NO_CHANGE = "no_change"
    REJECTED = "rejected"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class RunStatus(BaseModel):
    runbook: str
    requester: str
    reason: str
    dry_run: bool
    current_step: str | None
    steps: list[StepStatus]
    pending_approvals: list[PendingApproval]
    decisions: list[DecisionRecord]
    outcome: Outcome | None = None
    summary: str = ""


class RunbookResult(BaseModel):
    runbook: str
    outcome: Outcome
    summary: str
    dry_run: bool
    steps: list[StepStatus]
