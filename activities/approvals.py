"""Who may approve a step, and telling them that a step waits for them."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from runtime.access import AccessPolicyError, load_policy

log = logging.getLogger(__name__)


class ApprovalRequest(BaseModel):
    run_id: str
    runbook: str
    step: str
    groups: list[str]
    requester: str
    reason: str = ""
    escalation: bool = False


class Approvers(BaseModel):
    members: list[str]
    notified: bool
    detail: str = ""


class ApprovalActivities:
    def __init__(self, policy_path: Path, chat_webhook_url: str | None = None) -> None:
        self.policy_path = policy_path
        self.chat_webhook_url = chat_webhook_url

    @activity.defn
    async def request_approval(self, req: ApprovalRequest) -> Approvers:
        """Resolve the groups to people now (the policy may have changed) and notify them.

        The member list is returned into history, so the gate's validator can check decisions
        deterministically without reading the policy again.
        """
        try:
            policy = load_policy(self.policy_path)
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        unknown = [g for g in req.groups if g not in policy.groups]
        if unknown:
            raise ApplicationError(
                f"approval groups {unknown} are not in the access policy {self.policy_path}; "
                "add them or fix the runbook's approval policy",
                non_retryable=True,
            )
        members = [m for m in policy.members(req.groups) if m != req.requester]
        verb = "Escalated: approval" if req.escalation else "Approval"
        text = (
            f"{verb} needed for step '{req.step}' of {req.runbook} run {req.run_id}, "
            f"requested by {req.requester}: {req.reason or 'no reason given'}. "
            f"Eligible: {', '.join(members) or 'nobody'} ({', '.join(req.groups)}). "
            f"`astra-ops approve {req.run_id} --step '{req.step}'`"
        )
        if self.chat_webhook_url is None:
            log.info("%s", text)
            return Approvers(members=members, notified=False, detail="no chat webhook configured")
        # A chat outage must not block an approval: people can still find the run through
        # `astra-ops ps --awaiting-approval`, so a failed notification is reported, not raised.
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(self.chat_webhook_url, json={"text": text})
            response.raise_for_status()
        except httpx.HTTPError as err:
            log.warning("approval notification failed: %s", err)
            return Approvers(members=members, notified=False, detail=f"chat webhook failed: {err}")
        return Approvers(members=members, notified=True, detail="posted to chat")
