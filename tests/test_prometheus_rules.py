"""The alert rules as Prometheus reads them: `promtool check rules` accepts them, and promtool's
rule unit tests (deploy/prometheus/tests/) hold each alert quiet just below its threshold and
firing just above it, with the labels and annotations Alertmanager and the incident use."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from runtime.settings import REPO_ROOT

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"


def promtool(*args: str) -> str:
    """Run Debian's promtool (package `prometheus`); the output when it succeeds."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail(
            "promtool is not installed, so the alert rules cannot be checked: `apt-get install "
            "prometheus` (.ci/run installs it where promtool is missing)"
        )
    done = subprocess.run(
        [tool, *args], capture_output=True, text=True, check=False, timeout=60, cwd=REPO_ROOT
    )
    assert done.returncode == 0, f"`promtool {' '.join(args)}` failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def test_promtool_accepts_the_rules() -> None:
    said = promtool("check", "rules", str(PROMETHEUS / "rules.yaml"))
    assert "SUCCESS" in said


def test_every_rule_has_a_unit_test_and_they_pass() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yaml"))
    rules = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "rules.yaml").read_text())["groups"]
        for rule in group["rules"]
    }
    tested = {
        case["alertname"]
        for path in tests
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert rules and rules == tested, f"rules without a unit test: {sorted(rules - tested)}"
    assert "SUCCESS" in promtool("test", "rules", *map(str, tests))
