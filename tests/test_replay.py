"""Stored histories of released workflows replay with the current code, as the worker runs it.

A change that would break a run in flight (a reordered step, a new activity without
``workflow.patched``) makes the replayer raise a non-determinism error here, before it ships.
The histories are recorded by ``tests/histories/record.py`` from the scenarios in
``tests/histories/scenarios.py``; ``released/`` keeps those of earlier releases.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from runtime.client import plain_data_converter
from tests.histories.scenarios import SCENARIOS
from tests.reordered_shard_scaling import RestartBeforeSet
from workers.worker import workflow_options
from workflows.catalogue import RUNBOOKS
from workflows.shard_scaling import ShardScaling

STORED = Path(__file__).parent / "histories"
HISTORIES = sorted(STORED.rglob("*.json"))
CURRENT = {p.stem: p for p in STORED.glob("*.json")}
EVERY_RUNBOOK_BRANCHES = {"approved", "rejected", "dry-run", "no-change"}
"""What every runbook can do with a request; other branches are where a runbook takes them."""


def history(path: Path) -> WorkflowHistory:
    stored = json.loads(path.read_text())
    return WorkflowHistory.from_json(stored.pop("workflowId"), stored)


def workflow_name(cls: type) -> str:
    definition = workflow._Definition.must_from_class(cls)
    assert definition.name is not None
    return definition.name


def test_every_scenario_is_stored_and_nothing_else() -> None:
    assert set(CURRENT) == {name for s in SCENARIOS.values() for name in s.stored}


def test_every_workflow_the_worker_runs_has_scenarios_and_every_runbook_its_branches() -> None:
    branches: dict[str, set[str]] = defaultdict(set)
    for scenario in SCENARIOS.values():
        branches[scenario.workflow].add(scenario.branch)
    assert set(branches) == {workflow_name(w) for w in workflow_options()["workflows"]}
    for runbook in RUNBOOKS:
        assert branches[runbook] >= EVERY_RUNBOOK_BRANCHES, runbook


def steps_taken(path: Path) -> set[str]:
    """The steps a stored run scheduled activities (or a window's timers) for, read from their
    summaries."""
    converter = plain_data_converter().payload_converter
    taken = set()
    for event in history(path).events:
        if event.HasField("activity_task_scheduled_event_attributes") or (
            event.HasField("timer_started_event_attributes") and event.user_metadata.summary.data
        ):
            summary = converter.from_payload(event.user_metadata.summary, str)
            # The gate's activities name the step after what they do ("ask for: <step>").
            taken.add(
                re.sub(r"^(ask for|escalate to [^:]+): ", "", summary.removesuffix(" (dry-run)"))
            )
    return taken


@pytest.mark.parametrize("runbook", list(RUNBOOKS))
def test_every_step_of_every_runbook_is_taken_in_a_stored_history(runbook: str) -> None:
    """A branch nobody recorded shows up here as a step no stored run reached."""
    taken = set().union(*(steps_taken(p) for n, p in CURRENT.items() if n.startswith(runbook)))
    assert set(RUNBOOKS[runbook].spec.steps_for()) - taken == set()


@pytest.mark.parametrize("path", HISTORIES, ids=[str(p.relative_to(STORED)) for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(**workflow_options(), data_converter=plain_data_converter())
    await replayer.replay_workflow(history(path))


async def test_a_reordered_step_fails_replay() -> None:
    options = workflow_options()
    options["workflows"] = [
        RestartBeforeSet if w is ShardScaling else w for w in options["workflows"]
    ]
    replayer = Replayer(**options, data_converter=plain_data_converter())
    with pytest.raises(
        workflow.NondeterminismError, match=r"'patch_config' does not match .* 'rollout_restart'"
    ):
        await replayer.replay_workflow(history(CURRENT["shard-scaling-approved"]))
