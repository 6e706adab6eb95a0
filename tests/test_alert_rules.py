"""The alert rules (no promtool here), against the catalogue: each starts a runbook the catalogue
has, labelled with its severity and rotation, with the parameters its start needs, at the
runbook's default threshold, on the metric names the sandbox exports.

Which runbooks an alert starts is the rules file's to say: a runbook without a rule is started by
a person, and its generated page (docs/runbooks/) says so, so adding or dropping a rule shows in
the pages `make check` compares."""

from __future__ import annotations

import re
from typing import Any

import yaml

from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget, cert_expiring, worker_lost
from sandbox.kube.seed import TLS_SERVICES
from sandbox.metrics import render_metrics
from sandbox.platform import ClusterView
from starters.runbook_cards import runbook_parameters
from tests.conftest_kube import KubeSandbox, sandbox_ca
from workflows.catalogue import RUNBOOKS

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"
THRESHOLDS = {
    "worker-lost": "heartbeat_threshold_seconds",
    "high-error-rate": "threshold",
    "llm-cost-spike": "multiplier",
}
"""The request parameter whose default each rule's comparison repeats."""


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["labels"]["runbook"]: rule for group in groups for rule in group["rules"]}


def test_every_rule_starts_a_catalogue_runbook_with_its_labels_and_required_parameters() -> None:
    by_runbook = rules()
    assert by_runbook and set(by_runbook) <= set(RUNBOOKS)
    for name, rule in by_runbook.items():
        spec = RUNBOOKS[name].spec
        labels = rule["labels"]
        assert (labels["severity"], labels["rotation"]) == (spec.severity, spec.rotation), name
        action = rule["annotations"]["action"]
        assert re.match(rf"astra-ops start {name}( |$)", action), action
        required = {p.name for p in runbook_parameters(spec, None) if p.required}
        assert set(re.findall(r"--param (\w+)=", action)) == required, action


def test_each_rule_fires_at_its_runbooks_default_threshold() -> None:
    by_runbook = rules()
    for name, parameter in THRESHOLDS.items():
        default = RUNBOOKS[name].spec.request.model_fields[parameter].default
        assert re.search(rf"> {default:g}(\s|$)", by_runbook[name]["expr"]), (name, default)


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


async def test_the_certificate_gauge_reads_each_services_tls_secret(
    data_plane: SandboxTarget, kube: KubeSandbox, namespace: str
) -> None:
    """Two days left in the gateway's Secret: the gauge says so, and the rule's threshold (14
    days) is crossed for it alone; a freshly seeded service's certificate is far from it."""
    await cert_expiring(kube.api, sandbox_ca(), namespace, ["gateway"], days_left=2)
    certificates = await ClusterView(kube.api, namespace=namespace).certificate_expiry()
    text = await render_metrics(
        data_plane.dsn, data_plane.redis_url, data_plane.key_prefix, certificates=certificates
    )
    left = {
        service: float(value)
        for service, value in re.findall(
            r'^astra_tls_certificate_expiry_seconds\{service="([^"]+)"\} (\S+)$', text, re.M
        )
    }
    assert set(left) == set(TLS_SERVICES)
    assert abs(left["gateway"] - 2 * 86400) < 120
    days = re.search(r"< (\d+) \* 86400", rules()["tls-rotation"]["expr"])
    assert days is not None
    threshold = int(days[1]) * 86400
    assert [s for s, seconds in left.items() if seconds < threshold] == ["gateway"]
