"""astra-ops's own Prometheus metrics: their names, labels and meanings, in one place.

They are recorded through the Temporal SDK's metric meters, so they leave each process by the
same exporter as the SDK's own metrics (runtime/telemetry.py), and get its suffixes: counters end
in ``_total``, durations in ``_seconds``. Where each is recorded:

- the step runner (workflows/steps.py), through ``workflow.metric_meter()``, which records
  nothing while a history replays: a run is counted once however often a worker replays it;
- notification activities, through ``activity.metric_meter()``;
- the worker process (``astra_ops_worker_up``, and the series alerts watch, at 0) and the API
  (the gauges about the whole system, read from Temporal: starters/system_gauges.py), through
  their runtime's meter.

Labels hold names from the catalogue and the code (runbooks, steps, outcomes, channels), never
subjects or people: their number is bounded by the code, not by traffic.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from temporalio.common import MetricMeter

PREFIX = "astra_ops_"

RUNS_STARTED = PREFIX + "runs_started"
RUNS_FINISHED = PREFIX + "runs_finished"
ROLLBACKS = PREFIX + "rollbacks"
STEP_DURATION = PREFIX + "step_duration"
NOTIFICATIONS_FAILED = PREFIX + "notifications_failed"
WORKER_UP = PREFIX + "worker_up"
APPROVALS_WAITING = PREFIX + "approvals_waiting"
APPROVAL_OLDEST_AGE = PREFIX + "approval_oldest_age_seconds"
KILL_SWITCH_FROZEN = PREFIX + "kill_switch_frozen"
VISIBILITY_UP = PREFIX + "visibility_up"

FAILED = "failed"
"""The outcome label of a run that failed (raised) rather than finished with an outcome."""

STEP_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
"""Seconds: readings take well under a second, rollouts and waits minutes, approvals up to the
default approval timeout (30 min) and beyond when escalated."""


class RunMetrics:
    """What the step runner records about runs and steps; one per run, made from the run's
    replay-safe ``workflow.metric_meter()``."""

    def __init__(self, meter: MetricMeter) -> None:
        self._started = meter.create_counter(RUNS_STARTED, "Runbook runs started, by runbook.")
        self._finished = meter.create_counter(
            RUNS_FINISHED,
            "Runbook runs ended, by runbook and outcome (done, no_change, rejected, aborted, "
            "rolled_back, cancelled, or failed).",
        )
        self._rollbacks = meter.create_counter(
            ROLLBACKS,
            "Compensations run after a failure, rejection or cancel, by runbook and result "
            "(complete, or incomplete: a person must finish it).",
        )
        self._step = meter.create_histogram_timedelta(
            STEP_DURATION, "How long each step took, by runbook, step and state (done, failed)."
        )

    def started(self, runbook: str) -> None:
        self._started.add(1, {"runbook": runbook})

    def finished(self, runbook: str, outcome: str) -> None:
        self._finished.add(1, {"runbook": runbook, "outcome": outcome})

    def rolled_back(self, runbook: str, *, complete: bool) -> None:
        self._rollbacks.add(
            1, {"runbook": runbook, "result": "complete" if complete else "incomplete"}
        )

    def zero(self, runbook: str) -> None:
        """The series the alert rules watch, at 0 until something happens."""
        self._finished.add(0, {"runbook": runbook, "outcome": FAILED})
        self._rollbacks.add(0, {"runbook": runbook, "result": "incomplete"})

    def step(self, runbook: str, step: str, state: str, took: timedelta) -> None:
        self._step.record(took, {"runbook": runbook, "step": step, "state": state})


def notification_failed(meter: MetricMeter, channel: str) -> None:
    """Count a message that did not reach its receiver (each failed attempt: retries included)."""
    meter.create_counter(
        NOTIFICATIONS_FAILED,
        "Notifications that did not reach their receiver, by channel (chat, status page, "
        "pager); each failed attempt counts.",
    ).add(1, {"channel": channel})


def worker_started(
    meter: MetricMeter,
    namespace: str,
    polled: list[str],
    runs_queue: str | None,
    runbooks: Iterable[str],
) -> None:
    """Say which task queues this process polls (the alerts on no worker of a kind read it), and
    on the queue its runs are on (``runs_queue``, None for a privileged worker, which runs none)
    start at 0 the series the alert rules watch, labelled as each run's meter labels them (the
    SDK adds namespace, task_queue and workflow_type): ``increase()`` cannot see a counter's
    first step from absent to 1, so the first failed run after a worker starts would go unseen.
    """
    up = meter.create_gauge(WORKER_UP, "1 while this worker polls the task queue.")
    for task_queue in polled:
        up.set(1, {"task_queue": task_queue})
    if runs_queue is None:
        return
    for runbook in runbooks:
        where = {"namespace": namespace, "task_queue": runs_queue, "workflow_type": runbook}
        RunMetrics(meter.with_additional_attributes(where)).zero(runbook)


class SystemGauges:
    """The API's gauges about the whole system, as it last read them from Temporal."""

    def __init__(self, meter: MetricMeter) -> None:
        self._waiting = meter.create_gauge(
            APPROVALS_WAITING, "Open runs waiting for a person's approval, by runbook."
        )
        self._oldest = meter.create_gauge_float(
            APPROVAL_OLDEST_AGE,
            "How long the oldest pending approval has waited (0 when none waits).",
        )
        self._frozen = meter.create_gauge(
            KILL_SWITCH_FROZEN, "1 while the kill switch holds every mutating step."
        )
        self._up = meter.create_gauge(
            VISIBILITY_UP,
            "1 when the API's last read of these gauges from Temporal succeeded; while 0 the "
            "others keep their last values.",
        )

    def update(self, waiting: dict[str, int], oldest_seconds: float, frozen: bool) -> None:
        for runbook, count in waiting.items():
            self._waiting.set(count, {"runbook": runbook})
        self._oldest.set(oldest_seconds)
        self._frozen.set(int(frozen))
        self._up.set(1)

    def unreadable(self) -> None:
        self._up.set(0)
