"""The alert rules (no promtool here): every task-health runbook has a rule, on the metric names
the sandbox exports, with the runbook's default threshold."""

from __future__ import annotations

import re
from typing import Any

import yaml

from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget, worker_lost
from sandbox.metrics import render_metrics
from workflows.catalogue import RUNBOOKS
from workflows.high_error_rate import HighErrorRateRequest
from workflows.llm_cost_spike import LlmCostSpikeRequest
from workflows.worker_lost import WorkerLostRequest

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"
ALERTED = ("worker-lost", "high-error-rate", "llm-cost-spike", "dead-letter-repair")


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["labels"]["runbook"]: rule for group in groups for rule in group["rules"]}


def test_every_task_health_runbook_has_a_rule_with_its_default_threshold() -> None:
    by_runbook = rules()
    assert set(ALERTED) <= set(by_runbook) and set(ALERTED) <= set(RUNBOOKS)
    assert by_runbook["worker-lost"]["expr"].endswith(
        f"> {WorkerLostRequest.model_fields['heartbeat_threshold_seconds'].default:g}"
    )
    assert (
        by_runbook["high-error-rate"]["expr"]
        .rstrip()
        .endswith(f"> {HighErrorRateRequest.model_fields['threshold'].default:g}")
    )
    assert (
        f"> {LlmCostSpikeRequest.model_fields['multiplier'].default:g} *"
        in (by_runbook["llm-cost-spike"]["expr"])
    )
    for name in ALERTED:
        assert by_runbook[name]["labels"]["rotation"] == RUNBOOKS[name].spec.rotation


async def test_rules_use_only_metrics_the_sandbox_exports(data_plane: SandboxTarget) -> None:
    await worker_lost(data_plane)
    exported = set(
        re.findall(
            r"^# TYPE (\w+) ",
            await render_metrics(data_plane.dsn, data_plane.redis_url, data_plane.key_prefix),
            re.M,
        )
    )
    used = {m for rule in rules().values() for m in re.findall(r"\bastra_\w+", rule["expr"])}
    assert used and used <= exported
