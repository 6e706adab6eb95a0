"""Inputs, results and the status every runbook shares; one pydantic model per purpose.

New fields get defaults, so histories of runs started before a field existed still decode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Workers pass runtime.identity through their sandbox (workers/worker.py `workflow_runner`):
# cryptography's native bindings cannot be loaded twice.
from runtime.identity import Signed, Signer, statement

# Upper bounds of durations, in seconds. Every duration a request carries stays far inside what
# a ``timedelta`` holds, sums included (a wait's timeout plus its slack).
TLS_SCAN_WORKFLOW = "tls-scan"
"""The daily certificate scan's workflow type: a run it starts as itself is admitted by the
runbook's ``on_schedule`` switch."""

HOUR = 3_600
DAY = 24 * HOUR
WEEK = 7 * DAY

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def matching(pattern: str, what: str) -> Callable[[str], str]:
    """A validator that refuses strings not matching ``pattern``, saying they must be ``what``."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise PydanticCustomError("pattern_mismatch", "must be {what}", {"what": what})
        return value

    return check


def _text(value: str) -> str:
    """Free text may hold newlines and any language, not control characters or lone surrogates
    (which cannot be encoded into a payload)."""
    if _CONTROL.search(value):
        raise PydanticCustomError("control_character", "must not contain control characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "must be valid Unicode text") from None
    return value


Text = Annotated[str, Field(max_length=2_000), AfterValidator(_text)]
"""Free text a person wrote (a reason): bounded, so it cannot bloat history and messages."""

PersonName = Annotated[
    str,
    Field(min_length=1, max_length=253),
    AfterValidator(_text),
    AfterValidator(matching(r"[^\n\t]+", "one line")),
]
KubernetesLabel = Annotated[
    str,
    Field(max_length=63, json_schema_extra={"pattern": f"^{DNS_LABEL}$"}),
    AfterValidator(
        matching(
            DNS_LABEL,
            "a DNS-1123 label (lower-case letters, digits and '-'), as Kubernetes names namespaces",
        )
    ),
]
"""A namespace."""

KubernetesName = Annotated[
    str,
    Field(max_length=253, json_schema_extra={"pattern": f"^{DNS_SUBDOMAIN}$"}),
    AfterValidator(
        matching(
            DNS_SUBDOMAIN,
            "a DNS-1123 name (lower-case letters, digits, '-' and '.'), as "
            "Kubernetes names ConfigMaps, Deployments and pods",
        )
    ),
]
"""A ConfigMap, Deployment or pod (a worker id is its pod's name)."""

ImageReference = Annotated[
    str,
    Field(min_length=1, max_length=512),
    AfterValidator(
        matching(
            r"[a-z0-9]+([._/:-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
            r"(@sha256:[a-f0-9]{64})?",
            "a container image reference (registry/repository:tag or @sha256:digest)",
        )
    ),
]
"""A container image, as a Deployment's pod template names it."""


class RunbookRequest(BaseModel):
    """What every runbook run is started with; each runbook adds its own parameters.

    Unknown parameters are refused: a typo (``shard=12``) must not start a run with a default.
    NaN and infinities are refused everywhere, and every number has an upper bound: a value that
    overflows later, in workflow code, fails a workflow task instead of the run.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retired: ClassVar[frozenset[str]] = frozenset()
    """Parameters the runbook no longer takes. Runs started before one was removed still carry
    it in their input, under their start's signature: decoding their history keeps it aside,
    unused, so the signature still verifies. A new start that names one is refused
    (``starters.runbook_cards.runbook_request``)."""
    _carried: dict[str, Any] = PrivateAttr(default_factory=dict)

    requester: PersonName
    reason: Text = ""
    dry_run: bool = False
    approval_timeout_seconds: float = Field(default=1800, gt=0, le=WEEK)
    authorization: Signed | None = None
    """Outside dev mode: the API's signed statement that ``requester`` started exactly this."""

    @model_validator(mode="wrap")
    @classmethod
    def _carry_retired(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        carried = {}
        if cls.retired and isinstance(data, dict):
            carried = {name: data[name] for name in cls.retired if name in data}
            data = {name: value for name, value in data.items() if name not in carried}
        request = handler(data)
        request._carried = carried
        return request

    def signed_payload(self) -> str:
        """The request as a signature covers it: every field but the signature itself."""
        return json.dumps(
            {**self.model_dump(mode="json", exclude={"authorization"}), **self._carried},
            sort_keys=True,
            separators=(",", ":"),
        )

    def signed_by(self, signer: Signer, workflow_id: str) -> Self:
        """This request with the API's statement that its requester started exactly it."""
        said = statement("start", self.requester, workflow_id, self.signed_payload())
        return self.model_copy(update={"authorization": signer.sign(said)})


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


class SteerAction(StrEnum):
    """What people do to a release while it runs, as Argo Rollouts' promote/abort/pause/resume."""

    PROMOTE = "promote"
    """End the current window now and go on to the next step."""
    ABORT = "abort"
    """Stop and roll back to what ran before."""
    PAUSE = "pause"
    """Stop the current window's clock (its analysis goes on) until ``resume``."""
    RESUME = "resume"
    SWITCH_BACK = "switch-back"
    """Blue/green: send the traffic back to blue while it is kept, and end there."""


class SteerRequest(BaseModel):
    """A person steering a release run; like a decision, refused rather than dropped when bad."""

    action: SteerAction
    actor: str = ""
    reason: str = ""
    authorization: Signed | None = None


class SteerRecord(BaseModel):
    at: datetime
    action: SteerAction
    actor: str
    reason: str = ""


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
    steered: list[SteerRecord] = []
    """A release run's promotions, aborts, pauses and resumes: who, what, when."""


class RunbookResult(BaseModel):
    runbook: str
    outcome: Outcome
    summary: str
    dry_run: bool
    steps: list[StepStatus]
