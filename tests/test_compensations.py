"""Compensations run whatever stops a run, bugs included, and never overwrite someone else's change.

The production worker, the real dev server and the sandbox cluster. Where a test needs triage to
see a cause the sandbox cannot produce on demand, stubs (tests/stubs.py) answer the reads; every
write still goes to the sandbox.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.kube_models import Revision, RolloutHistory
from activities.kubernetes import KubernetesActivities
from activities.metrics import MetricsActivities
from activities.postgres import Count, FailureBreakdown, FailureRate, PostgresActivities
from activities.privilege import privileged_queue
from runtime.astra_config import INTAKE_PAUSED_KEY
from runtime.settings import Settings
from starters.runs import Runs
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import config_value
from tests.helpers import (
    awaiting_approval,
    decide,
    handle_of,
    shard_count,
    start,
    status,
    wait_for_step,
)
from tests.stubs import Stubs
from workers.worker import activities_of, privileged_activities
from workflows.high_error_rate import HighErrorRate, HighErrorRateRequest
from workflows.models import Decision, Outcome, StepState


async def test_roll_back_keeps_a_shard_count_someone_else_set_and_says_so(
    runs: Runs,
    client: Client,
    worker: Worker,
    kube: KubeSandbox,
    namespace: str,
    chat: ChatReceiver,
) -> None:
    kube.cluster.stall("astra-worker")  # its rollout never completes: the wait times out
    started = await runs.start(
        "shard-scaling",
        {"shards": 12, "namespace": namespace, "rollout_timeout_seconds": 3},
        requester="alice",
    )
    handle = handle_of(client, started.run_id)
    await awaiting_approval(handle, "approve scaling")
    await runs.decide(started.run_id, Decision(approver="bob"))
    await wait_for_step(handle, "wait for astra-worker", StepState.RUNNING)
    assert shard_count(kube, namespace) == "12"
    # Someone else scales mid-run, behind the runbook's back.
    kube.cluster.patch(
        "configmaps", namespace, "astra-config", {"data": {"TASK_SHARD_COUNT": "16"}}
    )

    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    message = str(failure.value.cause)
    assert "failed at step 'wait for astra-worker'" in message
    assert "ROLLBACK INCOMPLETE (restore the old shard count)" in message
    assert "TASK_SHARD_COUNT" in message and "is '16', not '12'" in message
    assert "Manual action needed" in message
    assert shard_count(kube, namespace) == "16"
    steps = {s.name: s for s in (await status(handle)).steps}
    assert steps["roll back: set TASK_SHARD_COUNT"].state == StepState.FAILED
    assert "roll back: restart astra-scheduler" not in steps  # nothing restarted for a stranger
    assert steps["tell kernel-sre the rollback is incomplete"].state == StepState.DONE
    told = [m["text"] for m in chat.messages if m["text"].startswith("[kernel-sre")]
    assert len(told) == 1 and "ROLLBACK INCOMPLETE" in told[0] and "'16'" in told[0]


# ----- High Error Rate, with triage answered by stubs --------------------------------------------

FAILING_POD = "astra-worker-bad-7d9f-x1"


@pytest.fixture
def previous_revision() -> int:
    return 1


@pytest.fixture
async def triage_faked(
    client: Client, worker: Worker, settings: Settings, previous_revision: int
) -> AsyncIterator[str]:
    """The production worker's composition on a task queue of its own, with triage's reads
    answered by stubs: failures on the pods of a fresh revision, going back to
    ``previous_revision``. The task queue."""
    stubs = Stubs()
    stubs.answer(
        MetricsActivities.failure_rate,
        FailureRate(window_seconds=60, total=100, failed=50, rate=0.5),
    )
    stubs.answer(
        PostgresActivities.failure_breakdown,
        FailureBreakdown(
            window_seconds=60,
            failed=50,
            by_error_class=[Count(key="TimeoutError", count=50)],
            by_worker=[Count(key=FAILING_POD, count=50)],
            by_shard=[],
        ),
    )
    stubs.answer(
        KubernetesActivities.rollout_history,
        RolloutHistory(
            name="astra-worker",
            current_revision=previous_revision + 1,
            revisions=[
                Revision(
                    revision=previous_revision, replica_set="astra-worker-good", template_hash="g"
                ),
                Revision(
                    revision=previous_revision + 1,
                    replica_set="astra-worker-bad",
                    created=datetime.now(UTC),
                    template_hash="b",
                ),
            ],
        ),
    )
    config = worker.config()
    config["task_queue"] = f"faked-{uuid.uuid4().hex[:8]}"
    config["activities"] = stubs.standing_in(config["activities"])
    async with privileged_activities(settings) as rights:
        privileged = Worker(
            client,
            task_queue=privileged_queue(config["task_queue"]),
            activities=stubs.standing_in(activities_of(*rights)),
            activity_executor=config["activity_executor"],
        )
        async with Worker(**config), privileged:
            yield config["task_queue"]


def request() -> HighErrorRateRequest:
    return HighErrorRateRequest(requester="erin", window_seconds=60, recent_rollout_seconds=600)


async def test_rejected_remedy_keeps_intake_someone_else_changed(
    client: Client, triage_faked: str, kube: KubeSandbox, chat: ChatReceiver
) -> None:
    handle = await start(client, HighErrorRate, request(), triage_faked)
    await decide(handle, "approve pausing intake", "bob")
    await awaiting_approval(handle, "approve rolling back the last rollout")
    assert config_value(kube, INTAKE_PAUSED_KEY) == "TimeoutError"
    kube.cluster.patch(
        "configmaps", "astra", "astra-config", {"data": {INTAKE_PAUSED_KEY: "TimeoutError,OOM"}}
    )
    await decide(handle, "approve rolling back the last rollout", "carol", "reject")

    result = await handle.result()

    assert result.outcome == Outcome.ROLLED_BACK
    assert "ROLLBACK INCOMPLETE (resume intake)" in result.summary
    assert "is 'TimeoutError,OOM', not 'TimeoutError'" in result.summary
    assert config_value(kube, INTAKE_PAUSED_KEY) == "TimeoutError,OOM"
    assert any(m["text"].startswith("[kernel-sre") for m in chat.messages)


@pytest.mark.parametrize("previous_revision", [0])
async def test_a_bug_in_workflow_code_fails_the_run_after_its_compensation(
    client: Client, triage_faked: str, kube: KubeSandbox
) -> None:
    # Revision 0 is no revision a rollback may target: building the rollback's input raises a
    # ValidationError in workflow code, inside the block whose compensation resumes intake.
    handle = await start(client, HighErrorRate, request(), triage_faked)
    await decide(handle, "approve pausing intake", "bob")
    await decide(handle, "approve rolling back the last rollout", "carol")

    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "RunbookBug"
    assert cause.non_retryable
    assert "unexpected ValidationError in the runbook's code" in cause.message
    assert "to_revision: Input should be greater than 0" in cause.message
    assert "rolled back (resume intake) after 'approve rolling back the last rollout'" in (
        cause.message
    )
    assert "\n" not in cause.message
    assert config_value(kube, INTAKE_PAUSED_KEY) == ""
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
