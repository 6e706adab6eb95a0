"""The one approval gate: every runbook's risky step waits here for people to decide.

Decisions arrive as the ``approve`` / ``reject`` signals (what the stock ``temporal workflow
signal`` can send) or the ``decide`` update, whose validator refuses a bad decision before it
enters history. Both paths go through ``ApprovalGate.validate``, so a signal that the update would
have refused is recorded as refused and changes nothing.

Who approves a step, how many must, and what happens on silence come from the access policy, read
by the activity that opens the approval. Outside dev mode a decision counts only with the API's
signature over it (``runtime.identity``), checked against the keys that activity returned.

Refused decisions are kept bounded: the last few per step in full, the rest only counted, so a
flood of junk signals cannot grow the run's state or its ``status`` answer without limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow

from workflows.models import (
    MAX_COMMENT,
    MAX_NAME,
    MAX_STEP,
    Decision,
    DecisionRecord,
    FreezeNotice,
    Outcome,
    PendingApproval,
)
from workflows.timeouts import REMOTE_CALL_TIMEOUT, heartbeat_timeout

with workflow.unsafe.imports_passed_through():
    from activities.access import (
        KILL_SWITCH_ID,
        AccessActivities,
        ApprovalRequest,
        Approvers,
        Trust,
    )
    from runtime.identity import Signed, digest, verify

KEEP_REFUSED_PER_STEP = 5
NO_STEP = "(none pending)"


class RunbookStopped(Exception):
    """A person, or the lack of one, stopped the run; the runbook unwinds and finishes safely."""

    def __init__(self, outcome: Outcome, summary: str) -> None:
        super().__init__(summary)
        self.outcome = outcome
        self.summary = summary


@contextmanager
def on_exit(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` however the block ends, as ``finally`` would, except when the worker
    evicts the run from its cache (``GeneratorExit``): the run goes on from its history
    elsewhere, and workflow calls outside the workflow's event loop would only raise."""
    try:
        yield
    except GeneratorExit:
        raise
    except BaseException:
        cleanup()
        raise
    cleanup()


def _cut(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def proven(
    signed: Signed | None,
    trust: Trust,
    *,
    act: str,
    actor: str,
    step: str | None = None,
    decision: str | None = None,
    payload: str = "",
    workflow_id: str | None = None,
    run_id: str | None = None,
    at: datetime | None = None,
) -> str | None:
    """Why a claimed act by ``actor`` is not proven, or None. Dev mode believes names.

    The statement must be genuine, current, and about exactly this act on exactly this run.
    ``at``: when the act reached Temporal, if not now. A start is judged at the run's start
    time, which the server sets: a worker with a backlog may take its first task long after.
    """
    if trust.dev_mode:
        return None
    if signed is None:
        return (
            f"{act} by {actor or 'nobody'} is not signed by the astra-ops API; use the API or "
            "`astra-ops ... --print-signal`, names alone prove nothing outside dev mode"
        )
    info = workflow.info()
    why = verify(signed, trust.keys, at or workflow.now())
    if why is not None:
        return why
    said = signed.statement
    expected = {
        "act": act,
        "actor": actor,
        "workflow_id": workflow_id if workflow_id is not None else info.workflow_id,
        "run_id": run_id if run_id is not None else info.run_id,
        "step": step,
        "decision": decision,
        "digest": digest(payload),
    }
    for field, value in expected.items():
        if getattr(said, field) != value:
            return f"the signed statement is for another {field.replace('_', ' ')}"
    return None


def operator_refusal(
    notice: FreezeNotice, operators: list[str], trust: Trust, act: str, run_id: str
) -> str | None:
    """Why a freeze or unfreeze (``act``) is not an operator's proven act, or None."""
    if notice.actor not in operators:
        return f"{notice.actor or 'nobody'} is not an operator in the access policy"
    return proven(
        notice.authorization,
        trust,
        act=act,
        actor=notice.actor,
        payload=notice.reason,
        workflow_id=KILL_SWITCH_ID,
        run_id=run_id,
    )


@dataclass(frozen=True)
class Refusal:
    why: str
    forbidden: bool = False
    """This person may never decide this step (as opposed to: not now)."""


def step_of(decision: Decision, pending: dict[str, PendingApproval]) -> str | None:
    """The step a decision is about: the one it names, or the only one pending."""
    if decision.step is None and len(pending) == 1:
        return next(iter(pending))
    return decision.step


def refusal(
    decision: Decision, pending: dict[str, PendingApproval], requester: str
) -> Refusal | None:
    """The gate's rules for who may decide what, short of proof of identity.

    The front ends ask the same function (with the pending approvals the run reports) to tell
    "you may not" from "not now" before they send anything.
    """
    if not decision.approver:
        return Refusal("a decision needs an approver")
    for field, limit in (("approver", MAX_NAME), ("step", MAX_STEP), ("comment", MAX_COMMENT)):
        if len(getattr(decision, field) or "") > limit:
            return Refusal(f"the {field} is longer than {limit} characters")
    if not pending:
        return Refusal("no step of this run is awaiting approval")
    step = step_of(decision, pending)
    if step is None:
        return Refusal(f"several steps await approval ({', '.join(pending)}); name one")
    if step not in pending:
        return Refusal(f"step '{step}' is not awaiting approval (awaiting: {', '.join(pending)})")
    waiting = pending[step]
    if decision.decision == "approve" and decision.approver == requester:
        return Refusal(
            f"{decision.approver} started this run; the requester cannot approve it", True
        )
    if decision.approver in waiting.approvers:
        return Refusal(f"{decision.approver} has already approved step '{step}'")
    if decision.approver not in waiting.members and not (
        decision.decision == "reject" and decision.approver == requester
    ):
        return Refusal(
            f"{decision.approver} is not in the group(s) allowed to decide step '{step}' "
            f"({', '.join(waiting.groups)})",
            True,
        )
    return None


class ApprovalGate:
    def __init__(self, runbook: str, on_change: Callable[[], None]) -> None:
        self.runbook = runbook
        self.requester = ""
        self.trust = Trust(dev_mode=False)
        self.pending: dict[str, PendingApproval] = {}
        self.rejected: dict[str, DecisionRecord] = {}
        self.accepted: list[DecisionRecord] = []
        self.refused: dict[str, list[DecisionRecord]] = {}
        self.refused_count = 0
        self._on_change = on_change

    @property
    def decisions(self) -> list[DecisionRecord]:
        """Every accepted decision and the last few refused ones of each step, oldest first."""
        kept = self.accepted + [r for records in self.refused.values() for r in records]
        return sorted(kept, key=lambda r: r.at)

    def validate(self, decision: Decision) -> str | None:
        """Why this decision must be refused, or None if it may be applied."""
        refused = refusal(decision, self.pending, self.requester)
        if refused is not None:
            return refused.why
        return proven(
            decision.authorization,
            self.trust,
            act="decision",
            actor=decision.approver,
            step=step_of(decision, self.pending),
            decision=decision.decision,
            payload=decision.comment,
        )

    def decide(self, decision: Decision) -> str:
        """Apply a decision (refusing it if invalid) and say what it did."""
        why = self.validate(decision)
        step = step_of(decision, self.pending)
        record = DecisionRecord(
            at=workflow.now(),
            approver=_cut(decision.approver, MAX_NAME),
            step=_cut(step, MAX_STEP) if step is not None else None,
            decision=decision.decision,
            comment=_cut(decision.comment, MAX_COMMENT),
            accepted=why is None,
            why=why or "",
        )
        if why is not None:
            self._refuse(record)
            return why
        assert step is not None
        self.accepted.append(record)
        pending = self.pending[step]
        if decision.decision == "reject":
            self.rejected[step] = record
            result = f"step '{step}' rejected by {decision.approver}"
        else:
            pending.approvers.append(decision.approver)
            result = (
                f"step '{step}' approved by {decision.approver} "
                f"({len(pending.approvers)} of {pending.required})"
            )
        self._on_change()
        return result

    def _refuse(self, record: DecisionRecord) -> None:
        """Count every refusal; keep the last few per pending step, none when nothing waits."""
        self.refused_count += 1
        workflow.logger.warning("refused %s decision: %s", record.decision, record.why)
        if not self.pending:
            return
        key = record.step if record.step in self.pending else NO_STEP
        kept = self.refused.setdefault(key, [])
        kept.append(record)
        del kept[:-KEEP_REFUSED_PER_STEP]

    def _settled(self, step: str) -> bool:
        pending = self.pending[step]
        return step in self.rejected or len(pending.approvers) >= pending.required

    async def wait(
        self, step: str, reason: str, window: timedelta, on_open: Callable[[], None]
    ) -> list[str]:
        """Block until the step is approved; raise RunbookStopped if rejected or abandoned.

        ``on_open`` runs once the approvers are known and decisions can be taken, so nobody is
        shown "awaiting approval" while a decision would still be refused. Returns the approvers.
        """
        opened = await self._request(step, reason, escalate_to=None)
        policy = opened.policy
        groups = list(opened.groups)
        escalations = list(policy.escalate_to)
        now = workflow.now()
        self.pending[step] = PendingApproval(
            step=step,
            groups=groups,
            required=policy.required,
            members=opened.members,
            requested_at=now,
            deadline=now + window,
            reason=reason,
        )
        on_open()

        def closed() -> None:
            del self.pending[step]
            self.refused.pop(NO_STEP, None)
            self._on_change()

        with on_exit(closed):
            if len(opened.members) < policy.required:
                raise RunbookStopped(
                    Outcome.ABORTED,
                    f"step '{step}' needs {policy.required} approver(s) from "
                    f"{', '.join(groups)} other than {self.requester}, and the access policy "
                    f"has {len(opened.members)}",
                )
            while True:
                wait_for: timedelta | None = window
                if policy.on_timeout == "escalate" and not escalations:
                    wait_for = None  # the chain is exhausted: keep waiting for its last group
                try:
                    await workflow.wait_condition(lambda: self._settled(step), timeout=wait_for)
                    break
                except TimeoutError:
                    if policy.on_timeout == "abort":
                        raise RunbookStopped(
                            Outcome.ABORTED,
                            f"no decision on step '{step}' within {window}; aborted safely",
                        ) from None
                    group = escalations.pop(0)
                    groups.append(group)
                    extra = await self._request(step, reason, escalate_to=group)
                    pending = self.pending[step]
                    pending.groups = list(groups)
                    pending.members = sorted(set(pending.members) | set(extra.members))
                    pending.deadline = workflow.now() + window
                    self._on_change()
            if step in self.rejected:
                record = self.rejected[step]
                raise RunbookStopped(
                    Outcome.REJECTED,
                    f"step '{step}' rejected by {record.approver}"
                    + (f": {record.comment}" if record.comment else ""),
                )
            return list(self.pending[step].approvers)

    async def _request(self, step: str, reason: str, *, escalate_to: str | None) -> Approvers:
        info = workflow.info()
        approvers = await workflow.execute_activity_method(
            AccessActivities.request_approval,
            ApprovalRequest(
                run_id=info.workflow_id,
                runbook=self.runbook,
                step=step,
                requester=self.requester,
                reason=reason,
                escalate_to=escalate_to,
            ),
            start_to_close_timeout=REMOTE_CALL_TIMEOUT,
            heartbeat_timeout=heartbeat_timeout(REMOTE_CALL_TIMEOUT),
            summary=f"escalate to {escalate_to}: {step}" if escalate_to else f"ask for: {step}",
        )
        # Keys fetched now also verify decisions signed with a key rotated in during the wait.
        self.trust = approvers.trust
        return approvers
