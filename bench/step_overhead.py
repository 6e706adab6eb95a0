"""What the step runner costs: Shard Scaling dry-runs vs a bare workflow of no-op activities.

Both run on one dev server in one process, the same number of activities per run, so the ratio
is what the runbook machinery (step records, search attributes, current details, summaries, real
sandbox reads) adds on top of Temporal itself. Target: ratio <= 1.3.

    .venv/bin/python bench/step_overhead.py [--runs 30] [--concurrency 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bare_workflow import Bare, no_op
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from runtime import search_attributes as sa
from runtime.client import data_converter
from runtime.keys import new_key_line
from runtime.settings import Settings
from workers.worker import running_worker
from workflows.shard_scaling import ShardScaling, ShardScalingRequest

QUEUE = "bench-step-overhead"
REQUESTER = "alice"  # a person the access policy lets start shard-scaling
SERVE_KUBE = """
import asyncio, sys
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
cluster = FakeCluster(rollout_seconds=float(sys.argv[2]))
for namespace in sys.argv[3:]:
    seed_astra(cluster, namespace=namespace)
asyncio.run(FakeKubeServer(cluster, port=int(sys.argv[1])).serve_forever())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def timed(runs: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    durations: list[float] = []

    async def run(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            await one(i)
            durations.append(time.perf_counter() - start)

    await asyncio.gather(*(run(i) for i in range(runs)))
    return durations


async def activities_per_scaling_run(client: Client, namespace: str) -> int:
    handle = await client.start_workflow(
        ShardScaling.run,
        ShardScalingRequest(requester=REQUESTER, shards=12, namespace=namespace, dry_run=True),
        id=f"shard-scaling/{namespace}/probe",
        task_queue=QUEUE,
    )
    await handle.result()
    history = await handle.fetch_history()
    return sum(1 for e in history.events if e.HasField("activity_task_scheduled_event_attributes"))


async def main(runs: int, concurrency: int) -> None:
    keys = new_key_line("bench")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=data_converter(Settings(codec_keys=keys)),
        search_attributes=sa.ALL,
        dev_server_log_level="error",
    )
    # Dry-runs change nothing, so every run can read the same namespace; one namespace keeps
    # the sandbox controller's own work (it reconciles every object each tick) out of the figure.
    namespace = "bench"
    port = free_port()
    # The cluster runs in its own process, as a real API server would: in this one it would
    # compete with the worker for the GIL and charge its own cost to the step runner.
    kube = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE_KUBE, str(port), "0.05", namespace
    )
    kube_url = f"http://127.0.0.1:{port}"
    await wait_until_listening(port)
    # Dev mode: the runs below are started unsigned, straight through the client.
    settings = Settings(codec_keys=keys, kube_url=kube_url, task_queue=QUEUE, dev_mode=True)
    client = env.client
    try:
        with ThreadPoolExecutor(16) as executor:
            scaling_worker = running_worker(client, settings, executor)
            bare_worker = Worker(
                client, task_queue=f"{QUEUE}-bare", workflows=[Bare], activities=[no_op]
            )
            async with scaling_worker, bare_worker:
                per_run = await activities_per_scaling_run(client, namespace)

                async def scaling(_: int) -> None:
                    handle = await client.start_workflow(
                        ShardScaling.run,
                        ShardScalingRequest(
                            requester=REQUESTER, shards=12, namespace=namespace, dry_run=True
                        ),
                        id=f"shard-scaling/{namespace}/{uuid.uuid4()}",
                        task_queue=QUEUE,
                    )
                    await handle.result()

                async def bare(_: int) -> None:
                    await client.execute_workflow(
                        Bare.run, per_run, id=f"bare/{uuid.uuid4()}", task_queue=f"{QUEUE}-bare"
                    )

                await timed(3, 3, bare)  # warm both paths before measuring
                wall = time.perf_counter()
                bare_times = await timed(runs, concurrency, bare)
                bare_wall = time.perf_counter() - wall
                wall = time.perf_counter()
                scaling_times = await timed(runs, concurrency, scaling)
                scaling_wall = time.perf_counter() - wall
    finally:
        kube.terminate()
        await kube.wait()
        await env.shutdown()

    print(f"runs: {runs}, concurrency: {concurrency}, activities per run: {per_run}")
    print(f"bare workflow:        wall {bare_wall:6.2f} s   median run "
          f"{statistics.median(bare_times) * 1000:7.1f} ms")  # fmt: skip
    print(f"shard-scaling dry-run: wall {scaling_wall:6.2f} s   median run "
          f"{statistics.median(scaling_times) * 1000:7.1f} ms")  # fmt: skip
    print(f"ratio (wall): {scaling_wall / bare_wall:.2f}   target <= 1.30")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.concurrency))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
