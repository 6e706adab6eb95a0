"""The incident's part of the access policy: the seed's rotations, a chain of real people, and
errors that say what to fix; and the names the API, the workflow and the signatures share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from runtime.access import AccessPolicyError, load_policy
from runtime.identity import Act
from runtime.settings import REPO_ROOT
from workflows.incident import Incident
from workflows.incident_models import ActionKind
from workflows.incident_rules import act_name

POLICY = REPO_ROOT / "deploy" / "access-policy.yaml"


def test_the_example_policy_has_the_seeds_rotations_and_a_chain_of_real_people() -> None:
    policy = load_policy(POLICY)
    incidents = policy.incident_policy()
    scopes = {name: rotation.components for name, rotation in incidents.rotations.items()}
    assert scopes == {
        "kernel-sre": ["scheduler", "actors", "tasks", "messaging", "state-manager"],
        "agent-platform": ["workers", "tools", "memory", "llm-routing"],
    }
    assert incidents.rotation_for(["State Manager"]) == "kernel-sre"
    assert incidents.rotation_for(["LLM routing", "scheduler"]) == "agent-platform"
    assert incidents.rotation_for(["postgres"], "agent-platform") == "agent-platform"
    assert incidents.rotation_for(["postgres"], "nobody") == "kernel-sre"
    assert policy.incident_responders("agent-platform") == [
        "alice",
        "bob",
        "carol",
        "erin",
        "frank",
    ]
    # Production timings when the file says nothing else.
    assert (incidents.commander_request_interval_seconds, incidents.sustained_sev1_seconds) == (
        600,
        3600,
    )
    assert {name for name, r in policy.runbooks.items() if r.on_alert == "start"} == {
        "worker-lost",
        "high-error-rate",
        "redis-failure",
    }


def edited(tmp_path: Path, change: Any) -> Path:
    policy = yaml.safe_load(POLICY.read_text())
    change(policy["incidents"])
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["rotations"]["kernel-sre"]["escalation"].update(primary="carol"),
            "incidents.rotations.kernel-sre.escalation.primary: carol is not a member of "
            "kernel-sre",
        ),
        (
            lambda p: p["rotations"]["kernel-sre"]["escalation"].update(manager="zed"),
            "escalation.manager: zed is not in the access policy",
        ),
        (
            lambda p: p["rotations"]["agent-platform"]["components"].append("scheduler"),
            "component 'scheduler' is in both rotations agent-platform and kernel-sre",
        ),
        (lambda p: p.update(default_rotation="sre"), "default_rotation 'sre' is not one of"),
        (lambda p: p.update(product_owner="zed"), "incidents.product_owner: zed not in"),
        (lambda p: p.update(respond=["managers"]), "unknown groups ['managers']"),
        (
            lambda p: p["rotations"]["kernel-sre"].update(ack_timeout_seconds=0),
            "ack_timeout_seconds: Input should be greater than 0",
        ),
        (
            lambda p: p["rotations"]["kernel-sre"]["components"].append("State Manager"),
            "component 'State Manager' must be lower case",
        ),
    ],
)
def test_a_malformed_incident_policy_says_what_to_fix(
    tmp_path: Path, change: Any, message: str
) -> None:
    with pytest.raises(AccessPolicyError, match="malformed") as raised:
        load_policy(edited(tmp_path, change))
    assert message in str(raised.value)


def test_without_an_incidents_section_nobody_may_open_one(tmp_path: Path) -> None:
    policy = yaml.safe_load(POLICY.read_text())
    del policy["incidents"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    with pytest.raises(AccessPolicyError, match="no `incidents` section"):
        load_policy(path).incident_policy()


def test_every_action_is_an_update_of_its_name_and_a_signable_act() -> None:
    from temporalio.workflow import _Definition

    definition = _Definition.must_from_class(Incident)
    updates = definition.updates
    assert set(updates) == {kind.value for kind in ActionKind}
    assert all(update.validator is not None for update in updates.values())
    assert {act_name(kind) for kind in ActionKind} | {"incident.open", "incident.alerts"} <= set(
        get_args(Act)
    )
    assert set(definition.signals) == {"alerts"} and set(definition.queries) == {"state"}
