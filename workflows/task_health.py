"""What the task-health runbooks share: who approves, common inputs, config knobs, waiting.

Worker Lost, High Error Rate, LLM Cost Spike and Dead-letter Repair each act on Astra's task
processing; their approval groups, the ConfigMap knobs they set and put back, and the way they
wait for the platform to recover are decided here once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from pydantic import Field
from temporalio import workflow

from workflows.models import (
    DAY,
    KubernetesLabel,
    KubernetesName,
    RunbookRequest,
)
from workflows.steps import StepRunner

with workflow.unsafe.imports_passed_through():
    from activities.kube_models import ConfigPatch, ConfigRef
    from activities.kubernetes import KubernetesActivities
    from activities.mutation import MutationResult

T = TypeVar("T")

PROBES = 60
"""How many times a wait for recovery measures it, whatever the wait's length: a long wait does
not grow the run's history past its limits, and a short one still sees recovery soon after."""


class TaskHealthRequest(RunbookRequest):
    """Where Astra runs, and how long a runbook waits for it to recover."""

    retired = frozenset({"poll_seconds"})

    namespace: KubernetesLabel = "astra"
    config_map: KubernetesName = "astra-config"
    worker_pool: KubernetesName = Field(
        default="astra-worker",
        description="the workers' Deployment: its pods are the workers (pod name = worker id), "
        "and its rollouts are what a runbook restarts or rolls back",
    )
    verify_timeout_seconds: float = Field(
        default=1800,
        gt=0,
        le=DAY,
        description=f"how long recovery may take before the run fails; it is measured "
        f"{PROBES} times over this wait",
    )


class Knob:
    """One key of Astra's ConfigMap that a runbook sets to contain a problem and later restores."""

    def __init__(self, steps: StepRunner, req: TaskHealthRequest, key: str) -> None:
        self.steps = steps
        self.ref = ConfigRef(namespace=req.namespace, name=req.config_map, key=key)

    async def read(self, step: str) -> str | None:
        value = await self.steps.check(step, KubernetesActivities.read_config, self.ref)
        return value.value

    async def set(
        self, step: str, value: str | None, *, expected: str | None = None
    ) -> MutationResult:
        """Set the key; None (the key was absent) is written as empty, which Astra reads as off.

        Putting an old value back passes ``expected``, the value this run wrote: if someone else
        changed the key since, the step fails and says so instead of overwriting their change.
        """
        patch = ConfigPatch(
            namespace=self.ref.namespace,
            name=self.ref.name,
            key=self.ref.key,
            value=value or "",
            expected=expected,
        )
        return await self.steps.act(step, KubernetesActivities.patch_config, patch)


async def wait_until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, within: float
) -> T:
    """Probe on a durable timer until ``ok`` or ``within`` seconds pass; the last answer.

    A dry-run changed nothing, so runbooks finish before waiting for recovery.
    """
    deadline = workflow.now() + timedelta(seconds=within)
    while True:
        result = await probe()
        if ok(result) or workflow.now() >= deadline:
            return result
        await workflow.sleep(timedelta(seconds=within / PROBES))


async def holds_for(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    settle: float,
    within: float,
) -> tuple[bool, T]:
    """Whether ``ok`` held on every probe for ``settle`` seconds in a row before ``within``,
    and the last answer.

    A recovery that dips back over the line restarts the settle window: one good sample after
    a remediation proves nothing.
    """
    deadline = workflow.now() + timedelta(seconds=within)
    since = None
    while True:
        result = await probe()
        now = workflow.now()
        if ok(result):
            since = since or now
            if now - since >= timedelta(seconds=settle):
                return True, result
        else:
            since = None
        if now >= deadline:
            return False, result
        await workflow.sleep(timedelta(seconds=within / PROBES))
