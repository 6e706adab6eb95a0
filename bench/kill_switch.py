"""How fast the kill switch reaches open runs: `freeze` until every run says it is frozen, and
`unfreeze` until every run has resumed (the issue's bound: within 2 s).

Runs waiting for approval in separate namespaces of the sandbox cluster, the production worker
(identities proven: the script signs as the API would), the real dev server.

    .venv/bin/python bench/kill_switch.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

from temporalio.testing import WorkflowEnvironment

from runtime import search_attributes as sa
from runtime.access import load_policy
from runtime.client import data_converter
from runtime.identity import load_signer, new_signing_key_line
from runtime.keys import new_key_line
from runtime.settings import REPO_ROOT, Settings
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from starters.runs import Runs
from workers.worker import running_worker
from workflows.models import RunStatus

QUEUE = "bench-kill-switch"


async def until_all(
    runs: Runs, run_ids: list[str], reached: Callable[[RunStatus], bool], since: float
) -> list[float]:
    """Seconds from ``since`` until each run's status satisfies ``reached``."""
    seen: dict[str, float] = {}
    while len(seen) < len(run_ids):
        waiting = [r for r in run_ids if r not in seen]
        handles = [runs.client.get_workflow_handle(r) for r in waiting]
        statuses = await asyncio.gather(
            *(h.query("status", result_type=RunStatus) for h in handles)
        )
        now = time.perf_counter()
        for run_id, status in zip(waiting, statuses, strict=True):
            if reached(status):
                seen[run_id] = now - since
        await asyncio.sleep(0.02)
    return sorted(seen.values())


def line(label: str, seconds: list[float]) -> str:
    return (
        f"{label:<9} median {statistics.median(seconds):6.3f} s   "
        f"max {max(seconds):6.3f} s   over {len(seconds)} runs"
    )


async def main(count: int) -> None:
    keys = new_key_line("bench")
    signing = new_signing_key_line("bench-api")
    signer = load_signer(signing)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=data_converter(Settings(codec_keys=keys)),
        search_attributes=sa.ALL,
        dev_server_log_level="error",
    )
    cluster = FakeCluster(rollout_seconds=0.05)
    namespaces = [f"bench-{i}" for i in range(count)]
    for namespace in namespaces:
        seed_astra(cluster, namespace=namespace)
    kube = FakeKubeServer(cluster)
    await kube.start()
    with TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "signing.key"
        key_file.write_text(signing)
        settings = Settings(
            codec_keys=keys,
            kube_url=kube.url,
            task_queue=QUEUE,
            signing_key_file=key_file,
            trusted_keys=signer.public_line(),
        )
        policy = load_policy(REPO_ROOT / "deploy" / "access-policy.yaml")
        runs = Runs(env.client, QUEUE, policy, signer)
        try:
            with ThreadPoolExecutor(16) as executor:
                async with running_worker(env.client, settings, executor):
                    run_ids = [
                        (
                            await runs.start(
                                "shard-scaling",
                                {"shards": 12, "namespace": ns},
                                requester="alice",
                                reason="kill switch bench",
                            )
                        ).run_id
                        for ns in namespaces
                    ]
                    await until_all(
                        runs, run_ids, lambda s: bool(s.pending_approvals), time.perf_counter()
                    )
                    frozen_at = time.perf_counter()
                    await runs.freeze("alice", "bench")
                    frozen = await until_all(
                        runs, run_ids, lambda s: s.frozen_by == "alice", frozen_at
                    )
                    lifted_at = time.perf_counter()
                    await runs.unfreeze("bob", "bench over")
                    lifted = await until_all(
                        runs, run_ids, lambda s: s.frozen_by is None, lifted_at
                    )
                    for run_id in run_ids:
                        await runs.cancel(run_id, "alice", "bench over")
            print(line("freeze", frozen))
            print(line("unfreeze", lifted))
        finally:
            await kube.stop()
            await env.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
