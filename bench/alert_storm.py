"""An alert storm: Alertmanager notifications posted to the API's webhook as fast as it takes them,
beside bare signal-with-start of the same count on the same dev server, in the same bench run.

The notifications (version 4, bearer-authenticated as Alertmanager) fall in ``--groups`` alert
groups. Two storms, each on groups of its own: ``repeats``, where each group sends its few
alerts over and over as Alertmanager does (repeats, retries, HA peers), and ``changes``, where
every notification carries something new (a templated value in the summary), so the intake
must hand each one to its incident. The API runs in its own process (`astra-ops api`, outside
dev mode: it signs what it hands the incident), and so does the production worker (`astra-ops
worker`), so that the sender here does not take their CPU. The limit is the same count of
signal-with-start calls straight to Temporal from here, on a workflow that only counts signals,
served by a worker process of its own with the same converter and sandbox: no HTTP, no
authentication, no validation, no signature, no incident.

Printed per storm: notifications per second, incidents opened (one per group, however many
notifications and however concurrent), the signals the incidents took (a repeat the intake
knows it delivered within the minute takes none: starters/alert_repeats.py), and the seconds
from a group's first POST (or call) to its workflow's first completed task, the workflow
running, read from the server's history; the ratio of each storm's rate to the limit's; and the
CPU each process spent per notification. Alerts name no runbook, so no runbook runs: this
measures the intake, not the sandbox.

    .venv/bin/python bench/alert_storm.py [--notifications 10000] [--groups 100] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bare_workflow import Mailbox
from harness import (
    HttpConnections,
    WorkerProcess,
    cache_bytecode,
    child_named,
    cpu_seconds,
    dev_server,
    sandbox_cluster,
    scratch_database,
    wait_until_listening,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from runtime.identity import load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import ENV_PREFIX
from sandbox.servers.process import free_port
from starters.api import ALERTS_PATH
from workflows.incident_models import INCIDENT_WORKFLOW, incident_id_for_group

QUEUE = "bench-alert-storm"
BARE_QUEUE = f"{QUEUE}-bare"
TOKEN = "bench-alertmanager-token"
ALERTS_PER_GROUP = 3


def notifications(count: int, groups: int, run: str, changing: bool) -> list[dict[str, Any]]:
    """``count`` webhook payloads, round-robin over ``groups`` groups: repeats of each group's
    few alerts, or, ``changing``, each with a summary of its own (a templated value that moved),
    so that none is a repeat of an earlier one."""
    now = datetime.now(UTC).isoformat()
    payloads = []
    for i in range(count):
        group, alert = i % groups, (i // groups) % ALERTS_PER_GROUP
        labels = {
            "alertname": "AstraBenchStorm",
            "group": f"{run}-{group}",
            "instance": f"astra-{alert}",
            "severity": "SEV3",
            "component": "workers",
        }
        payloads.append(
            {
                "version": "4",
                "groupKey": f'{{}}:{{alertname="AstraBenchStorm", group="{run}-{group}"}}',
                "status": "firing",
                "receiver": "astra-ops",
                "groupLabels": {"alertname": "AstraBenchStorm", "group": f"{run}-{group}"},
                "commonLabels": {k: v for k, v in labels.items() if k != "instance"},
                "alerts": [
                    {
                        "status": "firing",
                        "fingerprint": f"{run}-{group}-{alert}",
                        "labels": labels,
                        "annotations": {
                            "summary": f"bench group {group} is storming"
                            + (f" ({i} so far)" if changing else "")
                        },
                        "startsAt": now,
                    }
                ],
            }
        )
    return payloads


Send = Callable[[dict[str, Any]], Awaitable[None]]


async def storm(
    payloads: list[dict[str, Any]], concurrency: int, send: Send
) -> tuple[float, dict[str, float]]:
    """Send every payload, ``concurrency`` at a time: seconds taken, and the wall-clock time
    each group's first send began."""
    first: dict[str, float] = {}
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)

    async def sender() -> None:
        while not queue.empty():
            payload = queue.get_nowait()
            first.setdefault(payload["groupKey"], time.time())
            await send(payload)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - started, first


async def running_after(client: Client, workflow_id: str, since: float) -> float:
    """Seconds from ``since`` (wall clock) to the workflow's first completed task, waiting for
    it (a backlog left by the storm may still be draining) up to a minute. One request every
    half second: reading histories as fast as possible would load the server under test."""
    deadline = time.monotonic() + 60
    while True:
        async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                return event.event_time.ToDatetime(UTC).timestamp() - since
        if time.monotonic() > deadline:
            history = client.get_workflow_handle(workflow_id).fetch_history_events()
            events = [EventType.Name(e.event_type)[11:] async for e in history]
            raise LookupError(f"{workflow_id} completed no workflow task within a minute: {events}")
        await asyncio.sleep(0.5)


async def signals_taken(client: Client, ids: list[str]) -> int:
    """How many signals the workflows' histories hold: what reached Temporal."""

    async def count(workflow_id: str) -> int:
        history = client.get_workflow_handle(workflow_id).fetch_history_events()
        signaled = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        return sum([event.event_type == signaled async for event in history])

    return sum(await asyncio.gather(*(count(i) for i in ids)))


async def latencies(client: Client, ids: dict[str, str], first: dict[str, float]) -> list[float]:
    """Each group's seconds to running, read one workflow at a time in the order the groups
    were first posted (the order their workflows run in): waiting on the last ones, not
    polling every workflow at once."""
    return sorted([await running_after(client, ids[g], first[g]) for g in first])


def line(label: str, count: int, seconds: float, waits: list[float]) -> str:
    p99 = waits[min(len(waits) - 1, round(0.99 * (len(waits) - 1)))]
    return (
        f"{label:<26} {count / seconds:8.0f} /s   ({count} in {seconds:.2f} s)   "
        f"to running: p50 {statistics.median(waits):.3f} s  p99 {p99:.3f} s"
    )


async def main(count: int, groups: int, concurrency: int) -> None:
    cache_bytecode()
    keys = new_key_line("bench")
    signing = new_signing_key_line("bench-api")
    signer = load_signer(signing)
    env = await dev_server(keys)
    run = uuid.uuid4().hex[:6]
    stack = AsyncExitStack()
    try:
        dsn = await stack.enter_async_context(scratch_database())
        with tempfile.TemporaryDirectory() as tmp:
            # The worker's Kubernetes client needs a cluster, though no runbook runs here.
            kube_url, _ = await stack.enter_async_context(sandbox_cluster())
            key_file = Path(tmp) / "signing.key"
            key_file.write_text(signing)
            env_of = {
                "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                "CODEC_KEYS": keys,
                "KUBE_URL": kube_url,
                "TASK_QUEUE": QUEUE,
                "DATABASE_URL": dsn,
                "SIGNING_KEY_FILE": str(key_file),
                "TRUSTED_KEYS": signer.public_line(),
                "POSTMORTEM_DIR": str(Path(tmp) / "postmortems"),
                "DEV_MODE": "false",
            }
            children = {**os.environ, **{f"{ENV_PREFIX}{k}": v for k, v in env_of.items()}}
            port = free_port()
            api = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "starters.cli",
                "api",
                env={
                    **children,
                    f"{ENV_PREFIX}API_PORT": str(port),
                    f"{ENV_PREFIX}ALERTMANAGER_TOKENS": f"{TOKEN}:alertmanager",
                },
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            workers = [
                WorkerProcess.astra_ops(children, Path(tmp) / "worker.log"),
                WorkerProcess.bare(
                    "Mailbox",
                    {**children, f"{ENV_PREFIX}TASK_QUEUE": BARE_QUEUE},
                    Path(tmp) / "bare-worker.log",
                ),
            ]
            try:
                await wait_until_listening(port)
                for worker in workers:
                    await worker.start()
                pids = {
                    "API": api.pid,
                    "worker": workers[0].pid,
                    "bare worker": workers[1].pid,
                    "Temporal": child_named("temporal"),
                    "sender": os.getpid(),
                }
                await report(env.client, port, count, groups, concurrency, run, pids)
            finally:
                for worker in workers:
                    await worker.stop()
                api.terminate()
                await api.wait()
    finally:
        await stack.aclose()
        await env.shutdown()


class Cpu:
    """CPU seconds each process spends over a phase, per notification."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = self.now()

    def now(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per notification since the start, by process."""
        end = self.now()
        return {name: 1000 * (end[name] - self.start[name]) / count for name in self.pids}


async def report(
    client: Client,
    port: int,
    count: int,
    groups: int,
    concurrency: int,
    run: str,
    pids: dict[str, int],
) -> None:
    async def posting(payloads: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
        # Connections of the storm's own: the API closes ones idle for 5 s (uvicorn's keep-alive).
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with HttpConnections(port, headers, concurrency) as http:

            async def post(payload: dict[str, Any]) -> None:
                status, answer = await http.post(ALERTS_PATH, payload)
                if not 200 <= status < 300:
                    raise RuntimeError(f"the webhook answered {status}: {answer.decode()}")

            return await storm(payloads, concurrency, post)

    print(f"{count} notifications over {groups} groups, {concurrency} at a time")
    phases = {"repeats": False, "changes": True}
    seconds: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {}
    for phase, changing in phases.items():
        payloads = notifications(count, groups, f"{run}-{phase}", changing)
        before = await client.count_workflows(f"WorkflowType = '{INCIDENT_WORKFLOW}'")
        spent = Cpu(pids)
        seconds[phase], first = await posting(payloads)
        incidents = {g: incident_id_for_group(g) for g in first}
        waits = await latencies(client, incidents, first)
        cpu[phase] = spent.per(count)
        after = await client.count_workflows(f"WorkflowType = '{INCIDENT_WORKFLOW}'")
        signals = await signals_taken(client, list(incidents.values()))
        print(line(f"alert webhook, {phase}", count, seconds[phase], waits))
        print(f"  incidents opened {after.count - before.count}, signals they took {signals}")

    payloads = notifications(count, groups, run, changing=False)
    mailboxes = {p["groupKey"]: f"mailbox/{incident_id_for_group(p['groupKey'])}" for p in payloads}

    async def signal_with_start(payload: dict[str, Any]) -> None:
        await client.start_workflow(
            Mailbox.run,
            id=mailboxes[payload["groupKey"]],
            task_queue=BARE_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal="post",
            start_signal_args=[payload],
        )

    spent = Cpu(pids)
    bare_seconds, bare_first = await storm(payloads, concurrency, signal_with_start)
    bare_waits = await latencies(client, mailboxes, bare_first)
    cpu["bare"] = spent.per(count)
    print(line("bare signal-with-start", count, bare_seconds, bare_waits))
    for phase in phases:
        print(f"ratio (webhook, {phase} / bare) {bare_seconds / seconds[phase]:8.2f}")
    print(f"CPU per notification, until all ran (ms){''.join(f'{c:>9}' for c in cpu)}")
    for name in pids:
        print(f"  {name:<38}{''.join(f'{cpu[c][name]:9.2f}' for c in cpu)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.notifications, args.groups, args.concurrency))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
