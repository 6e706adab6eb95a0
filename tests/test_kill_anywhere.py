"""The worker SIGKILLed at a random point of a run of each runbook, in the real sandbox Astra: a
new worker finishes the run, and every side effect happened once, counted on the targets
(requeue rows and task states in PostgreSQL, dead letters acknowledged in Redis, ReplicaSet
revisions, ConfigMap keys and the Service's selector on the sandbox cluster, messages the chat
receiver took, secret versions and live tokens in OpenBao, the certificate each TLS endpoint
serves and the one its Secret keeps as previous, the acknowledged commits on the promoted
PostgreSQL and the old primary streaming from it, each pending task queued once on the promoted
Redis).

Each trial picks, from its own seed, which activity of the run dies (by its id: the order the
run schedules them) and how far into it; the worker (sandbox/dying_worker.py) kills itself there
or, if the activity ends first, right after it, before its result reaches Temporal. A run's
``activities`` are those its history schedules without a kill (the assertion when a run ends
before its kill says how many it scheduled). `make test` runs one trial; `make proof` runs
``ASTRA_OPS_PROOF_KILLS`` trials of each runbook (the Makefile's ``PROOF_KILLS``, 10; 5 when
the variable is unset). bench/proof.py does the same for Shard Scaling, with more kinds of fault.
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
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from activities.endpoints import PLATFORM_CLIENTS
from activities.metrics import SqlMetrics
from activities.postgres import LlmCostRequest
from activities.vault import ISSUED_BY
from runtime.astra_config import (
    BUDGET_GUARD_KEY,
    DATABASE_URL_KEY,
    INTAKE_PAUSED_KEY,
    REDIS_URL_KEY,
)
from runtime.data_plane import DataPlaneTopology
from runtime.settings import Settings
from sandbox.dying_worker import ANY_RUN, DYING, KILL_AT, Trap
from sandbox.faults import cert_expiring
from sandbox.kube.objects import Obj, Resource
from sandbox.kube.seed import ASTRA_NAMESPACE, TLS_SERVICES
from sandbox.servers import faults as server_faults
from sandbox.servers.openbao import OpenBaoServer
from tests.conftest import ChatReceiver
from tests.conftest_kube import KubeSandbox, eventually, sandbox_ca
from tests.conftest_sandbox import RunningAstra, config_value, worker_pods
from tests.helpers import decide, start
from tests.test_runbook_blue_green_upgrade import BLUE, GREEN, images, replicas
from tests.test_runbook_blue_green_upgrade import request as blue_green_request
from tests.test_runbook_canary_upgrade import NEW, canary
from tests.test_runbook_canary_upgrade import request as canary_request
from tests.test_runbook_canary_upgrade import worker_images as canary_worker_images
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
from tests.test_runbook_postgres_outage import (
    assert_failed_over_to_the_replica as postgres_failed_over,
)
from tests.test_runbook_postgres_outage import platform_on, replicated, writing
from tests.test_runbook_postgres_outage import request as postgres_request
from tests.test_runbook_redis_failure import (
    assert_failed_over_to_the_replica as redis_failed_over,
)
from tests.test_runbook_redis_failure import lose_the_primary, stage_of
from tests.test_runbook_redis_failure import request as redis_request
from tests.test_runbook_tls_rotation import RENEW, assert_renewed, rolled_onto
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
from tests.test_worker_recovery import RUN_SECONDS, restarts, worker_process
from workflows.blue_green_upgrade import SWITCH, BlueGreenUpgrade
from workflows.canary_upgrade import PROMOTION, CanaryUpgrade
from workflows.dead_letter_repair import DeadLetterRepair
from workflows.high_error_rate import HighErrorRate
from workflows.llm_cost_spike import LlmCostSpike
from workflows.models import Outcome, RunbookResult
from workflows.postgres_outage import PostgresOutage
from workflows.redis_failure import APPROVE_FAILOVER, RedisFailure
from workflows.tls_rotation import TlsRotation, TlsRotationRequest
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


async def activities_scheduled(handle: WorkflowHandle[Any, RunbookResult]) -> int:
    """How many activities (local ones aside) the run scheduled."""
    history = await handle.fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED for e in history.events)


def values_of(
    kube: KubeSandbox, plural: str, namespace: str, name: str, read: Callable[[Obj], object]
) -> list[object]:
    """What ``read`` finds on one object of the sandbox cluster now, then after each change that
    alters it: the list grows as the cluster commits, so a step that set it back and forth, or
    anyone else's write, shows."""
    now = kube.cluster.get(plural, namespace, name)
    assert now is not None, f"no {plural}/{name} in {namespace}"
    seen = [read(now)]

    def changed(event: str, resource: Resource, obj: Obj) -> None:
        meta = obj["metadata"]
        if (resource.plural, meta.get("namespace"), meta["name"]) == (plural, namespace, name):
            value = read(obj)
            if event == "MODIFIED" and value != seen[-1]:
                seen.append(value)

    kube.cluster.watch(changed)
    return seen


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
            # A step may ask only once the run has come back from the kill.
            for step, approver in approvals:
                await decide(handle, step, approver, within=RUN_SECONDS)

        approving = asyncio.create_task(approve())
        ending = asyncio.create_task(handle.result())
        died = asyncio.create_task(first.wait())
        await asyncio.wait({died, ending}, timeout=RUN_SECONDS, return_when=FIRST_COMPLETED)
        if not died.done():
            raise AssertionError(
                f"the run ended before its worker reached activity {kill.nth}: it scheduled "
                f"{await activities_scheduled(handle)} (what Kill.drawn's `activities` says)"
            )
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
    async def spike_and_start() -> WorkflowHandle[Any, RunbookResult]:
        # Once the dying worker is up: the spike is in the last few seconds only.
        await spike(astra)
        return await start(client, LlmCostSpike, cost_request(), task_queue)

    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("llm-cost-spike", trial, activities=10),
        spike_and_start,
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


@pytest.mark.parametrize("trial", trials())
async def test_tls_rotation_killed_anywhere_writes_each_secret_and_restarts_each_service_once(
    trial: int,
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    tmp_path: Path,
) -> None:
    services = list(TLS_SERVICES)
    old = (await cert_expiring(kube.api, sandbox_ca(), ASTRA_NAMESPACE, services, 2)).fingerprints
    for service, fingerprint in old.items():
        await rolled_onto(kube.tls, ASTRA_NAMESPACE, service, fingerprint)
    before = restarts(kube, ASTRA_NAMESPACE, services)
    request = TlsRotationRequest(requester="alice", namespace=ASTRA_NAMESPACE)
    await run_through_a_kill(
        settings,
        tmp_path,
        Kill.drawn("tls-rotation", trial, activities=14),
        lambda: start(client, TlsRotation, request, task_queue),
        [(RENEW, "bob")],
    )

    assert_renewed(kube, kube.tls, ASTRA_NAMESPACE, old)  # each Secret written once
    assert restarts(kube, ASTRA_NAMESPACE, services) == {s: n + 1 for s, n in before.items()}


@pytest.mark.parametrize("trial", trials())
async def test_canary_upgrade_killed_anywhere_promotes_the_new_image_once(
    trial: int,
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
    tmp_path: Path,
) -> None:
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        # No analysis: its measurements, as many as fit in the window, would make the count
        # vary, and one the kill delays can leave the window with none passed, which rightly
        # asks a person. Blue-Green's trials kill inside a window's measurement.
        Kill.drawn("canary-upgrade", trial, activities=10),
        lambda: start(client, CanaryUpgrade, canary_request(pause=3, analysis=False), task_queue),
        [(PROMOTION, "carol")],
    )

    assert sorted(canary_worker_images(kube).values()) == [NEW] * 3 and canary(kube) is None
    assert restarts(kube, ASTRA_NAMESPACE, ["astra-worker"]) == {"astra-worker": 1}  # one rollout


@pytest.mark.parametrize("trial", trials())
async def test_blue_green_upgrade_killed_anywhere_switches_to_green_once(
    trial: int,
    client: Client,
    task_queue: str,
    kube: KubeSandbox,
    astra: RunningAstra,
    astra_settings: Settings,
    tmp_path: Path,
) -> None:
    selectors = values_of(kube, "services", ASTRA_NAMESPACE, BLUE, lambda s: s["spec"]["selector"])
    await run_through_a_kill(
        astra_settings,
        tmp_path,
        Kill.drawn("blue-green-upgrade", trial, activities=12),
        lambda: start(client, BlueGreenUpgrade, blue_green_request(keep_blue=2), task_queue),
        [(SWITCH, "carol")],
    )

    assert selectors == [{"app": BLUE}, {"app": GREEN}]  # switched once, never back
    assert images(kube, GREEN) == [NEW] * 3 and replicas(kube, BLUE) == 0
    assert restarts(kube, ASTRA_NAMESPACE, [GREEN]) == {GREEN: 0}  # made once, never rolled


@pytest.mark.parametrize("trial", trials())
async def test_postgres_outage_killed_anywhere_fails_over_once_losing_nothing(
    trial: int,
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    async with replicated("sync") as plane:
        ours, platform = platform_on(settings, pg_dsn, plane, tmp_path, kube, namespace)
        async with writing(platform["primary"]) as writer:
            await server_faults.pg_primary_down(plane)
        urls = values_of(
            kube, "configmaps", namespace, "astra-config", lambda c: c["data"][DATABASE_URL_KEY]
        )
        await run_through_a_kill(
            ours,
            tmp_path,
            # 17 besides the grace window's surveys, as many as fit in its second (4 to 6 here,
            # fewer on a loaded machine): 19 counts 2 of them.
            Kill.drawn("postgres-outage", trial, activities=19),
            lambda: start(client, PostgresOutage, postgres_request(namespace), task_queue),
            [],  # a synchronous standby: unattended
        )

        await postgres_failed_over(plane, platform, writer, kube, namespace)
    assert urls == [platform["primary"], platform["replica"]]  # repointed once
    assert restarts(kube, namespace, PLATFORM_CLIENTS) == dict.fromkeys(PLATFORM_CLIENTS, 1)


REWOUND, RELEASED = "rewound", "released"


def hold_after_pg_rewind(topology: Path) -> Path:
    """Make the old primary's first pg_rewind, once done, wait until the test releases it: the
    folder returned, where ``REWOUND`` appears when it waits and ``RELEASED`` lets it go."""
    servers = DataPlaneTopology.load(topology)
    control = servers.postgres[0].control
    assert control is not None
    held = control.data_dir.with_name("bin-held")  # where the server's user may go
    hold = held / "hold"
    hold.mkdir(parents=True)
    held.chmod(0o755)
    hold.chmod(0o777)  # pg_rewind runs as the server's user
    for program in control.bin_dir.iterdir():
        (held / program.name).symlink_to(program)
    wrapper = held / "pg_rewind"
    wrapper.unlink()
    wrapper.write_text(
        f'#!/bin/sh\n"{control.bin_dir / "pg_rewind"}" "$@"\nstatus=$?\n'
        f'if mkdir "{hold / REWOUND}" 2>/dev/null; then\n'
        f'  while [ ! -e "{hold / RELEASED}" ]; do sleep 0.05; done\nfi\nexit $status\n'
    )
    wrapper.chmod(0o755)
    control.bin_dir = held
    servers.write(topology)
    return hold


@pytest.mark.slow
async def test_postgres_outage_killed_right_after_pg_rewind_restarts_the_old_primary_as_itself(
    client: Client,
    task_queue: str,
    settings: Settings,
    pg_dsn: str,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    """The kill a trial found: after pg_rewind wrote the new primary's configuration into the
    old one's data directory, before the rewind put the old one's own back. The next worker's
    rewind must start the old primary on its own port, as a replica, not on the new one's."""
    async with replicated("sync") as plane:
        ours, platform = platform_on(settings, pg_dsn, plane, tmp_path, kube, namespace)
        hold = hold_after_pg_rewind(tmp_path / "topology.json")
        async with writing(platform["primary"]) as writer:
            await server_faults.pg_primary_down(plane)
        async with worker_process(ours, tmp_path / "killed.log") as first:
            handle = await start(client, PostgresOutage, postgres_request(namespace), task_queue)
            await eventually((hold / REWOUND).exists, timeout=RUN_SECONDS, message="pg_rewind")
            first.kill()
        (hold / RELEASED).touch()
        async with worker_process(ours, tmp_path / "next.log"):
            result = await asyncio.wait_for(handle.result(), RUN_SECONDS)

        assert result.outcome == Outcome.DONE, result.summary
        await postgres_failed_over(plane, platform, writer, kube, namespace)


@pytest.mark.parametrize("trial", trials())
async def test_redis_failure_killed_anywhere_queues_each_pending_task_once(
    trial: int,
    client: Client,
    task_queue: str,
    settings: Settings,
    kube: KubeSandbox,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    async with stage_of(settings, kube, pg_dsn, tmp_path) as stage:
        await lose_the_primary(stage)
        urls = values_of(
            kube, "configmaps", ASTRA_NAMESPACE, "astra-config", lambda c: c["data"][REDIS_URL_KEY]
        )
        await run_through_a_kill(
            stage.settings,
            tmp_path,
            Kill.drawn("redis-failure", trial, activities=17),
            lambda: start(client, RedisFailure, redis_request(), task_queue),
            [(APPROVE_FAILOVER, "bob")],
        )

        await redis_failed_over(stage, kube)
        assert urls == [stage.server("primary").url, stage.server("replica").url]
    assert restarts(kube, ASTRA_NAMESPACE, PLATFORM_CLIENTS) == dict.fromkeys(PLATFORM_CLIENTS, 1)
