"""Proof by fault injection (`make proof`): runs whose worker, server or target fails mid-run,
and what the targets say afterwards.

Four kinds of trial, each a Shard Scaling run on a namespace of its own on the sandbox cluster.
`make proof` runs the tests marked slow first, which prove the rest on the whole sandbox Astra:
worker kills at a random activity of every other runbook (Worker Lost, Dead-letter Repair, High
Error Rate, LLM Cost Spike, Vault Setup, TLS Rotation, Canary and Blue-Green Upgrade, Postgres
Outage and Redis Failure: tests/test_kill_anywhere.py, whose outcomes bench/report.py reads from
bench/proof-tests.xml), the dev server down through a canary window and an escalation's ack
wait, and PostgreSQL and Redis dropped mid-activity (tests/test_target_faults.py).

- ``worker``: bench/recovery.py's trial, ``--trials`` times (``PROOF_TRIALS``, default 100;
  `make proof` sets 10, as many as each other runbook's kill trials): the worker SIGKILLs itself
  at a random moment of a random step (or dies while the run waits for its approval), a new
  worker starts, the run must complete;
- ``load``: ``--load-runs`` runs at once on two workers of one task queue, both trapped at the
  same step of one run: whichever takes it dies, the other must finish every run;
- ``server``: the dev server, on a SQLite file, SIGKILLed and restarted (a) right after an
  approval was accepted and (b) while a run waits out its approval timeout: the approval must
  count, and the timeout's timer must fire at its time (its lateness is printed);
- ``target``: the sandbox Kubernetes API server (``sandbox.kube.faults``) answers the run's
  writes 500 a few times, 409 Conflict, or holds them past the client's timeout and applies them
  late: each step must retry within its policy and the run end correct; and it answers a step's
  write 500 on every attempt its retry policy allows: the run must fail, say why, and have put
  the old count back (its compensation). Each trial prints the attempts its history records and
  the failure before each.

After each run the targets are read, not the run's own account: each Deployment's ReplicaSet
revisions (restarted exactly once; the rolled-back run: the scheduler twice, the workers once),
the ConfigMap's ``TASK_SHARD_COUNT`` (the new count; the old one after a roll back), and the
number of runs under the workflow id (one). A trial that raises is recorded as failed with its
error: a finding, never hidden. The summary is printed and written as JSON (``--out``), which
bench/report.py puts on bench/RESULTS.md.

    .venv/bin/python bench/proof.py [--kinds worker,load,server,target] [--trials 100]
        [--load-runs 8] [--seed 1] [--out bench/proof.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import cache_bytecode, dev_server, sandbox_cluster
from kubernetes.client import CoreV1Api
from recovery import (
    DEPLOYMENTS,
    QUEUE,
    RUN_DEADLINE,
    Bench,
    Step,
    asking,
    baseline,
    event_time,
    trial,
    until,
)
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from activities.kube_client import REQUEST_TIMEOUT_SECONDS
from activities.kubernetes import unauthenticated_client
from runtime import search_attributes as sa
from runtime.client import data_converter
from runtime.identity import load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import ENV_PREFIX, Settings
from sandbox.dying_worker import DYING, Trap
from sandbox.kube.faults import ApiFault
from sandbox.kube.seed import ASTRA_CONFIG
from sandbox.servers.process import free_port
from workflows.models import RunbookResult
from workflows.timeouts import DEFAULT_RETRY

SHARDS = 12
"""The count every run sets; the ConfigMap must say it afterwards."""
APPROVAL_TIMEOUT_SECONDS = 20.0
"""The server trial's approval timeout: the server is down for part of it."""
SERVER_DOWN_SECONDS = 5.0
SEED_SHARDS = ASTRA_CONFIG["TASK_SHARD_COUNT"]
"""The count the sandbox seeds: a run that rolled back leaves it so."""
ROLLED_BACK = "rolled back (restore the old shard count)"
"""What a failed run's message says when its compensation was done."""
ROLLED_BACK_RESTARTS = {"astra-scheduler": 2, "astra-worker": 1}
"""A run whose workers' restart failed: the scheduler restarted for the new count and again for
the old one, the workers once, for the old one."""
STALL_SECONDS = 12.0
"""How long the target trial's API server holds a write: past the client's timeout
(``activities.kube_client``) and a short activity's start-to-close timeout both."""
KINDS = ("worker", "load", "server", "target")
DEFAULT_OUT = Path(__file__).with_name("proof.json")


@dataclass
class Result:
    """One trial: what was done to it and what the targets said."""

    kind: str
    name: str
    fault: str
    completed: bool = False
    outcome: str = ""
    restarts: dict[str, int] = field(default_factory=dict)
    shard_count: str = ""
    runs_under_id: int = 0
    detail: str = ""
    error: str = ""
    changes: bool = True
    """Whether the run should change the targets (a run that timed out changes nothing)."""
    rolls_back: bool = False
    """Whether the run should fail and put the old count back (a fault outlasting its retries)."""

    @property
    def expected_restarts(self) -> dict[str, int]:
        if self.rolls_back:
            return dict(ROLLED_BACK_RESTARTS)
        return dict.fromkeys(DEPLOYMENTS, 1 if self.changes else 0)

    @property
    def expected_shards(self) -> str:
        return str(SHARDS) if self.changes and not self.rolls_back else SEED_SHARDS

    @property
    def duplicates(self) -> int:
        """Side effects past the ones each target should have seen."""
        expected = self.expected_restarts
        return sum(max(n - expected.get(d, 0), 0) for d, n in self.restarts.items()) + max(
            self.runs_under_id - 1, 0
        )

    @property
    def correct(self) -> bool:
        return (
            self.completed
            and not self.error
            and self.restarts == self.expected_restarts
            and self.shard_count == self.expected_shards
            and self.runs_under_id == 1
            and (not self.rolls_back or (self.outcome == "failed" and ROLLED_BACK in self.detail))
        )


class Targets:
    """What the sandbox cluster and the server say about one namespace's run."""

    def __init__(self, bench: Bench, kube_url: str) -> None:
        self.bench = bench
        self.core = CoreV1Api(unauthenticated_client(kube_url))

    async def fill(self, result: Result, namespace: str) -> None:
        result.restarts = await asyncio.to_thread(self.bench.restarts, namespace)
        config: Any = await asyncio.to_thread(
            self.core.read_namespaced_config_map, "astra-config", namespace
        )
        result.shard_count = str(config.data.get("TASK_SHARD_COUNT", ""))
        query = f"WorkflowId = 'shard-scaling/{namespace}'"
        result.runs_under_id = len([r async for r in self.bench.client.list_workflows(query)])


async def recorded(result: Result, body: Callable[[], Awaitable[None]]) -> Result:
    """Run a trial's body; an exception is the trial's finding, not the proof's end."""
    try:
        await body()
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    return result


async def worker_trials(
    bench: Bench, targets: Targets, steps: list[Step], trials: int, rng: random.Random
) -> list[Result]:
    results = []
    for number in range(1, trials + 1):
        step = rng.choice(steps)
        result = Result("worker", f"kill-{number}", f"worker SIGKILLed at '{step.name}'")

        async def body(number: int = number, step: Step = step, result: Result = result) -> None:
            done = await trial(bench, number, step, rng)
            result.completed, result.outcome = True, done.outcome
            result.detail = f"{done.died}; completed {done.completed:.1f} s after the new worker"

        await recorded(result, body)
        await targets.fill(result, f"kill-{number}")
        results.append(result)
        print(f"worker trial {number}/{trials}: {summary_line(result)}", flush=True)
    return results


async def load_trial(
    bench: Bench, targets: Targets, steps: list[Step], runs: int, rng: random.Random
) -> list[Result]:
    """``runs`` runs at once on two workers, one of which dies inside a step of the first."""
    activity_steps = [s for s in steps if s.activity_id is not None]
    step = rng.choice(activity_steps)
    assert step.activity_id is not None
    namespaces = [f"load-{n}" for n in range(1, runs + 1)]
    trap = Trap(f"shard-scaling/{namespaces[0]}", step.activity_id, rng.uniform(0, step.seconds))
    workers = [await bench.worker(trap), await bench.worker(trap)]
    results = [
        Result("load", ns, f"one of two workers SIGKILLed at '{step.name}'") for ns in namespaces
    ]
    try:
        for worker in workers:
            await worker.polling_since()
        handles = [await bench.start(ns) for ns in namespaces]

        async def one(handle: WorkflowHandle[Any, RunbookResult], result: Result) -> None:
            async def body() -> None:
                await bench.approve(handle)
                done = await asyncio.wait_for(handle.result(), RUN_DEADLINE)
                result.completed, result.outcome = True, done.outcome.value

            await recorded(result, body)

        await asyncio.gather(*(one(h, r) for h, r in zip(handles, results, strict=True)))
    finally:
        died = [w.said(DYING) for w in workers]
        for worker in workers:
            await worker.stop()
    killed = [d for d in died if d is not None]
    for result, namespace in zip(results, namespaces, strict=True):
        result.detail = f"workers that died: {len(killed)} ({'; '.join(killed) or 'none'})"
        if not killed and result is results[0]:
            result.error = "no worker reached the trap: the fault was not injected"
        await targets.fill(result, namespace)
        print(f"load trial {namespace}: {summary_line(result)}", flush=True)
    return results


@dataclass(frozen=True)
class TargetTrial:
    """A Shard Scaling run in ``namespace`` whose API server answers with ``faults``."""

    namespace: str
    fault: str
    faults: tuple[ApiFault, ...]
    rolls_back: bool = False


def target_trials() -> list[TargetTrial]:
    """The Kubernetes API's bad days, one namespace each, the writes of the run's own objects hit:
    500s that stop, 409s (another writer first), writes held past every timeout, and 500s that
    outlast the step's retries."""

    def writes(ns: str, resource: str, name: str | None = None, **fault: Any) -> ApiFault:
        return ApiFault(namespace=ns, resources=(resource,), name=name, methods=("PATCH",), **fault)

    attempts = DEFAULT_RETRY.maximum_attempts
    return [
        TargetTrial(
            "target-500",
            "API server answers 500 to the ConfigMap write 3 times, then to the restarts twice",
            (writes("target-500", "configmaps", status=500, times=3),
             writes("target-500", "deployments", status=500, times=2)),
        ),
        TargetTrial(
            "target-409",
            "API server answers 409 Conflict to the ConfigMap write twice and to each restart once",
            (writes("target-409", "configmaps", status=409, times=2),
             writes("target-409", "deployments", "astra-scheduler", status=409),
             writes("target-409", "deployments", "astra-worker", status=409)),
        ),
        TargetTrial(
            "target-stall",
            f"API server holds the ConfigMap write and the scheduler's restart {STALL_SECONDS:g} s"
            f" (client timeout {REQUEST_TIMEOUT_SECONDS:g} s), then applies them",
            (writes("target-stall", "configmaps", stall_seconds=STALL_SECONDS),
             writes("target-stall", "deployments", "astra-scheduler",
                    stall_seconds=STALL_SECONDS)),
        ),
        TargetTrial(
            "target-rollback",
            f"API server answers 500 to the workers' restart {attempts} times (every attempt "
            "the retry policy allows)",
            (writes("target-rollback", "deployments", "astra-worker", status=500,
                    times=attempts),),
            rolls_back=True,
        ),
    ]  # fmt: skip


async def retried(client: Client, history: Any) -> str:
    """Each activity the run retried, from its history: the attempt that succeeded (or failed
    last) and the failure before it (decoded: the codec encrypts failure messages)."""
    said = []
    for event in history.events:
        if event.HasField("activity_task_started_event_attributes"):
            attributes = event.activity_task_started_event_attributes
            if attributes.attempt > 1:
                failure = await client.data_converter.decode_failure(attributes.last_failure)
                said.append(f"attempt {attributes.attempt} after '{failure}'")
    return "; ".join(said) or "no activity retried"


async def target_run(bench: Bench, targets: Targets, spec: TargetTrial) -> Result:
    result = Result("target", spec.namespace, spec.fault, rolls_back=spec.rolls_back)

    async def body() -> None:
        handle = await bench.start(spec.namespace)
        await bench.approve(handle)
        try:
            done = await asyncio.wait_for(handle.result(), RUN_DEADLINE)
            result.outcome, result.detail = done.outcome.value, done.summary
        except WorkflowFailureError as failure:
            result.outcome, result.detail = "failed", str(failure.cause)
        result.completed = True
        result.detail += f" | {await retried(bench.client, await handle.fetch_history())}"

    await recorded(result, body)
    await targets.fill(result, spec.namespace)
    print(f"target trial {spec.namespace}: {summary_line(result)}", flush=True)
    return result


@dataclass
class FileServer:
    """A dev server of the proof's own on a SQLite file, which it kills and restarts."""

    directory: Path
    port: int
    process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        temporal = Path(sys.executable).parent / "temporal"
        log = (self.directory / "temporal.log").open("a")
        self.process = await asyncio.create_subprocess_exec(
            str(temporal), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.port),
            "--headless", "--db-filename", str(self.directory / "temporal.db"),
            "--log-level", "error", *sa.dev_server_flags(),
            stdout=log, stderr=log,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


async def connected(address: str, keys: str) -> Client:
    converter = data_converter(Settings(codec_keys=keys))
    deadline = time.monotonic() + 60
    while True:
        try:
            return await Client.connect(address, data_converter=converter)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@asynccontextmanager
async def file_server() -> AsyncIterator[FileServer]:
    server = FileServer(Path(tempfile.mkdtemp(prefix="astra-ops-proof-server-")), free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


async def restart(server: FileServer, down: float) -> None:
    """SIGKILL the server, leave it down ``down`` seconds, start it again on its file."""
    server.kill()
    assert server.process is not None
    await server.process.wait()
    await asyncio.sleep(down)  # the outage itself, not a wait for something to happen
    await server.start()


async def server_trials(
    make_bench: Callable[[Client, str], Bench], keys: str, kube_url: str
) -> list[Result]:
    """The dev server killed after an accepted approval, and during an approval's timeout."""
    approved = Result("server", "server-approved", "server SIGKILLed right after the approval")
    timed = Result(
        "server", "server-timeout", "server SIGKILLed during the approval timeout", changes=False
    )
    async with file_server() as server:
        client = await connected(server.address, keys)
        await sa.register_search_attributes(client, "default")
        bench = make_bench(client, server.address)
        targets = Targets(bench, kube_url)
        worker = await bench.worker()
        try:
            await worker.polling_since()

            async def approved_body() -> None:
                handle = await bench.start("server-approved")
                await bench.approve(handle)
                await restart(server, SERVER_DOWN_SECONDS)
                done = await asyncio.wait_for(handle.result(), RUN_DEADLINE)
                approved.completed, approved.outcome = True, done.outcome.value
                history = await handle.fetch_history()
                approvers = [
                    e for e in history.events
                    if e.HasField("workflow_execution_update_accepted_event_attributes")
                ]  # fmt: skip
                approved.detail = f"accepted decisions in history: {len(approvers)}"

            await recorded(approved, approved_body)
            await targets.fill(approved, "server-approved")

            async def timed_body() -> None:
                started = await bench.runs.start(
                    "shard-scaling",
                    {"shards": SHARDS, "namespace": "server-timeout",
                     "approval_timeout_seconds": APPROVAL_TIMEOUT_SECONDS},
                    requester="alice", reason="proof: server restart during a timeout",
                )  # fmt: skip
                handle = bench.client.get_workflow_handle(started.run_id, result_type=RunbookResult)
                await until(lambda: asking(handle), RUN_DEADLINE, f"{handle.id} asks")
                await restart(server, SERVER_DOWN_SECONDS)
                done = await asyncio.wait_for(handle.result(), RUN_DEADLINE)
                timed.completed, timed.outcome = True, done.outcome.value
                timed.detail = await timer_lateness(handle)

            await recorded(timed, timed_body)
            # The run timed out before any change: nothing restarted, the count unchanged
            # (``changes=False``).
            await targets.fill(timed, "server-timeout")
        finally:
            await worker.stop()
    print(f"server trial (approval): {summary_line(approved)}", flush=True)
    print(f"server trial (timeout): {summary_line(timed)}", flush=True)
    return [approved, timed]


async def timer_lateness(handle: WorkflowHandle[Any, RunbookResult]) -> str:
    """How late each timer of the run fired, beside when it was due."""
    history = await handle.fetch_history()
    started: dict[str, tuple[float, float]] = {}
    late = []
    for event in history.events:
        if event.HasField("timer_started_event_attributes"):
            attributes = event.timer_started_event_attributes
            due = attributes.start_to_fire_timeout.ToNanoseconds() / 1e9
            started[attributes.timer_id] = (event_time(event), due)
        elif event.HasField("timer_fired_event_attributes"):
            at, due = started[event.timer_fired_event_attributes.timer_id]
            late.append((due, event_time(event) - at - due))
    return "; ".join(
        f"{due:g} s timer fired {lateness:+.2f} s from its time" for due, lateness in late
    )


def summary_line(result: Result) -> str:
    restarts = ",".join(str(result.restarts.get(d, "?")) for d in DEPLOYMENTS)
    verdict = "correct" if result.correct else "NOT CORRECT"
    return (
        f"{verdict}; {result.fault}; outcome {result.outcome or '-'}; restarts {restarts}; "
        f"shards {result.shard_count or '-'}; runs {result.runs_under_id}; {result.detail}"
        + (f"; error {result.error}" if result.error else "")
    )


def summary(results: list[Result], seconds: float) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        kind = by_kind.setdefault(
            r.kind, {"trials": 0, "completed": 0, "correct": 0, "duplicates": 0}
        )
        kind["trials"] += 1
        kind["completed"] += r.completed
        kind["correct"] += r.correct
        kind["duplicates"] += r.duplicates
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "runbooks": ["shard-scaling"],
        "trials": len(results),
        "completed": sum(r.completed for r in results),
        "correct": sum(r.correct for r in results),
        "duplicate_side_effects": sum(r.duplicates for r in results),
        "by_kind": by_kind,
        "failed": [asdict(r) | {"summary": summary_line(r)} for r in results if not r.correct],
        "results": [asdict(r) for r in results],
    }


async def main(
    kinds: list[str], trials: int, load_runs: int, seed: int, out: Path, rollout_seconds: float
) -> None:
    cache_bytecode()
    began = time.monotonic()
    rng = random.Random(seed)
    keys = new_key_line("proof")
    signer = load_signer(new_signing_key_line("proof-api"))
    logs = Path(tempfile.mkdtemp(prefix="astra-ops-proof-"))
    targeted = target_trials() if "target" in kinds else []
    namespaces = ["base-1"] if "worker" in kinds or "load" in kinds else []
    namespaces += ["server-approved", "server-timeout"] if "server" in kinds else []
    namespaces += [f"kill-{n}" for n in range(1, trials + 1)] if "worker" in kinds else []
    namespaces += [f"load-{n}" for n in range(1, load_runs + 1)] if "load" in kinds else []
    namespaces += [t.namespace for t in targeted]
    faults = [f for t in targeted for f in t.faults]
    env = await dev_server(keys)
    results: list[Result] = []
    try:
        async with sandbox_cluster(*namespaces, rollout_seconds=rollout_seconds, faults=faults) as (
            kube_url,
            _,
        ):

            def make_bench(client: Client, address: str) -> Bench:
                settings = {
                    "TEMPORAL_ADDRESS": address,
                    "CODEC_KEYS": keys,
                    "TRUSTED_KEYS": signer.public_line(),
                    "KUBE_URL": kube_url,
                    "TASK_QUEUE": QUEUE,  # the queue Bench starts its runs on
                    "DEV_MODE": "false",
                }
                worker_env = {**os.environ, **{f"{ENV_PREFIX}{k}": v for k, v in settings.items()}}
                return Bench(client, worker_env, signer, logs)

            bench = make_bench(env.client, env.client.service_client.config.target_host)
            targets = Targets(bench, kube_url)
            if "worker" in kinds or "load" in kinds:
                _, steps = await baseline(bench, 1)
                if "worker" in kinds:
                    results += await worker_trials(bench, targets, steps, trials, rng)
                if "load" in kinds and load_runs:
                    results += await load_trial(bench, targets, steps, load_runs, rng)
            if "server" in kinds:
                results += await server_trials(make_bench, keys, kube_url)
            if targeted:
                worker = await bench.worker()
                try:
                    await worker.polling_since()
                    for spec in targeted:
                        results.append(await target_run(bench, targets, spec))
                finally:
                    await worker.stop()
    finally:
        await env.shutdown()
    report = summary(results, time.monotonic() - began)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nproof: {report['trials']} trials (runbooks: shard-scaling), "
        f"{report['completed']} completed, {report['correct']} correct on the targets, "
        f"{report['duplicate_side_effects']} duplicate side effects"
    )
    for kind, figures in report["by_kind"].items():
        print(f"  {kind:<7} " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for failed in report["failed"]:
        print(f"  FAILED {failed['name']}: {failed['summary']}")
    print(f"written to {out}; worker logs in {logs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=int(os.environ.get("PROOF_TRIALS", "100")),
        help="worker-kill trials (default PROOF_TRIALS or 100)",
    )  # fmt: skip
    parser.add_argument("--load-runs", type=int, default=8, help="runs at once on two workers")
    parser.add_argument("--seed", type=int, default=1, help="of the random draws (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON summary")
    parser.add_argument(
        "--rollout-seconds", type=float, default=2.0,
        help="how long the sandbox takes to roll a Deployment (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--kinds",
        type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
        default=list(KINDS),
        help=f"the kinds of trial to run, comma-separated (default {','.join(KINDS)})",
    )
    args = parser.parse_args()
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"no kind {', '.join(sorted(unknown))}; the kinds: {', '.join(KINDS)}")
    asyncio.run(
        main(args.kinds, args.trials, args.load_runs, args.seed, args.out, args.rollout_seconds)
    )
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
