"""The daily certificate scan: find the certificates inside their renewal window, and start
TLS Rotation for them.

A Temporal Schedule (``starters/schedules.py``, registered by ``astra-ops setup`` and the dev
stack) starts this workflow once a day. It reads every TLS service's certificate as TLS Rotation
does (its Secret, and its live endpoint by a real handshake) and, when one is due or not what its
endpoint serves, starts ``tls-rotation`` as its child, as itself: Temporal records the parent, so
the child's admission knows the scan started it, and lets it only where the access policy says
``on_schedule: start``. The rotation's approval still applies, so the scan never renews a
certificate by itself; it only makes sure a person is asked before the certificate expires.

The scan does not wait for the rotation: an approval may take hours, and the schedule skips a
day's scan while the previous one still runs. The child outlives it (``ABANDON``), and a rotation
already open for the namespace is left to finish (its workflow id deduplicates).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError

from runtime import search_attributes as sa
from workflows.models import MAX_COMMENT, TLS_SCAN_WORKFLOW, KubernetesLabel, RunbookResult
from workflows.steps import task_queue_for
from workflows.timeouts import DEFAULT_RETRY, DEFAULT_TIMEOUT, heartbeat_timeout
from workflows.tls_rotation import SPEC as TLS_ROTATION
from workflows.tls_rotation import TlsRotationRequest, scan_timeout

with workflow.unsafe.imports_passed_through():
    from activities.incident import IncidentActivities, RunbookPlanRequest
    from activities.tls import CertificateScanRequest, TlsActivities


class TlsScanRequest(BaseModel):
    namespace: KubernetesLabel = "astra"


class TlsScanResult(BaseModel):
    summary: str
    due: list[str] = []
    """The services whose certificate is due or not served: what a rotation would touch."""
    started: str | None = None
    """The ``tls-rotation`` run the scan started, if any."""


@workflow.defn(name=TLS_SCAN_WORKFLOW)
class TlsScan:
    @workflow.run
    async def run(self, req: TlsScanRequest) -> TlsScanResult:
        scan_id = workflow.info().workflow_id
        # The rotation's request as the policy makes it (its defaults, its bounds), so the scan
        # uses the renewal window the rotation will, and the child is not refused for a bound.
        plan = await workflow.execute_activity_method(
            IncidentActivities.plan_runbook,
            RunbookPlanRequest(
                incident_id=scan_id,
                runbook=TLS_ROTATION.name,
                requester=scan_id,
                reason="the daily certificate scan",
                params={"namespace": req.namespace},
            ),
            start_to_close_timeout=DEFAULT_TIMEOUT,
            retry_policy=DEFAULT_RETRY,
            summary=f"plan {TLS_ROTATION.name} of {req.namespace}",
        )
        if plan.refused is not None:
            return self._done(TlsScanResult(summary=f"cannot plan a rotation: {plan.refused}"))
        rotation = TlsRotationRequest.model_validate(plan.request)
        scan = await workflow.execute_activity_method(
            TlsActivities.scan_certificates,
            CertificateScanRequest(
                namespace=rotation.namespace,
                services=rotation.services,
                window_share=rotation.renewal_window_share,
            ),
            task_queue=task_queue_for(TlsActivities.scan_certificates),
            start_to_close_timeout=scan_timeout(rotation.services),
            heartbeat_timeout=heartbeat_timeout(scan_timeout(rotation.services)),
            retry_policy=DEFAULT_RETRY,
            summary=f"scan the certificates of {rotation.namespace}",
        )
        due = [s.service for s in scan.services if s.due or s.mismatch]
        if not due:
            return self._done(TlsScanResult(summary=f"nothing to renew: {scan.summary()}"))
        workflow_id = TLS_ROTATION.workflow_id(rotation)
        why = f"the daily scan found {', '.join(due)} due: {scan.summary()}"
        rotation = rotation.model_copy(update={"reason": why[:MAX_COMMENT]})
        attributes: list[SearchAttributePair[Any]] = [
            SearchAttributePair(sa.RUNBOOK, TLS_ROTATION.name),
            SearchAttributePair(sa.SEVERITY, TLS_ROTATION.severity),
            SearchAttributePair(sa.SERVICE, TLS_ROTATION.subject(rotation)),
            SearchAttributePair(sa.AWAITING_APPROVAL, False),
            SearchAttributePair(sa.DRY_RUN, False),
        ]
        try:
            await workflow.start_child_workflow(
                TLS_ROTATION.name,
                rotation,
                id=workflow_id,
                result_type=RunbookResult,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                search_attributes=TypedSearchAttributes(attributes),
                static_summary=f"{TLS_ROTATION.title} of {rotation.namespace} (daily scan)",
                static_details=f"started by {scan_id}",
            )
        except WorkflowAlreadyStartedError:
            return self._done(
                TlsScanResult(
                    summary=f"{', '.join(due)} due; {workflow_id} is already open and left to "
                    f"finish: {scan.summary()}",
                    due=due,
                )
            )
        return self._done(
            TlsScanResult(
                summary=f"started {workflow_id} for {', '.join(due)}; it waits for approval",
                due=due,
                started=workflow_id,
            )
        )

    def _done(self, result: TlsScanResult) -> TlsScanResult:
        workflow.set_current_details(result.summary)
        return result
