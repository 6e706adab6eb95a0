"""The gauges about the whole system that the API serves on its metrics address: approvals
waiting by runbook, how long the oldest has waited, and whether the kill switch is on.

No worker can say these (a run waits on whichever worker, or none), so the API reads them from
Temporal: visibility lists the runs waiting (``AstraAwaitingApproval``), each run's ``status``
query says since when its approval waits, and the kill switch's workflow says whether it holds.
They are re-read every ``ASTRA_OPS_METRICS_REFRESH_SECONDS``, not on each scrape: the SDK's
exporter serves the page, and several Prometheus servers scraping cost Temporal nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from temporalio.client import Client

from runtime import search_attributes as sa
from runtime.client import TemporalUnavailable
from runtime.metrics import SystemGauges
from runtime.telemetry import Telemetry
from starters.run_views import RunError
from starters.runs import QUERY_TIMEOUT, TEMPORAL_ERRORS, Runs, listed
from workflows.catalogue import RUNBOOKS
from workflows.models import RunStatus

log = logging.getLogger(__name__)

WAITING = f"{sa.AWAITING_APPROVAL.name} = true AND ExecutionStatus = 'Running'"
MAX_LISTED = 10_000
"""Runs counted per read; past it the counts are lower bounds (the bench waits 10,000)."""
MAX_QUERIED = 50
"""Runs asked per read for their approval's age, oldest first."""


async def approvals(client: Client, now: datetime) -> tuple[dict[str, int], float]:
    """Runs waiting for approval, by runbook, and the age in seconds of the oldest approval.

    An approval is requested after its run started, so no run younger than the oldest approval
    found so far can hold an older one: runs are asked oldest first, and the asking stops there.
    A run that does not answer (no worker) counts with its own age, an upper bound.
    """
    waiting = dict.fromkeys(RUNBOOKS, 0)
    started: list[tuple[datetime, str]] = []
    async for execution in listed(client, WAITING, MAX_LISTED):
        runbook = execution.typed_search_attributes.get(sa.RUNBOOK) or execution.workflow_type
        waiting[runbook] = waiting.get(runbook, 0) + 1
        started.append((execution.start_time, execution.id))
    oldest = 0.0
    for start, run_id in sorted(started)[:MAX_QUERIED]:
        if (now - start).total_seconds() <= oldest:
            break
        try:
            status: RunStatus = await client.get_workflow_handle(run_id).query(
                "status", result_type=RunStatus, rpc_timeout=QUERY_TIMEOUT
            )
            since = [p.requested_at for p in status.pending_approvals]
        except TEMPORAL_ERRORS:
            since = [start]
        oldest = max([oldest, *((now - at).total_seconds() for at in since)])
    return waiting, oldest


@contextlib.asynccontextmanager
async def serving_gauges(
    telemetry: Telemetry, runs: Callable[[], Awaitable[Runs]], every: float
) -> AsyncIterator[None]:
    """Keep the gauges fresh while the block runs; without a metrics runtime, do nothing."""
    if telemetry.runtime is None:
        yield
        return
    gauges = SystemGauges(telemetry.runtime.metric_meter)

    async def refresh() -> None:
        while True:
            try:
                reader = await runs()
                waiting, oldest = await approvals(reader.client, datetime.now(UTC))
                gauges.update(waiting, oldest, frozen=await reader.frozen() is not None)
            except (TemporalUnavailable, RunError, *TEMPORAL_ERRORS) as err:
                log.warning("could not read the approval and kill-switch gauges: %s", err)
                gauges.unreadable()
            await asyncio.sleep(every)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
