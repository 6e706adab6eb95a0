"""The worker's composition root: which workflows and activities run on which task queue."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import timedelta

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.kubernetes import KubernetesActivities
from activities.metrics import MetricsActivities, metrics_source
from activities.notify import NotifyActivities
from activities.postgres import PostgresActivities
from activities.redis_store import RedisActivities
from runtime.client import connect
from runtime.redact import redact_logs
from runtime.settings import Settings
from sandbox.kube import api_client
from workflows.catalogue import RUNBOOKS

log = logging.getLogger(__name__)


def kube_api(settings: Settings) -> k8s.ApiClient:
    """The sandbox's unauthenticated URL when set; else in-cluster credentials, then kubeconfig."""
    if settings.kube_url:
        return api_client(settings.kube_url)
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


@asynccontextmanager
async def running_worker(
    client: Client, settings: Settings, executor: ThreadPoolExecutor, task_queue: str | None = None
) -> AsyncIterator[Worker]:
    """The worker, polling until the block ends; then its connections are released."""
    redact_logs()  # activities' clients log URLs, the SDK logs their failures
    kubernetes_api = kube_api(settings)
    kubernetes = KubernetesActivities(kubernetes_api)
    notify = NotifyActivities(settings.access_policy, settings.chat_webhook_url)
    postgres = PostgresActivities(settings.database_url)
    redis = RedisActivities(settings.redis_url, key_prefix=settings.redis_key_prefix)
    metrics = MetricsActivities(metrics_source(settings.database_url, settings.prometheus_url))
    worker = Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(RUNBOOKS.values()),
        activities=[
            notify.request_approval,
            kubernetes.read_config,
            kubernetes.patch_config,
            kubernetes.rollout_health,
            kubernetes.rollout_restart,
            kubernetes.wait_rollout,
            kubernetes.rollout_history,
            kubernetes.rollout_undo,
            kubernetes.list_pods,
            kubernetes.delete_pod,
            kubernetes.verify_config,
            notify.notify_rotation,
            postgres.lease_summary,
            postgres.requeue_lost_worker,
            postgres.requeue_progress,
            postgres.failure_breakdown,
            postgres.requeue_dead_letters,
            postgres.task_states,
            redis.heartbeat_age,
            redis.live_workers,
            redis.read_dead_letters,
            redis.ack_dead_letters,
            metrics.failure_rate,
            metrics.cost_comparison,
        ],
        activity_executor=executor,
        # The shared models are plain data: importing them once, outside the per-run sandbox,
        # saves rebuilding every pydantic schema for every workflow run.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(
                "workflows.models", "pydantic", "pydantic_core"
            )
        ),
        graceful_shutdown_timeout=timedelta(seconds=30),
    )
    try:
        async with worker:
            yield worker
    finally:
        await redis.aclose()
        kubernetes_api.close()  # type: ignore[no-untyped-call]


async def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then let running activities finish (graceful shutdown)."""
    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(max_workers=16) as executor:
        async with running_worker(client, settings, executor):
            log.info(
                "worker polling task queue %s at %s",
                settings.task_queue,
                settings.temporal_address,
            )
            await stop.wait()
            log.info("stopping worker: waiting for running activities")
