"""Inputs, results and the status every runbook shares; one pydantic model per purpose.

New fields get defaults, so histories of runs started before a field existed still decode.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    # cryptography's native bindings cannot be loaded twice, so never inside the sandbox.
    from runtime.identity import Signed


class RunbookRequest(BaseModel):
    """What every runbook run is started with; each runbook adds its own parameters.

    Unknown parameters are refused: a typo (``shard=12``) must not start a run with a default.
    """

    model_config = ConfigDict(extra="forbid")

    requester: str = Field(min_length=1)
    reason: str = ""
    dry_run: bool = False
    approval_timeout_seconds: float = Field(default=1800, gt=0)
    authorization: Signed | None = None
    """Outside dev mode: the API's signed statement that ``requester`` started exactly this."""

    def signed_payload(self) -> str:
        """The request as a signature covers it: every field but the signature itself."""
        return json.dumps(
            self.model_dump(mode="json", exclude={"authorization"}),
            sort_keys=True,
            separators=(",", ":"),
        )


class StepState(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    FROZEN = "frozen"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class StepStatus(BaseModel):
    name: str
    state: StepState = StepState.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str = ""


class PendingApproval(BaseModel):
    step: str
    groups: list[str]
    required: int
    approvers: list[str] = []
    members: list[str] = []
    requested_at: datetime
    deadline: datetime
    reason: str = ""


# Longest decision fields a run keeps; longer ones are refused (and stored cut short).
MAX_NAME = 128
MAX_STEP = 200
MAX_COMMENT = 1000


class Decision(BaseModel):
    """A person's decision on a pending step, as the `decide` update carries it.

    Every field has a default and no length limit here, so that a malformed or oversized signal
    still decodes and is counted as refused instead of being dropped unseen; the gate refuses
    fields longer than the limits above. Outside dev mode ``authorization`` is the API's signed
    statement that ``approver`` made this decision; without it the name proves nothing.
    """

    approver: str = ""
    step: str | None = None
    comment: str = ""
    decision: Literal["approve", "reject"] = "approve"
    authorization: Signed | None = None


class ApprovalSignal(BaseModel):
    """The `approve` / `reject` signal payload; the signal's name is the decision."""

    approver: str = ""
    step: str | None = None
    comment: str = ""
    authorization: Signed | None = None


class DecisionRecord(BaseModel):
    at: datetime
    approver: str
    step: str | None
    decision: str
    comment: str = ""
    accepted: bool
    why: str = ""


class CancelRequest(BaseModel):
    """Who asks a run to stop and why; the run undoes what it changed, then ends cancelled."""

    actor: str = ""
    reason: str = ""
    authorization: Signed | None = None


class FreezeNotice(BaseModel):
    """The kill switch telling a run to hold (or resume) every mutating step."""

    actor: str = ""
    reason: str = ""
    switch_run: str = ""
    """The kill switch's run that froze: an unfreeze must name the same one."""
    authorization: Signed | None = None


class Outcome(StrEnum):
    DONE = "done"
    NO_CHANGE = "no_change"
    REJECTED = "rejected"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


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
    refused_decisions: int = 0
    """Every refused decision, including those no longer stored in ``decisions``."""
    cancelled_by: str | None = None
    frozen_by: str | None = None
    frozen_reason: str = ""


class RunbookResult(BaseModel):
    runbook: str
    outcome: Outcome
    summary: str
    dry_run: bool
    steps: list[StepStatus]
