"""What a long-running process (the worker, the API) exports besides its work: Prometheus
metrics through the Temporal SDK's runtime, and OpenTelemetry traces through the SDK's
TracingInterceptor. Made once per process, handed to the one client factory
(:func:`runtime.client.connect`), closed when the process stops.

Metrics are on when the process has a metrics address (``ASTRA_OPS_WORKER_METRICS_ADDRESS``,
``ASTRA_OPS_API_METRICS_ADDRESS``): the SDK's exporter serves ``http://ADDRESS/metrics`` with
the SDK's own metrics and astra-ops's (runtime/metrics.py).

Tracing is off unless the standard OpenTelemetry settings ask for it: ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, or any installed exporter's name; ``none`` is off) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not true. The exporters read the rest of their ``OTEL_*`` settings
themselves (endpoint, headers, protocol, timeouts; ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``). It needs the ``tracing`` extra:
``pip install 'astra-ops[tracing]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from runtime.errors import ConfigError
from runtime.metrics import STEP_DURATION, STEP_DURATION_BUCKETS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from temporalio.client import Interceptor
    from temporalio.runtime import Runtime

OTLP_PROTOCOLS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
"""``OTEL_EXPORTER_OTLP_PROTOCOL`` -> the exporter's entry point; http/protobuf is the
specification's default, and the one the ``tracing`` extra installs."""


class TelemetryError(ConfigError):
    """The OTEL_* settings ask for something this installation cannot do; says what to install
    or change."""


@dataclass
class Telemetry:
    """One process's exporters: the SDK runtime its client runs on (None: the SDK's default,
    which exports nothing) and the client interceptors that trace it (which the worker made
    from that client applies too)."""

    runtime: Runtime | None = None
    interceptors: Sequence[Interceptor] = ()
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Send the spans still buffered: the CLI's exit skips interpreter finalization."""
        for close in self.on_close:
            close()
        self.on_close.clear()


def process_telemetry(
    metrics_address: str | None, *, service: str, env: Mapping[str, str] = os.environ
) -> Telemetry:
    """This process's exporters: Prometheus at ``metrics_address`` when set, traces when the
    ``OTEL_*`` settings in ``env`` ask for them (named ``service`` unless OTEL_SERVICE_NAME
    says otherwise). Call once per process: a second call binds the metrics address again."""
    telemetry = Telemetry(runtime=metrics_runtime(metrics_address) if metrics_address else None)
    if tracing_wanted(env):
        provider = tracer_provider(service, env)
        from temporalio.contrib.opentelemetry import TracingInterceptor

        telemetry.interceptors = [TracingInterceptor(provider.get_tracer("astra-ops"))]
        telemetry.on_close.append(provider.shutdown)
    return telemetry


def metrics_runtime(address: str) -> Runtime:
    """An SDK runtime whose Prometheus exporter serves ``http://address/metrics``, in
    Prometheus's naming: counters end in ``_total``, durations are seconds named ``_seconds``.
    """
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    try:
        return Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(
                    bind_address=address,
                    counters_total_suffix=True,
                    unit_suffix=True,
                    durations_as_seconds=True,
                    histogram_bucket_overrides={STEP_DURATION: STEP_DURATION_BUCKETS},
                )
            )
        )
    except Exception as err:  # the core's bind error: a taken port, an unknown address
        raise ConfigError(
            f"cannot serve metrics at {address}: {err}; choose a free host:port for the "
            "metrics address, or unset it"
        ) from None


def tracing_wanted(env: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* settings ask for traces (see the module's docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def tracer_provider(service: str, env: Mapping[str, str]) -> TracerProvider:
    """A TracerProvider exporting, in batches, to every exporter OTEL_TRACES_EXPORTER names
    (default ``otlp``)."""
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TelemetryError(
            "the OTEL_* settings turn tracing on, but OpenTelemetry is not installed: "
            "pip install 'astra-ops[tracing]', or unset OTEL_TRACES_EXPORTER and "
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        ) from None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; what is passed here
    # would override them, so the default name is passed only when neither names the service.
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: service}))
    names = env.get("OTEL_TRACES_EXPORTER", "otlp") or "otlp"
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        provider.add_span_processor(BatchSpanProcessor(span_exporter(name, env)))
    return provider


def span_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    """The installed span exporter registered under ``name`` (OpenTelemetry's entry points:
    ``console``, ``otlp_proto_http``, ...), ``otlp`` meaning the one for the OTLP protocol."""
    asked = name
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol not in OTLP_PROTOCOLS:
            raise TelemetryError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not one astra-ops exports traces "
                f"with; use one of {', '.join(OTLP_PROTOCOLS)}"
            )
        name = OTLP_PROTOCOLS[protocol]
        asked = f"otlp (over {protocol})"
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        package = "opentelemetry-exporter-" + name.replace("_", "-")
        raise TelemetryError(
            f"OTEL_TRACES_EXPORTER asks for the {asked} span exporter, which is not installed: "
            f"pip install {package} (the 'tracing' extra brings otlp over http/protobuf and "
            "console)"
        )
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter
