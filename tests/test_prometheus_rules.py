"""The alert rules as Prometheus reads them: `promtool check rules` accepts them, and promtool's
rule unit tests (deploy/prometheus/tests/) hold each alert quiet just below its threshold and
firing just above it, with the labels and annotations Alertmanager and the incident use."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime import metrics
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


def rule_files() -> list[Path]:
    """Astra's alerts (rules.yaml) and astra-ops's own (astra-ops-rules.yaml)."""
    return sorted(PROMETHEUS.glob("*.yaml"))


def test_promtool_accepts_the_rules() -> None:
    files = rule_files()
    assert {f.name for f in files} == {"rules.yaml", "astra-ops-rules.yaml"}
    said = promtool("check", "rules", *map(str, files))
    assert said.count("SUCCESS") == len(files)


def test_every_rule_has_a_unit_test_and_they_pass() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yaml"))
    rules = {
        rule["alert"]
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
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


def test_astra_ops_rules_watch_metrics_astra_ops_defines() -> None:
    """Each astra_ops_* name the rules use is one runtime/metrics.py defines (the exporter adds
    ``_total`` to counters); tests/test_observability.py scrapes them from the processes."""
    defined = {
        value for name, value in vars(metrics).items() if name.isupper() and isinstance(value, str)
    }
    groups = yaml.safe_load((PROMETHEUS / "astra-ops-rules.yaml").read_text())["groups"]
    exprs = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    used = {name.removesuffix("_total") for name in re.findall(r"\bastra_ops_\w+", exprs)}
    assert used and used <= defined, used - defined
