"""High Error Rate's every branch, with its metrics, PostgreSQL and Kubernetes activities stubbed.

Which cause triage names from which evidence is ``diagnose``'s, tested on its own in
tests/test_high_error_rate_triage.py; here each cause leads to its remedy.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.kube_models import (
    ConfigValue,
    PodInfo,
    PodList,
    Revision,
    RolloutHistory,
    RolloutStatus,
)
from activities.kubernetes import KubernetesActivities as K8s
from activities.metrics import MetricsActivities
from activities.mutation import MutationResult
from activities.postgres import Count, FailureBreakdown, FailureRate, PostgresActivities
from runtime.access import load_policy
from runtime.astra_config import INTAKE_PAUSED_KEY
from starters.run_views import InvalidInput
from starters.runs import Runs
from tests.helpers import TEST_SIGNER, decide, start, status
from tests.stubs import POLICY, Stubs, name_of
from workflows.high_error_rate import HighErrorRate, HighErrorRateRequest
from workflows.models import Outcome, StepState

PAUSE = "approve pausing intake"
RESTART = "approve restarting the stuck pool"
UNDO = "approve rolling back the last rollout"
VERIFY = "verify the rate stays under the threshold"
CURRENT_PODS = ["astra-worker-new-1", "astra-worker-new-2"]

RATE, BREAKDOWN, PODS, HISTORY = (
    name_of(MetricsActivities.failure_rate),
    name_of(PostgresActivities.failure_breakdown),
    name_of(K8s.list_pods),
    name_of(K8s.rollout_history),
)
READ, PATCH, RESTART_POOL, ROLL_BACK, WAIT = (
    name_of(K8s.read_config),
    name_of(K8s.patch_config),
    name_of(K8s.rollout_restart),
    name_of(K8s.rollout_undo),
    name_of(K8s.wait_rollout),
)
TRIAGE = [RATE, BREAKDOWN, PODS, HISTORY, READ]


def rate(share: float) -> FailureRate:
    return FailureRate(window_seconds=300, total=100, failed=int(share * 100), rate=share)


def failures_on(*workers: str) -> FailureBreakdown:
    return FailureBreakdown(
        window_seconds=300,
        failed=40,
        by_error_class=[Count(key="TimeoutError", count=30), Count(key="OOMError", count=10)],
        by_worker=[Count(key=w, count=40 // len(workers)) for w in workers],
        by_shard=[Count(key="3", count=40)],
    )


def history(*, rolled_out_now: bool) -> RolloutHistory:
    """Revision 1, then revision 2 (the current pods), rolled out just now or long ago."""
    created = datetime.now(UTC) if rolled_out_now else datetime(2024, 1, 1, tzinfo=UTC)
    return RolloutHistory(
        name="astra-worker",
        current_revision=2,
        revisions=[
            Revision(revision=1, replica_set="astra-worker-old", template_hash="o"),
            Revision(
                revision=2, replica_set="astra-worker-new", template_hash="n", created=created,
                change_cause="release 1.1.0",
            ),
        ],
    )  # fmt: skip


def changed(detail: str) -> MutationResult:
    return MutationResult(changed=True, detail=detail)


def failing_pool(stubs: Stubs, *, rollout: bool = False, paused: str | None = None) -> None:
    """Half the tasks fail, on the pool's current pods; once remedied, the rate falls to 1 %."""
    stubs.answer(MetricsActivities.failure_rate, rate(0.5), rate(0.01))
    stubs.answer(PostgresActivities.failure_breakdown, failures_on(*CURRENT_PODS))
    stubs.answer(K8s.list_pods, PodList(pods=[
        PodInfo(name=p, phase="Running", ready=True) for p in CURRENT_PODS
    ]))  # fmt: skip
    stubs.answer(K8s.rollout_history, history(rolled_out_now=rollout))
    stubs.answer(
        K8s.read_config,
        ConfigValue(value=paused, resource_version="1", config_hash="h", key=INTAKE_PAUSED_KEY),
    )
    stubs.answer(K8s.patch_config, changed("set"))
    stubs.answer(K8s.rollout_restart, changed("restarted astra/astra-worker"))
    stubs.answer(K8s.rollout_undo, changed("rolled back astra/astra-worker from revision 2 to 1"))
    stubs.answer(
        K8s.wait_rollout,
        RolloutStatus(
            name="astra-worker", generation=3, observed_generation=3, replicas=2, updated=2,
            ready=2, available=2, complete=True,
        ),
    )  # fmt: skip


def request(**params: object) -> HighErrorRateRequest:
    return HighErrorRateRequest.model_validate(
        {
            "requester": "erin",
            "settle_seconds": 0.1,
            "verify_timeout_seconds": 10,
            **params,
        }
    )


def intake(stubs: Stubs) -> list[tuple[str, str | None]]:
    """What each patch of the paused-intake key wrote, and what it expected to find."""
    return [(p.value, p.expected) for p in stubs.args(K8s.patch_config)]


async def test_a_stuck_pool_is_contained_restarted_and_intake_resumed(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs, paused="OOMError")
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "alice")
    await decide(handle, RESTART, "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert "40 of 40 failures come from the current astra-worker pods" in result.summary
    assert "Paused intake of TimeoutError, restarted astra/astra-worker, resumed intake" in (
        result.summary
    )
    verify = stubs.called()[10:]
    assert stubs.called()[:10] == [*TRIAGE, PATCH, RESTART_POOL, WAIT, PATCH, RATE]
    assert set(verify) == {RATE} and len(verify) >= 1  # until it held for the settle window
    # The class is paused beside the one already paused, and exactly that list is put back.
    assert intake(stubs) == [("OOMError,TimeoutError", None), ("OOMError", "OOMError,TimeoutError")]
    assert all(p.key == INTAKE_PAUSED_KEY for p in stubs.args(K8s.patch_config))
    steps = {s.name: s for s in result.steps}
    assert steps[UNDO].state == StepState.SKIPPED
    assert steps[RESTART].detail == "approved by carol"
    assert steps["pause intake again"].state == StepState.SKIPPED


async def test_a_fresh_rollout_whose_pods_fail_is_rolled_back(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs, rollout=True)
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "alice")
    await decide(handle, UNDO, "carol")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert "revision 2 (release 1.1.0)" in result.summary
    assert stubs.called()[:9] == [*TRIAGE, PATCH, ROLL_BACK, WAIT, PATCH]
    (undo,) = stubs.args(K8s.rollout_undo)
    assert (undo.name, undo.to_revision) == ("astra-worker", 1)
    assert RESTART_POOL not in stubs.called()
    assert intake(stubs) == [("TimeoutError", None), ("", "TimeoutError")]


async def test_a_rate_under_the_threshold_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(MetricsActivities.failure_rate, rate(0.03))
    result = await (await start(client, HighErrorRate, request(), task_queue)).result()

    assert result.outcome == Outcome.NO_CHANGE
    assert result.summary == "3.0% of 100 tasks failed over 300s, within the 5.0% threshold"
    assert stubs.called() == [RATE]


async def test_failures_gone_by_triage_fail_the_run_before_any_change(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    stubs.answer(MetricsActivities.failure_rate, rate(0.5))
    stubs.answer(
        PostgresActivities.failure_breakdown,
        FailureBreakdown(
            window_seconds=300, failed=0, by_error_class=[], by_worker=[], by_shard=[]
        ),
    )
    handle = await start(client, HighErrorRate, request(), task_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert "no failed task is in the window any more; measure again" in str(failed.value.cause)
    assert stubs.called() == [RATE, BREAKDOWN]


async def test_an_unknown_cause_stays_contained_and_hands_over(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    stubs.answer(PostgresActivities.failure_breakdown, failures_on("astra-worker-gone-1"))
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "bob")
    result = await handle.result()

    assert result.outcome == Outcome.DONE
    assert "intake of TimeoutError paused. The cause is elsewhere" in result.summary
    assert f"remove TimeoutError from {INTAKE_PAUSED_KEY} to resume" in result.summary
    assert stubs.called() == [*TRIAGE, PATCH]  # paused, and left paused
    assert intake(stubs) == [("TimeoutError", None)]


async def test_a_rejected_pause_changes_nothing(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "alice", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.REJECTED
    assert stubs.called() == TRIAGE


async def test_a_rejected_restart_resumes_intake(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "alice")
    await decide(handle, RESTART, "carol", "reject")
    result = await handle.result()

    assert result.outcome == Outcome.ROLLED_BACK
    assert result.summary == (
        f"step '{RESTART}' rejected by carol; rolled back (resume intake) after '{RESTART}'"
    )
    assert stubs.called() == [*TRIAGE, PATCH, PATCH]
    assert intake(stubs) == [("TimeoutError", None), ("", "TimeoutError")]


async def test_a_remedy_nobody_approves_aborts_and_resumes_intake(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    handle = await start(client, HighErrorRate, request(approval_timeout_seconds=1), task_queue)
    await decide(handle, PAUSE, "alice")
    result = await handle.result()

    assert result.outcome == Outcome.ROLLED_BACK
    assert f"no decision on step '{RESTART}'" in result.summary
    assert "rolled back (resume intake)" in result.summary
    assert intake(stubs) == [("TimeoutError", None), ("", "TimeoutError")]


async def test_a_rate_that_does_not_stay_down_pauses_intake_again_and_fails(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    stubs.answer(MetricsActivities.failure_rate, rate(0.5), rate(0.4))  # the restart did not help
    handle = await start(client, HighErrorRate, request(verify_timeout_seconds=1), task_queue)
    await decide(handle, PAUSE, "alice")
    await decide(handle, RESTART, "carol")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert f"failed at step '{VERIFY}'" in message
    assert "the failure rate did not stay under 5.0% for 0.1s (last: 40.0% of 100)" in message
    assert "intake of TimeoutError is paused again" in message
    assert stubs.called()[-1] == PATCH
    assert intake(stubs) == [("TimeoutError", None), ("", "TimeoutError"), ("TimeoutError", None)]
    steps = {s.name: s.state for s in (await status(handle)).steps}
    assert steps["pause intake again"] == StepState.DONE and steps[VERIFY] == StepState.FAILED


async def test_a_failed_rollout_wait_resumes_intake(
    client: Client, task_queue: str, stubs: Stubs
) -> None:
    failing_pool(stubs)
    stalled = ApplicationError("astra-worker: progress deadline exceeded", non_retryable=True)
    stubs.answer(K8s.wait_rollout, stalled)
    handle = await start(client, HighErrorRate, request(), task_queue)
    await decide(handle, PAUSE, "alice")
    await decide(handle, RESTART, "carol")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    message = str(failed.value.cause)
    assert "failed at step 'wait for the pool': astra-worker: progress deadline" in message
    assert "rolled back (resume intake) after 'wait for the pool'" in message
    assert stubs.called() == [*TRIAGE, PATCH, RESTART_POOL, WAIT, PATCH]
    assert intake(stubs) == [("TimeoutError", None), ("", "TimeoutError")]


async def test_dry_run_only_reports(client: Client, task_queue: str, stubs: Stubs) -> None:
    failing_pool(stubs)
    result = await (await start(client, HighErrorRate, request(dry_run=True), task_queue)).result()

    assert result.outcome == Outcome.DONE
    assert result.summary.startswith("dry-run: 50.0% of 100 tasks failed over 300s")
    assert "Would pause intake of TimeoutError" in result.summary
    assert stubs.called() == [*TRIAGE, PATCH, RESTART_POOL, WAIT, PATCH]  # and no verify
    mutations = [*stubs.args(K8s.patch_config), *stubs.args(K8s.rollout_restart)]
    assert all(m.dry_run for m in mutations)
    steps = {s.name: s for s in result.steps}
    assert {steps[a].state for a in (PAUSE, RESTART)} == {StepState.SKIPPED}


@pytest.mark.parametrize(
    ("param", "value"),
    [("threshold", "-0.05"), ("window_seconds", "0"), ("settle_seconds", "")],
)
async def test_bad_thresholds_and_windows_are_refused_before_start(
    client: Client, task_queue: str, param: str, value: str
) -> None:
    runs = Runs(client, task_queue, load_policy(POLICY), TEST_SIGNER)
    with pytest.raises(InvalidInput, match=param):
        await runs.start("high-error-rate", {param: value}, requester="erin")
