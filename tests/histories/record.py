"""Record the histories tests/test_replay.py replays: every scenario in scenarios.py.

    .venv/bin/python -m tests.histories.record [--only NAME ...]

``--only`` takes scenario names or their beginnings (``worker-lost`` records all of its).

Run it when a released workflow changes on purpose (behind ``workflow.patched``). First move the
stored files it would replace into ``released/<the commit they were recorded at>/``: runs in
flight from the release before still follow the old code path, and those files keep guarding it.

Each scenario gets a stage of its own: a sandbox cluster, a migrated database, a Redis prefix,
Astra played on them by the load generator, the incident's receivers (chat, status page, pager)
recording what they are sent, and the production worker composition
(``workers.worker.running_worker``) on a task queue of its own; all on one Temporal dev server.
It needs the sandbox's PostgreSQL and Redis, as the tests do. Histories are recorded with the
codec-less converter (``runtime.client.plain_data_converter``), so replaying them needs no key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from kubernetes.client import CoreV1Api
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from runtime import search_attributes as sa
from runtime.access import load_policy
from runtime.astra_config import DATABASE_URL_KEY
from runtime.client import plain_data_converter
from runtime.settings import REPO_ROOT, Settings
from sandbox.db import create_database
from sandbox.faults import SandboxTarget
from sandbox.kube.seed import ASTRA_NAMESPACE, CONFIG_MAP
from sandbox.servers import DataPlane, Replication, running_data_plane, scratch_dir
from sandbox.servers.openbao import running_openbao
from sandbox.servers.redis import start_redis
from starters.runs import Runs
from tests.conftest_data import migrated, own_data_plane
from tests.conftest_incident import Desk, incident_settings
from tests.conftest_kube import KubeSandbox, kube_sandbox, sandbox_ca, write_ca
from tests.conftest_sandbox import running_astra
from tests.helpers import TEST_SIGNER
from tests.histories.scenarios import SCENARIOS, RedisPlane, Scenario, Stage, WrongBranch
from tests.receivers import Receiver, pagerduty_answer, slack_answer, statuspage_answer
from workers.worker import running_worker

HERE = Path(__file__).parent
ASTRA_DATABASE = "postgresql://postgres@127.0.0.1:5432/astra_sandbox"
"""The shape of Astra's DATABASE_URL on a replicated plane: its servers' addresses replace it."""
SENTINEL_DOWN_AFTER_MS = 60_000
"""Long enough that a scenario's Sentinel never fails over on its own: the runbook asks it."""


@asynccontextmanager
async def replicated(
    replication: Replication | None, kube: KubeSandbox
) -> AsyncIterator[tuple[DataPlane | None, Path | None]]:
    """For a data-plane runbook's scenario: a PostgreSQL primary and replica of its own, Astra's
    database migrated on them and named by ``astra-config``, and the topology file its worker
    reads. Nothing (None, None) for the other scenarios."""
    if replication is None:
        yield None, None
        return
    directory = scratch_dir("astra-record-")
    try:
        async with running_data_plane(
            directory, ASTRA_DATABASE, "redis://127.0.0.1:6379/0", replication=replication
        ) as plane:
            topology = plane.topology()
            primary = topology.postgres[0]
            await create_database(primary.admin_dsn, "astra_sandbox")
            await migrated(primary.platform_dsn)
            path = directory / "topology.json"
            topology.write(path)
            CoreV1Api(kube.api).patch_namespaced_config_map(
                CONFIG_MAP, ASTRA_NAMESPACE, {"data": {DATABASE_URL_KEY: primary.platform_dsn}}
            )
            yield plane, path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def replicated_redis(
    redis: RedisPlane | None, shared: SandboxTarget
) -> AsyncIterator[tuple[SandboxTarget, DataPlane | None, Path | None]]:
    """For a Redis runbook's scenario: a Redis primary and replica of its own (and a Sentinel
    watching them, where asked) in place of the shared Redis, so Astra is played on them from
    its first tick (``running_astra`` names the primary in ``astra-config``), and the topology
    file its worker reads. ``shared`` and nothing for the other scenarios."""
    if redis is None:
        yield shared, None, None
        return
    directory = scratch_dir("astra-record-")
    try:
        servers = await start_redis(
            directory,
            replica=True,
            sentinel=redis == "sentinel",
            down_after_ms=SENTINEL_DOWN_AFTER_MS,
        )
        plane = DataPlane(postgres_url=shared.dsn, redis_url=servers[0].url, redis=servers)
        try:
            path = directory / "topology.json"
            plane.topology().write(path)
            yield shared.model_copy(update={"redis_url": plane.redis_url}), plane, path
        finally:
            await plane.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def staged(
    client: Client, executor: ThreadPoolExecutor, scenario: Scenario
) -> AsyncIterator[Stage]:
    """Incidents still open when the scenario's runs are stored are terminated: the dev server
    keeps no timers for a task queue nobody polls any more."""
    with (
        kube_sandbox() as kube,
        tempfile.TemporaryDirectory() as folder,
        Receiver(slack_answer) as chat,
        Receiver(statuspage_answer) as status_page,
        Receiver(pagerduty_answer) as pager,
    ):
        edited = yaml.safe_load((REPO_ROOT / "deploy" / "access-policy.yaml").read_text())
        if scenario.policy is not None:
            scenario.policy(edited)
        policy = Path(folder) / "access-policy.yaml"
        policy.write_text(yaml.safe_dump(edited))
        sources = Path(folder) / "vault-sources"
        (sources / "astra").mkdir(parents=True)
        (sources / "astra" / "DB_PASSWORD").write_text("recorded-db-password\n")
        async with (
            running_openbao(Path(folder)) as openbao,
            own_data_plane() as shared,
            replicated_redis(scenario.redis, shared) as (target, redis_plane, redis_topology),
            running_astra(target, kube.url) as astra,
            replicated(scenario.replication, kube) as (postgres_plane, postgres_topology),
        ):
            plane = postgres_plane or redis_plane
            topology = postgres_topology or redis_topology
            ca_cert, ca_key = write_ca(sandbox_ca(), Path(folder))
            settings = Settings(
                tls_ca_cert_file=ca_cert,
                tls_ca_key_file=ca_key,
                vault_addr=openbao.address,
                vault_token_file=openbao.token_file,
                vault_unseal_keys_file=openbao.unseal_keys_file,
                vault_source_root=sources,
                kube_url=kube.url,
                database_url=target.dsn,
                redis_url=target.redis_url,
                redis_key_prefix=target.key_prefix,
                task_queue=f"record-{scenario.name}",
                access_policy=policy,
                trusted_keys=TEST_SIGNER.public_line(),
                data_plane_topology=topology,
            )
            settings = incident_settings(
                settings, target.dsn, policy, Path(folder) / "postmortems", chat, status_page, pager
            )
            desk = Desk(client, settings.task_queue, settings, policy, chat, status_page, pager)
            runs = Runs(client, settings.task_queue, load_policy(policy), TEST_SIGNER)
            async with running_worker(client, settings, executor):
                yield Stage(client, runs, kube, astra, settings, desk, openbao, plane)
            for workflow_id in desk.opened:
                handle = client.get_workflow_handle(workflow_id)
                if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                    await handle.terminate("recorded")


def history_file(history: dict[str, object]) -> str:
    """One event a line: small, and a re-recording's diff reads event by event."""
    events = history.pop("events")
    assert isinstance(events, list)
    head = json.dumps(history)[:-1]
    lines = ",\n".join(json.dumps(event, separators=(",", ":")) for event in events)
    return f'{head}, "events": [\n{lines}\n]}}\n'


async def record(client: Client, executor: ThreadPoolExecutor, scenario: Scenario) -> None:
    began = time.monotonic()
    async with staged(client, executor, scenario) as stage:
        handles = await scenario.play(stage)
        if len(handles) != len(scenario.stored):
            raise WrongBranch(
                f"{scenario.name} played {len(handles)} runs, stores {scenario.stored}"
            )
        # While the worker runs: a run still open (an incident) is stored as it stands.
        histories = [await handle.fetch_history() for handle in handles]
    for name, handle, history in zip(scenario.stored, handles, histories, strict=True):
        # The run's id is kept beside its events: signatures in history name it, so a replay
        # under another id would (rightly) refuse the start.
        stored = {"workflowId": handle.id, **json.loads(history.to_json())}
        path = HERE / f"{name}.json"
        path.write_text(history_file(stored))
        print(f"{name}: {path.stat().st_size:,} bytes, {time.monotonic() - began:.1f}s")


async def main(only: list[str]) -> None:
    chosen = [s for s in SCENARIOS.values() if not only or s.name.startswith(tuple(only))]
    if not chosen:
        sys.exit(f"no scenario matches {' or '.join(only)}; they are: {', '.join(SCENARIOS)}")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=plain_data_converter(),
        search_attributes=sa.ALL,
        dev_server_log_level="error",
    )
    try:
        with ThreadPoolExecutor(8) as executor:
            # One at a time: the kill switch tells every open run, so runs of other scenarios
            # would hear it and store its signals.
            for scenario in chosen:
                await record(env.client, executor, scenario)
    finally:
        await env.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], metavar="NAME")
    asyncio.run(main(parser.parse_args().only))
