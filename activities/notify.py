"""Telling an on-call rotation what a runbook did, in the incident chat.

Chat webhooks have no idempotency key, so a retried notification may post twice; a duplicate
message is the lesser harm next to a rotation that never hears about a change to its system.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.mutation import Mutation, MutationResult
from runtime.access import AccessPolicyError, load_policy


class RotationNotice(Mutation):
    rotation: str = Field(min_length=1, description="an access-policy group, e.g. agent-platform")
    text: str = Field(min_length=1)


class NotifyActivities:
    def __init__(self, policy_path: Path, chat_webhook_url: str | None = None) -> None:
        self.policy_path = policy_path
        self.chat_webhook_url = chat_webhook_url

    @activity.defn
    async def notify_rotation(self, req: RotationNotice) -> MutationResult:
        """Post ``text`` to chat addressed to the rotation's members (dry-run: only say so)."""
        try:
            policy = load_policy(self.policy_path)
        except AccessPolicyError as err:
            raise ApplicationError(str(err), non_retryable=True) from None
        if req.rotation not in policy.groups:
            raise ApplicationError(
                f"rotation {req.rotation!r} is not a group of the access policy "
                f"{self.policy_path}; add it or fix the runbook",
                non_retryable=True,
            )
        members = policy.members([req.rotation])
        text = f"[{req.rotation}: {', '.join(members) or 'nobody'}] {req.text}"
        if req.dry_run:
            return MutationResult(changed=False, detail=f"would tell {req.rotation}: {req.text}")
        if self.chat_webhook_url is None:
            activity.logger.info("%s", text)
            return MutationResult(changed=False, detail="no chat webhook configured; logged it")
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(self.chat_webhook_url, json={"text": text})
            response.raise_for_status()
        except httpx.HTTPError as err:
            # Retryable: chat outages pass, and the step runner's retry policy bounds the wait.
            raise ApplicationError(f"could not post to the chat webhook: {err}") from err
        return MutationResult(changed=True, detail=f"told {req.rotation} ({', '.join(members)})")
