"""The baseline for bench/step_overhead.py: a workflow of N no-op activities and nothing else.

It lives in its own module because the workflow sandbox re-imports a workflow's module, which it
cannot do for a script run as ``__main__``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def no_op(step: int) -> int:
    return step


@workflow.defn
class Bare:
    @workflow.run
    async def run(self, activities: int) -> int:
        for step in range(activities):
            await workflow.execute_activity(
                no_op, step, start_to_close_timeout=timedelta(seconds=30)
            )
        return activities
