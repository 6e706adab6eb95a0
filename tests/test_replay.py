"""Stored histories of released runbooks replay with the current code.

A change that would break a run in flight (a reordered step, a new activity without
``workflow.patched``) makes the replayer raise a non-determinism error here, before it ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workers.worker import workflow_runner
from workflows.catalogue import RUNBOOKS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_released_scenario_is_stored() -> None:
    names = {p.stem for p in HISTORIES}
    assert {f"shard-scaling-{s}" for s in ("approved", "rejected", "dry-run", "no-change",
                                           "rollback")} <= names  # fmt: skip


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    stored = json.loads(path.read_text())
    history = WorkflowHistory.from_json(stored.pop("workflowId"), stored)
    replayer = Replayer(
        workflows=list(RUNBOOKS.values()),
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    await replayer.replay_workflow(history)
