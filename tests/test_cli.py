"""The `astra-ops` CLI as people type it, against the real dev server and the sandbox cluster.

Outside dev mode the CLI goes through the API with the person's token (the API proves who they
are); one test covers dev mode, where the CLI talks to Temporal and trusts `--as`. Each command
runs in a worker thread (it starts its own event loop, as it does in a shell) while this test's
loop keeps the worker and the API serving.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import typer
from google.protobuf.duration_pb2 import Duration
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.worker import Worker
from typer._click import Context
from typer.core import TyperGroup
from typer.testing import CliRunner, Result

from runtime import search_attributes as sa
from runtime.client import DevStack
from runtime.migrations import ASTRA, STATE, VERSIONS_TABLE, migrations
from runtime.settings import Settings
from starters.api import create_app
from starters.cli import app
from starters.schedules import TLS_SCAN_SCHEDULE_ID
from tests.conftest import TEMPORAL
from tests.conftest_data import NewDatabase
from tests.conftest_kube import KubeSandbox, eventually
from tests.helpers import awaiting_approval, handle_of, shard_count
from tests.monitoring import on_loopback
from tests.test_api import ALERT_SENDERS, TOKENS
from workers.worker import running_worker


@dataclass
class Cli:
    env: dict[str, str]

    async def __call__(self, *args: str, user: str = "dave") -> Result:
        """Run a command as ``user`` (their API token); ``""`` for nobody. Dave watches."""
        who = {"ASTRA_OPS_API_TOKEN": f"t-{user}"} if user else {}
        runner = CliRunner()
        return await asyncio.to_thread(
            lambda: runner.invoke(app, list(args), env={**self.env, **who})
        )


@pytest.fixture
async def api_url(settings: Settings) -> AsyncIterator[str]:
    """The API, served on a free loopback port for the CLI (and Alertmanager) to call."""
    app_settings = settings.model_copy(update={"api_tokens": SecretStr(TOKENS), **ALERT_SENDERS})
    async with on_loopback(create_app(app_settings)) as url:
        yield url


@pytest.fixture
def cli(settings: Settings, codec_keys: str, api_url: str, tmp_path: Path) -> Cli:
    return Cli(
        {
            "ASTRA_OPS_API_URL": api_url,
            "ASTRA_OPS_TEMPORAL_ADDRESS": settings.temporal_address,
            "ASTRA_OPS_TASK_QUEUE": settings.task_queue,
            "ASTRA_OPS_CODEC_KEYS": codec_keys,
            # Not this checkout's .astra/: a dev stack running here must not switch the mode.
            "ASTRA_OPS_STATE_DIR": str(tmp_path),
            "ASTRA_OPS_USER": "",
            "COLUMNS": "200",
        }
    )


async def test_walkthrough_start_status_approve(
    cli: Cli, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    started = await cli(
        "start", "shard-scaling", "--param", "shards=12", "--param", f"namespace={namespace}",
        "--reason", "rebalance", "--json", user="alice",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")

    async def listed_as_waiting() -> bool:
        waiting = await cli("ps", "--awaiting-approval", "--json")
        return run_id in [r["run_id"] for r in json.loads(waiting.stdout)]

    await eventually(listed_as_waiting, timeout=10, message="run listed by ps --awaiting-approval")
    shown = await cli("status", run_id, "--json")
    status = json.loads(shown.stdout)
    assert status["state"] == "running"
    assert status["pending_approvals"][0]["step"] == "approve scaling"
    assert {s["name"]: s["state"] for s in status["steps"]}["approve scaling"] == (
        "awaiting_approval"
    )
    table = await cli("status", run_id)
    assert "awaiting approval of 'approve scaling' by kernel-sre" in table.stdout

    own = await cli("approve", run_id, user="alice")
    assert own.exit_code == 1
    assert "alice started this run; the requester cannot approve it" in own.stderr
    outsider = await cli("approve", run_id, user="carol")
    assert outsider.exit_code == 1 and "not in the group(s) allowed" in outsider.stderr
    approved = await cli("approve", run_id, "--comment", "looks right", user="bob")
    assert approved.exit_code == 0, approved.output
    assert "approved by bob" in approved.stdout

    await handle_of(client, run_id).result()
    done = json.loads((await cli("status", run_id, "--json")).stdout)
    assert done["state"] == "completed"
    assert all(s["state"] == "done" for s in done["steps"])
    assert shard_count(kube, namespace) == "12"


async def test_start_wait_dry_run_and_reject(
    cli: Cli, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    dry = await cli(
        "start", "shard-scaling", "-p", "shards=3", "-p", f"namespace={namespace}",
        "--dry-run", "--wait", user="dave",
    )  # fmt: skip
    assert dry.exit_code == 0, dry.output
    assert "done: dry-run: would change TASK_SHARD_COUNT 8 -> 3" in dry.stdout
    assert "  read current shard count: done" in dry.stdout  # progress, step by step

    started = await cli(
        "start", "shard-scaling", "-p", "shards=3", "-p", f"namespace={namespace}", "--json",
        user="alice",
    )  # fmt: skip
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    rejected = await cli("reject", run_id, "--comment", "wrong count", user="bob")
    assert rejected.exit_code == 0, rejected.output
    result = await handle_of(client, run_id).result()
    assert result.outcome.value == "rejected"
    assert shard_count(kube, namespace) == "8"
    shown = await cli("status", run_id)
    assert shown.stdout.rstrip().splitlines()[-1] == (
        "rejected: step 'approve scaling' rejected by bob: wrong count"
    )
    dry_id = f"shard-scaling/{namespace}"

    async def outcomes_listed() -> bool:
        listed = json.loads((await cli("ps", "--json")).stdout)
        mine = [(r["outcome"], r["dry_run"]) for r in listed if r["run_id"] == dry_id]
        return ("done", True) in mine and ("rejected", False) in mine

    await eventually(outcomes_listed, timeout=10, message="ps shows each run's outcome")
    table = await cli("ps")
    assert "done (dry-run)" in table.stdout and "rejected" in table.stdout


async def test_cancel_and_list(cli: Cli, client: Client, worker: Worker, namespace: str) -> None:
    started = await cli(
        "start", "shard-scaling", "-p", "shards=3", "-p", f"namespace={namespace}", "--json",
        user="alice",
    )  # fmt: skip
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    cancelled = await cli("cancel", run_id, "--reason", "wrong count", user="bob")
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled by bob" in cancelled.stdout
    result = await handle_of(client, run_id).result()
    assert result.outcome.value == "cancelled"
    shown = json.loads((await cli("status", run_id, "--json")).stdout)
    assert shown["outcome"] == "cancelled"
    assert shown["result"]["summary"] == "cancelled by bob: wrong count"
    again = await cli("cancel", run_id, user="bob")
    assert again.exit_code == 1 and "already completed" in again.stderr

    async def listed() -> bool:
        table = await cli("ps")
        return run_id in table.stdout

    await eventually(listed, timeout=10, message="cancelled run listed by ps")


async def test_every_error_is_one_clear_line_and_non_zero(
    cli: Cli, client: Client, worker: Worker, namespace: str
) -> None:
    cases = [
        (("start", "nope"), "alice", 1, "no runbook named 'nope'"),
        (("start", "shard-scaling", "-p", "shards=zero"), "alice", 2, "shards: Input should be"),
        (("start", "shard-scaling", "-p", "shards"), "alice", 2, "--param takes key=value"),
        (("start", "shard-scaling", "-p", "shards=4"), "", 1, "ASTRA_OPS_API_TOKEN"),
        (
            ("start", "shard-scaling", "-p", "shards=4", "--as", "bob"),
            "alice",
            2,
            "--as works only",
        ),
        (("start", "shard-scaling", "-p", "shards=4"), "mallory", 1, "not in the access policy"),
        (("start", "shard-scaling", "-p", "shards=4"), "dave", 1, "dave may not start"),
        (("status", "shard-scaling/never"), "dave", 1, "no run 'shard-scaling/never'"),
        (("approve", "shard-scaling/never"), "bob", 1, "no run 'shard-scaling/never'"),
    ]
    for args, user, code, message in cases:
        result = await cli(*args, user=user)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr

    down = Cli({**cli.env, "ASTRA_OPS_API_URL": "http://127.0.0.1:1"})
    result = await down("ps", user="alice")
    assert result.exit_code == 1
    assert "the astra-ops API at http://127.0.0.1:1 did not answer" in result.stderr
    dev_down = Cli(
        {**cli.env, "ASTRA_OPS_DEV_MODE": "true", "ASTRA_OPS_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    )
    result = await dev_down("ps")
    assert result.exit_code == 1
    assert "Temporal is not reachable at 127.0.0.1:1" in result.stderr
    bad_setting = Cli({**cli.env, "ASTRA_OPS_API_PORT": "eighty"})
    result = await bad_setting("ps", user="alice")
    assert result.exit_code == 1 and "ASTRA_OPS_API_PORT" in result.stderr


async def test_runbooks_catalogue(cli: Cli) -> None:
    listed = await cli("runbooks", "--json")
    catalogue = {r["name"]: r for r in json.loads(listed.stdout)}
    scaling = catalogue["shard-scaling"]
    assert scaling["trigger"] == "Shard imbalance or scaling event"
    assert scaling["steps"][:4] == [
        "read current shard count",
        "check astra-scheduler health",
        "check astra-worker health",
        "approve scaling",
    ]
    assert "shards" in {p["name"] for p in scaling["parameters"]}

    table = await cli("runbooks")
    assert "shards: integer, required, >= 1 and <= 4096" in table.stdout
    one = await cli("runbooks", "worker-lost")
    assert one.exit_code == 0, one.output
    for line in (
        "trigger: Heartbeat lost >30s",
        "severity: SEV3",
        "  5. approve replacing workers of a stuck pool",
        "  approve replacing workers of a stuck pool: 1 of agent-platform, on silence abort",
        "  stuck_pool_share: number, default 0.5, > 0 and <= 1; policy: default 0.5, "
        "allowed [0.05, 0.5]",
    ):
        assert line in one.stdout, (line, one.stdout)
    unknown = await cli("runbooks", "nope")
    assert unknown.exit_code == 1 and "no runbook named 'nope'" in unknown.stderr
    # The steps a start with these parameters would take, named after them.
    custom = await cli("runbooks", "shard-scaling", "-p", "shards=3", "-p", "scheduler=sched-b")
    assert "restart sched-b" in custom.stdout and "restart astra-scheduler" not in custom.stdout
    bad = await cli("runbooks", "shard-scaling", "-p", "shards=0")
    assert bad.exit_code == 2 and "bad parameters for shard-scaling: shards" in bad.stderr
    nameless = await cli("runbooks", "-p", "shards=3")
    assert nameless.exit_code == 2 and "--param needs a runbook" in nameless.stderr


def command_paths(group: TyperGroup, ctx: Context) -> Iterator[list[str]]:
    """Every command and group under ``group``, as the words that name it (the sandbox's own
    commands are loaded on demand and not walked)."""
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield [name]
        if isinstance(command, TyperGroup) and name != "sandbox":
            yield from ([name, *path] for path in command_paths(command, ctx))


async def test_every_command_says_how_to_use_it_and_flags_read_as_flags(cli: Cli) -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    commands = list(command_paths(root, Context(root)))
    assert ["incident", "action", "drop"] in commands and ["keygen"] in commands
    for command in commands:
        helped = await cli(*command, "--help")
        assert helped.exit_code == 0, (command, helped.output)
        assert "Example: " in helped.stdout, command
        assert "<bool>" not in helped.stdout, command
    start = (await cli("start", "--help")).stdout
    assert "--dry-run " in start and "--wait " in start


async def test_setup_migrates_both_databases_and_registers_search_attributes_and_schedules_once(
    cli: Cli, client: Client, new_database: NewDatabase
) -> None:
    namespace = f"setup-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    astra, state = await new_database(), await new_database()
    in_namespace = Cli(
        {
            **cli.env,
            "ASTRA_OPS_TEMPORAL_NAMESPACE": namespace,
            "ASTRA_OPS_DATABASE_URL": astra,
            "ASTRA_OPS_STATE_DATABASE_URL": state,
        }
    )
    first = await in_namespace("setup")
    assert first.exit_code == 0, first.output
    assert "applied astra/0001_astra_ops_requeues" in first.stdout
    assert f"schedule {TLS_SCAN_SCHEDULE_ID} created (daily at 06:00 UTC" in first.stdout
    second = await in_namespace("setup")  # finds everything there and changes nothing
    assert second.exit_code == 0, second.output
    assert "schema up to date" in second.stdout
    assert f"schedule {TLS_SCAN_SCHEDULE_ID} updated" in second.stdout

    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert {key.name for key in sa.ALL} <= set(listed.custom_attributes)
    for dsn, kind in ((astra, ASTRA), (state, STATE)):
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            rows = await (
                await conn.execute(f"SELECT version FROM {VERSIONS_TABLE} ORDER BY version")
            ).fetchall()
        assert [r[0] for r in rows] == [m.version for m in migrations(kind)]


async def test_setup_says_which_database_it_could_not_migrate(
    cli: Cli, new_database: NewDatabase
) -> None:
    missing = make_conninfo(await new_database(), dbname=f"astra_missing_{uuid.uuid4().hex}")
    result = await Cli({**cli.env, "ASTRA_OPS_DATABASE_URL": missing})("setup")
    assert result.exit_code == 1
    assert f"could not bring database {conninfo_to_dict(missing)['dbname']} on " in result.stderr
    assert "ASTRA_OPS_DATABASE_URL" in result.stderr


async def test_print_signal_gives_the_stock_cli_a_signed_approval(
    cli: Cli, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    started = await cli(
        "start", "shard-scaling", "-p", "shards=6", "-p", f"namespace={namespace}", "--json",
        user="alice",
    )  # fmt: skip
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    printed = await cli("approve", run_id, "--print-signal", "--comment", "via stock", user="bob")
    assert printed.exit_code == 0, printed.output
    argv = shlex.split(printed.stdout)
    assert argv[:3] == ["temporal", "workflow", "signal"]
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL), *argv[1:], "--address", client.service_client.config.target_host,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    result = await handle_of(client, run_id).result()
    assert result.outcome.value == "done"
    assert shard_count(kube, namespace) == "6"


async def test_dev_mode_talks_to_temporal_and_trusts_as(
    cli: Cli, client: Client, settings: Settings, kube: KubeSandbox, namespace: str
) -> None:
    dev = Cli({**cli.env, "ASTRA_OPS_DEV_MODE": "true"})
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(client, settings.model_copy(update={"dev_mode": True}), executor):
            started = await dev(
                "start", "shard-scaling", "-p", "shards=7", "-p", f"namespace={namespace}",
                "--as", "alice", "--json",
            )  # fmt: skip
            assert started.exit_code == 0, started.output
            run_id = json.loads(started.stdout)["run_id"]
            await awaiting_approval(handle_of(client, run_id), "approve scaling")
            approved = await dev("approve", run_id, "--as", "bob")
            assert approved.exit_code == 0, approved.output
            assert (await handle_of(client, run_id).result()).outcome.value == "done"
    assert shard_count(kube, namespace) == "7"


async def test_beside_a_dev_stack_the_cli_goes_through_its_api_as_the_named_person(
    cli: Cli, client: Client, worker: Worker, kube: KubeSandbox, namespace: str, tmp_path: Path
) -> None:
    # What `astra-ops dev` writes while it runs: its API, and each person's dev token.
    tokens = {user: f"t-{user}" for user in ("alice", "bob", "dave")}
    DevStack(api_url=cli.env["ASTRA_OPS_API_URL"], tokens=tokens).write(tmp_path / "dev-mode")
    # Nothing else says where the API is: the marker does.
    beside = Cli({**cli.env, "ASTRA_OPS_API_URL": "http://127.0.0.1:1"})

    nobody = await beside("start", "shard-scaling", "-p", "shards=5", user="")
    assert nobody.exit_code == 2 and "say who you are: --as NAME" in nobody.stderr
    stranger = await beside("start", "shard-scaling", "-p", "shards=5", "--as", "zed", user="")
    assert stranger.exit_code == 2 and "zed has no token in this dev stack" in stranger.stderr
    assert "alice, bob, dave" in stranger.stderr

    started = await beside(
        "start", "shard-scaling", "-p", "shards=5", "-p", f"namespace={namespace}",
        "--as", "alice", "--json", user="",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    # The API applies its checks to a dev token as to any other: alice may not approve her own.
    own = await beside("approve", run_id, "--as", "alice", user="")
    assert own.exit_code == 1 and "the requester cannot approve it" in own.stderr
    listed = await beside("ps", "--json", user="")  # a read needs no name
    assert run_id in [r["run_id"] for r in json.loads(listed.stdout)]
    card = await beside("runbooks", "shard-scaling", "-p", "shards=3", "-p", "workers=w-b", user="")
    assert "started by: kernel-sre" in card.stdout, card.stderr
    assert "restart w-b" in card.stdout and "restart astra-worker" not in card.stdout
    approved = await beside("approve", run_id, "--as", "bob", user="")
    assert approved.exit_code == 0, approved.output
    assert (await handle_of(client, run_id).result()).outcome.value == "done"
    assert shard_count(kube, namespace) == "5"
