"""Shard Scaling's every branch, with its Kubernetes activities stubbed (tests/stubs.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.kube_models import ConfigValue, ConfigVerification, RolloutStatus
from activities.kubernetes import KubernetesActivities as K8s
from activities.mutation import MutationResult
from activities.notify import NotifyActivities
from runtime.identity import statement
from tests.conftest_kube import eventually
from tests.helpers import TEST_SIGNER, decide, start, status
from tests.stubs import POLICY, Stubs, name_of, stubbed_worker
from workflows.models import Outcome, RunbookResult, StepState
from workflows.shard_scaling import ShardScaling, ShardScalingRequest

SCHEDULER, WORKERS = "astra-scheduler", "astra-worker"
APPROVAL = "approve scaling"
# What a scale from 8 to 12 shards calls once approved, in order: the scheduler first.
SCALE = [
    name_of(K8s.patch_config),
    *[name_of(a) for _ in (SCHEDULER, WORKERS) for a in (K8s.rollout_restart, K8s.wait_rollout)],
]
READS = [name_of(K8s.read_config), name_of(K8s.rollout_health), name_of(K8s.rollout_health)]


def shard_count(value: str | None) -> ConfigValue:
    return ConfigValue(
        value=value, resource_version="7", config_hash="c0ffee", key="TASK_SHARD_COUNT"
    )


def rollout(name: str, *, complete: bool = True) -> RolloutStatus:
    ready = 3 if complete else 1
    return RolloutStatus(
        name=name,
        generation=2,
        observed_generation=2,
        replicas=3,
        updated=3,
        ready=ready,
        available=ready,
        complete=complete,
        failed_reason=None if complete else "ProgressDeadlineExceeded",
    )


def verified(*stale: str) -> ConfigVerification:
    return ConfigVerification(
        ok=not stale, expected_hash="beef", pods_total=3, pods_current=3 - len(stale),
        stale=list(stale),
    )  # fmt: skip


def changed(detail: str) -> MutationResult:
    return MutationResult(changed=True, detail=detail)


def healthy_at_eight(stubs: Stubs) -> None:
    """A cluster at 8 shards whose scheduler and workers roll out and verify cleanly."""
    stubs.answer(K8s.read_config, shard_count("8"))
    stubs.answer(K8s.rollout_health, rollout(SCHEDULER), rollout(WORKERS))
    stubs.answer(K8s.patch_config, changed("set TASK_SHARD_COUNT=12"))
    stubs.answer(K8s.rollout_restart, changed("restarted"))
    stubs.answer(K8s.wait_rollout, rollout(SCHEDULER), rollout(WORKERS))
    stubs.answer(K8s.verify_config, verified())


def request(**params: object) -> ShardScalingRequest:
    return ShardScalingRequest.model_validate(
        {"requester": "alice", "reason": "rebalance", "shards": 12, **params}
    )


async def test_approved_scale_sets_the_count_then_restarts_scheduler_before_workers(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    handle = await start(client, ShardScaling, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert result.summary == (
        "TASK_SHARD_COUNT 8 -> 12; astra-scheduler then astra-worker restarted, 6 pods verified"
    )
    verify = [name_of(K8s.verify_config)] * 2
    assert stubs.called() == READS + SCALE + verify
    (patch,) = stubs.args(K8s.patch_config)
    assert (patch.key, patch.value, patch.expected, patch.dry_run) == (
        "TASK_SHARD_COUNT", "12", None, False,
    )  # fmt: skip
    assert patch.token.endswith("/set TASK_SHARD_COUNT")
    assert [r.name for r in stubs.args(K8s.rollout_restart)] == [SCHEDULER, WORKERS]
    assert [v.deployment for v in stubs.args(K8s.verify_config)] == [SCHEDULER, WORKERS]
    steps = {s.name: s for s in result.steps}
    assert all(s.state == StepState.DONE for s in steps.values()), steps
    assert steps[APPROVAL].detail == "approved by bob"
    assert steps["read current shard count"].detail == "TASK_SHARD_COUNT=8"


async def test_already_at_the_target_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(K8s.read_config, shard_count("12"))
    result = await (await start(client, ShardScaling, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert result.summary == "already at 12 shards; nothing to do"
    assert stubs.called() == [name_of(K8s.read_config)]
    steps = {s.name: s for s in result.steps}
    assert steps[APPROVAL].state == StepState.SKIPPED
    assert steps[APPROVAL].detail == "not needed"


async def test_a_missing_count_fails_before_asking_anyone(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(K8s.read_config, shard_count(None))
    handle = await start(client, ShardScaling, request(), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert "has no TASK_SHARD_COUNT; set it by hand before scaling" in str(failed.value.cause)
    assert stubs.called() == [name_of(K8s.read_config)]
    steps = {s.name: s.state for s in (await status(handle)).steps}
    assert steps["read current shard count"] == StepState.FAILED


async def test_an_unhealthy_deployment_fails_before_asking_anyone(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(K8s.read_config, shard_count("8"))
    stubs.answer(K8s.rollout_health, rollout(SCHEDULER), rollout(WORKERS, complete=False))
    handle = await start(client, ShardScaling, request(), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert "astra-worker is not healthy (1/3 ready, ProgressDeadlineExceeded)" in message
    assert "fix the rollout first" in message
    assert stubs.called() == READS
    steps = {s.name: s for s in (await status(handle)).steps}
    assert steps["check astra-worker health"].state == StepState.FAILED
    never = steps[APPROVAL]
    assert never.state == StepState.SKIPPED
    assert never.detail == "not reached: the run failed at 'check astra-worker health'"


async def test_rejected_scale_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    handle = await start(client, ShardScaling, request(), task_queue)
    await decide(handle, APPROVAL, "bob", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert result.summary == "step 'approve scaling' rejected by bob"
    assert stubs.called() == READS


async def test_an_approval_nobody_gives_aborts_before_any_change(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    handle = await start(client, ShardScaling, request(approval_timeout_seconds=0.5), task_queue)
    result = await handle.result()

    assert result.outcome == Outcome.ABORTED
    assert "no decision on step 'approve scaling'" in result.summary
    assert "aborted safely" in result.summary
    assert stubs.called() == READS


async def test_an_approval_nobody_gives_escalates_when_the_policy_says_so(
    client: Client, task_queue: str, tmp_path: Path
) -> None:
    policy = yaml.safe_load(POLICY.read_text())
    policy["runbooks"]["shard-scaling"]["approvals"][APPROVAL] = {
        "groups": ["kernel-sre"],
        "on_timeout": "escalate",
        "escalate_to": ["agent-platform"],
    }
    escalating = tmp_path / "access-policy.yaml"
    escalating.write_text(yaml.safe_dump(policy))
    stubs = Stubs()
    healthy_at_eight(stubs)
    async with stubbed_worker(client, task_queue, stubs, escalating):
        handle = await start(
            client, ShardScaling, request(approval_timeout_seconds=0.5), task_queue
        )

        async def escalated() -> bool:
            pending = (await status(handle)).pending_approvals
            return bool(pending) and pending[0].groups == ["kernel-sre", "agent-platform"]

        await eventually(escalated, timeout=10, interval=0.05, message="escalation")
        await decide(handle, APPROVAL, "carol")  # Agent Platform, asked once nobody answered
        result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert {s.name: s.detail for s in result.steps}[APPROVAL] == "approved by carol"
    assert stubs.called() == READS + SCALE + [name_of(K8s.verify_config)] * 2


async def test_dry_run_passes_the_gate_and_only_reports(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    result = await (await start(client, ShardScaling, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE and result.dry_run
    assert result.summary == "dry-run: would change TASK_SHARD_COUNT 8 -> 12"
    assert stubs.called() == READS + SCALE  # nothing to verify: nothing changed
    mutations = [*stubs.args(K8s.patch_config), *stubs.args(K8s.rollout_restart)]
    assert all(m.dry_run for m in mutations)
    steps = {s.name: s for s in result.steps}
    assert steps[APPROVAL].state == StepState.SKIPPED
    assert steps[APPROVAL].detail == "dry-run: approval not needed"
    assert steps[f"verify {WORKERS} runs the new config"].state == StepState.SKIPPED


async def test_stale_pods_after_the_change_roll_back_in_the_same_order(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    stubs.answer(K8s.verify_config, verified(), verified("astra-worker-2"))
    handle = await start(client, ShardScaling, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert "failed at step 'verify astra-worker runs the new config'" in message
    assert "1 of 3 astra-worker pods run a stale config: astra-worker-2" in message
    assert "rolled back (restore the old shard count)" in message
    verify = [name_of(K8s.verify_config)] * 2
    assert stubs.called() == READS + SCALE + verify + SCALE
    _, undo = stubs.args(K8s.patch_config)
    assert (undo.value, undo.expected) == ("8", "12")
    assert undo.token.endswith("/roll back: set TASK_SHARD_COUNT")
    assert [r.name for r in stubs.args(K8s.rollout_restart)] == [SCHEDULER, WORKERS] * 2


async def test_a_failed_restart_rolls_back(client: Client, task_queue: str, stubs: Stubs) -> None:
    healthy_at_eight(stubs)
    broken = ApplicationError("astra-worker: forbidden", non_retryable=True)
    restarted = changed("restarted")
    stubs.answer(K8s.rollout_restart, restarted, broken, restarted)
    handle = await start(client, ShardScaling, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert "failed at step 'restart astra-worker': astra-worker: forbidden" in message
    assert "rolled back (restore the old shard count) after 'restart astra-worker'" in message
    restart = name_of(K8s.rollout_restart)
    assert stubs.called() == READS + SCALE[:3] + [restart] + SCALE
    assert [p.value for p in stubs.args(K8s.patch_config)] == ["12", "8"]


async def test_a_rollback_that_meets_someone_elses_count_keeps_it_and_tells_the_rotation(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    healthy_at_eight(stubs)
    stubs.answer(K8s.verify_config, verified("astra-scheduler-1"))
    conflict = ApplicationError(
        "astra/astra-config TASK_SHARD_COUNT is '16', not '12'", non_retryable=True
    )
    stubs.answer(K8s.patch_config, changed("set TASK_SHARD_COUNT=12"), conflict)
    stubs.answer(NotifyActivities.notify_rotation, changed("told kernel-sre"))
    handle = await start(client, ShardScaling, request(), task_queue)
    await decide(handle, APPROVAL, "bob")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert "ROLLBACK INCOMPLETE (restore the old shard count)" in message
    assert "is '16', not '12'. Manual action needed" in message
    patch, notify = name_of(K8s.patch_config), name_of(NotifyActivities.notify_rotation)
    assert stubs.called() == READS + SCALE + [name_of(K8s.verify_config), patch, notify]
    (told,) = stubs.args(NotifyActivities.notify_rotation)
    assert told.rotation == "kernel-sre" and "ROLLBACK INCOMPLETE" in told.text


async def test_a_start_is_judged_when_temporal_took_it_not_when_a_busy_worker_gets_to_it(
    client: Client, task_queue: str
) -> None:
    # The API's statement is good for a moment only; the run waits in the task queue beyond it,
    # as behind a backlog of thousands of starts.
    req = request(dry_run=True)
    workflow_id = f"{ShardScaling.spec.workflow_id(req)}/{uuid.uuid4().hex[:8]}"
    said = statement("start", req.requester, workflow_id, req.signed_payload())
    expires = datetime.now(UTC) + timedelta(seconds=1)
    signed = req.model_copy(
        update={"authorization": TEST_SIGNER.sign(said.model_copy(update={"expires_at": expires}))}
    )
    handle = await client.start_workflow(
        ShardScaling.spec.name, signed, id=workflow_id, task_queue=task_queue,
        result_type=RunbookResult,
    )  # fmt: skip
    await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.5)  # time must pass
    answers = Stubs()
    healthy_at_eight(answers)
    async with stubbed_worker(client, task_queue, answers):
        result = await handle.result()
    assert result.outcome == Outcome.DONE and result.dry_run, result.summary
