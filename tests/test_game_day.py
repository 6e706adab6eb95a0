"""A game day: the real alerting chain, from a fault in the simulated Astra to the incident that
follows it to the end. Debian's Prometheus scrapes the sandbox's /metrics with
deploy/prometheus's rules, Debian's Alertmanager posts with deploy/alertmanager's config to the
API, and the production worker runs the incident and its runbook. Nothing is stubbed between the
lost heartbeat and the incident's timeline."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import SecretStr
from temporalio.service import RPCError

from sandbox.faults import worker_lost
from sandbox.metrics import MetricsApp
from starters.api import create_app
from tests.conftest_incident import Desk, incident_worker, state
from tests.conftest_kube import eventually
from tests.conftest_sandbox import RunningAstra
from tests.helpers import decide
from tests.monitoring import alertmanager, on_loopback, prometheus
from tests.test_api import ALERT_SENDERS, ALERTMANAGER, TOKENS
from tests.test_incident_runbooks import on_astra
from workflows.incident_models import Stage, TimelineEntry, incident_id_for_group

APPROVAL = "approve deleting more pods than the automatic limit"


async def test_a_lost_worker_alerts_opens_an_incident_runs_its_runbook_and_resolves(
    desk: Desk, astra: RunningAstra, tmp_path: Path
) -> None:
    on_astra(desk, astra)
    # No pod may go without a person today, so the runbook the alert starts asks for approval.
    desk.policy(
        runbooks={
            "worker-lost": {
                "automatic": {"delete the worker's pod": {"max": 0, "per_seconds": 3600}}
            }
        }
    )
    api = create_app(
        desk.settings.model_copy(update={"api_tokens": SecretStr(TOKENS), **ALERT_SENDERS})
    )
    target = astra.target
    # Astra reports the workers whose pods run: a replaced worker's heartbeat leaves /metrics.
    metrics = MetricsApp.of(astra.generator)
    token = ALERTMANAGER["Authorization"].removeprefix("Bearer ")
    async with (
        incident_worker(desk),
        on_loopback(api) as api_url,
        on_loopback(metrics) as metrics_url,
        alertmanager(api_url, token, tmp_path) as alertmanager_url,
        prometheus(f"{metrics_url}/metrics", alertmanager_url, tmp_path),
    ):
        async with astra.between_ticks():
            fault = await worker_lost(target)
        lost = fault.worker_id
        incident_id = incident_id_for_group(
            f'{{}}:{{alertname="AstraWorkerLost", worker_id="{lost}"}}'
        )
        desk.opened.append(incident_id)
        incident = desk.client.get_workflow_handle(incident_id)

        async def runbook_started() -> bool:
            try:
                return bool((await state(incident)).runs)
            except RPCError:
                return False  # Alertmanager has not posted yet

        await eventually(
            runbook_started,
            timeout=30,
            interval=0.1,
            message="an incident opened for the alert starts its runbook",
        )
        runbook = desk.client.get_workflow_handle(f"worker-lost/{lost}")
        await decide(runbook, APPROVAL, "carol")
        done = await desk.until(
            incident,
            lambda s: s.stage == Stage.CONTAIN and bool(s.runs) and s.runs[0].outcome is not None,
            "the runbook's outcome, and the resolved notification",
            timeout=60,
        )

    # In the order things happened (as the postmortem tells it): the runbook's steps reach the
    # incident when it ends, with the times they were done.
    happened = sorted(done.timeline, key=lambda e: e.at)
    resolution = [e for e in happened if e.actor == "alertmanager" and e.kind != "opened"][1:]
    run = f"worker-lost/{lost} · "
    assert_entries(
        [e for e in happened if e not in resolution],
        [
            (
                "opened",
                "alertmanager",
                f"SEV3 (Minor / isolated) opened: Worker {lost} has not "
                "heartbeat for …; rotation Agent Platform",
            ),
            (
                "alert",
                "alertmanager",
                f"AstraWorkerLost firing: Worker {lost} has not heartbeat …",
            ),
            ("page", "astra-ops", "paged carol (primary of agent-platform)"),
            (
                "runbook",
                f"{incident_id} (alert AstraWorkerLost)",
                f"started worker-lost/{lost} (Worker Lost)",
            ),
            ("runbook_step", "worker-lost", f"{run}confirm the heartbeat is lost: done — …"),
            ("runbook_step", "worker-lost", f"{run}check the worker's pod: done — 3 pods: …"),
            ("runbook_step", "worker-lost", f"{run}check the rest of the pool: done — 2 found: …"),
            ("runbook_step", "worker-lost", f"{run}count the worker's leased tasks: done — …"),
            ("runbook_step", "worker-lost", f"{run}{APPROVAL}: done — approved by carol"),
            ("runbook_step", "worker-lost", f"{run}requeue the worker's tasks: done — requeued …"),
            (
                "runbook_step",
                "worker-lost",
                f"{run}delete the worker's pod: done — deleted pod astra/{lost}",
            ),
            ("runbook_step", "worker-lost", f"{run}verify a replacement heartbeats: done — …"),
            (
                "runbook_step",
                "worker-lost",
                f"{run}verify the requeued tasks are picked up: done — 0 of …",
            ),
            ("runbook_outcome", "astra-ops", f"worker-lost/{lost}: done — …"),
        ],
    )
    # The alert resolves because the pod went; whether before or after the runbook's checks
    # that the replacement works is a race of the real world, and either order is right.
    assert_entries(
        resolution,
        [
            ("resolved_alert", "alertmanager", "AstraWorkerLost resolved"),
            ("resolved_alert", "alertmanager", "every alert of the group resolved"),
            (
                "stage",
                "alertmanager",
                "contain (from detect): every alert of the group resolved",
            ),
        ],
    )
    deleted = next(e for e in happened if "delete the worker's pod: done" in e.text)
    assert resolution[0].at > deleted.at


def assert_entries(entries: list[TimelineEntry], expected: list[tuple[str, str, str]]) -> None:
    """``entries`` are ``expected`` in order: (kind, actor, text), "…" in a text standing for
    what varies from run to run (ages, pod names, counts)."""
    got = [(e.kind, e.actor, e.text) for e in entries]
    assert len(got) == len(expected) and all(
        (kind, actor) == (want_kind, want_actor)
        and re.fullmatch(".+".join(map(re.escape, want.split("…"))), text)
        for (kind, actor, text), (want_kind, want_actor, want) in zip(got, expected, strict=True)
    ), "\n".join(["the timeline:", *map(str, got), "expected:", *map(str, expected)])
