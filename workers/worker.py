"""The worker's composition root: which workflows and activities run on which task queue."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypedDict

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Interceptor, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxRestrictions

from activities.access import AccessActivities, Trust
from activities.communication import CommunicationActivities
from activities.endpoints import EndpointActivities
from activities.incident import IncidentActivities
from activities.kube_client import BoundedApiClient
from activities.kubernetes import KubernetesActivities, unauthenticated_client
from activities.metrics import MetricsActivities, metrics_source
from activities.notify import NotifyActivities
from activities.postgres import PostgresActivities
from activities.postgres_nodes import PostgresNodeActivities
from activities.privilege import is_privileged, privileged_queue
from activities.redis_nodes import RedisNodeActivities
from activities.redis_store import RedisActivities
from activities.releases import ReleaseActivities
from activities.tls import TlsActivities, TlsConfig, VaultPki
from activities.vault import VaultActivities, VaultConfig
from runtime.client import connect
from runtime.identity import parse_trusted_keys
from runtime.logs import configure_logging
from runtime.metrics import worker_started
from runtime.redact import redact_logs
from runtime.settings import Settings, SettingsError
from runtime.telemetry import process_telemetry
from workers.log_context import StepContext, record_context
from workers.sandbox import ImportSafeSandboxRunner
from workflows.catalogue import RUNBOOKS
from workflows.errors import CODE_ERRORS
from workflows.incident import Incident
from workflows.kill_switch import KillSwitch
from workflows.timeouts import HEARTBEAT_THROTTLE, STICKY_QUEUE_TIMEOUT
from workflows.tls_scan import TlsScan

log = logging.getLogger(__name__)

WORKFLOW_TASK_SLOTS = 8
"""Workflow tasks a worker takes at once. Workflow code is Python under one interpreter lock,
so more at once only makes each slower: with the SDK's default of 100, an alert storm opening a
hundred incidents had the worker take them all, finish none within the 10 s workflow task
timeout, and start over (a storm of 400 groups never got one incident running). Tasks beyond
these wait on the server, where no timeout runs, and go to whichever worker is free."""


def kube_api(settings: Settings) -> k8s.ApiClient:
    """The sandbox's unauthenticated URL when set; else in-cluster credentials, then kubeconfig.
    Either way each request times out (``activities.kube_client``)."""
    if settings.kube_url:
        return unauthenticated_client(settings.kube_url)
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return BoundedApiClient()


def vault_config(settings: Settings) -> VaultConfig:
    return VaultConfig(
        address=settings.vault_addr,
        token=settings.vault_token.get_secret_value() if settings.vault_token else None,
        token_file=settings.vault_token_file,
        unseal_keys_file=settings.vault_unseal_keys_file,
        source_root=settings.vault_source_root,
        source_env_prefix=settings.vault_source_env_prefix,
        token_period_seconds=settings.vault_token_period_seconds,
        credential=settings.vault_credential,
        approle_mount=settings.vault_approle_mount,
        secret_id_ttl_seconds=settings.vault_secret_id_ttl_seconds,
    )


def tls_config(settings: Settings) -> TlsConfig:
    """The CA `tls-rotation` issues from: the PKI mount when one is named, else the CA files."""
    pki = None
    if settings.tls_vault_pki_mount:
        if not settings.vault_addr:
            raise SettingsError(
                "ASTRA_OPS_TLS_VAULT_PKI_MOUNT names a PKI engine, but ASTRA_OPS_VAULT_ADDR is not "
                "set: set it (and ASTRA_OPS_VAULT_TOKEN_FILE), or unset the mount to sign with "
                "ASTRA_OPS_TLS_CA_CERT_FILE and _KEY_FILE"
            )
        pki = VaultPki(
            address=settings.vault_addr,
            token=settings.vault_token.get_secret_value() if settings.vault_token else None,
            token_file=settings.vault_token_file,
            mount=settings.tls_vault_pki_mount,
            role=settings.tls_vault_pki_role,
        )
    return TlsConfig(settings.tls_ca_cert_file, settings.tls_ca_key_file, vault_pki=pki)


def activities_of(*instances: object) -> list[Callable[..., Any]]:
    """Every ``@activity.defn`` method of each instance, bound to it.

    Registered from the classes, so a new activity cannot be forgotten; one that no workflow
    calls any more shows up in tests/test_activity_registry.py instead of lingering.
    """
    return [
        getattr(instance, name)
        for instance in instances
        for name in activities_of_class(type(instance))
    ]


def activities_of_class(cls: type) -> list[str]:
    """The names of the ``@activity.defn`` methods of ``cls``."""
    return [
        name
        for name, function in inspect.getmembers(cls, inspect.isfunction)
        if activity._Definition.from_callable(function) is not None
    ]


def workflow_runner() -> ImportSafeSandboxRunner:
    """The sandbox every worker and replayer runs workflows in.

    The sandbox imports a workflow's modules afresh for every run. What every runbook shares is
    imported once, outside it, as the SDK's own workflow module is: the models (plain data, whose
    pydantic schemas are costly to build), the step runner and approval gate (workflow code
    without module state, deterministic as the replay tests check) and ``runtime`` (constants,
    redaction, identity). That halves a run's first workflow task (96 -> 56 ms per replay of a
    Shard Scaling dry-run). The incident's rules and messages (constants and pure functions) are
    shared the same way: every incident opened re-imported them. Each workflow's own module stays
    in the sandbox, with its checks.
    cryptography's native bindings (signature checks) cannot be loaded twice in one process.
    The garbage collector is held off while it imports (workers/sandbox.py).
    """
    return ImportSafeSandboxRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            "workflows.models",
            "workflows.incident_models",
            "workflows.incident_rules",
            "workflows.incident_messages",
            "workflows.runbook",
            "workflows.steps",
            "workflows.approval",
            "workflows.errors",
            "workflows.timeouts",
            "runtime",
            "pydantic",
            "pydantic_core",
            "cryptography",
        )
    )


class WorkflowOptions(TypedDict):
    workflows: Sequence[type]
    workflow_runner: WorkflowRunner
    workflow_failure_exception_types: Sequence[type[BaseException]]


def workflow_options() -> WorkflowOptions:
    """What runs workflow code, and how: shared by the worker and the replayer
    (tests/test_replay.py), so a stored history replays exactly as the worker would run it."""
    return WorkflowOptions(
        workflows=[*RUNBOOKS.values(), KillSwitch, Incident, TlsScan],
        workflow_runner=workflow_runner(),
        # A bug in workflow code fails its run (compensations first, see workflows/errors.py)
        # instead of retrying a workflow task forever; a non-determinism error still does not.
        workflow_failure_exception_types=CODE_ERRORS,
    )


def trust(settings: Settings) -> Trust:
    """The keys runs check signatures with; outside dev mode there must be some."""
    file = settings.trusted_keys_file
    spec = settings.trusted_keys or (file.read_text() if file is not None else "")
    keys = parse_trusted_keys(spec) if spec.strip() else {}
    if not settings.dev_mode and not keys:
        raise SettingsError(
            "outside dev mode the worker needs the API's public signing keys: set "
            "ASTRA_OPS_TRUSTED_KEYS or ASTRA_OPS_TRUSTED_KEYS_FILE (`astra-ops keygen --signing` "
            "prints a pair), or ASTRA_OPS_DEV_MODE=true on a laptop"
        )
    return Trust(dev_mode=settings.dev_mode, keys=keys)


def standard_activities(client: Client, settings: Settings) -> list[Any]:
    """What any worker may run: the policy, notifications, incidents, metrics reads and the
    release checks; none of it acts on Astra (``activities.privilege``)."""
    communication = CommunicationActivities.from_settings(settings)
    notify = NotifyActivities(settings.access_policy, communication)
    identity = trust(settings)
    return [
        AccessActivities(
            settings.access_policy,
            identity,
            client,
            notify,
            settings.state_dsn,
            settings.data_plane_topology,
        ),
        notify,
        IncidentActivities(settings.access_policy, identity, settings.postmortems),
        communication,
        MetricsActivities(metrics_source(settings.database_url, settings.prometheus_url)),
        ReleaseActivities(settings.releases_root),
    ]


@asynccontextmanager
async def privileged_activities(settings: Settings) -> AsyncIterator[list[Any]]:
    """What only a worker deployed with the rights to Astra's cluster, data plane and secrets
    may run; its clients are closed when the block ends."""
    kubernetes_api = kube_api(settings)
    kubernetes = KubernetesActivities(kubernetes_api)
    redis = RedisActivities(settings.redis_url, key_prefix=settings.redis_key_prefix)
    try:
        yield [
            kubernetes,
            EndpointActivities(kubernetes, settings.data_plane_topology),
            PostgresActivities(settings.database_url, settings.data_plane_topology),
            redis,
            PostgresNodeActivities(settings.data_plane_topology),
            RedisNodeActivities(
                settings.data_plane_topology,
                settings.database_url,
                key_prefix=settings.redis_key_prefix,
            ),
            VaultActivities(vault_config(settings), kubernetes),
            TlsActivities(tls_config(settings), kubernetes),
        ]
    finally:
        await redis.aclose()
        kubernetes_api.close()  # type: ignore[no-untyped-call]


def routed(activities: list[Any], privileged: bool) -> list[Any]:
    """``activities``, checked to be what the runs route to this kind of worker: one the runs
    send elsewhere would never be called here, and its runs would wait for it forever."""
    strays = [a.__qualname__ for a in activities if is_privileged(a) != privileged]
    if strays:
        raise RuntimeError(
            f"the worker composition disagrees with activities.privilege.PRIVILEGED about "
            f"{', '.join(strays)}; fix one of the two"
        )
    return activities


@asynccontextmanager
async def running_worker(
    client: Client,
    settings: Settings,
    executor: ThreadPoolExecutor,
    task_queue: str | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> AsyncIterator[Worker]:
    """The worker(s) of ``settings.worker_kind``, polling until the block ends; then their
    connections are released. Yields the one that runs the workflows (or, for a privileged
    worker, the privileged one). ``interceptors`` join the worker's own (bench/recovery.py
    injects its faults so)."""
    redact_logs()  # activities' clients log URLs, the SDK logs their failures
    queue = task_queue or settings.task_queue
    kind = settings.worker_kind
    common: dict[str, Any] = {
        "activity_executor": executor,
        "graceful_shutdown_timeout": timedelta(seconds=settings.worker_graceful_shutdown_seconds),
        "max_heartbeat_throttle_interval": HEARTBEAT_THROTTLE,
        "sticky_queue_schedule_to_start_timeout": STICKY_QUEUE_TIMEOUT,
        "interceptors": [StepContext(), *interceptors],
    }
    async with contextlib.AsyncExitStack() as stack:
        workers = []
        if kind in ("all", "standard"):
            standard = activities_of(*standard_activities(client, settings))
            workers.append(
                Worker(
                    client,
                    task_queue=queue,
                    activities=standard,
                    max_concurrent_workflow_tasks=WORKFLOW_TASK_SLOTS,
                    **common,
                    **workflow_options(),
                )
            )
        if kind in ("all", "privileged"):
            rights = await stack.enter_async_context(privileged_activities(settings))
            workers.append(
                Worker(
                    client,
                    task_queue=privileged_queue(queue),
                    activities=activities_of(*rights),
                    **common,
                )
            )
        for worker in workers:
            await stack.enter_async_context(worker)
        yield workers[0]


async def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then let running activities finish (graceful shutdown).

    Metrics are served at ASTRA_OPS_WORKER_METRICS_ADDRESS when set; traces are sent when the
    OTEL_* settings ask (runtime/telemetry.py).
    """
    configure_logging(settings.log_format, record_context)
    telemetry = process_telemetry(settings.worker_metrics_address, service="astra-ops-worker")
    try:
        client = await connect(settings, telemetry=telemetry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with ThreadPoolExecutor(max_workers=16) as executor:
            async with running_worker(client, settings, executor):
                queue, kind = settings.task_queue, settings.worker_kind
                polled = [queue] if kind != "privileged" else []
                polled += [privileged_queue(queue)] if kind != "standard" else []
                if telemetry.runtime is not None:
                    worker_started(
                        telemetry.runtime.metric_meter,
                        settings.temporal_namespace,
                        polled,
                        queue if kind != "privileged" else None,
                        RUNBOOKS,
                    )
                log.info(
                    "%s worker polling %s at %s%s",
                    kind,
                    " and ".join(polled),
                    settings.temporal_address,
                    f"; metrics at http://{settings.worker_metrics_address}/metrics"
                    if settings.worker_metrics_address
                    else "",
                )
                await stop.wait()
                log.info("stopping worker: waiting for running activities")
    finally:
        telemetry.close()
