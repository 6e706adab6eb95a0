"""Telling people what a run needs from them or did: approvers of a pending step, and on-call
rotations, in the incident chat (a Slack-compatible incoming webhook).

Chat webhooks have no idempotency key, so a retried notification may post twice; a duplicate
message is the lesser harm next to a rotation that never hears about a change to its system.

An incoming-webhook URL is itself the credential (whoever has it can post as us), so it appears
in no message, result or log line: a failure names the webhook's host and what went wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, SecretStr
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.mutation import Mutation, MutationResult
from runtime.access import AccessPolicyError, load_policy
from runtime.redact import MASK

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


class RotationNotice(Mutation):
    rotation: str = Field(min_length=1, description="an access-policy group, e.g. agent-platform")
    text: str = Field(min_length=1)


class ChatUnavailable(Exception):
    """The chat webhook did not take a message; the text names its host, never its URL."""


class NotifyActivities:
    def __init__(self, policy_path: Path, chat_webhook_url: SecretStr | None = None) -> None:
        self.policy_path = policy_path
        self.chat_webhook_url = chat_webhook_url

    def _members(self, groups: list[str]) -> list[str]:
        """The people of these groups, as the access policy says now."""
        try:
            policy = load_policy(self.policy_path)
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        unknown = [g for g in groups if g not in policy.groups]
        if unknown:
            raise ApplicationError(
                f"groups {unknown} are not in the access policy {self.policy_path}; "
                "add them or fix the runbook",
                non_retryable=True,
            )
        return policy.members(groups)

    async def _post(self, text: str) -> None:
        assert self.chat_webhook_url is not None
        url = httpx.URL(self.chat_webhook_url.get_secret_value())
        where = f"the chat webhook at {url.scheme}://{url.netloc.decode()}/{MASK}"
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(url, json={"text": text})
        except httpx.HTTPError as err:
            # httpx's messages may quote the URL; the exception's class says enough.
            raise ChatUnavailable(f"{where} could not be reached ({type(err).__name__})") from None
        if response.is_error:
            # Not the body: a receiver may echo the path it was called on, the key itself.
            raise ChatUnavailable(
                f"{where} answered {response.status_code} {response.reason_phrase}"
            )

    @activity.defn
    async def request_approval(self, req: ApprovalRequest) -> Approvers:
        """Resolve the groups to people now (the policy may have changed) and notify them.

        The member list is returned into history, so the gate's validator can check decisions
        deterministically without reading the policy again.
        """
        members = [m for m in self._members(req.groups) if m != req.requester]
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
            await self._post(text)
        except ChatUnavailable as err:
            log.warning("approval notification failed: %s", err)
            return Approvers(members=members, notified=False, detail=str(err))
        return Approvers(members=members, notified=True, detail="posted to chat")

    @activity.defn
    async def notify_rotation(self, req: RotationNotice) -> MutationResult:
        """Post ``text`` to chat addressed to the rotation's members (dry-run: only say so)."""
        members = self._members([req.rotation])
        text = f"[{req.rotation}: {', '.join(members) or 'nobody'}] {req.text}"
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would tell {req.rotation}: {req.text}")
        if self.chat_webhook_url is None:
            activity.logger.info("%s", text)
            return MutationResult(changed=False, detail="no chat webhook configured; logged it")
        try:
            await self._post(text)
        except ChatUnavailable as err:
            # Retryable: chat outages pass, and the step runner's retry policy bounds the wait.
            raise ApplicationError(f"could not tell {req.rotation}: {err}") from None
        return MutationResult(changed=True, detail=f"told {req.rotation} ({', '.join(members)})")
