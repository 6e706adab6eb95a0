"""How long `astra-ops` takes to answer, typed as a person types it, against a local Temporal.

Each command runs as its own process (`.venv/bin/astra-ops ...`), so the figure includes what a
person waits for: interpreter start, imports, connecting, the round trip, printing. Both ways the
CLI reaches runs are timed: beside `astra-ops dev` (its marker file sends the CLI to the dev
stack's API with each person's dev token) and through a production API (a bearer token, the API
signs); this script serves both APIs. `temporal workflow describe` on the same
server is the baseline: the least any command that asks Temporal can take. Target: every
command's median under 0.5 s.

Every decision is made on a run of its own, waiting for approval, so each one is accepted as it
would be mid-incident. Commands are timed round-robin (one of each per round) so that load from
elsewhere on the machine falls on all of them alike.

    .venv/bin/python bench/cli_latency.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from harness import cache_bytecode, sandbox_cluster
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from runtime import search_attributes as sa
from runtime.access import load_policy
from runtime.client import DevStack, data_converter
from runtime.identity import load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import Settings
from starters.api import create_app
from starters.runs import Runs
from workers.worker import running_worker

BIN = Path(sys.executable).parent
REQUESTER, APPROVER = "alice", "bob"  # may start and approve shard-scaling (access policy)
TOKENS = f"t-{REQUESTER}:{REQUESTER},t-{APPROVER}:{APPROVER}"
NAMESPACES = ("bench-approved", "bench-rejected")
"""One run of each per round and mode; a run's id is its namespace, so they take turns."""
BASELINE = "temporal workflow describe"
TARGET = 0.5


@dataclass
class Mode:
    """One way the CLI reaches runs: its environment, and how this script opens runs for it."""

    name: str
    env: dict[str, str]
    runs: Runs

    def as_user(self, user: str) -> dict[str, str]:
        if self.name == "dev":
            return {**self.env, "ASTRA_OPS_USER": user}
        return {**self.env, "ASTRA_OPS_API_TOKEN": f"t-{user}"}


@dataclass(frozen=True)
class Sample:
    wall: float
    """What the person waits for."""
    cpu: float
    """What the command itself computes (user + system): on a busy machine the wall time also
    holds the time it waited for a CPU, this does not."""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def timed(argv: Sequence[str], env: dict[str, str]) -> Sample:
    """One run of ``argv``, start to exit; a command that fails stops the bench."""
    began, cpu = time.perf_counter(), children_cpu()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await proc.communicate()
    sample = Sample(time.perf_counter() - began, children_cpu() - cpu)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(argv)}` exited {proc.returncode}:\n{output.decode()}")
    return sample


@asynccontextmanager
async def serving_api(settings: Settings) -> AsyncIterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if serving.done() or time.monotonic() > deadline:
            raise SystemExit("the API did not start serving within 30 s")
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving


async def await_approval(client: Client, run_id: str) -> None:
    """Until the run waits for a person (its worker has read the cluster and reached the gate)."""
    handle = client.get_workflow_handle(run_id)
    deadline = time.monotonic() + 120
    while True:
        desc = await handle.describe()
        if desc.typed_search_attributes.get(sa.AWAITING_APPROVAL):
            return
        if desc.close_time is not None or time.monotonic() > deadline:
            raise SystemExit(f"{run_id} did not reach its approval ({desc.status})")
        await asyncio.sleep(0.1)


def commands(
    cli: str, watched: str, to_approve: str, shards: int
) -> dict[str, tuple[list[str], str]]:
    """Each timed command as typed, and who types it. ``start`` asks for the run that is
    already open (``watched``), as a person repeating a start would; ``reject`` then ends it."""
    namespace = watched.split("/", 1)[1]
    start = ["start", "shard-scaling", "-p", f"shards={shards}", "-p", f"namespace={namespace}"]
    return {
        "status": ([cli, "status", watched], APPROVER),
        "ps": ([cli, "ps"], APPROVER),
        "runbooks": ([cli, "runbooks"], APPROVER),
        "start": ([cli, *start], REQUESTER),
        "approve": ([cli, "approve", to_approve], APPROVER),
        "reject": ([cli, "reject", watched], APPROVER),
    }


def percentile_95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


@dataclass
class Stack:
    """What the commands talk to: Temporal, a worker per mode, the API; and how to reach them."""

    client: Client
    address: str
    env: dict[str, str]
    modes: list[Mode]


@asynccontextmanager
async def running_stack() -> AsyncIterator[Stack]:
    keys = new_key_line("bench")
    signing_key = new_signing_key_line("bench-api")
    signer = load_signer(signing_key)
    async with AsyncExitStack() as stack:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(BIN / "temporal"),
            data_converter=data_converter(Settings(codec_keys=keys)),
            search_attributes=sa.ALL,
            dev_server_log_level="error",
        )
        stack.push_async_callback(env.shutdown)
        client = env.client
        address = client.service_client.config.target_host
        # Rollouts of 1 s keep the sandbox cluster's controller ticks (and its share of the
        # CPUs) small.
        kube_url, _ = await stack.enter_async_context(
            sandbox_cluster(*NAMESPACES, rollout_seconds=1)
        )
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cli-latency-")))
        (state / "signing.key").write_text(signing_key + "\n")
        base = Settings(
            temporal_address=address,
            codec_keys=keys,
            kube_url=kube_url,
            state_dir=state,
            signing_key_file=state / "signing.key",
            trusted_keys=signer.public_line(),
            api_tokens=SecretStr(TOKENS),
        )
        # Beside `astra-ops dev`: its API trusts names and signs nothing; the marker in the
        # dev state directory sends the CLI there with each person's dev token.
        dev = base.model_copy(
            update={"task_queue": "bench-dev", "dev_mode": True, "signing_key_file": None}
        )
        api = base.model_copy(update={"task_queue": "bench-api"})
        executor = stack.enter_context(ThreadPoolExecutor(16))
        for settings in (dev, api):
            await stack.enter_async_context(running_worker(client, settings, executor))
        dev_url = await stack.enter_async_context(serving_api(dev))
        api_url = await stack.enter_async_context(serving_api(api))
        dev_state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cli-dev-")))
        tokens = {user: f"t-{user}" for user in (REQUESTER, APPROVER)}
        DevStack(api_url=dev_url, tokens=tokens).write(dev_state / "dev-mode")
        policy = load_policy(base.access_policy)
        # The CLI's environment: this machine's, without any astra-ops setting of its own.
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("ASTRA_OPS_")}
        yield Stack(
            client,
            address,
            cli_env,
            [
                Mode(
                    "dev",
                    cli_env | {"ASTRA_OPS_STATE_DIR": str(dev_state)},
                    Runs(client, dev.task_queue, policy),
                ),
                Mode(
                    "api",
                    cli_env
                    | {
                        "ASTRA_OPS_API_URL": api_url,
                        "ASTRA_OPS_STATE_DIR": str(state),  # no dev-stack marker here
                    },
                    Runs(client, api.task_queue, policy, signer),
                ),
            ],
        )


async def measure(stack: Stack, rounds: int) -> dict[tuple[str, str], list[Sample]]:
    """``rounds`` samples of each (command, mode)."""
    samples: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    cli = str(BIN / "astra-ops")
    for mode in stack.modes:  # warm the file cache; not counted
        await timed([cli, "runbooks"], mode.as_user(APPROVER))
    batch = 0
    for _ in range(rounds):
        for mode in stack.modes:
            # Fresh runs for this round's decisions, at a shard count new to the cluster (the
            # approved one sets it); opening them is not timed.
            batch += 1
            started = [
                await mode.runs.start(
                    "shard-scaling",
                    {"shards": 10 + batch, "namespace": namespace},
                    requester=REQUESTER,
                )
                for namespace in NAMESPACES
            ]
            await asyncio.gather(*(await_approval(stack.client, s.run_id) for s in started))
            to_approve, watched = (s.run_id for s in started)
            if mode is stack.modes[0]:
                baseline = [
                    str(BIN / "temporal"), "workflow", "describe",
                    "--workflow-id", watched, "--address", stack.address,
                ]  # fmt: skip
                samples[BASELINE, "-"].append(await timed(baseline, stack.env))
            typed = commands(cli, watched, to_approve, shards=10 + batch)
            for command, (argv, user) in typed.items():
                samples[command, mode.name].append(await timed(argv, mode.as_user(user)))
            # The approved run goes on to change the cluster; both end before the next round.
            await asyncio.gather(
                *(stack.client.get_workflow_handle(s.run_id).result() for s in started)
            )
    return samples


async def main(rounds: int) -> None:
    cache_bytecode()  # each command loads compiled modules, as an installed CLI does
    load_before = os.getloadavg()
    async with running_stack() as stack:
        samples = await measure(stack, rounds)
    print(
        f"astra-ops CLI latency, {rounds} rounds, each command its own process; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} CPUs; "
        "cpu: the median CPU time of the command's own process"
    )
    print(f"{'seconds':<28} {'median':>7} {'p95':>7} {'cpu':>7}   (target: median < {TARGET:g} s)")
    for (command, mode_name), runs in samples.items():
        wall = [r.wall for r in runs]
        median, p95 = statistics.median(wall), percentile_95(wall)
        cpu = statistics.median(r.cpu for r in runs)
        over = "" if mode_name == "-" or median < TARGET else "  over target"
        label = command if mode_name == "-" else f"{command} ({mode_name})"
        print(f"{label:<28} {median:7.3f} {p95:7.3f} {cpu:7.3f}{over}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.rounds))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: temporalio/sdk-python#300 (see starters/cli.py main)
