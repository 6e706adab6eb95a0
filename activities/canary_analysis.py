"""A canary's analysis, as Argo Rollouts' AnalysisTemplate does it: measure the canary's pods
against the stable ones over the last interval, and judge each measurement.

The numbers come from Astra's tasks table (``PostgresActivities.measure_canary``), the ground
truth: each task records the worker (pod) that last ran it. The judgement is a pure function
here, so the workflow applies it deterministically and tests can state it exactly.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class WorkerOutcomes(BaseModel):
    """What one group of workers (the canary's pods, or every other worker) finished."""

    tasks: int
    """Tasks whose latest outcome (succeeded, failed, dead-lettered) fell in the window."""
    failed: int
    p95_seconds: float | None = None
    """95th percentile of submission-to-success time of the tasks that succeeded; None when
    none did."""

    @property
    def rate(self) -> float:
        return self.failed / self.tasks if self.tasks else 0.0

    def summary(self) -> str:
        latency = f", p95 {self.p95_seconds:.2f}s" if self.p95_seconds is not None else ""
        return f"{self.failed}/{self.tasks} failed ({self.rate:.1%}){latency}"


class CanaryMeasurementRequest(BaseModel):
    canary_workers: list[str] = Field(max_length=10_000)
    """The worker ids (pod names) of the canary's pods; every other worker is the baseline."""
    window_seconds: float = Field(gt=0)


class CanaryMeasurement(BaseModel):
    window_seconds: float
    canary: WorkerOutcomes
    stable: WorkerOutcomes

    def summary(self) -> str:
        return (
            f"canary {self.canary.summary()} vs stable {self.stable.summary()} over "
            f"{self.window_seconds:g}s"
        )


class AnalysisCriteria(BaseModel):
    """When a measurement fails, passes, or says nothing (the access policy bounds each)."""

    max_error_rate_increase: float = Field(ge=0, le=1)
    """The canary fails if its failure rate exceeds the stable pods' by more than this."""
    max_latency_ratio: float = Field(ge=1)
    """The canary fails if its p95 latency exceeds the stable pods' times this."""
    min_samples: int = Field(ge=1)
    """Fewer canary tasks than this in a window: the measurement is inconclusive."""


class Verdict(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"


def judge(measurement: CanaryMeasurement, criteria: AnalysisCriteria) -> tuple[Verdict, str]:
    """The verdict on one measurement, and why, in words a person reads in the run's status."""
    canary, stable = measurement.canary, measurement.stable
    if canary.tasks < criteria.min_samples:
        return Verdict.INCONCLUSIVE, (
            f"inconclusive: the canary finished {canary.tasks} task(s), fewer than "
            f"{criteria.min_samples}"
        )
    limit = stable.rate + criteria.max_error_rate_increase
    if canary.rate > limit:
        return Verdict.FAILED, (
            f"failed: canary failure rate {canary.rate:.1%} > stable {stable.rate:.1%} + "
            f"{criteria.max_error_rate_increase:.1%} ({measurement.summary()})"
        )
    if (
        canary.p95_seconds is not None
        and stable.p95_seconds is not None
        and stable.tasks >= criteria.min_samples
        and canary.p95_seconds > stable.p95_seconds * criteria.max_latency_ratio
    ):
        return Verdict.FAILED, (
            f"failed: canary p95 {canary.p95_seconds:.2f}s > {criteria.max_latency_ratio:g} x "
            f"stable p95 {stable.p95_seconds:.2f}s ({measurement.summary()})"
        )
    return Verdict.PASSED, f"passed: {measurement.summary()}"
