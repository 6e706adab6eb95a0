"""Faults in the systems a step acts on, while it acts: the step retries within its policy and ends
correct, or the run fails with its compensation done and says why.

The Kubernetes API server answers 500 and 409 (the sandbox's ``ApiFault``s, spent as they hit),
or holds a request past the client's timeout; PostgreSQL loses the activity's connection halfway
through its batches (``pg_terminate_backend`` on its backend); Redis loses it between reading
what is pending and acknowledging it (``CLIENT KILL``). Afterwards the targets are read, not the
run's account of itself: ReplicaSet revisions (each Deployment restarted once), the ConfigMap,
each task's requeues counted by a trigger, the dead letters still pending.
``bench/proof.py --kinds target`` runs the Kubernetes faults on a worker process of their own.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from kubernetes.client import Configuration, CoreV1Api
from redis.exceptions import ConnectionError as RedisConnectionError
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker
from urllib3.exceptions import ReadTimeoutError

from activities.kube_client import REQUEST_RETRIES, BoundedApiClient
from activities.kube_models import ConfigRef
from activities.kubernetes import KubernetesActivities
from activities.postgres import (
    LeasedTasksRequest,
    PostgresActivities,
    RequeueLostWorker,
    RequeueProgressRequest,
)
from activities.redis_store import AckDeadLetters, ReadDeadLetters, RedisActivities
from sandbox.faults import SandboxTarget, dead_letters, worker_lost
from sandbox.kube.faults import ApiFault
from sandbox.loadgen import SandboxKeys
from starters.runs import Runs
from tests.conftest_kube import KubeSandbox
from tests.helpers import awaiting_approval, handle_of, shard_count
from tests.test_worker_recovery import restarts
from workflows.models import Decision, Outcome, RunbookResult
from workflows.timeouts import DEFAULT_RETRY


def bounded_client(url: str, request_timeout: float) -> BoundedApiClient:
    """A client of the sandbox with a shorter patience than the activities' own."""
    configuration = Configuration(host=url)
    configuration.proxy = None
    return BoundedApiClient(configuration, request_timeout=request_timeout)


async def scale(runs: Runs, client: Client, namespace: str) -> RunbookResult:
    """Shard Scaling to 12, approved as soon as it asks; its result."""
    started = await runs.start(
        "shard-scaling", {"shards": 12, "namespace": namespace}, requester="alice"
    )
    handle = handle_of(client, started.run_id)
    await awaiting_approval(handle, "approve scaling")
    await runs.decide(started.run_id, Decision(approver="bob"))
    return await handle.result()


async def test_api_server_500_then_recovering_leaves_the_scaling_done_once(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    # etcd elects a leader while the run writes the ConfigMap: two 500s, then it answers.
    kube.server.faults.add(
        ApiFault(namespace=namespace, resources=("configmaps",), status=500, times=2)
    )

    result = await scale(runs, client, namespace)

    assert [i.fault for i in kube.server.faults.injected] == ["answered 500"] * 2
    assert result.outcome == Outcome.DONE
    assert shard_count(kube, namespace) == "12"
    assert restarts(kube, namespace) == {"astra-scheduler": 1, "astra-worker": 1}


async def test_conflicts_on_the_runs_writes_are_retried_on_fresh_state(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    # Another writer gets to the ConfigMap first, then to each Deployment.
    for resource in ("configmaps", "deployments"):
        kube.server.faults.add(ApiFault(namespace=namespace, resources=(resource,), status=409))
    kube.server.faults.add(
        ApiFault(namespace=namespace, resources=("deployments",), name="astra-worker", status=409)
    )

    result = await scale(runs, client, namespace)

    hit = [(i.method, i.path.rsplit("/", 2)[-2:], i.fault) for i in kube.server.faults.injected]
    assert hit == [
        ("PATCH", ["configmaps", "astra-config"], "answered 409"),
        ("PATCH", ["deployments", "astra-scheduler"], "answered 409"),
        ("PATCH", ["deployments", "astra-worker"], "answered 409"),
    ]
    assert result.outcome == Outcome.DONE
    assert shard_count(kube, namespace) == "12"
    assert restarts(kube, namespace) == {"astra-scheduler": 1, "astra-worker": 1}


async def test_a_request_the_api_server_holds_fails_retryably_within_the_clients_timeout(
    kube: KubeSandbox, namespace: str
) -> None:
    # Without a client timeout the read would wait out the stall and succeed, however long.
    # Held longer than the client's two attempts (urllib3 sends a read once more).
    kube.server.faults.add(
        ApiFault(
            namespace=namespace, methods=("GET",), resources=("configmaps",), stall_seconds=3,
            times=1 + REQUEST_RETRIES,
        )
    )  # fmt: skip
    api = bounded_client(kube.url, request_timeout=0.5)
    try:
        k8s = KubernetesActivities(api)
        ref = ConfigRef(namespace=namespace, name="astra-config", key="TASK_SHARD_COUNT")
        with pytest.raises(ApplicationError) as failure:
            ActivityEnvironment().run(k8s.read_config, ref)
        assert failure.value.type == "KubernetesUnavailable"
        assert not failure.value.non_retryable
        assert "did not answer in time" in str(failure.value)
        # The retry, on a fresh connection, is answered.
        assert ActivityEnvironment().run(k8s.read_config, ref).value == "8"
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_a_write_held_past_the_clients_timeout_still_lands(
    kube: KubeSandbox, namespace: str
) -> None:
    # What makes a held write a fault worth proving: the caller gave up, the change happened.
    kube.server.faults.add(
        ApiFault(namespace=namespace, resources=("configmaps",), stall_seconds=1)
    )
    core = CoreV1Api(bounded_client(kube.url, request_timeout=0.2))
    patch = {"data": {"TASK_SHARD_COUNT": "99"}}
    with pytest.raises(ReadTimeoutError):
        core.patch_namespaced_config_map("astra-config", namespace, patch)
    assert shard_count(kube, namespace) == "8"
    deadline = time.monotonic() + 5
    while shard_count(kube, namespace) != "99" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shard_count(kube, namespace) == "99"


@pytest.mark.slow
async def test_a_step_failing_past_its_retries_rolls_back_and_says_why(
    runs: Runs, client: Client, worker: Worker, kube: KubeSandbox, namespace: str
) -> None:
    # The workers' restart is refused on every attempt the policy allows; the API recovers in
    # time for the roll back.
    attempts = DEFAULT_RETRY.maximum_attempts
    kube.server.faults.add(
        ApiFault(
            namespace=namespace, resources=("deployments",), name="astra-worker",
            methods=("PATCH",), status=500, times=attempts,
        )
    )  # fmt: skip

    with pytest.raises(WorkflowFailureError) as failure:
        await scale(runs, client, namespace)

    message = str(failure.value.cause)
    assert "failed at step 'restart astra-worker'" in message
    assert "500" in message and "rolled back (restore the old shard count)" in message
    assert len(kube.server.faults.injected) == attempts
    assert shard_count(kube, namespace) == "8"
    # The scheduler restarted for the new count and again for the old; the workers once, back.
    assert restarts(kube, namespace) == {"astra-scheduler": 2, "astra-worker": 1}


# ----- PostgreSQL: the connection lost halfway through a requeue -----------------------------

COUNT_REQUEUES = """
CREATE TABLE requeue_events (task_id text NOT NULL);
CREATE FUNCTION count_requeue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.status = 'running' AND NEW.status = 'pending' THEN
    INSERT INTO requeue_events VALUES (NEW.id);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER count_requeue AFTER UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION count_requeue();
"""


def terminate_others(dsn: str) -> int:
    """Terminate every other backend on the database (the activity's connection): a server
    restart or a failover as that connection sees it. How many it terminated."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return sum(bool(r[0]) for r in rows)


async def test_requeue_cut_off_mid_batches_retries_and_requeues_each_task_once(
    pg_dsn: str, data_plane: SandboxTarget
) -> None:
    fault = await worker_lost(data_plane, tasks_if_none=6)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(COUNT_REQUEUES)
    pg = PostgresActivities(pg_dsn)
    env = ActivityEnvironment()
    leases = await env.run(pg.lease_summary, LeasedTasksRequest(worker_id=fault.worker_id))
    request = RequeueLostWorker(
        worker_id=fault.worker_id, leased_before=leases.as_of, batch_size=2, token="t"
    )
    terminated: list[int] = []

    def cut_after_first_batch(*details: Any) -> None:
        if not terminated and details and str(details[0]).startswith("2 tasks"):
            terminated.append(terminate_others(pg_dsn))

    env.on_heartbeat = cut_after_first_batch
    with pytest.raises(psycopg.OperationalError) as failure:
        await env.run(pg.requeue_lost_worker, request)
    assert terminated == [1]
    # Temporal retries it: not an ApplicationError marked non-retryable, nor a type the
    # policy excludes.
    assert type(failure.value).__name__ not in (DEFAULT_RETRY.non_retryable_error_types or [])
    retried = await ActivityEnvironment().run(pg.requeue_lost_worker, request)

    assert retried.requeued == len(fault.leased_task_ids) - 2
    # The step's account (the run's summary) counts what the cut-off attempt committed.
    assert retried.detail.endswith(", 2 more by an earlier attempt of this step")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        events = await (
            await conn.execute("SELECT task_id, count(*) FROM requeue_events GROUP BY task_id")
        ).fetchall()
        states = await (
            await conn.execute(
                "SELECT DISTINCT status, worker_id FROM tasks WHERE id = ANY(%s)",
                (fault.leased_task_ids,),
            )
        ).fetchall()
    assert dict(events) == dict.fromkeys(fault.leased_task_ids, 1)
    assert states == [("pending", None)]
    progress = await env.run(pg.requeue_progress, RequeueProgressRequest(token="t"))
    assert progress.requeued == len(fault.leased_task_ids)


# ----- Redis: the connection killed between reading what is pending and acknowledging it -----


async def test_ack_cut_off_before_xack_acknowledges_each_dead_letter_once(
    data_plane: SandboxTarget, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = await dead_letters(data_plane, count=3)
    # Named, so that CLIENT KILL reaches the activity's connections and no one else's: the
    # Redis is shared with every other test.
    name = f"faults-{uuid.uuid4().hex[:8]}"
    rd = RedisActivities(f"{data_plane.redis_url}?client_name={name}", data_plane.key_prefix)
    env = ActivityEnvironment()
    read = await env.run(rd.read_dead_letters, ReadDeadLetters(consumer="repair"))
    entry_ids = [e.entry_id for e in read.entries]
    killed: list[int] = []
    xack = rd._redis.xack

    async def cut_then_xack(*args: Any) -> Any:
        if not killed:
            clients = await redis_client.client_list()
            killed.extend(
                [await redis_client.client_kill_filter(_id=c["id"]) for c in clients
                 if c["name"] == name]
            )  # fmt: skip
        return await xack(*args)

    monkeypatch.setattr(rd._redis, "xack", cut_then_xack)
    request = AckDeadLetters(entry_ids=entry_ids)
    try:
        try:
            acks = [await env.run(rd.ack_dead_letters, request)]
        except RedisConnectionError:  # retryable: not an ApplicationError; Temporal retries it
            acks = [await env.run(rd.ack_dead_letters, request)]
    finally:
        await rd.aclose()

    assert killed == [1]
    assert sum(a.acknowledged for a in acks) == len(fault.entries)
    stream = SandboxKeys(data_plane.key_prefix).dead_letter
    pending = await redis_client.xpending(stream, "astra-ops")
    assert pending["pending"] == 0
    assert await redis_client.xlen(stream) == len(fault.entries)  # acknowledged, not deleted
