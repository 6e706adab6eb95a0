"""Dead-letter Repair: give tasks that died of transient errors another chance; report the rest.

Operations wiki, failure mode "Task final failure (max retries)": "Status -> dead_letter; optional
publish to astra:dead_letter for alerting/repair". Entries are read through a consumer group and
acknowledged only once handled (requeued, found already handled, or reported as not
retryable). Tasks are requeued in bounded batches under one step token, which the requeue
activity records per task: each task is requeued at most once per run, however often a batch is
retried. Kernel SRE own tasks and messaging, so they approve. Reading through the group is the
one thing a dry-run does: it moves entries to this consumer's pending list, where the next run
finds them again.

Rollback: none; neither a requeue nor an acknowledgement can be undone (a requeued task may be
running, an acknowledged entry has left the stream). Entries are acknowledged only once handled,
so a run that crashes, fails, is rejected or is cancelled leaves the rest pending for the next
run, which reads them first.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator
from temporalio import workflow

from workflows.models import Outcome, RunbookRequest, RunbookResult, matching
from workflows.runbook import Runbook, RunbookSpec

with workflow.unsafe.imports_passed_through():
    from activities.postgres import PostgresActivities, RequeueDeadLetters, TaskStatesRequest
    from activities.redis_store import (
        AckDeadLetters,
        DeadLetter,
        ReadDeadLetters,
        RedisActivities,
    )

DEFAULT_RETRYABLE = ["TimeoutError", "ConnectionError", "RateLimitError"]

RedisName = Annotated[
    str,
    Field(max_length=253),
    AfterValidator(
        matching(r"[A-Za-z0-9][A-Za-z0-9._:-]*", "a name of letters, digits and . _ : -")
    ),
]
ErrorClass = Annotated[
    str,
    Field(max_length=200),
    AfterValidator(
        matching(r"[A-Za-z_][A-Za-z0-9_.]*", "an error class name, such as TimeoutError")
    ),
]


class DeadLetterRepairRequest(RunbookRequest):
    group: RedisName = Field(default="astra-ops", description="the consumer group")
    consumer: RedisName = Field(
        default="dead-letter-repair",
        description="stable across runs, so a crashed run's entries are redelivered to the next",
    )
    max_entries: int = Field(
        default=1_000, gt=0, le=2_000, description="entries per run (bounded by payload size)"
    )
    batch_size: int = Field(default=100, gt=0, le=1_000, description="tasks per requeue")
    retryable_errors: list[ErrorClass] = Field(
        default=DEFAULT_RETRYABLE, min_length=1, max_length=100
    )

    @field_validator("retryable_errors", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``--param retryable_errors=TimeoutError,RateLimitError`` from the CLI."""
        return (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )


SPEC = RunbookSpec(
    name="dead-letter-repair",
    title="Dead-letter Repair",
    trigger="Tasks reach dead_letter (max retries) and are published to astra:dead_letter",
    rotation="kernel-sre",
    severity="SEV3",
    request=DeadLetterRepairRequest,
    subject=lambda req: req.group,
    steps=lambda req: [
        "read dead letters",
        "approve handling the dead letters",
        "requeue retryable tasks",
        "acknowledge handled dead letters",
        "verify requeued tasks left dead_letter",
    ],
)


def by_class(entries: list[DeadLetter]) -> str:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.error_class] = counts.get(entry.error_class, 0) + 1
    return ", ".join(f"{cls} ({n})" for cls, n in sorted(counts.items(), key=lambda kv: -kv[1]))


@workflow.defn(name=SPEC.name)
class DeadLetterRepair(Runbook):
    spec = SPEC

    @workflow.run
    async def run(self, req: DeadLetterRepairRequest) -> RunbookResult:
        return await self.steps.run(req, lambda: self._repair(req))

    async def _repair(self, req: DeadLetterRepairRequest) -> RunbookResult:
        batch = await self.steps.check(
            "read dead letters",
            RedisActivities.read_dead_letters,
            ReadDeadLetters(group=req.group, consumer=req.consumer, count=req.max_entries),
        )
        entries: list[DeadLetter] = batch.entries
        if not entries:
            return self.steps.finish(Outcome.NO_CHANGE, f"no dead letters for group {req.group}")
        retryable = [e for e in entries if e.error_class in req.retryable_errors]
        others = [e for e in entries if e.error_class not in req.retryable_errors]
        # A task published twice is requeued once; its entries are acknowledged together.
        task_ids = sorted({e.task_id for e in retryable if e.task_id})
        report = (
            f"{len(entries)} dead letters: {len(retryable)} retryable ({by_class(retryable)}), "
            f"{len(others)} not ({by_class(others) or 'none'})"
        )
        # Acknowledging is not undoable either (the entry leaves the stream), so a person
        # decides whenever anything would be handled, not only when something is requeued.
        await self.steps.approval(
            "approve handling the dead letters",
            f"{report}. Requeue {len(task_ids)} tasks with fresh retries and acknowledge "
            f"{len(entries)} entries (the {len(others)} not retryable are reported)? {req.reason}",
        )
        requeued: list[str] = []
        for start in range(0, len(task_ids), req.batch_size):
            chunk = task_ids[start : start + req.batch_size]
            result = await self.steps.act(
                "requeue retryable tasks",
                PostgresActivities.requeue_dead_letters,
                RequeueDeadLetters(task_ids=chunk),
            )
            requeued += result.requeued
            handled = set(chunk)
            await self._acknowledge(req, [e for e in retryable if e.task_id in handled])
        # Reported in this run's result, so handled: acknowledged after the requeues succeeded.
        await self._acknowledge(req, others + [e for e in retryable if not e.task_id])
        not_retryable = ", ".join(sorted({e.task_id for e in others})[:10])
        summary = (
            f"{report}; requeued {len(requeued)} of {len(task_ids)} retryable tasks (the rest "
            "had left dead_letter already)"
            + (f"; not retryable, for a person: {not_retryable}" if others else "")
        )
        if req.dry_run:
            return self.steps.finish(Outcome.DONE, f"dry-run: {summary}")
        if requeued:
            states = await self.steps.verify(
                "verify requeued tasks left dead_letter",
                PostgresActivities.task_states,
                TaskStatesRequest(task_ids=requeued),
            )
            again = sorted(t for t, s in states.tasks.items() if s.status == "dead_letter")
            if again:
                summary += f"; {len(again)} died again since: {', '.join(again[:10])}"
        return self.steps.finish(Outcome.DONE, summary)

    async def _acknowledge(self, req: DeadLetterRepairRequest, entries: list[DeadLetter]) -> None:
        if entries:
            await self.steps.act(
                "acknowledge handled dead letters",
                RedisActivities.ack_dead_letters,
                AckDeadLetters(group=req.group, entry_ids=[e.entry_id for e in entries]),
            )
