"""The worker SIGKILLed at a random point of a runbook's run, in the real sandbox Astra: a new
worker finishes the run, and every side effect happened once, counted on the targets (requeue
rows and task states in PostgreSQL, dead letters acknowledged in Redis, ReplicaSet revisions and
ConfigMap keys on the sandbox cluster, messages the chat receiver took, secret versions and live
tokens in OpenBao).

Each trial picks, from its own seed, which activity of the run dies (by its id: the order the
run schedules them) and how far into it; the worker (sandbox/dying_worker.py) kills itself there
or, if the activity ends first, right after it, before its result reaches Temporal. `make test`
runs one trial; `make proof` runs ``ASTRA_OPS_PROOF_KILLS`` trials of each runbook (default 5).
bench/proof.py does the same for Shard Scaling, with more kinds of fault.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _pytest.mark.structures import ParameterSet
from temporalio.client import Client, WorkflowHandle

from activities.metrics import SqlMetrics
from activities.postgres import LlmCostRequest
from activities.vault import ISSUED_BY
from runtime.astra_config import BUDGET_GUARD_KEY, INTAKE_PAUSED_KEY
from runtime.settings import Settings
from sandbox.dying_worker import ANY_RUN, DYING, KILL_AT, Trap
from sandbox.servers.openbao import OpenBaoServer
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox
from tests.conftest_sandbox import RunningAstra, config_value, worker_pods
from tests.helpers import decide, start
from tests.test_runbook_dead_letter_repair import publish, unacknowledged
from tests.test_runbook_dead_letter_repair import request as repair_request
from tests.test_runbook_high_error_rate import request as error_rate_request
from tests.test_runbook_high_error_rate import (
    roll_out_a_bad_build,
    worker_deployment,
    worker_images,
)
from tests.test_runbook_llm_cost_spike import BASELINE, WINDOW, spike
from tests.test_runbook_llm_cost_spike import request as cost_request
from tests.test_runbook_vault_setup import (
    live_token_meta,
    plant,
    platform_secret,
    root_client,
    stored,
)
from tests.test_runbook_vault_setup import settings_for as vault_settings
from tests.test_runbook_worker_lost import lose_a_worker
from tests.test_runbook_worker_lost import request as lost_request
from tests.test_worker_recovery import RUN_SECONDS, worker_process
from workflows.dead_letter_repair import DeadLetterRepair
from workflows.high_error_rate import HighErrorRate
from workflows.llm_cost_spike import LlmCostSpike
from workflows.models import Outcome, RunbookResult
from workflows.vault_setup import VaultSetup, VaultSetupRequest
from workflows.worker_lost import WorkerLost

KILLS = int(os.environ.get("ASTRA_OPS_PROOF_KILLS", "5"))


def trials(first_in_make_test: bool = False) -> list[ParameterSet]:
    """Trial numbers: the first in `make test` if asked, every other one in `make proof`."""
    return [
        pytest.param(n, marks=() if n == 0 and first_in_make_test else pytest.mark.slow)
        for n in range(KILLS)
    ]


@dataclass(frozen=True)
class Kill:
    """Where a trial's worker dies: in the ``nth`` activity (local ones aside) the run starts
    on it, ``after`` seconds into its first attempt."""

    nth: int
    after: float

    @classmethod
    def drawn(cls, runbook: str, trial: int, activities: int) -> Kill:
        rng = random.Random(f"{runbook}/{trial}")
        return cls(nth=rng.randint(1, activities), after=rng.uniform(0.0, 0.3))


DYING_WORKER = (sys.executable, "-m", "sandbox.dying_worker")


def died_where(log: Path) -> str:
    """Where the dying worker said it killed itself."""
    dying = [line for line in log.read_text().splitlines() if DYING in line]
    assert dying, f"the worker did not kill itself; its log: {log}"
    return dying[-1].split(DYING, 1)[1].strip()


async def run_through_a_kill(
    settings: Settings,
    tmp_path: Path,
    kill: Kill,
    start_run: Callable[[], Awaitable[WorkflowHandle[Any, RunbookResult]]],
    approvals: list[tuple[str, str]],
) -> RunbookResult:
    """Start the run on a worker that dies where ``kill`` says, start the next worker as soon
    as it is gone, give the run its approvals as it asks for them, and return how it ended."""
    trap = Trap(ANY_RUN, f"#{kill.nth}", kill.after)
    dying_log = tmp_path / "dying.log"
    async with worker_process(settings, dying_log, DYING_WORKER, {KILL_AT: trap.encode()}) as first:
        handle = await start_run()

        async def approve() -> None:
            for step, approver in approvals:
                await decide(handle, step, approver)

        approving = asyncio.create_task(approve())
        ending = asyncio.create_task(handle.result())
        died = asyncio.create_task(first.wait())
        await asyncio.wait({died, ending}, timeout=RUN_SECONDS, return_when=FIRST_COMPLETED)
        assert died.done(), f"the run ended before its worker reached activity {kill.nth}"
        assert died.result() == -9, dying_log
        where = died_where(dying_log)
        async with worker_process(settings, tmp_path / "next.log"):
            await asyncio.wait_for(approving, RUN_SECONDS)
            result = await asyncio.wait_for(ending, RUN_SECONDS)
    assert result.outcome == Outcome.DONE, f"killed in {where}: {result.summary}"
    return result


@pytest.mark.parametrize("trial", trials(first_in_make_test=True))
async def test_worker_lost_killed_anywhere_requeues_each_task_and_replaces_the_pod_once(
    trial: int,
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
    tmp_path: Path,
) -> None:
    fault = await lose_a_worker(astra)
    request = lost_request(fault, stuck_pool_share=0.2)
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("worker-lost", trial, activities=10),
        lambda: start(client, WorkerLost, request, task_queue),
        [("approve replacing workers of a stuck pool", "carol")],
    )

    requeued = [r[0] for r in await astra.query("SELECT task_id FROM astra_ops_requeues")]
    assert sorted(requeued) == fault.leased_task_ids  # each once
    after = worker_pods(kube)
    assert fault.worker_id not in after and len(after) == 3


@pytest.mark.parametrize("trial", trials())
async def test_dead_letter_repair_killed_anywhere_requeues_each_retryable_once(
    trial: int,
    client: Client,
    task_queue: str,
    astra: RunningAstra,
    astra_settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    fault = await publish(astra)
    retryable = sorted(e.task_id for e in fault.entries if e.retryable)
    group = f"repair-{uuid.uuid4().hex[:8]}"
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("dead-letter-repair", trial, activities=8),
        lambda: start(client, DeadLetterRepair, repair_request(group), task_queue),
        [("approve handling the dead letters", "bob")],
    )

    requeued = [r[0] for r in await astra.query("SELECT task_id FROM astra_ops_requeues")]
    assert sorted(requeued) == retryable  # each once
    assert await unacknowledged(astra, redis_client, group) == 0


@pytest.mark.parametrize("trial", trials())
async def test_high_error_rate_killed_anywhere_rolls_back_once_and_resumes_intake(
    trial: int,
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
    tmp_path: Path,
) -> None:
    fault = await roll_out_a_bad_build(kube, astra)
    request = error_rate_request(recent_rollout_seconds=120)
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("high-error-rate", trial, activities=9),
        lambda: start(client, HighErrorRate, request, task_queue),
        [
            ("approve pausing intake", "alice"),
            ("approve rolling back the last rollout", "carol"),
        ],
    )

    assert worker_images(kube) == {fault.previous_image}
    annotations = worker_deployment(kube)["metadata"]["annotations"]
    assert annotations["deployment.kubernetes.io/revision"] == "3"  # one rollback: 1, reused
    assert config_value(kube, INTAKE_PAUSED_KEY) == ""


@pytest.mark.parametrize("trial", trials())
async def test_llm_cost_spike_killed_anywhere_guards_tells_and_lifts_once(
    trial: int,
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
    chat: ChatReceiver,
    tmp_path: Path,
) -> None:
    await spike(astra)
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("llm-cost-spike", trial, activities=10),
        lambda: start(client, LlmCostSpike, cost_request(), task_queue),
        [
            ("approve the budget guard", "carol"),
            ("approve lifting the budget guard", "carol"),
        ],
    )

    assert config_value(kube, BUDGET_GUARD_KEY) == ""
    cost = await SqlMetrics(astra.target.dsn).llm_cost(
        LlmCostRequest(window_seconds=WINDOW, baseline_seconds=BASELINE)
    )
    assert cost.ratio is not None and cost.ratio <= 2
    told = [m["text"] for m in chat.messages if "Budget guard on coder-1" in m["text"]]
    assert len(told) == 1, told


@pytest.mark.parametrize("trial", trials())
async def test_vault_setup_killed_anywhere_writes_the_secrets_once_and_leaves_one_live_token(
    trial: int,
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    namespace: str,
    openbao: OpenBaoServer,
    tmp_path: Path,
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    plant(tmp_path, canary)
    path = f"astra-{uuid.uuid4().hex[:8]}"
    request = VaultSetupRequest(
        requester="alice", namespace=namespace, path=path, policy=path, source="directory:astra"
    )
    await run_through_a_kill(
        vault_settings(settings, openbao, tmp_path),
        tmp_path,
        Kill.drawn("vault-setup", trial, activities=12),
        lambda: start(client, VaultSetup, request, task_queue),
        [("approve the Vault setup", "bob")],
    )

    root = root_client(openbao)
    written = stored(root, path)
    assert written["data"] == {"OPENAI_API_KEY": canary, "DB_PASSWORD": f"pw-{canary}"}
    assert written["metadata"]["version"] == 1  # written once
    held = root.auth.token.lookup(platform_secret(kube, namespace)["ASTRA_VAULT_TOKEN"])["data"]
    ours = [
        accessor
        for accessor, meta in live_token_meta(root).items()
        if meta.get("issued_by") == ISSUED_BY
        and meta.get("step", "").startswith(f"vault-setup/{namespace}/")
    ]
    assert ours == [held["accessor"]]  # one live credential: the platform's
