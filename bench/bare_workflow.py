"""The baselines the benchmarks measure the runbooks against: workflows with no runbook machinery.

They live in their own module because the workflow sandbox re-imports a workflow's module, which it
cannot do for a script run as ``__main__``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activity_calls import ActivityCall


@workflow.defn
class Bare:
    """Make the given activity calls in order, and nothing else: no step records, no search
    attributes, no current details, no summaries, no admission."""

    @workflow.run
    async def run(self, calls: list[ActivityCall]) -> int:
        for call in calls:
            await workflow.execute_activity(
                call.activity,
                args=call.args,
                task_queue=call.task_queue,
                start_to_close_timeout=timedelta(seconds=call.start_to_close_seconds),
                heartbeat_timeout=(
                    timedelta(seconds=call.heartbeat_seconds) if call.heartbeat_seconds else None
                ),
            )
        return len(calls)


@workflow.defn
class WaitForSignal:
    """Wait for one signal, then end: the least a run waiting for a person can hold."""

    def __init__(self) -> None:
        self.released = False

    @workflow.signal
    def release(self) -> None:
        self.released = True

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.released)


@workflow.defn
class Mailbox:
    """Take signals until released: the least an incident that hears of its alert group does,
    with no validation, no signature check, no state and no timeline."""

    def __init__(self) -> None:
        self.received = 0
        self.released = False

    @workflow.signal
    def post(self, _: object) -> None:
        self.received += 1

    @workflow.signal
    def release(self) -> None:
        self.released = True

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.released)
        return self.received
