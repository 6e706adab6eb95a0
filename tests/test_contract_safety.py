"""The contract check flags what a new message version narrows, and nothing a widening adds.

The pairs are real pydantic models (tests/contract_versions.py): the project's own workflow
inputs with a field removed or retired, and an Astra task message narrowed, then widened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.contract_safety import ContractInputError, check_contracts, load_contract
from runtime.settings import REPO_ROOT
from tests.contract_versions import TaskV1, TaskV2

VERSIONS = "tests.contract_versions"


def findings(old: str, new: str) -> list[tuple[str, str]]:
    report = check_contracts(load_contract(old), load_contract(new))
    return [(f.path, f.kind) for f in report.findings]


def test_every_narrowing_is_flagged_recursively() -> None:
    assert sorted(findings(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV2")) == sorted(
        [
            ("$.status", "enum-values-removed"),  # dead_letter gone
            ("$.retries", "tighter-bound"),  # minimum 0 -> 1
            ("$.cost_usd", "number-to-integer"),
            ("$.shard", "type-removed"),  # int | str -> int
            ("$.error", "tighter-bound"),  # maxLength 2000 -> 200
            ("$.lease", "no-longer-nullable"),
            ("$.lease", "new-required-field"),
            ("$.lease.until", "no-longer-nullable"),  # through $defs/$ref
            ("$.lease.until", "new-required-field"),
            ("$.tags", "tighter-bound"),  # maxItems
            ("$.goal", "removed-field"),
            ("$.tenant", "new-required-field"),
        ]
    )


def test_widening_is_compatible() -> None:
    assert findings(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV3") == []
    assert findings(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV1") == []


def test_a_workflow_input_that_loses_a_field_is_flagged_unless_the_field_is_retired() -> None:
    current = "workflows.models:RunbookRequest"
    assert findings(current, f"{VERSIONS}:RunbookRequestWithoutReason") == [
        ("$.reason", "removed-field")
    ]
    assert findings(current, f"{VERSIONS}:RunbookRequestReasonRetired") == []
    # How TaskHealthRequest dropped poll_seconds, and the shard-scaling input's extra fields.
    before = f"{VERSIONS}:TaskHealthRequestBeforeRetiring"
    assert findings(before, "workflows.task_health:TaskHealthRequest") == []
    assert ("$.shards", "new-required-field") in findings(
        current, "workflows.shard_scaling:ShardScalingRequest"
    )


def test_json_schema_files_compare_like_their_models(tmp_path: Path) -> None:
    old, new = tmp_path / "v1.json", tmp_path / "v2.json"
    old.write_text(json.dumps(TaskV1.model_json_schema()))
    new.write_text(json.dumps(TaskV2.model_json_schema()))
    assert findings(str(old), str(new)) == findings(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV2")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nowhere.json", "cannot read it"),
        ("tests.contract_versions:Missing", "cannot import it"),
        ("no_such_module:Model", "cannot import it"),
        ("runtime.settings:REPO_ROOT", "is not a pydantic model class"),
    ],
)
def test_a_schema_that_cannot_be_loaded_is_named(spec: str, says: str) -> None:
    with pytest.raises(ContractInputError, match=says):
        load_contract(spec)


def test_cli_exit_codes_text_and_json(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "starters.cli", "check-contracts", *args],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )

    removed = cli("workflows.models:RunbookRequest", f"{VERSIONS}:RunbookRequestWithoutReason")
    assert removed.returncode == 1
    assert "$.reason: removed-field: field removed" in removed.stdout
    assert "list it in the model's `retired`" in removed.stdout
    report = json.loads(cli(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV2", "--json").stdout)
    assert len(report["findings"]) == 12
    compatible = cli(f"{VERSIONS}:TaskV1", f"{VERSIONS}:TaskV3")
    assert compatible.returncode == 0 and compatible.stdout.startswith("compatible")
    broken = tmp_path / "broken.json"
    broken.write_text("{\n  not json")
    unreadable = cli(str(broken), f"{VERSIONS}:TaskV1")
    assert unreadable.returncode == 2
    assert f"{broken}:2: not JSON" in unreadable.stderr
