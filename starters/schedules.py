"""astra-ops's Temporal Schedules, registered idempotently by ``astra-ops setup`` and the dev stack.

One today: the daily certificate scan (``workflows/tls_scan.py``), which starts TLS Rotation for
the certificates inside their renewal window. Its id is fixed, so registering again updates the
one schedule (a new task queue or namespace after a settings change) and never adds a second.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from runtime.settings import Settings
from workflows.models import TLS_SCAN_WORKFLOW
from workflows.tls_scan import TlsScanRequest

TLS_SCAN_SCHEDULE_ID = "astra-ops/tls-scan"
TLS_SCAN_EVERY = timedelta(days=1)
TLS_SCAN_AT = timedelta(hours=6)
"""Past midnight UTC: early in Europe's working day, so the approval it asks for finds people."""


def tls_scan_schedule(settings: Settings) -> Schedule:
    """A scan of the settings' namespace once a day at 06:00 UTC; a scan still running (it does
    not wait for the rotation it starts, so only a stuck one) makes the next one skip."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            TLS_SCAN_WORKFLOW,
            TlsScanRequest(namespace=settings.kube_namespace),
            id=f"{TLS_SCAN_WORKFLOW}/{settings.kube_namespace}",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(hours=1),
            static_summary=f"daily certificate scan of {settings.kube_namespace}",
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=TLS_SCAN_EVERY, offset=TLS_SCAN_AT)],
            time_zone_name="UTC",
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def register_schedules(client: Client, settings: Settings) -> list[str]:
    """Create each schedule, or update it to what the settings say now; what was done, one line
    per schedule (``<id> created (...)`` or ``<id> updated (...)``)."""
    schedule = tls_scan_schedule(settings)
    what = (
        f"daily at {TLS_SCAN_AT.seconds // 3600:02d}:00 UTC, {TLS_SCAN_WORKFLOW} of "
        f"{settings.kube_namespace} on task queue {settings.task_queue}"
    )
    try:
        await client.create_schedule(TLS_SCAN_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:

        def replace(current: ScheduleUpdateInput) -> ScheduleUpdate:
            # An operator's pause (and its note) survives a release's `astra-ops setup`.
            state = current.description.schedule.state
            return ScheduleUpdate(schedule=dataclasses.replace(schedule, state=state))

        await client.get_schedule_handle(TLS_SCAN_SCHEDULE_ID).update(replace)
        return [f"{TLS_SCAN_SCHEDULE_ID} updated ({what})"]
    return [f"{TLS_SCAN_SCHEDULE_ID} created ({what})"]
