"""What runs waiting for a person cost: N Shard Scaling runs waiting for approval at once on one
worker, beside N runs of a workflow that only waits for a signal, in the same bench run.

Each kind gets its own worker process (the production `astra-ops worker`, outside dev mode,
with the default workflow cache; for the bare kind the same sandbox and converter serving only the
waiting workflow) on a dev server and sandbox cluster of the bench's own. For each kind it prints
the worker's resident memory idle and with all N runs waiting; the time to decide them all,
``--concurrency`` at a time, and the memory after; then, for N more runs, the same after a worker
restart, when the cache is empty and every decision replays its run.

Shard Scaling runs are decided through the CLI's code path (``starters.runs.Runs.decide``
as the API signs: describe, status query, the ``decide`` update and its validator). The decisions
are rejections: a decision takes the same path either way, and a rejected run ends at once, where
an approved one would go on to patch the sandbox's ConfigMap and restart two Deployments (N times
over), which would measure the cluster rather than the waiting. The bare runs get their signal.

    .venv/bin/python bench/waiting_runs.py [--runs 10000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bare_workflow import WaitForSignal
from harness import (
    WorkerProcess,
    cache_bytecode,
    dev_server,
    rss_bytes,
    sandbox_cluster,
    until_idle,
)
from temporalio.client import Client
from temporalio.worker import Worker

from runtime.access import load_policy
from runtime.identity import load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import REPO_ROOT
from starters.run_views import DecisionRefused
from starters.runs import Runs
from workflows.models import Decision
from workflows.shard_scaling import ShardScaling, ShardScalingRequest

QUEUE = "bench-waiting-runs"
BARE_QUEUE = f"{QUEUE}-bare"
STARTS_AT_ONCE = 100
MIB = 1024 * 1024
# Runs a worker keeps in memory unless told otherwise (the SDK's default, which astra-ops keeps).
CACHE: int = inspect.signature(Worker).parameters["max_cached_workflows"].default


@dataclass
class Kind:
    """One kind of waiting run: how to start one, decide one, and count those left open."""

    name: str
    worker: WorkerProcess
    start: Callable[[str], Awaitable[None]]
    decide: Callable[[str], Awaitable[None]]
    waiting: str
    """visibility query: the runs of this kind that wait (for the bare kind: that are open)"""
    open: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    """(label, value) rows, in the same order for every kind"""


async def count(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def until_count(client: Client, query: str, expected: int) -> None:
    while True:
        if await count(client, query) == expected:
            return
        await asyncio.sleep(0.5)


async def bounded(
    items: list[str], at_once: int, each: Callable[[str], Awaitable[None]]
) -> list[float]:
    """Call ``each`` on every item, ``at_once`` at a time; the seconds each call took."""
    gate = asyncio.Semaphore(at_once)
    took: list[float] = []

    async def one(item: str) -> None:
        async with gate:
            start = time.perf_counter()
            await each(item)
            took.append(time.perf_counter() - start)

    await asyncio.gather(*(one(item) for item in items))
    return took


def mib(rss: int) -> str:
    return f"{rss / MIB:.0f} MiB"


async def wait_all(client: Client, kind: Kind, ids: list[str]) -> float:
    """Start ``ids``; the seconds until all of them wait and the worker has gone quiet."""
    start = time.perf_counter()
    await bounded(ids, STARTS_AT_ONCE, kind.start)
    await until_count(client, kind.waiting, len(ids))
    await until_idle(kind.worker.pid)
    return time.perf_counter() - start


async def decide_all(client: Client, kind: Kind, ids: list[str], at_once: int, label: str) -> None:
    """Decide every run, retrying those that did not answer the status query in time (as a
    person would: nothing was sent to them); add the time it took, and how many were retried,
    to the kind's figures."""
    unanswered = 0

    async def decide(workflow_id: str) -> None:
        nonlocal unanswered
        while True:
            try:
                return await kind.decide(workflow_id)
            except DecisionRefused as err:
                if "does not answer" not in str(err):
                    raise
                unanswered += 1

    start = time.perf_counter()
    took = await bounded(ids, at_once, decide)
    returned = time.perf_counter() - start
    await until_count(client, kind.open, 0)
    closed = time.perf_counter() - start
    kind.figures.append((f"{label}: until every call returned", f"{returned:.1f} s"))
    kind.figures.append(("  median call", f"{statistics.median(took) * 1000:.0f} ms"))
    kind.figures.append(("  until every run ended", f"{closed:.1f} s"))
    kind.figures.append(("  status queries that timed out (retried)", str(unanswered)))


async def measure(client: Client, kind: Kind, runs: int, at_once: int) -> None:
    """The kind's figures: memory idle and waiting, deciding warm, then after a restart."""
    await kind.worker.start()
    idle = rss_bytes(kind.worker.pid)
    kind.figures.append(("worker RSS, idle", mib(idle)))
    first = [f"{kind.name}/first-{i}" for i in range(runs)]
    took = await wait_all(client, kind, first)
    kind.figures.append((f"start {runs} runs until all wait", f"{took:.1f} s"))
    waiting = rss_bytes(kind.worker.pid)
    kind.figures.append((f"worker RSS, {runs} runs waiting", mib(waiting)))
    per_run = (waiting - idle) / min(runs, CACHE) / 1024
    kind.figures.append(("  beyond idle, per run in the cache", f"{per_run:.0f} KiB"))
    await decide_all(client, kind, first, at_once, "decide all")
    kind.figures.append(("worker RSS, all decided", mib(rss_bytes(kind.worker.pid))))

    second = [f"{kind.name}/second-{i}" for i in range(runs)]
    await wait_all(client, kind, second)
    await kind.worker.stop()
    await kind.worker.start()
    restarted = rss_bytes(kind.worker.pid)
    kind.figures.append((f"worker RSS, restarted, {runs} new runs waiting", mib(restarted)))
    await decide_all(client, kind, second, at_once, "decide all, each replaying its run")
    decided = rss_bytes(kind.worker.pid)
    kind.figures.append(("worker RSS, all decided after the restart", mib(decided)))


async def main(runs: int, at_once: int) -> None:
    cache_bytecode()
    keys = new_key_line("bench")
    signer = load_signer(new_signing_key_line("bench-api"))
    policy = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml")
    env = await dev_server(keys)
    client = env.client
    namespace = "bench"
    scaling_runs = Runs(client, QUEUE, policy, signer)
    logs = Path(tempfile.mkdtemp(prefix="astra-ops-bench-waiting-"))
    try:
        async with sandbox_cluster(namespace) as (kube_url, _):
            worker_env = {
                **os.environ,
                "ASTRA_OPS_TEMPORAL_ADDRESS": client.service_client.config.target_host,
                "ASTRA_OPS_CODEC_KEYS": keys,
                "ASTRA_OPS_TRUSTED_KEYS": signer.public_line(),
                "ASTRA_OPS_KUBE_URL": kube_url,
                "ASTRA_OPS_DEV_MODE": "false",
            }

            async def start_scaling(workflow_id: str) -> None:
                request = ShardScalingRequest(
                    requester="alice", reason="waiting runs bench", shards=12, namespace=namespace
                )
                await client.start_workflow(
                    ShardScaling.run,
                    request.signed_by(signer, workflow_id),
                    id=workflow_id,
                    task_queue=QUEUE,
                )

            async def decide_scaling(workflow_id: str) -> None:
                await scaling_runs.decide(
                    workflow_id, Decision(approver="bob", decision="reject", comment="bench")
                )

            async def start_bare(workflow_id: str) -> None:
                await client.start_workflow(
                    WaitForSignal.run, id=workflow_id, task_queue=BARE_QUEUE
                )

            async def release(workflow_id: str) -> None:
                await client.get_workflow_handle(workflow_id).signal(WaitForSignal.release)

            def on_queue(queue: str) -> str:
                return f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"

            kinds = [
                Kind(
                    name="shard-scaling",
                    worker=WorkerProcess.astra_ops(
                        {**worker_env, "ASTRA_OPS_TASK_QUEUE": QUEUE},
                        logs / "shard-scaling-worker.log",
                    ),
                    start=start_scaling,
                    decide=decide_scaling,
                    waiting=f"{on_queue(QUEUE)} AND AstraAwaitingApproval = true",
                    open=on_queue(QUEUE),
                ),
                Kind(
                    name="wait-for-signal",
                    worker=WorkerProcess.bare(
                        "WaitForSignal",
                        {**worker_env, "ASTRA_OPS_TASK_QUEUE": BARE_QUEUE},
                        logs / "bare-worker.log",
                    ),
                    start=start_bare,
                    decide=release,
                    waiting=on_queue(BARE_QUEUE),
                    open=on_queue(BARE_QUEUE),
                ),
            ]
            for kind in kinds:
                try:
                    await measure(client, kind, runs, at_once)
                finally:
                    await kind.worker.stop()
    finally:
        await env.shutdown()

    print(
        f"{runs} runs waiting at once on one worker (default workflow cache: {CACHE} runs), "
        f"decided {at_once} at a time: Shard Scaling through Runs.decide (signed, rejecting), "
        "the bare kind by signal"
    )
    print(f"{'':<62}{kinds[0].name:>16}{kinds[1].name:>18}")
    for (label, scaling), (_, bare) in zip(kinds[0].figures, kinds[1].figures, strict=True):
        print(f"{label:<62}{scaling:>16}{bare:>18}")
    print(f"worker logs: {logs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000, help="runs of each kind waiting at once")
    parser.add_argument("--concurrency", type=int, default=50, help="decisions in flight at once")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.concurrency))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
