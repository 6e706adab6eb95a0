"""Every runbook the product knows, by the name people type."""

from __future__ import annotations

from workflows.runbook import Runbook
from workflows.shard_scaling import ShardScaling

RUNBOOKS: dict[str, type[Runbook]] = {workflow.spec.name: workflow for workflow in (ShardScaling,)}
