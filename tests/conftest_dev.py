"""`astra-ops dev` as a subprocess on free ports, for tests that use the whole stack as a person
does (the dev-stack test, the browser test).

Every port is a free one, the state, database and Redis keys are the test's own, and the stack's
output goes to a file: several runs of these tests can share the machine, and a stack that logs a
lot never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from sandbox.faults import SandboxTarget
from sandbox.servers import DataPlane
from sandbox.servers.openbao import openbao_server
from sandbox.servers.plane import data_plane_record
from sandbox.servers.process import free_port
from tests.conftest_kube import eventually

ALICE = {"Authorization": "Bearer alice-dev-token"}
BOB = {"Authorization": "Bearer bob-dev-token"}
CAROL = {"Authorization": "Bearer carol-dev-token"}
STARTUP_SECONDS = 90


@dataclass(frozen=True)
class DevStack:
    """Where one `astra-ops dev` lives: its environment, its ports and its log file."""

    env: dict[str, str]
    ports: dict[str, int]
    log: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.ports['ui']}"


def dev_stack_config(
    state_dir: Path, log: Path, data: SandboxTarget, task_queue: str, **settings: str
) -> DevStack:
    """A stack on free ports over ``data`` (its database may be empty: the stack migrates it);
    ``settings`` are more ASTRA_OPS_* settings, without the prefix."""
    ports = {name: free_port() for name in ("temporal", "ui", "api", "kube", "metrics")}
    env = {
        **os.environ,
        "ASTRA_OPS_STATE_DIR": str(state_dir),
        "ASTRA_OPS_TEMPORAL_PORT": str(ports["temporal"]),
        "ASTRA_OPS_UI_PORT": str(ports["ui"]),
        "ASTRA_OPS_API_PORT": str(ports["api"]),
        "ASTRA_OPS_API_URL": f"http://127.0.0.1:{ports['api']}",
        "ASTRA_OPS_KUBE_PORT": str(ports["kube"]),
        "ASTRA_OPS_SANDBOX_METRICS_PORT": str(ports["metrics"]),
        "ASTRA_OPS_KUBE_ROLLOUT_SECONDS": "0.2",
        "ASTRA_OPS_TASK_QUEUE": task_queue,
        "ASTRA_OPS_DATABASE_URL": data.dsn,
        "ASTRA_OPS_REDIS_URL": data.redis_url,
        "ASTRA_OPS_REDIS_KEY_PREFIX": data.key_prefix,
        **{f"ASTRA_OPS_{name.upper()}": value for name, value in settings.items()},
    }
    return DevStack(env=env, ports=ports, log=log)


@asynccontextmanager
async def running(stack: DevStack) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start `astra-ops dev` and wait until it says it is up, when its API must answer at once
    (a person types a command as soon as they read it); kill its whole process group
    afterwards, whatever state it is in, and the servers of its own it may have left (they
    daemonize, so they outlive a stack that was killed)."""
    stack.log.parent.mkdir(parents=True, exist_ok=True)
    before = stack.log.stat().st_size if stack.log.exists() else 0  # an earlier start's lines
    with stack.log.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "starters.cli", "dev",
            env=stack.env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=stack.api, timeout=30) as http:

            async def up() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(
                        f"astra-ops dev exited with {proc.returncode}; see {stack.log}"
                    )
                with stack.log.open("rb") as log:
                    log.seek(before)
                    return b"astra-ops dev is up" in log.read()

            await eventually(
                up, timeout=STARTUP_SECONDS, interval=0.1, message="astra-ops dev says it is up"
            )
            assert (await http.get("/readyz")).status_code == 200, "up, but the API is not"
        yield proc
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        state = Path(stack.env["ASTRA_OPS_STATE_DIR"])
        record = data_plane_record(state)
        if record.exists():
            await DataPlane.read(record).stop()
        await openbao_server(state).stop()  # its own session: a killed group leaves it
