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

from pydantic import Field, SecretStr
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.mutation import Mutation, MutationResult
from runtime.access import AccessPolicyError, PolicyFile
from runtime.metrics import notification_failed
from runtime.redact import MASK

log = logging.getLogger(__name__)


class RotationNotice(Mutation):
    rotation: str = Field(min_length=1, description="an access-policy group, e.g. agent-platform")
    text: str = Field(min_length=1)


class ChatUnavailable(Exception):
    """The chat webhook did not take a message; the text names its host, never its URL."""


class NotifyActivities:
    def __init__(self, policy_path: Path, chat_webhook_url: SecretStr | None = None) -> None:
        self.policy_path = policy_path
        self.chat_webhook_url = chat_webhook_url
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

    async def _post(self, text: str) -> None:
        import httpx  # here, not above: the workflows (and the CLI) import this module

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

    async def tell(self, text: str) -> tuple[bool, str]:
        """Post ``text`` to chat if a webhook is configured; whether it was posted, and how."""
        if self.chat_webhook_url is None:
            log.info("%s", text)
            return False, "no chat webhook configured"
        try:
            await self._post(text)
        except ChatUnavailable as err:
            log.warning("chat notification failed: %s", err)
            notification_failed(activity.metric_meter(), "chat")
            return False, str(err)
        return True, "posted to chat"

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
            async with heartbeating(f"telling {req.rotation}"):
                await self._post(text)
        except ChatUnavailable as err:
            notification_failed(activity.metric_meter(), "chat")
            # Retryable: chat outages pass, and the step runner's retry policy bounds the wait.
            raise ApplicationError(f"could not tell {req.rotation}: {err}") from None
        return MutationResult(changed=True, detail=f"told {req.rotation} ({', '.join(members)})")
