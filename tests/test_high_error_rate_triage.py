"""High Error Rate's triage: which cause the failures point at, decided from what the steps read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from activities.kube_models import Revision, RolloutHistory
from activities.postgres import Count, FailureBreakdown
from workflows.high_error_rate import Cause, HighErrorRateRequest, diagnose

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
OLD, BAD = "astra-worker-0a0a0a0a0a", "astra-worker-bbbbbbbbbb"


def history(rolled_out_ago: float, revisions: int = 2) -> RolloutHistory:
    rows = [
        Revision(
            revision=1,
            replica_set=OLD,
            created=NOW - timedelta(days=3),
            template_hash=OLD[-10:],
            images=["astra-worker:1.0.0"],
        ),
        Revision(
            revision=2,
            replica_set=BAD,
            created=NOW - timedelta(seconds=rolled_out_ago),
            template_hash=BAD[-10:],
            change_cause="astra-worker:bad",
            images=["astra-worker:bad"],
        ),
    ]
    return RolloutHistory(name="astra-worker", revisions=rows[-revisions:])


def failures(by_worker: dict[str, int]) -> FailureBreakdown:
    counts = [Count(key=k, count=n) for k, n in by_worker.items()]
    return FailureBreakdown(
        window_seconds=300,
        failed=sum(by_worker.values()),
        by_error_class=[Count(key="ImportError", count=sum(by_worker.values()))],
        by_worker=counts,
        by_shard=[],
    )


REQUEST = HighErrorRateRequest(requester="erin")
BAD_POD = f"{BAD}-abcde"  # pods of a ReplicaSet are named after it
POOL = {BAD_POD, f"{BAD}-fghij"}


def test_failures_on_a_fresh_revision_blame_the_rollout() -> None:
    found = diagnose(REQUEST, failures({BAD_POD: 9, "elsewhere": 1}), POOL, history(60), NOW)
    assert found.cause is Cause.ROLLOUT and found.back_to == 1
    assert "revision 2 (astra-worker:bad)" in found.evidence


def test_an_old_rollout_or_no_previous_revision_is_a_stuck_pool() -> None:
    breakdown = failures({BAD_POD: 9, "elsewhere": 1})
    assert diagnose(REQUEST, breakdown, POOL, history(3600), NOW).cause is Cause.STUCK_POOL
    first_release = history(60, revisions=1)
    assert diagnose(REQUEST, breakdown, POOL, first_release, NOW).cause is Cause.STUCK_POOL
    longer = REQUEST.model_copy(update={"recent_rollout_seconds": 7200})
    assert diagnose(longer, breakdown, POOL, history(3600), NOW).cause is Cause.ROLLOUT


def test_failures_elsewhere_leave_the_cause_unknown() -> None:
    found = diagnose(REQUEST, failures({"elsewhere": 9, BAD_POD: 1}), POOL, history(60), NOW)
    assert found.cause is Cause.UNKNOWN and "elsewhere (9)" in found.evidence
