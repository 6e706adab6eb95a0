"""The one approval gate: every runbook's risky step waits here for people to decide.

Decisions arrive as the ``approve`` / ``reject`` signals (what the stock ``temporal workflow
signal`` can send) or the ``decide`` update, whose validator refuses a bad decision before it
enters history. Both paths go through ``ApprovalGate.validate``, so a signal that the update would
have refused is recorded as refused and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow

from workflows.models import (
    ApprovalPolicy,
    Decision,
    DecisionRecord,
    Outcome,
    PendingApproval,
)

with workflow.unsafe.imports_passed_through():
    from activities.notify import ApprovalRequest, NotifyActivities


class RunbookStopped(Exception):
    """A person, or the lack of one, stopped the run; the runbook unwinds and finishes safely."""

    def __init__(self, outcome: Outcome, summary: str) -> None:
        super().__init__(summary)
        self.outcome = outcome
        self.summary = summary


class ApprovalGate:
    def __init__(self, runbook: str, on_change: Callable[[], None]) -> None:
        self.runbook = runbook
        self.requester = ""
        self.pending: dict[str, PendingApproval] = {}
        self.rejected: dict[str, DecisionRecord] = {}
        self.decisions: list[DecisionRecord] = []
        self._on_change = on_change

    def _step_of(self, decision: Decision) -> str | None:
        """The step a decision is about: the one it names, or the only one pending."""
        if decision.step is None and len(self.pending) == 1:
            return next(iter(self.pending))
        return decision.step

    def validate(self, decision: Decision) -> str | None:
        """Why this decision must be refused, or None if it may be applied."""
        if not decision.approver:
            return "a decision needs an approver"
        if not self.pending:
            return "no step of this run is awaiting approval"
        step = self._step_of(decision)
        if step is None:
            return f"several steps await approval ({', '.join(self.pending)}); name one"
        if step not in self.pending:
            return f"step '{step}' is not awaiting approval (awaiting: {', '.join(self.pending)})"
        pending = self.pending[step]
        if decision.decision == "approve" and decision.approver == self.requester:
            return f"{decision.approver} started this run; the requester cannot approve it"
        if decision.approver in pending.approvers:
            return f"{decision.approver} has already approved step '{step}'"
        if decision.approver not in pending.members and not (
            decision.decision == "reject" and decision.approver == self.requester
        ):
            return (
                f"{decision.approver} is not in the group(s) allowed to decide step '{step}' "
                f"({', '.join(pending.groups)})"
            )
        return None

    def decide(self, decision: Decision) -> str:
        """Apply a decision (refusing it if invalid) and say what it did."""
        why = self.validate(decision)
        step = self._step_of(decision)
        self.decisions.append(
            DecisionRecord(
                at=workflow.now(),
                approver=decision.approver,
                step=step,
                decision=decision.decision,
                comment=decision.comment,
                accepted=why is None,
                why=why or "",
            )
        )
        if why is not None:
            workflow.logger.warning("refused %s decision: %s", decision.decision, why)
            return why
        assert step is not None
        pending = self.pending[step]
        if decision.decision == "reject":
            self.rejected[step] = self.decisions[-1]
            result = f"step '{step}' rejected by {decision.approver}"
        else:
            pending.approvers.append(decision.approver)
            result = (
                f"step '{step}' approved by {decision.approver} "
                f"({len(pending.approvers)} of {pending.required})"
            )
        self._on_change()
        return result

    def _settled(self, step: str) -> bool:
        pending = self.pending[step]
        return step in self.rejected or len(pending.approvers) >= pending.required

    async def wait(
        self,
        step: str,
        policy: ApprovalPolicy,
        reason: str,
        window: timedelta,
        on_open: Callable[[], None],
    ) -> list[str]:
        """Block until the step is approved; raise RunbookStopped if rejected or abandoned.

        ``on_open`` runs once the approvers are known and decisions can be taken, so nobody is
        shown "awaiting approval" while a decision would still be refused. Returns the approvers.
        """
        groups = list(policy.groups)
        escalations = list(policy.escalate_to)
        members = await self._request(step, groups, reason, escalation=False)
        now = workflow.now()
        self.pending[step] = PendingApproval(
            step=step,
            groups=groups,
            required=policy.required,
            members=members,
            requested_at=now,
            deadline=now + window,
            reason=reason,
        )
        on_open()
        try:
            if len(members) < policy.required:
                raise RunbookStopped(
                    Outcome.ABORTED,
                    f"step '{step}' needs {policy.required} approver(s) from "
                    f"{', '.join(groups)} other than {self.requester}, and the access policy "
                    f"has {len(members)}",
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
                    extra = await self._request(step, [group], reason, escalation=True)
                    pending = self.pending[step]
                    pending.groups = list(groups)
                    pending.members = sorted(set(pending.members) | set(extra))
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
        finally:
            del self.pending[step]
            self._on_change()

    async def _request(
        self, step: str, groups: list[str], reason: str, *, escalation: bool
    ) -> list[str]:
        info = workflow.info()
        approvers = await workflow.execute_activity_method(
            NotifyActivities.request_approval,
            ApprovalRequest(
                run_id=info.workflow_id,
                runbook=self.runbook,
                step=step,
                groups=groups,
                requester=self.requester,
                reason=reason,
                escalation=escalation,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            summary=f"{'escalate' if escalation else 'ask'} {', '.join(groups)} to approve {step}",
        )
        return approvers.members
