"""The daily certificate scan: its schedule as `astra-ops setup` registers it, and the scan
workflow against the sandbox's TLS services (real handshakes) with the production worker.

The scan starts TLS Rotation as its child, as itself: the rotation's admission trusts that only
because Temporal records the parent, and only where the policy says ``on_schedule: start``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from temporalio import workflow
from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    WorkflowFailureError,
)
from temporalio.exceptions import ChildWorkflowError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from runtime.settings import Settings
from sandbox.faults import cert_expiring
from sandbox.kube.tls import TlsEndpoints
from starters.schedules import TLS_SCAN_SCHEDULE_ID, register_schedules
from tests.conftest_kube import KubeSandbox, eventually, sandbox_ca
from tests.helpers import awaiting_approval, handle_of, status
from tests.test_runbook_tls_rotation import rolled_onto, tls_worker
from workers.worker import workflow_runner
from workflows.models import TLS_SCAN_WORKFLOW
from workflows.tls_rotation import TlsRotationRequest
from workflows.tls_scan import TlsScanRequest, TlsScanResult

RENEW = "approve renewing certificates"


@pytest.fixture
def endpoints(kube: KubeSandbox, namespace: str) -> Iterator[TlsEndpoints]:
    with TlsEndpoints(kube.cluster, namespace=namespace) as served:
        yield served


async def scan(client: Client, settings: Settings, namespace: str) -> tuple[str, TlsScanResult]:
    """One scan, as the schedule starts it (its id, a fresh suffix); its id and result."""
    scan_id = f"tls-scan/{namespace}-{uuid.uuid4().hex[:8]}"
    result = await client.execute_workflow(
        "tls-scan",
        TlsScanRequest(namespace=namespace),
        id=scan_id,
        task_queue=settings.task_queue,
        result_type=TlsScanResult,
    )
    return scan_id, result


async def expiring_gateway(kube: KubeSandbox, namespace: str, endpoints: TlsEndpoints) -> None:
    fault = await cert_expiring(kube.api, sandbox_ca(), namespace, ["gateway"], days_left=2)
    await rolled_onto(endpoints, namespace, "gateway", fault.fingerprints["gateway"])


async def test_registering_the_schedule_twice_leaves_one_daily_scan_and_keeps_a_pause(
    client: Client, settings: Settings
) -> None:
    first = await register_schedules(client, settings)
    handle = client.get_schedule_handle(TLS_SCAN_SCHEDULE_ID)
    try:
        assert first[0].startswith(f"{TLS_SCAN_SCHEDULE_ID} created")
        await handle.pause(note="certificates handled by hand this week")
        again = await register_schedules(client, settings)
        assert again[0].startswith(f"{TLS_SCAN_SCHEDULE_ID} updated")

        async def listed() -> list[str]:
            return [s.id async for s in await client.list_schedules() if s.id.startswith("astra")]

        async def visible() -> bool:  # the list is eventually consistent
            return bool(await listed())

        await eventually(visible, message="the schedule listed", timeout=10, interval=0.2)
        assert await listed() == [TLS_SCAN_SCHEDULE_ID]
        described = (await handle.describe()).schedule
        assert described.spec.intervals == [
            ScheduleIntervalSpec(every=timedelta(days=1), offset=timedelta(hours=6))
        ]
        assert described.spec.time_zone_name == "UTC"
        assert described.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert described.state.paused and "by hand" in (described.state.note or "")
        action = described.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.id, action.task_queue) == (
            "tls-scan",
            f"tls-scan/{settings.kube_namespace}",
            settings.task_queue,
        )
        [request] = await client.data_converter.decode(action.args, [TlsScanRequest])
        assert request == TlsScanRequest(namespace=settings.kube_namespace)
    finally:
        await handle.delete()


async def test_an_expiring_certificate_starts_one_rotation_that_waits_for_approval(
    client: Client, settings: Settings, kube: KubeSandbox, namespace: str, endpoints: TlsEndpoints
) -> None:
    await expiring_gateway(kube, namespace, endpoints)
    rotation_id = f"tls-rotation/{namespace}"
    async with tls_worker(client, settings):
        scan_id, result = await scan(client, settings, namespace)
        assert (result.started, result.due) == (rotation_id, ["gateway"]), result.summary
        rotation = handle_of(client, rotation_id)
        await awaiting_approval(rotation, RENEW)
        assert (await status(rotation)).requester == scan_id
        # The next day's scan finds the same certificate and leaves the open rotation to finish.
        _, again = await scan(client, settings, namespace)
        assert again.started is None and "already open" in again.summary, again.summary
        await rotation.terminate("test over")


async def test_nothing_to_renew_starts_nothing(
    client: Client, settings: Settings, namespace: str, endpoints: TlsEndpoints
) -> None:
    async with tls_worker(client, settings):
        _, result = await scan(client, settings, namespace)
    assert (result.started, result.due) == (None, []), result.summary
    assert result.summary.startswith("nothing to renew")
    with pytest.raises(RPCError) as raised:
        await client.get_workflow_handle(f"tls-rotation/{namespace}").describe()
    assert raised.value.status == RPCStatusCode.NOT_FOUND


async def test_a_policy_without_on_schedule_start_refuses_the_scans_rotation(
    client: Client,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    endpoints: TlsEndpoints,
    tmp_path: Path,
) -> None:
    policy = yaml.safe_load(settings.access_policy.read_text())
    del policy["runbooks"]["tls-rotation"]["on_schedule"]
    strict = tmp_path / "access-policy.yaml"
    strict.write_text(yaml.safe_dump(policy))
    settings = settings.model_copy(update={"access_policy": strict})
    await expiring_gateway(kube, namespace, endpoints)
    async with tls_worker(client, settings):
        _, result = await scan(client, settings, namespace)
        assert result.started == f"tls-rotation/{namespace}", result.summary
        with pytest.raises(WorkflowFailureError) as refused:
            await handle_of(client, result.started).result()
    assert "on_schedule: refuse" in str(refused.value.cause)


@workflow.defn(name=TLS_SCAN_WORKFLOW, sandboxed=False)
class ScanClaimingAPerson:
    """A workflow of the scan's type that starts the rotation in a person's name: what a client
    able to start workflows could try, to borrow the scan's admission for a claim."""

    @workflow.run
    async def run(self, task_queue: str, namespace: str, requester: str) -> str:
        request = TlsRotationRequest(requester=requester, namespace=namespace)
        try:
            await workflow.execute_child_workflow(
                "tls-rotation", request, id=f"tls-rotation/{namespace}", task_queue=task_queue
            )
        except ChildWorkflowError as err:
            return str(err.cause)
        return "admitted"


async def test_a_scan_parent_cannot_start_the_rotation_in_a_persons_name(
    client: Client, settings: Settings, kube: KubeSandbox, namespace: str
) -> None:
    stub_queue = f"{settings.task_queue}-stub"
    async with (
        tls_worker(client, settings),
        Worker(
            client,
            task_queue=stub_queue,
            workflows=[ScanClaimingAPerson],
            workflow_runner=workflow_runner(),
        ),
    ):
        refused = await client.execute_workflow(
            ScanClaimingAPerson.run,
            args=[settings.task_queue, namespace, "alice"],
            id=f"tls-scan/{namespace}-claim",
            task_queue=stub_queue,
        )
    assert f"starts runbooks only as itself (tls-scan/{namespace}-claim), not as alice" in refused
