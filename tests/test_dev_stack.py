"""`astra-ops dev` as a person runs it: it comes up, serves a run, stops on Ctrl-C, and keeps
its runs across a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.conftest_kube import eventually

ALICE = {"Authorization": "Bearer alice-dev-token"}
BOB = {"Authorization": "Bearer bob-dev-token"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@asynccontextmanager
async def dev_stack(env: dict[str, str], api: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "starters.cli", "dev",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"astra-ops dev exited with {proc.returncode}")
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=90, interval=0.2, message="astra-ops dev ready")
        yield proc
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_dev_stack_runs_stops_cleanly_and_keeps_runs(
    tmp_path: Path, pg_dsn: str, redis_prefix: str
) -> None:
    ports = {name: free_port() for name in ("temporal", "ui", "api", "kube")}
    api = f"http://127.0.0.1:{ports['api']}"
    env = {
        **os.environ,
        "ASTRA_OPS_STATE_DIR": str(tmp_path / "state"),
        "ASTRA_OPS_TEMPORAL_PORT": str(ports["temporal"]),
        "ASTRA_OPS_UI_PORT": str(ports["ui"]),
        "ASTRA_OPS_API_PORT": str(ports["api"]),
        "ASTRA_OPS_API_URL": api,
        "ASTRA_OPS_KUBE_PORT": str(ports["kube"]),
        "ASTRA_OPS_KUBE_ROLLOUT_SECONDS": "0.2",
        "ASTRA_OPS_TASK_QUEUE": "dev-stack-test",
        "ASTRA_OPS_DATABASE_URL": pg_dsn,
        "ASTRA_OPS_REDIS_KEY_PREFIX": redis_prefix,
    }
    async with dev_stack(env, api) as proc, httpx.AsyncClient(base_url=api, timeout=30) as http:
        ui = (await http.get(f"http://127.0.0.1:{ports['ui']}/api/v1/settings")).json()
        assert ui["Codec"]["Endpoint"] == api, "the UI decodes payloads through the API"
        preflight = await http.options(
            "/codec/decode",
            headers={
                "Origin": f"http://localhost:{ports['ui']}",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert preflight.status_code == 200, preflight.text
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
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, output.decode()
        assert "astra-ops dev is up" in output.decode()
        for port in ports.values():
            assert not listening(port), f"port {port} still open after Ctrl-C"
    assert (tmp_path / "state" / "temporal.db").exists()

    async with dev_stack(env, api), httpx.AsyncClient(base_url=api, timeout=30) as http:
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
