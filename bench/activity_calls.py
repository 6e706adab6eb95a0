"""The activity calls a run made, read back from its history, for a bare workflow to repeat.

A module of its own so that the bare workflow can pass it through the workflow sandbox: the bare
workflow then builds no model of its own for each run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory

from activities.privilege import PRIVILEGED_SUFFIX


class ActivityCall(BaseModel):
    """One activity call exactly as a run scheduled it: activity, input and timeouts."""

    activity: str
    args: list[Any]
    start_to_close_seconds: float
    heartbeat_seconds: float | None = None
    task_queue: str | None = None
    """The queue it ran on, when not the run's own: a privileged activity's."""


async def activity_calls(client: Client, history: WorkflowHistory) -> list[ActivityCall]:
    """Every activity call in ``history``, in order, its input decoded as the client decodes."""
    calls = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            continue
        scheduled = event.activity_task_scheduled_event_attributes
        heartbeat = scheduled.heartbeat_timeout.ToTimedelta().total_seconds()
        calls.append(
            ActivityCall(
                activity=scheduled.activity_type.name,
                args=await client.data_converter.decode(list(scheduled.input.payloads)),
                start_to_close_seconds=scheduled.start_to_close_timeout.ToTimedelta().total_seconds(),
                heartbeat_seconds=heartbeat or None,
                task_queue=scheduled.task_queue.name
                if scheduled.task_queue.name.endswith(PRIVILEGED_SUFFIX)
                else None,
            )
        )
    return calls
