"""`astra-ops dev` as a person runs it: it comes up, serves a run, stops on Ctrl-C, and keeps
its runs across a restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from runtime.data_plane import DataPlaneTopology
from runtime.migrations import ASTRA, STATE, VERSIONS_TABLE, migrations
from runtime.settings import REPO_ROOT
from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane, scratch_dir
from sandbox.servers.plane import data_plane_record, topology_file
from sandbox.servers.process import alive, free_port
from starters.api import ALERTS_PATH, CODEC_PATH
from starters.dev import DEV_ALERT_TOKEN
from starters.schedules import TLS_SCAN_SCHEDULE_ID
from tests.conftest_data import NewDatabase
from tests.conftest_dev import (
    ALICE,
    BOB,
    CAROL,
    DevStack,
    dev_stack_config,
    running,
)
from tests.conftest_kube import eventually


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
async def test_dev_stack_runs_stops_cleanly_and_keeps_runs(
    tmp_path: Path, new_database: NewDatabase, redis_prefix: str, data_servers: DataPlane
) -> None:
    database = await new_database()  # empty: the stack migrates it as `astra-ops setup` would
    data = SandboxTarget(dsn=database, redis_url=data_servers.redis_url, key_prefix=redis_prefix)
    stack = dev_stack_config(tmp_path / "state", tmp_path / "dev.log", data, "dev-stack-test")
    async with running(stack) as proc, httpx.AsyncClient(base_url=stack.api, timeout=30) as http:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            rows = await (
                await conn.execute(f"SELECT version FROM {VERSIONS_TABLE} ORDER BY version")
            ).fetchall()
        assert [r[0] for r in rows] == [m.version for m in migrations(ASTRA) + migrations(STATE)]
        ui = (await http.get(f"{stack.ui}/api/v1/settings")).json()
        assert ui["Codec"]["Endpoint"] == stack.api + CODEC_PATH, "the UI decodes through the API"
        preflight = await http.options(
            f"{CODEC_PATH}/decode",
            headers={
                "Origin": f"http://localhost:{stack.ports['ui']}",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert preflight.status_code == 200, preflight.text
        # The stack's alert sender is known, so an Alertmanager reaches the intake's validation.
        stranger = await http.post(ALERTS_PATH, json={})
        assert stranger.status_code == 401, stranger.text
        sender = {"Authorization": f"Bearer {DEV_ALERT_TOKEN}"}
        malformed = await http.post(ALERTS_PATH, json={}, headers=sender)
        assert malformed.status_code == 422, malformed.text
        started = await http.post(
            "/v1/runbooks/shard-scaling/runs",
            json={"params": {"shards": 12}, "reason": "dev stack test"},
            headers=ALICE,
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]

        async def waiting() -> bool:
            approvals = (await http.get("/v1/approvals", headers=BOB)).json()
            return run_id in [a["run_id"] for a in approvals]

        await eventually(waiting, timeout=30, message="run awaiting approval")
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=60)
        output = stack.log.read_text()
        assert proc.returncode == 0, output
        assert "astra-ops dev is up" in output
        assert f"alert webhook   {stack.api}{ALERTS_PATH}" in output
        assert f"schedule        {TLS_SCAN_SCHEDULE_ID} created (daily at 06:00 UTC" in output
        # The stack's OpenBao: its root token kept for its owner only, never printed, and
        # stopped with the stack.
        openbao = tmp_path / "state" / "openbao"
        assert "  Vault           http://127.0.0.1:" in output
        assert (openbao / "root.token").stat().st_mode & 0o777 == 0o600
        assert (openbao / "root.token").read_text().strip() not in output
        assert not alive(int((openbao / "bao.pid").read_text()))
        for port in stack.ports.values():
            assert not listening(port), f"port {port} still open after Ctrl-C"
    assert (tmp_path / "state" / "temporal.db").exists()

    async with running(stack), httpx.AsyncClient(base_url=stack.api, timeout=30) as http:

        async def answered() -> bool:
            # The API is ready before the restarted worker polls; until then no status.
            view = (await http.get(f"/v1/runs/{run_id}", headers=BOB)).json()
            return view["status"] is not None

        await eventually(answered, timeout=60, message="the restarted worker answers")
        kept = (await http.get(f"/v1/runs/{run_id}", headers=BOB)).json()
        assert kept["state"] == "running"
        assert kept["status"]["pending_approvals"][0]["step"] == "approve scaling"
        decided = await http.post(
            f"/v1/runs/{run_id}/decisions", json={"decision": "approve"}, headers=BOB
        )
        assert decided.status_code == 200, decided.text

        async def completed() -> bool:
            view = (await http.get(f"/v1/runs/{run_id}", headers=BOB)).json()
            return bool(view["state"] == "completed")

        await eventually(completed, timeout=60, message="run completed after restart")


@pytest.mark.slow
async def test_dev_stack_runs_its_own_servers_where_none_answer(tmp_path: Path) -> None:
    """On a machine with only Python: nothing answers at the configured addresses, so the stack
    starts PostgreSQL and Redis of its own, and a lost worker is repaired on them."""
    folder = scratch_dir("astra-test-dev-")  # its PostgreSQL runs as an unprivileged user
    nowhere = SandboxTarget(
        dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/astra_sandbox",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    stack = dev_stack_config(
        folder / "state", tmp_path / "dev.log", nowhere, "dev-own-test", data_plane="auto"
    )
    try:
        async with (
            running(stack) as proc,
            httpx.AsyncClient(base_url=stack.api, timeout=30) as http,
        ):
            assert "servers of our own" in stack.log.read_text()
            plane = DataPlane.read(data_plane_record(folder / "state"))
            assert [s.name for s in plane.servers] == ["primary", "primary"]  # PostgreSQL, Redis
            # The worker's data-plane runbooks know these servers by name, and may stop ours.
            topology = DataPlaneTopology.load(topology_file(folder / "state"))
            assert [(n.name, n.control is not None) for n in topology.postgres] == [
                ("primary", True)
            ]
            assert topology.redis[0].platform_url == plane.redis_url
            fault = json.loads(await beside(stack, "sandbox", "fault", "worker-lost", "--json"))
            started = await http.post(
                "/v1/runbooks/worker-lost/runs",
                json={"params": {"worker_id": fault["worker_id"]}, "reason": "own data plane"},
                headers=CAROL,
            )
            assert started.status_code == 201, started.text
            run = f"/v1/runs/{started.json()['run_id']}"

            async def completed() -> bool:
                return bool((await http.get(run, headers=CAROL)).json()["state"] == "completed")

            await eventually(completed, timeout=90, message="the worker-lost run completed")
            result = (await http.get(run, headers=CAROL)).json()["result"]
            assert result["outcome"] == "done", result
            async with await psycopg.AsyncConnection.connect(plane.postgres_url) as conn:
                requeued = await (
                    await conn.execute("SELECT task_id FROM astra_ops_requeues")
                ).fetchall()
                stuck = await (
                    await conn.execute(
                        "SELECT id FROM tasks WHERE worker_id = %s AND status = 'running'",
                        (fault["worker_id"],),
                    )
                ).fetchall()
            assert requeued, "the lost worker's tasks were requeued, on our own PostgreSQL"
            assert stuck == [], "no task is left with the lost worker"

            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), timeout=60)
            assert proc.returncode == 0, stack.log.read_text()
            assert not [s.name for s in plane.servers if s.running()], "servers left after Ctrl-C"
            assert not data_plane_record(folder / "state").exists()
            assert not topology_file(folder / "state").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def beside(stack: DevStack, *args: str) -> str:
    """An `astra-ops` command in a second terminal beside the stack; its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "starters.cli", *args,
        cwd=REPO_ROOT, env=stack.env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()
