"""`astra-ops sandbox`: faults land in the real data plane, reset cleans it, serve plays Astra;
outside dev mode, or on a database that is not the sandbox's, they refuse and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner

from runtime.client import dev_stack_marker
from runtime.settings import Settings
from sandbox import faults
from sandbox.faults import SandboxTarget
from sandbox.loadgen import SandboxKeys, read_knobs
from sandbox.servers.process import free_port
from starters.cli import app, sandbox_commands
from tests.conftest_data import NewDatabase
from tests.conftest_kube import KubeSandbox, eventually


@pytest.fixture
def env(data_plane: SandboxTarget, tmp_path: Path) -> dict[str, str]:
    """The sandbox CLI's settings for this test's data plane, in dev mode, as the environment
    gives them (a state directory of its own: a dev stack in this checkout changes nothing)."""
    return {
        "ASTRA_OPS_DATABASE_URL": data_plane.dsn,
        "ASTRA_OPS_REDIS_URL": data_plane.redis_url,
        "ASTRA_OPS_REDIS_KEY_PREFIX": data_plane.key_prefix,
        "ASTRA_OPS_STATE_DIR": str(tmp_path),
        "ASTRA_OPS_DEV_MODE": "true",
    }


def sandbox(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sandbox", *args], env=env)
    return result.exit_code, result.output


async def test_faults_print_what_they_did_and_reset_cleans_up(
    env: dict[str, str], data_plane: SandboxTarget
) -> None:
    code, output = await asyncio.to_thread(sandbox, env, "fault", "worker-lost", "--json")
    assert code == 0, output
    lost = json.loads(output)
    assert lost["worker_id"] and len(lost["leased_task_ids"]) == 3

    code, output = await asyncio.to_thread(
        sandbox, env, "fault", "dead-letters", "--count", "4", "--json"
    )
    assert code == 0, output
    assert len(json.loads(output)["task_ids"]) == 4

    code, output = await asyncio.to_thread(sandbox, env, "reset")
    assert code == 0 and "sandbox reset" in output
    async with await psycopg.AsyncConnection.connect(data_plane.dsn) as conn:
        assert await (await conn.execute("SELECT count(*) FROM tasks")).fetchall() == [(0,)]


async def test_bad_fault_arguments_exit_2_with_the_reason(env: dict[str, str]) -> None:
    code, output = await asyncio.to_thread(sandbox, env, "fault", "error-spike", "--share", "0")
    assert code == 2 and "0 < share <= 1" in output


async def test_serve_plays_the_cluster_pods_and_exports_metrics(
    env: dict[str, str], kube: KubeSandbox
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "starters.cli",
        "sandbox",
        "serve",
        env={
            **os.environ,
            **env,
            "ASTRA_OPS_KUBE_URL": kube.url,
            "ASTRA_OPS_SANDBOX_METRICS_PORT": str(port),
            "ASTRA_OPS_SANDBOX_TICK_SECONDS": "0.2",
        },
    )
    pods = {p["metadata"]["name"] for p in kube.cluster.pods("astra", {"app": "astra-worker"})}

    async def every_pod_heartbeats() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        except httpx.HTTPError:
            return False
        return all(f'astra_worker_heartbeat_age_seconds{{worker_id="{p}"}}' in text for p in pods)

    try:
        await eventually(every_pod_heartbeats, timeout=20, interval=0.2, message="pods on /metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_bad_rollout_rolls_the_workers_to_a_bad_build(
    env: dict[str, str], kube: KubeSandbox
) -> None:
    with_cluster = {**env, "ASTRA_OPS_KUBE_URL": kube.url}
    code, output = await asyncio.to_thread(sandbox, with_cluster, "fault", "bad-rollout", "--json")
    assert code == 0, output
    fault = json.loads(output)
    assert (fault["from_revision"], fault["to_revision"]) == (1, 2)
    assert fault["image"] == "registry.sandbox.local/astra/astra-worker:bad"
    deployment = kube.cluster.get("deployments", "astra", "astra-worker")
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == fault["image"]

    code, output = await asyncio.to_thread(sandbox, env, "fault", "bad-rollout")
    assert code == 1 and "ASTRA_OPS_KUBE_URL" in output


async def bad_images(redis_client: aioredis.Redis, target: SandboxTarget) -> set[str]:
    """The images the load generator's knobs now say are bad builds."""
    knobs = await read_knobs(redis_client, SandboxKeys(target.key_prefix))
    return {build.image for build in knobs.bad_builds}


async def test_bad_canary_marks_an_image_bad_without_rolling_it_out(
    env: dict[str, str], kube: KubeSandbox, data_plane: SandboxTarget, redis_client: aioredis.Redis
) -> None:
    with_cluster = {**env, "ASTRA_OPS_KUBE_URL": kube.url}
    code, output = await asyncio.to_thread(sandbox, with_cluster, "fault", "bad-canary")
    assert code == 0, output
    image = "registry.sandbox.local/astra/astra-worker:bad-canary"
    assert f"{image} is now a bad build" in output and "50%" in output
    assert f"astra-ops sandbox fault bad-canary --image {image} --clear" in output
    assert "astra-ops sandbox reset" in output
    deployment = kube.cluster.get("deployments", "astra", "astra-worker")
    assert deployment is not None and deployment["metadata"]["generation"] == 1
    assert await bad_images(redis_client, data_plane) == {image}

    # A bad rollout's image stays bad beside it; --image needs no cluster.
    code, output = await asyncio.to_thread(sandbox, with_cluster, "fault", "bad-rollout", "--json")
    assert code == 0, output
    rolled = json.loads(output)["image"]
    code, output = await asyncio.to_thread(
        sandbox,
        env,
        "fault",
        "bad-canary",
        "--image",
        "astra/worker:2.0",
        "--share",
        "0.25",
        "--json",
    )
    assert code == 0, output
    assert json.loads(output) == {
        "image": "astra/worker:2.0",
        "share": 0.25,
        "error": faults.BAD_BUILD_ERROR,
    }
    assert await bad_images(redis_client, data_plane) == {image, rolled, "astra/worker:2.0"}

    code, output = await asyncio.to_thread(
        sandbox, env, "fault", "bad-canary", "--image", "astra/worker:2.0", "--clear"
    )
    assert code == 0 and "astra/worker:2.0 is a good build again" in output, output
    assert await bad_images(redis_client, data_plane) == {image, rolled}

    code, output = await asyncio.to_thread(sandbox, env, "fault", "bad-canary")
    assert code == 1 and "--image" in output and "ASTRA_OPS_KUBE_URL" in output, output
    code, output = await asyncio.to_thread(
        sandbox, with_cluster, "fault", "bad-canary", "--deployment", "nope"
    )
    assert code == 2 and "no Deployment astra/nope" in output, output
    code, output = await asyncio.to_thread(
        sandbox, env, "fault", "bad-canary", "--image", "a:b", "--share", "0"
    )
    assert code == 2 and "0 < share <= 1" in output, output

    code, output = await asyncio.to_thread(sandbox, env, "reset")
    assert code == 0, output
    assert await bad_images(redis_client, data_plane) == set()


def command_lines(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command under ``group``, as typed after `astra-ops sandbox`."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from command_lines(command, (*prefix, name))
        else:
            yield (*prefix, name)


async def test_every_sandbox_command_refuses_outside_dev_mode(
    env: dict[str, str], data_plane: SandboxTarget, tmp_path: Path
) -> None:
    production = {**env, "ASTRA_OPS_DEV_MODE": "false"}
    lines = sorted(command_lines(sandbox_commands()))
    assert ("fault", "worker-lost") in lines and ("reset",) in lines
    for line in lines:
        code, output = await asyncio.to_thread(sandbox, production, *line)
        assert code == 2, (line, output)
        assert "runs only in dev mode" in output, (line, output)
    async with await psycopg.AsyncConnection.connect(data_plane.dsn) as conn:
        assert await (await conn.execute("SELECT count(*) FROM tasks")).fetchall() == [(0,)]

    # The dev stack's marker beside the settings is dev mode too.
    dev_stack_marker(Settings(state_dir=tmp_path)).touch()
    code, output = await asyncio.to_thread(sandbox, production, "fault", "dead-letters")
    assert code == 0, output


async def test_reset_refuses_a_database_that_is_not_the_sandboxs_and_changes_nothing(
    env: dict[str, str], new_database: NewDatabase, redis_client: aioredis.Redis
) -> None:
    astra = await new_database()  # Astra's real database, say: its tasks, no sandbox marker
    async with await psycopg.AsyncConnection.connect(astra) as conn:
        await conn.execute("CREATE TABLE tasks (id text PRIMARY KEY)")
        await conn.execute("INSERT INTO tasks VALUES ('t-1'), ('t-2')")
    heartbeat = f"{env['ASTRA_OPS_REDIS_KEY_PREFIX']}heartbeat:w-1"
    await redis_client.set(heartbeat, "1")

    code, output = await asyncio.to_thread(
        sandbox, {**env, "ASTRA_OPS_DATABASE_URL": astra}, "reset"
    )

    name = conninfo_to_dict(astra)["dbname"]
    assert code == 2, output
    assert f"refusing to reset database {name} on " in output
    assert "astra_sandbox_marker" in output and "nothing was changed" in output
    async with await psycopg.AsyncConnection.connect(astra) as conn:
        rows = await (await conn.execute("SELECT id FROM tasks ORDER BY id")).fetchall()
        tables = await (
            await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).fetchall()
    assert rows == [("t-1",), ("t-2",)]
    assert tables == [("tasks",)]  # nothing was migrated into it either
    assert await redis_client.get(heartbeat) == "1"
