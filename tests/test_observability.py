"""What astra-ops tells its operators' monitoring, checked as their tools would see it.

The worker runs as `astra-ops worker` does in production, as a process of its own configured by
its environment: Prometheus scrapes its metrics address, a log pipeline reads its JSON lines on
stderr, and its console span exporter (OTEL_TRACES_EXPORTER=console) writes to stdout. The API is
served on loopback with its own metrics address, against a Temporal server of the test's own, so
the runs waiting for approval are the test's alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client import CoreV1Api, V1ConfigMap, V1ObjectMeta
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.opentelemetry import TracingInterceptor

from runtime.access import load_policy
from runtime.identity import Signer
from runtime.settings import ENV_PREFIX, Settings, SettingsError, load_settings
from runtime.telemetry import TelemetryError, span_exporter, tracing_wanted
from sandbox.servers.process import free_port
from starters.api import create_app
from starters.runs import Runs
from tests.conftest import OwnTemporal
from tests.conftest_kube import KubeSandbox, eventually
from tests.helpers import awaiting_approval, handle_of, settings_env
from tests.monitoring import on_loopback
from workers.worker import running_worker
from workflows.models import ApprovalSignal, Decision, Outcome

STARTUP_SECONDS = 60
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(page: str, name: str, **labels: str) -> list[float]:
    """The values of ``name``'s samples (one per series) whose labels include ``labels``."""
    found = []
    for line in page.splitlines():
        match = SAMPLE.match(line)
        if match is None or match[1] != name:
            continue
        have = dict(LABEL.findall(match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match[3]))
    return found


def metric(page: str, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels``; None when there is none."""
    found = samples(page, name, **labels)
    return sum(found) if found else None


async def scrape(address: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://{address}/metrics")
    response.raise_for_status()
    return response.text


async def reads(address: str, name: str, value: float, **labels: str) -> None:
    """Wait until the page at ``address`` shows ``name`` (with ``labels``) at ``value``."""
    seen: list[float | None] = []

    async def shown() -> bool:
        seen.append(metric(await scrape(address), name, **labels))
        return seen[-1] == value

    await eventually(
        shown, timeout=30, message=f"{name}{labels} = {value} (last seen: {seen[-1:]})"
    )


@dataclass
class WorkerProcess:
    """`astra-ops worker` in a process of its own, and where its output goes."""

    metrics: str
    stdout: Path
    stderr: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line it logged; each must be one JSON object."""
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line]

    def spans(self) -> list[dict[str, Any]]:
        """The spans its console exporter printed (JSON objects one after another)."""
        text, decoder, spans = self.stdout.read_text(), json.JSONDecoder(), []
        position = 0
        while (position := _skip_space(text, position)) < len(text):
            span, position = decoder.raw_decode(text, position)
            spans.append(span)
        return spans


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


@asynccontextmanager
async def worker_process(
    settings: Settings, folder: Path, **env: str
) -> AsyncIterator[WorkerProcess]:
    """Run `astra-ops worker` with ``settings`` and ``env`` until the block ends, then stop it
    with SIGTERM, as Kubernetes does, so it flushes what it buffers."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = WorkerProcess(metrics, folder / "worker.out", folder / "worker.err")
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", ENV_PREFIX))},
        **settings_env(settings),
        f"{ENV_PREFIX}WORKER_METRICS_ADDRESS": metrics,
        f"{ENV_PREFIX}LOG_FORMAT": "json",
        **env,
    }
    with worker.stdout.open("wb") as out, worker.stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "starters.cli", "worker", env=environment, stdout=out, stderr=err
        )
    try:

        async def polling() -> bool:
            assert proc.returncode is None, f"the worker exited: {worker.stderr.read_text()}"
            return "worker polling" in worker.stderr.read_text()

        await eventually(polling, timeout=STARTUP_SECONDS, message="the worker polls")
        yield worker
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise


async def start(
    runs: Runs, namespace: str, *, dry_run: bool = False, reason: str = "", **params: str
) -> str:
    started = await runs.start(
        "shard-scaling",
        {"shards": 12, "namespace": namespace, **params},
        requester="alice",
        reason=reason or "rebalance hot shards",
        dry_run=dry_run,
    )
    return started.run_id


async def test_the_worker_counts_runs_once_and_times_their_steps(
    settings: Settings,
    runs: Runs,
    client: Client,
    kube: KubeSandbox,
    namespace: str,
    tmp_path: Path,
) -> None:
    shard_scaling = {"runbook": "shard-scaling"}
    failed = {"outcome": "failed", **shard_scaling}
    async with worker_process(settings, tmp_path) as worker:
        page = await scrape(worker.metrics)
        assert metric(page, "astra_ops_worker_up", task_queue=settings.task_queue) == 1
        # The SDK's own metrics are on the same page; the series alerts watch start at 0.
        assert metric(page, "temporal_worker_task_slots_available") is not None
        assert samples(page, "astra_ops_runs_finished_total", **failed) == [0]

        run_id = await start(runs, namespace, dry_run=True)
        handle = handle_of(client, run_id)
        assert (await handle.result()).outcome == Outcome.DONE
        # A ConfigMap without the count: the run fails at its first step.
        CoreV1Api(kube.api).create_namespaced_config_map(
            namespace, V1ConfigMap(metadata=V1ObjectMeta(name="no-count"), data={"OTHER": "1"})
        )
        failing = await start(runs, namespace, dry_run=True, config_map="no-count")
        with pytest.raises(WorkflowFailureError):
            await handle_of(client, failing).result()
        await reads(worker.metrics, "astra_ops_runs_finished_total", 2, **shard_scaling)
        # A query on a closed run replays its whole history on the worker: nothing counts twice.
        await handle.query("status")
        page = await scrape(worker.metrics)

    assert metric(page, "astra_ops_runs_started_total", **shard_scaling) == 2
    assert metric(page, "astra_ops_runs_finished_total", outcome="done", **shard_scaling) == 1
    assert samples(page, "astra_ops_runs_finished_total", **failed) == [1]
    # Each run read the count (the second found none there, and failed on what it read).
    read = {"step": "read current shard count", "state": "done", **shard_scaling}
    assert metric(page, "astra_ops_step_duration_seconds_count", **read) == 2
    assert metric(page, "astra_ops_step_duration_seconds_bucket", le="+Inf", **read) == 2
    assert (metric(page, "astra_ops_step_duration_seconds_sum", **read) or 0) > 0
    health = {"step": "check astra-scheduler health", "state": "done", **shard_scaling}
    assert metric(page, "astra_ops_step_duration_seconds_count", **health) == 1
    assert metric(page, "temporal_workflow_completed_total", workflow_type="shard-scaling") == 1
    assert metric(page, "temporal_workflow_failed_total", workflow_type="shard-scaling") == 1


async def test_json_log_lines_say_run_runbook_and_step_and_stay_redacted(
    settings: Settings, runs: Runs, client: Client, namespace: str, tmp_path: Path
) -> None:
    # Without a chat webhook the approval notice is logged by the activity that sends it.
    quiet = settings.model_copy(update={"chat_webhook_url": None})
    secret = "hunter2"
    reason = f"runbook notes at https://ops:{secret}@wiki.example/shards"
    async with worker_process(quiet, tmp_path) as worker:
        run_id = await start(runs, namespace, reason=reason)
        handle = handle_of(client, run_id)
        await awaiting_approval(handle, "approve scaling")
        # An unsigned decision: the run refuses it and says so in its (workflow) log.
        await handle.signal("approve", ApprovalSignal(approver="bob"))

        def refusal_logged() -> bool:
            return any("refused" in line["message"] for line in worker.log_lines())

        await eventually(refusal_logged, timeout=10, message="the refusal is logged")
        await runs.decide(run_id, Decision(approver="bob", decision="reject"))
        assert (await handle.result()).outcome == Outcome.REJECTED

    lines = worker.log_lines()
    about_the_run = {"run_id": run_id, "runbook": "shard-scaling", "step": "approve scaling"}
    (notice,) = [line for line in lines if line["message"].startswith("Approval needed")]
    assert notice.items() >= {**about_the_run, "activity": "request_approval"}.items(), notice
    assert (
        secret not in notice["message"] and "https://***@wiki.example/shards" in notice["message"]
    )
    (refused,) = [line for line in lines if line["message"].startswith("refused approve")]
    assert refused.items() >= {**about_the_run, "logger": "temporalio.workflow"}.items(), refused
    assert all(line.keys() >= {"time", "level", "logger", "message"} for line in lines)
    assert not any(secret in json.dumps(line) for line in lines)


async def test_traces_follow_a_run_from_the_client_through_the_worker(
    settings: Settings, client: Client, signer: Signer, namespace: str, tmp_path: Path
) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    config = client.config()
    config["interceptors"] = [TracingInterceptor(provider.get_tracer("test"))]
    traced = Client(**config)
    runs = Runs(traced, settings.task_queue, load_policy(settings.access_policy), signer)
    async with worker_process(settings, tmp_path, OTEL_TRACES_EXPORTER="console") as worker:
        run_id = await start(runs, namespace, dry_run=True)
        assert (await handle_of(client, run_id).result()).outcome == Outcome.DONE

    (started,) = [s for s in exported.get_finished_spans() if s.name.startswith("StartWorkflow")]
    assert started.context is not None
    trace = f"0x{started.context.trace_id:032x}"
    spans = worker.spans()
    in_trace = {s["name"] for s in spans if s["context"]["trace_id"] == trace}
    assert {"RunWorkflow:shard-scaling", "RunActivity:read_config"} <= in_trace, in_trace
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"astra-ops-worker"}


@pytest.fixture
async def own_worker(own_temporal: OwnTemporal, settings: Settings) -> AsyncIterator[Settings]:
    """A worker on the test's own Temporal server; the settings that point at that server."""
    own = settings.model_copy(update={"temporal_address": own_temporal.address})
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with running_worker(own_temporal.env.client, own, executor):
            yield own


async def test_the_api_serves_approvals_waiting_the_oldest_age_and_the_kill_switch(
    own_worker: Settings, own_temporal: OwnTemporal, signer: Signer, namespace: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = own_worker.model_copy(
        update={"api_metrics_address": address, "metrics_refresh_seconds": 0.2}
    )
    runs = Runs(
        own_temporal.env.client, settings.task_queue, load_policy(settings.access_policy), signer
    )
    async with on_loopback(create_app(settings)):
        await reads(address, "astra_ops_visibility_up", 1)
        page = await scrape(address)
        assert metric(page, "astra_ops_approvals_waiting", runbook="shard-scaling") == 0
        assert metric(page, "astra_ops_approval_oldest_age_seconds") == 0
        assert metric(page, "astra_ops_kill_switch_frozen") == 0

        before = datetime.now(UTC)
        run_id = await start(runs, namespace)
        await awaiting_approval(handle_of(own_temporal.env.client, run_id), "approve scaling")
        await reads(address, "astra_ops_approvals_waiting", 1, runbook="shard-scaling")

        async def aging() -> bool:
            age = metric(await scrape(address), "astra_ops_approval_oldest_age_seconds") or 0
            assert age <= (datetime.now(UTC) - before).total_seconds()
            return age > 0

        await eventually(aging, timeout=10, message="the oldest approval's age grows")

        await runs.freeze("alice", "observing the gauge")
        try:
            await reads(address, "astra_ops_kill_switch_frozen", 1)
        finally:
            await runs.unfreeze("bob", "seen")
        await reads(address, "astra_ops_kill_switch_frozen", 0)

        await runs.decide(run_id, Decision(approver="bob", decision="reject"))
        await reads(address, "astra_ops_approvals_waiting", 0, runbook="shard-scaling")
        page = await scrape(address)
        assert metric(page, "astra_ops_approval_oldest_age_seconds") == 0
        # The API's Temporal client reports through the same page.
        assert (metric(page, "temporal_request_total") or 0) > 0


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_off_unless_the_standard_otel_settings_ask(
    env: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(env) is wanted


def test_an_exporter_that_is_not_installed_is_named_with_what_to_install() -> None:
    with pytest.raises(TelemetryError, match="pip install opentelemetry-exporter-zipkin-json"):
        span_exporter("zipkin_json", {})
    with pytest.raises(TelemetryError, match="use one of http/protobuf, grpc"):
        span_exporter("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_a_metrics_address_must_be_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}WORKER_METRICS_ADDRESS", "9000")
    with pytest.raises(SettingsError, match=r"WORKER_METRICS_ADDRESS: .*expected host:port"):
        load_settings()
