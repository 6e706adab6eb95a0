"""Recovery after the worker dies mid-run: Shard Scaling runs whose worker is SIGKILLed at a
random step, a new worker started at once, against the same run without a kill.

Each trial starts a run in a namespace of its own on the sandbox cluster (rollouts take
``--rollout-seconds``), approves it as soon as it asks, and kills the worker at one step drawn at
random from the steps a run takes (``--steps`` narrows the draw):

- an activity step: the worker (sandbox/dying_worker.py) kills its own process at a random moment
  of the activity's first attempt, between its start and as long as the step took in a run
  without a kill; an activity that ends first dies right after, before the worker reports its
  result (its effect happened and Temporal does not know);
- the approval: the bench kills the worker while the run waits for a person, and decides once
  the new worker polls.

The new worker starts as soon as the old one is gone (its imports and connection take seconds,
printed as 'polling'). From the new worker's first poll the bench measures, from the run's
history, when the run resumed (the first event the new worker wrote) and when it completed; and,
on the cluster, how often each Deployment was restarted (its ReplicaSet revisions): once,
whatever the kill. Printed beside them: the same run without a kill, start to
end and from the killed step's start to the end, so that what a kill adds shows as the
difference. Figures are printed, never asserted (the target, a resume within 15 s of the new
worker polling, is printed beside them).

    .venv/bin/python bench/recovery.py [--trials 13] [--steps "restart astra-worker,..."]
        [--seed 1] [--baseline-runs 3] [--rollout-seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from inspect import isawaitable
from pathlib import Path
from typing import Any

from harness import cache_bytecode, dev_server, sandbox_cluster
from kubernetes.client import AppsV1Api
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.service import RPCError

from activities.kube_annotations import REVISION
from activities.kubernetes import unauthenticated_client
from runtime.access import load_policy
from runtime.identity import Signer, load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import ENV_PREFIX, REPO_ROOT
from sandbox.dying_worker import DYING, KILL_AT, POLLING, Trap
from starters.run_views import DecisionRefused
from starters.runs import Runs
from workflows.models import Decision, RunbookResult, RunStatus

QUEUE = "bench-recovery"
APPROVAL = "approve scaling"
DEPLOYMENTS = ("astra-scheduler", "astra-worker")
TARGET_RESUME_SECONDS = 15.0
RUN_DEADLINE = 600.0
"""Seconds a run may take before the bench gives up on it (a stall past every timeout)."""


@dataclass(frozen=True)
class Step:
    """A step a run takes, as a run without a kill took it."""

    name: str
    activity_id: str | None
    """Its activity's id in the run; None for the approval, where no activity runs."""
    seconds: float
    """How long its activity took, scheduled to completed."""
    remaining: float
    """From the step's start to the run's end."""


@dataclass(frozen=True)
class Trial:
    step: Step
    died: str
    polling: float
    """The kill -> the new worker polling (its start: the process, its imports, its connection)."""
    resumed: float | None
    """New worker polling -> the first event it wrote in the run's history."""
    completed: float
    """New worker polling -> the run completed."""
    restarts: dict[str, int]
    outcome: str


@dataclass
class WorkerProcess:
    """A worker process of sandbox/dying_worker.py, and its log."""

    process: asyncio.subprocess.Process
    log: Path

    def said(self, marker: str) -> str | None:
        """The rest of the first line of its log after ``marker``, if written yet."""
        for line in self.log.read_text().splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
        return None

    async def polling_since(self) -> float:
        """The epoch time it began to poll, as it logged it."""
        await until(lambda: self.said(POLLING) is not None, 120, f"the worker of {self.log} polls")
        return float(self.said(POLLING) or "nan")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()


class Bench:
    """The signed runs, the sandbox cluster's Deployments and the worker processes."""

    def __init__(self, client: Client, env: dict[str, str], signer: Signer, logs: Path) -> None:
        self.client, self.env, self.logs = client, env, logs
        policy = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml")
        self.runs = Runs(client, QUEUE, policy, signer)
        self.apps = AppsV1Api(unauthenticated_client(env[f"{ENV_PREFIX}KUBE_URL"]))
        self.workers = 0

    async def worker(self, trap: Trap | None = None) -> WorkerProcess:
        """A worker process, started (polling once :meth:`WorkerProcess.polling_since` says)."""
        self.workers += 1
        env = {**self.env, **({KILL_AT: trap.encode()} if trap else {})}
        log = self.logs / f"worker-{self.workers}.log"
        with log.open("a") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sandbox.dying_worker", env=env, stdout=out, stderr=out
            )
        return WorkerProcess(process, log)

    async def start(self, namespace: str) -> WorkflowHandle[Any, RunbookResult]:
        started = await self.runs.start(
            "shard-scaling",
            {"shards": 12, "namespace": namespace},
            requester="alice",
            reason="recovery bench",
        )
        return self.client.get_workflow_handle(started.run_id, result_type=RunbookResult)

    async def approve(self, handle: WorkflowHandle[Any, RunbookResult]) -> None:
        """Approve as bob once the run asks; a decision while no worker runs the run (the
        worker was killed meanwhile) is refused as unanswered, and made again."""

        async def decided() -> bool:
            if not await asking(handle):
                return False
            await self.runs.decide(handle.id, Decision(approver="bob", comment="recovery bench"))
            return True

        await until(decided, RUN_DEADLINE, f"{handle.id} approved")

    def restarts(self, namespace: str) -> dict[str, int]:
        """How often each Deployment was restarted: its ReplicaSet revisions past the seed's."""
        restarts = {}
        for name in DEPLOYMENTS:
            deployment: Any = self.apps.read_namespaced_deployment(name, namespace)
            restarts[name] = int(deployment.metadata.annotations[REVISION]) - 1
        return restarts


async def asking(handle: WorkflowHandle[Any, RunbookResult]) -> bool:
    """Whether the run waits for its approval (its status answers once a worker runs it)."""
    status: RunStatus = await handle.query("status", result_type=RunStatus)
    return any(p.step == APPROVAL for p in status.pending_approvals)


async def until(
    holds: Callable[[], bool | Awaitable[bool]], seconds: float, what: str, every: float = 0.05
) -> None:
    """Poll ``holds`` until it is true; a query or decision that finds no worker yet counts as
    not yet."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = holds()
            if await result if isawaitable(result) else result:
                return
        except (RPCError, DecisionRefused):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:g} s")
        await asyncio.sleep(every)


def event_time(event: Any) -> float:
    return float(event.event_time.ToNanoseconds() / 1e9)


def identity_of(event: Any) -> str:
    """The worker identity an event names (task started or completed events), or ''."""
    attributes = getattr(event, event.WhichOneof("attributes"))
    return str(getattr(attributes, "identity", ""))


async def steps_of(client: Client, history: WorkflowHistory) -> list[Step]:
    """The steps a run without a kill took: its activities (named by their summaries) and the
    approval, with how long each took and what was left of the run from its start."""
    end = event_time(history.events[-1])
    scheduled: dict[int, tuple[str, str, float]] = {}
    steps = []
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            [summary] = await client.data_converter.decode([event.user_metadata.summary])
            scheduled[event.event_id] = (str(summary), attributes.activity_id, event_time(event))
        elif event.HasField("activity_task_completed_event_attributes"):
            name, activity_id, at = scheduled[
                event.activity_task_completed_event_attributes.scheduled_event_id
            ]
            steps.append(Step(name, activity_id, event_time(event) - at, end - at))
        elif event.HasField("workflow_execution_update_accepted_event_attributes"):
            steps.append(Step(APPROVAL, None, 0.0, end - event_time(event)))
    return steps


async def baseline(bench: Bench, runs: int) -> tuple[list[float], list[Step]]:
    """Runs without a kill: their durations, start to end, and the steps of the first."""
    worker = await bench.worker()
    durations: list[float] = []
    steps: list[Step] = []
    try:
        await worker.polling_since()
        for number in range(1, runs + 1):
            handle = await bench.start(f"base-{number}")
            await bench.approve(handle)
            await asyncio.wait_for(handle.result(), RUN_DEADLINE)
            history = await handle.fetch_history()
            durations.append(event_time(history.events[-1]) - event_time(history.events[0]))
            if not steps:
                steps = await steps_of(bench.client, history)
    finally:
        await worker.stop()
    return durations, steps


async def trial(bench: Bench, number: int, step: Step, rng: random.Random) -> Trial:
    namespace = f"kill-{number}"
    workflow_id = f"shard-scaling/{namespace}"
    trap = (
        Trap(workflow_id, step.activity_id, rng.uniform(0, step.seconds))
        if step.activity_id is not None
        else None
    )
    first = await bench.worker(trap)
    second: WorkerProcess | None = None
    try:
        await first.polling_since()
        handle = await bench.start(namespace)
        if trap is None:
            await until(lambda: asking(handle), RUN_DEADLINE, f"{workflow_id} asks for approval")
            first.process.kill()
            await first.process.wait()
            killed = time.time()
            second = await bench.worker()
            since = await second.polling_since()
            await bench.approve(handle)
            died = "while the run waited for approval"
        else:
            approving = asyncio.create_task(bench.approve(handle))
            ended = asyncio.create_task(handle.result())
            exited = asyncio.create_task(first.process.wait())
            await asyncio.wait({ended, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                exited.cancel()
                raise RuntimeError(
                    f"{workflow_id} ended and its worker never reached the trap at activity "
                    f"{step.activity_id} ('{step.name}'): {ended.result()}"
                )
            killed = time.time()
            second = await bench.worker()
            since = await second.polling_since()
            await approving
            died = first.said(DYING) or f"exited {first.process.returncode}"
        result = await asyncio.wait_for(handle.result(), RUN_DEADLINE)
        history = await handle.fetch_history()
    finally:
        for worker in (first, second):
            if worker is not None:
                await worker.stop()
    assert second is not None
    mine = f"{second.process.pid}@"
    resumed = [event_time(e) for e in history.events if identity_of(e).startswith(mine)]
    return Trial(
        step=step,
        died=died,
        polling=since - killed,
        resumed=min(resumed) - since if resumed else None,
        completed=event_time(history.events[-1]) - since,
        restarts=await asyncio.to_thread(bench.restarts, namespace),
        outcome=result.outcome.value,
    )


def print_report(
    durations: list[float], trials: list[Trial], rollout_seconds: float, logs: Path
) -> None:
    print(
        f"\nShard Scaling, worker SIGKILLed at a random step, a new worker started at once; "
        f"{len(trials)} trials; sandbox rollouts take {rollout_seconds:g} s"
    )
    print(
        f"{'trial':<6}{'killed at step':<42}{'polling s':>10}{'resumed s':>10}{'completed s':>12}"
        f"{'unkilled s':>11}{'extra s':>9}  restarts  outcome; where it died"
    )
    for number, t in enumerate(trials, 1):
        resumed_text = f"{t.resumed:.1f}" if t.resumed is not None else "-"
        restarts = ",".join(str(t.restarts[d]) for d in DEPLOYMENTS)
        print(
            f"{number:<6}{t.step.name:<42}{t.polling:>10.1f}{resumed_text:>10}{t.completed:>12.1f}"
            f"{t.step.remaining:>11.1f}{t.completed - t.step.remaining:>+9.1f}  {restarts:<8}  "
            f"{t.outcome}; {t.died}"
        )
    resumed = [t.resumed for t in trials if t.resumed is not None]
    completed = [t.completed for t in trials]
    extra = [t.completed - t.step.remaining for t in trials]
    once = sum(all(n == 1 for n in t.restarts.values()) for t in trials)
    print(
        "\n'polling': from the kill to the new worker's first poll; 'resumed' and 'completed' "
        "count from that poll; 'unkilled' is what was left of a run without a kill from the "
        "killed step's start; 'extra' the difference"
    )
    print(f"{'':<44}{'median':>8}{'max':>8}")
    for label, values in (
        ("kill -> new worker polling", [t.polling for t in trials]),
        ("new worker polling -> run resumed", resumed),
        ("new worker polling -> run completed", completed),
        ("extra time, beside the run without a kill", extra),
    ):
        if values:
            print(f"{label:<44}{statistics.median(values):>8.1f}{max(values):>8.1f}")
    print(
        f"the same run without a kill, start to end ({len(durations)} runs): median "
        f"{statistics.median(durations):.1f} s, max {max(durations):.1f} s"
    )
    within = sum(r <= TARGET_RESUME_SECONDS for r in resumed)
    print(f"resumed within {TARGET_RESUME_SECONDS:g} s of the new worker: {within}/{len(trials)}")
    print(f"every Deployment restarted exactly once: {once}/{len(trials)}")
    print(f"worker logs: {logs}")


async def main(
    trials: int, names: list[str] | None, seed: int, baseline_runs: int, rollout_seconds: float
) -> None:
    cache_bytecode()
    rng = random.Random(seed)
    keys = new_key_line("bench")
    signer = load_signer(new_signing_key_line("bench-api"))
    logs = Path(tempfile.mkdtemp(prefix="astra-ops-bench-recovery-"))
    env = await dev_server(keys)
    namespaces = [f"base-{n}" for n in range(1, baseline_runs + 1)]
    namespaces += [f"kill-{n}" for n in range(1, trials + 1)]
    try:
        async with sandbox_cluster(*namespaces, rollout_seconds=rollout_seconds) as (kube_url, _):
            settings = {
                "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                "CODEC_KEYS": keys,
                "TRUSTED_KEYS": signer.public_line(),
                "KUBE_URL": kube_url,
                "TASK_QUEUE": QUEUE,
                "DEV_MODE": "false",
            }
            worker_env = {**os.environ, **{f"{ENV_PREFIX}{k}": v for k, v in settings.items()}}
            bench = Bench(env.client, worker_env, signer, logs)
            durations, steps = await baseline(bench, baseline_runs)
            if names:
                if unknown := set(names) - {s.name for s in steps}:
                    raise SystemExit(
                        f"no step {', '.join(sorted(unknown))}; a run takes: "
                        + ", ".join(s.name for s in steps)
                    )
                steps = [s for s in steps if s.name in names]
            results = []
            for number in range(1, trials + 1):
                result = await trial(bench, number, rng.choice(steps), rng)
                results.append(result)
                print(
                    f"trial {number}/{trials}: killed at '{result.step.name}' ({result.died}); "
                    f"completed {result.completed:.1f} s after the new worker polled",
                    flush=True,
                )
    finally:
        await env.shutdown()
    print_report(durations, results, rollout_seconds, logs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=13, help="runs with a kill (default 13)")
    parser.add_argument(
        "--steps",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="draw the step to kill at from these only (comma-separated step names)",
    )
    parser.add_argument("--seed", type=int, default=1, help="of the random draws (default 1)")
    parser.add_argument(
        "--baseline-runs", type=int, default=3, help="runs without a kill (default 3)"
    )
    parser.add_argument(
        "--rollout-seconds", type=float, default=2.0,
        help="how long the sandbox takes to roll a Deployment (default 2, as `astra-ops dev`)",
    )  # fmt: skip
    args = parser.parse_args()
    asyncio.run(main(args.trials, args.steps, args.seed, args.baseline_runs, args.rollout_seconds))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
