"""What the step runner costs: Shard Scaling dry-runs against a bare workflow making the same calls.

The bare workflow repeats the activity calls a Shard Scaling dry-run made, read from that run's
history: the same activities with the same inputs and timeouts, run by the same worker's activity
instances against the same sandbox cluster. What is left between the two is the runner's own
work: admission, step records, search attributes, current details, activity summaries, and the
larger workflow code the sandbox loads for each run. Both run in production mode (starts signed
as the API signs them), in alternating rounds, so that load from elsewhere on the machine falls
on both alike.

Besides both timings and their ratio it prints where the difference goes: the CPU each process
spent per run (worker, Temporal dev server, sandbox cluster); from each run's history, activity
time, workflow-task wait and processing time (the first task, which loads the workflow's modules,
on its own line) and the events of each kind that differ (search-attribute upserts among them);
and the current-details updates per run (these leave no event). Target: ratio <= 1.15.

    .venv/bin/python bench/step_overhead.py [--runs 30] [--concurrency 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from activity_calls import ActivityCall, activity_calls
from bare_workflow import Bare
from harness import cache_bytecode, child_named, cpu_seconds, dev_server, sandbox_cluster
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Worker

from runtime.identity import Signer, load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import Settings
from workers.worker import running_worker
from workflows.shard_scaling import ShardScaling, ShardScalingRequest

QUEUE = "bench-step-overhead"
BARE_QUEUE = f"{QUEUE}-bare"
TARGET = 1.15
DETAILS_UPDATES: Counter[str] = Counter()
"""Current-details updates by workflow id (first executions only, not replays)."""


def count_details_updates() -> None:
    """Count each run's current-details updates where the SDK receives them: they leave no
    event in history. ``temporalio.workflow`` is passed through to the workflow sandbox, so the
    runs call the very function replaced here."""
    set_current_details = workflow.set_current_details

    def counted(description: str) -> None:
        if not workflow.unsafe.is_replaying():
            DETAILS_UPDATES[workflow.info().workflow_id] += 1
        set_current_details(description)

    workflow.set_current_details = counted


@dataclass
class Batch:
    """One kind of run over every round: the time and CPU it took, each run's id and time."""

    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    runs: list[tuple[str, float]] = field(default_factory=list)

    def per_run(self, total: float) -> float:
        return total / len(self.runs)


@dataclass
class Process:
    """A process whose CPU time is measured, and the CPU it spends idle (per second)."""

    pid: int
    idle: float = 0.0


async def idle_rates(processes: dict[str, Process], seconds: float = 3.0) -> None:
    """Measure what each process spends with no run going (the sandbox cluster's controller
    ticks on its own), so that a kind of run that lasts longer is not charged for it."""
    before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    await asyncio.sleep(seconds)
    for name, p in processes.items():
        p.idle = (cpu_seconds(p.pid) - before[name]) / seconds


async def timed(
    batch: Batch,
    runs: int,
    concurrency: int,
    one: Callable[[], Awaitable[str]],
    processes: dict[str, Process],
) -> None:
    """Run ``one`` ``runs`` times, ``concurrency`` at a time; add the wall time and the CPU time
    ``processes`` spent beyond idle to ``batch``."""
    gate = asyncio.Semaphore(concurrency)

    async def run() -> None:
        async with gate:
            start = time.perf_counter()
            workflow_id = await one()
            batch.runs.append((workflow_id, time.perf_counter() - start))

    cpu = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    start = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(runs)))
    wall = time.perf_counter() - start
    batch.wall += wall
    for name, p in processes.items():
        spent = cpu_seconds(p.pid) - cpu[name] - p.idle * wall
        batch.cpu[name] = batch.cpu.get(name, 0.0) + spent


@dataclass
class Profile:
    """Where one run's time went, read from its history (the server's timestamps)."""

    events: Counter[str]
    run: float
    activities: float
    """activity tasks, scheduled until completed"""
    task_wait: float
    """workflow tasks, scheduled until a worker took them"""
    task_work: float
    """workflow tasks, taken until completed: the worker's processing and its reply"""
    first_task_work: float


def profile(history: WorkflowHistory) -> Profile:
    events: Counter[str] = Counter()
    at: dict[int, float] = {}
    activities, task_wait, task_work = [], [], []
    for event in history.events:
        events[EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()] += 1
        at[event.event_id] = now = event.event_time.ToNanoseconds() / 1e9
        if event.HasField("activity_task_completed_event_attributes"):
            scheduled = event.activity_task_completed_event_attributes.scheduled_event_id
            activities.append(now - at[scheduled])
        elif event.HasField("workflow_task_started_event_attributes"):
            scheduled = event.workflow_task_started_event_attributes.scheduled_event_id
            task_wait.append(now - at[scheduled])
        elif event.HasField("workflow_task_completed_event_attributes"):
            started = event.workflow_task_completed_event_attributes.started_event_id
            task_work.append(now - at[started])
    return Profile(
        events=events,
        run=at[history.events[-1].event_id] - at[history.events[0].event_id],
        activities=sum(activities),
        task_wait=sum(task_wait),
        task_work=sum(task_work),
        first_task_work=task_work[0],
    )


async def profiles(client: Client, batch: Batch) -> list[Profile]:
    gate = asyncio.Semaphore(20)

    async def one(workflow_id: str) -> Profile:
        async with gate:
            return profile(await client.get_workflow_handle(workflow_id).fetch_history())

    return list(await asyncio.gather(*(one(workflow_id) for workflow_id, _ in batch.runs)))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def row(
    label: str, bare: float, scaling: float, unit: str = "", scale: float = 1.0, digits: int = 1
) -> str:
    b, s = bare * scale, scaling * scale
    return f"{label:<50}{b:>9.{digits}f}{s:>15.{digits}f}{s - b:>+12.{digits}f} {unit}".rstrip()


def report(
    bare: Batch,
    scaling: Batch,
    bare_runs: list[Profile],
    scaling_runs: list[Profile],
) -> None:
    def per_run(of: Callable[[Profile], float]) -> tuple[float, float]:
        return mean([of(p) for p in bare_runs]), mean([of(p) for p in scaling_runs])

    print(f"{'':<50}{'bare':>9}{'shard-scaling':>15}{'difference':>12}")
    print(row("wall time, all runs", bare.wall, scaling.wall, "s", digits=2))
    print(
        row(
            "median run, as the client waits",
            statistics.median(t for _, t in bare.runs),
            statistics.median(t for _, t in scaling.runs),
            "ms",
            1000,
        )
    )
    print("CPU per run, beyond what each process spends idle")
    for name in bare.cpu:
        print(
            row(
                f"  {name}",
                bare.per_run(bare.cpu[name]),
                scaling.per_run(scaling.cpu[name]),
                "ms",
                1000,
            )
        )
    print("per run, from its history (mean)")
    for label, of in (
        ("  run, first event to last", lambda p: p.run),
        ("    activities, scheduled to completed", lambda p: p.activities),
        ("    workflow tasks, waiting for the worker", lambda p: p.task_wait),
        ("    workflow tasks, the worker processing them", lambda p: p.task_work),
        ("      first task (loads the workflow's modules)", lambda p: p.first_task_work),
    ):
        print(row(label, *per_run(of), "ms", 1000))
    print("history events per run, of the kinds that differ")
    for kind in sorted({k for p in bare_runs + scaling_runs for k in p.events}):
        bare_count = mean([p.events[kind] for p in bare_runs])
        scaling_count = mean([p.events[kind] for p in scaling_runs])
        if bare_count != scaling_count:
            print(row(f"  {kind}", bare_count, scaling_count))
    details = [DETAILS_UPDATES[workflow_id] for workflow_id, _ in scaling.runs]
    print(row("current-details updates per run (no event)", 0, mean(details)))
    ratio = scaling.wall / bare.wall
    cpu_ratio = sum(scaling.cpu.values()) / sum(bare.cpu.values())
    print(
        f"ratio (wall): {ratio:.2f}, target <= {TARGET}"
        f"{'' if ratio <= TARGET else ' (ABOVE TARGET)'}; CPU of all three processes: "
        f"{cpu_ratio:.2f}"
    )


async def compare(
    client: Client,
    signer: Signer,
    namespace: str,
    processes: dict[str, Process],
    runs: int,
    concurrency: int,
    rounds: int,
) -> tuple[list[ActivityCall], Batch, Batch]:
    """Both kinds in alternating rounds: the calls both made, then the bare and the runbook
    batch."""

    async def scaling_run() -> str:
        workflow_id = f"shard-scaling/{namespace}/{uuid.uuid4()}"
        request = ShardScalingRequest(
            requester="alice", reason="step overhead bench", shards=12, namespace=namespace,
            dry_run=True,
        )  # fmt: skip
        handle = await client.start_workflow(
            ShardScaling.run,
            request.signed_by(signer, workflow_id),
            id=workflow_id,
            task_queue=QUEUE,
        )
        await handle.result()
        return workflow_id

    probe = client.get_workflow_handle(await scaling_run())
    calls = await activity_calls(client, await probe.fetch_history())

    async def bare_run() -> str:
        workflow_id = f"bare/{uuid.uuid4()}"
        await client.execute_workflow(Bare.run, calls, id=workflow_id, task_queue=BARE_QUEUE)
        return workflow_id

    await timed(Batch(), 3, 3, bare_run, processes)  # warm both paths before measuring
    await timed(Batch(), 3, 3, scaling_run, processes)
    bare, scaling = Batch(), Batch()
    for _ in range(rounds):
        await timed(bare, runs // rounds, concurrency, bare_run, processes)
        await timed(scaling, runs // rounds, concurrency, scaling_run, processes)
    return calls, bare, scaling


async def main(runs: int, concurrency: int, rounds: int) -> None:
    cache_bytecode()
    count_details_updates()
    keys = new_key_line("bench")
    signer = load_signer(new_signing_key_line("bench-api"))
    env = await dev_server(keys)
    # Dry-runs change nothing, so every run can read the same namespace; one namespace keeps
    # the sandbox controller's own work (it reconciles every object each tick) out of the figure.
    namespace = "bench"
    client = env.client
    try:
        async with sandbox_cluster(namespace) as (kube_url, kube_pid):
            settings = Settings(
                codec_keys=keys,
                kube_url=kube_url,
                task_queue=QUEUE,
                trusted_keys=signer.public_line(),
            )
            processes = {
                "this process (worker and client)": Process(os.getpid()),
                "Temporal dev server": Process(child_named("temporal")),
                "sandbox cluster": Process(kube_pid),
            }
            await idle_rates(processes)
            with ThreadPoolExecutor(16) as executor:
                async with running_worker(client, settings, executor) as runbooks:
                    # The runbook worker's very configuration (activity instances and their
                    # clients, executor, workflow sandbox) on a queue of its own, with the bare
                    # workflow only: its activities then run on the queue it polls, as a
                    # runbook's do (eagerly).
                    config = runbooks.config()
                    config["task_queue"] = BARE_QUEUE
                    config["workflows"] = [Bare]
                    async with Worker(**config):
                        calls, bare, scaling = await compare(
                            client, signer, namespace, processes, runs, concurrency, rounds
                        )
        bare_profiles = await profiles(client, bare)
        scaling_profiles = await profiles(client, scaling)
    finally:
        await env.shutdown()

    print(
        f"Shard Scaling dry-runs against a bare workflow making the same {len(calls)} activity "
        f"calls ({', '.join(c.activity for c in calls)})"
    )
    print(
        f"{len(bare.runs)} runs of each in {rounds} alternating rounds, {concurrency} at a time, "
        "one worker, one sandbox cluster, starts signed"
    )
    report(bare, scaling, bare_profiles, scaling_profiles)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each kind")
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each kind")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.concurrency, args.rounds))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
