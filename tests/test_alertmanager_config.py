"""deploy/alertmanager/alertmanager.yml: Alertmanager accepts it (`amtool check-config`), and it
sends every alert of the rules to the API's webhook, authenticated, resolved notifications
included, one group per alert and runbook subject."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from runtime.settings import REPO_ROOT
from starters.api import ALERTS_PATH

CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return loaded


def test_amtool_accepts_the_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail(
            "amtool is not installed, so the Alertmanager config cannot be checked: `apt-get "
            "install prometheus-alertmanager` (.ci/run installs it where amtool is missing)"
        )
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
