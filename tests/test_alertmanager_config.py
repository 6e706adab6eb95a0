"""deploy/alertmanager/alertmanager.yml: Alertmanager accepts it (`amtool check-config`), and it
sends every alert of the rules to the API's webhook, authenticated, resolved notifications
included, one group per alert and runbook subject. Debian's Alertmanager, run with it (only the
API's address, the credential file and the waits changed), opens an incident through the API
and tells it when the alert resolves."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
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

from runtime.settings import REPO_ROOT, Settings
from starters.api import ALERTS_PATH
from tests.conftest_kube import eventually
from tests.incident_stub import IncidentStub, Received
from tests.test_api import ALERTMANAGER
from tests.test_cli import api_url
from workflows.incident_models import incident_id_for_group

__all__ = ["api_url"]  # the API served on loopback, shared with test_cli

CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return loaded


def program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed, so the Alertmanager config cannot be checked: `apt-get "
            "install prometheus-alertmanager` (.ci/run installs it where it is missing)"
        )
    return found


def test_amtool_accepts_the_config() -> None:
    amtool = program("amtool")
    done = subprocess.run(
        [amtool, "check-config", str(CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"`amtool check-config` failed:\n{done.stdout}{done.stderr}"
    assert "SUCCESS" in done.stdout


def test_every_alert_reaches_the_webhook_authenticated_resolved_notifications_too() -> None:
    route = config()["route"]
    assert "matchers" not in route and not route.get("routes"), "every alert goes to the webhook"
    (receiver,) = [r for r in config()["receivers"] if r["name"] == route["receiver"]]
    (hook,) = receiver["webhook_configs"]
    assert urlsplit(hook["url"]).path == ALERTS_PATH
    assert hook["send_resolved"] is True
    auth = hook["http_config"]
    assert auth.get("authorization", {}).get("credentials_file") or auth.get("basic_auth")


def test_one_group_per_alert_and_runbook_subject() -> None:
    group_by = set(config()["route"]["group_by"])
    rules = [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]
    subjects = {
        p for rule in rules for p in re.findall(r"--param (\w+)=", rule["annotations"]["action"])
    }
    assert subjects and group_by == {"alertname", *subjects}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def alertmanager(api_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """Debian's Alertmanager with this config, posting to the test's API; its own API's URL."""
    (tmp_path / "token").write_text(ALERTMANAGER["Authorization"].removeprefix("Bearer "))
    ours = config()
    ours["route"].update(group_wait="1s", group_interval="1s")
    (hook,) = ours["receivers"][0]["webhook_configs"]
    hook["url"] = api_url + urlsplit(hook["url"]).path
    hook["http_config"]["authorization"]["credentials_file"] = str(tmp_path / "token")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(ours))
    url = f"http://127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        program("prometheus-alertmanager"),
        f"--config.file={tmp_path / 'alertmanager.yml'}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--cluster.listen-address=",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"{url}/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=20, interval=0.1, message="Alertmanager is ready")
        yield url
    finally:
        process.terminate()
        await process.wait()


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
        Worker(client, task_queue=settings.task_queue, workflows=[IncidentStub]),
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
