"""Which run, runbook and step a worker's log line is about.

In workflow code the step runner knows its current step. An activity does not: the step is the
workflow's, so a worker interceptor carries it across in a header of every activity the workflow
schedules (the runner's current step; for workflows without one, the activity's summary, which
names what it is for), and the activity side keeps it for the log lines of that activity's
task. The header changes no command's identity, so histories replay as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from workflows.steps import StepRunner

STEP_HEADER = "astra-step"

_activity_step: ContextVar[str | None] = ContextVar("astra_activity_step", default=None)
"""The step of the activity this task runs; each activity runs in a task of its own."""


def current_step() -> str | None:
    """The step the running workflow's step runner is at; None outside runbooks."""
    steps = getattr(workflow.instance(), "steps", None)
    return steps.current if isinstance(steps, StepRunner) else None


def record_context(record: logging.LogRecord) -> Mapping[str, object]:
    """run_id (the workflow id people use), runbook (the workflow type: a runbook's name, or
    incident, kill-switch, tls-scan), step and temporal_run_id of a line logged in a workflow or
    an activity; activity and attempt too in an activity. Empty for the worker's own lines."""
    if workflow.in_workflow():
        info = workflow.info()
        return {
            "run_id": info.workflow_id,
            "runbook": info.workflow_type,
            "step": current_step(),
            "temporal_run_id": info.run_id,
        }
    if activity.in_activity():
        task = activity.info()
        return {
            "run_id": task.workflow_id,
            "runbook": task.workflow_type,
            "step": _activity_step.get(),
            "temporal_run_id": task.workflow_run_id,
            "activity": task.activity_type,
            "attempt": task.attempt,
        }
    # The SDK's lines about a workflow task, logged outside it, carry the workflow in `extra`.
    details: Mapping[str, Any] | None = getattr(record, "temporal_workflow", None)
    if details:
        return {
            "run_id": details.get("workflow_id"),
            "runbook": details.get("workflow_type"),
            "temporal_run_id": details.get("run_id"),
        }
    return {}


class StepContext(Interceptor):
    """The worker interceptor that carries each activity's step to the activity's log lines."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        return _WorkflowInbound


def _with_step(headers: Mapping[str, Payload], summary: str | None) -> Mapping[str, Payload]:
    step = current_step() or summary
    if step is None:
        return headers
    return {**headers, STEP_HEADER: PayloadConverter.default.to_payload(step)}


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = _with_step(input.headers, input.summary)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = _with_step(input.headers, input.summary)
        return super().start_local_activity(input)


class _WorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound))


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        payload = input.headers.get(STEP_HEADER)
        if payload is not None:
            _activity_step.set(PayloadConverter.default.from_payload(payload, str))
        return await super().execute_activity(input)
