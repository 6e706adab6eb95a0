"""`astra-ops dev` as a person runs it: it comes up, serves a run, stops on Ctrl-C, and keeps
its runs across a restart."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import httpx
import psycopg

from runtime.migrations import ASTRA, STATE, VERSIONS_TABLE, migrations
from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane
from starters.api import ALERTS_PATH, CODEC_PATH
from starters.dev import DEV_ALERT_TOKEN
from tests.conftest_data import NewDatabase
from tests.conftest_dev import ALICE, BOB, dev_stack_config, running
from tests.conftest_kube import eventually


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
