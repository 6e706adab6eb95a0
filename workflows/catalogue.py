"""Every runbook the product knows, by the name people type."""

from __future__ import annotations

from workflows.blue_green_upgrade import BlueGreenUpgrade
from workflows.canary_upgrade import CanaryUpgrade
from workflows.dead_letter_repair import DeadLetterRepair
from workflows.high_error_rate import HighErrorRate
from workflows.llm_cost_spike import LlmCostSpike
from workflows.models import SteerAction
from workflows.postgres_outage import PostgresOutage
from workflows.redis_failure import RedisFailure
from workflows.runbook import Runbook
from workflows.shard_scaling import ShardScaling
from workflows.tls_rotation import TlsRotation
from workflows.vault_setup import VaultSetup
from workflows.worker_lost import WorkerLost

RUNBOOKS: dict[str, type[Runbook]] = {
    workflow.spec.name: workflow
    for workflow in (
        ShardScaling,
        WorkerLost,
        HighErrorRate,
        LlmCostSpike,
        DeadLetterRepair,
        PostgresOutage,
        RedisFailure,
        VaultSetup,
        TlsRotation,
        CanaryUpgrade,
        BlueGreenUpgrade,
    )
}


def steer_actions(runbook: str) -> frozenset[SteerAction]:
    """What people may steer a run of ``runbook`` with (``astra-ops canary ...``)."""
    workflow = RUNBOOKS.get(runbook)
    return workflow.steer_actions if workflow is not None else frozenset()
