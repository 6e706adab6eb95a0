"""deploy/alertmanager/alertmanager.yml: Alertmanager accepts it (`amtool check-config`), and it
sends every alert of the rules to the API's webhook, authenticated, resolved notifications
included, one group per alert and runbook subject. Debian's Alertmanager, run with it (only the
API's address, the credential file and the waits changed), opens an incident through the API
and tells it when the alert resolves."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from runtime.settings import Settings
from starters.api import ALERTS_PATH
from tests.conftest_kube import eventually
from tests.incident_stub import IncidentStub, Received
from tests.monitoring import ALERTMANAGER_CONFIG, RULES, alertmanager_config, program
from tests.monitoring import alertmanager as running_alertmanager
from tests.test_api import ALERTMANAGER
from tests.test_cli import api_url
from workers.worker import workflow_runner
from workflows.incident_models import incident_id_for_group

__all__ = ["api_url"]  # the API served on loopback, shared with test_cli


def test_amtool_accepts_the_config() -> None:
    amtool = program("amtool")
    done = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"`amtool check-config` failed:\n{done.stdout}{done.stderr}"
    assert "SUCCESS" in done.stdout


def test_every_alert_reaches_the_webhook_authenticated_resolved_notifications_too() -> None:
    route = alertmanager_config()["route"]
    assert "matchers" not in route, "every alert goes to the webhook"
    # Child routes only change timing: none names another receiver or lets an alert go on.
    for child in route.get("routes", []):
        assert "receiver" not in child and not child.get("continue"), child
    (receiver,) = [r for r in alertmanager_config()["receivers"] if r["name"] == route["receiver"]]
    (hook,) = receiver["webhook_configs"]
    assert urlsplit(hook["url"]).path == ALERTS_PATH
    assert hook["send_resolved"] is True
    auth = hook["http_config"]
    assert auth.get("authorization", {}).get("credentials_file") or auth.get("basic_auth")


def test_one_group_per_alert_and_runbook_subject() -> None:
    group_by = set(alertmanager_config()["route"]["group_by"])
    rules = [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]
    # A parameter the alert fills from its labels is its subject; one a person chooses
    # (Shard Scaling's `shards=N`) is no label to group by.
    subjects = {
        p
        for rule in rules
        for p in re.findall(r"--param (\w+)=\{\{ \$labels\.\1 \}\}", rule["annotations"]["action"])
    }
    assert subjects and group_by == {"alertname", *subjects}


@pytest.fixture
async def alertmanager(api_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """Debian's Alertmanager with this config, posting to the test's API; its own API's URL."""
    token = ALERTMANAGER["Authorization"].removeprefix("Bearer ")
    async with running_alertmanager(api_url, token, tmp_path) as url:
        yield url


async def test_alertmanager_opens_an_incident_through_the_api_and_resolves_it(
    alertmanager: str, client: Client, settings: Settings
) -> None:
    worker_id = f"astra-worker-{uuid.uuid4().hex[:8]}"
    rule = next(
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if rule["alert"] == "AstraWorkerLost"
    )
    summary = f"Worker {worker_id} has not heartbeat for 45s"
    alert: dict[str, Any] = {
        "labels": {"alertname": "AstraWorkerLost", "worker_id": worker_id, **rule["labels"]},
        "annotations": {"summary": summary},
        "startsAt": datetime.now(UTC).isoformat(),
    }
    group_key = f'{{}}:{{alertname="AstraWorkerLost", worker_id="{worker_id}"}}'
    incident = incident_id_for_group(group_key)
    async with (
        Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[IncidentStub],
            workflow_runner=workflow_runner(),
        ),
        httpx.AsyncClient() as http,
    ):
        assert (await http.post(f"{alertmanager}/api/v2/alerts", json=[alert])).is_success

        async def told(status: str) -> bool:
            try:
                got: Received = await client.get_workflow_handle(incident).query(
                    "received", result_type=Received
                )
            except RPCError:
                return False  # not opened yet
            return status in [n.status for n in got.notifications]

        await eventually(lambda: told("firing"), timeout=30, message="the incident is opened")
        ended = {**alert, "endsAt": datetime.now(UTC).isoformat()}
        assert (await http.post(f"{alertmanager}/api/v2/alerts", json=[ended])).is_success
        await eventually(lambda: told("resolved"), timeout=30, message="it hears of the end")
        got = await client.get_workflow_handle(incident).query("received", result_type=Received)
    assert got.opened.opened_by == "alertmanager" and got.open_refusal is None
    assert (got.opened.title, got.opened.components) == (summary, ["workers"])
