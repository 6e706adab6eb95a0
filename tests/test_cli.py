"""The `astra-ops` CLI as people type it, against the real dev server and the sandbox cluster.

Each command runs in a worker thread (it starts its own event loop, as it does in a shell) while
this test's loop keeps the worker polling.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker
from typer.testing import CliRunner, Result

from runtime import search_attributes as sa
from runtime.settings import Settings
from starters.cli import app
from tests.conftest_kube import KubeSandbox, eventually
from tests.helpers import awaiting_approval, handle_of, shard_count


@dataclass
class Cli:
    env: dict[str, str]

    async def __call__(self, *args: str, user: str | None = None) -> Result:
        env = {**self.env, "ASTRA_OPS_USER": user or ""}
        runner = CliRunner()
        return await asyncio.to_thread(lambda: runner.invoke(app, list(args), env=env))


@pytest.fixture
def cli(settings: Settings, codec_keys: str) -> Cli:
    return Cli(
        {
            "ASTRA_OPS_TEMPORAL_ADDRESS": settings.temporal_address,
            "ASTRA_OPS_TASK_QUEUE": settings.task_queue,
            "ASTRA_OPS_CODEC_KEYS": codec_keys,
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

    started = await cli(
        "start", "shard-scaling", "-p", "shards=3", "-p", f"namespace={namespace}", "--json",
        user="dave",
    )  # fmt: skip
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    rejected = await cli("reject", run_id, "--comment", "wrong count", user="alice")
    assert rejected.exit_code == 0, rejected.output
    result = await handle_of(client, run_id).result()
    assert result.outcome.value == "rejected"
    assert shard_count(kube, namespace) == "8"


async def test_cancel_and_list(cli: Cli, client: Client, worker: Worker, namespace: str) -> None:
    started = await cli(
        "start", "shard-scaling", "-p", "shards=3", "-p", f"namespace={namespace}", "--json",
        user="alice",
    )  # fmt: skip
    run_id = json.loads(started.stdout)["run_id"]
    await awaiting_approval(handle_of(client, run_id), "approve scaling")
    cancelled = await cli("cancel", run_id, user="bob")
    assert cancelled.exit_code == 0, cancelled.output
    with pytest.raises(WorkflowFailureError):
        await handle_of(client, run_id).result()
    assert json.loads((await cli("status", run_id, "--json")).stdout)["state"] == "cancelled"
    again = await cli("cancel", run_id, user="bob")
    assert again.exit_code == 1 and "already cancelled" in again.stderr

    async def listed() -> bool:
        table = await cli("ps")
        return run_id in table.stdout and "cancelled" in table.stdout

    await eventually(listed, timeout=10, message="cancelled run listed by ps")


async def test_every_error_is_one_clear_line_and_non_zero(
    cli: Cli, client: Client, worker: Worker, namespace: str
) -> None:
    cases = [
        (("start", "nope"), "alice", 1, "no runbook named 'nope'"),
        (("start", "shard-scaling", "-p", "shards=zero"), "alice", 2, "shards: Input should be"),
        (("start", "shard-scaling", "-p", "shards"), "alice", 2, "--param takes key=value"),
        (("start", "shard-scaling", "-p", "shards=4"), None, 1, "pass --as NAME"),
        (("start", "shard-scaling", "-p", "shards=4"), "mallory", 1, "not in the access policy"),
        (("status", "shard-scaling/never"), None, 1, "no run 'shard-scaling/never'"),
        (("approve", "shard-scaling/never"), "bob", 1, "no run 'shard-scaling/never'"),
    ]
    for args, user, code, message in cases:
        result = await cli(*args, user=user)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr

    down = Cli({**cli.env, "ASTRA_OPS_TEMPORAL_ADDRESS": "127.0.0.1:1"})
    result = await down("ps")
    assert result.exit_code == 1
    assert "Temporal is not reachable at 127.0.0.1:1" in result.stderr
    bad_setting = Cli({**cli.env, "ASTRA_OPS_API_PORT": "eighty"})
    result = await bad_setting("ps")
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
    assert "shards" in scaling["parameters"]


async def test_setup_registers_search_attributes_once(cli: Cli, client: Client) -> None:
    namespace = f"setup-{uuid.uuid4().hex[:8]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    in_namespace = Cli({**cli.env, "ASTRA_OPS_TEMPORAL_NAMESPACE": namespace})
    for _ in range(2):  # the second run finds them all and changes nothing
        result = await in_namespace("setup")
        assert result.exit_code == 0, result.output
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert {key.name for key in sa.ALL} <= set(listed.custom_attributes)
