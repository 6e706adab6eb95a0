"""Record the Shard Scaling histories that tests/test_replay.py replays.

Run it when a released workflow changes on purpose (behind ``workflow.patched``), so the stored
histories cover both the old and the new code path:

    .venv/bin/python -m tests.histories.record

Histories are recorded with the plain pydantic converter (no codec), so replaying them needs no
key; the codec only wraps payloads and has no part in determinism.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.access import AccessActivities, Trust
from activities.kubernetes import KubernetesActivities, unauthenticated_client
from activities.notify import NotifyActivities
from runtime import search_attributes as sa
from runtime.identity import parse_trusted_keys
from runtime.settings import REPO_ROOT
from sandbox.kube import FakeCluster, FakeKubeServer, seed_astra
from tests.helpers import (
    TEST_SIGNER,
    awaiting_approval,
    signed_decision,
    signed_start,
    wait_for_step,
)
from workflows.models import ApprovalSignal, Decision, StepState
from workflows.shard_scaling import ShardScaling, ShardScalingRequest

HERE = Path(__file__).parent
QUEUE = "record-histories"


async def scenario(client: Client, cluster: FakeCluster, name: str) -> str:
    namespace = f"astra-{name}"
    seed_astra(cluster, namespace=namespace)
    request = ShardScalingRequest(
        requester="alice", reason=f"recorded: {name}", shards=12, namespace=namespace,
        dry_run=name == "dry-run",
    )  # fmt: skip
    if name == "no-change":
        request = request.model_copy(update={"shards": 8})
    if name == "rollback":
        cluster.patch(
            "deployments", namespace, "astra-worker", {"spec": {"progressDeadlineSeconds": 1}}
        )
        cluster.stall("astra-worker")
    workflow_id = f"shard-scaling/{namespace}"
    handle = await client.start_workflow(
        ShardScaling.run, signed_start(request, workflow_id), id=workflow_id, task_queue=QUEUE
    )
    bob = Decision(approver="bob", step="approve scaling")
    if name in ("approved", "rejected", "rollback"):
        await awaiting_approval(handle, "approve scaling")
    if name == "approved":
        await handle.signal(ShardScaling.approve, ApprovalSignal(approver="carol"))  # refused
        await handle.execute_update(ShardScaling.decide, await signed_decision(handle, bob))
    elif name == "rejected":
        no = await signed_decision(handle, bob.model_copy(update={"decision": "reject"}))
        await handle.signal(
            ShardScaling.reject,
            ApprovalSignal(approver="bob", step=no.step, authorization=no.authorization),
        )
    elif name == "rollback":
        await handle.execute_update(ShardScaling.decide, await signed_decision(handle, bob))
        await wait_for_step(handle, "wait for astra-worker", StepState.FAILED)
        cluster.unstall("astra-worker")
    with contextlib.suppress(WorkflowFailureError):  # the rollback scenario fails by design
        await handle.result()
    history = await handle.fetch_history()
    # The run's id is kept beside its events: signatures in history name it, so a replay under
    # another id would (rightly) refuse the start.
    stored = {"workflowId": handle.id, **json.loads(history.to_json())}
    (HERE / f"shard-scaling-{name}.json").write_text(json.dumps(stored, indent=2))
    return name


async def main() -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=sa.ALL,
        dev_server_log_level="error",
    )
    cluster = FakeCluster(rollout_seconds=0.2)
    server = FakeKubeServer(cluster)
    await server.start()
    kubernetes = KubernetesActivities(unauthenticated_client(server.url))
    policy = REPO_ROOT / "deploy" / "access-policy.yaml"
    trust = Trust(dev_mode=False, keys=parse_trusted_keys(TEST_SIGNER.public_line()))
    access = AccessActivities(policy, trust, env.client, NotifyActivities(policy), "")
    try:
        with ThreadPoolExecutor(8) as executor:
            async with Worker(
                env.client,
                task_queue=QUEUE,
                workflows=[ShardScaling],
                activities=[
                    access.admit, access.request_approval, kubernetes.read_config,
                    kubernetes.patch_config,
                    kubernetes.rollout_health, kubernetes.rollout_restart,
                    kubernetes.wait_rollout, kubernetes.verify_config,
                ],
                activity_executor=executor,
            ):  # fmt: skip
                for name in ("approved", "rejected", "dry-run", "no-change", "rollback"):
                    print("recorded", await scenario(env.client, cluster, name))
    finally:
        await server.stop()
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
