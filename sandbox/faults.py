"""Fault injection for the sandbox: each function produces its condition for real.

The condition is written straight into PostgreSQL and Redis, so a runbook can detect it whether or
not the load generator runs; the load generator's knobs are set as well, so a running one keeps
the fault going (a lost worker stays silent, failures and cost stay high) until ``reset``.
A bad rollout is the exception: it is a change to the sandbox cluster, and its failures are the
load generator's tasks run by the new pods, so it needs both running (as ``astra-ops dev`` does).
A bad canary changes nothing yet: it marks an image as a bad build, so whatever later rolls that
image out (a canary upgrade) gets pods that fail.
"""

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis.asyncio as aioredis
from kubernetes.client import ApiClient, AppsV1Api
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, computed_field

from activities.certificates import CertificateAuthority, describe, read_pem
from activities.kube_annotations import CHANGE_CAUSE
from activities.kube_models import DeploymentRef
from activities.kubernetes import KubernetesActivities
from activities.postgres import LlmCostRequest, query_llm_cost
from sandbox.kube.seed import ASTRA_NAMESPACE, TLS_SERVICES, service_names, tls_secret
from sandbox.loadgen import (
    BadBuild,
    LoadConfig,
    LoadGenerator,
    SandboxKeys,
    read_knobs,
    write_knobs,
)

RETRYABLE_ERRORS = (
    "TimeoutError: upstream timed out",
    "ConnectionError: agent-service unavailable",
    "RateLimitError: model quota exceeded",
)
NON_RETRYABLE_ERRORS = (
    "ValidationError: bad goal",
    "PermissionError: tenant may not use this tool",
)
BAD_BUILD_ERROR = "ImportError: cannot import name 'run_step' from 'astra.worker'"
BAD_CANARY_TAG = "bad-canary"
"""The tag of the image ``bad_canary`` marks when none is named."""


class SandboxTarget(BaseModel):
    """Which sandbox to break: its database, its Redis, and the prefix of Astra's keys there."""

    dsn: str
    redis_url: str
    key_prefix: str = "astra:"


class WorkerLostFault(BaseModel):
    worker_id: str
    leased_task_ids: list[str]
    heartbeat_age_ms: int | None
    """How old the heartbeat now is; None when the heartbeat key was deleted."""
    created_task_ids: list[str]
    """Tasks leased to the worker by the fault because it held none."""


class ErrorSpikeFault(BaseModel):
    error: str
    share: float
    window_seconds: float
    failed_task_ids: list[str]
    succeeded_task_ids: list[str]


class CostSpikeFault(BaseModel):
    tenant: str
    agent_id: str
    model: str
    multiplier: float
    normal_window_cost: float
    inserted_cost_usd: float
    rows: int
    seeded_history_rows: int
    """LLM usage history written first because there was no baseline to spike against."""


class BadRolloutFault(BaseModel):
    namespace: str
    deployment: str
    previous_image: str
    image: str
    change_cause: str
    from_revision: int | None
    to_revision: int | None
    """The revision the bad template runs as; None if the controller had not recorded it yet."""
    replica_set: str | None
    share: float
    error: str


class BadCanaryFault(BaseModel):
    image: str
    """The image that is now a bad build; nothing runs it until something rolls it out."""
    share: float
    error: str


class BadBuildCleared(BaseModel):
    image: str
    was_bad: bool
    """Whether the image was marked as a bad build (by ``bad_canary`` or ``bad_rollout``)."""


class DeadLetterEntry(BaseModel):
    entry_id: str
    task_id: str
    error: str
    retryable: bool


class DeadLettersFault(BaseModel):
    entries: list[DeadLetterEntry]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def task_ids(self) -> list[str]:
        return [e.task_id for e in self.entries]


@asynccontextmanager
async def _redis(target: SandboxTarget) -> AsyncIterator["aioredis.Redis"]:
    client = aioredis.Redis.from_url(target.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _set_knobs(target: SandboxTarget, **changes: Any) -> None:
    """Change some of the load generator's fault knobs, keeping the others as they are."""
    keys = SandboxKeys(target.key_prefix)
    async with _redis(target) as client:
        knobs = await read_knobs(client, keys)
        await write_knobs(client, keys, knobs.model_copy(update=changes))


async def _mark_bad_build(target: SandboxTarget, image: str, build: BadBuild | None) -> bool:
    """Make ``build`` the bad build of ``image`` (None: no longer a bad build), keeping every
    other image's; returns whether ``image`` was a bad build before."""
    keys = SandboxKeys(target.key_prefix)
    async with _redis(target) as client:
        knobs = await read_knobs(client, keys)
        others = [b for b in knobs.bad_builds if b.image != image]
        bad = [*others, build] if build is not None else others
        await write_knobs(client, keys, knobs.model_copy(update={"bad_builds": bad}))
    return len(others) < len(knobs.bad_builds)


async def _workers(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    rows = await (await conn.execute("SELECT id FROM workers ORDER BY id")).fetchall()
    return [str(r[0]) for r in rows]


async def worker_lost(
    target: SandboxTarget,
    worker_id: str | None = None,
    heartbeat_age_seconds: float = 120.0,
    delete_heartbeat: bool = False,
    tasks_if_none: int = 3,
) -> WorkerLostFault:
    """Make a worker go silent while it still holds leased tasks.

    Without ``worker_id`` the worker holding the most running tasks is chosen (the most damage,
    as in real life), registering ``astra-worker-0`` when the sandbox has no workers yet.
    """
    if heartbeat_age_seconds <= 0:
        raise ValueError(f"heartbeat_age_seconds must be positive, got {heartbeat_age_seconds}")
    keys = SandboxKeys(target.key_prefix)
    created: list[str] = []
    async with await psycopg.AsyncConnection.connect(target.dsn) as conn, conn.transaction():
        if worker_id is None:
            row = await (
                await conn.execute(
                    "SELECT w.id FROM workers w LEFT JOIN tasks t"
                    " ON t.worker_id = w.id AND t.status = 'running'"
                    " GROUP BY w.id ORDER BY count(t.id) DESC, w.id LIMIT 1"
                )
            ).fetchone()
            worker_id = str(row[0]) if row else "astra-worker-0"
            await conn.execute(
                "INSERT INTO workers (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (worker_id,)
            )
        elif worker_id not in await _workers(conn):
            raise ValueError(
                f"unknown worker {worker_id}: no such row in workers; "
                "leave the worker out to let the fault pick one"
            )
        leased = await _leased(conn, worker_id)
        if not leased:
            created = [str(uuid.uuid4()) for _ in range(tasks_if_none)]
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO tasks (id, goal_id, status, worker_id)"
                    " VALUES (%s, %s, 'running', %s)",
                    [(task_id, f"goal-{task_id}", worker_id) for task_id in created],
                )
            leased = await _leased(conn, worker_id)
    age_ms = None if delete_heartbeat else round(heartbeat_age_seconds * 1000)
    async with _redis(target) as client:
        await client.sadd(keys.lost_workers, worker_id)
        if age_ms is None:
            await client.delete(keys.heartbeat(worker_id))
        else:
            await client.set(keys.heartbeat(worker_id), round(time.time() * 1000) - age_ms)
    return WorkerLostFault(
        worker_id=worker_id,
        leased_task_ids=leased,
        heartbeat_age_ms=age_ms,
        created_task_ids=sorted(created),
    )


async def _leased(conn: psycopg.AsyncConnection[Any], worker_id: str) -> list[str]:
    rows = await (
        await conn.execute(
            "SELECT id FROM tasks WHERE worker_id = %s AND status = 'running' ORDER BY id",
            (worker_id,),
        )
    ).fetchall()
    return [str(r[0]) for r in rows]


async def error_spike(
    target: SandboxTarget,
    share: float = 0.5,
    error: str = RETRYABLE_ERRORS[0],
    window_seconds: float = 300.0,
    tasks: int = 100,
    worker_id: str | None = None,
    shard: int | None = None,
    stuck_pool: bool = False,
) -> ErrorSpikeFault:
    """Make ``share`` of ``tasks`` recent outcomes failures with ``error``, within the window.

    The rows land in the most recent half of the window, so they are still inside it when a
    runbook measures a little later. ``worker_id`` and ``shard`` pin the failures to one
    worker or shard, for triage to find. ``stuck_pool`` keeps the failures going only on the
    workers registered now, so restarting the pool (new pods, new worker ids) cures it.
    """
    if not 0 < share <= 1 or window_seconds <= 0 or tasks <= 0:
        raise ValueError(
            f"error spike needs 0 < share <= 1, window_seconds > 0 and tasks > 0; "
            f"got share={share}, window_seconds={window_seconds}, tasks={tasks}"
        )
    failing = math.ceil(share * tasks)
    failed_ids: list[str] = []
    succeeded_ids: list[str] = []
    async with await psycopg.AsyncConnection.connect(target.dsn) as conn, conn.transaction():
        registered = await _workers(conn)
        workers: list[str | None] = [worker_id] if worker_id else [*registered] or [None]
        rows = []
        for i in range(tasks):
            task_id = str(uuid.uuid4())
            failed = i < failing
            (failed_ids if failed else succeeded_ids).append(task_id)
            rows.append(
                (
                    task_id,
                    f"goal-{task_id}",
                    shard if shard is not None else i % LoadConfig().shards,
                    "failed" if failed else "succeeded",
                    workers[i % len(workers)],
                    1 if failed else 0,
                    error if failed else None,
                    window_seconds * 0.5 * (i + 0.5) / tasks,
                )
            )
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO tasks (id, goal_id, shard, status, worker_id, retries, last_error,"
                " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s,"
                " now() - make_interval(secs => %s))",
                rows,
            )
    await _set_knobs(
        target,
        failure_share=share,
        error=error,
        stuck_workers=registered if stuck_pool else [],
    )
    return ErrorSpikeFault(
        error=error,
        share=share,
        window_seconds=window_seconds,
        failed_task_ids=failed_ids,
        succeeded_task_ids=succeeded_ids,
    )


async def cost_spike(
    target: SandboxTarget,
    multiplier: float = 5.0,
    tenant: str = "globex",
    agent_id: str = "coder-1",
    model: str = "gpt-4o",
    window_seconds: float = 300.0,
    baseline_seconds: float = 86_400.0,
    calls: int = 10,
) -> CostSpikeFault:
    """Make the last window cost ``multiplier`` x a normal window, driven by one tenant/agent/model.

    A normal window is the baseline's average; with no usage history yet, the fault first writes
    one at the load generator's steady rate, since a spike needs something to stand out from.
    """
    if multiplier <= 1 or window_seconds <= 0 or calls <= 0:
        raise ValueError(
            f"cost spike needs multiplier > 1, window_seconds > 0 and calls > 0; "
            f"got multiplier={multiplier}, window_seconds={window_seconds}, calls={calls}"
        )
    request = LlmCostRequest(window_seconds=window_seconds, baseline_seconds=baseline_seconds)
    seeded = 0
    async with await psycopg.AsyncConnection.connect(target.dsn) as conn:
        cost = await query_llm_cost(conn, request)
    if cost.daily_average_per_window == 0:
        generator = LoadGenerator(target.dsn, target.redis_url, [], key_prefix=target.key_prefix)
        try:
            seeded = await generator.seed_history(days=baseline_seconds / 86_400)
        finally:
            await generator.aclose()
        async with await psycopg.AsyncConnection.connect(target.dsn) as conn:
            cost = await query_llm_cost(conn, request)
    extra = max(0.0, multiplier * cost.daily_average_per_window - cost.window_cost)
    async with await psycopg.AsyncConnection.connect(target.dsn) as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO llm_usage (ts, agent_id, tenant, model, tokens, cost_usd)"
            " VALUES (now() - make_interval(secs => %s), %s, %s, %s, %s, %s)",
            [
                (
                    window_seconds * 0.5 * (i + 0.5) / calls,
                    agent_id,
                    tenant,
                    model,
                    4000,
                    extra / calls,
                )
                for i in range(calls)
            ],
        )
    await _set_knobs(
        target,
        cost_multiplier=multiplier,
        spike_tenant=tenant,
        spike_agent_id=agent_id,
        spike_model=model,
    )
    return CostSpikeFault(
        tenant=tenant,
        agent_id=agent_id,
        model=model,
        multiplier=multiplier,
        normal_window_cost=cost.daily_average_per_window,
        inserted_cost_usd=extra,
        rows=calls,
        seeded_history_rows=seeded,
    )


async def dead_letters(
    target: SandboxTarget, count: int = 10, retryable_share: float = 0.5, max_retries: int = 3
) -> DeadLettersFault:
    """Exhaust the retries of ``count`` tasks and publish them to the dead-letter stream.

    The first ``retryable_share`` of them fail with transient errors a repair should requeue,
    the rest with errors no retry fixes, so a repair run has both kinds to tell apart.
    """
    if count <= 0 or not 0 <= retryable_share <= 1 or max_retries < 0:
        raise ValueError(
            f"dead letters need count > 0, 0 <= retryable_share <= 1 and max_retries >= 0; "
            f"got count={count}, retryable_share={retryable_share}, max_retries={max_retries}"
        )
    keys = SandboxKeys(target.key_prefix)
    retryable = round(count * retryable_share)
    planned: list[dict[str, str]] = []
    async with await psycopg.AsyncConnection.connect(target.dsn) as conn, conn.transaction():
        workers = await _workers(conn) or [""]
        for i in range(count):
            errors = RETRYABLE_ERRORS if i < retryable else NON_RETRYABLE_ERRORS
            planned.append(
                {
                    "task_id": str(uuid.uuid4()),
                    "error": errors[i % len(errors)],
                    "retries": str(max_retries),
                    "shard": str(i % LoadConfig().shards),
                    "worker_id": workers[i % len(workers)],
                }
            )
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO tasks (id, goal_id, shard, status, worker_id, retries, max_retries,"
                " last_error) VALUES (%s, %s, %s, 'dead_letter', nullif(%s, ''), %s, %s, %s)",
                [
                    (
                        p["task_id"],
                        f"goal-{p['task_id']}",
                        int(p["shard"]),
                        p["worker_id"],
                        max_retries,
                        max_retries,
                        p["error"],
                    )
                    for p in planned
                ],
            )
    entries: list[DeadLetterEntry] = []
    async with _redis(target) as client:
        for i, fields in enumerate(planned):
            entry_id = await client.xadd(keys.dead_letter, fields)  # type: ignore[arg-type]
            entries.append(
                DeadLetterEntry(
                    entry_id=str(entry_id),
                    task_id=fields["task_id"],
                    error=fields["error"],
                    retryable=i < retryable,
                )
            )
    return DeadLettersFault(entries=entries)


def _tagged(image: str, tag: str) -> str:
    """``image`` with its tag replaced by ``tag`` (a registry port is not a tag)."""
    name, _, last = image.rpartition("/")
    repository = last.split(":", 1)[0]
    return f"{name}/{repository}:{tag}" if name else f"{repository}:{tag}"


def _first_container(api: ApiClient, namespace: str, deployment: str) -> tuple[str, str]:
    """The name and image of the Deployment's first container."""
    try:
        current: Any = AppsV1Api(api).read_namespaced_deployment(deployment, namespace)
    except ApiException as err:
        if err.status == 404:
            raise ValueError(
                f"no Deployment {namespace}/{deployment} in the sandbox cluster; "
                "name one of Astra's Deployments with --deployment"
            ) from None
        raise
    container = current.spec.template.spec.containers[0]
    return str(container.name), str(container.image)


def _check_bad_build(fault: str, share: float, image: str) -> None:
    if not 0 < share <= 1 or not image:
        raise ValueError(f"{fault} needs 0 < share <= 1 and an image; got share={share}")


def _roll_out_bad_build(
    api: ApiClient,
    namespace: str,
    deployment: str,
    tag: str,
    share: float,
    error: str,
    timeout_seconds: float,
) -> BadRolloutFault:
    apps: Any = AppsV1Api(api)
    name, previous = _first_container(api, namespace, deployment)
    bad = _tagged(previous, tag)
    cause = f"{deployment}:{tag} (sandbox fault bad-rollout)"
    ref = DeploymentRef(namespace=namespace, name=deployment)
    history = KubernetesActivities(api).rollout_history
    before = history(ref).current_revision
    if previous != bad:
        apps.patch_namespaced_deployment(
            deployment,
            namespace,
            {
                "metadata": {"annotations": {CHANGE_CAUSE: cause}},
                "spec": {"template": {"spec": {"containers": [{"name": name, "image": bad}]}}},
            },
        )
    # The controller records the new revision on its next pass; report it once it has.
    deadline = time.monotonic() + timeout_seconds
    newest = history(ref).newest
    while (newest is None or bad not in newest.images) and time.monotonic() < deadline:
        time.sleep(0.02)
        newest = history(ref).newest
    recorded = newest if newest is not None and bad in newest.images else None
    return BadRolloutFault(
        namespace=namespace,
        deployment=deployment,
        previous_image=previous,
        image=bad,
        change_cause=cause,
        from_revision=before,
        to_revision=recorded.revision if recorded else None,
        replica_set=recorded.replica_set if recorded else None,
        share=share,
        error=error,
    )


async def bad_rollout(
    target: SandboxTarget,
    api: ApiClient,
    namespace: str = "astra",
    deployment: str = "astra-worker",
    tag: str = "bad",
    share: float = 0.5,
    error: str = BAD_BUILD_ERROR,
    timeout_seconds: float = 10.0,
) -> BadRolloutFault:
    """Roll ``deployment`` to a bad build (image tag ``tag``), whose pods fail ``share`` of the
    tasks they run with ``error``; rolling back to the previous revision cures it.

    Running it again while the bad build is out rolls nothing new.
    """
    _check_bad_build("bad rollout", share, tag)
    fault = await asyncio.to_thread(
        _roll_out_bad_build, api, namespace, deployment, tag, share, error, timeout_seconds
    )
    bad = BadBuild(image=fault.image, share=share, error=error)
    await _mark_bad_build(target, fault.image, bad)
    return fault


async def bad_canary_image(
    api: ApiClient,
    namespace: str = ASTRA_NAMESPACE,
    deployment: str = "astra-worker",
    tag: str = BAD_CANARY_TAG,
) -> str:
    """The image ``bad_canary`` marks when none is named: the one ``deployment`` runs, tagged
    ``tag``, so it is a new build of the same service."""
    _, image = await asyncio.to_thread(_first_container, api, namespace, deployment)
    return _tagged(image, tag)


async def bad_canary(
    target: SandboxTarget, image: str, share: float = 0.5, error: str = BAD_BUILD_ERROR
) -> BadCanaryFault:
    """Make ``image`` a bad build without rolling it out anywhere: the pods that run it later
    (a canary upgrade to it) fail ``share`` of the tasks they run with ``error``, so the canary's
    analysis has something real to catch, and pods of every other image run as before.

    Marking it again changes its share and error; ``clear_bad_build`` (or ``reset``) undoes it.
    """
    _check_bad_build("bad canary", share, image)
    await _mark_bad_build(target, image, BadBuild(image=image, share=share, error=error))
    return BadCanaryFault(image=image, share=share, error=error)


async def clear_bad_build(target: SandboxTarget, image: str) -> BadBuildCleared:
    """``image`` is no longer a bad build: pods that run it stop failing; other images' stay."""
    return BadBuildCleared(image=image, was_bad=await _mark_bad_build(target, image, None))


class CertificateFault(BaseModel):
    namespace: str
    fingerprints: dict[str, str]
    """Service -> the certificate now in its Secret."""
    not_after: datetime
    rolled: bool
    """Whether the services were restarted onto it (``cert-expiring``) or not
    (``cert-mismatch``: the endpoint keeps serving the one it loaded)."""


def _reissue(
    api: ApiClient,
    ca: CertificateAuthority,
    namespace: str,
    services: list[str],
    not_before: datetime,
    not_after: datetime,
    roll: bool,
) -> CertificateFault:
    kubernetes = KubernetesActivities(api)
    written = {}
    for service in services:
        secret = tls_secret(service)
        data, version, _ = kubernetes.secret_object(namespace, secret)
        sans = describe(read_pem(data["tls.crt"])).sans or service_names(service, namespace)
        cert, key = ca.issue(sans, not_before, not_after)
        kubernetes.put_secret_data(namespace, secret, {"tls.crt": cert, "tls.key": key}, version)
        written[service] = describe(read_pem(cert)).fingerprint
        if roll:  # as `kubectl rollout restart` does
            stamp = {"kubectl.kubernetes.io/restartedAt": datetime.now(UTC).isoformat()}
            AppsV1Api(api).patch_namespaced_deployment(
                service, namespace, {"spec": {"template": {"metadata": {"annotations": stamp}}}}
            )
    return CertificateFault(
        namespace=namespace, fingerprints=written, not_after=not_after, rolled=roll
    )


async def cert_expiring(
    api: ApiClient,
    ca: CertificateAuthority,
    namespace: str = ASTRA_NAMESPACE,
    services: list[str] | None = None,
    days_left: float = 5,
    lifetime_days: float = 90,
) -> CertificateFault:
    """Each service's Secret gets a certificate with ``days_left`` to live (negative: already
    expired), for the same names, and the service is restarted so its endpoint serves it."""
    now = datetime.now(UTC)
    not_after = now + timedelta(days=days_left)
    return await asyncio.to_thread(
        _reissue,
        api,
        ca,
        namespace,
        services or list(TLS_SERVICES),
        not_after - timedelta(days=lifetime_days),
        not_after,
        True,
    )


async def cert_mismatch(
    api: ApiClient,
    ca: CertificateAuthority,
    namespace: str = ASTRA_NAMESPACE,
    services: list[str] | None = None,
) -> CertificateFault:
    """A new, valid certificate in each service's Secret that nobody restarted the service for:
    its endpoint still serves the one its pods loaded."""
    now = datetime.now(UTC)
    return await asyncio.to_thread(
        _reissue,
        api,
        ca,
        namespace,
        services or ["gateway"],
        now - timedelta(minutes=5),
        now + timedelta(days=90),
        False,
    )
