"""Fixtures for incident tests: the production worker with the chat, status-page and pager
receivers recording every request, an access policy whose timings are seconds, and a desk that
opens incidents and acts on them as the API would (signed).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from runtime.identity import statement
from runtime.settings import REPO_ROOT, Settings
from sandbox.faults import worker_lost
from tests.conftest_kube import eventually
from tests.conftest_sandbox import RunningAstra
from tests.helpers import TEST_SIGNER
from tests.incident_stub import IncidentStub
from tests.receivers import Receiver
from workers.worker import running_worker, workflow_runner
from workflows.incident_models import (
    INCIDENT_PREFIX,
    INCIDENT_WORKFLOW,
    STATE_QUERY,
    ActionKind,
    AlertNotification,
    IncidentAction,
    IncidentOpen,
    IncidentState,
    Severity,
)

STATUS_PAGE_ID = "astrastatus01"
QUIET = 3_600
"""A timing no test waits for: what it does not exercise stays out of its way."""


@dataclass
class Desk:
    """Opening incidents and acting on them as the API does, and reading what came of it."""

    client: Client
    task_queue: str
    settings: Settings
    policy_path: Path
    chat: Receiver
    status_page: Receiver
    pager: Receiver
    opened: list[str] = field(default_factory=list)

    def policy(self, **incidents: Any) -> None:
        """Rewrite the test's access policy: the example's, with ``incidents`` settings changed
        (a rotation's ``ack_timeout_seconds`` is set with ``ack_timeout_seconds``)."""
        policy = yaml.safe_load((REPO_ROOT / "deploy" / "access-policy.yaml").read_text())
        timings = {
            "commander_request_interval_seconds": QUIET,
            "sustained_sev1_seconds": QUIET,
            "item_reminder_seconds": QUIET,
            **incidents,
        }
        ack = timings.pop("ack_timeout_seconds", QUIET)
        runbooks = timings.pop("runbooks", {})
        for rotation in policy["incidents"]["rotations"].values():
            rotation["ack_timeout_seconds"] = ack
        policy["incidents"].update(timings)
        for name, changes in runbooks.items():
            policy["runbooks"][name].update(changes)
        self.policy_path.write_text(yaml.safe_dump(policy))

    async def open(
        self,
        title: str = "Tasks are failing",
        severity: Severity = Severity.SEV3,
        *,
        opened_by: str = "alice",
        signed: bool = True,
        workflow_id: str | None = None,
        **fields: Any,
    ) -> WorkflowHandle[Any, IncidentState]:
        workflow_id = workflow_id or f"{INCIDENT_PREFIX}{uuid.uuid4().hex[:12]}"
        self.opened.append(workflow_id)
        opened = IncidentOpen(title=title, severity=severity, opened_by=opened_by, **fields)
        if signed:
            said = statement("incident.open", opened_by, workflow_id, opened.signed_payload())
            opened = opened.model_copy(update={"authorization": TEST_SIGNER.sign(said)})
        return await self.client.start_workflow(
            INCIDENT_WORKFLOW,
            opened,
            id=workflow_id,
            task_queue=self.task_queue,
            result_type=IncidentState,
        )

    async def act(
        self, handle: WorkflowHandle[Any, Any], kind: ActionKind, actor: str, **fields: Any
    ) -> str:
        action = IncidentAction(actor=actor, **fields)
        run_id = (await handle.describe()).run_id
        said = statement(
            f"incident.{kind.value}",  # type: ignore[arg-type]
            actor,
            handle.id,
            action.signed_payload(),
            run_id=run_id,
        )
        signed = action.model_copy(update={"authorization": TEST_SIGNER.sign(said)})
        retries = 2
        while True:
            try:
                done: str = await handle.execute_update(kind.value, signed, result_type=str)
                return done
            except RPCError as err:
                # The workflow task that carried the update also continued as new, and the
                # server failed it (UnhandledCommand); sent again, the update reaches the next
                # run (the API must retry so too).
                if err.status != RPCStatusCode.FAILED_PRECONDITION or not retries:
                    raise
                retries -= 1

    async def alert(
        self, handle: WorkflowHandle[Any, Any], notification: AlertNotification
    ) -> None:
        said = statement(
            "incident.alerts", "alertmanager", handle.id, notification.signed_payload()
        )
        signed = notification.model_copy(update={"authorization": TEST_SIGNER.sign(said)})
        await handle.signal("alerts", signed)

    async def until(
        self,
        handle: WorkflowHandle[Any, Any],
        holds: Callable[[IncidentState], bool],
        message: str,
        timeout: float = 20,  # noqa: ASYNC109 - a deadline for polling
    ) -> IncidentState:
        """Poll the incident's state until ``holds``; the state that held."""
        seen: list[IncidentState] = []

        async def check() -> bool:
            current = await state(handle)
            seen[:] = [current]
            return holds(current)

        await eventually(check, timeout=timeout, interval=0.1, message=message)
        return seen[0]

    async def continue_with_notes(
        self, handle: WorkflowHandle[Any, Any], actor: str, first_run: str
    ) -> int:
        """Add notes as ``actor`` until the incident, whose run was ``first_run``, has
        continued as new (the policy's event limit set low); how many it added."""
        notes = 0

        async def continued() -> bool:
            nonlocal notes
            if (await handle.describe()).run_id != first_run:
                return True
            notes += 1
            await self.act(handle, ActionKind.NOTE, actor, text=f"note {notes}")
            return False

        await eventually(continued, timeout=30, interval=0, message="the incident continued as new")
        return notes

    async def runbook_from_alert(
        self, astra: RunningAstra
    ) -> tuple[WorkflowHandle[Any, IncidentState], IncidentState, str]:
        """A worker of ``astra`` lost, and the incident Alertmanager's alert for it opens, until
        the worker-lost runbook the alert names has an outcome: the incident, its state then,
        and the lost worker."""
        async with astra.between_ticks():
            fault = await worker_lost(astra.target)
        alert = lost_worker_alert('{}:{alertname="AstraWorkerLost"}', fault.worker_id)
        handle = await self.open(
            "Worker lost", Severity.SEV3, opened_by="alertmanager", notification=alert
        )
        done = await self.until(
            handle,
            lambda s: bool(s.runs) and s.runs[0].outcome is not None,
            "the runbook's outcome",
            timeout=90,
        )
        return handle, done, fault.worker_id

    def pages(self) -> list[tuple[str, str]]:
        """(action, dedup key) of every page event the pager took, in order."""
        return [
            (r.body["event_action"], r.body["dedup_key"])
            for r in self.pager.accepted
            if r.path == "/v2/enqueue"
        ]

    async def pager_took(self, count: int) -> None:
        await eventually(
            lambda: len(self.pages()) >= count, timeout=30, message=f"{count} pager events taken"
        )

    def chat_texts(self) -> list[str]:
        return [r.body["text"] for r in self.chat.accepted]

    async def chat_said(self, text: str) -> None:
        """Wait for a chat message holding ``text``: messages go out in the background, after
        the timeline entry they tell of."""
        await eventually(
            lambda: any(text in t for t in self.chat_texts()),
            timeout=30,
            message=f"a chat message saying {text!r}",
        )


async def state(handle: WorkflowHandle[Any, Any]) -> IncidentState:
    current: IncidentState = await handle.query(STATE_QUERY, result_type=IncidentState)
    return current


async def settled(handle: WorkflowHandle[Any, Any]) -> WorkflowHandle[Any, Any]:
    """An incident that stays open, once nothing is in flight (no message, runbook or workflow
    task): its history then ends where the test or scenario left it, every time."""

    async def quiet() -> bool:
        described = (await handle.describe()).raw_description
        return not (
            described.pending_activities
            or described.pending_children
            or described.HasField("pending_workflow_task")
        )

    await eventually(quiet, timeout=30, interval=0.1, message=f"{handle.id} settled")
    return handle


def kinds(current: IncidentState) -> list[str]:
    return [e.kind for e in current.timeline]


def notification(group: str, *alerts: dict[str, Any], status: str = "firing") -> AlertNotification:
    """An Alertmanager webhook payload (version 4) for ``alerts``: each a dict with
    ``fingerprint``, ``labels`` and optionally ``status`` and ``annotations``."""
    now = datetime.now(UTC).isoformat()
    shared = set.intersection(*(set(a["labels"].items()) for a in alerts))
    return AlertNotification.model_validate(
        {
            "version": "4",
            "groupKey": group,
            "status": status,
            "receiver": "astra-ops",
            "commonLabels": dict(shared),
            "alerts": [
                {
                    "status": a.get("status", "firing"),
                    "fingerprint": a["fingerprint"],
                    "labels": a["labels"],
                    "annotations": a.get("annotations", {}),
                    "startsAt": now,
                    "endsAt": now if a.get("status") == "resolved" else None,
                }
                for a in alerts
            ],
        }
    )


def lost_worker_alert(group: str, worker_id: str) -> AlertNotification:
    """Alertmanager's notification that ``worker_id`` was lost, naming the worker-lost runbook."""
    return notification(
        group,
        {
            "fingerprint": f"fp-{worker_id}",
            "labels": {
                "alertname": "AstraWorkerLost",
                "severity": "SEV3",
                "rotation": "agent-platform",
                "runbook": "worker-lost",
                "worker_id": worker_id,
            },
            "annotations": {"summary": f"Worker {worker_id} has not heartbeat for 2m"},
        },
    )


def incident_settings(
    settings: Settings,
    state_dsn: str,
    policy_path: Path,
    postmortems: Path,
    chat: Receiver,
    status_page: Receiver,
    pager: Receiver,
) -> Settings:
    return settings.model_copy(
        update={
            "access_policy": policy_path,
            "state_database_url": state_dsn,
            "postmortem_dir": postmortems,
            "chat_webhook_url": SecretStr(f"{chat.url}/services/T0/B0/incident"),
            "status_page_url": status_page.url,
            "status_page_id": STATUS_PAGE_ID,
            "status_page_api_key": SecretStr("status-page-key"),
            "status_page_components": "scheduler:cmpsched,workers:cmpworkers",
            "pagerduty_events_url": pager.url,
            "pagerduty_routing_keys": SecretStr("kernel-sre:Rkernel,agent-platform:Ragent"),
        }
    )


@pytest.fixture
async def desk(
    client: Client,
    settings: Settings,
    pg_dsn: str,
    tmp_path: Path,
    chat_receiver: Receiver,
    status_page_receiver: Receiver,
    pager_receiver: Receiver,
) -> AsyncIterator[Desk]:
    """Incidents a test leaves open are terminated after it: the session's server keeps no
    timers firing for a task queue nobody polls."""
    policy_path = tmp_path / "access-policy.yaml"
    built = Desk(
        client=client,
        task_queue=settings.task_queue,
        settings=incident_settings(
            settings,
            pg_dsn,
            policy_path,
            tmp_path / "postmortems",
            chat_receiver,
            status_page_receiver,
            pager_receiver,
        ),
        policy_path=policy_path,
        chat=chat_receiver,
        status_page=status_page_receiver,
        pager=pager_receiver,
    )
    built.policy()
    yield built
    for workflow_id in built.opened:
        handle = client.get_workflow_handle(workflow_id)
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("the test is over")


@asynccontextmanager
async def incident_worker(desk: Desk) -> AsyncIterator[Worker]:
    """The production worker on the desk's settings, until the block ends (a test may stop it
    and start another, as a restarted worker)."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(desk.client, desk.settings, executor) as worker:
            yield worker


@pytest.fixture
async def incident_stub(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    """The stand-in incident workflow (tests/incident_stub.py) on this test's task queue, for
    tests of what reaches an incident rather than what it does."""
    async with Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[IncidentStub],
        workflow_runner=workflow_runner(),
    ) as w:
        yield w


@pytest.fixture
async def desk_worker(desk: Desk) -> AsyncIterator[Worker]:
    async with incident_worker(desk) as worker:
        yield worker
