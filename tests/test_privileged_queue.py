"""Privileged activities (the data plane's servers, the platform's secrets) run only on workers
deployed with those rights: a run's other steps go on any worker, and its privileged step waits
on its own task queue until a privileged worker polls it."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from temporalio.client import Client

from activities.privilege import PRIVILEGED, privileged_queue
from runtime.settings import Settings
from sandbox.kube.tls import TlsEndpoints
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox, eventually
from tests.helpers import handle_of
from workers.worker import running_worker
from workflows.models import Outcome


@pytest.fixture
def endpoints(kube: KubeSandbox, namespace: str) -> Iterator[TlsEndpoints]:
    with TlsEndpoints(kube.cluster, namespace=namespace) as served:
        yield served


async def test_a_privileged_step_waits_for_a_privileged_worker(
    client: Client, settings: Settings, runs: Runs, namespace: str, endpoints: TlsEndpoints
) -> None:
    standard = settings.model_copy(update={"worker_kind": "standard"})
    privileged = settings.model_copy(update={"worker_kind": "privileged"})
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, standard, executor):
            # A wider window makes the sandbox's certificates due: the run has work to report.
            started = await runs.start(
                "tls-rotation",
                {"namespace": namespace, "renewal_window_share": 0.9},
                requester="alice",
                dry_run=True,
            )
            handle = handle_of(client, started.run_id)

            async def scan_waits_on_the_privileged_queue() -> bool:
                pending = (await handle.describe()).raw_description.pending_activities
                return any(p.activity_type.name == "scan_certificates" for p in pending)

            await eventually(
                scan_waits_on_the_privileged_queue, timeout=20, message="the scan scheduled"
            )
            history = await handle.fetch_history()
            [scheduled] = [
                e.activity_task_scheduled_event_attributes
                for e in history.events
                if e.HasField("activity_task_scheduled_event_attributes")
                and e.activity_task_scheduled_event_attributes.activity_type.name
                == "scan_certificates"
            ]
            assert scheduled.task_queue.name == privileged_queue(settings.task_queue)
            async with running_worker(client, privileged, executor):
                result = await handle.result()

    assert result.outcome == Outcome.DONE and result.summary.startswith("dry-run:"), result


def test_every_privileged_class_is_a_class_of_activities_the_worker_runs() -> None:
    """The list is of names (workflow code routes by them): each must name a real class."""
    import workers.worker as composition

    for name in PRIVILEGED:
        cls = vars(composition).get(name)
        assert inspect.isclass(cls), f"{name} is privileged but the worker imports no such class"
        assert composition.activities_of_class(cls), f"{name} defines no activity"
