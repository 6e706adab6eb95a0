"""Telling people what a run needs from them or did: approvers of a pending step, and on-call
rotations, in the incident chat (a Slack-compatible incoming webhook).

Chat webhooks take no idempotency key, so each message goes through the delivery ledger the
incidents use (``activities.communication``), keyed by the run and the activity that sends it:
an activity retried after its worker died finds its message delivered and does not post again.

An incoming-webhook URL is itself the credential (whoever has it can post as us), so it appears
in no message, result or log line: a failure names the webhook's host and what went wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.communication import (
    CHAT_TEXT_CHARS,
    ChatMessage,
    CommunicationActivities,
    DeliveryOutcome,
    DeliveryResult,
)
from activities.heartbeats import heartbeating
from activities.mutation import Mutation, MutationResult
from runtime.access import AccessPolicyError, PolicyFile

log = logging.getLogger(__name__)


class RotationNotice(Mutation):
    rotation: str = Field(min_length=1, description="an access-policy group, e.g. agent-platform")
    text: str = Field(min_length=1)


class NotifyActivities:
    def __init__(self, policy_path: Path, channel: CommunicationActivities) -> None:
        self.policy_path = policy_path
        self.channel = channel
        self._policy_file = PolicyFile(policy_path)

    def _members(self, groups: list[str]) -> list[str]:
        """The people of these groups, as the access policy says now."""
        try:
            policy = self._policy_file.read()
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

    async def _post(self, text: str) -> DeliveryResult:
        """Post ``text`` once for the activity calling: its retries share the ledger's key."""
        info = activity.info()
        if len(text) > CHAT_TEXT_CHARS:  # a longer notice is cut, not refused
            text = text[: CHAT_TEXT_CHARS - 1] + "…"
        message = ChatMessage(
            incident_id=info.workflow_id,
            event_key=f"{info.workflow_run_id}/activity {info.activity_id}",
            text=text,
        )
        return await self.channel.post_to_channel(message)

    async def tell(self, text: str) -> tuple[bool, str]:
        """Post ``text`` to chat if a webhook is configured; whether it was posted, and how."""
        try:
            result = await self._post(text)
        except ApplicationError as err:
            log.warning("chat notification failed: %s", err.message)
            return False, err.message
        if result.outcome == DeliveryOutcome.NOT_CONFIGURED:
            log.info("%s", text)
            return False, "no chat webhook configured"
        return True, f"posted to chat ({result.outcome})"

    @activity.defn
    async def notify_rotation(self, req: RotationNotice) -> MutationResult:
        """Post ``text`` to chat addressed to the rotation's members (dry-run: only say so)."""
        members = self._members([req.rotation])
        text = f"[{req.rotation}: {', '.join(members) or 'nobody'}] {req.text}"
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would tell {req.rotation}: {req.text}")
        try:
            async with heartbeating(f"telling {req.rotation}"):
                result = await self._post(text)
        except ApplicationError as err:
            # Retryable unless the receiver refused the message: chat outages pass, and the step
            # runner's retry policy bounds the wait.
            raise ApplicationError(
                f"could not tell {req.rotation}: {err.message}",
                type=err.type,
                non_retryable=err.non_retryable,
                next_retry_delay=err.next_retry_delay,
            ) from None
        if result.outcome == DeliveryOutcome.NOT_CONFIGURED:
            activity.logger.info("%s", text)
            return MutationResult(changed=False, detail="no chat webhook configured; logged it")
        return MutationResult(changed=True, detail=f"told {req.rotation} ({', '.join(members)})")
