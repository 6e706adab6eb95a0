"""A workflow that sends one message through each communication adapter with a quick retry
policy, as the incident workflow does, so a test sees Temporal retry a receiver's outage."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.communication import (
        ChatMessage,
        CommunicationActivities,
        DeliveryResult,
        PageEvent,
        StatusPageUpdate,
    )

RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=1.0,
    maximum_attempts=100,
)


class ProbeMessages(BaseModel):
    chat: ChatMessage
    status: StatusPageUpdate
    page: PageEvent


class Delivered(BaseModel):
    chat: DeliveryResult
    status: DeliveryResult
    page: DeliveryResult


@workflow.defn(name="delivery-probe")
class DeliveryProbe:
    @workflow.run
    async def run(self, req: ProbeMessages) -> Delivered:
        timeout = timedelta(seconds=15)
        chat, status, page = await asyncio.gather(
            workflow.execute_activity_method(
                CommunicationActivities.post_to_channel,
                req.chat,
                start_to_close_timeout=timeout,
                retry_policy=RETRY,
                summary="post to the incident channel",
            ),
            workflow.execute_activity_method(
                CommunicationActivities.update_status_page,
                req.status,
                start_to_close_timeout=timeout,
                retry_policy=RETRY,
                summary="update the status page",
            ),
            workflow.execute_activity_method(
                CommunicationActivities.page,
                req.page,
                start_to_close_timeout=timeout,
                retry_policy=RETRY,
                summary="page the rotation",
            ),
        )
        return Delivered(chat=chat, status=status, page=page)
